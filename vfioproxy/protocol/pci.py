"""PCI meaning of vfio-user regions and of config-space (region 7) accesses.

Pure and stateless: region names, the type-0 header register table, the
capability walk (standard list from 0x34, PCIe extended list from 0x100),
value decoders for display, BAR/ROM sizing arithmetic, and
:func:`describe_config_access`, which turns one REGION_READ/REGION_WRITE on
region 7 into a line such as ``cfg RD4 @0x30 ROM BAR = 0xfffc0000 → ROM size
256 KiB``. The one stateful companion is :class:`vfioproxy.protocol.pci_view.PciView`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence

import attrs

# --------------------------------------------------------------------------
# Regions


class Region(enum.IntEnum):
    """vfio-user PCI region indexes (protocol.md §2.19); 9 and up are device-specific."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


def region_name(index: int) -> str:
    """Name of a region index: ``BAR0``…``BAR5``, ``ROM``, ``CONFIG``, ``VGA``, ``REGION<n>``."""
    try:
        return Region(index).name
    except ValueError:
        return f"REGION{index}"


# --------------------------------------------------------------------------
# Config-space layout constants

CONFIG_SIZE = 256
EXT_CONFIG_SIZE = 4096
HEADER_SIZE = 0x40

COMMAND_REGISTER = 0x04
STATUS = 0x06
BAR0_OFFSET = 0x10
BAR_COUNT = 6
ROM_BAR = 0x30
CAP_PTR = 0x34
INTERRUPT_PIN = 0x3D
EXT_CAP_START = 0x100

#: status bit: the capability list at 0x34 is valid
STATUS_CAP_LIST = 0x10
#: the address bits of the expansion ROM BAR
ROM_ADDRESS_MASK = 0xFFFFF800
#: the enable bit of the expansion ROM BAR
ROM_ENABLE = 0x1


def bar_offset(index: int) -> int:
    """Config offset of BAR ``index`` (0…5)."""
    return BAR0_OFFSET + 4 * index


def bar_index(offset: int) -> int | None:
    """Index (0…5) of the BAR register at config ``offset``, ``None`` for any other offset."""
    if BAR0_OFFSET <= offset < bar_offset(BAR_COUNT) and offset % 4 == 0:
        return (offset - BAR0_OFFSET) // 4
    return None


# --------------------------------------------------------------------------
# Value decoders (text without surrounding parentheses)

_COMMAND_BITS = (
    (0x001, "IO"),
    (0x002, "MEM"),
    (0x004, "BUS_MASTER"),
    (0x008, "SPECIAL"),
    (0x010, "MWI"),
    (0x020, "VGA_SNOOP"),
    (0x040, "PARITY"),
    (0x080, "WAIT"),
    (0x100, "SERR"),
    (0x200, "FAST_B2B"),
    (0x400, "INTX_DISABLE"),
)

_STATUS_BITS = (
    (0x0008, "INTX"),
    (0x0010, "CAP_LIST"),
    (0x0020, "66MHZ"),
    (0x0080, "FAST_B2B"),
    (0x0100, "MASTER_PARITY_ERROR"),
    (0x0800, "SIG_TARGET_ABORT"),
    (0x1000, "RCVD_TARGET_ABORT"),
    (0x2000, "RCVD_MASTER_ABORT"),
    (0x4000, "SIG_SYSTEM_ERROR"),
    (0x8000, "DETECTED_PARITY_ERROR"),
)


def _flags(value: int, table: tuple[tuple[int, str], ...]) -> str:
    names = [name for bit, name in table if value & bit]
    rest = value & ~sum(bit for bit, _ in table)
    if rest:
        names.append(f"{rest:#x}")
    return "|".join(names) or "none"


def decode_command(value: int) -> str:
    """Command register bits, e.g. ``IO|MEM|SERR`` (``none`` when 0)."""
    return _flags(value, _COMMAND_BITS)


def decode_status(value: int) -> str:
    """Status register flag bits, e.g. ``CAP_LIST`` (DEVSEL timing bits not shown)."""
    return _flags(value & ~0x0600, _STATUS_BITS)


def decode_header_type(value: int) -> str:
    """Header type byte: layout (``normal``, ``bridge``, ``CardBus``) and the multi-function bit."""
    layout = {0: "normal", 1: "bridge", 2: "CardBus"}.get(value & 0x7F, f"type {value & 0x7F:#x}")
    return layout + ", multi-function" if value & 0x80 else layout


def decode_interrupt_pin(value: int) -> str:
    """Interrupt pin: ``none``, ``INTA#``…``INTD#``, or ``invalid``."""
    if value == 0:
        return "none"
    return f"INT{'ABCD'[value - 1]}#" if 1 <= value <= 4 else "invalid"


def decode_interrupt_line(value: int) -> str:
    """Interrupt line byte as the firmware routed it (0xff: not routed)."""
    return "not routed" if value == 0xFF else f"IRQ {value}"


class BarKind(enum.Enum):
    """What a BAR register decodes as; ``MEM64_HIGH`` is the upper half of a 64-bit BAR."""

    IO = "I/O"
    MEM32 = "mem32"
    MEM64 = "mem64"
    MEM64_HIGH = "mem64 upper half"
    ROM = "ROM"


def bar_kind(value: int) -> BarKind:
    """Kind of a BAR from its read-only low bits (bit 0 I/O, bits 2:1 == 2 for 64-bit)."""
    if value & 0x1:
        return BarKind.IO
    return BarKind.MEM64 if (value >> 1) & 0x3 == 0x2 else BarKind.MEM32


def bar_kinds(values: Sequence[int | None]) -> tuple[BarKind | None, ...]:
    """Kinds of the six BARs from their register values (``None``: not known).

    A 64-bit BAR makes the next register its ``MEM64_HIGH`` half.
    """
    kinds: list[BarKind | None] = []
    for value in values[:BAR_COUNT]:
        if kinds and kinds[-1] is BarKind.MEM64:
            kinds.append(BarKind.MEM64_HIGH)
        else:
            kinds.append(None if value is None else bar_kind(value))
    return tuple(kinds)


def config_bar_kinds(
    config: bytes | bytearray, known: bytes | bytearray | None = None
) -> tuple[BarKind | None, ...]:
    """Kinds of the six BARs of a config-space image: a BAR whose four bytes
    the image lacks (or, with ``known``, a map of the bytes read, has not
    all read) is not known."""
    values: list[int | None] = []
    for index in range(BAR_COUNT):
        start = bar_offset(index)
        chunk = config[start : start + 4]
        whole = len(chunk) == 4 and (known is None or all(known[start : start + 4]))
        values.append(int.from_bytes(chunk, "little") if whole else None)
    return bar_kinds(values)


def bar_address(value: int, kind: BarKind) -> int:
    """The address bits of a BAR or ROM BAR value of the given kind."""
    if kind is BarKind.IO:
        return value & ~0x3
    if kind is BarKind.ROM:
        return value & ROM_ADDRESS_MASK
    if kind is BarKind.MEM64_HIGH:
        return value
    return value & ~0xF


def decode_bar_type(value: int) -> str:
    """The type a BAR value's low bits give: ``I/O``, ``mem32``, ``mem64, prefetchable``."""
    kind = bar_kind(value)
    if kind is not BarKind.IO and value & 0x8:
        return f"{kind.value}, prefetchable"
    return kind.value


def decode_bar(value: int, kind: BarKind | None = None) -> str:
    """A BAR value for display, e.g. ``mem32``, ``mem64, prefetchable, address 0xfebf8000``.

    Without ``kind`` the type comes from the value's own low bits (a read);
    with it (a write, whose low bits the device ignores) ``kind`` is used and
    no prefetchable flag is shown. A non-zero address is shown when it
    differs from the raw value.
    """
    text = decode_bar_type(value) if kind is None else kind.value
    address = bar_address(value, kind or bar_kind(value))
    return f"{text}, address {address:#x}" if address not in (0, value) else text


def decode_rom_bar(value: int) -> str:
    """Expansion ROM BAR: enable bit and address."""
    text = "enabled" if value & ROM_ENABLE else "disabled"
    address = value & ROM_ADDRESS_MASK
    return f"{text}, address {address:#x}" if address else text


def msix_vectors(msg_ctl: int) -> int:
    """The MSI-X table size from message control (N−1 encoded in bits 10:0)."""
    return (msg_ctl & 0x7FF) + 1


def msix_location(value: int) -> tuple[int, int]:
    """(BAR indicator, offset) of an MSI-X table or PBA register (BIR in bits 2:0)."""
    return value & 0x7, value & ~0x7


def msix_pba_size(vectors: int) -> int:
    """Bytes of the MSI-X PBA: one bit per vector, in 64-bit words."""
    return -(-vectors // 64) * 8


def decode_msix_msg_ctl(value: int) -> str:
    """MSI-X message control: table size (N−1 encoded), enable, function mask."""
    vectors = msix_vectors(value)
    text = f"{vectors} vector{'s' if vectors != 1 else ''}, "
    text += "enabled" if value & 0x8000 else "disabled"
    return text + ", function masked" if value & 0x4000 else text


def decode_msix_bir_offset(value: int) -> str:
    """MSI-X table or PBA register: BAR indicator (bits 2:0) plus offset, e.g. ``BAR3 + 0x2000``."""
    bir, offset = msix_location(value)
    where = f"BAR{bir}" if bir < BAR_COUNT else f"BIR {bir} (reserved)"
    return f"{where} + {offset:#x}"


def decode_msi_msg_ctl(value: int) -> str:
    """MSI message control: enable, vectors capable/enabled, 64-bit, per-vector masking."""
    parts = [
        "enabled" if value & 0x1 else "disabled",
        f"{1 << ((value >> 1) & 0x7)} vector(s) capable",
        f"{1 << ((value >> 4) & 0x7)} enabled",
    ]
    if value & 0x80:
        parts.append("64-bit")
    if value & 0x100:
        parts.append("per-vector masking")
    return ", ".join(parts)


def decode_pmc(value: int) -> str:
    """PM capabilities register: the PM spec version."""
    return f"version {value & 0x7}"


def decode_pmcsr(value: int) -> str:
    """PM control/status: the D-state and the No_Soft_Reset, PME_En, PME_Status bits."""
    parts = [("D0", "D1", "D2", "D3hot")[value & 0x3]]
    if value & 0x8:
        parts.append("No_Soft_Reset")
    if value & 0x100:
        parts.append("PME_En")
    if value & 0x8000:
        parts.append("PME_Status")
    return ", ".join(parts)


_PCIE_PORT_TYPES = {
    0x0: "endpoint",
    0x1: "legacy endpoint",
    0x4: "root port",
    0x5: "switch upstream port",
    0x6: "switch downstream port",
    0x7: "PCIe-to-PCI bridge",
    0x8: "PCI-to-PCIe bridge",
    0x9: "RC integrated endpoint",
    0xA: "RC event collector",
}


def decode_pcie_flags(value: int) -> str:
    """PCIe capabilities register: version and device/port type."""
    port = _PCIE_PORT_TYPES.get((value >> 4) & 0xF, f"type {(value >> 4) & 0xF}")
    return f"v{value & 0xF}, {port}"


def format_size(size: int) -> str:
    """A byte count in the largest binary unit that divides it: ``256 KiB``, ``4 GiB``."""
    for shift, unit in ((40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size} B"


# --------------------------------------------------------------------------
# BAR and ROM sizing


def is_sizing_write(offset: int, size: int, value: int) -> bool:
    """Whether a config write is a BAR or ROM sizing write.

    A BAR register (0x10…0x24) takes all ones (0xffffffff); the ROM BAR
    (0x30) takes any value with all address bits set (QEMU and SeaBIOS write
    0xfffff800, SeaBIOS's option-ROM loader 0xfffffffe).
    """
    if size != 4:
        return False
    if offset == ROM_BAR:
        return value & ROM_ADDRESS_MASK == ROM_ADDRESS_MASK
    return bar_index(offset) is not None and value == 0xFFFFFFFF


def bar_size_from_mask(value: int, kind: BarKind, *, upper: int | None = None) -> int:
    """Size in bytes decoded from the value read back after a sizing write; 0: not implemented.

    ``kind`` is ``IO`` (address bits 31:2; a 16-bit decoder reading 0 in the
    upper half counts as all ones), ``MEM32``/``MEM64`` (bits 31:4) or ``ROM``
    (bits 31:11). For ``MEM64``, ``upper`` is the mask read back from the
    upper register; ``None`` assumes all ones (a size below 4 GiB).
    ``MEM64_HIGH`` raises :class:`ValueError`: size the lower half with ``upper``.
    """
    value &= 0xFFFFFFFF
    if kind is BarKind.IO:
        mask = value & 0xFFFFFFFC
        if mask and not mask & 0xFFFF0000:
            mask |= 0xFFFF0000
    elif kind is BarKind.ROM:
        mask = value & ROM_ADDRESS_MASK
    elif kind is BarKind.MEM32:
        mask = value & 0xFFFFFFF0
    elif kind is BarKind.MEM64:
        high = 0xFFFFFFFF if upper is None else upper & 0xFFFFFFFF
        mask = high << 32 | value & 0xFFFFFFF0
    else:
        raise ValueError("size a 64-bit BAR from its lower half, passing upper=")
    return mask & -mask


# --------------------------------------------------------------------------
# Capabilities


class CapId(enum.IntEnum):
    """Standard capability ids this module names fields for."""

    PM = 0x01
    MSI = 0x05
    VENDOR = 0x09
    PCIE = 0x10
    MSIX = 0x11


class ExtCapId(enum.IntEnum):
    """PCIe extended capability ids this module names fields for."""

    AER = 0x0001
    DSN = 0x0003


_STD_CAP_NAMES = {
    0x01: "PM", 0x02: "AGP", 0x03: "VPD", 0x04: "SlotID", 0x05: "MSI", 0x06: "CHSWP",
    0x07: "PCI-X", 0x08: "HT", 0x09: "Vendor", 0x0A: "Debug", 0x0B: "CCRC", 0x0C: "SHPC",
    0x0D: "SSVID", 0x0E: "AGP3", 0x0F: "Secure", 0x10: "PCIe", 0x11: "MSI-X", 0x12: "SATA",
    0x13: "AF", 0x14: "EA", 0x15: "FPB",
}  # fmt: skip

_EXT_CAP_NAMES = {
    0x01: "AER", 0x02: "VC", 0x03: "DSN", 0x04: "PWR", 0x05: "RCLD", 0x06: "RCILC",
    0x07: "RCEC", 0x08: "MFVC", 0x09: "VC9", 0x0A: "RCRB", 0x0B: "VSEC", 0x0C: "CAC",
    0x0D: "ACS", 0x0E: "ARI", 0x0F: "ATS", 0x10: "SR-IOV", 0x11: "MR-IOV", 0x12: "MCAST",
    0x13: "PRI", 0x15: "ReBAR", 0x16: "DPA", 0x17: "TPH", 0x18: "LTR", 0x19: "SecPCIe",
    0x1B: "PASID", 0x1D: "DPC", 0x1E: "L1SS", 0x1F: "PTM", 0x23: "DVSEC", 0x25: "DLF",
    0x26: "PL16GT",
}  # fmt: skip


def capability_name(cap_id: int, *, extended: bool = False) -> str:
    """Short name of a capability id, e.g. ``MSI-X``, ``AER``; ``cap-0x42``/``ecap-0x0042``."""
    if extended:
        return _EXT_CAP_NAMES.get(cap_id, f"ecap-{cap_id:#06x}")
    return _STD_CAP_NAMES.get(cap_id, f"cap-{cap_id:#04x}")


@attrs.frozen
class Field:
    """One named register: ``offset`` relative to its capability, ``size`` in bytes."""

    offset: int
    size: int
    name: str


@attrs.frozen(cache_hash=True)  # a key of the display filter's register-name cache
class Capability:
    """One capability found by :func:`walk_capabilities`.

    ``length`` is ``None`` when the layout is not known (then only the header
    fields are named). A walk that had to stop early ends with an entry whose
    ``broken`` says why (``cap_id`` -1, ``name`` ``broken``, ``offset`` the bad
    pointer, length 0).
    """

    cap_id: int
    name: str
    offset: int
    extended: bool = False
    length: int | None = None
    fields: tuple[Field, ...] = ()
    broken: str | None = None

    @property
    def label(self) -> str:
        """``MSI-X[0xa0]``: name and offset, the prefix of its field names."""
        return f"{self.name}[{self.offset:#x}]"

    @property
    def span(self) -> int:
        """Bytes this capability is known to cover (its header when the length is unknown)."""
        if self.length is not None:
            return self.length
        return 4 if self.extended else 2

    def contains(self, offset: int) -> bool:
        """Whether config ``offset`` lies inside this capability."""
        return self.offset <= offset < self.offset + self.span

    def field_at(self, offset: int) -> Field | None:
        """The field that config ``offset`` falls in (offsets in the result are relative)."""
        rel = offset - self.offset
        for field in self.fields:
            if field.offset <= rel < field.offset + field.size:
                return field
        return None

    def field_name(self, offset: int) -> str | None:
        """``MSI-X[0xa0].msg_ctl`` for an offset inside this capability, else ``None``.

        An offset inside a field but not at its start gets a byte index
        (``PCIe[0xe0].devcap[2]``); an unnamed byte gets ``label+0x<rel>``.
        """
        if not self.contains(offset):
            return None
        field = self.field_at(offset)
        if field is None:
            return f"{self.label}+{offset - self.offset:#x}"
        inner = offset - self.offset - field.offset
        return f"{self.label}.{field.name}" + (f"[{inner}]" if inner else "")


def _layout(fields: Sequence[tuple[int, str]], end: int) -> tuple[Field, ...]:
    """Fields from (offset, name) pairs, each running to the next offset (the last to ``end``)."""
    bounds = [offset for offset, _ in fields[1:]] + [end]
    return tuple(
        Field(off, nxt - off, name) for (off, name), nxt in zip(fields, bounds, strict=True)
    )


_STD_HEADER = ((0x0, "cap_id"), (0x1, "next"))
_PM_FIELDS = _layout(
    (*_STD_HEADER, (0x2, "pmc"), (0x4, "pmcsr"), (0x6, "pmcsr_bse"), (0x7, "data")), 0x8
)
_MSIX_FIELDS = _layout((*_STD_HEADER, (0x2, "msg_ctl"), (0x4, "table"), (0x8, "pba")), 0xC)
_PCIE_FIELDS = _layout(
    (
        *_STD_HEADER,
        (0x02, "flags"), (0x04, "devcap"), (0x08, "devctl"), (0x0A, "devsta"),
        (0x0C, "lnkcap"), (0x10, "lnkctl"), (0x12, "lnksta"), (0x14, "sltcap"),
        (0x18, "sltctl"), (0x1A, "sltsta"), (0x1C, "rootctl"), (0x1E, "rootcap"),
        (0x20, "rootsta"), (0x24, "devcap2"), (0x28, "devctl2"), (0x2A, "devsta2"),
        (0x2C, "lnkcap2"), (0x30, "lnkctl2"), (0x32, "lnksta2"), (0x34, "sltcap2"),
        (0x38, "sltctl2"), (0x3A, "sltsta2"),
    ),
    0x3C,
)  # fmt: skip
_AER_FIELDS = _layout(
    (
        (0x00, "header"), (0x04, "uncor_status"), (0x08, "uncor_mask"),
        (0x0C, "uncor_severity"), (0x10, "cor_status"), (0x14, "cor_mask"),
        (0x18, "cap_ctl"), (0x1C, "header_log"), (0x2C, "root_cmd"),
        (0x30, "root_status"), (0x34, "error_source"),
    ),
    0x38,
)  # fmt: skip
_DSN_FIELDS = _layout(((0x0, "header"), (0x4, "serial_lo"), (0x8, "serial_hi")), 0xC)


def _msi_layout(msg_ctl: int) -> tuple[Field, ...]:
    """MSI fields; the layout depends on the 64-bit (0x80) and per-vector mask (0x100) bits."""
    is64, masked = bool(msg_ctl & 0x80), bool(msg_ctl & 0x100)
    fields: list[tuple[int, str]] = [*_STD_HEADER, (0x2, "msg_ctl"), (0x4, "msg_addr_lo")]
    if is64:
        fields.append((0x8, "msg_addr_hi"))
    data = 0xC if is64 else 0x8
    fields.append((data, "msg_data"))
    if not masked:
        return _layout(fields, data + 2)
    fields += [(data + 2, "reserved"), (data + 4, "mask_bits"), (data + 8, "pending_bits")]
    return _layout(fields, data + 12)


def _u16(config: bytes, offset: int) -> int:
    return int.from_bytes(config[offset : offset + 2], "little")


def _u32(config: bytes, offset: int) -> int:
    return int.from_bytes(config[offset : offset + 4], "little")


def _std_capability(config: bytes, offset: int) -> Capability:
    cap_id = config[offset]
    name = capability_name(cap_id)
    fields: tuple[Field, ...] = _layout(_STD_HEADER, 2)
    length: int | None = None
    if cap_id == CapId.PM:
        fields, length = _PM_FIELDS, 0x8
    elif cap_id == CapId.MSIX:
        fields, length = _MSIX_FIELDS, 0xC
    elif cap_id == CapId.PCIE:
        fields, length = _PCIE_FIELDS, 0x3C
    elif cap_id == CapId.MSI and offset + 4 <= len(config):
        fields = _msi_layout(_u16(config, offset + 2))
        length = fields[-1].offset + fields[-1].size
    elif cap_id == CapId.VENDOR and offset + 3 <= len(config) and config[offset + 2] >= 3:
        length = config[offset + 2]
        body = [(0x3, "data")] if length > 3 else []
        fields = _layout([*_STD_HEADER, (0x2, "length"), *body], length)
    return Capability(cap_id, name, offset, extended=False, length=length, fields=fields)


def _ext_capability(cap_id: int, offset: int) -> Capability:
    name = capability_name(cap_id, extended=True)
    if cap_id == ExtCapId.AER:
        return Capability(cap_id, name, offset, extended=True, length=0x38, fields=_AER_FIELDS)
    if cap_id == ExtCapId.DSN:
        return Capability(cap_id, name, offset, extended=True, length=0xC, fields=_DSN_FIELDS)
    return Capability(cap_id, name, offset, extended=True, fields=_layout(((0, "header"),), 4))


def _broken(offset: int, reason: str, *, extended: bool) -> Capability:
    return Capability(-1, "broken", offset, extended=extended, length=0, broken=reason)


def _walk_standard(config: bytes) -> list[Capability]:
    if len(config) < HEADER_SIZE or not _u16(config, STATUS) & STATUS_CAP_LIST:
        return []
    limit = min(len(config), CONFIG_SIZE)
    caps: list[Capability] = []
    seen: set[int] = set()
    ptr = config[CAP_PTR]
    while ptr:
        if ptr < HEADER_SIZE:
            caps.append(_broken(ptr, f"pointer {ptr:#x} is inside the header", extended=False))
            break
        if ptr + 2 > limit:
            reason = f"pointer {ptr:#x} is past the {limit} bytes known"
            caps.append(_broken(ptr, reason, extended=False))
            break
        if ptr in seen:
            caps.append(_broken(ptr, f"loop back to {ptr:#x}", extended=False))
            break
        seen.add(ptr)
        caps.append(_std_capability(config, ptr))
        ptr = config[ptr + 1]
    return caps


def _walk_extended(config: bytes) -> list[Capability]:
    if len(config) < EXT_CONFIG_SIZE:
        return []
    caps: list[Capability] = []
    seen: set[int] = set()
    ptr = EXT_CAP_START
    while ptr:
        if ptr < EXT_CAP_START:
            caps.append(_broken(ptr, f"pointer {ptr:#x} is below 0x100", extended=True))
            break
        if ptr in seen:
            caps.append(_broken(ptr, f"loop back to {ptr:#x}", extended=True))
            break
        header = _u32(config, ptr)
        if header in (0, 0xFFFFFFFF):
            break
        seen.add(ptr)
        caps.append(_ext_capability(header & 0xFFFF, ptr))
        ptr = (header >> 20) & 0xFFC
    return caps


def walk_capabilities(config: bytes) -> tuple[Capability, ...]:
    """The capabilities of a config-space copy, standard list first, then extended.

    The standard list is followed from 0x34 only if status bit 0x10 is set;
    pointers are used as they are, as QEMU does. The extended list is walked
    from 0x100 only for a 4096-byte copy, and ends at a header of 0 or all
    ones. A pointer into the header (or below 0x100), past the known bytes,
    or back to a capability already seen ends that list with a ``broken``
    entry. Never raises; each pointer is followed at most once.
    """
    return (*_walk_standard(config), *_walk_extended(config))


def find_capability(
    caps: Sequence[Capability], cap_id: int, *, extended: bool = False
) -> Capability | None:
    """The first capability with this id in ``caps`` (broken entries never match)."""
    for cap in caps:
        if cap.cap_id == cap_id and cap.extended == extended and cap.broken is None:
            return cap
    return None


# --------------------------------------------------------------------------
# Register naming

Decoder = Callable[[int], str]


@attrs.frozen
class _Slot:
    """A register placed in config space: absolute ``start``, ``group`` prefix (cap label)."""

    start: int
    size: int
    name: str
    group: str = ""
    decoder: Decoder | None = None


def _header_slots() -> tuple[_Slot, ...]:
    table: list[tuple[int, int, str, Decoder | None]] = [
        (0x00, 2, "vendor_id", None),
        (0x02, 2, "device_id", None),
        (COMMAND_REGISTER, 2, "command", decode_command),
        (0x06, 2, "status", decode_status),
        (0x08, 1, "revision", None),
        (0x09, 1, "prog_if", None),
        (0x0A, 1, "subclass", None),
        (0x0B, 1, "class", None),
        (0x0C, 1, "cache_line", None),
        (0x0D, 1, "latency_timer", None),
        (0x0E, 1, "header_type", decode_header_type),
        (0x0F, 1, "bist", None),
        *((bar_offset(i), 4, f"BAR{i}", None) for i in range(BAR_COUNT)),
        (0x28, 4, "cardbus_cis", None),
        (0x2C, 2, "subsystem_vendor_id", None),
        (0x2E, 2, "subsystem_id", None),
        (0x30, 4, "ROM BAR", decode_rom_bar),
        (0x34, 1, "cap_ptr", None),
        (0x35, 3, "reserved", None),
        (0x38, 4, "reserved", None),
        (0x3C, 1, "interrupt_line", decode_interrupt_line),
        (INTERRUPT_PIN, 1, "interrupt_pin", decode_interrupt_pin),
        (0x3E, 1, "min_gnt", None),
        (0x3F, 1, "max_lat", None),
    ]
    return tuple(
        _Slot(start, size, name, decoder=decoder)
        for start, size, name, decoder in table
        for _ in range(size)
    )


#: one entry per header byte
_HEADER_SLOTS = _header_slots()


def _decode_next(value: int) -> str:
    return f"→ {value:#x}" if value else "end of list"


def _decode_ext_header(value: int) -> str:
    name = capability_name(value & 0xFFFF, extended=True)
    ptr = (value >> 20) & 0xFFC
    return f"{name} v{(value >> 16) & 0xF}, " + (f"next {ptr:#x}" if ptr else "end of list")


_CAP_DECODERS: dict[tuple[int, str], Decoder] = {
    (CapId.PM, "pmc"): decode_pmc,
    (CapId.PM, "pmcsr"): decode_pmcsr,
    (CapId.MSI, "msg_ctl"): decode_msi_msg_ctl,
    (CapId.MSIX, "msg_ctl"): decode_msix_msg_ctl,
    (CapId.MSIX, "table"): decode_msix_bir_offset,
    (CapId.MSIX, "pba"): decode_msix_bir_offset,
    (CapId.PCIE, "flags"): decode_pcie_flags,
}


def _cap_decoder(cap: Capability, field: Field) -> Decoder | None:
    if cap.extended:
        return _decode_ext_header if field.name == "header" else None
    if field.name == "cap_id":
        return capability_name
    if field.name == "next":
        return _decode_next
    return _CAP_DECODERS.get((cap.cap_id, field.name))


def _slot_at(pos: int, caps: Sequence[Capability], kinds: Sequence[BarKind | None]) -> _Slot:
    if pos < HEADER_SIZE:
        slot = _HEADER_SLOTS[pos]
        index = bar_index(slot.start)
        if index is not None and index < len(kinds) and kinds[index] is BarKind.MEM64_HIGH:
            return attrs.evolve(slot, name=f"BAR{index} (BAR{index - 1} high)")
        return slot
    inside = [cap for cap in caps if cap.contains(pos)]
    if inside:
        cap = max(inside, key=lambda c: c.offset)
        field = cap.field_at(pos)
        if field is None:
            return _Slot(pos, 1, f"+{pos - cap.offset:#x}", cap.label)
        start = cap.offset + field.offset
        return _Slot(start, field.size, field.name, cap.label, _cap_decoder(cap, field))
    if pos < CONFIG_SIZE:
        return _Slot(pos, 1, "device-specific")
    if pos < EXT_CONFIG_SIZE:
        return _Slot(pos, 1, "extended config")
    return _Slot(pos, 1, "beyond config space")


def _parts(
    offset: int, size: int, caps: Sequence[Capability], kinds: Sequence[BarKind | None]
) -> list[tuple[_Slot, str, bool]]:
    """(slot, text, whole field covered) for each register an access touches, in order."""
    parts: list[tuple[_Slot, str, bool]] = []
    pos, end = offset, offset + size
    while pos < end:
        slot = _slot_at(pos, caps, kinds)
        take = min(end, slot.start + slot.size) - pos
        first, last = pos - slot.start, pos - slot.start + take - 1
        whole = take == slot.size
        if whole:
            text = slot.name
        else:
            text = f"{slot.name}[{first}]" if first == last else f"{slot.name}[{first}..{last}]"
        if not (parts and parts[-1][0].group == slot.group and parts[-1][1] == text):
            parts.append((slot, text, whole))
        pos += take
    return parts


def config_register_name(
    offset: int,
    size: int,
    caps: Sequence[Capability] = (),
    bar_kinds: Sequence[BarKind | None] = (),
) -> str:
    """Names of the register(s) a ``size``-byte access at ``offset`` covers.

    Header registers by name (``vendor_id+device_id`` for a 4-byte read at
    0), capability fields as ``MSI-X[0xa0].msg_ctl`` when ``caps`` are given,
    and partial registers with inclusive byte indexes (``BAR0[1..2]``).
    ``bar_kinds`` (see :func:`bar_kinds`) names the upper half of a 64-bit BAR.
    Accesses longer than 8 bytes are named by their byte range.
    """
    if offset < 0:
        return "(negative offset)"
    if size <= 0:
        return "(nothing)"
    if size > 8:
        if offset == 0 and size in (CONFIG_SIZE, EXT_CONFIG_SIZE):
            return f"config space (all {size} bytes)"
        return f"bytes {offset:#x}..{offset + size - 1:#x}"
    texts: list[str] = []
    group = ""
    for slot, text, _ in _parts(offset, size, caps, bar_kinds):
        texts.append(f"{slot.group}.{text}" if slot.group and slot.group != group else text)
        group = slot.group
    return "+".join(texts)


# --------------------------------------------------------------------------
# Describing an access


def _decode_ids(value: int) -> str:
    return f"{value & 0xFFFF:04x}:{value >> 16:04x}"


def _decode_class_rev(value: int) -> str:
    return f"rev {value & 0xFF:#04x}, class {value >> 8:06x}"


#: decoders for accesses that cover a group of header registers exactly
_COMBO_DECODERS: dict[tuple[int, int], Decoder] = {
    (0x00, 4): _decode_ids,
    (0x2C, 4): _decode_ids,
    (0x08, 4): _decode_class_rev,
}


def _decode_value(
    offset: int, size: int, value: int, caps: Sequence[Capability], kinds: Sequence[BarKind | None]
) -> str:
    if (offset, size) in _COMBO_DECODERS:
        return _COMBO_DECODERS[(offset, size)](value)
    parts = _parts(offset, size, caps, kinds)
    decoded = []
    for slot, text, whole in parts:
        if whole and slot.decoder is not None:
            shift = 8 * (slot.start - offset)
            field_value = (value >> shift) & ((1 << 8 * slot.size) - 1)
            decoded.append((text, slot.decoder(field_value)))
    if len(parts) == 1:
        return decoded[0][1] if decoded else ""
    return "; ".join(f"{text} {text_value}" for text, text_value in decoded)


def _summarize(config: bytes) -> str:
    """A config-space image in one line: IDs, class, and its capability chain."""
    caps = walk_capabilities(config)
    chain = " ".join(cap.label if cap.broken is None else f"({cap.broken})" for cap in caps)
    return (
        f"{_decode_ids(_u32(config, 0))}, {_decode_class_rev(_u32(config, 0x08))}, "
        f"caps: {chain or 'none'}"
    )


def _describe_bar_value(
    offset: int,
    value: int,
    *,
    is_write: bool,
    after_sizing_write: bool,
    kinds: Sequence[BarKind | None],
    lower_mask: int | None,
) -> str:
    """The tail of a line for a 4-byte access to a BAR or the ROM BAR."""
    if is_write and is_sizing_write(offset, 4, value):
        return " (sizing)"
    if offset == ROM_BAR:
        if after_sizing_write and not is_write:
            size = bar_size_from_mask(value, BarKind.ROM)
            return f" → ROM size {format_size(size)}" if size else " → no ROM"
        return f" ({decode_rom_bar(value)})"
    index = (offset - BAR0_OFFSET) // 4
    kind = kinds[index] if index < len(kinds) else None
    if after_sizing_write and not is_write:
        if kind is BarKind.MEM64_HIGH:
            if lower_mask is None:
                return f" → upper half of BAR{index - 1}'s size mask"
            size = bar_size_from_mask(lower_mask, BarKind.MEM64, upper=value)
            return f" → BAR{index - 1} size {format_size(size)} ({decode_bar_type(lower_mask)})"
        size = bar_size_from_mask(value, bar_kind(value))
        if not size:
            return f" → BAR{index} not implemented"
        return f" → BAR{index} size {format_size(size)} ({decode_bar_type(value)})"
    if kind is BarKind.MEM64_HIGH or (is_write and kind is None):
        return ""
    return f" ({decode_bar(value, kind if is_write else None)})"


def describe_config_access(
    offset: int,
    count: int,
    data: bytes | None,
    *,
    is_write: bool,
    caps: Sequence[Capability] = (),
    after_sizing_write: bool = False,
    bar_kinds: Sequence[BarKind | None] = (),
    lower_mask: int | None = None,
) -> str:
    """One line for a config-space (region 7) access.

    For example ``cfg RD1 @0x3d interrupt_pin = 0x01 (INTA#)``, ``cfg WR4 @0x30
    ROM BAR = 0xfffff800 (sizing)``, ``cfg RD4 @0x30 ROM BAR = 0xfffc0000 → ROM
    size 256 KiB``.

    ``data`` is the value written, or the data a read reply returned; ``None``
    for a read command. ``after_sizing_write`` says a read returns the size
    mask of the BAR or ROM BAR just written with a sizing value; for the
    upper half of a 64-bit BAR, ``lower_mask`` is the mask its lower half
    returned. ``caps`` and ``bar_kinds`` name capability fields and 64-bit
    halves. A read of the whole header or more at offset 0 is summarised
    (IDs, class, capabilities). Never raises: odd offsets, counts of 0 or
    beyond the config space and data shorter than ``count`` are said as such.
    """
    head = f"cfg {'WR' if is_write else 'RD'}{count} @{offset:#x}"
    if offset < 0 or count < 0:
        return f"{head} (invalid access)"
    if count == 0:
        return f"{head} (empty access)"
    line = f"{head} {config_register_name(offset, count, caps, bar_kinds)}"
    if count > 8 and offset + count > EXT_CONFIG_SIZE:
        line += " (beyond the 4096-byte config space)"
    if data is None:
        return line + (" (size mask)" if after_sizing_write else "")
    if len(data) < count:
        return f"{line} = ? (only {len(data)} of {count} bytes)"
    data = data[:count]
    if count > 8:
        if offset == 0 and count >= HEADER_SIZE:
            return f"{line} = {_summarize(data)}"
        return f"{line} = <{count} bytes>"
    value = int.from_bytes(data, "little")
    line += f" = {value:#0{2 + 2 * count}x}"
    if count == 4 and (offset == ROM_BAR or bar_index(offset) is not None):
        return line + _describe_bar_value(
            offset,
            value,
            is_write=is_write,
            after_sizing_write=after_sizing_write,
            kinds=bar_kinds,
            lower_mask=lower_mask,
        )
    decoded = _decode_value(offset, count, value, caps, bar_kinds)
    return f"{line} ({decoded})" if decoded else line
