"""``trap-dma`` live: the reference peers through a recording proxy (real sockets, real fds).

The reference client (QEMU-like: it answers DMA_READ/DMA_WRITE from guest
memory) realizes the reference device, resets it and runs a workload whose
every doorbell the device carries out by DMA (descriptor and source read,
destination and completion written) and the client checks. Trapped, every
such access is a DMA_READ/DMA_WRITE message in the trace; per window, only
the windows asked for lose their fd.
"""

from __future__ import annotations

import os
import struct
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from recorder.reader import TraceReader
from recorder.records import EventRecord, MessageRecord
from recorder.sink import TraceSink
from tests.conftest import FD_HYGIENE
from vfioproxy.interpose import InterposeOptions, IovaRange
from vfioproxy.io.fds import OwnedFd, count_open_fds
from vfioproxy.io.transport import FdStream
from vfioproxy.peers import layout
from vfioproxy.peers.client import RealizeOptions, RealizeResult, realize
from vfioproxy.peers.guest_memory import GUEST_RAM_SIZE, LOW_RAM_END, PC_ROM_IOVA
from vfioproxy.peers.server import open_device_server
from vfioproxy.protocol.bodies import IrqSetBody
from vfioproxy.protocol.header import DEFAULT_MAX_MESSAGE_SIZE, HEADER_SIZE, Command, Header
from vfioproxy.proxy import ProxyOptions, open_proxy
from vfioproxy.replay.report import ReplayReport
from vfioproxy.replay.server import ServerReplayOptions, serve_replay
from vfioproxy.side import Direction
from vfioproxy.trace.decoded import DecodedMessage, decoded_records

pytestmark = FD_HYGIENE

WORKLOAD = 9  # three of each op: COPY, INVERT, CRC32
REALIZE = RealizeOptions(workload=WORKLOAD)


async def run(tmp_path: Path, trap: tuple[IovaRange, ...] | None,
              options: RealizeOptions = REALIZE
              ) -> tuple[RealizeResult, list[Any]]:
    """Realize, reset and the workload through ``record`` with ``trap``; the
    client's result and the trace's records. The proxy's fds all closed after."""
    trace = tmp_path / "t.trace"
    before = count_open_fds()
    sink = TraceSink(trace)
    proxy_options = ProxyOptions(interpose=InterposeOptions(trap_dma=trap))
    async with open_device_server(tmp_path / "dev.sock"), \
            open_proxy(tmp_path / "p.sock", tmp_path / "dev.sock", sink=sink,
                       options=proxy_options) as proxy:
        result = await realize(tmp_path / "p.sock", options)
        with trio.fail_after(5):
            await proxy.wait_sessions()
    sink.close()
    assert count_open_fds() == before  # every fd the proxy got: forwarded or closed, once
    with TraceReader(trace) as reader:
        return result, list(reader)


def dma_maps(records: list[Any]) -> list[tuple[int, int, int]]:
    """(iova, size, fds the server got) of every DMA_MAP command, in order."""
    out = []
    for r in records:
        if isinstance(r, MessageRecord) and r.direction is Direction.C2S:
            header = Header.parse(r.data)
            if header.command == Command.DMA_MAP and header.is_command:
                _, _, _, iova, size = struct.unpack_from("<IIQQQ", r.data, HEADER_SIZE)
                out.append((iova, size, len(r.fds)))
    return out


def interposed(records: list[Any]) -> list[dict[str, Any]]:
    return [r.data for r in records if isinstance(r, EventRecord) and r.kind == "interpose"]


def dma_commands(records: list[Any]) -> Counter[str]:
    """DMA_READ/DMA_WRITE commands the server sent, and their data bytes."""
    seen: Counter[str] = Counter()
    for r in records:
        if isinstance(r, MessageRecord) and r.direction is Direction.S2C:
            header = Header.parse(r.data)
            if header.is_command and header.command in (Command.DMA_READ, Command.DMA_WRITE):
                _, count = struct.unpack_from("<QQ", r.data, HEADER_SIZE)
                seen[header.command_name] += 1
                seen[f"{header.command_name} bytes"] += count
    return seen


def device_dma_bytes(result: RealizeResult) -> int:
    """What the workload's device reads and writes of guest memory: per
    doorbell the descriptor, the source, the destination, the completion."""
    assert result.workload is not None
    out = 0
    for i in range(result.workload.doorbells):
        n = len(_payload(i))
        dst = 4 if i % 3 == 2 else n  # CRC32 writes the 4-byte sum
        out += layout.DESCRIPTOR.size + n + dst + layout.COMPLETION.size
    return out


def _payload(i: int) -> bytes:
    from vfioproxy.peers.client import workload_payload
    return workload_payload(i)


async def test_untrapped_the_workload_reaches_guest_memory_through_the_memfd(tmp_path):
    result, records = await run(tmp_path, None)
    assert result.workload is not None and result.workload.doorbells == WORKLOAD
    assert result.dma_answers == {}
    assert all(fds == 1 for iova, size, fds in dma_maps(records) if size > 0x40000)
    assert interposed(records) == []


async def test_every_device_dma_of_the_workload_arrives_as_a_message(tmp_path):
    result, records = await run(tmp_path, ())
    # the workload's results were checked by the client, doorbell by doorbell
    assert result.workload is not None and result.workload.doorbells == WORKLOAD
    maps = dma_maps(records)
    assert maps and all(fds == 0 for _, _, fds in maps)  # the server got no memory at all
    ram_maps = [(iova, size) for iova, size, _ in maps if size > 0x40000]
    assert ram_maps == [(0, GUEST_RAM_SIZE), (0, PC_ROM_IOVA),
                        (LOW_RAM_END, GUEST_RAM_SIZE - LOW_RAM_END)]
    events = interposed(records)
    assert [(e["mode"], e["note"]["iova"], e["note"]["size"]) for e in events] == [
        ("trap-dma", iova, size) for iova, size in ram_maps]
    assert all([w["k"] for w in e["withheld"]] == ["memfd"] for e in events)
    seen = dma_commands(records)
    assert result.dma_answers == {"DMA_READ ok": seen["DMA_READ"],
                                  "DMA_WRITE ok": seen["DMA_WRITE"]}
    assert seen["DMA_READ bytes"] + seen["DMA_WRITE bytes"] == device_dma_bytes(result)
    # both layouts decode: the server's commands in the spec's, the client's replies in QEMU's
    with TraceReader(tmp_path / "t.trace") as reader:
        decoded = [d for d in decoded_records(reader) if isinstance(d, DecodedMessage)]
    dma = [d for d in decoded if d.observation.message.header.command in (
        Command.DMA_READ, Command.DMA_WRITE)]
    assert len(dma) == 2 * (seen["DMA_READ"] + seen["DMA_WRITE"])
    assert all(not d.observation.violations for d in dma)
    read_replies = [d for d in dma if d.record.direction is Direction.C2S
                    and d.observation.message.header.command == Command.DMA_READ]
    assert read_replies and all("[qemu layout]" in d.text for d in read_replies)


async def test_a_window_outside_the_ranges_keeps_its_fd(tmp_path):
    # the workload lives at 0x200000: after the reset, in [0x100000, end of RAM)
    result, records = await run(tmp_path, (IovaRange.parse(f"{layout.WORKLOAD_BASE:#x}+0x1000"),))
    assert result.workload is not None and result.workload.doorbells == WORKLOAD
    maps = {(iova, size): fds for iova, size, fds in dma_maps(records) if size > 0x40000}
    assert maps == {(0, GUEST_RAM_SIZE): 0, (0, PC_ROM_IOVA): 1,
                    (LOW_RAM_END, GUEST_RAM_SIZE - LOW_RAM_END): 0}
    whole = [e["note"] for e in interposed(records)]
    assert all("trapped whole" in n["whole"] for n in whole)
    assert dma_commands(records)["DMA_READ bytes"] > 0

    # the other way round: only the low window trapped, the workload goes through memory
    (tmp_path / "low").mkdir()
    result, records = await run(tmp_path / "low", (IovaRange(0, PC_ROM_IOVA),))
    maps = {(iova, size): fds for iova, size, fds in dma_maps(records) if size > 0x40000}
    assert maps == {(0, GUEST_RAM_SIZE): 0, (0, PC_ROM_IOVA): 0,
                    (LOW_RAM_END, GUEST_RAM_SIZE - LOW_RAM_END): 1}
    assert result.dma_answers == {} and dma_commands(records) == Counter()


class IntxLine(FdStream):
    """A replayed server's stream, plus the reference device's INTx line.

    The device raises INTx through the eventfd of DEVICE_SET_IRQS, which no
    trace holds, once its completion is written: this stream keeps a
    duplicate of the client's latest INTx eventfd and signals it when the
    reply to a recorded DMA_WRITE of a completion comes back (as
    tests/interop/test_sample_client.py does for samples/server)."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        super().__init__(sock)
        self.eventfd: int | None = None
        self.completions: set[int] = set()  # msg ids of completion DMA_WRITEs sent
        self.raised = 0

    async def receive_message(self, max_size: int = DEFAULT_MAX_MESSAGE_SIZE,
                              ) -> tuple[bytes, list[OwnedFd]]:
        data, fds = await super().receive_message(max_size)
        header = Header.parse(data)
        if header.command == Command.DEVICE_SET_IRQS and header.is_command and fds:
            if IrqSetBody.parse(data[HEADER_SIZE:]).index == 0:
                self._close()
                self.eventfd = os.dup(fds[0].fileno())
        elif (header.command == Command.DMA_WRITE and header.is_reply
                and header.msg_id in self.completions and self.eventfd is not None):
            self.completions.discard(header.msg_id)
            os.eventfd_write(self.eventfd, 1)
            self.raised += 1
        return data, fds

    async def send_message(self, data: bytes | bytearray | memoryview,
                           fds: Sequence[int | OwnedFd] = ()) -> None:
        header = Header.parse(bytes(data[:HEADER_SIZE]))
        if header.command == Command.DMA_WRITE and header.is_command:
            (address,) = struct.unpack_from("<Q", data, HEADER_SIZE)
            if address == layout.WORKLOAD_BASE + layout.COMPLETION_OFFSET:
                self.completions.add(header.msg_id)
        await super().send_message(data, fds)

    def _close(self) -> None:
        if self.eventfd is not None:
            os.close(self.eventfd)
            self.eventfd = None

    async def aclose(self) -> None:
        self._close()
        await super().aclose()


async def test_a_trapped_recording_replayed_as_server_gives_the_client_what_it_got(tmp_path):
    _, records = await run(tmp_path, ())
    # the client sends its windows as the server got them, without fd
    options = RealizeOptions(workload=WORKLOAD, ram_fd=False)
    streams: list[IntxLine] = []

    def line(sock: trio.socket.SocketType) -> IntxLine:
        streams.append(IntxLine(sock))
        return streams[-1]

    report: list[ReplayReport] = []

    async def serve(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        report.append(await serve_replay(tmp_path / "t.trace", tmp_path / "replay.sock",
                                         ServerReplayOptions(), stream_factory=line,
                                         task_status=task_status))

    async with trio.open_nursery() as nursery:
        await nursery.start(serve)
        result = await realize(tmp_path / "replay.sock", options)
    assert report[0].ok, report[0].text()
    assert report[0].replayed == report[0].recorded
    assert result.workload is not None and result.workload.doorbells == WORKLOAD
    assert streams[0].raised == WORKLOAD
    seen = dma_commands(records)
    assert result.dma_answers == {"DMA_READ ok": seen["DMA_READ"],
                                  "DMA_WRITE ok": seen["DMA_WRITE"]}


@pytest.mark.parametrize("trap", [(), (IovaRange(0, 1 << 40),)], ids=["all", "range"])
async def test_a_trapped_session_records_which_windows_and_modes(tmp_path, trap):
    _, records = await run(tmp_path, trap, attrs.evolve(RealizeOptions(), reset=False))
    opened = [r for r in records if isinstance(r, EventRecord) and r.kind == "session_open"]
    assert opened[0].data["interpose"] == {"trap-dma": [str(r) for r in trap]}


# ------------------------------------------------------------------- command line, rules files

def interpose_of(*argv: str) -> InterposeOptions:
    from vfioproxy.cli import build_parser
    from vfioproxy.cli.proxy import _injector

    args = build_parser().parse_args(["record", "--listen", "p", "--server", "s", "-o", "t",
                                      *argv])
    return _injector(args)[1]


@pytest.mark.parametrize("argv, expected", [
    ((), None),
    (("--trap-dma",), ()),
    (("--trap-dma", "0x0-0x80000000", "--trap-dma", "0x100000000+0x1000"),
     (IovaRange(0, 0x80000000), IovaRange(0x100000000, 0x100001000))),
    (("--trap-dma", "0x1000+0x1000", "--trap-dma"), ()),  # one without a range: every window
    (("--trap-dma", "4096-8192", "--trap-mmap"), (IovaRange(4096, 8192),)),
])
def test_trap_dma_flag(argv, expected):
    assert interpose_of(*argv).trap_dma == expected


@pytest.mark.parametrize("table, flags, expected", [
    ("trap-dma = true", (), ()),
    ('trap-dma = ["0x0-0xc0000"]', (), (IovaRange(0, 0xc0000),)),
    ('trap-dma = ["0x0-0xc0000"]', ("--trap-dma", "0x100000+0x1000"),
     (IovaRange(0, 0xc0000), IovaRange(0x100000, 0x101000))),
    ('trap-dma = ["0x0-0xc0000"]', ("--trap-dma",), ()),
    ("trap-dma = false", (), None),
])
def test_trap_dma_in_a_rules_file(tmp_path, table, flags, expected):
    rules = tmp_path / "r.toml"
    rules.write_text(f"[interpose]\n{table}\n")
    assert interpose_of("--rules", str(rules), *flags).trap_dma == expected


@pytest.mark.parametrize("text", ["0x10-0x5", "nope", "0x0+0"])
def test_a_bad_iova_range_is_a_one_line_usage_error(capsys, text):
    from vfioproxy.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["record", "--listen", "p", "--server", "s", "-o", "t", "--trap-dma", text])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("vfioproxy record: error: argument --trap-dma: IOVA range")


async def test_a_server_leaving_a_session_with_trapped_windows_is_noted(tmp_path, caplog):
    from vfioproxy.peers.client import open_realize_client

    trace = tmp_path / "t.trace"
    sink = TraceSink(trace)
    options = ProxyOptions(interpose=InterposeOptions(trap_dma=(IovaRange(0, PC_ROM_IOVA),)))
    device = trio.CancelScope()

    async def serve(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with device:
            async with open_device_server(tmp_path / "dev.sock"):
                task_status.started()
                await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        await nursery.start(serve)
        async with open_proxy(tmp_path / "p.sock", tmp_path / "dev.sock", sink=sink,
                              options=options) as proxy, \
                open_realize_client(tmp_path / "p.sock", RealizeOptions()) as client:
            await client.realize()
            device.cancel()  # the server goes away, the client stays
            with trio.fail_after(5):
                await proxy.wait_sessions()
    sink.close()
    with TraceReader(trace) as reader:
        events = [r for r in reader if isinstance(r, EventRecord)]
    (note,) = [e for e in events if e.kind == "note"]
    assert note.data["mode"] == "trap-dma"
    assert note.data["text"].startswith(
        "the server closed the session with 1 trapped DMA window(s) mapped ([0x0, 0x20000000))")
    assert events[-1].kind == "session_close" and events[-1].data["closed_by"] == "server"
    assert "trap-dma: the server closed the session" in caplog.text
