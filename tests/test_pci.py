"""PCI config-space naming, capability walk, decoders, BAR sizing, and PciView on real captures."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.realdata import TRACES, capture_messages
from vfioproxy.protocol.pci import (
    BarKind,
    CapId,
    ExtCapId,
    bar_kinds,
    bar_size_from_mask,
    capability_name,
    config_register_name,
    decode_bar,
    decode_command,
    decode_header_type,
    decode_interrupt_pin,
    decode_msi_msg_ctl,
    decode_msix_bir_offset,
    decode_msix_msg_ctl,
    decode_pcie_flags,
    decode_pmc,
    decode_pmcsr,
    decode_rom_bar,
    decode_status,
    describe_config_access,
    find_capability,
    format_size,
    is_sizing_write,
    region_name,
    walk_capabilities,
)
from vfioproxy.protocol.pci_view import PciView

REAL = TRACES
E1K = REAL / "qemu-realize-qemu-server-e1000e-001.trace"
NVME = REAL / "qemu-realize-qemu-server-nvme-001.trace"
E1K_BOOT = REAL / "qemu-boot-qemu-server-e1000e-001.trace"
NVME_BOOT = REAL / "qemu-boot-qemu-server-nvme-001.trace"
GPIO = REAL / "qemu-realize-gpio-001.trace"

REGION_READ, REGION_WRITE, CONFIG_REGION = 9, 10, 7


# --------------------------------------------------------------------------
# helpers


def config_space(
    size: int = 256,
    *,
    status: int = 0x10,
    cap_ptr: int = 0,
    at: dict[int, bytes] | None = None,
) -> bytes:
    """A synthetic config space with the given status, cap pointer and bytes placed at offsets."""
    config = bytearray(size)
    config[0:4] = bytes.fromhex("86800000")
    config[6:8] = status.to_bytes(2, "little")
    config[0x34] = cap_ptr
    for offset, data in (at or {}).items():
        config[offset : offset + len(data)] = data
    return bytes(config)


def cap(cap_id: int, next_ptr: int, body: bytes = b"") -> bytes:
    return bytes([cap_id, next_ptr]) + body


def ext_cap(cap_id: int, version: int, next_ptr: int, body: bytes = b"") -> bytes:
    return (cap_id | version << 16 | next_ptr << 20).to_bytes(4, "little") + body


def u32(value: int) -> bytes:
    return value.to_bytes(4, "little")


#: PM @0x40 → MSI (64-bit, maskable) @0x50 → MSI-X @0x70 → PCIe @0x80; AER @0x100 → DSN @0x140
CHAIN = config_space(
    4096,
    cap_ptr=0x40,
    at={
        0x40: cap(0x01, 0x50, bytes.fromhex("0300") + bytes.fromhex("0300")),
        0x50: cap(0x05, 0x70, (0x0180).to_bytes(2, "little")),
        0x70: cap(0x11, 0x80, (0x0007).to_bytes(2, "little") + u32(0x2) + u32(0x1002)),
        0x80: cap(0x10, 0x00, (0x0092).to_bytes(2, "little")),
        0x100: ext_cap(0x0001, 2, 0x140),
        0x140: ext_cap(0x0003, 1, 0x000),
    },
)


def region7_traffic(path: Path) -> Iterator[tuple[str, int, int, bytes]]:
    """(kind, offset, count, data) of each region-7 message: kind is read/reply/write."""
    for record in capture_messages(path):
        message = record.data
        _, command, _, flags, _ = struct.unpack_from("<HHIII", message)
        if command not in (REGION_READ, REGION_WRITE) or len(message) < 32:
            continue
        offset, region, count = struct.unpack_from("<QII", message, 16)
        if region != CONFIG_REGION:
            continue
        is_reply = flags & 0xF == 1
        if command == REGION_WRITE and not is_reply:
            yield "write", offset, count, message[32:]
        elif command == REGION_READ:
            yield ("reply" if is_reply else "read"), offset, count, message[32:]


def feed(view: PciView, path: Path) -> list[str]:
    """Feed a capture's region-7 traffic to ``view``; the lines for writes and read replies."""
    lines = []
    for kind, offset, count, data in region7_traffic(path):
        if kind == "read":
            view.describe_read_request(offset, count)
        elif kind == "reply":
            lines.append(view.describe_read_reply(offset, count, data))
        else:
            lines.append(view.describe_write(offset, count, data))
    return lines


# --------------------------------------------------------------------------
# region names and register names


def test_region_names_follow_the_vfio_user_pci_indexes():
    assert [region_name(i) for i in range(10)] == [
        *(f"BAR{i}" for i in range(6)),
        "ROM",
        "CONFIG",
        "VGA",
        "REGION9",
    ]


@pytest.mark.parametrize(
    ("offset", "size", "name"),
    [
        (0x00, 4, "vendor_id+device_id"),
        (0x00, 2, "vendor_id"),
        (0x04, 4, "command+status"),
        (0x08, 4, "revision+prog_if+subclass+class"),
        (0x0A, 2, "subclass+class"),
        (0x0D, 1, "latency_timer"),
        (0x0E, 1, "header_type"),
        (0x10, 4, "BAR0"),
        (0x24, 4, "BAR5"),
        (0x28, 4, "cardbus_cis"),
        (0x2C, 4, "subsystem_vendor_id+subsystem_id"),
        (0x30, 4, "ROM BAR"),
        (0x34, 1, "cap_ptr"),
        (0x3C, 1, "interrupt_line"),
        (0x3D, 1, "interrupt_pin"),
        (0x3C, 4, "interrupt_line+interrupt_pin+min_gnt+max_lat"),
    ],
)
def test_header_registers_are_named_by_the_accesses_that_cover_them(offset, size, name):
    assert config_register_name(offset, size) == name


@pytest.mark.parametrize(
    ("offset", "size", "name"),
    [
        (0x01, 1, "vendor_id[1]"),
        (0x03, 2, "device_id[1]+command[0]"),
        (0x07, 1, "status[1]"),
        (0x11, 2, "BAR0[1..2]"),
        (0x12, 4, "BAR0[2..3]+BAR1[0..1]"),
        (0x31, 1, "ROM BAR[1]"),
        (0x35, 1, "reserved[0]"),
        (0x3F, 2, "max_lat+device-specific"),
        (0x40, 4, "device-specific"),
        (0x200, 2, "extended config"),
        (0xFFF, 2, "extended config+beyond config space"),
    ],
)
def test_partial_and_spanning_accesses_name_every_piece_they_touch(offset, size, name):
    assert config_register_name(offset, size) == name


def test_capability_fields_are_named_with_the_capability_label_once():
    caps = walk_capabilities(CHAIN)
    assert config_register_name(0x72, 2, caps) == "MSI-X[0x70].msg_ctl"
    assert config_register_name(0x70, 4, caps) == "MSI-X[0x70].cap_id+next+msg_ctl"
    assert config_register_name(0x4E, 4, caps) == "device-specific+MSI[0x50].cap_id+next"
    assert config_register_name(0x104, 4, caps) == "AER[0x100].uncor_status"
    assert config_register_name(0x144, 8, caps) == "DSN[0x140].serial_lo+serial_hi"


def test_the_upper_half_of_a_64_bit_bar_is_named_after_its_lower_half():
    kinds = bar_kinds([0x4, 0, 0x1, 0x8, 0xC, 0])
    assert kinds == (
        BarKind.MEM64,
        BarKind.MEM64_HIGH,
        BarKind.IO,
        BarKind.MEM32,
        BarKind.MEM64,
        BarKind.MEM64_HIGH,
    )
    assert config_register_name(0x14, 4, bar_kinds=kinds) == "BAR1 (BAR0 high)"
    assert config_register_name(0x24, 4, bar_kinds=kinds) == "BAR5 (BAR4 high)"


def test_long_and_empty_accesses_are_named_by_their_extent():
    assert config_register_name(0, 4096) == "config space (all 4096 bytes)"
    assert config_register_name(0, 256) == "config space (all 256 bytes)"
    assert config_register_name(0x40, 64) == "bytes 0x40..0x7f"
    assert config_register_name(0x10, 0) == "(nothing)"


# --------------------------------------------------------------------------
# capability walk


def test_a_pm_msi_msix_pcie_chain_and_the_extended_list_are_walked_in_order():
    caps = walk_capabilities(CHAIN)
    assert [(c.name, c.offset, c.extended, c.length) for c in caps] == [
        ("PM", 0x40, False, 8),
        ("MSI", 0x50, False, 0x18),
        ("MSI-X", 0x70, False, 12),
        ("PCIe", 0x80, False, 0x3C),
        ("AER", 0x100, True, 0x38),
        ("DSN", 0x140, True, 0xC),
    ]
    assert all(c.broken is None for c in caps)


def test_capability_field_names_point_into_the_capability():
    caps = walk_capabilities(CHAIN)
    pm, msi, msix, pcie = caps[:4]
    assert msix.field_name(0x72) == "MSI-X[0x70].msg_ctl"
    assert msix.field_name(0x74) == "MSI-X[0x70].table"
    assert msix.field_name(0x78) == "MSI-X[0x70].pba"
    assert msix.field_name(0x7C) is None
    assert msi.field_name(0x54) == "MSI[0x50].msg_addr_lo"
    assert msi.field_name(0x60) == "MSI[0x50].mask_bits"
    assert pm.field_name(0x44) == "PM[0x40].pmcsr"
    assert pcie.field_name(0x86) == "PCIe[0x80].devcap[2]"
    assert pcie.field_name(0x40) is None


@pytest.mark.parametrize(
    ("msg_ctl", "length", "field_at_8"),
    [
        (0x0000, 0x0A, "msg_data"),
        (0x0080, 0x0E, "msg_addr_hi"),
        (0x0100, 0x14, "msg_data"),
        (0x0180, 0x18, "msg_addr_hi"),
    ],
)
def test_msi_length_depends_on_the_64_bit_and_per_vector_mask_flags(msg_ctl, length, field_at_8):
    config = config_space(cap_ptr=0x50, at={0x50: cap(0x05, 0, msg_ctl.to_bytes(2, "little"))})
    (msi,) = walk_capabilities(config)
    assert msi.length == length
    assert msi.field_name(0x58) == f"MSI[0x50].{field_at_8}"
    assert msi.field_name(0x50 + length - 1) is not None
    assert msi.field_name(0x50 + length) is None


def test_a_looping_chain_stops_at_the_first_repeat_and_is_marked_broken():
    config = config_space(cap_ptr=0x40, at={0x40: cap(0x01, 0x50), 0x50: cap(0x11, 0x40)})
    caps = walk_capabilities(config)
    assert [c.name for c in caps] == ["PM", "MSI-X", "broken"]
    assert caps[-1].broken == "loop back to 0x40"
    assert caps[-1].length == 0
    assert not caps[-1].contains(0x40)


def test_a_capability_pointing_at_itself_is_a_loop():
    caps = walk_capabilities(config_space(cap_ptr=0x40, at={0x40: cap(0x05, 0x40)}))
    assert [c.label for c in caps] == ["MSI[0x40]", "broken[0x40]"]


def test_a_pointer_past_the_config_space_or_into_the_header_breaks_the_chain():
    past = walk_capabilities(config_space(cap_ptr=0x40, at={0x40: cap(0x01, 0xFF)}))
    assert [c.name for c in past] == ["PM", "broken"]
    assert past[-1].broken == "pointer 0xff is past the 256 bytes known"
    header = walk_capabilities(config_space(cap_ptr=0x20))
    assert [(c.offset, c.broken) for c in header] == [(0x20, "pointer 0x20 is inside the header")]


def test_a_config_copy_shorter_than_the_chain_stops_at_the_bytes_known():
    caps = walk_capabilities(config_space(cap_ptr=0x40)[:64])
    assert [(c.offset, c.broken) for c in caps] == [
        (0x40, "pointer 0x40 is past the 64 bytes known")
    ]


def test_without_the_capability_list_status_bit_there_are_no_capabilities():
    config = config_space(status=0, cap_ptr=0x40, at={0x40: cap(0x01, 0)})
    assert walk_capabilities(config) == ()


def test_extended_capabilities_are_walked_only_in_a_4096_byte_copy():
    assert [c.name for c in walk_capabilities(CHAIN[:256])] == ["PM", "MSI", "MSI-X", "PCIe"]
    empty = config_space(4096)
    assert walk_capabilities(empty) == ()


def test_an_extended_chain_that_loops_or_points_below_0x100_is_marked_broken():
    looping = config_space(4096, at={0x100: ext_cap(0x0001, 2, 0x100)})
    assert [(c.name, c.broken) for c in walk_capabilities(looping)] == [
        ("AER", None),
        ("broken", "loop back to 0x100"),
    ]
    low = config_space(4096, at={0x100: ext_cap(0x0003, 1, 0x040)})
    assert walk_capabilities(low)[-1].broken == "pointer 0x40 is below 0x100"


def test_vendor_and_unknown_capabilities_get_a_name_and_what_layout_is_known():
    config = config_space(
        4096,
        cap_ptr=0x40,
        at={0x40: cap(0x09, 0x50, bytes([0x8, 0, 0, 0, 0, 0])), 0x50: cap(0x42, 0)},
    )
    config = config[:0x100] + ext_cap(0x0042, 1, 0) + config[0x104:]
    vendor, unknown, ext = walk_capabilities(config)
    assert (vendor.name, vendor.length, vendor.field_name(0x44)) == (
        "Vendor",
        8,
        "Vendor[0x40].data[1]",
    )
    assert (unknown.name, unknown.length, unknown.span) == ("cap-0x42", None, 2)
    assert unknown.field_name(0x51) == "cap-0x42[0x50].next"
    assert unknown.field_name(0x52) is None
    assert (ext.name, ext.span) == ("ecap-0x0042", 4)
    assert capability_name(0x11) == "MSI-X"
    assert capability_name(0x0003, extended=True) == "DSN"


def test_overlapping_capabilities_are_named_by_the_one_that_starts_last():
    config = config_space(4096, at={0x100: ext_cap(0x0001, 2, 0x120), 0x120: ext_cap(0x0003, 1, 0)})
    caps = walk_capabilities(config)
    assert config_register_name(0x11C, 4, caps) == "AER[0x100].header_log[0..3]"
    assert config_register_name(0x120, 4, caps) == "DSN[0x120].header"
    assert describe_config_access(0x120, 4, u32(0x00010003), is_write=False, caps=caps) == (
        "cfg RD4 @0x120 DSN[0x120].header = 0x00010003 (DSN v1, end of list)"
    )


def test_find_capability_returns_the_first_match_and_never_a_broken_entry():
    caps = walk_capabilities(CHAIN)
    msix = find_capability(caps, CapId.MSIX)
    assert msix is not None and msix.offset == 0x70
    dsn = find_capability(caps, ExtCapId.DSN, extended=True)
    assert dsn is not None and dsn.offset == 0x140
    assert find_capability(caps, CapId.VENDOR) is None
    looping = walk_capabilities(config_space(cap_ptr=0x40, at={0x40: cap(0x01, 0x40)}))
    assert find_capability(looping, -1) is None


# --------------------------------------------------------------------------
# value decoders


def test_command_and_status_bits_are_spelled_out():
    assert decode_command(0x0000) == "none"
    assert decode_command(0x0107) == "IO|MEM|BUS_MASTER|SERR"
    assert decode_command(0x0400) == "INTX_DISABLE"
    assert decode_command(0x0800) == "0x800"
    assert decode_status(0x0010) == "CAP_LIST"
    assert decode_status(0x2218) == "INTX|CAP_LIST|RCVD_MASTER_ABORT"


def test_bar_values_say_io_or_memory_prefetch_and_address():
    assert decode_bar(0xFE000000) == "mem32"
    assert decode_bar(0x00000004) == "mem64"
    assert decode_bar(0xFEBF800C) == "mem64, prefetchable, address 0xfebf8000"
    assert decode_bar(0x0000C041) == "I/O, address 0xc040"
    assert decode_bar(0x0000C040, BarKind.IO) == "I/O"


def test_rom_bar_values_say_enable_and_address():
    assert decode_rom_bar(0x00000000) == "disabled"
    assert decode_rom_bar(0xFEB40001) == "enabled, address 0xfeb40000"
    assert decode_rom_bar(0xFEB40000) == "disabled, address 0xfeb40000"


def test_msix_registers_give_table_size_enable_mask_and_bir_offset():
    assert decode_msix_msg_ctl(0x0004) == "5 vectors, disabled"
    assert decode_msix_msg_ctl(0x0000) == "1 vector, disabled"
    assert decode_msix_msg_ctl(0xC040) == "65 vectors, enabled, function masked"
    assert decode_msix_bir_offset(0x00002003) == "BAR3 + 0x2000"
    assert decode_msix_bir_offset(0x00000007) == "BIR 7 (reserved) + 0x0"


def test_msi_msg_ctl_gives_enable_vector_counts_64_bit_and_masking():
    assert decode_msi_msg_ctl(0x0080) == "disabled, 1 vector(s) capable, 1 enabled, 64-bit"
    assert decode_msi_msg_ctl(0x0127) == (
        "enabled, 8 vector(s) capable, 4 enabled, per-vector masking"
    )


def test_pm_pcie_pin_and_header_type_decoders():
    assert decode_pmc(0x0003) == "version 3"
    assert decode_pmcsr(0x0000) == "D0"
    assert decode_pmcsr(0x8108) == "D0, No_Soft_Reset, PME_En, PME_Status"
    assert decode_pmcsr(0x0003) == "D3hot"
    assert decode_pcie_flags(0x0092) == "v2, RC integrated endpoint"
    assert decode_pcie_flags(0x0042) == "v2, root port"
    assert [decode_interrupt_pin(v) for v in range(6)] == [
        "none",
        "INTA#",
        "INTB#",
        "INTC#",
        "INTD#",
        "invalid",
    ]
    assert decode_header_type(0x80) == "normal, multi-function"
    assert decode_header_type(0x01) == "bridge"


def test_sizes_use_the_largest_binary_unit_that_divides_them():
    assert format_size(0x40000) == "256 KiB"
    assert format_size(1 << 33) == "8 GiB"
    assert format_size(0x1800) == "6 KiB"
    assert format_size(32) == "32 B"


# --------------------------------------------------------------------------
# sizing


def test_sizing_writes_are_all_ones_to_a_bar_or_all_address_bits_to_the_rom_bar():
    assert is_sizing_write(0x10, 4, 0xFFFFFFFF)
    assert is_sizing_write(0x24, 4, 0xFFFFFFFF)
    assert is_sizing_write(0x30, 4, 0xFFFFF800)
    assert is_sizing_write(0x30, 4, 0xFFFFFFFE)
    assert not is_sizing_write(0x10, 4, 0xFEB80000)
    assert not is_sizing_write(0x10, 2, 0xFFFF)
    assert not is_sizing_write(0x28, 4, 0xFFFFFFFF)
    assert not is_sizing_write(0x30, 4, 0xFFFFF000)
    assert not is_sizing_write(0x04, 4, 0xFFFFFFFF)


@pytest.mark.parametrize(
    ("value", "kind", "upper", "size"),
    [
        (0xFFFE0000, BarKind.MEM32, None, 0x20000),
        (0xFFF00008, BarKind.MEM32, None, 0x100000),
        (0xFFFFFFE1, BarKind.IO, None, 32),
        (0x0000FFE1, BarKind.IO, None, 32),
        (0xFFFFC004, BarKind.MEM64, None, 0x4000),
        (0xFFFFC004, BarKind.MEM64, 0xFFFFFFFF, 0x4000),
        (0x0000000C, BarKind.MEM64, 0xFFFFFFFE, 1 << 33),
        (0xFFFC0000, BarKind.ROM, None, 0x40000),
        (0xFFFF0001, BarKind.ROM, None, 0x10000),
        (0x00000000, BarKind.MEM32, None, 0),
        (0x00000001, BarKind.IO, None, 0),
        (0x00000000, BarKind.ROM, None, 0),
    ],
)
def test_bar_size_comes_from_the_lowest_address_bit_of_the_mask(value, kind, upper, size):
    assert bar_size_from_mask(value, kind, upper=upper) == size


def test_the_upper_half_alone_is_not_a_bar_size():
    with pytest.raises(ValueError, match="lower half"):
        bar_size_from_mask(0xFFFFFFFF, BarKind.MEM64_HIGH)


def test_pci_view_describes_32_bit_and_io_bar_sizing_and_keeps_the_mask_out_of_its_copy():
    view = PciView()
    view.describe_read_reply(0, 256, config_space(at={0x10: u32(0xFE000000), 0x14: u32(0xC001)}))
    assert (
        view.describe_write(0x10, 4, u32(0xFFFFFFFF)) == "cfg WR4 @0x10 BAR0 = 0xffffffff (sizing)"
    )
    assert view.describe_read_request(0x10, 4) == "cfg RD4 @0x10 BAR0 (size mask)"
    assert view.describe_read_reply(0x10, 4, u32(0xFFFE0000)) == (
        "cfg RD4 @0x10 BAR0 = 0xfffe0000 → BAR0 size 128 KiB (mem32)"
    )
    assert view.config[0x10:0x14] == u32(0xFE000000)
    assert (
        view.describe_write(0x10, 4, u32(0xFE000000)) == "cfg WR4 @0x10 BAR0 = 0xfe000000 (mem32)"
    )
    assert view.describe_read_reply(0x10, 4, u32(0xFE000000)) == (
        "cfg RD4 @0x10 BAR0 = 0xfe000000 (mem32)"
    )
    view.describe_write(0x14, 4, u32(0xFFFFFFFF))
    assert view.describe_read_reply(0x14, 4, u32(0xFFFFFF01)) == (
        "cfg RD4 @0x14 BAR1 = 0xffffff01 → BAR1 size 256 B (I/O)"
    )


def test_pci_view_combines_both_halves_of_a_64_bit_bar_size():
    view = PciView()
    view.describe_read_reply(0, 256, config_space(at={0x10: u32(0x0000000C)}))
    view.describe_write(0x10, 4, u32(0xFFFFFFFF))
    assert view.describe_read_reply(0x10, 4, u32(0x0000000C)) == (
        "cfg RD4 @0x10 BAR0 = 0x0000000c → BAR0 size 4 GiB (mem64, prefetchable)"
    )
    assert view.describe_write(0x14, 4, u32(0xFFFFFFFF)) == (
        "cfg WR4 @0x14 BAR1 (BAR0 high) = 0xffffffff (sizing)"
    )
    assert view.describe_read_reply(0x14, 4, u32(0xFFFFFFFE)) == (
        "cfg RD4 @0x14 BAR1 (BAR0 high) = 0xfffffffe → BAR0 size 8 GiB (mem64, prefetchable)"
    )


def test_an_upper_half_read_back_without_its_lower_mask_is_only_called_a_mask():
    line = describe_config_access(
        0x14,
        4,
        u32(0xFFFFFFFF),
        is_write=False,
        after_sizing_write=True,
        bar_kinds=(BarKind.MEM64, BarKind.MEM64_HIGH),
    )
    assert line == "cfg RD4 @0x14 BAR1 (BAR0 high) = 0xffffffff → upper half of BAR0's size mask"


def test_pci_view_recognises_the_rom_sizing_of_seabios_option_rom_loader():
    view = PciView()
    assert view.describe_write(0x30, 4, u32(0xFFFFFFFE)) == (
        "cfg WR4 @0x30 ROM BAR = 0xfffffffe (sizing)"
    )
    assert view.describe_read_reply(0x30, 4, u32(0xFFFF0000)) == (
        "cfg RD4 @0x30 ROM BAR = 0xffff0000 → ROM size 64 KiB"
    )
    view.describe_write(0x30, 4, u32(0xFFFFF800))
    assert (
        view.describe_read_reply(0x30, 4, u32(0)) == "cfg RD4 @0x30 ROM BAR = 0x00000000 → no ROM"
    )


def test_a_write_after_a_sizing_write_cancels_the_size_probe():
    view = PciView()
    view.describe_write(0x18, 4, u32(0xFFFFFFFF))
    view.describe_write(0x18, 4, u32(0x1))
    assert view.describe_read_request(0x18, 4) == "cfg RD4 @0x18 BAR2"
    assert view.describe_read_reply(0x18, 4, u32(0x1)) == "cfg RD4 @0x18 BAR2 = 0x00000001 (I/O)"


# --------------------------------------------------------------------------
# weird input


def test_empty_short_and_out_of_range_accesses_are_described_not_raised():
    assert describe_config_access(0x10, 0, b"", is_write=False) == "cfg RD0 @0x10 (empty access)"
    assert describe_config_access(0x10, 4, b"\x01\x02", is_write=False) == (
        "cfg RD4 @0x10 BAR0 = ? (only 2 of 4 bytes)"
    )
    assert describe_config_access(0x3D, 1, b"\x02\xff", is_write=False) == (
        "cfg RD1 @0x3d interrupt_pin = 0x02 (INTB#)"
    )
    assert describe_config_access(0x1000, 4, None, is_write=False) == (
        "cfg RD4 @0x1000 beyond config space"
    )
    assert describe_config_access(0, 8192, None, is_write=False) == (
        "cfg RD8192 @0x0 bytes 0x0..0x1fff (beyond the 4096-byte config space)"
    )
    assert describe_config_access(0x40, 16, bytes(16), is_write=True) == (
        "cfg WR16 @0x40 bytes 0x40..0x4f = <16 bytes>"
    )


@given(
    offset=st.integers(0, 2**64 - 1),
    count=st.integers(0, 2**32 - 1),
    data=st.none() | st.binary(max_size=16),
    is_write=st.booleans(),
    after=st.booleans(),
)
def test_describe_config_access_never_raises(offset, count, data, is_write, after):
    line = describe_config_access(
        offset,
        count,
        data,
        is_write=is_write,
        caps=walk_capabilities(CHAIN),
        after_sizing_write=after,
        bar_kinds=(BarKind.MEM64, BarKind.MEM64_HIGH, BarKind.IO),
        lower_mask=0xFFFFC00C if after else None,
    )
    assert line.startswith("cfg ")


access = st.tuples(
    st.sampled_from(["read", "reply", "write"]),
    st.integers(0, 5000) | st.sampled_from([0x10, 0x14, 0x30]) | st.integers(0, 2**64 - 1),
    st.integers(0, 5000) | st.just(4),
    st.binary(max_size=32) | st.sampled_from([u32(0xFFFFFFFF), u32(0xFFFFC00C), CHAIN]),
)


@given(st.lists(access, max_size=30))
def test_pci_view_never_raises_on_any_sequence(accesses):
    view = PciView()
    for kind, offset, count, data in accesses:
        if kind == "read":
            line = view.describe_read_request(offset, count)
        elif kind == "reply":
            line = view.describe_read_reply(offset, count, data)
        else:
            line = view.describe_write(offset, count, data)
        assert line.startswith("cfg ")
    assert len(view.config) <= 4096


# --------------------------------------------------------------------------
# real captures


def test_e1000e_realize_shows_its_capabilities_rom_probe_bars_and_msix_reads():
    view = PciView()
    lines = feed(view, E1K)
    caps = view.capabilities
    assert [c.label for c in caps] == [
        "PM[0xc8]",
        "MSI[0xd0]",
        "PCIe[0xe0]",
        "MSI-X[0xa0]",
        "AER[0x100]",
        "DSN[0x140]",
    ]
    msi = find_capability(caps, CapId.MSI)
    assert msi is not None and msi.length == 0xE
    assert view.config[:4] == bytes.fromhex("8680d310")
    assert lines[:5] == [
        "cfg RD4096 @0x0 config space (all 4096 bytes) = 8086:10d3, rev 0x00, class 020000, "
        "caps: PM[0xc8] MSI[0xd0] PCIe[0xe0] MSI-X[0xa0] AER[0x100] DSN[0x140]",
        "cfg RD4 @0x30 ROM BAR = 0x00000000 (disabled)",
        "cfg WR4 @0x30 ROM BAR = 0xfffff800 (sizing)",
        "cfg RD4 @0x30 ROM BAR = 0xfffc0000 → ROM size 256 KiB",
        "cfg WR4 @0x30 ROM BAR = 0x00000000 (disabled)",
    ]
    assert lines[5:13] == [
        "cfg RD4 @0x10 BAR0 = 0x00000000 (mem32)",
        "cfg RD4 @0x14 BAR1 = 0x00000000 (mem32)",
        "cfg RD4 @0x18 BAR2 = 0x00000001 (I/O)",
        "cfg RD4 @0x1c BAR3 = 0x00000000 (mem32)",
        "cfg RD2 @0xa2 MSI-X[0xa0].msg_ctl = 0x0004 (5 vectors, disabled)",
        "cfg RD4 @0xa4 MSI-X[0xa0].table = 0x00000003 (BAR3 + 0x0)",
        "cfg RD4 @0xa8 MSI-X[0xa0].pba = 0x00002003 (BAR3 + 0x2000)",
        "cfg RD2 @0xd2 MSI[0xd0].msg_ctl = 0x0080 "
        "(disabled, 1 vector(s) capable, 1 enabled, 64-bit)",
    ]
    assert "cfg RD1 @0x3d interrupt_pin = 0x01 (INTA#)" in lines
    assert "cfg RD2 @0xcc PM[0xc8].pmcsr = 0x0000 (D0)" in lines


def test_nvme_realize_shows_msix_at_0x40_pm_at_0x60_and_a_64_bit_bar0():
    view = PciView()
    lines = feed(view, NVME)
    assert [c.label for c in view.capabilities] == ["MSI-X[0x40]", "PCIe[0x80]", "PM[0x60]"]
    assert view.config[0x100:0x104] == bytes(4)
    assert "cfg RD4 @0x30 ROM BAR = 0x00000000 → no ROM" in lines
    assert "cfg RD4 @0x10 BAR0 = 0x00000004 (mem64)" in lines
    assert "cfg RD2 @0x42 MSI-X[0x40].msg_ctl = 0x0040 (65 vectors, disabled)" in lines
    assert "cfg RD4 @0x44 MSI-X[0x40].table = 0x00002000 (BAR0 + 0x2000)" in lines
    assert "cfg RD4 @0x48 MSI-X[0x40].pba = 0x00003000 (BAR0 + 0x3000)" in lines
    assert "cfg RD2 @0x64 PM[0x60].pmcsr = 0x0008 (D0, No_Soft_Reset)" in lines
    assert "cfg WR4 @0x14 BAR1 (BAR0 high) = 0x00000000" in lines


def test_gpio_realize_has_its_ids_and_no_capabilities():
    view = PciView()
    lines = feed(view, GPIO)
    assert view.capabilities == ()
    assert len(view.config) == 256
    assert view.config[:4] == bytes.fromhex("4f49c80d")
    assert lines[0] == (
        "cfg RD256 @0x0 config space (all 256 bytes) = 494f:0dc8, rev 0x00, class 000000, "
        "caps: none"
    )
    assert "cfg RD4 @0x18 BAR2 = 0x00000001 (I/O)" in lines


def test_seabios_sizing_writes_in_the_e1000e_boot_are_recognised():
    view = PciView()
    lines = feed(view, E1K_BOOT)
    sizing = [line for line in lines if line.endswith("(sizing)")]
    assert sizing == [
        "cfg WR4 @0x30 ROM BAR = 0xfffff800 (sizing)",  # QEMU's own ROM probe at realize
        *(f"cfg WR4 @{0x10 + 4 * i:#x} BAR{i} = 0xffffffff (sizing)" for i in range(6)),
        "cfg WR4 @0x30 ROM BAR = 0xfffff800 (sizing)",
        "cfg WR4 @0x30 ROM BAR = 0xfffffffe (sizing)",
    ]
    start = lines.index("cfg WR4 @0x10 BAR0 = 0xffffffff (sizing)")
    assert lines[start : start + 4] == [
        "cfg WR4 @0x10 BAR0 = 0xffffffff (sizing)",
        "cfg WR4 @0x10 BAR0 = 0x00000000 (mem32)",
        "cfg WR4 @0x14 BAR1 = 0xffffffff (sizing)",
        "cfg WR4 @0x14 BAR1 = 0x00000000 (mem32)",
    ]
    assert "cfg WR4 @0x18 BAR2 = 0x0000c040 (I/O)" in lines
    assert "cfg WR4 @0x10 BAR0 = 0xfeb80000 (mem32)" in lines
    assert "cfg WR4 @0x30 ROM BAR = 0xfeb40001 (enabled, address 0xfeb40000)" in lines


def test_guest_bar_read_backs_never_reach_the_wire_so_no_size_is_reported_from_boot_traffic():
    """QEMU emulates BAR and ROM BAR reads once the guest runs (realize-steps.md §2.1)."""
    for path in (E1K_BOOT, NVME_BOOT):
        traffic = list(region7_traffic(path))
        first_sizing = next(
            i
            for i, (kind, offset, _, data) in enumerate(traffic)
            if kind == "write" and offset == 0x10 and data == u32(0xFFFFFFFF)
        )
        later_bar_reads = [
            offset
            for kind, offset, _, _ in traffic[first_sizing:]
            if kind == "read" and 0x10 <= offset < 0x34
        ]
        assert later_bar_reads == []
        assert not [line for line in feed(PciView(), path) if "→ BAR" in line]


def test_nvme_boot_sizes_both_halves_of_its_64_bit_bar0():
    lines = feed(PciView(), NVME_BOOT)
    assert "cfg WR4 @0x14 BAR1 (BAR0 high) = 0xffffffff (sizing)" in lines
    assert "cfg WR4 @0x10 BAR0 = 0xfebf8000 (mem64)" in lines


@pytest.mark.parametrize("path", sorted(REAL.glob("*.trace")), ids=lambda p: p.name)
def test_every_real_region7_message_gets_a_cfg_line(path):
    view = PciView()
    for kind, offset, count, data in region7_traffic(path):
        if kind == "read":
            assert view.describe_read_request(offset, count).startswith(f"cfg RD{count} ")
        elif kind == "reply":
            assert view.describe_read_reply(offset, count, data).startswith(f"cfg RD{count} ")
        else:
            assert view.describe_write(offset, count, data).startswith(f"cfg WR{count} ")
