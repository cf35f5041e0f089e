"""Typed payloads ("bodies") of vfio-user messages, one class per layout.

Each class has ``parse(payload, ctx)`` and ``serialize()``, exact mirror
images: bytes a layout does not cover are kept (``trailing``/``extra``) so
``serialize(parse(p)) == p`` for any payload ``parse`` accepts. Decoded
sub-structures that live inside kept bytes (region-info capabilities, VERSION
JSON, device-feature data) are views computed from those bytes; use the
``build`` class methods to make a body from the view.
"""

from __future__ import annotations

import enum
import struct
from typing import ClassVar, Protocol, Self

import attrs

from vfioproxy.errors import LocalProtocolError, RemoteProtocolError
from vfioproxy.protocol.capabilities import (
    Capabilities,
    VersionJson,
    dump_version_json,
    parse_version_json,
)
from vfioproxy.protocol.constants import (
    FEATURE_INDEX_MASK,
    DeviceFlags,
    DmaMapFlags,
    DmaUnmapFlags,
    Feature,
    FeatureOp,
    IrqIndex,
    IrqInfoFlags,
    IrqSetFlags,
    MigrationFlags,
    MigrationState,
    RegionCapId,
    RegionFlags,
    enum_name,
    flag_names,
)
from vfioproxy.protocol.header import HEADER_SIZE

U64 = struct.Struct("<Q")


class DmaLayout(enum.Enum):
    """Layout of DMA_READ/DMA_WRITE bodies (protocol.md §2.11, §2.12, §7).

    ``SPEC``: address u64, count u64, data from payload offset 16 (the spec,
    libvfio-user). ``QEMU``: address u64, count u32, data from payload offset
    12 (QEMU 10.x's unpacked ``VFIOUserDMARW``; 4 bytes of padding follow).
    """

    SPEC = "spec"
    QEMU = "qemu"

    __hash__ = object.__hash__  # a singleton: identity hash (Enum's is Python code)


@attrs.frozen
class BodyContext:
    """What a body parser needs beyond its bytes.

    ``dma_layout`` is the layout the message's *sender* uses; ``request`` is
    the body of the command a reply answers, when known.
    """

    dma_layout: DmaLayout = DmaLayout.SPEC
    request: Body | None = None


DEFAULT_CONTEXT = BodyContext()

# flag bits the parsers test on every message, as plain ints: ``int & IntFlag``
# runs the flag class's Python ``__rand__``
_GET_DIRTY_BITMAP = int(DmaUnmapFlags.GET_DIRTY_BITMAP)
_CAPS = int(RegionFlags.CAPS)
_DATA_BOOL = int(IrqSetFlags.DATA_BOOL)


class Body(Protocol):
    """What every payload class offers."""

    def serialize(self) -> bytes: ...

    def summary(self) -> str: ...


def _need(
    payload: bytes, size: int, what: str, *, field: str = "size", offset: int = 4
) -> None:
    """Raise unless ``payload`` has ``size`` bytes; ``field``/``offset`` name the
    field whose value demanded them (by default the header's size)."""
    if len(payload) < size:
        raise RemoteProtocolError(
            f"payload too short for {what}",
            field=field,
            offset=offset,
            expected=f">= {HEADER_SIZE + size} bytes",
            got=HEADER_SIZE + len(payload),
        )


def _hexdata(data: bytes, limit: int = 16) -> str:
    text = data[:limit].hex()
    return text + ("…" if len(data) > limit else "")


def _extra(label: str, data: bytes) -> str:
    return f" +{len(data)}B {label}" if data else ""


# --------------------------------------------------------------------- generic


@attrs.frozen
class RawBody:
    """Bytes that were not (or could not be) decoded; ``reason`` says why."""

    data: bytes
    reason: str = ""

    def serialize(self) -> bytes:
        return self.data

    def summary(self) -> str:
        why = f" ({self.reason})" if self.reason else ""
        return f"raw {len(self.data)}B{why}"


@attrs.frozen
class EmptyBody:
    """A header-only message; bytes after the header, if any, stay in ``trailing``."""

    trailing: bytes = b""

    @classmethod
    def parse(cls, payload: bytes, ctx: BodyContext = DEFAULT_CONTEXT) -> Self:
        return cls(payload)

    def serialize(self) -> bytes:
        return self.trailing

    def summary(self) -> str:
        return f"+{len(self.trailing)}B" if self.trailing else "-"


@attrs.frozen
class ErrorBody:
    """Payload of an error reply (usually empty; libvfio-user may echo a reply)."""

    payload: bytes = b""

    @classmethod
    def parse(cls, payload: bytes, ctx: BodyContext = DEFAULT_CONTEXT) -> Self:
        return cls(payload)

    def serialize(self) -> bytes:
        return self.payload

    def summary(self) -> str:
        return f"payload {len(self.payload)}B" if self.payload else "-"


# --------------------------------------------------------------------- VERSION


@attrs.frozen
class VersionBody:
    """VERSION command and reply: ``major``, ``minor``, JSON text (NUL-terminated)."""

    major: int
    minor: int
    json_text: bytes = b""
    nul_terminated: bool = True
    trailing: bytes = b""
    document: VersionJson | None = attrs.field(default=None, eq=False)

    FIXED: ClassVar[struct.Struct] = struct.Struct("<HH")

    @classmethod
    def build(
        cls,
        major: int,
        minor: int,
        capabilities: Capabilities | None,
        *,
        style: str = "compact",
    ) -> Self:
        doc = VersionJson(capabilities)
        return cls(major, minor, dump_version_json(doc, style=style), True, b"", doc)

    @classmethod
    def parse(cls, payload: bytes, ctx: BodyContext = DEFAULT_CONTEXT) -> Self:
        _need(payload, 4, "VERSION")
        major, minor = cls.FIXED.unpack_from(payload)
        rest = payload[4:]
        nul = rest.find(b"\0")
        if nul < 0:
            text, terminated, trailing = rest, False, b""
        else:
            text, terminated, trailing = rest[:nul], True, rest[nul + 1 :]
        doc = parse_version_json(text) if text else None
        return cls(major, minor, text, terminated, trailing, doc)

    @property
    def capabilities(self) -> Capabilities | None:
        return None if self.document is None else self.document.capabilities

    def serialize(self) -> bytes:
        nul = b"\0" if self.nul_terminated else b""
        return self.FIXED.pack(self.major, self.minor) + self.json_text + nul + self.trailing

    def summary(self) -> str:
        text = self.json_text.decode("utf-8", "replace")
        return f"{self.major}.{self.minor} {text}" + _extra("trailing", self.trailing)


# --------------------------------------------------------------------- DMA map


@attrs.frozen
class DmaMapBody:
    """DMA_MAP command: a window of guest memory (fd in ancillary data, if any)."""

    argsz: int
    flags: int
    offset: int
    iova: int
    size: int
    trailing: bytes = b""

    FIXED: ClassVar[struct.Struct] = struct.Struct("<IIQQQ")

    @classmethod
    def parse(cls, payload: bytes, ctx: BodyContext = DEFAULT_CONTEXT) -> Self:
        _need(payload, cls.FIXED.size, "DMA_MAP")
        argsz, flags, offset, iova, size = cls.FIXED.unpack_from(payload)
        return cls(argsz, flags, offset, iova, size, payload[cls.FIXED.size :])

    def serialize(self) -> bytes:
        fixed = self.FIXED.pack(self.argsz, self.flags, self.offset, self.iova, self.size)
        return fixed + self.trailing

    def summary(self) -> str:
        end = self.iova + self.size
        return (
            f"iova [{self.iova:#x}, {end:#x}) size {self.size:#x} "
            f"{flag_names(DmaMapFlags, self.flags)} offset {self.offset:#x}"
            + _extra("trailing", self.trailing)
        )


@attrs.frozen
class DirtyBitmap:
    pgsize: int
    size: int
    data: bytes = b""


@attrs.frozen
class DmaUnmapBody:
    """DMA_UNMAP command and its echoed reply (legacy dirty bitmap included)."""

    argsz: int
    flags: int
    iova: int
    size: int
    bitmap: DirtyBitmap | None = None
    trailing: bytes = b""

    FIXED: ClassVar[struct.Struct] = struct.Struct("<IIQQ")
    BITMAP: ClassVar[struct.Struct] = struct.Struct("<QQ")

    @classmethod
    def parse(cls, payload: bytes, ctx: BodyContext = DEFAULT_CONTEXT) -> Self:
        _need(payload, cls.FIXED.size, "DMA_UNMAP")
        argsz, flags, iova, size = cls.FIXED.unpack_from(payload)
        pos = cls.FIXED.size
        bitmap = None
        if flags & _GET_DIRTY_BITMAP and len(payload) >= pos + cls.BITMAP.size:
            pgsize, bsize = cls.BITMAP.unpack_from(payload, pos)
            pos += cls.BITMAP.size
            data = payload[pos : pos + bsize]
            pos += len(data)
            bitmap = DirtyBitmap(pgsize, bsize, data)
        return cls(argsz, flags, iova, size, bitmap, payload[pos:])

    def serialize(self) -> bytes:
        out = self.FIXED.pack(self.argsz, self.flags, self.iova, self.size)
        if self.bitmap is not None:
            out += self.BITMAP.pack(self.bitmap.pgsize, self.bitmap.size) + self.bitmap.data
        return out + self.trailing

    def summary(self) -> str:
        text = (
            f"iova [{self.iova:#x}, {self.iova + self.size:#x}) size {self.size:#x} "
            f"flags {flag_names(DmaUnmapFlags, self.flags)}"
        )
        if self.bitmap is not None:
            text += f" bitmap pgsize {self.bitmap.pgsize:#x} {len(self.bitmap.data)}B"
        return text + _extra("trailing", self.trailing)


# --------------------------------------------------------------------- device info


@attrs.frozen
class DeviceInfoBody:
    """DEVICE_GET_INFO command and reply (``struct vfio_device_info``)."""

    argsz: int = 16
    flags: int = 0
    num_regions: int = 0
    num_irqs: int = 0
    trailing: bytes = b""

    FIXED: ClassVar[struct.Struct] = struct.Struct("<IIII")

    @classmethod
    def parse(cls, payload: bytes, ctx: BodyContext = DEFAULT_CONTEXT) -> Self:
        _need(payload, cls.FIXED.size, "DEVICE_GET_INFO")
        argsz, flags, num_regions, num_irqs = cls.FIXED.unpack_from(payload)
        return cls(argsz, flags, num_regions, num_irqs, payload[cls.FIXED.size :])

    def serialize(self) -> bytes:
        fixed = self.FIXED.pack(self.argsz, self.flags, self.num_regions, self.num_irqs)
        return fixed + self.trailing

    def summary(self) -> str:
        if not (self.flags or self.num_regions or self.num_irqs):
            return f"argsz {self.argsz}" + _extra("trailing", self.trailing)
        return (
            f"argsz {self.argsz} flags {flag_names(DeviceFlags, self.flags)} "
            f"regions {self.num_regions} irqs {self.num_irqs}" + _extra("trailing", self.trailing)
        )


# --------------------------------------------------------------------- region info


@attrs.frozen
class SparseMmapArea:
    offset: int
    size: int


@attrs.frozen
class SparseMmapCap:
    areas: tuple[SparseMmapArea, ...] = ()
    reserved: int = 0
    version: int = 1
    id: ClassVar[int] = RegionCapId.SPARSE_MMAP

    def describe(self) -> str:
        areas = ", ".join(f"[{a.offset:#x}+{a.size:#x}]" for a in self.areas)
        return f"sparse-mmap {areas}"


@attrs.frozen
class TypeCap:
    type: int
    subtype: int
    version: int = 1
    id: ClassVar[int] = RegionCapId.TYPE

    def describe(self) -> str:
        return f"type {self.type:#x}/{self.subtype:#x}"


@attrs.frozen
class MsixMappableCap:
    version: int = 1
    id: ClassVar[int] = RegionCapId.MSIX_MAPPABLE

    def describe(self) -> str:
        return "msix-mappable"


@attrs.frozen
class UnknownRegionCap:
    cap_id: int
    version: int
    data: bytes

    @property
    def id(self) -> int:
        return self.cap_id

    def describe(self) -> str:
        return f"cap {self.cap_id} v{self.version} {len(self.data)}B"


RegionCap = SparseMmapCap | TypeCap | MsixMappableCap | UnknownRegionCap

_CAP_HEADER = struct.Struct("<HHI")
_SPARSE_HEAD = struct.Struct("<II")
_AREA = struct.Struct("<QQ")
_TYPE = struct.Struct("<II")


def _parse_region_caps(payload: bytes, first: int) -> tuple[RegionCap, ...]:
    """Walk the capability chain starting at payload offset ``first``."""
    caps: list[RegionCap] = []
    seen: set[int] = set()
    pos = first
    link = HEADER_SIZE + 12  # where the pointer to ``pos`` sits: cap_offset, then cap.next
    while pos:
        if pos in seen:
            raise RemoteProtocolError(
                "region-info capability chain loops", field="cap.next", offset=link, got=pos
            )
        if pos < RegionInfoBody.FIXED.size:
            raise RemoteProtocolError(
                "region-info capability points into the fixed structure",
                field="cap.next" if caps else "cap_offset",
                offset=link,
                expected=">= 32",
                got=pos,
            )
        seen.add(pos)
        if pos + _CAP_HEADER.size > len(payload):
            if caps:  # a later cap cut off by a short reply: chain ends there
                break
            raise RemoteProtocolError(
                "region-info capability outside the payload",
                field="cap_offset",
                offset=HEADER_SIZE + 12,
                expected=f"<= {len(payload) - _CAP_HEADER.size}",
                got=pos,
            )
        cap_id, version, nxt = _CAP_HEADER.unpack_from(payload, pos)
        body = pos + _CAP_HEADER.size
        cap: RegionCap
        if cap_id == RegionCapId.SPARSE_MMAP:
            _need(payload, body + _SPARSE_HEAD.size, "sparse-mmap capability")
            nr, reserved = _SPARSE_HEAD.unpack_from(payload, body)
            start = body + _SPARSE_HEAD.size
            _need(
                payload, start + nr * _AREA.size, f"sparse-mmap capability with {nr} areas",
                field="cap.nr_areas", offset=HEADER_SIZE + body,
            )
            areas = tuple(
                SparseMmapArea(*_AREA.unpack_from(payload, start + i * _AREA.size))
                for i in range(nr)
            )
            cap = SparseMmapCap(areas, reserved, version)
        elif cap_id == RegionCapId.TYPE:
            _need(payload, body + _TYPE.size, "type capability")
            cap_type, subtype = _TYPE.unpack_from(payload, body)
            cap = TypeCap(cap_type, subtype, version)
        elif cap_id == RegionCapId.MSIX_MAPPABLE:
            cap = MsixMappableCap(version)
        else:
            end = nxt if nxt > pos else len(payload)
            cap = UnknownRegionCap(cap_id, version, payload[body:end])
        caps.append(cap)
        link = HEADER_SIZE + pos + 4
        pos = nxt
    return tuple(caps)


def _serialize_region_caps(caps: tuple[RegionCap, ...], start: int) -> bytes:
    """Lay ``caps`` out back to back from payload offset ``start``."""
    blobs = []
    for cap in caps:
        if isinstance(cap, SparseMmapCap):
            inner = _SPARSE_HEAD.pack(len(cap.areas), cap.reserved) + b"".join(
                _AREA.pack(a.offset, a.size) for a in cap.areas
            )
        elif isinstance(cap, TypeCap):
            inner = _TYPE.pack(cap.type, cap.subtype)
        elif isinstance(cap, MsixMappableCap):
            inner = b""
        else:
            inner = cap.data
        blobs.append((cap.id, cap.version, inner))
    out = b""
    pos = start
    for i, (cap_id, version, inner) in enumerate(blobs):
        size = _CAP_HEADER.size + len(inner)
        nxt = pos + size if i + 1 < len(blobs) else 0
        out += _CAP_HEADER.pack(cap_id, version, nxt) + inner
        pos += size
    return out


@attrs.frozen
class RegionInfoBody:
    """DEVICE_GET_REGION_INFO command and reply (``struct vfio_region_info``).

    ``extra`` holds every byte after the fixed 32 (capabilities, or a
    command's padding); ``caps`` is the capability chain decoded from them.
    """

    argsz: int
    flags: int = 0
    index: int = 0
    cap_offset: int = 0
    size: int = 0
    offset: int = 0
    extra: bytes = b""
    caps: tuple[RegionCap, ...] = attrs.field(default=(), eq=False)

    FIXED: ClassVar[struct.Struct] = struct.Struct("<IIIIQQ")

    @classmethod
    def request(cls, index: int, argsz: int = 32) -> Self:
        return cls(argsz, 0, index)

    @classmethod
    def build(
        cls,
        *,
        index: int,
        flags: int,
        size: int,
        offset: int = 0,
        caps: tuple[RegionCap, ...] = (),
        argsz: int | None = None,
    ) -> Self:
        """A full reply; ``argsz`` below the full size truncates it as servers do."""
        fixed = cls.FIXED.size
        extra = _serialize_region_caps(caps, fixed) if caps else b""
        need = fixed + len(extra)
        cap_offset = fixed if caps else 0
        flags = flags | RegionFlags.CAPS if caps else flags
        if argsz is not None and argsz < need:
            return cls(need, flags & ~int(RegionFlags.CAPS), index, 0, size, offset, b"", ())
        return cls(need, flags, index, cap_offset, size, offset, extra, caps)

    @classmethod
    def parse(cls, payload: bytes, ctx: BodyContext = DEFAULT_CONTEXT) -> Self:
        _need(payload, cls.FIXED.size, "DEVICE_GET_REGION_INFO")
        argsz, flags, index, cap_offset, size, offset = cls.FIXED.unpack_from(payload)
        caps: tuple[RegionCap, ...] = ()
        if flags & _CAPS and cap_offset:
            if cap_offset < cls.FIXED.size:
                raise RemoteProtocolError(
                    "cap_offset points into the fixed region-info structure",
                    field="cap_offset",
                    offset=HEADER_SIZE + 12,
                    expected=">= 32",
                    got=cap_offset,
                )
            if cap_offset < len(payload):  # else: a short reply without its caps
                caps = _parse_region_caps(payload, cap_offset)
        return cls(
            argsz, flags, index, cap_offset, size, offset, payload[cls.FIXED.size :], caps
        )

    def serialize(self) -> bytes:
        fixed = self.FIXED.pack(
            self.argsz, self.flags, self.index, self.cap_offset, self.size, self.offset
        )
        return fixed + self.extra

    def summary(self) -> str:
        if not (self.flags or self.cap_offset or self.size or self.offset):
            return f"index {self.index} argsz {self.argsz}" + _extra("padding", self.extra)
        text = (
            f"index {self.index} argsz {self.argsz} flags {flag_names(RegionFlags, self.flags)} "
            f"size {self.size:#x} offset {self.offset:#x}"
        )
        if self.caps:
            text += " caps: " + "; ".join(c.describe() for c in self.caps)
        elif self.extra:
            text += f" +{len(self.extra)}B"
        return text


# --------------------------------------------------------------------- region io fds


@attrs.frozen
class IoFdEntry:
    """One sub-region of a GET_REGION_IO_FDS reply (spec 40 or libvfio-user 48 bytes)."""

    offset: int
    size: int
    fd_index: int
    type: int
    flags: int
    shadow_mem_fd_index: int = 0
    shadow_offset: int = 0
    datamatch: int = 0


_IOFD_SPEC = struct.Struct("<QQIIIIQ")  # offset size fd_index type flags pad datamatch
_IOFD_LVU = struct.Struct("<QQIIIIQQ")  # ... shadow_mem_fd_index shadow_offset datamatch


@attrs.frozen
class RegionIoFdsBody:
    """DEVICE_GET_REGION_IO_FDS command and reply; entries decoded from ``extra``."""

    argsz: int
    flags: int = 0
    index: int = 0
    count: int = 0
    extra: bytes = b""
    entries: tuple[IoFdEntry, ...] = attrs.field(default=(), eq=False)
    entry_size: int = attrs.field(default=0, eq=False)

    FIXED: ClassVar[struct.Struct] = struct.Struct("<IIII")

    @classmethod
    def build(
        cls, *, index: int, entries: tuple[IoFdEntry, ...], entry_size: int = 48,
        argsz: int | None = None,
    ) -> Self:
        if entry_size == 48:
            blob = b"".join(
                _IOFD_LVU.pack(e.offset, e.size, e.fd_index, e.type, e.flags,
                               e.shadow_mem_fd_index, e.shadow_offset, e.datamatch)
                for e in entries
            )
        elif entry_size == 40:
            blob = b"".join(
                _IOFD_SPEC.pack(e.offset, e.size, e.fd_index, e.type, e.flags, 0, e.datamatch)
                for e in entries
            )
        else:
            raise ValueError("entry_size must be 40 (spec) or 48 (libvfio-user)")
        need = cls.FIXED.size + len(blob)
        if argsz is not None and argsz < need:
            return cls(need, 0, index, len(entries))
        return cls(need, 0, index, len(entries), blob, entries, entry_size)

    @classmethod
    def parse(cls, payload: bytes, ctx: BodyContext = DEFAULT_CONTEXT) -> Self:
        _need(payload, cls.FIXED.size, "DEVICE_GET_REGION_IO_FDS")
        argsz, flags, index, count = cls.FIXED.unpack_from(payload)
        extra = payload[cls.FIXED.size :]
        entries: tuple[IoFdEntry, ...] = ()
        size = 0
        if count and extra:
            if len(extra) == count * _IOFD_LVU.size:
                size = _IOFD_LVU.size
                entries = tuple(
                    IoFdEntry(*_IOFD_LVU.unpack_from(extra, i * size)) for i in range(count)
                )
            elif len(extra) == count * _IOFD_SPEC.size:
                size = _IOFD_SPEC.size
                entries = tuple(
                    _spec_entry(*_IOFD_SPEC.unpack_from(extra, i * size)) for i in range(count)
                )
        return cls(argsz, flags, index, count, extra, entries, size)

    def serialize(self) -> bytes:
        return self.FIXED.pack(self.argsz, self.flags, self.index, self.count) + self.extra

    def summary(self) -> str:
        text = f"index {self.index} argsz {self.argsz} count {self.count}"
        for e in self.entries:
            text += f" [{e.offset:#x}+{e.size:#x} fd#{e.fd_index} type {e.type}]"
        if self.extra and not self.entries:
            text += f" +{len(self.extra)}B"
        return text


def _spec_entry(
    offset: int, size: int, fd_index: int, type_: int, flags: int, _pad: int, datamatch: int
) -> IoFdEntry:
    return IoFdEntry(offset, size, fd_index, type_, flags, datamatch=datamatch)


# --------------------------------------------------------------------- IRQs


@attrs.frozen
class IrqInfoBody:
    """DEVICE_GET_IRQ_INFO command and reply (``struct vfio_irq_info``)."""

    argsz: int = 16
    flags: int = 0
    index: int = 0
    count: int = 0
    trailing: bytes = b""

    FIXED: ClassVar[struct.Struct] = struct.Struct("<IIII")

    @classmethod
    def parse(cls, payload: bytes, ctx: BodyContext = DEFAULT_CONTEXT) -> Self:
        _need(payload, cls.FIXED.size, "DEVICE_GET_IRQ_INFO")
        argsz, flags, index, count = cls.FIXED.unpack_from(payload)
        return cls(argsz, flags, index, count, payload[cls.FIXED.size :])

    def serialize(self) -> bytes:
        return self.FIXED.pack(self.argsz, self.flags, self.index, self.count) + self.trailing

    def summary(self) -> str:
        if not (self.flags or self.count):
            return enum_name(IrqIndex, self.index) + _extra("trailing", self.trailing)
        return (
            f"{enum_name(IrqIndex, self.index)} flags {flag_names(IrqInfoFlags, self.flags)} "
            f"count {self.count}" + _extra("trailing", self.trailing)
        )


@attrs.frozen
class IrqSetBody:
    """DEVICE_SET_IRQS command (``struct vfio_irq_set``); ``data`` holds BOOL bytes."""

    argsz: int
    flags: int
    index: int
    start: int
    count: int
    data: bytes = b""
    trailing: bytes = b""

    FIXED: ClassVar[struct.Struct] = struct.Struct("<IIIII")

    @classmethod
    def parse(cls, payload: bytes, ctx: BodyContext = DEFAULT_CONTEXT) -> Self:
        _need(payload, cls.FIXED.size, "DEVICE_SET_IRQS")
        argsz, flags, index, start, count = cls.FIXED.unpack_from(payload)
        pos = cls.FIXED.size
        data = payload[pos : pos + count] if flags & _DATA_BOOL else b""
        return cls(argsz, flags, index, start, count, data, payload[pos + len(data) :])

    def serialize(self) -> bytes:
        fixed = self.FIXED.pack(self.argsz, self.flags, self.index, self.start, self.count)
        return fixed + self.data + self.trailing

    def summary(self) -> str:
        text = (
            f"{enum_name(IrqIndex, self.index)} {flag_names(IrqSetFlags, self.flags)} "
            f"start {self.start} count {self.count}"
        )
        if self.data:
            text += f" bools {self.data.hex()}"
        return text + _extra("trailing", self.trailing)


# --------------------------------------------------------------------- region access


@attrs.frozen
class RegionAccessBody:
    """REGION_READ / REGION_WRITE command or reply: offset, region, count, data.

    ``data`` is every byte after the 16-byte head: the written bytes of a
    write command, the read bytes of a read reply, empty otherwise. A reply
    whose ``count`` differs from ``len(data)`` is kept as it came.
    """

    offset: int
    region: int
    count: int
    data: bytes = b""

    FIXED: ClassVar[struct.Struct] = struct.Struct("<QII")

    @classmethod
    def parse(cls, payload: bytes, ctx: BodyContext = DEFAULT_CONTEXT) -> Self:
        _need(payload, cls.FIXED.size, "region access")
        offset, region, count = cls.FIXED.unpack_from(payload)
        return cls(offset, region, count, payload[cls.FIXED.size :])

    def serialize(self) -> bytes:
        return self.FIXED.pack(self.offset, self.region, self.count) + self.data

    def summary(self) -> str:
        text = f"region {self.region} offset {self.offset:#x} count {self.count:#x}"
        if self.data:
            if len(self.data) <= 8:
                value = int.from_bytes(self.data, "little")
                text += f" = {value:#0{2 + 2 * len(self.data)}x}"
            else:
                text += f" data {_hexdata(self.data)} ({len(self.data)}B)"
        return text


@attrs.frozen
class DmaAccessBody:
    """DMA_READ / DMA_WRITE command or reply in one of two :class:`DmaLayout`.

    ``data`` is ``count`` bytes (fewer if the message is short); the rest of
    the payload (QEMU's 4 padding bytes, zero padding) is ``trailing``.
    """

    address: int
    count: int
    data: bytes = b""
    trailing: bytes = b""
    layout: DmaLayout = DmaLayout.SPEC

    SPEC_HEAD: ClassVar[struct.Struct] = struct.Struct("<QQ")
    QEMU_HEAD: ClassVar[struct.Struct] = struct.Struct("<QI")

    @classmethod
    def parse(cls, payload: bytes, ctx: BodyContext = DEFAULT_CONTEXT) -> Self:
        layout = ctx.dma_layout
        # a 12-byte payload is the spec table's DMA_WRITE reply: count u32
        if layout is DmaLayout.SPEC and len(payload) == cls.QEMU_HEAD.size:
            layout = DmaLayout.QEMU
        head = cls.SPEC_HEAD if layout is DmaLayout.SPEC else cls.QEMU_HEAD
        _need(payload, head.size, f"DMA access ({layout.value} layout)")
        address, count = head.unpack_from(payload)
        data = payload[head.size : head.size + count]
        return cls(address, count, data, payload[head.size + len(data) :], layout)

    def serialize(self) -> bytes:
        head = self.SPEC_HEAD if self.layout is DmaLayout.SPEC else self.QEMU_HEAD
        return head.pack(self.address, self.count) + self.data + self.trailing

    def summary(self) -> str:
        text = f"addr {self.address:#x} count {self.count:#x}"
        if self.data:
            text += f" data {_hexdata(self.data)}"
        if self.layout is DmaLayout.QEMU:
            text += " [qemu layout]"
        return text + _extra("trailing", self.trailing)


# --------------------------------------------------------------------- write multi


@attrs.frozen
class MultiWrite:
    offset: int
    region: int
    count: int
    data: bytes = bytes(8)


_MULTI_DATA = 8
_MULTI = struct.Struct("<QII8s")


@attrs.frozen
class RegionWriteMultiBody:
    """REGION_WRITE_MULTI command: ``wr_cnt`` writes of up to 8 bytes each."""

    wr_cnt: int
    writes: tuple[MultiWrite, ...] = ()
    trailing: bytes = b""

    @classmethod
    def parse(cls, payload: bytes, ctx: BodyContext = DEFAULT_CONTEXT) -> Self:
        _need(payload, U64.size, "REGION_WRITE_MULTI")
        (wr_cnt,) = U64.unpack_from(payload)
        fit = (len(payload) - U64.size) // _MULTI.size
        n = min(wr_cnt, fit)
        writes = tuple(
            MultiWrite(*_MULTI.unpack_from(payload, U64.size + i * _MULTI.size)) for i in range(n)
        )
        return cls(wr_cnt, writes, payload[U64.size + n * _MULTI.size :])

    def serialize(self) -> bytes:
        for i, w in enumerate(self.writes):
            if len(w.data) != _MULTI_DATA:
                raise LocalProtocolError(
                    f"REGION_WRITE_MULTI write {i} carries {len(w.data)} data bytes",
                    field=f"writes[{i}].data", expected=_MULTI_DATA, got=len(w.data),
                )
        out = U64.pack(self.wr_cnt) + b"".join(
            _MULTI.pack(w.offset, w.region, w.count, w.data) for w in self.writes
        )
        return out + self.trailing

    def summary(self) -> str:
        items = ", ".join(
            f"r{w.region}@{w.offset:#x}={int.from_bytes(w.data[: w.count], 'little'):#x}"
            for w in self.writes[:4]
        )
        more = f", … {len(self.writes) - 4} more" if len(self.writes) > 4 else ""
        return f"{self.wr_cnt} writes: {items}{more}" + _extra("trailing", self.trailing)


@attrs.frozen
class WriteMultiReplyBody:
    """REGION_WRITE_MULTI reply: ``wr_cnt`` writes completed."""

    wr_cnt: int
    trailing: bytes = b""

    @classmethod
    def parse(cls, payload: bytes, ctx: BodyContext = DEFAULT_CONTEXT) -> Self:
        _need(payload, U64.size, "REGION_WRITE_MULTI reply")
        return cls(U64.unpack_from(payload)[0], payload[U64.size :])

    def serialize(self) -> bytes:
        return U64.pack(self.wr_cnt) + self.trailing

    def summary(self) -> str:
        return f"{self.wr_cnt} done" + _extra("trailing", self.trailing)


# --------------------------------------------------------------------- device feature


@attrs.frozen
class MigrationFeatureData:
    flags: int

    def describe(self) -> str:
        return f"migration flags {flag_names(MigrationFlags, self.flags)}"


@attrs.frozen
class DeviceStateData:
    device_state: int
    data_fd: int

    def describe(self) -> str:
        fd = "none" if self.data_fd == 0xFFFFFFFF else str(self.data_fd)
        return f"state {enum_name(MigrationState, self.device_state)} data_fd {fd}"


@attrs.frozen
class DmaRange:
    iova: int
    length: int


@attrs.frozen
class DmaLoggingStartData:
    page_size: int
    num_ranges: int
    reserved: int = 0
    ranges: tuple[DmaRange, ...] = ()

    def describe(self) -> str:
        ranges = " ".join(f"[{r.iova:#x}+{r.length:#x}]" for r in self.ranges) or "all"
        return f"page_size {self.page_size:#x} ranges {ranges}"


@attrs.frozen
class DmaLoggingReportData:
    iova: int
    length: int
    page_size: int
    bitmap: bytes = b""

    def describe(self) -> str:
        text = f"iova {self.iova:#x} length {self.length:#x} page_size {self.page_size:#x}"
        if self.bitmap:
            text += f" bitmap {self.bitmap.hex()}"
        return text


FeatureData = MigrationFeatureData | DeviceStateData | DmaLoggingStartData | DmaLoggingReportData

_STATE = struct.Struct("<II")
_LOG_START = struct.Struct("<QII")
_LOG_REPORT = struct.Struct("<QQQ")


def _parse_feature_data(index: int, data: bytes) -> FeatureData | None:
    if index == Feature.MIGRATION and len(data) >= U64.size:
        return MigrationFeatureData(U64.unpack_from(data)[0])
    if index == Feature.MIG_DEVICE_STATE and len(data) >= _STATE.size:
        return DeviceStateData(*_STATE.unpack_from(data))
    if index == Feature.DMA_LOGGING_START and len(data) >= _LOG_START.size:
        page, nr, reserved = _LOG_START.unpack_from(data)
        fit = min(nr, (len(data) - _LOG_START.size) // _AREA.size)
        ranges = tuple(
            DmaRange(*_AREA.unpack_from(data, _LOG_START.size + i * _AREA.size))
            for i in range(fit)
        )
        return DmaLoggingStartData(page, nr, reserved, ranges)
    if index == Feature.DMA_LOGGING_REPORT and len(data) >= _LOG_REPORT.size:
        iova, length, page = _LOG_REPORT.unpack_from(data)
        return DmaLoggingReportData(iova, length, page, data[_LOG_REPORT.size :])
    return None


def serialize_feature_data(data: FeatureData) -> bytes:
    """Bytes of a feature's data, for building DEVICE_FEATURE bodies."""
    if isinstance(data, MigrationFeatureData):
        return U64.pack(data.flags)
    if isinstance(data, DeviceStateData):
        return _STATE.pack(data.device_state, data.data_fd)
    if isinstance(data, DmaLoggingStartData):
        return _LOG_START.pack(data.page_size, data.num_ranges, data.reserved) + b"".join(
            _AREA.pack(r.iova, r.length) for r in data.ranges
        )
    return _LOG_REPORT.pack(data.iova, data.length, data.page_size) + data.bitmap


@attrs.frozen
class DeviceFeatureBody:
    """DEVICE_FEATURE command and reply: argsz, flags (index | ops), feature data."""

    argsz: int
    flags: int
    data: bytes = b""
    feature_data: FeatureData | None = attrs.field(default=None, eq=False)

    FIXED: ClassVar[struct.Struct] = struct.Struct("<II")

    @classmethod
    def build(
        cls, feature: int, ops: int, data: FeatureData | bytes = b"", *, argsz: int | None = None
    ) -> Self:
        raw = data if isinstance(data, bytes) else serialize_feature_data(data)
        size = cls.FIXED.size + len(raw)
        flags = feature | ops
        return cls(size if argsz is None else argsz, flags, raw, _parse_feature_data(feature, raw))

    @classmethod
    def parse(cls, payload: bytes, ctx: BodyContext = DEFAULT_CONTEXT) -> Self:
        _need(payload, cls.FIXED.size, "DEVICE_FEATURE")
        argsz, flags = cls.FIXED.unpack_from(payload)
        data = payload[cls.FIXED.size :]
        index = flags & FEATURE_INDEX_MASK
        if not index and isinstance(ctx.request, DeviceFeatureBody):
            index = ctx.request.feature
        return cls(argsz, flags, data, _parse_feature_data(index, data))

    @property
    def feature(self) -> int:
        return self.flags & FEATURE_INDEX_MASK

    @property
    def ops(self) -> int:
        return self.flags & ~FEATURE_INDEX_MASK

    def serialize(self) -> bytes:
        return self.FIXED.pack(self.argsz, self.flags) + self.data

    def summary(self) -> str:
        text = (
            f"{enum_name(Feature, self.feature)} {flag_names(FeatureOp, self.ops)} "
            f"argsz {self.argsz}"
        )
        if self.feature_data is not None:
            text += " " + self.feature_data.describe()
        elif self.data:
            text += f" data {_hexdata(self.data)}"
        return text


# --------------------------------------------------------------------- migration data


@attrs.frozen
class MigDataBody:
    """MIG_DATA_READ / MIG_DATA_WRITE: argsz, size, ``size`` data bytes, padding."""

    argsz: int
    size: int
    data: bytes = b""
    trailing: bytes = b""

    FIXED: ClassVar[struct.Struct] = struct.Struct("<II")

    @classmethod
    def parse(cls, payload: bytes, ctx: BodyContext = DEFAULT_CONTEXT) -> Self:
        _need(payload, cls.FIXED.size, "migration data")
        argsz, size = cls.FIXED.unpack_from(payload)
        pos = cls.FIXED.size
        data = payload[pos : pos + size]
        return cls(argsz, size, data, payload[pos + len(data) :])

    def serialize(self) -> bytes:
        return self.FIXED.pack(self.argsz, self.size) + self.data + self.trailing

    def summary(self) -> str:
        text = f"argsz {self.argsz:#x} size {self.size:#x}"
        if self.data:
            text += f" data {_hexdata(self.data)}"
        return text + _extra("padding", self.trailing)
