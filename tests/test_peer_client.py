"""The QEMU-like realize client against scripted servers over real sockets.

Two fakes stand in for a device server: :class:`CaptureServer` answers from
the real QEMU captures (each command gets the recorded reply to the same
command and body), so the client's c2s stream can be compared with QEMU's
byte for byte; :class:`FakeDevice` is a small reference device (layout.py)
for the workload, doing its DMA through the memfd or through DMA_READ/DMA_WRITE.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import struct
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, ClassVar

import attrs
import pytest
import trio
import trio.testing

from recorder.records import FdRecord
from tests.conftest import FD_HYGIENE
from tests.realdata import TRACES, capture_messages
from vfioproxy.errors import TransportError, VfioProxyError
from vfioproxy.io.fds import FdKind, OwnedFd, close_all, inspect_fd, make_eventfd, make_memfd
from vfioproxy.io.transport import FdStream, fd_stream_pair
from vfioproxy.peers import layout
from vfioproxy.peers.client import (
    QEMU_VERSION_JSON,
    RealizeClient,
    RealizeError,
    RealizeOptions,
    open_realize_client,
    realize,
    workload_payload,
)
from vfioproxy.peers.endpoint import Endpoint, ErrorReplyError
from vfioproxy.peers.guest_memory import (
    BIOS,
    RAM,
    DmaWindow,
    GuestMemory,
    MemoryAccessError,
    realize_windows,
    reset_windows,
)
from vfioproxy.protocol.bodies import (
    DmaAccessBody,
    DmaLayout,
    RawBody,
    RegionAccessBody,
    RegionInfoBody,
    SparseMmapArea,
    SparseMmapCap,
)
from vfioproxy.protocol.codec import (
    Dialects,
    Message,
    build_command,
    build_error_reply,
    build_reply,
    decode,
    encode,
)
from vfioproxy.protocol.header import FLAG_NO_REPLY, HEADER_SIZE, Command, Header
from vfioproxy.side import Direction, Side

pytestmark = FD_HYGIENE

E1K = "qemu-realize-qemu-server-e1000e-001"
NVME = "qemu-realize-qemu-server-nvme-001"
LVU = "qemu-realize-libvfio-user-server-001"
GPIO = "qemu-realize-gpio-001"
REALIZE_CAPTURES = sorted(p.stem for p in TRACES.glob("qemu-realize-*.trace"))

#: what a test sees of a message: its bytes and (kind, size, file flags) of each fd
Wire = tuple[bytes, tuple[tuple[str, int | None, int | None], ...]]
#: a script may replace the recorded reply: a list of (bytes, fds) to send, [] for silence
Script = Callable[[Message, bytes | None], list[tuple[bytes, list[OwnedFd]]] | None]


def wire(data: bytes, fds: Any) -> Wire:
    kinds = []
    for fd in fds:
        if isinstance(fd, FdRecord):
            kinds.append((fd.kind.value, fd.size, fd.flags))
        else:
            info = inspect_fd(fd)
            kinds.append((info.kind.value, info.size, info.flags))
    return data, tuple(kinds)


def with_id(data: bytes, msg_id: int) -> bytes:
    return struct.pack("<H", msg_id) + data[2:]


def reply_to(message: Message, payload: bytes = b"", *, error: int = 0) -> bytes:
    flags = 0x21 if error else 0x1
    return (
        Header(message.msg_id, message.command, HEADER_SIZE + len(payload), flags, error).pack()
        + payload
    )


def make_fd_like(record: FdRecord) -> OwnedFd:
    if record.kind in (FdKind.MEMFD, FdKind.FILE):
        return make_memfd("replayed", record.size or 0)
    return make_eventfd()


# --------------------------------------------------------------------- capture server


class CaptureServer:
    """A server that answers each command with the captured reply to the same command and body.

    ``expected`` is the capture's c2s stream; ``seen`` what the client sent.
    A command the capture does not have gets a plausible answer (zeros for a
    REGION_READ, an echo for a REGION_WRITE, an empty success otherwise) and
    is listed in ``fallbacks``. ``script`` may replace any answer.
    """

    def __init__(self, capture: str, script: Script | None = None) -> None:
        self.script = script
        self.replies: dict[tuple[int, bytes], deque[tuple[bytes, tuple[FdRecord, ...]]]] = {}
        self.expected: list[Wire] = []
        self.seen: list[Wire] = []
        self.fallbacks: list[str] = []
        self.endpoint: Endpoint | None = None
        pending: dict[int, deque[bytes]] = {}
        for m in capture_messages(TRACES / f"{capture}.trace"):
            header = Header.parse(m.data)
            if m.direction is Direction.C2S and header.is_command:
                self.expected.append(wire(m.data, m.fds))
                pending.setdefault(header.msg_id, deque()).append(m.data)
            elif m.direction is Direction.S2C and header.is_reply:
                command = pending[header.msg_id].popleft()
                key = (header.command, command[HEADER_SIZE:])
                self.replies.setdefault(key, deque()).append((m.data, m.fds))

    def recorded_reply(self, message: Message, raw: bytes) -> tuple[bytes, list[OwnedFd]] | None:
        queue = self.replies.get((message.command, raw[HEADER_SIZE:]))
        if not queue:
            return None
        data, records = queue.popleft()
        return with_id(data, message.msg_id), [make_fd_like(r) for r in records]

    def fallback(self, message: Message) -> bytes:
        self.fallbacks.append(message.describe())
        body = message.body
        if message.command == Command.REGION_READ and isinstance(body, RegionAccessBody):
            return reply_to(
                message,
                RegionAccessBody(
                    body.offset, body.region, body.count, bytes(body.count)
                ).serialize(),
            )
        if message.command == Command.REGION_WRITE and isinstance(body, RegionAccessBody):
            return reply_to(
                message, RegionAccessBody(body.offset, body.region, body.count).serialize()
            )
        if message.command == Command.DEVICE_GET_REGION_INFO and isinstance(body, RegionInfoBody):
            return reply_to(message, RegionInfoBody(32, 0, body.index).serialize())
        return reply_to(message)

    async def handle(self, message: Message) -> None:
        raw = encode(message)[0]
        self.seen.append(wire(raw, message.fds))
        close_all(message.fds)
        recorded = self.recorded_reply(message, raw)
        sends = (
            self.script(message, None if recorded is None else recorded[0]) if self.script else None
        )
        if sends is None:
            if recorded is None and message.header.no_reply:
                return
            sends = [recorded] if recorded is not None else [(self.fallback(message), [])]
        elif recorded is not None:
            close_all(recorded[1])
        assert self.endpoint is not None
        try:
            for data, fds in sends:
                with suppress(TransportError, trio.ClosedResourceError, trio.BrokenResourceError):
                    await self.endpoint.stream.send_message(data, fds)  # unless the client left
        finally:
            for _, fds in sends:
                close_all(fds)


@asynccontextmanager
async def serving(
    server: Any, *, client_layout: DmaLayout = DmaLayout.QEMU, max_fds: int = 253
) -> AsyncIterator[FdStream]:
    """Run ``server.handle`` on one end of a socketpair; yields the client's end."""
    a, b = fd_stream_pair(max_fds=max_fds)
    endpoint = Endpoint(
        b,
        Side.SERVER,
        handler=server.handle,
        dialects=Dialects(client=client_layout, server=DmaLayout.SPEC),
    )
    server.endpoint = endpoint
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(endpoint.run)
            try:
                yield a
            except BaseException as exc:  # re-raised below, not wrapped in a group
                body_error = exc
            nursery.cancel_scope.cancel()
    finally:
        await a.aclose()
        await b.aclose()
        if hasattr(server, "close"):
            server.close()
    if body_error is not None:
        raise body_error


def override(
    predicate: Callable[[Message], bool],
    payload: bytes | None = None,
    *,
    error: int = 0,
    silence: bool = False,
    fds: Callable[[], list[OwnedFd]] | None = None,
) -> Script:
    """A script for commands matching ``predicate``: silence, an error reply, a
    reply with ``payload``, or the recorded reply; with ``fds()`` attached."""

    def script(
        message: Message, recorded: bytes | None
    ) -> list[tuple[bytes, list[OwnedFd]]] | None:
        if not predicate(message):
            return None
        if silence:
            return []
        if error or payload is not None or recorded is None:
            data = reply_to(message, payload or b"", error=error)
        else:
            data = recorded
        return [(data, fds() if fds else [])]

    return script


def is_cmd(command: int, **fields: int) -> Callable[[Message], bool]:
    def predicate(message: Message) -> bool:
        return message.command == command and all(
            getattr(message.body, k, None) == v for k, v in fields.items()
        )

    return predicate


def cfg_read(offset: int, count: int) -> Callable[[Message], bool]:
    return is_cmd(Command.REGION_READ, region=7, offset=offset, count=count)


def commands(seen: list[Wire]) -> list[Message]:
    return [decode(data) for data, _ in seen]


async def run_capture(
    capture: str, options: RealizeOptions | None = None, script: Script | None = None
) -> tuple[CaptureServer, Any]:
    server = CaptureServer(capture, script)
    async with serving(server) as stream:
        result = await realize(stream, options or RealizeOptions())
    return server, result


async def fails_at(
    capture: str, script: Script, options: RealizeOptions | None = None
) -> tuple[CaptureServer, RealizeError]:
    server = CaptureServer(capture, script)
    async with serving(server) as stream:
        with pytest.raises(RealizeError) as info:
            await realize(stream, options or RealizeOptions())
    return server, info.value


# ===================================================================== fidelity


@pytest.mark.parametrize("capture", REALIZE_CAPTURES)
async def test_realize_and_reset_send_qemus_captured_stream_byte_for_byte(capture: str) -> None:
    server, _ = await run_capture(capture)
    assert server.fallbacks == []
    assert len(server.seen) == len(server.expected)
    for i, (sent, recorded) in enumerate(zip(server.seen, server.expected, strict=True)):
        assert sent == recorded, f"c2s message {i}: {decode(sent[0]).describe()}"


async def test_without_a_ram_fd_the_maps_carry_no_memfd_and_offset_zero() -> None:
    server, _ = await run_capture(E1K, RealizeOptions(ram_fd=False))
    expected = []
    for data, fds in server.expected:
        message = decode(data)
        if message.command == Command.DMA_MAP:
            body = attrs.evolve(message.body, offset=0)
            data, fds = data[:HEADER_SIZE] + body.serialize(), ()
        expected.append((data, fds))
    assert server.seen == expected


async def test_the_version_command_is_qemus_214_bytes() -> None:
    server, _ = await run_capture(E1K)
    data, fds = server.seen[0]
    assert len(data) == 214 and fds == ()
    assert data[16:20] == bytes(4) and data[20:-1] == QEMU_VERSION_JSON and data[-1] == 0


async def test_the_e1000e_result_holds_the_device_as_qemu_saw_it() -> None:
    _, result = await run_capture(E1K)
    assert (result.vendor_id, result.device_id, result.class_code) == (0x8086, 0x10D3, 0x020000)
    assert result.version == (0, 0) and result.max_msg_fds == 8
    assert result.rom_size == 0x40000
    assert [(b.index, b.kind) for b in result.bars] == [
        (0, "mem32"),
        (1, "mem32"),
        (2, "I/O"),
        (3, "mem32"),
    ]
    assert [(c.name, c.offset) for c in result.capabilities] == [
        ("PM", 0xC8),
        ("MSI", 0xD0),
        ("PCIe", 0xE0),
        ("MSI-X", 0xA0),
        ("AER", 0x100),
        ("DSN", 0x140),
    ]
    assert result.msix is not None
    assert (result.msix.entries, result.msix.pba_bar, result.msix.pba_offset) == (5, 3, 0x2000)
    assert result.msi_control == 0x0080 and result.interrupt_pin == 1
    assert result.posted_writes and result.interrupt == "intx"
    assert result.sent["REGION_READ cmd"] == 16 and result.received["DMA_MAP reply"] == 6
    assert result.timings.realize is not None and result.timings.reset is not None


async def test_the_samples_server_result_shows_the_reasked_mmap_region() -> None:
    _, result = await run_capture(LVU)
    bar1 = result.regions[1]
    assert (bar1.asks, bar1.argsz, bar1.fd) == (2, 80, True)
    assert bar1.sparse_areas == ((0, 0x1000), (0x2000, 0x1000)) == bar1.mmapped
    assert not result.posted_writes
    assert result.rom_size == 0 and result.msix is None


async def test_the_summary_and_json_describe_the_run() -> None:
    _, result = await run_capture(NVME)
    text = result.summary()
    assert "device 1b36:0010" in text and "MSI-X: 65 entries" in text and "BAR0" in text
    assert json.loads(json.dumps(result.to_json()))["msix"]["entries"] == 65


# ===================================================================== region info and fds


def open_fd_targets() -> list[str]:
    """What each open fd of this process refers to (``/memfd:name (deleted)``…)."""
    targets = []
    for name in os.listdir("/proc/self/fd"):
        with suppress(OSError):  # the fd that listed the directory is gone
            targets.append(os.readlink(f"/proc/self/fd/{name}"))
    return targets


async def test_region_info_is_asked_again_and_the_first_replys_fd_is_closed() -> None:
    def first_reply_with_fd(message: Message, recorded: bytes | None):
        if is_cmd(Command.DEVICE_GET_REGION_INFO, index=1, argsz=32)(message):
            assert recorded is not None
            return [(recorded, [make_memfd("first-reply", 0x4000)])]
        if is_cmd(Command.DEVICE_GET_REGION_INFO, index=1, argsz=80)(message):
            assert recorded is not None
            return [(recorded, [make_memfd("second-reply", 0x4000)])]
        return None

    server = CaptureServer(LVU, first_reply_with_fd)
    async with serving(server) as stream, open_realize_client(stream) as client:
        await client.realize()
        targets = open_fd_targets()
        assert not any("first-reply" in t for t in targets)
        assert any("second-reply" in t for t in targets)  # (and one dup per mmap)
        assert [len(m) for _, _, m in client.regions[1].mmaps] == [0x1000, 0x1000]
    assert not any("reply" in t for t in open_fd_targets())
    assert server.seen == server.expected[: len(server.seen)]


async def test_interrupt_eventfds_live_until_close_and_s1_closes_the_old_intx_one() -> None:
    server = CaptureServer(E1K)
    eventfds = lambda: sum(t == "anon_inode:[eventfd]" for t in open_fd_targets())  # noqa: E731
    before = eventfds()
    async with serving(server) as stream, open_realize_client(stream) as client:
        await client.realize()
        assert eventfds() == before + 2  # INTx and ERR
        old = client.intx_fd
        await client.reset()
        assert eventfds() == before + 2 and old is not None and old.closed
    assert eventfds() == before


async def test_a_region_info_reply_with_two_fds_fails_and_both_are_closed() -> None:
    script = override(
        is_cmd(Command.DEVICE_GET_REGION_INFO, index=0),
        fds=lambda: [make_eventfd(), make_eventfd()],
    )
    _, error = await fails_at(E1K, script)
    assert error.step == "R4" and "unexpected fds" in str(error)


async def test_a_reply_that_should_have_no_fd_fails_with_it_closed() -> None:
    _, error = await fails_at(
        E1K, override(is_cmd(Command.DEVICE_GET_INFO), fds=lambda: [make_eventfd()])
    )
    assert str(error) == "R3 device info: unexpected fds: the reply carries 1"


async def test_a_reply_larger_than_qemus_buffer_fails() -> None:
    payload = struct.pack("<IIII", 16, 3, 10, 5) + bytes(8)
    _, error = await fails_at(E1K, override(is_cmd(Command.DEVICE_GET_INFO), payload))
    assert str(error) == "R3 device info: reply larger than recv buffer (40 > 32 bytes)"


async def test_a_region_whose_argsz_keeps_growing_fails_after_four_asks() -> None:
    asks = []

    def growing(message: Message, recorded: bytes | None):
        if is_cmd(Command.DEVICE_GET_REGION_INFO, index=2)(message):
            asks.append(message.body)
            argsz = message.body.argsz + 8
            return [(reply_to(message, RegionInfoBody(argsz, 0, 2).serialize()), [])]
        return None

    _, error = await fails_at(E1K, growing)
    assert error.step == "R4" and "keeps growing" in str(error) and len(asks) == 4


# ===================================================================== timeouts and errors


async def test_a_silent_server_times_out_at_the_step_in_qemus_five_seconds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    start = trio.current_time()
    _, error = await fails_at(
        E1K, override(is_cmd(Command.DEVICE_GET_REGION_INFO, index=2), silence=True)
    )
    assert trio.current_time() - start == pytest.approx(5.0)
    assert error.step == "R4" and str(error).startswith("R4 region info for BAR2: no reply to")
    assert "within 5.0 s" in str(error)


async def test_the_reply_timeout_option_bounds_every_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    start = trio.current_time()
    _, error = await fails_at(
        E1K,
        override(is_cmd(Command.DEVICE_RESET), silence=True),
        RealizeOptions(reply_timeout=0.25),
    )
    assert error.step == "S4" and trio.current_time() - start == pytest.approx(0.25)


async def test_a_silent_dma_burst_times_out_on_its_last_map(
    autojump_clock: trio.testing.MockClock,
) -> None:
    _, error = await fails_at(E1K, override(is_cmd(Command.DMA_MAP, iova=0xFFFC0000), silence=True))
    assert error.step == "R2" and "DMA_MAP cmd id=2" in str(error)


async def test_an_error_reply_inside_a_burst_is_reported_after_the_last_reply() -> None:
    server, error = await fails_at(
        E1K, override(is_cmd(Command.DMA_MAP, iova=0xC0000), error=errno.ENOSPC)
    )
    assert str(error) == "S7 q35 memory re-layout: peer replied errno 28 (ENOSPC)"
    assert commands(server.seen)[-1].body.iova == 0x100000


@pytest.mark.parametrize(
    ("predicate", "text"),
    [
        (is_cmd(Command.DEVICE_GET_INFO), "R3 device info: peer replied errno 22 (EINVAL)"),
        (
            is_cmd(Command.DEVICE_GET_REGION_INFO, index=2),
            "R4 region info for BAR2: peer replied errno 22 (EINVAL)",
        ),
        (
            is_cmd(Command.DEVICE_GET_REGION_INFO, index=7),
            "R5 region info for config space: peer replied errno 22 (EINVAL)",
        ),
        (cfg_read(0, 4096), "R7 config space copy (4096 bytes): peer replied errno 22 (EINVAL)"),
        (cfg_read(0x30, 4), "R8 ROM BAR size probe: peer replied errno 22 (EINVAL)"),
        (cfg_read(0x18, 4), "R9 BAR2 type: peer replied errno 22 (EINVAL)"),
        (
            cfg_read(0xA8, 4),
            "R10 MSI-X early setup (capability at 0xa0): peer replied errno 22 (EINVAL)",
        ),
        (cfg_read(0xD2, 2), "R11 MSI flags (capability at 0xd0): peer replied errno 22 (EINVAL)"),
        (
            is_cmd(Command.DEVICE_SET_IRQS, index=3),
            "R14 ERR notifier: peer replied errno 22 (EINVAL)",
        ),
        (cfg_read(0xCC, 2), "S3 force D0 (PMCSR at 0xcc): peer replied errno 22 (EINVAL)"),
        (is_cmd(Command.DEVICE_RESET), "S4 device reset: peer replied errno 22 (EINVAL)"),
        (
            is_cmd(Command.REGION_WRITE, offset=0x1C),
            "S6 clear BAR3: peer replied errno 22 (EINVAL)",
        ),
        (is_cmd(Command.DMA_UNMAP), "S7 q35 memory re-layout: peer replied errno 22 (EINVAL)"),
    ],
)
async def test_an_error_reply_fails_realize_naming_the_step(
    predicate: Callable[[Message], bool], text: str
) -> None:
    _, error = await fails_at(E1K, override(predicate, error=errno.EINVAL))
    assert str(error) == text and error.errno == errno.EINVAL


async def test_the_first_intx_enable_failure_names_r13() -> None:
    first = {"done": False}

    def fail_first_intx(message: Message, recorded: bytes | None):
        if is_cmd(Command.DEVICE_SET_IRQS, index=0, flags=0x24)(message) and not first["done"]:
            first["done"] = True
            return [(reply_to(message, error=errno.EBUSY), [])]
        return None

    _, error = await fails_at(E1K, fail_first_intx)
    assert str(error) == "R13 INTx enable: peer replied errno 16 (EBUSY)"


async def test_an_err_irq_info_failure_only_skips_the_err_notifier_as_in_qemu() -> None:
    server, result = await run_capture(
        E1K, script=override(is_cmd(Command.DEVICE_GET_IRQ_INFO, index=3), error=errno.EINVAL)
    )
    assert result.err_irq_count is None
    assert any(w.startswith("R6 ERR IRQ info failed") for w in result.warnings)
    sent = commands(server.seen)
    assert not any(m.command == Command.DEVICE_SET_IRQS and m.body.index == 3 for m in sent)


async def test_an_msix_pba_outside_its_bar_fails_realize() -> None:
    script = override(
        cfg_read(0xA8, 4), RegionAccessBody(0xA8, 7, 4, struct.pack("<I", 0x4003)).serialize()
    )
    _, error = await fails_at(E1K, script)
    assert error.step == "R10" and "MSIX PBA outside of specified BAR" in str(error)


async def test_a_short_config_read_fails() -> None:
    script = override(cfg_read(0, 4096), RegionAccessBody(0, 7, 256, bytes(256)).serialize())
    _, error = await fails_at(E1K, script)
    assert str(error) == "R7 config space copy (4096 bytes): short read: 256 of 4096 bytes"


async def test_a_message_of_invalid_type_makes_the_client_drop_the_connection() -> None:
    def bad_type(message: Message, recorded: bytes | None):
        if is_cmd(Command.DEVICE_GET_INFO)(message):
            return [(Header(9, 4, 16, 0x5).pack(), [])]
        return None

    _, error = await fails_at(E1K, bad_type)
    assert error.step == "R3" and "invalid type 5" in str(error)


async def test_a_server_that_hangs_up_fails_the_step() -> None:
    class HangUp(CaptureServer):
        async def handle(self, message: Message) -> None:
            if message.command == Command.DEVICE_GET_INFO:
                assert self.endpoint is not None
                await self.endpoint.stream.aclose()
                return
            await super().handle(message)

    server = HangUp(E1K)
    async with serving(server) as stream:
        with pytest.raises(RealizeError, match=r"^R3 device info: connection lost"):
            await realize(stream)


# ===================================================================== VERSION


def version_reply(json_text: bytes, *, major: int = 0, minor: int = 0, nul: bool = True) -> bytes:
    return struct.pack("<HH", major, minor) + json_text + (b"\0" if nul else b"")


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        (
            version_reply(b'{"capabilities": {"max_msg_fds": 8}}' + b" " * 158),
            "reply larger than recv buffer (215 > 214 bytes)",
        ),
        (version_reply(b"{}", minor=1), "incompatible server version 0.1 (QEMU speaks 0.0)"),
        (version_reply(b"{}", major=1), "incompatible server version 1.0 (QEMU speaks 0.0)"),
        (version_reply(b'{"capabilities": {"max_msg_fds": 17}}'), "malformed max_msg_fds: 17"),
        (version_reply(b'{"capabilities": {"max_msg_fds": -1}}'), "malformed max_msg_fds: -1"),
        (version_reply(b'{"capabilities": {"max_msg_fds": true}}'), "malformed max_msg_fds: True"),
        (
            version_reply(b'{"capabilities": {"max_data_xfer_size": 67108865}}'),
            "malformed max_data_xfer_size: 67108865",
        ),
        (version_reply(b'{"capabilities": {"pgsizes": 512}}'), "pgsize 0x200 too small"),
        (
            version_reply(b'{"capabilities": {"max_dma_maps": 65536}}'),
            "malformed max_dma_maps: 65536",
        ),
        (
            version_reply(b'{"capabilities": {"migration": {"pgsize": 100}}}'),
            "migration pgsize 0x64 too small",
        ),
        (version_reply(b'{"capabilities": {"write_multiple": 1}}'), "malformed write_multiple"),
        (
            version_reply(b'{"capabilities": {}}', nul=False),
            "corrupt version reply: its last byte is not NUL",
        ),
        (version_reply(b"[1, 2]"), "capabilities b'[1, 2]' not an object"),
        (version_reply(b'{"capabilities": 3}'), "capabilities not an object"),
        (version_reply(b"{nope"), "malformed capabilities b'{nope'"),
        (b"\0\0", "corrupt version reply: 2-byte payload"),
    ],
)
async def test_a_version_reply_qemu_refuses_fails_r1(payload: bytes, problem: str) -> None:
    _, error = await fails_at(E1K, override(is_cmd(Command.VERSION), payload))
    assert str(error) == f"R1 version: {problem}"


async def test_a_version_error_reply_fails_r1() -> None:
    _, error = await fails_at(E1K, override(is_cmd(Command.VERSION), error=errno.EPROTO))
    assert str(error) == "R1 version: peer replied errno 71 (EPROTO)"


@pytest.mark.parametrize(
    ("json_text", "max_fds", "max_xfer"),
    [
        (b"{}", 8, 1 << 20),
        (b'{"capabilities": {}}', 8, 1 << 20),
        (b'{"capabilities": {"max_msg_fds": 16, "max_data_xfer_size": 67108864}}', 16, 64 << 20),
        (b'{"capabilities": {"max_msg_fds": 1, "max_data_xfer_size": 4096}}', 1, 4096),
    ],
)
async def test_absent_capabilities_take_qemus_defaults(
    json_text: bytes, max_fds: int, max_xfer: int
) -> None:
    script = override(is_cmd(Command.VERSION), version_reply(json_text))
    server, result = await run_capture(E1K, script=script)
    assert (result.max_msg_fds, result.max_data_xfer_size) == (max_fds, max_xfer)
    assert server.seen[1:] == server.expected[1:]


async def test_a_config_copy_above_max_data_xfer_size_is_never_sent() -> None:
    text = b'{"capabilities": {"max_data_xfer_size": 4095}}'
    server, error = await fails_at(E1K, override(is_cmd(Command.VERSION), version_reply(text)))
    assert str(error) == (
        "R7 config space copy (4096 bytes): 4096 bytes exceed the server's max_data_xfer_size "
        "4095: not sent (QEMU fails it with EINVAL)"
    )
    assert decode(server.seen[-1][0]).command == Command.DEVICE_GET_IRQ_INFO


async def test_spurious_capabilities_are_only_a_warning() -> None:
    text = b'{"capabilities": {"twin_socket": {"supported": false}, "max_msg_fds": 4}}'
    _, result = await run_capture(
        E1K, script=override(is_cmd(Command.VERSION), version_reply(text))
    )
    assert result.warnings == ("R1 spurious capabilities ['twin_socket']",)
    assert result.server_capabilities["max_msg_fds"] == 4


async def test_a_server_max_msg_fds_of_zero_fails_where_an_eventfd_must_go() -> None:
    script = override(
        is_cmd(Command.VERSION), version_reply(b'{"capabilities": {"max_msg_fds": 0}}')
    )
    _, error = await fails_at(E1K, script)
    assert str(error) == "R13 INTx enable: the server's max_msg_fds is 0: no eventfd can be passed"


# ============================================================ conditions that change the stream


@pytest.mark.parametrize(("size", "count"), [(256, 256), (4096, 4096), (8192, 4096), (200, 200)])
async def test_the_config_copy_count_follows_the_config_region_size(size: int, count: int) -> None:
    payload = RegionInfoBody(32, 3, 7, 0, size, 0).serialize()
    server, _ = await run_capture(
        GPIO, script=override(is_cmd(Command.DEVICE_GET_REGION_INFO, index=7), payload)
    )
    reads = [m for m in commands(server.seen) if m.command == Command.REGION_READ]
    assert (reads[0].body.offset, reads[0].body.count) == (0, count)


async def test_rombar_off_skips_the_rom_probe() -> None:
    server, result = await run_capture(E1K, RealizeOptions(rombar=False))
    assert result.rom_size is None
    assert not [m for m in commands(server.seen) if getattr(m.body, "offset", None) == 0x30]
    assert len(server.seen) == len(server.expected) - 4


async def test_pin_zero_means_no_intx_setup_and_no_s1() -> None:
    pin0 = override(cfg_read(0x3D, 1), RegionAccessBody(0x3D, 7, 1, b"\0").serialize())
    server, result = await run_capture(E1K, script=pin0)
    irqs = [
        (m.body.index, m.body.flags)
        for m in commands(server.seen)
        if m.command == Command.DEVICE_SET_IRQS
    ]
    assert irqs == [(3, 0x24)]
    assert result.interrupt == "none" and result.interrupt_pin == 0
    assert sum(1 for m in commands(server.seen) if getattr(m.body, "offset", None) == 0x3D) == 2


async def test_no_reset_flag_means_no_device_reset() -> None:
    payload = struct.pack("<IIII", 16, 2, 10, 5)
    server, _ = await run_capture(E1K, script=override(is_cmd(Command.DEVICE_GET_INFO), payload))
    assert Command.DEVICE_RESET not in [m.command for m in commands(server.seen)]


async def test_a_device_in_d3_is_brought_to_d0_at_reset() -> None:
    script = override(cfg_read(0xCC, 2), RegionAccessBody(0xCC, 7, 2, b"\x0b\x00").serialize())
    server, _ = await run_capture(E1K, script=script)
    pm = [
        (m.command, m.body.data)
        for m in commands(server.seen)
        if getattr(m.body, "offset", None) == 0xCC
    ]
    assert pm == [
        (Command.REGION_READ, b""),
        (Command.REGION_WRITE, b"\x08\x00"),
        (Command.REGION_READ, b""),
    ]


@pytest.mark.parametrize(
    ("flags", "errs", "text"),
    [
        (0x1, 10, "this isn't a PCI device (flags 0x1)"),
        (0x3, 7, "unexpected number of io regions 7"),
        (0x3, 101, "too many regions: 101 > 100"),
    ],
)
async def test_device_info_qemu_refuses_fails_r3(flags: int, errs: int, text: str) -> None:
    payload = struct.pack("<IIII", 16, flags, errs, 5)
    _, error = await fails_at(E1K, override(is_cmd(Command.DEVICE_GET_INFO), payload))
    assert str(error) == f"R3 device info: {text}"


async def test_a_second_reset_needs_no_memory_relayout() -> None:
    server = CaptureServer(E1K)
    async with serving(server) as stream, open_realize_client(stream) as client:
        await client.realize()
        await client.reset()
        before = len(server.seen)
        await client.reset()
        second = commands(server.seen[before:])
    assert not [m for m in second if m.command in (Command.DMA_MAP, Command.DMA_UNMAP)]
    assert [m.command for m in second][:2] == [Command.DEVICE_SET_IRQS, Command.REGION_READ]


# ===================================================================== posted writes


async def bar_write_flags(
    capture: str, region: int, options: RealizeOptions | None = None, script: Script | None = None
) -> list[int]:
    server = CaptureServer(capture, script)
    async with serving(server) as stream, open_realize_client(stream, options) as client:
        await client.realize()
        before = len(server.seen)
        await client.bar_write(region, 0, b"\1\0\0\0")
        await client.bar_read(region, 0, 4)  # a read after a posted write: in order
    return [decode(data).header.flags for data, _ in server.seen[before:]]


async def test_a_memory_bar_write_is_posted_without_mmap_regions() -> None:
    assert await bar_write_flags(E1K, 0) == [FLAG_NO_REPLY, 0]


async def test_an_io_bar_write_is_never_posted() -> None:
    assert await bar_write_flags(E1K, 2) == [0, 0]


async def test_posted_writes_off_makes_bar_writes_wait() -> None:
    assert await bar_write_flags(E1K, 0, RealizeOptions(posted_writes=False)) == [0, 0]


async def test_any_mmap_region_makes_bar_writes_wait() -> None:
    mmap_bar4 = override(
        is_cmd(Command.DEVICE_GET_REGION_INFO, index=4),
        RegionInfoBody(32, 0x7, 4, 0, 0, 0).serialize(),
    )
    assert await bar_write_flags(E1K, 0, script=mmap_bar4) == [0, 0]


async def test_config_writes_are_never_posted() -> None:
    server, _ = await run_capture(E1K)
    writes = [m for m in commands(server.seen) if m.command == Command.REGION_WRITE]
    assert writes and all(m.header.flags == 0 for m in writes)


# ===================================================================== guest memory and DMA answers


def dma_command(
    command: int,
    address: int,
    count: int,
    data: bytes = b"",
    *,
    msg_id: int = 1,
    no_reply: bool = False,
    fds: tuple[Any, ...] = (),
) -> Message:
    """A server's DMA command in the spec layout (as libvfio-user sends it)."""
    return build_command(
        command, msg_id, DmaAccessBody(address, count, data), fds=fds, no_reply=no_reply
    )


def answer_bytes(
    memory: GuestMemory,
    command: Message,
    layout_: DmaLayout = DmaLayout.QEMU,
    max_xfer: int = 1 << 20,
) -> bytes | None:
    reply = memory.answer(command, layout=layout_, max_data_xfer_size=max_xfer)
    return None if reply is None else encode(reply)[0]


@pytest.fixture
def memory() -> Any:
    guest = GuestMemory()
    for window in reset_windows(ram_fd=True):
        guest.map(window)
    yield guest
    guest.close()


def test_a_dma_read_reply_has_qemus_layout_with_four_padding_bytes(memory: GuestMemory) -> None:
    memory.write_ram(0x200000, b"8 bytes!")
    answer = answer_bytes(memory, dma_command(Command.DMA_READ, 0x200000, 8, msg_id=7))
    assert answer == (
        Header(7, 11, 16 + 12 + 8 + 4, 1).pack()
        + struct.pack("<QI", 0x200000, 8)
        + b"8 bytes!"
        + bytes(4)
    )


def test_a_dma_read_reply_in_the_spec_layout_has_a_u64_count(memory: GuestMemory) -> None:
    memory.write_ram(0x200000, b"8 bytes!")
    answer = answer_bytes(memory, dma_command(Command.DMA_READ, 0x200000, 8), DmaLayout.SPEC)
    assert answer == (
        Header(1, 11, 16 + 16 + 8, 1).pack() + struct.pack("<QQ", 0x200000, 8) + b"8 bytes!"
    )


def test_a_spec_dma_write_lands_whole_and_gets_qemus_header_only_reply(memory: GuestMemory) -> None:
    answer = answer_bytes(memory, dma_command(Command.DMA_WRITE, 0x300000, 5, b"hello", msg_id=3))
    assert answer == Header(3, 12, 16, 1).pack()
    assert memory.read_ram(0x300000, 5) == b"hello"


def test_a_dma_write_reply_in_the_spec_layout_echoes_address_and_count(memory: GuestMemory) -> None:
    answer = answer_bytes(
        memory, dma_command(Command.DMA_WRITE, 0x300000, 5, b"hello"), DmaLayout.SPEC
    )
    assert answer == Header(1, 12, 32, 1).pack() + struct.pack("<QQ", 0x300000, 5)


@pytest.mark.parametrize(
    ("command", "err"),
    [
        (dma_command(Command.DMA_READ, 0x30000000, 4), errno.EFAULT),
        (dma_command(Command.DMA_READ, 0x1FFFFFFC, 8), errno.EFAULT),
        (dma_command(Command.DMA_WRITE, 0xFFFC0000, 4, b"boot"), errno.EPERM),
        (dma_command(Command.DMA_WRITE, 0xBFFFC, 8, b"straddle"), errno.EPERM),
        (dma_command(Command.DMA_READ, 0, (1 << 20) + 1), errno.E2BIG),
        (dma_command(Command.DMA_WRITE, 0, 100, b"only ten!!"), errno.E2BIG),
        (build_command(Command.DMA_READ, 1, RawBody(bytes(8))), errno.EINVAL),
        (build_command(Command.REGION_READ, 1, RegionAccessBody(0, 0, 4)), errno.ENOSYS),
        (build_command(Command.VERSION, 1), errno.ENOSYS),
    ],
)
def test_dma_commands_qemu_refuses_get_its_error_reply(
    memory: GuestMemory, command: Message, err: int
) -> None:
    memory.write_ram(0xBFFFC, b"keep")
    answer = answer_bytes(memory, command)
    assert answer == Header(1, command.command, 16, 0x21, err).pack()
    assert memory.read_ram(0xBFFFC, 4) == b"keep"


def test_a_dma_command_with_an_fd_gets_einval_and_the_fd_is_closed(memory: GuestMemory) -> None:
    fd = make_eventfd()
    answer = answer_bytes(memory, dma_command(Command.DMA_READ, 0, 4, fds=(fd,)))
    assert answer == Header(1, 11, 16, 0x21, errno.EINVAL).pack() and fd.closed


def test_no_reply_dma_commands_are_answered_only_when_they_fail(memory: GuestMemory) -> None:
    assert (
        answer_bytes(memory, dma_command(Command.DMA_WRITE, 0x400000, 2, b"ok", no_reply=True))
        is None
    )
    assert memory.read_ram(0x400000, 2) == b"ok"
    failed = answer_bytes(memory, dma_command(Command.DMA_READ, 1 << 40, 2, no_reply=True))
    assert failed == Header(1, 11, 16, 0x21, errno.EFAULT).pack()


def test_dma_reaches_the_fd_less_roms_after_the_reset_layout(memory: GuestMemory) -> None:
    bios = bytes(range(256)) * (layout.BIOS_SIZE // 256)
    memory.load_rom(BIOS, bios)
    memory.write_ram(0xBFFF0, b"R" * 16)
    assert memory.read(0xBFFF0, 32) == b"R" * 16 + bytes(16)  # RAM, then pc.rom
    assert memory.read(0xE0000, 16) == bios[0x20000:0x20010]  # isa-bios aliases the BIOS top
    assert memory.read(0xFFFC0000, 4) == bios[:4]


def test_windows_must_not_overlap_and_unmap_must_be_exact() -> None:
    guest = GuestMemory()
    try:
        for window in realize_windows(ram_fd=False):
            guest.map(window)
        with pytest.raises(ValueError, match="overlaps"):
            guest.map(DmaWindow(0x1000, 0x1000, True, RAM))
        with pytest.raises(ValueError, match="no window is exactly"):
            guest.unmap(0, 0x1000)
        assert guest.unmap(0, layout.GUEST_RAM_SIZE).backing == RAM
        with pytest.raises(MemoryAccessError) as info:
            guest.read(0, 1)
        assert info.value.errno == errno.EFAULT
    finally:
        guest.close()
        guest.close()


@asynccontextmanager
async def realized(
    capture: str = E1K, options: RealizeOptions | None = None
) -> AsyncIterator[tuple[RealizeClient, Endpoint]]:
    """A realized and reset client, and the server endpoint to send it commands."""
    server = CaptureServer(capture)
    layout_ = (options or RealizeOptions()).dma_layout
    async with (
        serving(server, client_layout=layout_) as stream,
        open_realize_client(stream, options) as client,
    ):
        await client.realize()
        await client.reset()
        assert server.endpoint is not None
        yield client, server.endpoint


@pytest.mark.parametrize("layout_", [DmaLayout.QEMU, DmaLayout.SPEC])
async def test_the_client_answers_server_dma_over_the_socket_in_its_layout(
    layout_: DmaLayout,
) -> None:
    async with realized(options=RealizeOptions(dma_layout=layout_)) as (client, server):
        client.memory.write_ram(0x200000, b"guest data")
        await server.request(Command.DMA_WRITE, DmaAccessBody(0x200010, 3, b"dev"))
        reply = await server.request(Command.DMA_READ, DmaAccessBody(0x200000, 19))
        head = 12 if layout_ is DmaLayout.QEMU else 16
        assert encode(reply)[0][16 + head : 16 + head + 19] == b"guest data" + bytes(6) + b"dev"
        assert client.result().dma_answers == {"DMA_WRITE ok": 1, "DMA_READ ok": 1}


async def test_server_dma_errors_fds_and_no_reply_go_over_the_socket_as_in_qemu() -> None:
    async with realized() as (client, server):
        with pytest.raises(ErrorReplyError) as info:
            await server.request(Command.DMA_READ, DmaAccessBody(0x30000000, 4))
        assert info.value.errno == errno.EFAULT
        with pytest.raises(ErrorReplyError) as info:
            await server.request(Command.DMA_READ, RawBody(bytes(8)))
        assert info.value.errno == errno.EINVAL
        fd = make_eventfd()
        with pytest.raises(ErrorReplyError) as info:
            await server.request(Command.DMA_READ, DmaAccessBody(0, 4), fds=[fd])
        fd.close()
        assert info.value.errno == errno.EINVAL
        assert not await server.send_command(
            Command.DMA_WRITE, DmaAccessBody(0x200000, 2, b"np"), no_reply=True
        )
        await server.send_command(Command.DMA_READ, DmaAccessBody(1 << 40, 2), no_reply=True)
        await server.request(Command.DMA_READ, DmaAccessBody(0x200000, 2))  # in order: a barrier
        assert server.unexpected_replies == 1  # the error to the no_reply read
        assert client.memory.read_ram(0x200000, 2) == b"np"
        assert client.result().dma_answers["DMA_READ errno 14 (EFAULT)"] == 2


async def test_a_server_command_other_than_dma_gets_enosys() -> None:
    async with realized() as (_, server):
        with pytest.raises(ErrorReplyError) as info:
            await server.request(Command.REGION_READ, RegionAccessBody(0, 0, 4))
        assert info.value.errno == errno.ENOSYS


# ===================================================================== the workload


#: where the client's workload puts the destination buffer
DST_GPA = layout.WORKLOAD_BASE + 0x1000 + layout.MAX_TRANSFER


def op_result(op: int, data: bytes) -> bytes:
    if op == layout.OP_COPY:
        return data
    if op == layout.OP_INVERT:
        return bytes(b ^ 0xFF for b in data)
    return struct.pack("<I", zlib.crc32(data))


class FakeDevice:
    """The reference device's programming model (layout.py), just enough for the workload.

    DMA goes through the mmap'd memfd of a window when DMA_MAP passed one,
    else through DMA_READ/DMA_WRITE in the spec layout. ``seen`` lists
    (decoded command, number of fds) as received.
    """

    REGIONS: ClassVar[dict[int, tuple[int, int]]] = {
        0: (layout.BAR0_SIZE, 0x3),
        1: (layout.BAR1_SIZE, 0x3),
        2: (layout.BAR2_SIZE, 0x7),
        6: (layout.ROM_SIZE, 0x1),
        7: (layout.CONFIG_SIZE, 0x3),
    }

    def __init__(
        self,
        *,
        noresize: bool = False,
        corrupt: bool = False,
        mute: bool = False,
        max_msg_fds: int = 8,
    ) -> None:
        self.noresize, self.corrupt, self.mute = noresize, corrupt, mute
        self.max_msg_fds = max_msg_fds
        self.endpoint: Endpoint | None = None
        self.seen: list[tuple[Message, int]] = []
        self.config = bytearray(layout.CONFIG_SIZE)
        self.bar2 = make_memfd("bar2", layout.BAR2_SIZE)
        self.windows: list[tuple[int, int, mmap.mmap | None]] = []
        self.irqs: dict[tuple[int, int], OwnedFd] = {}
        self.regs = dict.fromkeys(
            (
                layout.REG_DESC_LO,
                layout.REG_DESC_HI,
                layout.REG_IRQ_STATUS,
                layout.REG_DOORBELL_COUNT,
                layout.REG_SCRATCH,
            ),
            0,
        )
        self.dma_messages = 0
        c = self.config
        struct.pack_into("<HHHH", c, 0, layout.VENDOR_ID, layout.DEVICE_ID, 0, 0x10)
        c[8], c[9:12] = layout.REVISION, layout.CLASS_CODE.to_bytes(3, "little")
        struct.pack_into("<IIII", c, 0x10, 0x0, 0x1, 0xC, 0x0)
        c[0x34], c[0x3D] = layout.CAP_PM, 1
        c[layout.CAP_PM : layout.CAP_PM + 4] = bytes([1, layout.CAP_MSI, 3, 0])
        c[layout.CAP_MSI : layout.CAP_MSI + 4] = bytes([5, layout.CAP_PCIE, 0x80, 0x01])
        c[layout.CAP_PCIE : layout.CAP_PCIE + 4] = bytes([0x10, layout.CAP_MSIX, 0x02, 0])
        struct.pack_into(
            "<BBHII",
            c,
            layout.CAP_MSIX,
            0x11,
            0,
            layout.MSIX_VECTORS - 1,
            layout.MSIX_TABLE_OFFSET | 2,
            layout.MSIX_PBA_OFFSET | 2,
        )

    def close(self) -> None:
        for _, _, mapping in self.windows:
            if mapping is not None:
                mapping.close()
        close_all(list(self.irqs.values()))
        self.bar2.close()

    async def reply(
        self, message: Message, body: Any = None, fds: list[OwnedFd] | None = None
    ) -> None:
        assert self.endpoint is not None
        if not message.header.no_reply:
            await self.endpoint.send(build_reply(message, body, fds=fds or []))

    async def handle(self, message: Message) -> None:
        self.seen.append((message, len(message.fds)))
        body: Any = message.body
        command = message.command
        fds = list(message.fds)
        if command == Command.VERSION:
            text = b'{"capabilities":{"max_msg_fds":%d}}' % self.max_msg_fds
            await self.reply(message, type(body)(0, 0, text))
        elif command == Command.DMA_MAP:
            mapping = mmap.mmap(fds[0].fileno(), body.size, offset=body.offset) if fds else None
            close_all(fds)
            self.windows.append((body.iova, body.size, mapping))
            await self.reply(message)
        elif command == Command.DMA_UNMAP:
            for window in [w for w in self.windows if w[:2] == (body.iova, body.size)]:
                self.windows.remove(window)
                if window[2] is not None:
                    window[2].close()
            await self.reply(message, body)
        elif command == Command.DEVICE_GET_INFO:
            await self.reply(message, type(body)(16, 3, 9, 5))
        elif command == Command.DEVICE_GET_REGION_INFO:
            size, flags = self.REGIONS.get(body.index, (0, 0))
            caps = (
                (SparseMmapCap((SparseMmapArea(0, layout.BAR2_MMAP_SIZE),)),)
                if body.index == 2
                else ()
            )
            info = RegionInfoBody.build(
                index=body.index, flags=flags, size=size, caps=caps, argsz=body.argsz
            )
            await self.reply(message, info, [self.bar2] if info.caps else [])
        elif command == Command.DEVICE_GET_IRQ_INFO:
            count = {0: 1, 1: layout.MSI_VECTORS, 2: layout.MSIX_VECTORS}.get(body.index, 1)
            flags = 0x9 if body.index == 2 and self.noresize else 0x1
            await self.reply(message, type(body)(16, flags, body.index, count))
        elif command == Command.DEVICE_SET_IRQS:
            if body.flags == 0x21 and body.count == 0:
                for key in [k for k in self.irqs if k[0] == body.index]:
                    self.irqs.pop(key).close()
            for i, fd in enumerate(fds):
                old = self.irqs.pop((body.index, body.start + i), None)
                if old is not None:
                    old.close()
                self.irqs[(body.index, body.start + i)] = fd
            await self.reply(message)
        elif command == Command.REGION_READ:
            if body.region == 7:
                data = bytes(self.config[body.offset : body.offset + body.count])
            elif body.region == 0 and body.offset == layout.REG_ID:
                data = struct.pack("<I", layout.REG_ID_VALUE)
            else:
                data = struct.pack("<I", self.regs.get(body.offset, 0))[: body.count]
            await self.reply(message, RegionAccessBody(body.offset, body.region, body.count, data))
        elif command == Command.REGION_WRITE:
            await self.region_write(body)
            await self.reply(message, RegionAccessBody(body.offset, body.region, body.count))
        elif command == Command.DEVICE_RESET:
            self.regs = dict.fromkeys(self.regs, 0)
            await self.reply(message)
        else:
            close_all(fds)
            assert self.endpoint is not None
            await self.endpoint.send(build_error_reply(message, errno.ENOSYS))

    async def region_write(self, body: RegionAccessBody) -> None:
        value = int.from_bytes(body.data, "little")
        if body.region == 7:
            if body.offset == 0x30:
                value &= ~(layout.ROM_SIZE - 1) & 0xFFFFF801
                self.config[0x30:0x34] = struct.pack("<I", value)
            elif not 0x10 <= body.offset < 0x28:
                self.config[body.offset : body.offset + body.count] = body.data
        elif body.region == 0 and body.offset == layout.REG_DOORBELL:
            await self.run_descriptor()
        elif body.region == 0 and body.offset == layout.REG_IRQ_STATUS:
            self.regs[layout.REG_IRQ_STATUS] &= ~value
        elif body.region == 0 and body.offset in self.regs:
            self.regs[body.offset] = value

    async def run_descriptor(self) -> None:
        base = self.regs[layout.REG_DESC_HI] << 32 | self.regs[layout.REG_DESC_LO]
        src, dst, length, op, cookie = layout.DESCRIPTOR.unpack(
            await self.dma_read(base, layout.DESCRIPTOR.size)
        )
        out = op_result(op, await self.dma_read(src, length))
        if self.corrupt:
            out = bytes([out[0] ^ 1]) + out[1:]
        await self.dma_write(dst, out)
        await self.dma_write(
            base + layout.COMPLETION_OFFSET,
            layout.COMPLETION.pack(layout.COMPLETION_OK, zlib.crc32(out), cookie, len(out)),
        )
        self.regs[layout.REG_IRQ_STATUS] |= layout.IRQ_STATUS_DONE
        self.regs[layout.REG_DOORBELL_COUNT] += 1
        fd = self.irqs.get((2, 0)) or self.irqs.get((0, 0))
        if fd is not None and not self.mute:
            os.write(fd.fileno(), struct.pack("<Q", 1))

    def mapped(self, iova: int, count: int) -> tuple[mmap.mmap, int] | None:
        for start, size, mapping in self.windows:
            if start <= iova and iova + count <= start + size and mapping is not None:
                return mapping, iova - start
        return None

    async def dma_read(self, iova: int, count: int) -> bytes:
        hit = self.mapped(iova, count)
        if hit is not None:
            return hit[0][hit[1] : hit[1] + count]
        assert self.endpoint is not None
        self.dma_messages += 1
        reply = await self.endpoint.request(Command.DMA_READ, DmaAccessBody(iova, count))
        data: bytes = reply.body.data
        return data

    async def dma_write(self, iova: int, data: bytes) -> None:
        hit = self.mapped(iova, len(data))
        if hit is not None:
            hit[0][hit[1] : hit[1] + len(data)] = data
            return
        assert self.endpoint is not None
        self.dma_messages += 1
        await self.endpoint.request(Command.DMA_WRITE, DmaAccessBody(iova, len(data), data))


async def run_device(device: FakeDevice, options: RealizeOptions) -> Any:
    async with serving(device, client_layout=options.dma_layout) as stream:
        return await realize(stream, options)


@pytest.mark.parametrize("dma_layout", [DmaLayout.QEMU, DmaLayout.SPEC])
@pytest.mark.parametrize("ram_fd", [True, False], ids=["ram-fd", "no-ram-fd"])
@pytest.mark.parametrize("irq", ["intx", "msix"])
async def test_the_workload_passes_with_each_interrupt_and_memory_mode(
    irq: str, ram_fd: bool, dma_layout: DmaLayout
) -> None:
    device = FakeDevice()
    options = RealizeOptions(workload=7, irq=irq, ram_fd=ram_fd, dma_layout=dma_layout)
    result = await run_device(device, options)
    assert device.regs[layout.REG_DOORBELL_COUNT] == 7
    assert result.workload is not None and result.workload.doorbells == 7
    assert result.workload.irq == irq
    assert result.timings.doorbell is not None and result.timings.doorbell.count == 7
    assert result.timings.workload is not None
    if ram_fd:
        assert device.dma_messages == 0 and not result.dma_answers
    else:
        assert device.dma_messages == 28  # descriptor, source, destination, completion
        assert result.dma_answers == {"DMA_READ ok": 14, "DMA_WRITE ok": 14}
    unmasks = [
        m for m, _ in device.seen if m.command == Command.DEVICE_SET_IRQS and m.body.flags == 0x11
    ]
    assert len(unmasks) == (7 if irq == "intx" else 0)
    assert not result.posted_writes  # BAR2 reports MMAP


def irq_sets(device: FakeDevice) -> list[tuple[int, int, int, int, int]]:
    return [
        (m.body.index, m.body.flags, m.body.start, m.body.count, n)
        for m, n in device.seen
        if m.command == Command.DEVICE_SET_IRQS
    ]


@pytest.mark.parametrize("noresize", [False, True], ids=["resizable", "noresize"])
async def test_msix_is_enabled_the_way_qemu_does_for_a_guest(noresize: bool) -> None:
    device = FakeDevice(noresize=noresize)
    await run_device(device, RealizeOptions(workload=1, irq="msix"))
    control = [
        m.body
        for m, _ in device.seen
        if m.command == Command.REGION_WRITE and m.body.offset == layout.CAP_MSIX + 2
    ]
    assert [c.data for c in control] == [struct.pack("<H", 0x8000 | (layout.MSIX_VECTORS - 1))]
    sets = irq_sets(device)
    start = len(sets) - 1 - sets[::-1].index((0, 0x21, 0, 0, 0))  # INTx off for MSI-X
    expected = [(0, 0x21, 0, 0, 0), (2, 0x24, 0, 1, 0)]
    for nr in range(layout.MSIX_VECTORS):
        if noresize:
            expected += [(2, 0x21, 0, 0, 0), (2, 0x24, 0, nr + 1, nr + 1)]
        else:
            expected += [(2, 0x24, nr, 1, 1)]
    assert sets[start:] == expected


async def test_eventfds_go_in_chunks_of_the_servers_max_msg_fds() -> None:
    device = FakeDevice(noresize=True, max_msg_fds=3)
    await run_device(device, RealizeOptions(workload=1, irq="msix"))
    assert irq_sets(device)[-2:] == [(2, 0x24, 0, 3, 3), (2, 0x24, 3, 1, 1)]


async def test_a_reset_after_msix_falls_back_to_intx_then_disables_it() -> None:
    device = FakeDevice()
    async with (
        serving(device) as stream,
        open_realize_client(stream, RealizeOptions(irq="msix")) as client,
    ):
        await client.realize()
        await client.reset()
        await client.doorbell(layout.OP_COPY, b"x" * 100)
        before = len(device.seen)
        await client.reset()
        after = [
            (
                m.command,
                getattr(m.body, "index", None),
                getattr(m.body, "flags", None),
                getattr(m.body, "offset", None),
            )
            for m, _ in device.seen[before : before + 5]
        ]
        assert client.interrupt == "intx" and not client.msix_fds
    assert after == [
        (Command.DEVICE_SET_IRQS, 2, 0x21, None),
        (Command.REGION_READ, None, None, 0x3D),
        (Command.DEVICE_SET_IRQS, 0, 0x24, None),
        (Command.DEVICE_SET_IRQS, 0, 0x21, None),
        (Command.REGION_READ, None, None, 0x04),
    ]


async def test_a_wrong_result_fails_the_doorbell_naming_it() -> None:
    device = FakeDevice(corrupt=True)
    with pytest.raises(RealizeError) as info:
        await run_device(device, RealizeOptions(workload=3))
    assert info.value.step == "W3 doorbell #0"
    assert str(info.value).startswith("W3 doorbell #0 COPY of 64 bytes: completion crc32")


async def test_a_device_that_never_interrupts_times_out_the_doorbell(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with pytest.raises(RealizeError) as info:
        await run_device(FakeDevice(mute=True), RealizeOptions(workload=1))
    assert str(info.value) == "W3 doorbell #0 COPY of 64 bytes: no interrupt within 5.0 s"


async def test_the_workload_needs_the_reference_device() -> None:
    server = CaptureServer(E1K)
    async with serving(server) as stream:
        with pytest.raises(
            RealizeError,
            match=r"^W0 workload: needs the reference device 1b36:1100, found 8086:10d3",
        ):
            await realize(stream, RealizeOptions(workload=1))


async def test_doorbells_check_every_op_and_report_their_round_trip() -> None:
    device = FakeDevice()
    async with serving(device) as stream, open_realize_client(stream) as client:
        await client.realize()
        results = [
            await client.doorbell(op, b"\x01\x02\x03" * 5, cookie=op + 40)
            for op in (layout.OP_COPY, layout.OP_INVERT, layout.OP_CRC32)
        ]
        assert [r.cookie for r in results] == [40, 41, 42]
        assert all(r.latency >= 0 for r in results)
        assert client.memory.read_ram(DST_GPA, 4) == struct.pack(
            "<I", zlib.crc32(b"\x01\x02\x03" * 5)
        )
        with pytest.raises(ValueError, match="unknown op"):
            await client.doorbell(9, b"x")


def test_latency_stats_use_nearest_rank_percentiles() -> None:
    from vfioproxy.peers.client import LatencyStats

    stats = LatencyStats.of([i / 1000 for i in range(100, 0, -1)])
    assert stats is not None
    assert (stats.count, stats.min, stats.p50, stats.p99, stats.max) == (
        100,
        0.001,
        0.05,
        0.099,
        0.1,
    )
    assert LatencyStats.of([]) is None


def test_workload_payloads_are_deterministic_and_vary() -> None:
    assert workload_payload(3) == workload_payload(3)
    sizes = {len(workload_payload(i)) for i in range(20)}
    assert len(sizes) == 20 and min(sizes) >= 64 and max(sizes) <= 4096


def test_realize_options_are_the_cli_knobs() -> None:
    options = RealizeOptions(dma_layout="spec")
    assert options.dma_layout is DmaLayout.SPEC
    assert attrs.fields_dict(RealizeOptions).keys() == {
        "workload",
        "irq",
        "reset",
        "ram_fd",
        "rombar",
        "reply_timeout",
        "dma_layout",
        "posted_writes",
        "rom_load",
    }
    with pytest.raises(ValueError):
        RealizeOptions(irq="msi")
    with pytest.raises(ValueError):
        RealizeOptions(reply_timeout=0)


async def test_realize_connects_to_a_socket_path_and_closes_everything(tmp_path: Path) -> None:
    import socket

    device = FakeDevice()
    path = tmp_path / "device.sock"
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(os.fspath(path))
    listener.listen(1)

    async def serve_one() -> None:
        conn, _ = await listener.accept()
        endpoint = Endpoint(FdStream(conn), Side.SERVER, handler=device.handle)
        device.endpoint = endpoint
        await endpoint.run()
        await endpoint.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_one)
        result = await realize(path, RealizeOptions(workload=3))
    listener.close()
    device.close()
    assert result.workload is not None and result.workload.doorbells == 3
    assert (result.vendor_id, result.device_id) == (layout.VENDOR_ID, layout.DEVICE_ID)
    assert result.regions[2].mmapped == ((0, layout.BAR2_MMAP_SIZE),)
    assert result.rom_size == layout.ROM_SIZE


async def test_a_socket_nobody_listens_on_fails_r0(tmp_path: Path) -> None:
    with pytest.raises(RealizeError, match=r"^R0 connect to .*nobody\.sock: "):
        await realize(tmp_path / "nobody.sock")


async def test_an_exception_in_the_client_block_propagates_unwrapped() -> None:
    server = CaptureServer(E1K)
    async with serving(server) as stream:
        with pytest.raises(KeyError):
            async with open_realize_client(stream):
                raise KeyError("mine")


async def test_cancelling_realize_closes_everything(autojump_clock: trio.testing.MockClock) -> None:
    server = CaptureServer(E1K, override(is_cmd(Command.DEVICE_RESET), silence=True))
    async with serving(server) as stream:
        with trio.move_on_after(1) as scope:
            await realize(stream)
    assert scope.cancelled_caught


def test_errors_are_vfioproxy_errors() -> None:
    error = RealizeError("R4", "region info for BAR2", "peer replied errno 22 (EINVAL)", errno=22)
    assert isinstance(error, VfioProxyError)
    assert str(error) == "R4 region info for BAR2: peer replied errno 22 (EINVAL)"


# ====================================================== end to end: the reference server


@pytest.mark.parametrize("dma_layout", [DmaLayout.QEMU, DmaLayout.SPEC])
@pytest.mark.parametrize("ram_fd", [True, False], ids=["ram-fd", "no-ram-fd"])
@pytest.mark.parametrize("irq", ["intx", "msix"])
async def test_realize_and_the_workload_pass_against_the_reference_server(
    tmp_path: Path, irq: str, ram_fd: bool, dma_layout: DmaLayout
) -> None:
    server = pytest.importorskip("vfioproxy.peers.server")
    path = tmp_path / "device.sock"
    device_options = server.DeviceOptions(client_dma_layout=dma_layout)
    options = RealizeOptions(workload=12, irq=irq, ram_fd=ram_fd, dma_layout=dma_layout)
    async with server.open_device_server(path, options=device_options):
        result = await realize(path, options)
    assert result.workload is not None and result.workload.doorbells == 12
    assert result.timings.doorbell is not None and result.timings.doorbell.count == 12
    if ram_fd:
        assert not result.dma_answers
    else:
        assert result.dma_answers["DMA_READ ok"] >= 24 and result.dma_answers["DMA_WRITE ok"] >= 24
    assert result.sent["DEVICE_SET_IRQS cmd"] == result.received["DEVICE_SET_IRQS reply"]
    assert result.unexpected_replies == 0 and result.warnings == ()


async def test_the_reference_server_is_seen_as_layout_py_describes_it(tmp_path: Path) -> None:
    server = pytest.importorskip("vfioproxy.peers.server")
    path = tmp_path / "device.sock"
    async with server.open_device_server(path):
        result = await realize(path)
    assert (result.vendor_id, result.device_id) == (layout.VENDOR_ID, layout.DEVICE_ID)
    assert [(b.index, b.kind, b.size) for b in result.bars] == [
        (0, "mem32", layout.BAR0_SIZE),
        (1, "I/O", layout.BAR1_SIZE),
        (2, "mem64", layout.BAR2_SIZE),
    ]
    assert result.regions[2].mmapped == ((0, layout.BAR2_MMAP_SIZE),)
    assert result.rom_size == layout.ROM_SIZE
    assert [(c.name, c.offset) for c in result.capabilities] == [
        ("PM", layout.CAP_PM),
        ("MSI", layout.CAP_MSI),
        ("PCIe", layout.CAP_PCIE),
        ("MSI-X", layout.CAP_MSIX),
    ]
    assert result.msix is not None and result.msix.entries == layout.MSIX_VECTORS
    assert not result.posted_writes  # BAR2 reports MMAP


async def test_a_dma_layout_mismatch_shows_as_a_device_error(tmp_path: Path) -> None:
    server = pytest.importorskip("vfioproxy.peers.server")
    path = tmp_path / "device.sock"
    # the server takes this client for QEMU (its VERSION says so) but the replies are spec
    options = RealizeOptions(workload=1, ram_fd=False, dma_layout=DmaLayout.SPEC)
    async with server.open_device_server(path):
        with pytest.raises(RealizeError, match=r"^W3 doorbell #0 .*the device reports an error"):
            await realize(path, options)
