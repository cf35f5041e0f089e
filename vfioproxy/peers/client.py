"""A QEMU-like vfio-user client: realize, the machine reset, and a driver workload.

:class:`RealizeClient` sends what QEMU 10.2's ``vfio-user-pci`` sends, in
QEMU's order and with QEMU's message shapes (design/realize-steps.md): the
realize steps R1–R14, the machine reset S1–S7, then, optionally, a workload
that programs the reference device (:mod:`vfioproxy.peers.layout`) as a
driver would. Every method that waits honours ``RealizeOptions.reply_timeout``
(QEMU's ``x-msg-timeout``) and fails with :class:`RealizeError`, which names
the step, instead of hanging.

The client knows the step it is in: every command it sends is noted with
its step (``R1``..``R14``, ``S1``..``S7``, a later reset as ``guest-reset``,
and after it the running categories ``rom-load``, ``guest-config``,
``msix-enable``, ``bar-mmio``, ``bar-mmio-posted``, ``pba-read`` and
``intx-eoi``; :mod:`vfioproxy.protocol.steps`), and the reply takes its
command's step: :attr:`RealizeResult.steps`. Clients given one
:class:`~vfioproxy.peers.endpoint.MessageIds` number their commands from one
counter, as QEMU does for every device of a process.

While it runs, the client answers the server's DMA_READ/DMA_WRITE from its
guest memory (:mod:`vfioproxy.peers.guest_memory`). Those commands are read
in the spec layout, the one libvfio-user and the reference server send; real
QEMU 10.2 reads them in its own layout and so misreads a spec DMA_WRITE
(protocol.md §2.12), while this client reads it as the server sent it.

Library use::

    result = await realize("/run/dev.sock", RealizeOptions(workload=100))
    print(result.summary())

or step by step::

    async with open_realize_client(path) as client:
        await client.realize()
        await client.reset()
        await client.doorbell(OP_COPY, b"data")
"""

from __future__ import annotations

import errno as errno_module
import json
import math
import mmap
import os
import random
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import Any, Literal, TypeVar

import attrs
import trio

from vfioproxy.errors import ConnectionClosedError, TransportError, VfioProxyError, os_reason
from vfioproxy.io.fds import OwnedFd, close_all, make_eventfd
from vfioproxy.io.transport import FdStream, open_unix_fd_stream
from vfioproxy.peers import layout
from vfioproxy.peers.endpoint import (
    DEFAULT_REPLY_TIMEOUT,
    Endpoint,
    ErrorReplyError,
    MessageIds,
    PendingReply,
    ReplyTimeoutError,
)
from vfioproxy.peers.guest_memory import (
    DmaWindow,
    GuestMemory,
    realize_windows,
    reset_windows,
)
from vfioproxy.protocol.bodies import (
    Body,
    BodyContext,
    DeviceInfoBody,
    DmaLayout,
    DmaMapBody,
    DmaUnmapBody,
    IrqInfoBody,
    IrqSetBody,
    RegionAccessBody,
    RegionInfoBody,
    SparseMmapCap,
    VersionBody,
)
from vfioproxy.protocol.codec import Dialects, Message
from vfioproxy.protocol.constants import (
    DeviceFlags,
    IrqIndex,
    IrqInfoFlags,
    IrqSetFlags,
    RegionFlags,
    flag_names,
)
from vfioproxy.protocol.header import (
    DEFAULT_MAX_MESSAGE_SIZE,
    HEADER_SIZE,
    Command,
    command_name,
)
from vfioproxy.protocol.offsets import VERSION_NUMBERS
from vfioproxy.protocol.pci import (
    COMMAND_REGISTER,
    INTERRUPT_PIN,
    ROM_ADDRESS_MASK,
    ROM_BAR,
    Capability,
    CapId,
    Region,
    bar_offset,
    find_capability,
    format_size,
    msix_location,
    msix_pba_size,
    msix_vectors,
    region_name,
    walk_capabilities,
)
from vfioproxy.protocol.steps import REALIZE_STEPS, RESET_STEPS, STEP_ORDER, UNLABELLED
from vfioproxy.side import Side

__all__ = [
    "QEMU_VERSION_JSON",
    "BarFacts",
    "CapabilityFacts",
    "DoorbellResult",
    "LatencyStats",
    "MsixFacts",
    "RealizeClient",
    "RealizeError",
    "RealizeOptions",
    "RealizeResult",
    "RegionFacts",
    "StepMessage",
    "Timings",
    "WorkloadFacts",
    "expected_output",
    "open_realize_client",
    "realize",
    "workload_payload",
]

IrqMode = Literal["intx", "msix"]

# --------------------------------------------------------------------- QEMU's constants

#: QEMU 10.2.2's VERSION JSON, byte for byte (its hash-table key order)
QEMU_VERSION_JSON = (
    b'{"capabilities": {"pgsizes": 4096, "max_msg_fds": 16, "max_dma_maps": 65535, '
    b'"max_data_xfer_size": 1048576, "migration": {"max_bitmap_size": 268435456, '
    b'"pgsize": 4096}, "write_multiple": true}}'
)
#: QEMU's VERSION message is 214 bytes; a longer reply does not fit its buffer
VERSION_MESSAGE_SIZE = HEADER_SIZE + 4 + len(QEMU_VERSION_JSON) + 1
#: how many fds one receive takes (QEMU's ancillary buffer)
QEMU_RECV_FDS = 16
#: VFIO_USER_DEF_* and VFIO_USER_MAX_* of hw/vfio-user/proxy.h
DEFAULT_MAX_MSG_FDS = 8
MAX_MAX_MSG_FDS = 16
DEFAULT_MAX_XFER = 1024 * 1024
MAX_MAX_XFER = 64 * 1024 * 1024
DEFAULT_PGSIZE = 4096
MAX_DMA_MAPS = 65535
MAX_BITMAP_SIZE = 256 * 1024 * 1024
MAX_REGIONS = 100
MAX_IRQS = 50
#: region-info asks before giving up on a server whose argsz keeps growing
MAX_REGION_INFO_ASKS = 4

_BAR_COUNT = 6
_CONFIG = 7
_COMMAND_QUIESCE = 0x0407  # I/O, memory, bus master, INTx disable
_COMMAND_DRIVER = 0x0006  # memory + bus master
_MSIX_ENABLE = 0x8000
_MSIX_MASKALL = 0x4000
_PM_STATE_MASK = 0x3
#: QEMU's MSI-X PBA quirks: (vendor, device mask, device) -> forced PBA offset
_PBA_QUIRKS = ((0x1425, 0xFF00, 0x5800, 0x1000), (0x1D22, 0xFFFF, 0x3685, 0xB400))

_EVENTFD_TRIGGER = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER
_NONE_TRIGGER = IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER
_NONE_UNMASK = IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_UNMASK

# --------------------------------------------------------------------- workload layout

_DESC_GPA = layout.WORKLOAD_BASE
_SRC_GPA = layout.WORKLOAD_BASE + 0x1000
_DST_GPA = _SRC_GPA + layout.MAX_TRANSFER
_WORKLOAD_OPS = (layout.OP_COPY, layout.OP_INVERT, layout.OP_CRC32)
_OP_NAMES = {layout.OP_COPY: "COPY", layout.OP_INVERT: "INVERT", layout.OP_CRC32: "CRC32"}


# --------------------------------------------------------------------- options and errors


@attrs.frozen
class RealizeOptions:
    """The knobs of a realize run (the ``vfioproxy realize`` options).

    ``workload``: doorbells to ring after realize (and reset); ``irq``: the
    workload's interrupt, ``"intx"`` or ``"msix"``; ``reset``: run the machine
    reset S1–S7 after realize, as QEMU always does; ``ram_fd``: pass guest RAM's
    memfd with its DMA_MAPs (False: no fd, like a non-shared backend, so the
    device must use DMA_READ/DMA_WRITE); ``rombar``: run the ROM probe R8
    (QEMU's ``rombar``); ``reply_timeout``: seconds to wait for each reply
    (QEMU's ``x-msg-timeout``); ``dma_layout``: the layout of this client's
    DMA_READ/DMA_WRITE replies; ``posted_writes``: post memory-BAR writes
    when QEMU would (False: QEMU's ``x-no-posted-writes=on``); ``rom_load``:
    after the reset, load the ROM as the guest's BIOS makes QEMU do
    (:meth:`RealizeClient.load_rom`; nothing without a ROM BAR).
    """

    workload: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    irq: IrqMode = attrs.field(default="intx", validator=attrs.validators.in_(("intx", "msix")))
    reset: bool = True
    ram_fd: bool = True
    rombar: bool = True
    reply_timeout: float = attrs.field(
        default=DEFAULT_REPLY_TIMEOUT, validator=attrs.validators.gt(0)
    )
    dma_layout: DmaLayout = attrs.field(default=DmaLayout.QEMU, converter=DmaLayout)
    posted_writes: bool = True
    rom_load: bool = False


class RealizeError(VfioProxyError):
    """A step failed; ``step`` is its label (``R4``, ``S7``, ``W3 doorbell #2``…).

    ``errno`` is the error the peer replied (or QEMU's local one), when there
    is one. The text reads ``"R4 region info for BAR2: peer replied errno 22
    (EINVAL)"``.
    """

    def __init__(self, step: str, what: str, problem: str, *, errno: int | None = None) -> None:
        super().__init__(f"{step} {what}: {problem}")
        self.step = step
        self.what = what
        self.problem = problem
        self.errno = errno


class _Problem(Exception):
    """A reply QEMU would refuse, or a request it would refuse to send."""

    def __init__(self, msg: str, errno: int | None = None) -> None:
        super().__init__(msg)
        self.errno = errno


def _errno_text(err: int) -> str:
    name = errno_module.errorcode.get(err)
    return f"errno {err} ({name})" if name else f"errno {err}"


# --------------------------------------------------------------------- result


@attrs.frozen
class RegionFacts:
    """A region as GET_REGION_INFO described it (R4/R5).

    ``asks``: how many GET_REGION_INFO it took; ``fd``: whether the kept reply
    carried an fd; ``mmapped``: the sparse areas mapped (offset, size).
    """

    index: int
    size: int
    flags: int
    offset: int
    argsz: int
    asks: int
    sparse_areas: tuple[tuple[int, int], ...]
    fd: bool
    mmapped: tuple[tuple[int, int], ...]

    @property
    def name(self) -> str:
        return region_name(self.index)


@attrs.frozen
class BarFacts:
    """A BAR with a non-zero region, typed by its R9 read."""

    index: int
    size: int
    value: int
    kind: str
    prefetchable: bool


@attrs.frozen
class CapabilityFacts:
    name: str
    cap_id: int
    offset: int
    extended: bool


@attrs.frozen
class MsixFacts:
    """What R10 read: table size, table and PBA locations, the II(2) answer."""

    offset: int
    control: int
    entries: int
    table_bar: int
    table_offset: int
    pba_bar: int
    pba_offset: int
    irq_count: int
    irq_flags: int

    @property
    def noresize(self) -> bool:
        return bool(self.irq_flags & IrqInfoFlags.NORESIZE)


@attrs.frozen
class LatencyStats:
    """Doorbell round trips (doorbell write to completion seen), in seconds."""

    count: int
    min: float
    p50: float
    p99: float
    max: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> LatencyStats | None:
        if not samples:
            return None
        ordered = sorted(samples)

        def rank(p: float) -> float:
            return ordered[max(0, math.ceil(p * len(ordered)) - 1)]

        return cls(len(ordered), ordered[0], rank(0.5), rank(0.99), ordered[-1])


@attrs.frozen
class Timings:
    """Seconds spent in each phase (None: not run)."""

    realize: float | None = None
    reset: float | None = None
    workload: float | None = None
    doorbell: LatencyStats | None = None


@attrs.frozen
class WorkloadFacts:
    doorbells: int
    irq: str
    bytes: int


@attrs.frozen
class DoorbellResult:
    """One checked descriptor: its op, length, cookie and round trip."""

    op: int
    length: int
    cookie: int
    latency: float


@attrs.frozen
class StepMessage:
    """One command the client sent and the step it sent it in (the reply, if
    any, belongs to the same step); inside a ``guest-reset``, ``substep`` is the
    reset step it repeats (``S4``); ``posted``: sent without asking for a reply."""

    msg_id: int
    command: int
    step: str
    substep: str = ""
    posted: bool = False

    def text(self) -> str:
        """``#12 REGION_READ R7``, ``#90 DEVICE_RESET guest-reset S4``."""
        step = f"{self.step} {self.substep}" if self.substep else self.step
        return f"#{self.msg_id} {command_name(self.command)}{' posted' if self.posted else ''} " \
            f"{step}"


@attrs.frozen
class RealizeResult:
    """The device as the client saw it, how long each phase took, what went over
    the wire; ``steps``: every command sent, in order, with its step."""

    version: tuple[int, int] | None
    server_capabilities: dict[str, Any]
    max_msg_fds: int
    max_data_xfer_size: int
    device_flags: int
    num_regions: int
    num_irqs: int
    vendor_id: int
    device_id: int
    revision: int
    class_code: int
    regions: tuple[RegionFacts, ...]
    bars: tuple[BarFacts, ...]
    rom_size: int | None
    rom_loaded: int | None
    capabilities: tuple[CapabilityFacts, ...]
    msix: MsixFacts | None
    msi_control: int | None
    interrupt_pin: int
    err_irq_count: int | None
    posted_writes: bool
    interrupt: str
    timings: Timings
    workload: WorkloadFacts | None
    dma_answers: dict[str, int]
    sent: dict[str, int]
    received: dict[str, int]
    unexpected_replies: int
    warnings: tuple[str, ...]
    steps: tuple[StepMessage, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return attrs.asdict(self)

    def summary(self) -> str:
        """Several lines of text for the CLI."""
        lines = [
            f"device {self.vendor_id:04x}:{self.device_id:04x} rev {self.revision:#04x} "
            f"class {self.class_code:06x}; protocol "
            + ("?" if self.version is None else f"{self.version[0]}.{self.version[1]}"),
            f"server: max_msg_fds {self.max_msg_fds}, max_data_xfer_size "
            f"{self.max_data_xfer_size}, capabilities {json.dumps(self.server_capabilities)}",
            f"info: {flag_names(DeviceFlags, self.device_flags)}, {self.num_regions} regions, "
            f"{self.num_irqs} IRQ types",
        ]
        bars = {bar.index: bar for bar in self.bars}
        for region in self.regions:
            if not region.size and region.index != _CONFIG:
                continue
            text = (
                f"  {region.name:<7} size {region.size:#x} {flag_names(RegionFlags, region.flags)}"
            )
            bar = bars.get(region.index)
            if bar is not None:
                text += f" {bar.kind}" + (" prefetchable" if bar.prefetchable else "")
            if region.sparse_areas:
                areas = ", ".join(f"[{o:#x}+{s:#x}]" for o, s in region.sparse_areas)
                text += f" sparse {areas} ({len(region.mmapped)} mmapped)"
            lines.append(text)
        if self.rom_size is not None:
            loaded = "" if self.rom_loaded is None else f", loaded {self.rom_loaded} bytes"
            lines.append(f"ROM: {format_size(self.rom_size) if self.rom_size else 'none'}{loaded}")
        caps = " ".join(f"{c.name}@{c.offset:#x}" for c in self.capabilities) or "none"
        lines.append(f"capabilities: {caps}")
        if self.msix is not None:
            m = self.msix
            lines.append(
                f"MSI-X: {m.entries} entries, table BAR{m.table_bar}+{m.table_offset:#x}, "
                f"PBA BAR{m.pba_bar}+{m.pba_offset:#x}, {m.irq_count} vectors, "
                f"{'NORESIZE' if m.noresize else 'resizable'}"
            )
        pin = "none" if not self.interrupt_pin else f"INT{'ABCD'[(self.interrupt_pin - 1) % 4]}#"
        lines.append(
            f"interrupts: pin {pin}, ERR count {self.err_irq_count}, active {self.interrupt}; "
            f"posted writes {'on' if self.posted_writes else 'off'}"
        )
        t = self.timings
        phases = [
            f"{name} {_ms(value)}"
            for name, value in (
                ("realize", t.realize),
                ("reset", t.reset),
                ("workload", t.workload),
            )
            if value is not None
        ]
        lines.append("timings: " + (", ".join(phases) or "-"))
        if t.doorbell is not None:
            d = t.doorbell
            lines.append(
                f"doorbells: {d.count}, round trip min {_ms(d.min)} p50 {_ms(d.p50)} "
                f"p99 {_ms(d.p99)} max {_ms(d.max)}"
            )
        if self.dma_answers:
            lines.append("DMA answered: " + _counts(self.dma_answers))
        lines.append("sent: " + _counts(self.sent))
        lines.append("steps: " + self.step_counts())
        lines.append("received: " + _counts(self.received))
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)


    def step_counts(self) -> str:
        """Commands per step, in step order: ``R1 1, R2 2, ..., intx-eoi 8``."""
        counts = Counter(m.step for m in self.steps)
        return ", ".join(f"{step} {counts[step]}" for step in STEP_ORDER if counts[step]) or "-"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f} ms"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{key} {n}" for key, n in sorted(counts.items())) or "-"


# --------------------------------------------------------------------- helpers


def _u16(data: bytes) -> int:
    return int.from_bytes(data[:2], "little")


def _u32(data: bytes) -> int:
    return int.from_bytes(data[:4], "little")


def _le(value: int, size: int) -> bytes:
    return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


def workload_payload(iteration: int) -> bytes:
    """The source bytes of workload doorbell ``iteration``: 64 B to 4 KiB, deterministic."""
    length = 64 + (iteration * 1031) % 4033
    return random.Random(iteration).randbytes(length)


def expected_output(op: int, src: bytes) -> bytes:
    """What the device must write to the destination for ``op`` (layout.py)."""
    if op == layout.OP_COPY:
        return src
    if op == layout.OP_INVERT:
        return bytes(b ^ 0xFF for b in src)
    if op == layout.OP_CRC32:
        return _le(zlib.crc32(src), 4)
    raise ValueError(f"unknown op {op}")


T = TypeVar("T")


class _WatchedStream:
    """The client's FdStream as its endpoint sees it: a failed receive is
    reported (before the endpoint fails the waiting commands)."""

    def __init__(self, stream: FdStream, on_failure: Callable[[TransportError], None]) -> None:
        self._stream = stream
        self._on_failure = on_failure

    async def send_message(self, data: bytes, fds: Sequence[Any] = ()) -> None:
        await self._stream.send_message(data, fds)

    async def receive_message(self, max_size: int) -> tuple[bytes, list[OwnedFd]]:
        try:
            return await self._stream.receive_message(max_size)
        except ConnectionClosedError:
            raise
        except TransportError as exc:
            self._on_failure(exc)
            raise

    async def aclose(self) -> None:
        await self._stream.aclose()


@attrs.define
class _Region:
    """One region's kept GET_REGION_INFO answer, its fd and the sparse areas mapped."""

    info: RegionInfoBody
    asks: int
    fd: OwnedFd | None
    mmaps: list[tuple[int, int, mmap.mmap]] = attrs.field(factory=list)

    @property
    def sparse_areas(self) -> tuple[tuple[int, int], ...]:
        for cap in self.info.caps:
            if isinstance(cap, SparseMmapCap):
                return tuple((a.offset, a.size) for a in cap.areas)
        return ()

    def close(self) -> None:
        for _, _, mapping in self.mmaps:
            mapping.close()
        self.mmaps.clear()
        if self.fd is not None:
            self.fd.close()


# --------------------------------------------------------------------- the client


class RealizeClient:
    """One vfio-user connection driven the way QEMU drives it.

    Make one with :func:`open_realize_client`, which runs its receiving task
    and closes everything on exit; ``ids``, when given, numbers its commands
    (shared with other clients). Methods must be called from one task at a
    time. Each waiting method gives up after ``options.reply_timeout`` per
    reply and raises :class:`RealizeError`; on cancellation a waiting command
    is forgotten and its late reply dropped.
    """

    def __init__(
        self, stream: FdStream, options: RealizeOptions, *, ids: MessageIds | None = None
    ) -> None:
        self.options = options
        self.stream = stream
        self.memory = GuestMemory()
        self.endpoint = Endpoint(
            _WatchedStream(stream, self._receive_failed),
            Side.CLIENT,
            handler=self._handle_server_command,
            dialects=Dialects(client=options.dma_layout, server=DmaLayout.SPEC),
            reply_timeout=options.reply_timeout,
            ids=ids,
        )
        self._closed = False
        #: the step of the commands sent now, and every command sent with its step
        self._label = (UNLABELLED, "")
        self.steps: list[StepMessage] = []
        self.resets = 0
        self._fatal: str | None = None
        self._outstanding: list[PendingReply] = []
        self.warnings: list[str] = []
        self.dma_answers: Counter[str] = Counter()
        # R1
        self.version: tuple[int, int] | None = None
        self.server_capabilities: dict[str, Any] = {}
        self.max_msg_fds = DEFAULT_MAX_MSG_FDS
        self.max_xfer = DEFAULT_MAX_XFER
        # R3–R14
        self.device_info = DeviceInfoBody()
        self.regions: dict[int, _Region] = {}
        self.no_post = not options.posted_writes
        self.config = b""
        self.capabilities: tuple[Capability, ...] = ()
        self.rom_size: int | None = None
        self.rom: bytes | None = None
        self.bar_values: dict[int, int] = {}
        self.msix: MsixFacts | None = None
        self.msi_control: int | None = None
        self.pin = 0
        self.err_irq_count: int | None = None
        self.err_fd: OwnedFd | None = None
        # interrupts
        self.interrupt: Literal["none", "intx", "msix"] = "none"
        self.intx_fd: OwnedFd | None = None
        self.intx_pending = False
        self.msix_fds: list[OwnedFd] = []
        # workload
        self.driver_ready = False
        self.timings = Timings()
        self.latencies: list[float] = []
        self.doorbells = 0
        self.workload_bytes = 0

    # ================================================================= realize

    async def realize(self) -> None:
        """R1–R14: QEMU's ``vfio_user_pci_realize``, message for message."""
        start = trio.current_time()
        await self._r1_version()
        await self._r2_dma_map()
        await self._r3_device_info()
        await self._r4_bar_regions()
        await self._r5_config_region()
        await self._r6_err_irq_info()
        await self._r7_config_copy()
        await self._r8_rom_probe()
        await self._r9_bar_types()
        await self._r10_msix_early_setup()
        self._register_bars()
        await self._r11_msi_setup()
        await self._r12_r13_intx()
        await self._r14_err_notifier()
        self.timings = attrs.evolve(self.timings, realize=trio.current_time() - start)

    async def _r1_version(self) -> None:
        """R1: VERSION 0.0 with QEMU's capabilities, the reply checked as
        ``vfio_user_validate_version`` checks it."""
        with self._step("R1", "version"):
            reply = await self._request(
                Command.VERSION, VersionBody(0, 0, QEMU_VERSION_JSON), rsize=VERSION_MESSAGE_SIZE
            )
            payload = reply.body.serialize()
            if len(payload) < 5:
                raise _Problem(f"corrupt version reply: {len(payload)}-byte payload")
            major, minor = VERSION_NUMBERS.unpack_from(payload)
            if major != 0 or minor > 0:
                raise _Problem(f"incompatible server version {major}.{minor} (QEMU speaks 0.0)")
            if payload[-1] != 0:
                raise _Problem("corrupt version reply: its last byte is not NUL")
            text = payload[4:]
            self._check_capabilities(text[: text.index(0)])
            self.version = (major, minor)
        self.endpoint.max_message_size = max(DEFAULT_MAX_MESSAGE_SIZE, self.max_xfer + 32)

    def _check_capabilities(self, text: bytes) -> None:
        """QEMU's ``caps_check``: a JSON object; known capabilities within QEMU's limits."""
        try:
            doc = json.loads(text.decode("utf-8"))
        except (ValueError, RecursionError):
            raise _Problem(f"malformed capabilities {text[:80]!r}") from None
        if not isinstance(doc, dict):
            raise _Problem(f"capabilities {text[:80]!r} not an object")
        if "capabilities" not in doc:
            return
        caps = doc["capabilities"]
        if not isinstance(caps, dict):
            raise _Problem("capabilities not an object")
        rest = dict(caps)
        max_fds = _cap_uint(rest, "max_msg_fds", MAX_MAX_MSG_FDS)
        max_xfer = _cap_uint(rest, "max_data_xfer_size", MAX_MAX_XFER)
        pgsizes = _cap_uint(rest, "pgsizes")
        if pgsizes is not None and pgsizes & (DEFAULT_PGSIZE - 1):
            raise _Problem(f"pgsize {pgsizes:#x} too small")
        _cap_uint(rest, "max_dma_maps", MAX_DMA_MAPS)
        if "migration" in rest:
            migration = rest.pop("migration")
            if not isinstance(migration, dict):
                raise _Problem("malformed migration")
            migration = dict(migration)
            pgsize = _cap_uint(migration, "pgsize")
            if pgsize is not None and pgsize & (DEFAULT_PGSIZE - 1):
                raise _Problem(f"migration pgsize {pgsize:#x} too small")
            _cap_uint(migration, "max_bitmap_size", MAX_BITMAP_SIZE)
            if migration:
                self.warnings.append(f"R1 spurious migration capabilities {sorted(migration)}")
        if "write_multiple" in rest and not isinstance(rest.pop("write_multiple"), bool):
            raise _Problem("malformed write_multiple")
        if rest:
            self.warnings.append(f"R1 spurious capabilities {sorted(rest)}")
        self.server_capabilities = caps
        self.max_msg_fds = DEFAULT_MAX_MSG_FDS if max_fds is None else max_fds
        self.max_xfer = DEFAULT_MAX_XFER if max_xfer is None else max_xfer

    async def _r2_dma_map(self) -> None:
        """R2: the DMA listener's first burst: guest RAM (with its memfd unless
        ``ram_fd`` is off), then the BIOS ROM without fd."""
        with self._step("R2", "DMA_MAP burst"):
            await self._relayout(realize_windows(ram_fd=self.options.ram_fd))

    async def _r3_device_info(self) -> None:
        """R3: GET_INFO, checked as ``vfio_user_device_get`` and vfio-pci check it."""
        with self._step("R3", "device info"):
            reply = await self._request(Command.DEVICE_GET_INFO, DeviceInfoBody(16), rsize=32)
            info = _decode(DeviceInfoBody.parse, reply)
            if info.num_regions > MAX_REGIONS:
                raise _Problem(f"too many regions: {info.num_regions} > {MAX_REGIONS}")
            if info.num_irqs > MAX_IRQS:
                raise _Problem(f"too many IRQ types: {info.num_irqs} > {MAX_IRQS}")
            if not info.flags & DeviceFlags.PCI:
                raise _Problem(f"this isn't a PCI device (flags {info.flags:#x})")
            if info.num_regions < _CONFIG + 1:
                raise _Problem(f"unexpected number of io regions {info.num_regions}")
            if info.num_irqs < IrqIndex.MSIX + 1:
                raise _Problem(f"unexpected number of irqs {info.num_irqs}")
            self.device_info = info

    async def _r4_bar_regions(self) -> None:
        """R4: GET_REGION_INFO for BAR0…BAR5 (``vfio_pci_populate_device``)."""
        for index in range(_BAR_COUNT):
            with self._step("R4", f"region info for BAR{index}"):
                self.regions[index] = await self._region_info(index)

    async def _r5_config_region(self) -> None:
        """R5: GET_REGION_INFO for the config region (7)."""
        with self._step("R5", "region info for config space"):
            self.regions[_CONFIG] = await self._region_info(_CONFIG)

    async def _region_info(self, index: int) -> _Region:
        """RI(index, 32), then RI(index, argsz) while the reply asks for more.

        Keeps the fd of the last reply (closing any earlier one), at most one
        per reply; any reply with MMAP turns posted writes off.
        """
        argsz = RegionInfoBody.FIXED.size
        for asks in range(1, MAX_REGION_INFO_ASKS + 1):
            reply = await self._request(
                Command.DEVICE_GET_REGION_INFO,
                RegionInfoBody(argsz, 0, index),
                rsize=HEADER_SIZE + argsz,
                max_fds=1,
            )
            fd = reply.fds[0] if reply.fds else None
            try:
                info = _decode(RegionInfoBody.parse, reply)
            except BaseException:
                close_all(reply.fds)
                raise
            if info.flags & RegionFlags.MMAP:
                self.no_post = True
            if info.argsz <= argsz:
                return _Region(info, asks, fd)
            close_all(reply.fds)
            argsz = info.argsz
        raise _Problem(f"reply argsz keeps growing ({argsz} after {MAX_REGION_INFO_ASKS} asks)")

    async def _r6_err_irq_info(self) -> None:
        """R6: II(3). As in QEMU a failed answer is not fatal: there is no ERR notifier then."""
        with self._step("R6", "ERR IRQ info"):
            try:
                reply = await self._request(
                    Command.DEVICE_GET_IRQ_INFO, IrqInfoBody(16, 0, IrqIndex.ERR), rsize=32
                )
                self.err_irq_count = _decode(IrqInfoBody.parse, reply).count
            except (ErrorReplyError, ReplyTimeoutError, _Problem) as exc:
                self.warnings.append(f"R6 ERR IRQ info failed ({exc}): no ERR notifier, as in QEMU")
                return
        if self.err_irq_count != 1:
            self.warnings.append(
                f"R6 ERR IRQ count {self.err_irq_count}: could not enable error recovery"
            )

    async def _r7_config_copy(self) -> None:
        """R7: one REGION_READ of config space from 0 (realize-steps §1.3 count)."""
        size = self.regions[_CONFIG].info.size
        config_size = 256 if size == 256 else 4096
        count = min(config_size, size)
        with self._step("R7", f"config space copy ({count} bytes)"):
            data = await self._region_read(_CONFIG, 0, count)
        self.config = data + bytes(config_size - count)
        self.capabilities = walk_capabilities(self.config)

    async def _r8_rom_probe(self) -> None:
        """R8: ``vfio_pci_size_rom``: read 0x30, write 0xfffff800, read, restore."""
        if not self.options.rombar:
            return
        with self._step("R8", "ROM BAR size probe"):
            original = await self._region_read(_CONFIG, ROM_BAR, 4)
            await self._config_write(ROM_BAR, _le(ROM_ADDRESS_MASK, 4))
            mask = _u32(await self._region_read(_CONFIG, ROM_BAR, 4))
            await self._config_write(ROM_BAR, original)
        self.rom_size = (~(mask & ROM_ADDRESS_MASK) + 1) & 0xFFFFFFFF

    async def _r9_bar_types(self) -> None:
        """R9: ``vfio_bar_prepare``: read each BAR register whose region size is not 0."""
        for index in range(_BAR_COUNT):
            if self.regions[index].info.size:
                with self._step("R9", f"BAR{index} type"):
                    value = _u32(await self._region_read(_CONFIG, bar_offset(index), 4))
                self.bar_values[index] = value

    async def _r10_msix_early_setup(self) -> None:
        """R10: ``vfio_msix_early_setup`` with an MSI-X capability in the copy.

        Reads control, table and PBA registers and II(2); fails, as QEMU does,
        when the PBA lies outside its BAR (after QEMU's two vendor quirks).
        """
        cap = find_capability(self.capabilities, CapId.MSIX)
        if cap is None:
            return
        p = cap.offset
        with self._step("R10", f"MSI-X early setup (capability at {p:#x})"):
            control = _u16(await self._region_read(_CONFIG, p + 2, 2))
            table = _u32(await self._region_read(_CONFIG, p + 4, 4))
            pba = _u32(await self._region_read(_CONFIG, p + 8, 4))
            reply = await self._request(
                Command.DEVICE_GET_IRQ_INFO, IrqInfoBody(16, 0, IrqIndex.MSIX), rsize=32
            )
            info = _decode(IrqInfoBody.parse, reply)
            table_bar, table_offset = msix_location(table)
            pba_bar, pba_offset = msix_location(pba)
            for what, bir in (("table", table_bar), ("PBA", pba_bar)):
                if bir >= _BAR_COUNT:
                    raise _Problem(f"MSI-X {what} BIR {bir} is not a BAR")
            if pba_offset >= self.regions[pba_bar].info.size:
                pba_offset = self._pba_quirk(pba_offset)
            self.msix = MsixFacts(
                p,
                control,
                msix_vectors(control),
                table_bar,
                table_offset,
                pba_bar,
                pba_offset,
                info.count,
                info.flags,
            )

    def _pba_quirk(self, pba_offset: int) -> int:
        vendor, device = _u16(self.config[0:2]), _u16(self.config[2:4])
        for quirk_vendor, mask, quirk_device, forced in _PBA_QUIRKS:
            if vendor == quirk_vendor and device & mask == quirk_device:
                return forced
        raise _Problem(
            f"hardware reports invalid configuration, MSIX PBA outside of specified BAR "
            f"(offset {pba_offset:#x})"
        )

    def _register_bars(self) -> None:
        """``vfio_bars_register``: mmap each sparse area of each MMAP BAR at
        region offset + area offset (no message; a failed mmap is only a warning)."""
        for index in range(_BAR_COUNT):
            region = self.regions[index]
            info = region.info
            if not info.size or not info.flags & RegionFlags.MMAP:
                continue
            areas = [a for a in region.sparse_areas if a[1]] or [(0, info.size)]
            prot = (mmap.PROT_READ if info.flags & RegionFlags.READ else 0) | (
                mmap.PROT_WRITE if info.flags & RegionFlags.WRITE else 0
            )
            try:
                if region.fd is None:
                    raise OSError(errno_module.EBADF, "the region came without an fd")
                for offset, size in areas:
                    mapping = mmap.mmap(
                        region.fd.fileno(),
                        size,
                        mmap.MAP_SHARED,
                        prot,
                        offset=info.offset + offset,
                    )
                    region.mmaps.append((offset, size, mapping))
            except (OSError, ValueError, OverflowError) as exc:
                for _, _, mapping in region.mmaps:
                    mapping.close()
                region.mmaps.clear()
                self.warnings.append(f"failed to mmap BAR{index} ({exc}); performance may be slow")

    async def _r11_msi_setup(self) -> None:
        """R11: ``vfio_msi_setup`` reads the MSI flags of an MSI capability."""
        cap = find_capability(self.capabilities, CapId.MSI)
        if cap is None:
            return
        with self._step("R11", f"MSI flags (capability at {cap.offset:#x})"):
            self.msi_control = _u16(await self._region_read(_CONFIG, cap.offset + 2, 2))

    async def _r12_r13_intx(self) -> None:
        """R12: the interrupt pin; R13: INTx on if it is not 0."""
        with self._step("R12", "interrupt pin"):
            self.pin = (await self._region_read(_CONFIG, INTERRUPT_PIN, 1))[0]
        if self.pin:
            await self._intx_enable("R13")

    async def _r14_err_notifier(self) -> None:
        """R14: the ERR eventfd, when R6 reported exactly one ERR interrupt."""
        if self.err_irq_count != 1:
            return
        with self._step("R14", "ERR notifier"):
            fd = make_eventfd()
            try:
                await self._set_irq_eventfds(IrqIndex.ERR, 0, [fd])
            except BaseException:
                fd.close()
                raise
            self.err_fd = fd

    # ================================================================= reset

    async def reset(self) -> None:
        """S1–S7: QEMU's ``vfio_user_pci_reset`` and q35's memory re-layout.

        The first reset is the machine reset after realize (steps S1–S7); a
        later one is the guest's, labelled ``guest-reset`` (errors still name
        the S step).
        """
        start = trio.current_time()
        self.resets += 1
        await self._s1_disable_interrupts()
        await self._s2_quiesce()
        await self._s3_force_d0()
        await self._s4_device_reset()
        await self._intx_enable("S5")
        await self._s6_clear_bars()
        await self._s7_relayout()
        self.driver_ready = False
        self.timings = attrs.evolve(self.timings, reset=trio.current_time() - start)

    async def _s1_disable_interrupts(self) -> None:
        """S1: ``vfio_disable_interrupts``: MSI-X off (which falls back to INTx), then INTx off."""
        if self.interrupt == "msix":
            await self._msix_disable("S1")
        if self.interrupt == "intx":
            await self._intx_disable("S1")

    async def _s2_quiesce(self) -> None:
        """S2: clear I/O, memory, bus master and INTx disable in the command register."""
        with self._step("S2", "command register quiesce"):
            command = _u16(await self._region_read(_CONFIG, COMMAND_REGISTER, 2))
            await self._config_write(COMMAND_REGISTER, _le(command & ~_COMMAND_QUIESCE, 2))

    async def _s3_force_d0(self) -> None:
        """S3: with a PM capability, read PMCSR and force D0 if needed."""
        cap = find_capability(self.capabilities, CapId.PM)
        if cap is None:
            return
        pmcsr_at = cap.offset + 4
        with self._step("S3", f"force D0 (PMCSR at {pmcsr_at:#x})"):
            pmcsr = _u16(await self._region_read(_CONFIG, pmcsr_at, 2))
            if pmcsr & _PM_STATE_MASK:
                await self._config_write(pmcsr_at, _le(pmcsr & ~_PM_STATE_MASK, 2))
                pmcsr = _u16(await self._region_read(_CONFIG, pmcsr_at, 2))
                if pmcsr & _PM_STATE_MASK:
                    self.warnings.append(f"S3 device stuck in D{pmcsr & _PM_STATE_MASK}")

    async def _s4_device_reset(self) -> None:
        """S4: DEVICE_RESET, if GET_INFO reported RESET."""
        if self.device_info.flags & DeviceFlags.RESET:
            with self._step("S4", "device reset"):
                await self._request(Command.DEVICE_RESET, rsize=HEADER_SIZE)

    async def _s6_clear_bars(self) -> None:
        """S6: write 0 to all six BAR registers."""
        for index in range(_BAR_COUNT):
            with self._step("S6", f"clear BAR{index}"):
                await self._config_write(bar_offset(index), bytes(4))

    async def _s7_relayout(self) -> None:
        """S7: q35's PAM reset: RAM below 1 MiB split around the legacy ROMs.

        Sent only when the layout changes (the first reset after realize).
        """
        with self._step("S7", "q35 memory re-layout"):
            await self._relayout(reset_windows(ram_fd=self.options.ram_fd))

    # ================================================================= guest

    async def load_rom(self) -> bytes | None:
        """The guest's first read of the ROM BAR: QEMU's ``vfio_pci_load_rom``
        (realize-steps §2.2), step ``rom-load``.

        RI(6, 32) (asked again with a larger argsz, as at R4), then REGION_READ
        of region 6 from 0 for the whole size, asking again from where a short
        reply stopped until a 0-byte reply. Returns the ROM; None, as in QEMU,
        when there is nothing to read: no ROM BAR at R8 (no message at all), a
        region of size 0, or one larger than the server's
        ``max_data_xfer_size`` (QEMU's local EINVAL: RI(6) only, a warning).
        Once per client, as QEMU loads it once per process. An error reply
        fails with :class:`RealizeError` ``ROM`` (QEMU would go on with a ROM
        that reads 0xff).
        """
        if not self.rom_size:
            return None
        if self.rom is not None or Region.ROM in self.regions:
            return self.rom
        with self._step("ROM", "ROM load", label="rom-load"):
            self.regions[Region.ROM] = region = await self._region_info(Region.ROM)
            size = region.info.size
            if not size:
                return None
            if size > self.max_xfer:
                self.warnings.append(
                    f"ROM of {size} bytes exceeds the server's max_data_xfer_size "
                    f"{self.max_xfer}: not read (QEMU fails it with EINVAL; the ROM reads 0xff)"
                )
                return None
            rom = bytearray()
            while len(rom) < size:
                data = await self._region_read_some(Region.ROM, len(rom), size - len(rom))
                if not data:
                    break
                rom += data
        self.rom = bytes(rom)
        return self.rom

    # ================================================================= interrupts

    async def _intx_enable(self, step: str) -> None:
        """``vfio_intx_enable`` (R13, S5, MSI-X fallback): read the pin; if set,
        a new eventfd as INTx trigger."""
        with self._step(step, "INTx enable"):
            self.pin = (await self._region_read(_CONFIG, INTERRUPT_PIN, 1))[0]
            if not self.pin:
                return
            fd = make_eventfd()
            try:
                await self._set_irq_eventfds(IrqIndex.INTX, 0, [fd])
            except BaseException:
                fd.close()
                raise
            self.intx_fd = fd
            self.interrupt = "intx"

    async def _intx_disable(self, step: str) -> None:
        """``vfio_intx_disable``: IRQS(0, 0x21, 0), then the eventfd is closed."""
        fd, self.intx_fd = self.intx_fd, None
        self.interrupt = "none"
        self.intx_pending = False
        try:
            with self._step(step, "INTx disable"):
                await self._set_irqs(IrqIndex.INTX, _NONE_TRIGGER, 0, 0)
        finally:
            if fd is not None:
                fd.close()

    async def _msix_enable(self, step: str) -> None:
        """What QEMU does when a guest enables MSI-X and unmasks every vector.

        The control write, ``vfio_msix_enable`` (INTx off, then vector 0 with
        no fd), then per vector: with NORESIZE all vectors again after a
        disable, else that vector alone.
        """
        msix = self.msix
        if msix is None:
            raise RealizeError(step, "MSI-X enable", "the device has no MSI-X capability")
        vectors = min(msix.entries, msix.irq_count)
        if not vectors:
            raise RealizeError(step, "MSI-X enable", "the server offers no MSI-X vectors")
        control = (msix.control & ~_MSIX_MASKALL) | _MSIX_ENABLE
        with self._step(step, "MSI-X enable", label="guest-config"):
            await self._config_write(msix.offset + 2, _le(control, 2))
        with self._labelled("msix-enable"):
            if self.interrupt == "intx":
                await self._intx_disable(step)
        with self._step(step, "MSI-X enable", label="msix-enable"):
            await self._set_irqs(IrqIndex.MSIX, _EVENTFD_TRIGGER, 0, 1)
            self.interrupt = "msix"
            for nr in range(vectors):
                self.msix_fds.append(make_eventfd())
                if msix.noresize:
                    await self._set_irqs(IrqIndex.MSIX, _NONE_TRIGGER, 0, 0)
                    await self._set_irq_eventfds(IrqIndex.MSIX, 0, self.msix_fds)
                else:
                    await self._set_irq_eventfds(IrqIndex.MSIX, nr, self.msix_fds[-1:])

    async def _msix_disable(self, step: str) -> None:
        """``vfio_msix_disable``: IRQS(2, 0x21, 0) if vectors were set, then INTx back on."""
        fds, self.msix_fds = self.msix_fds, []
        self.interrupt = "none"
        try:
            if fds:
                with self._step(step, "MSI-X disable"):
                    await self._set_irqs(IrqIndex.MSIX, _NONE_TRIGGER, 0, 0)
        finally:
            close_all(fds)
        await self._intx_enable(step)

    async def _set_irqs(self, index: int, flags: int, start: int, count: int) -> None:
        """One SET_IRQS without fds (36 bytes, argsz 20, as QEMU sends it)."""
        body = IrqSetBody(IrqSetBody.FIXED.size, flags, index, start, count)
        await self._request(Command.DEVICE_SET_IRQS, body, rsize=HEADER_SIZE + body.argsz)

    async def _set_irq_eventfds(self, index: int, start: int, fds: Sequence[OwnedFd]) -> None:
        """EVENTFD|TRIGGER for ``fds`` from vector ``start``, in chunks of the
        server's ``max_msg_fds``, each awaited (``vfio_user_device_io_set_irqs``)."""
        if not self.max_msg_fds:
            raise _Problem("the server's max_msg_fds is 0: no eventfd can be passed")
        for pos in range(0, len(fds), self.max_msg_fds):
            chunk = fds[pos : pos + self.max_msg_fds]
            body = IrqSetBody(
                IrqSetBody.FIXED.size, _EVENTFD_TRIGGER, index, start + pos, len(chunk)
            )
            await self._request(
                Command.DEVICE_SET_IRQS, body, fds=chunk, rsize=HEADER_SIZE + body.argsz
            )

    # ================================================================= workload

    async def enable_device(self) -> None:
        """W1–W2: a driver's probe: memory + bus master on, then the interrupt.

        W1 writes 0x0006 to the command register; W2 enables MSI-X when
        ``options.irq`` is ``"msix"``, or checks that INTx is set up.
        """
        vendor, device = _u16(self.config[0:2]), _u16(self.config[2:4])
        if (vendor, device) != (layout.VENDOR_ID, layout.DEVICE_ID):
            raise RealizeError(
                "W0",
                "workload",
                f"needs the reference device "
                f"{layout.VENDOR_ID:04x}:{layout.DEVICE_ID:04x}, found {vendor:04x}:{device:04x}",
            )
        if self.bar_values.get(0, 1) & 0x1:
            raise RealizeError("W0", "workload", "BAR0 is not a memory BAR")
        with self._step("W1", "command register: memory + bus master", label="guest-config"):
            await self._config_write(COMMAND_REGISTER, _le(_COMMAND_DRIVER, 2))
        if self.options.irq == "msix":
            if self.interrupt != "msix":
                await self._msix_enable("W2")
        elif self.interrupt != "intx":
            raise RealizeError("W2", "INTx", "INTx is not enabled (interrupt pin 0?)")
        self.driver_ready = True

    async def run_workload(self, iterations: int) -> None:
        """``iterations`` doorbells cycling COPY, INVERT, CRC32 over :func:`workload_payload`."""
        start = trio.current_time()
        for i in range(iterations):
            await self.doorbell(_WORKLOAD_OPS[i % len(_WORKLOAD_OPS)], workload_payload(i))
        self.timings = attrs.evolve(self.timings, workload=trio.current_time() - start)

    async def doorbell(self, op: int, data: bytes, *, cookie: int | None = None) -> DoorbellResult:
        """W3: one descriptor, checked.

        Writes the descriptor and ``data`` into guest RAM at WORKLOAD_BASE,
        programs DESC_LO/DESC_HI, rings DOORBELL, waits for the interrupt,
        checks the completion (status, cookie, crc32, byte count) and the
        destination bytes, then acks IRQ_STATUS (with INTx, the unmask follows
        that BAR access, as QEMU's EOI path does). Enables the device first if
        needed.
        """
        if op not in _OP_NAMES:
            raise ValueError(f"unknown op {op}")
        if not 0 < len(data) <= layout.MAX_TRANSFER:
            raise ValueError(f"data must be 1 to {layout.MAX_TRANSFER} bytes, not {len(data)}")
        if not self.driver_ready:
            await self.enable_device()
        number = self.doorbells
        self.doorbells += 1
        cookie = 0xC0DE_0000_0000_0000 | number if cookie is None else cookie
        expected = expected_output(op, data)
        descriptor = layout.DESCRIPTOR.pack(_SRC_GPA, _DST_GPA, len(data), op, cookie)
        self.memory.write_ram(_DESC_GPA, descriptor.ljust(layout.DESCRIPTOR_SIZE, b"\0"))
        self.memory.write_ram(_SRC_GPA, data)
        self.memory.write_ram(_DST_GPA, bytes(max(len(data), len(expected))))
        self._drain_interrupts()
        with self._step(f"W3 doorbell #{number}", f"{_OP_NAMES[op]} of {len(data)} bytes"):
            await self._bar_write(0, layout.REG_DESC_LO, _le(_DESC_GPA, 4))
            await self._bar_write(0, layout.REG_DESC_HI, _le(_DESC_GPA >> 32, 4))
            start = trio.current_time()
            await self._bar_write(0, layout.REG_DOORBELL, _le(1, 4))
            await self._wait_interrupt()
            status, crc, done_cookie, count = layout.COMPLETION.unpack(
                self.memory.read_ram(_DESC_GPA + layout.COMPLETION_OFFSET, layout.COMPLETION.size)
            )
            latency = trio.current_time() - start
            await self._bar_write(0, layout.REG_IRQ_STATUS, _le(layout.IRQ_STATUS_DONE, 4))
            if status & layout.COMPLETION_ERROR:
                err = status & ~layout.COMPLETION_ERROR
                raise _Problem(f"the device reports an error: {_errno_text(err)}", err)
            if status != layout.COMPLETION_OK:
                raise _Problem(f"completion status {status:#x}, expected {layout.COMPLETION_OK}")
            if done_cookie != cookie:
                raise _Problem(f"completion cookie {done_cookie:#x}, expected {cookie:#x}")
            if count != len(expected):
                raise _Problem(f"completion reports {count} bytes, expected {len(expected)}")
            if crc != zlib.crc32(expected):
                raise _Problem(
                    f"completion crc32 {crc:#010x}, expected {zlib.crc32(expected):#010x}"
                )
            if self.memory.read_ram(_DST_GPA, len(expected)) != expected:
                raise _Problem("the destination bytes differ from the expected result")
        self.latencies.append(latency)
        self.workload_bytes += len(data)
        return DoorbellResult(op, len(data), cookie, latency)

    def _interrupt_fds(self) -> list[OwnedFd]:
        if self.interrupt == "intx" and self.intx_fd is not None:
            return [self.intx_fd]
        return list(self.msix_fds)

    def _drain_interrupts(self) -> None:
        for fd in self._interrupt_fds():
            with suppress(BlockingIOError):
                os.read(fd.fileno(), 8)

    async def _wait_interrupt(self) -> None:
        """Wait for any interrupt eventfd (bounded by the reply timeout), then clear it."""
        fds = self._interrupt_fds()
        if not fds:
            raise _Problem("no interrupt is set up")
        with trio.move_on_after(self.options.reply_timeout):
            async with trio.open_nursery() as nursery:
                for fd in fds:
                    nursery.start_soon(self._readable_then_cancel, fd, nursery.cancel_scope)
        fired = False
        for fd in fds:
            with suppress(BlockingIOError):
                fired |= bool(os.read(fd.fileno(), 8))
        if not fired:
            raise _Problem(f"no interrupt within {self.options.reply_timeout} s")
        if self.interrupt == "intx":
            self.intx_pending = True

    @staticmethod
    async def _readable_then_cancel(fd: OwnedFd, scope: trio.CancelScope) -> None:
        await trio.lowlevel.wait_readable(fd.fileno())
        scope.cancel()

    async def bar_read(self, region: int, offset: int, count: int) -> bytes:
        """A guest read of a BAR: REGION_READ (always waited), then QEMU's INTx EOI
        if an interrupt is pending."""
        label = "pba-read" if self._in_pba(region, offset) else "bar-mmio"
        with self._step("MMIO", f"read of {region_name(region)} @{offset:#x}", label=label):
            data = await self._region_read(region, offset, count)
            await self._eoi()
        return data

    async def bar_write(self, region: int, offset: int, data: bytes) -> None:
        """A guest write to a BAR: posted when QEMU would post it (realize-steps
        §2.3), then QEMU's INTx EOI if an interrupt is pending."""
        with self._step("MMIO", f"write of {region_name(region)} @{offset:#x}"):
            await self._bar_write(region, offset, data)

    async def _bar_write(self, region: int, offset: int, data: bytes) -> None:
        if self._posted(region):
            self._check_xfer(len(data))
            msg_id = self.endpoint.allocate_id()
            await self.endpoint.send_command(
                Command.REGION_WRITE,
                RegionAccessBody(offset, region, len(data), data),
                no_reply=True,
                msg_id=msg_id,
            )
            self.steps.append(
                StepMessage(msg_id, Command.REGION_WRITE, "bar-mmio-posted", posted=True)
            )
        else:
            with self._labelled("bar-mmio"):
                await self._region_write(region, offset, data)
        await self._eoi()

    async def _eoi(self) -> None:
        """``vfio_pci_intx_eoi``: after a BAR access, unmask INTx if it fired."""
        if self.intx_pending:
            self.intx_pending = False
            with self._labelled("intx-eoi"):
                await self._set_irqs(IrqIndex.INTX, _NONE_UNMASK, 0, 1)

    def _in_pba(self, region: int, offset: int) -> bool:
        """Whether a read of ``region`` at ``offset`` is a read of the MSI-X PBA
        (QEMU's ``vfio_user_pba_read``): one bit per entry, in 64-bit words."""
        msix = self.msix
        if msix is None or region != msix.pba_bar:
            return False
        return msix.pba_offset <= offset < msix.pba_offset + msix_pba_size(msix.entries)

    def _posted(self, region: int) -> bool:
        """Posted only for a memory BAR, with posted writes on and no region reporting MMAP."""
        value = self.bar_values.get(region)
        return not self.no_post and value is not None and not value & 0x1

    # ================================================================= messages

    @contextmanager
    def _labelled(self, label: str, substep: str = "") -> Iterator[None]:
        """The commands sent inside belong to step ``label`` (``substep``: see
        :class:`StepMessage`)."""
        outer, self._label = self._label, (label, substep)
        try:
            yield
        finally:
            self._label = outer

    def _label_of(self, step: str) -> tuple[str, str] | None:
        """The label of error step ``step``: itself for R and S steps, but
        ``guest-reset`` (with ``step`` as substep) in a reset after the first;
        None for the others."""
        if step in RESET_STEPS:
            return ("guest-reset", step) if self.resets > 1 else (step, "")
        return (step, "") if step in REALIZE_STEPS else None

    @contextmanager
    def _step(self, step: str, what: str, *, label: str | None = None) -> Iterator[None]:
        """Turn what can go wrong inside a step into one :class:`RealizeError`;
        the commands sent inside belong to ``label`` (default: ``step``'s, see
        :meth:`_label_of`; none: the label around it stays)."""
        labelled = (label, "") if label else self._label_of(step)
        try:
            if labelled is None:
                yield
            else:
                with self._labelled(*labelled):
                    yield
        except _Problem as exc:
            raise RealizeError(step, what, str(exc), errno=exc.errno) from None
        except ErrorReplyError as exc:
            raise RealizeError(
                step, what, f"peer replied {_errno_text(exc.errno)}", errno=exc.errno
            ) from exc
        except ReplyTimeoutError as exc:
            raise RealizeError(step, what, str(exc)) from exc
        except (TransportError, trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            problem = self._fatal or f"connection lost: {exc or type(exc).__name__}"
            raise RealizeError(step, what, problem) from exc

    async def _send(
        self, command: int, body: Body | None = None, *, fds: Sequence[OwnedFd] = ()
    ) -> PendingReply:
        pending = await self.endpoint.send_command(command, body, fds=fds)
        assert pending is not None
        self._outstanding.append(pending)
        self.steps.append(StepMessage(pending.request.msg_id, command, *self._label))
        return pending

    async def _collect(self, pending: PendingReply, *, rsize: int, max_fds: int = 0) -> Message:
        """The reply to ``pending``, refused as QEMU refuses it: unexpected fds
        (more than ``max_fds``) or a message larger than QEMU's buffer (``rsize``)."""
        try:
            reply = await pending.wait()
        except (VfioProxyError, trio.ClosedResourceError):
            self._outstanding.remove(pending)
            raise
        self._outstanding.remove(pending)
        if len(reply.fds) > max_fds:
            close_all(reply.fds)
            raise _Problem(
                f"unexpected fds: the reply carries {len(reply.fds)}", errno_module.EINVAL
            )
        if reply.header.size > rsize:
            close_all(reply.fds)
            raise _Problem(
                f"reply larger than recv buffer ({reply.header.size} > {rsize} bytes)",
                errno_module.EINVAL,
            )
        return reply

    async def _request(
        self,
        command: int,
        body: Body | None = None,
        *,
        rsize: int,
        fds: Sequence[OwnedFd] = (),
        max_fds: int = 0,
    ) -> Message:
        """Send a command and wait for its reply (QEMU's ``vfio_user_send_wait``)."""
        pending = await self._send(command, body, fds=fds)
        return await self._collect(pending, rsize=rsize, max_fds=max_fds)

    def _check_xfer(self, count: int) -> None:
        if count > self.max_xfer:
            raise _Problem(
                f"{count} bytes exceed the server's max_data_xfer_size {self.max_xfer}: "
                f"not sent (QEMU fails it with EINVAL)",
                errno_module.EINVAL,
            )

    async def _region_read(self, region: int, offset: int, count: int) -> bytes:
        """REGION_READ, all ``count`` bytes or a failure (QEMU's short-read checks)."""
        data = await self._region_read_some(region, offset, count)
        if len(data) < count:
            raise _Problem(f"short read: {len(data)} of {count} bytes")
        return data

    async def _region_read_some(self, region: int, offset: int, count: int) -> bytes:
        """REGION_READ: the bytes the reply carries, at most ``count`` (more fails)."""
        self._check_xfer(count)
        reply = await self._request(
            Command.REGION_READ, RegionAccessBody(offset, region, count), rsize=32 + count
        )
        payload = reply.body.serialize()
        if not count and not payload:
            return b""
        body = _decode(RegionAccessBody.parse, reply)
        if body.count > count:
            raise _Problem(
                f"reply count {body.count} is above the {count} asked", errno_module.E2BIG
            )
        return body.data[: min(body.count, count)]

    async def _region_write(self, region: int, offset: int, data: bytes) -> None:
        """A waited REGION_WRITE (QEMU reads nothing of its reply but the error)."""
        self._check_xfer(len(data))
        await self._request(
            Command.REGION_WRITE,
            RegionAccessBody(offset, region, len(data), data),
            rsize=32 + len(data),
        )

    async def _config_write(self, offset: int, data: bytes) -> None:
        """A config-space write: never posted."""
        await self._region_write(_CONFIG, offset, data)

    async def _relayout(self, target: Sequence[DmaWindow]) -> None:
        """One memory transaction: DMA_UNMAP the windows that go, DMA_MAP the new
        ones, all without waiting; then wait for the last reply and check each
        in order (QEMU's listener commit, ``vfio_user_wait_reqs``)."""
        current = self.memory.windows
        gone = [w for w in current if w not in target]
        new = [w for w in target if w not in current]
        burst: list[tuple[PendingReply, int]] = []
        for window in gone:
            self.memory.unmap(window.iova, window.size)
            body: Body = DmaUnmapBody(DmaUnmapBody.FIXED.size, 0, window.iova, window.size)
            burst.append((await self._send(Command.DMA_UNMAP, body), 40))
        for window in new:
            self.memory.map(window)
            fds = (self.memory.ram_fd,) if window.has_fd else ()
            body = DmaMapBody(
                DmaMapBody.FIXED.size, window.map_flags, window.map_offset, window.iova, window.size
            )
            burst.append((await self._send(Command.DMA_MAP, body, fds=fds), 48))
        if not burst:
            return
        last, last_rsize = burst[-1]
        failure: _Problem | ErrorReplyError | None = None
        try:
            await self._collect(last, rsize=last_rsize)
        except (_Problem, ErrorReplyError) as exc:
            failure = exc
        for pending, rsize in burst[:-1]:
            await self._collect(pending, rsize=rsize)
        if failure is not None:
            raise failure

    # ================================================================= server commands

    async def _handle_server_command(self, message: Message) -> None:
        """Answer a server command from guest memory; sends the reply itself,
        because QEMU answers errors even to no_reply commands."""
        header = message.header
        if not header.is_command:
            close_all(message.fds)
            self._fatal = (
                f"server sent a message of invalid type {header.type} ({header.describe()}); "
                f"QEMU drops the connection"
            )
            await self.stream.aclose()
            return
        reply = self.memory.answer(
            message, layout=self.options.dma_layout, max_data_xfer_size=self.max_xfer
        )
        outcome = "ok" if reply is None or not reply.is_error else _errno_text(reply.header.error)
        self.dma_answers[f"{header.command_name} {outcome}"] += 1
        # if the connection is gone, the step waiting for a reply reports it
        if reply is not None:
            with suppress(TransportError, trio.ClosedResourceError, trio.BrokenResourceError):
                await self.endpoint.send(reply)

    def _receive_failed(self, exc: TransportError) -> None:
        self._fatal = self._fatal or f"receiving failed: {exc}"

    async def _run_endpoint(self, *, task_status: trio.TaskStatus[None]) -> None:
        """The endpoint's reader; a receive failure (already remembered) ends it."""
        try:
            await self.endpoint.run(task_status=task_status)
        except* TransportError:
            pass

    # ================================================================= result and close

    def result(self) -> RealizeResult:
        """What the client knows now, as a frozen :class:`RealizeResult`."""
        config = self.config or bytes(64)
        regions = tuple(
            RegionFacts(
                index,
                r.info.size,
                r.info.flags,
                r.info.offset,
                r.info.argsz,
                r.asks,
                r.sparse_areas,
                r.fd is not None,
                tuple((offset, size) for offset, size, _ in r.mmaps),
            )
            for index, r in sorted(self.regions.items())
        )
        bars = tuple(
            BarFacts(
                index,
                self.regions[index].info.size,
                value,
                "I/O" if value & 0x1 else "mem64" if (value >> 1) & 0x3 == 0x2 else "mem32",
                not value & 0x1 and bool(value & 0x8),
            )
            for index, value in sorted(self.bar_values.items())
        )
        workload = None
        if self.doorbells:
            workload = WorkloadFacts(self.doorbells, self.interrupt, self.workload_bytes)
        return RealizeResult(
            version=self.version,
            server_capabilities=self.server_capabilities,
            max_msg_fds=self.max_msg_fds,
            max_data_xfer_size=self.max_xfer,
            device_flags=self.device_info.flags,
            num_regions=self.device_info.num_regions,
            num_irqs=self.device_info.num_irqs,
            vendor_id=_u16(config[0:2]),
            device_id=_u16(config[2:4]),
            revision=config[8],
            class_code=int.from_bytes(config[9:12], "little"),
            regions=regions,
            bars=bars,
            rom_size=self.rom_size,
            rom_loaded=None if self.rom is None else len(self.rom),
            capabilities=tuple(
                CapabilityFacts(c.name, c.cap_id, c.offset, c.extended)
                for c in self.capabilities
                if c.broken is None
            ),
            msix=self.msix,
            msi_control=self.msi_control,
            interrupt_pin=self.pin,
            err_irq_count=self.err_irq_count,
            posted_writes=not self.no_post,
            interrupt=self.interrupt,
            timings=attrs.evolve(self.timings, doorbell=LatencyStats.of(self.latencies)),
            workload=workload,
            dma_answers=dict(self.dma_answers),
            sent=dict(self.endpoint.sent),
            received=dict(self.endpoint.received),
            unexpected_replies=self.endpoint.unexpected_replies,
            warnings=tuple(self.warnings),
            steps=tuple(self.steps),
        )

    async def aclose(self) -> None:
        """Close every fd, mapping and the stream, once. Call after the
        endpoint stopped (as :func:`open_realize_client` does); never cancelled."""
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            for pending in self._outstanding:
                try:
                    reply = await pending.wait()
                except (VfioProxyError, trio.ClosedResourceError):
                    continue
                close_all(reply.fds)
            self._outstanding.clear()
            close_all([*self.msix_fds, self.intx_fd, self.err_fd])
            self.msix_fds, self.intx_fd, self.err_fd = [], None, None
            for region in self.regions.values():
                region.close()
            self.memory.close()
            await self.stream.aclose()


def _cap_uint(caps: dict[str, Any], key: str, limit: int | None = None) -> int | None:
    """Pop capability ``key``: absent → None; else an unsigned integer ≤ ``limit``."""
    if key not in caps:
        return None
    value = caps.pop(key)
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or not 0 <= value < 1 << 64
        or (limit is not None and value > limit)
    ):
        raise _Problem(f"malformed {key}: {value!r}")
    return value


def _decode(parse: Callable[[bytes, BodyContext], T], reply: Message) -> T:
    """The reply's bytes read as the layout QEMU expects, whatever its command field says."""
    try:
        return parse(reply.body.serialize(), BodyContext())
    except VfioProxyError as exc:
        raise _Problem(f"reply does not decode: {exc}") from None


# --------------------------------------------------------------------- entry points


@asynccontextmanager
async def open_realize_client(
    target: str | os.PathLike[str] | FdStream,
    options: RealizeOptions | None = None,
    *,
    ids: MessageIds | None = None,
) -> AsyncIterator[RealizeClient]:
    """A connected :class:`RealizeClient` whose receiving task runs until exit.

    ``target`` is the server's socket path or an :class:`FdStream` (the
    client takes it over); ``ids`` numbers its commands, shared with other
    clients given the same one (default: its own counter from 0). A path that
    cannot be connected to raises
    :class:`RealizeError` ``R0`` (QEMU's ``vfio_user_connect_dev``). On exit,
    normal or not, the receiving task stops and every fd, mapping and the
    stream are closed. An exception from the body propagates unchanged (not
    wrapped in an exception group).
    """
    options = RealizeOptions() if options is None else options
    if isinstance(target, FdStream):
        stream = target
    else:
        try:
            stream = await open_unix_fd_stream(target, max_fds=QEMU_RECV_FDS)
        except OSError as exc:
            raise RealizeError("R0", f"connect to {os.fspath(target)}", os_reason(exc)) from exc
    try:
        client = RealizeClient(stream, options, ids=ids)
    except BaseException:
        await stream.aclose()
        raise
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(client._run_endpoint)
            try:
                yield client
            except BaseException as exc:
                body_error = exc
            finally:
                nursery.cancel_scope.cancel()
    finally:
        await client.aclose()
    if body_error is not None:
        raise body_error


async def realize(
    target: str | os.PathLike[str] | FdStream, options: RealizeOptions | None = None
) -> RealizeResult:
    """Realize, then (by default) the machine reset, then (if asked) the ROM
    load, then the workload; the result.

    Raises :class:`RealizeError` naming the step that failed. Everything is
    closed on return, on error and on cancellation.
    """
    options = RealizeOptions() if options is None else options
    async with open_realize_client(target, options) as client:
        await client.realize()
        if options.reset:
            await client.reset()
        if options.rom_load:
            await client.load_rom()
        if options.workload:
            await client.run_workload(options.workload)
        return client.result()
