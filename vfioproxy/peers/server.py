"""The vfio-user side of the reference device: ``vfioproxy serve-device``.

A :class:`ServerSession` serves one client connection: it negotiates
VERSION, checks every request the way libvfio-user (commit efd091b) does and
turns it into calls on its own :class:`~vfioproxy.peers.device.Device`, and
sends the device's DMA_READ/DMA_WRITE commands for windows mapped without an
fd. :class:`DeviceServer` listens on a UNIX socket and serves its clients
**concurrently**, each session in its own task and nursery with its own
device instance: clients never share state, a session that fails ends alone,
and a test or a proxy can open several connections at once. (libvfio-user
serves one client per context; a mode that queues clients or shares one
device is not offered.)

Deliberate choices, where the model differs from libvfio-user or from what
QEMU 10.2 expects, are listed in each handler's docstring.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import attrs
import trio

from vfioproxy.errors import ConnectionClosedError, VfioProxyError
from vfioproxy.io.fds import OwnedFd, close_all
from vfioproxy.io.transport import FdStream
from vfioproxy.io.unix import open_unix_listener
from vfioproxy.peers import layout as L
from vfioproxy.peers.device import (
    IRQ_COUNTS,
    IRQ_INFO_FLAGS,
    MAX_DMA_MAPS,
    NUM_REGIONS,
    Device,
    DeviceError,
    DmaFault,
)
from vfioproxy.peers.endpoint import Endpoint, ErrorReplyError, ReplyTimeoutError
from vfioproxy.protocol.bodies import (
    DeviceFeatureBody,
    DeviceInfoBody,
    DeviceStateData,
    DirtyBitmap,
    DmaAccessBody,
    DmaLayout,
    DmaLoggingReportData,
    DmaLoggingStartData,
    DmaMapBody,
    DmaUnmapBody,
    EmptyBody,
    IrqInfoBody,
    IrqSetBody,
    MigDataBody,
    MigrationFeatureData,
    RawBody,
    RegionAccessBody,
    RegionInfoBody,
    RegionIoFdsBody,
    RegionWriteMultiBody,
    SparseMmapArea,
    SparseMmapCap,
    VersionBody,
    WriteMultiReplyBody,
)
from vfioproxy.protocol.capabilities import Capabilities, MigrationCapability
from vfioproxy.protocol.codec import (
    Dialects,
    Message,
    build_error_reply,
    build_reply,
    detect_client_dma_layout,
)
from vfioproxy.protocol.constants import (
    DeviceFlags,
    DmaUnmapFlags,
    Feature,
    FeatureOp,
    MigrationFlags,
    MigrationState,
    RegionFlags,
)
from vfioproxy.protocol.header import HEADER_SIZE, Command
from vfioproxy.protocol.pci import Region
from vfioproxy.side import Side

__all__ = [
    "MAX_DATA_XFER_SIZE",
    "DeviceOptions",
    "DeviceServer",
    "ServerSession",
    "open_device_server",
    "serve_device",
    "server_capabilities",
]

log = logging.getLogger(__name__)

#: what the server advertises and enforces on region and migration data
MAX_DATA_XFER_SIZE = 1024 * 1024
SERVER_MAX_MSG_FDS = 8
PAGE_SIZE = 4096
#: libvfio-user's limit on the client's ``max_msg_fds``
CLIENT_MAX_MSG_FDS_LIMIT = 1024
#: the most writes one REGION_WRITE_MULTI may carry (the spec's VFIO_USER_MULTI_MAX)
MAX_MULTI_WRITES = 200
#: commands libvfio-user still serves in STOP and STOP_COPY (region access not in STOP_COPY)
_ALLOWED_WHEN_STOPPED = frozenset(
    {Command.REGION_READ, Command.REGION_WRITE, Command.DEVICE_FEATURE, Command.MIG_DATA_READ}
)
_STOPPED = frozenset({MigrationState.STOP, MigrationState.STOP_COPY})
_REGION_FLAGS: dict[int, int] = {
    Region.BAR0: RegionFlags.READ | RegionFlags.WRITE,
    Region.BAR1: RegionFlags.READ | RegionFlags.WRITE,
    Region.BAR2: RegionFlags.READ | RegionFlags.WRITE,
    Region.ROM: RegionFlags.READ,
    Region.CONFIG: RegionFlags.READ | RegionFlags.WRITE,
}
_FEATURE_OPS: dict[int, int] = {
    Feature.MIGRATION: FeatureOp.GET | FeatureOp.PROBE,
    Feature.MIG_DEVICE_STATE: FeatureOp.GET | FeatureOp.SET | FeatureOp.PROBE,
    Feature.DMA_LOGGING_START: FeatureOp.SET | FeatureOp.PROBE,
    Feature.DMA_LOGGING_STOP: FeatureOp.SET | FeatureOp.PROBE,
    Feature.DMA_LOGGING_REPORT: FeatureOp.GET | FeatureOp.PROBE,
}


def _pci_id(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"{attribute.name} must be a 16-bit PCI id, got {value:#x}")


@attrs.frozen
class DeviceOptions:
    """What ``vfioproxy serve-device`` can change about the device.

    ``vendor_id``/``device_id``: the PCI ids in config space (and the ROM).
    ``rom``: whether the device has its expansion ROM (False: region 6 has
    size 0 and the ROM BAR reads 0, so QEMU's R8 finds no ROM BAR).
    ``write_multiple``: offer REGION_WRITE_MULTI in the VERSION reply (and
    accept it). ``client_dma_layout``: how to read the client's DMA_READ /
    DMA_WRITE replies; ``None`` detects it from the client's VERSION
    (QEMU's capability set → ``qemu``, else ``spec``).
    """

    vendor_id: int = attrs.field(default=L.VENDOR_ID, validator=_pci_id)
    device_id: int = attrs.field(default=L.DEVICE_ID, validator=_pci_id)
    write_multiple: bool = False
    client_dma_layout: DmaLayout | None = None
    rom: bool = True


def server_capabilities(options: DeviceOptions) -> Capabilities:
    """The VERSION reply's capabilities (the reply stays ≤ 214 bytes, QEMU's limit)."""
    return Capabilities(
        max_msg_fds=SERVER_MAX_MSG_FDS,
        max_data_xfer_size=MAX_DATA_XFER_SIZE,
        pgsizes=PAGE_SIZE,
        max_dma_maps=MAX_DMA_MAPS,
        migration=MigrationCapability(pgsize=PAGE_SIZE),
        write_multiple=True if options.write_multiple else None,
    )


def _refuse(text: str, code: int = errno.EINVAL) -> DeviceError:
    return DeviceError(code, text)


BodyT = TypeVar("BodyT")


def _body(message: Message, kind: type[BodyT]) -> BodyT:
    body = message.body
    if not isinstance(body, kind):
        raise _refuse(f"{message.header.command_name} body does not decode")
    return body


Handler = Callable[[Message, list[OwnedFd]], Awaitable[Message]]


class ServerSession:
    """One client connection served by its own :class:`Device`.

    :meth:`run` serves until the client closes the connection (or breaks
    it), then drops the device's DMA mappings and eventfds and closes the
    stream. The session answers every command it can frame — a refused one
    with a header-only error reply carrying the errno — and keeps serving.
    """

    def __init__(
        self,
        stream: FdStream,
        *,
        options: DeviceOptions = DeviceOptions(),
        name: str = "session",
    ) -> None:
        self.stream = stream
        self.options = options
        self.name = name
        self.device = Device(
            vendor_id=options.vendor_id, device_id=options.device_id, transport=self,
            rom=options.rom,
        )
        # libvfio-user numbers its DMA commands from 1
        self.endpoint = Endpoint(stream, Side.SERVER, handler=self.handle, first_id=1)
        #: the client's capabilities once VERSION succeeded (None before)
        self.client_caps: Capabilities | None = None
        #: requests that hit a bug in this module (answered EINVAL, logged)
        self.internal_errors = 0
        self._handlers: dict[int, Handler] = {
            Command.DMA_MAP: self._dma_map,
            Command.DMA_UNMAP: self._dma_unmap,
            Command.DEVICE_GET_INFO: self._get_info,
            Command.DEVICE_GET_REGION_INFO: self._region_info,
            Command.DEVICE_GET_REGION_IO_FDS: self._region_io_fds,
            Command.DEVICE_GET_IRQ_INFO: self._irq_info,
            Command.DEVICE_SET_IRQS: self._set_irqs,
            Command.REGION_READ: self._region_access,
            Command.REGION_WRITE: self._region_access,
            Command.DEVICE_RESET: self._reset,
            Command.REGION_WRITE_MULTI: self._write_multi,
            Command.DEVICE_FEATURE: self._feature,
            Command.MIG_DATA_READ: self._mig_data_read,
            Command.MIG_DATA_WRITE: self._mig_data_write,
        }

    # ----------------------------------------------------------- lifetime

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until the client goes away; always releases everything.

        A transport failure (the client vanished mid-message, sent more fds
        than fit) ends only this session. Cancellation ends it at once.
        """
        try:
            await self.endpoint.run(task_status=task_status)
        except* (VfioProxyError, trio.ClosedResourceError) as failure:
            log.info("%s: connection ended: %s", self.name, failure.exceptions[0])
        finally:
            self.device.close()
            with trio.CancelScope(shield=True):
                await self.stream.aclose()
        log.info("%s: closed", self.name)

    @property
    def client_max_msg_fds(self) -> int:
        """fds the client accepts per message (libvfio-user assumes 1 when not said)."""
        return 1 if self.client_caps is None else self.client_caps.effective_max_msg_fds()

    @property
    def client_max_data_xfer_size(self) -> int:
        caps = self.client_caps or Capabilities()
        return caps.effective_max_data_xfer_size()

    # ----------------------------------------------------------- requests

    async def handle(self, message: Message) -> Message | None:
        """The Endpoint's handler: the reply to one command (in arrival order).

        A reply carrying an fd is sent here (and the duplicate closed right
        after), so this returns None for it; fds of the request the device
        did not take are closed.
        """
        fds = [fd for fd in message.fds if isinstance(fd, OwnedFd)]
        why = ""
        try:
            reply = await self._dispatch(message, fds)
        except DeviceError as refused:
            reply = build_error_reply(message, refused.errno)
            why = f" ({refused})"
        except Exception:
            self.internal_errors += 1
            log.exception("%s: internal error on %s", self.name, message.header.describe())
            reply = build_error_reply(message, errno.EINVAL)
        finally:
            close_all(fds)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: %s -> %s%s", self.name, message.describe(), reply.describe(), why)
        if not reply.fds:
            return reply
        try:
            if not message.header.no_reply:
                await self.endpoint.send(reply)
        finally:
            close_all(reply.fds)
        return None

    async def _dispatch(self, message: Message, fds: list[OwnedFd]) -> Message:
        header = message.header
        if not header.is_command:
            raise _refuse("not a command")
        if header.command == Command.VERSION:
            return self._version(message, fds)
        if self.client_caps is None:
            raise _refuse("VERSION must succeed before any other command")
        if isinstance(message.body, RawBody) or (
            header.size == HEADER_SIZE and header.command != Command.DEVICE_RESET
        ):
            raise _refuse("message does not decode (or has no payload)")
        if self.device.migration_state in _STOPPED and header.command not in _ALLOWED_WHEN_STOPPED:
            raise _refuse("command refused while the device is stopped")
        handler = self._handlers.get(header.command)
        if handler is None:
            raise _refuse(f"unsupported command {header.command_name}")
        return await handler(message, fds)

    # ----------------------------------------------------------- VERSION

    def _version(self, message: Message, fds: list[OwnedFd]) -> Message:
        """Accept what QEMU 10.2 (0.0) and libvfio-user's client (0.2) send.

        Like libvfio-user: EINVAL for fds, a payload under 4 bytes, major ≠ 0,
        JSON that is not NUL-terminated, does not parse or is not an object,
        capabilities of the wrong type, ``max_msg_fds`` outside 0..1024, a
        migration page size other than 4096, and for a second VERSION once
        one succeeded. Unlike libvfio-user, whose attach then fails, the
        connection stays open and the client may try again. The reply keeps
        major 0, lowers the minor to at most 2, and is in json-c's spacing.
        """
        if self.client_caps is not None:
            raise _refuse("VERSION was already negotiated")
        if fds:
            raise _refuse("VERSION carries no fds")
        body = _body(message, VersionBody)
        payload = body.serialize()
        if body.major != 0:
            raise _refuse(f"unsupported major version {body.major}")
        if len(payload) > VersionBody.FIXED.size and (payload[-1] != 0 or body.document is None):
            raise _refuse("VERSION JSON must be a NUL-terminated object")
        caps = body.capabilities or Capabilities()
        if not 0 <= caps.effective_max_msg_fds() <= CLIENT_MAX_MSG_FDS_LIMIT:
            raise _refuse(f"max_msg_fds {caps.max_msg_fds} outside 0..1024")
        if caps.migration is not None and caps.migration.pgsize not in (None, PAGE_SIZE):
            raise _refuse(f"migration page size {caps.migration.pgsize} is not {PAGE_SIZE}")
        self.client_caps = caps
        layout = self.options.client_dma_layout or detect_client_dma_layout(body)
        self.endpoint.dialects = Dialects(client=layout, server=DmaLayout.SPEC)
        log.info("%s: version 0.%d, client DMA layout %s", self.name, body.minor, layout.value)
        reply = VersionBody.build(
            0, min(body.minor, 2), server_capabilities(self.options), style="json-c"
        )
        return build_reply(message, reply)

    # ----------------------------------------------------------- device info

    async def _get_info(self, message: Message, fds: list[OwnedFd]) -> Message:
        if _body(message, DeviceInfoBody).argsz < DeviceInfoBody.FIXED.size:
            raise _refuse("argsz below 16")
        flags = DeviceFlags.RESET | DeviceFlags.PCI
        return build_reply(message, DeviceInfoBody(16, flags, NUM_REGIONS, len(IRQ_COUNTS)))

    async def _region_info(self, message: Message, fds: list[OwnedFd]) -> Message:
        """Region info as libvfio-user answers it.

        BAR2 has READ|WRITE|MMAP and a sparse-mmap capability with one area
        (its RAM; the MSI-X table and PBA are not mmap-able). The capability
        and the region fd (a fresh duplicate of the BAR2 memfd each time)
        come only when ``argsz`` covers them; a smaller ``argsz`` gets the
        short "ask again" reply: full ``argsz``, MMAP still set, no caps, no
        fd, zero-padded to ``min(argsz, full size)``. A client that accepts
        no fds (``max_msg_fds`` 0) is shown BAR2 as not mmap-able.
        """
        body = _body(message, RegionInfoBody)
        if body.argsz < RegionInfoBody.FIXED.size or body.index >= NUM_REGIONS:
            raise _refuse(f"bad region info request: index {body.index} argsz {body.argsz}")
        size = self.device.region_size(body.index)
        flags = _REGION_FLAGS.get(body.index, 0) if size else 0
        if body.index != Region.BAR2 or self.client_max_msg_fds < 1:
            return build_reply(message, RegionInfoBody.build(index=body.index, flags=flags,
                                                             size=size))
        area = SparseMmapCap((SparseMmapArea(0, L.BAR2_MMAP_SIZE),))
        info = RegionInfoBody.build(
            index=Region.BAR2, flags=flags | RegionFlags.MMAP, size=size, caps=(area,),
            argsz=body.argsz,
        )
        if not info.caps:
            padding = min(info.argsz, body.argsz) - RegionInfoBody.FIXED.size
            return build_reply(message, attrs.evolve(info, extra=bytes(padding)))
        return build_reply(message, info, fds=(self.device.bar2_fd.dup(),))

    async def _region_io_fds(self, message: Message, fds: list[OwnedFd]) -> Message:
        """No region has io fds: flags and count must be 0, the region must
        exist, argsz in 16..1 MiB (libvfio-user's checks); the reply lists none."""
        body = _body(message, RegionIoFdsBody)
        if body.flags or body.count or body.index >= NUM_REGIONS:
            raise _refuse("bad region io fds request")
        if not _REGION_FLAGS.get(body.index) or not 16 <= body.argsz <= MAX_DATA_XFER_SIZE:
            raise _refuse("region io fds of an absent region, or bad argsz")
        return build_reply(message, RegionIoFdsBody(16, 0, body.index, 0))

    async def _irq_info(self, message: Message, fds: list[OwnedFd]) -> Message:
        body = _body(message, IrqInfoBody)
        if body.argsz < IrqInfoBody.FIXED.size or body.index not in IRQ_COUNTS:
            raise _refuse(f"bad irq info request: index {body.index}")
        flags, count = IRQ_INFO_FLAGS[body.index], IRQ_COUNTS[body.index]
        return build_reply(message, IrqInfoBody(16, flags, body.index, count))

    async def _set_irqs(self, message: Message, fds: list[OwnedFd]) -> Message:
        """SET_IRQS with libvfio-user's checks; MASK/UNMASK with eventfds
        unmask at once and close the fds (no resample notifiers), as there."""
        body = _body(message, IrqSetBody)
        if body.argsz < IrqSetBody.FIXED.size:
            raise _refuse("argsz below 20")
        data = body.data + body.trailing
        self.device.set_irqs(body.flags, body.index, body.start, body.count, data, fds)
        return build_reply(message)

    # ----------------------------------------------------------- region access

    async def _region_access(self, message: Message, fds: list[OwnedFd]) -> Message:
        """REGION_READ / REGION_WRITE with libvfio-user's bounds.

        count > 1 MiB, a write whose data is not ``count`` bytes, an unknown
        region, ``offset+count`` beyond the region, access in STOP_COPY →
        EINVAL; count 0 → a header-only success reply. The doorbell's reply
        goes out only after the DMA and the interrupt. Config space takes
        accesses of any width and alignment (libvfio-user refuses some).
        """
        body = _body(message, RegionAccessBody)
        write = message.command == Command.REGION_WRITE
        if body.count > MAX_DATA_XFER_SIZE or (write and len(body.data) != body.count):
            raise _refuse("bad count")
        self.device.check_region_access(body.region, body.offset, body.count)
        if self.device.migration_state == MigrationState.STOP_COPY:
            raise _refuse("no region access in STOP_COPY")
        if not body.count:
            return build_reply(message)
        if write:
            await self.device.write_region(body.region, body.offset, body.data)
            return build_reply(message, RegionAccessBody(body.offset, body.region, body.count))
        data = self.device.read_region(body.region, body.offset, body.count)
        return build_reply(message, RegionAccessBody(body.offset, body.region, body.count, data))

    async def _write_multi(self, message: Message, fds: list[OwnedFd]) -> Message:
        """REGION_WRITE_MULTI, only when offered (``write_multiple``); every write
        is checked before any is done; the reply is the spec's ``wr_cnt``."""
        if not self.options.write_multiple:
            raise _refuse("REGION_WRITE_MULTI was not offered")
        body = _body(message, RegionWriteMultiBody)
        if body.wr_cnt != len(body.writes) or body.trailing or body.wr_cnt > MAX_MULTI_WRITES:
            raise _refuse("REGION_WRITE_MULTI count does not match its writes")
        for w in body.writes:
            if not 1 <= w.count <= len(w.data):
                raise _refuse(f"REGION_WRITE_MULTI write of {w.count} bytes")
            self.device.check_region_access(w.region, w.offset, w.count)
        for w in body.writes:
            await self.device.write_region(w.region, w.offset, w.data[: w.count])
        return build_reply(message, WriteMultiReplyBody(body.wr_cnt))

    # ----------------------------------------------------------- DMA windows

    async def _dma_map(self, message: Message, fds: list[OwnedFd]) -> Message:
        """DMA_MAP: the first fd backs the window, extra fds are closed (libvfio-user).
        Only READ/WRITE flags (libvfio-user's MMAP/FILE_IO extensions → EINVAL)."""
        body = _body(message, DmaMapBody)
        if body.argsz < DmaMapBody.FIXED.size:
            raise _refuse("argsz below 32")
        fd = fds.pop(0) if fds else None
        self.device.dma.map(iova=body.iova, size=body.size, offset=body.offset,
                            flags=body.flags, fd=fd)
        return build_reply(message)

    async def _dma_unmap(self, message: Message, fds: list[OwnedFd]) -> Message:
        """DMA_UNMAP: an exact window (ENOENT otherwise), ALL with iova = size = 0,
        or the legacy GET_DIRTY_BITMAP; the reply echoes the 24-byte request
        (plus the bitmap header and bitmap for GET_DIRTY_BITMAP)."""
        body = _body(message, DmaUnmapBody)
        bitmap = body.bitmap
        if body.flags not in (0, DmaUnmapFlags.ALL, DmaUnmapFlags.GET_DIRTY_BITMAP):
            raise _refuse(f"DMA_UNMAP flags {body.flags:#x}")
        if body.flags == DmaUnmapFlags.ALL and (body.iova or body.size):
            raise _refuse("UNMAP_ALL needs iova and size 0")
        least = DmaUnmapBody.FIXED.size
        if body.flags == DmaUnmapFlags.GET_DIRTY_BITMAP:
            if bitmap is None:
                raise _refuse("GET_DIRTY_BITMAP without its bitmap header")
            least += DmaUnmapBody.BITMAP.size + bitmap.size
        if not least <= body.argsz <= MAX_DATA_XFER_SIZE:
            raise _refuse(f"DMA_UNMAP argsz {body.argsz}")
        echo = DmaUnmapBody(body.argsz, body.flags, body.iova, body.size)
        dma = self.device.dma
        if body.flags == DmaUnmapFlags.ALL:
            dma.unmap_all()
            return build_reply(message, echo)
        if bitmap is not None:
            if dma.bitmap_size(body.size, bitmap.pgsize) != bitmap.size:
                raise _refuse("dirty bitmap size does not match the range")
            data = dma.report(body.iova, body.size, bitmap.pgsize)
            echo = attrs.evolve(echo, bitmap=DirtyBitmap(bitmap.pgsize, bitmap.size, data))
        dma.unmap(body.iova, body.size)
        return build_reply(message, echo)

    # ----------------------------------------------------------- reset, features

    async def _reset(self, message: Message, fds: list[OwnedFd]) -> Message:
        self.device.reset()
        return build_reply(message)

    async def _feature(self, message: Message, fds: list[OwnedFd]) -> Message:
        """DEVICE_FEATURE. An unknown feature or an operation the feature does
        not have → ENOTSUP (libvfio-user answers EINVAL there); no operation,
        or GET and SET without PROBE, or argsz below the reply → EINVAL.
        PROBE and SET echo the payload; a failed SET gets a header-only
        error reply (libvfio-user echoes the payload with it)."""
        body = _body(message, DeviceFeatureBody)
        supported = _FEATURE_OPS.get(body.feature)
        if supported is None or body.ops & ~int(supported):  # int: ~IntFlag drops unknown bits
            raise _refuse(f"feature {body.feature} ops {body.ops:#x} not supported", errno.ENOTSUP)
        if body.ops & FeatureOp.PROBE or body.ops == FeatureOp.SET:
            if body.argsz < DeviceFeatureBody.FIXED.size + len(body.data):
                raise _refuse("argsz below the payload")
            if body.ops == FeatureOp.SET:
                await self._feature_set(body)
            return build_reply(message, body)
        if body.ops == FeatureOp.GET:
            return build_reply(message, self._feature_get(body))
        raise _refuse("DEVICE_FEATURE needs exactly one of GET and SET, or PROBE")

    def _feature_get(self, body: DeviceFeatureBody) -> DeviceFeatureBody:
        if body.feature == Feature.DMA_LOGGING_REPORT:
            return self._dirty_report(body)
        if body.argsz < 16:
            raise _refuse("argsz below the 16-byte reply")
        if body.feature == Feature.MIGRATION:
            flags = MigrationFlags.STOP_COPY | MigrationFlags.PRE_COPY
            return DeviceFeatureBody.build(body.feature, FeatureOp.GET,
                                           MigrationFeatureData(flags))
        state = DeviceStateData(self.device.migration_state, 0)
        return DeviceFeatureBody.build(body.feature, FeatureOp.GET, state)

    def _dirty_report(self, body: DeviceFeatureBody) -> DeviceFeatureBody:
        request = body.feature_data
        if not isinstance(request, DmaLoggingReportData):
            raise _refuse("DMA_LOGGING_REPORT needs iova, length and page size")
        dma = self.device.dma
        size = dma.bitmap_size(request.length, request.page_size)
        if size > MAX_DATA_XFER_SIZE:
            raise _refuse("dirty bitmap larger than a message", errno.E2BIG)
        if body.argsz < DeviceFeatureBody.FIXED.size + 24 + size:
            raise _refuse("argsz below the reply with its bitmap")
        bitmap = dma.report(request.iova, request.length, request.page_size)
        data = DmaLoggingReportData(request.iova, request.length, request.page_size, bitmap)
        return DeviceFeatureBody.build(body.feature, FeatureOp.GET, data)

    async def _feature_set(self, body: DeviceFeatureBody) -> None:
        dma = self.device.dma
        if body.feature == Feature.DMA_LOGGING_STOP:
            dma.stop_logging()
            return
        data = body.feature_data  # None when too short for its feature
        if isinstance(data, DmaLoggingStartData):
            dma.start_logging(data.page_size)
            return
        if isinstance(data, DeviceStateData):
            await self.device.set_migration_state(data.device_state)
            return
        raise _refuse("feature data too short")

    # ----------------------------------------------------------- migration data

    async def _mig_data_read(self, message: Message, fds: list[OwnedFd]) -> Message:
        """MIG_DATA_READ: up to ``size`` bytes of the state stream (size ≤ the
        client's max_data_xfer_size, argsz ≥ 8 + size). The reply is as long
        as the data it carries: argsz = 8 + bytes, size = bytes; 0 bytes =
        end of stream (libvfio-user pads the message to the asked size)."""
        body = _body(message, MigDataBody)
        if body.size > self.client_max_data_xfer_size or body.argsz < 8 + body.size:
            raise _refuse("MIG_DATA_READ size above the limit or argsz")
        data = self.device.read_migration_data(body.size)
        return build_reply(message, MigDataBody(8 + len(data), len(data), data))

    async def _mig_data_write(self, message: Message, fds: list[OwnedFd]) -> Message:
        body = _body(message, MigDataBody)
        if body.size > self.client_max_data_xfer_size or body.argsz < 8 + body.size:
            raise _refuse("MIG_DATA_WRITE size above the limit or argsz")
        if len(body.data) < body.size:
            raise _refuse("MIG_DATA_WRITE shorter than its size")
        self.device.write_migration_data(body.data)
        return build_reply(message)

    # ----------------------------------------------------------- DMA by message

    def _chunks(self, iova: int, count: int) -> Iterator[tuple[int, int]]:
        limit = min(self.client_max_data_xfer_size, MAX_DATA_XFER_SIZE)
        if limit < 1:
            raise DmaFault(errno.EFAULT, "the client takes no DMA data (max_data_xfer_size 0)")
        for start in range(0, count, limit):
            yield iova + start, min(limit, count - start)

    async def _dma_request(self, command: int, body: DmaAccessBody) -> Any:
        try:
            return (await self.endpoint.request(command, body)).body
        except ErrorReplyError as refused:
            code = refused.errno if 0 < refused.errno < 4096 else errno.EIO
            raise DmaFault(code, f"client refused {refused.request.header.describe()}") from None
        except ReplyTimeoutError:
            raise DmaFault(errno.ETIMEDOUT, "client did not answer a DMA command") from None
        except ConnectionClosedError:
            raise DmaFault(errno.EIO, "client went away during DMA") from None

    async def dma_read(self, iova: int, count: int) -> bytes:
        """DMA_READ commands (spec layout), chunked to the client's max_data_xfer_size;
        the replies are read in the client's layout (QEMU's or the spec's)."""
        out = bytearray()
        for addr, n in self._chunks(iova, count):
            reply = await self._dma_request(Command.DMA_READ, DmaAccessBody(addr, n))
            if not isinstance(reply, DmaAccessBody) or (
                reply.address, reply.count, len(reply.data)) != (addr, n, n):
                raise DmaFault(errno.EIO, "DMA_READ reply does not match its command")
            out += reply.data
        return bytes(out)

    async def dma_write(self, iova: int, data: bytes) -> None:
        """DMA_WRITE commands in the **spec** layout (count u64, data at byte 32),
        as libvfio-user sends them, chunked to the client's max_data_xfer_size.

        Real QEMU 10.2 misreads this layout (protocol.md §2.12): it takes the
        count as a u32 at byte 24 and the data from byte 28, so the guest
        would get 4 zero bytes and then the data shifted by 4. We still send
        the spec layout: it is the protocol as specified and what every
        libvfio-user server sends, so the proxy and trace tools see the
        server dialect they expect, and QEMU only needs message DMA for
        windows without an fd (ROM and legacy areas), never for guest RAM.
        A reply may be header-only (QEMU) or echo address and count (spec).
        """
        for addr, n in self._chunks(iova, len(data)):
            piece = data[addr - iova : addr - iova + n]
            reply = await self._dma_request(Command.DMA_WRITE, DmaAccessBody(addr, n, piece))
            if not isinstance(reply, EmptyBody | DmaAccessBody) or (
                isinstance(reply, DmaAccessBody) and (reply.address, reply.count) != (addr, n)
            ):
                raise DmaFault(errno.EIO, "DMA_WRITE reply does not match its command")


class DeviceServer:
    """Listens on ``path`` and runs a :class:`ServerSession` per client, concurrently.

    ``sessions`` holds the live sessions (tests look at their devices).
    """

    def __init__(self, path: str | os.PathLike[str], *, options: DeviceOptions) -> None:
        self.path = os.fspath(path)
        self.options = options
        self.sessions: set[ServerSession] = set()
        self._accepted = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept clients until cancelled; then close every session and remove the socket.

        ``task_status.started()`` is called once the socket listens.
        """
        listener = await open_unix_listener(self.path)
        inode = os.stat(self.path).st_ino
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                log.info("serving the reference device on %s", self.path)
                while True:
                    stream = await listener.accept()
                    nursery.start_soon(self._serve_one, stream)
        finally:
            with trio.CancelScope(shield=True):
                await listener.aclose()
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == inode:
                    os.unlink(self.path)

    async def _serve_one(self, stream: trio.SocketStream) -> None:
        self._accepted += 1
        session = ServerSession(
            FdStream(stream.socket), options=self.options, name=f"session {self._accepted}"
        )
        self.sessions.add(session)
        try:
            await session.run()
        except Exception:
            log.exception("%s failed", session.name)  # never takes the other sessions down
        finally:
            self.sessions.discard(session)


async def serve_device(
    path: str | os.PathLike[str],
    *,
    options: DeviceOptions = DeviceOptions(),
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the reference device on the UNIX socket ``path`` until cancelled.

    Clients are served concurrently, each with its own device instance.
    ``task_status.started()`` once listening; on cancellation every session
    ends (its DMA mappings and eventfds released) and the socket file is removed.
    """
    await DeviceServer(path, options=options).serve(task_status=task_status)


@contextlib.asynccontextmanager
async def open_device_server(
    path: str | os.PathLike[str],
    *,
    options: DeviceOptions = DeviceOptions(),
) -> AsyncIterator[DeviceServer]:
    """A listening :class:`DeviceServer` for the duration of the ``async with`` (tests)."""
    server = DeviceServer(path, options=options)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield server
        nursery.cancel_scope.cancel()
