"""The reference device model on its own: no sockets, real memfds and eventfds."""

import errno
import mmap
import os
import struct
import zlib

import pytest

from tests.conftest import FD_HYGIENE
from vfioproxy.io.fds import OwnedFd, close_all, make_eventfd, make_memfd
from vfioproxy.peers import layout as L
from vfioproxy.peers.device import (
    MAX_INCOMING_STREAM,
    Device,
    DeviceError,
    DmaFault,
    decode_state_stream,
    next_migration_state,
)
from vfioproxy.protocol.constants import DmaMapFlags, IrqIndex, IrqSetFlags, MigrationState
from vfioproxy.protocol.pci import CapId, walk_capabilities

pytestmark = FD_HYGIENE

RW = DmaMapFlags.READ | DmaMapFlags.WRITE
TRIGGER_EVENTFD = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER
RAM = 0x100000  # guest RAM in these tests: one memfd window [0, RAM)
DESC, SRC, DST = 0x1000, 0x2000, 0x4000


@pytest.fixture
def device():
    dev = Device()
    yield dev
    dev.close()


@pytest.fixture
def ram():
    """Guest RAM: a memfd and this test's own mapping of it."""
    fd = make_memfd("guest-ram", RAM)
    view = mmap.mmap(fd.fileno(), RAM)
    yield fd, view
    view.close()
    fd.close()


@pytest.fixture
def mapped(device, ram):
    """The device with guest RAM mapped read/write at iova 0."""
    fd, view = ram
    device.dma.map(iova=0, size=RAM, offset=0, flags=RW, fd=fd.dup())
    return device, view


def cfg16(device, offset):
    return int.from_bytes(device.read_region(7, offset, 2), "little")


def cfg32(device, offset):
    return int.from_bytes(device.read_region(7, offset, 4), "little")


async def cfg_write(device, offset, value, size=4):
    await device.write_region(7, offset, value.to_bytes(size, "little"))


def reg(device, offset):
    return int.from_bytes(device.read_region(0, offset, 4), "little")


async def reg_write(device, offset, value):
    await device.write_region(0, offset, value.to_bytes(4, "little"))


def put_descriptor(view, *, src=SRC, dst=DST, length=16, op=L.OP_COPY, cookie=0xC0FFEE):
    view[DESC : DESC + L.DESCRIPTOR.size] = L.DESCRIPTOR.pack(src, dst, length, op, cookie)


async def ring(device, desc=DESC):
    await reg_write(device, L.REG_DESC_LO, desc & 0xFFFFFFFF)
    await reg_write(device, L.REG_DESC_HI, desc >> 32)
    await reg_write(device, L.REG_DOORBELL, 1)


def completion(view, desc=DESC):
    at = desc + L.COMPLETION_OFFSET
    return L.COMPLETION.unpack(view[at : at + L.COMPLETION.size])


def install_eventfd(device, index, vector=0):
    fd = make_eventfd()
    device.set_irqs(TRIGGER_EVENTFD, index, vector, 1, b"", [fd.dup()])
    return fd


def signals(fd: OwnedFd) -> int:
    """How many times the device signalled ``fd`` since the last call."""
    try:
        return os.eventfd_read(fd.fileno())
    except BlockingIOError:
        return 0


# --------------------------------------------------------------------- config space


def test_config_space_has_the_layout_ids_and_a_capability_chain(device):
    config = device.read_region(7, 0, L.CONFIG_SIZE)
    assert struct.unpack_from("<HH", config) == (L.VENDOR_ID, L.DEVICE_ID)
    assert struct.unpack_from("<HH", config, 0x2C) == (L.SUBSYSTEM_VENDOR_ID, L.SUBSYSTEM_ID)
    assert config[0x08] == L.REVISION and int.from_bytes(config[0x09:0x0C], "little") == (
        L.CLASS_CODE)
    assert config[0x06] & 0x10 and config[0x0E] == 0 and config[0x3D] == 1  # INTA#
    caps = [(c.cap_id, c.offset) for c in walk_capabilities(config)]
    assert caps == [(CapId.PM, L.CAP_PM), (CapId.MSI, L.CAP_MSI), (CapId.PCIE, L.CAP_PCIE),
                    (CapId.MSIX, L.CAP_MSIX)]
    assert config[0x100:0x104] == bytes(4)


def test_capabilities_describe_msi_pcie_and_msix_as_the_layout_says(device):
    assert cfg16(device, L.CAP_MSI + 2) & 0x0180 == 0x0180  # 64-bit, per-vector mask
    assert (cfg16(device, L.CAP_MSI + 2) >> 1) & 0x7 == 0  # 1 vector
    assert cfg16(device, L.CAP_PCIE + 2) == 0x0002  # version 2, endpoint
    assert cfg16(device, L.CAP_MSIX + 2) & 0x7FF == L.MSIX_VECTORS - 1
    assert cfg32(device, L.CAP_MSIX + 4) == L.MSIX_TABLE_OFFSET | L.MSIX_BAR
    assert cfg32(device, L.CAP_MSIX + 8) == L.MSIX_PBA_OFFSET | L.MSIX_BAR


def test_vendor_and_device_ids_can_be_overridden():
    dev = Device(vendor_id=0x1234, device_id=0x5678)
    try:
        assert dev.read_region(7, 0, 4) == bytes.fromhex("34127856")
        assert dev.read_region(6, 0x24, 4) == bytes.fromhex("34127856")  # the ROM's PCIR
    finally:
        dev.close()


@pytest.mark.parametrize("offset", [0x00, 0x02, 0x08, 0x0E, 0x2C, 0x34, 0x3D, L.CAP_MSIX + 4,
                                    L.CAP_PM + 1, 0x100])
async def test_read_only_config_fields_ignore_writes(device, offset):
    before = device.read_region(7, offset, 2)
    await device.write_region(7, offset, b"\xa5\x5a")
    assert device.read_region(7, offset, 2) == before


async def test_only_the_command_registers_writable_bits_change(device):
    await cfg_write(device, 0x04, 0xFFFF, 2)
    assert cfg16(device, 0x04) == 0x0547


async def test_status_error_bits_are_write_one_to_clear(device):
    device.config.set_u16(0x06, device.config.u16(0x06) | 0x8000 | 0x2000)
    await cfg_write(device, 0x06, 0x8000 | 0x10, 2)
    assert cfg16(device, 0x06) == 0x2000 | 0x10  # cap-list bit stays


@pytest.mark.parametrize(
    ("offset", "sized", "type_bits"),
    [(0x10, 0xFFFFF000, 0), (0x14, 0xFFFFFF01, 1), (0x18, 0xFFFF000C, 0xC),
     (0x1C, 0xFFFFFFFF, 0), (0x20, 0, 0), (0x24, 0, 0)],
)
async def test_bar_sizing_reads_back_the_size_mask_with_the_type_bits(
    device, offset, sized, type_bits
):
    await cfg_write(device, offset, 0xFFFFFFFF)
    assert cfg32(device, offset) == sized
    await cfg_write(device, offset, 0)
    assert cfg32(device, offset) == type_bits


async def test_rom_probe_reads_back_a_4k_rom_as_qemu_expects(device):
    await cfg_write(device, 0x30, 0xFFFFF800)
    value = cfg32(device, 0x30)
    assert value == 0xFFFFF000
    assert (~(value & 0xFFFFF800) & 0xFFFFFFFF) + 1 == L.ROM_SIZE
    await cfg_write(device, 0x30, 0xFEB40001)
    assert cfg32(device, 0x30) == 0xFEB40001


@pytest.mark.parametrize(("offset", "size"), [(0x0C, 1), (0x0D, 1), (0x3C, 1)])
async def test_cache_line_latency_timer_and_interrupt_line_are_writable(device, offset, size):
    await cfg_write(device, offset, 0x5A, size)
    assert device.read_region(7, offset, 1) == b"\x5a"


async def test_msi_msix_and_pm_control_bits_are_writable_and_the_rest_is_not(device):
    await cfg_write(device, L.CAP_MSI + 2, 0xFFFF, 2)
    assert cfg16(device, L.CAP_MSI + 2) == 0x0180 | 0x0071
    await cfg_write(device, L.CAP_MSIX + 2, 0xFFFF, 2)
    assert cfg16(device, L.CAP_MSIX + 2) == 0xC000 | (L.MSIX_VECTORS - 1)
    await cfg_write(device, L.CAP_PM + 4, 0xFFFF, 2)
    assert cfg16(device, L.CAP_PM + 4) == 0x0008 | 0x3


async def test_config_accepts_any_width_and_alignment(device):
    await device.write_region(7, 0x3B, b"\x11\x22\x33")  # max_lat is RO, line and pin
    assert device.read_region(7, 0x3B, 3) == b"\x00\x22\x01"
    assert device.read_region(7, 0xFFF, 1) == b"\x00"


def test_the_rom_is_a_valid_option_rom_image(device):
    rom = device.read_region(6, 0, L.ROM_SIZE)
    assert rom[:3] == bytes((0x55, 0xAA, L.ROM_SIZE // 512)) and sum(rom) % 256 == 0
    pcir = struct.unpack_from("<H", rom, 0x18)[0]
    assert rom[pcir : pcir + 4] == b"PCIR"
    assert struct.unpack_from("<HH", rom, pcir + 4) == (L.VENDOR_ID, L.DEVICE_ID)


# --------------------------------------------------------------------- regions


@pytest.mark.parametrize(
    ("index", "offset", "count"),
    [(0, 0xFFD, 4), (1, 0x100, 1), (2, 0x10000, 1), (3, 0, 1), (6, 0, L.ROM_SIZE + 1),
     (7, 0x1000, 1), (8, 0, 1), (9, 0, 0), (0xDEADBEEF, 0, 4)],
)
def test_accesses_outside_a_region_are_refused_with_einval(device, index, offset, count):
    with pytest.raises(DeviceError) as info:
        device.read_region(index, offset, count)
    assert info.value.errno == errno.EINVAL


async def test_the_rom_refuses_writes(device):
    with pytest.raises(DeviceError) as info:
        await device.write_region(6, 0, b"\0")
    assert info.value.errno == errno.EINVAL


async def test_bar0_registers_read_write_as_the_layout_says(device):
    assert reg(device, L.REG_ID) == L.REG_ID_VALUE
    for offset in (L.REG_DESC_LO, L.REG_DESC_HI, L.REG_SCRATCH):
        await reg_write(device, offset, 0x12345678 + offset)
        assert reg(device, offset) == 0x12345678 + offset
    for offset in (L.REG_ID, L.REG_STATUS, L.REG_DOORBELL_COUNT, 0x20, 0xFFC):
        before = reg(device, offset)
        await reg_write(device, offset, 0xFFFFFFFF)
        assert reg(device, offset) == before


async def test_bar0_takes_partial_and_two_register_accesses(device):
    await device.write_region(0, L.REG_SCRATCH + 1, b"\xab")
    assert reg(device, L.REG_SCRATCH) == 0xAB00
    await device.write_region(0, L.REG_DESC_LO, struct.pack("<II", 0x1000, 0x2))
    assert device.read_region(0, L.REG_DESC_LO, 8) == struct.pack("<II", 0x1000, 0x2)
    assert device.read_region(0, 1, 2) == struct.pack("<I", L.REG_ID_VALUE)[1:3]


async def test_bar1_has_four_scratch_dwords_and_reads_zero_above(device):
    await device.write_region(1, 0, bytes(range(1, 33)))
    assert device.read_region(1, 0, 32) == bytes(range(1, 17)) + bytes(16)


async def test_bar2_ram_is_the_memfd_the_client_can_map(device):
    view = mmap.mmap(device.bar2_fd.fileno(), L.BAR2_MMAP_SIZE)
    try:
        await device.write_region(2, 0x10, b"from the region")
        assert view[0x10:0x1F] == b"from the region"
        view[0x7FF0:0x8000] = b"from the mapping"
        assert device.read_region(2, 0x7FF0, 16) == b"from the mapping"
    finally:
        view.close()


async def test_msix_table_entries_are_writable_within_their_masks_and_the_pba_is_not(device):
    entry = L.MSIX_TABLE_OFFSET + 16
    await device.write_region(2, entry, b"\xff" * 16)
    assert device.read_region(2, entry, 16) == struct.pack("<IIII", 0xFFFFFFFC, 0xFFFFFFFF,
                                                          0xFFFFFFFF, 1)
    await device.write_region(2, L.MSIX_PBA_OFFSET, b"\xff" * 8)
    assert device.read_region(2, L.MSIX_PBA_OFFSET, 8) == bytes(8)
    assert device.read_region(2, L.MSIX_TABLE_OFFSET + 0x40, 16) == bytes(16)


async def test_a_bar2_access_may_span_the_ram_and_the_table(device):
    await device.write_region(2, L.BAR2_MMAP_SIZE - 4, b"\x01\x02\x03\x04\x05\x06\x07\x08")
    assert device.read_region(2, L.BAR2_MMAP_SIZE - 4, 8) == b"\x01\x02\x03\x04\x04\x06\x07\x08"


# --------------------------------------------------------------------- the DMA engine


@pytest.mark.parametrize(
    ("op", "expected"),
    [(L.OP_COPY, lambda d: d), (L.OP_INVERT, lambda d: bytes(b ^ 0xFF for b in d)),
     (L.OP_CRC32, lambda d: zlib.crc32(d).to_bytes(4, "little"))],
)
async def test_a_doorbell_runs_the_descriptor_and_writes_its_completion(mapped, op, expected):
    device, view = mapped
    data = bytes(range(200))
    view[SRC : SRC + len(data)] = data
    put_descriptor(view, length=len(data), op=op)
    await ring(device)
    out = expected(data)
    assert view[DST : DST + len(out)] == out
    assert completion(view) == (L.COMPLETION_OK, zlib.crc32(out), 0xC0FFEE, len(out))
    assert reg(device, L.REG_STATUS) == L.STATUS_DONE
    assert reg(device, L.REG_DOORBELL_COUNT) == 1
    assert reg(device, L.REG_IRQ_STATUS) == L.IRQ_STATUS_DONE


@pytest.mark.parametrize(
    ("fields", "code"),
    [({"op": 7}, errno.EINVAL), ({"length": L.MAX_TRANSFER + 1}, errno.EINVAL),
     ({"src": RAM - 8}, errno.EFAULT), ({"dst": 0x7FFFFFFF00}, errno.EFAULT)],
)
async def test_a_bad_descriptor_completes_with_an_error_and_the_device_carries_on(
    mapped, fields, code
):
    device, view = mapped
    put_descriptor(view, **fields)
    await ring(device)
    assert completion(view) == (L.COMPLETION_ERROR | code, 0, 0xC0FFEE, 0)
    assert reg(device, L.REG_STATUS) == L.STATUS_ERROR
    assert reg(device, L.REG_DOORBELL_COUNT) == 1 and reg(device, L.REG_IRQ_STATUS) == 1
    put_descriptor(view)
    await ring(device)
    assert reg(device, L.REG_STATUS) == L.STATUS_DONE


async def test_a_descriptor_in_unmapped_memory_sets_the_error_status(mapped):
    device, _ = mapped
    await ring(device, desc=0x10_0000_0000)
    assert reg(device, L.REG_STATUS) == L.STATUS_ERROR
    assert reg(device, L.REG_DOORBELL_COUNT) == 1


async def test_dma_into_a_read_only_window_faults_like_an_iommu(device, ram):
    fd, view = ram
    device.dma.map(iova=0, size=0x3000, offset=0, flags=RW, fd=fd.dup())
    device.dma.map(iova=0x3000, size=0x2000, offset=0x3000, flags=DmaMapFlags.READ,
                   fd=fd.dup())
    put_descriptor(view)
    await ring(device)
    assert completion(view)[0] == L.COMPLETION_ERROR | errno.EFAULT
    assert view[DST : DST + 16] == bytes(16)


async def test_dma_spans_adjacent_windows(device, ram):
    fd, view = ram
    device.dma.map(iova=0, size=0x2100, offset=0, flags=RW, fd=fd.dup())
    device.dma.map(iova=0x2100, size=0x10000, offset=0x2100, flags=RW, fd=fd.dup())
    view[SRC : SRC + 0x200] = b"\x5a" * 0x200
    put_descriptor(view, length=0x200)
    await ring(device)
    assert view[DST : DST + 0x200] == b"\x5a" * 0x200


class FakeClientMemory:
    """A message transport over a bytearray, standing in for a client."""

    def __init__(self, size=0x10000, fail=0):
        self.memory = bytearray(size)
        self.fail = fail
        self.calls = []

    async def dma_read(self, iova, count):
        self.calls.append(("read", iova, count))
        if self.fail:
            raise DmaFault(self.fail, "refused")
        return bytes(self.memory[iova : iova + count])

    async def dma_write(self, iova, data):
        self.calls.append(("write", iova, len(data)))
        if self.fail:
            raise DmaFault(self.fail, "refused")
        self.memory[iova : iova + len(data)] = data


async def test_windows_without_an_fd_go_through_the_message_transport():
    client = FakeClientMemory()
    device = Device(transport=client)
    try:
        device.dma.map(iova=0, size=0x10000, offset=0, flags=RW, fd=None)
        client.memory[DESC : DESC + 32] = L.DESCRIPTOR.pack(SRC, DST, 8, L.OP_INVERT, 5)
        client.memory[SRC : SRC + 8] = b"\x0f" * 8
        await ring(device)
        assert client.memory[DST : DST + 8] == b"\xf0" * 8
        assert [c[0] for c in client.calls] == ["read", "read", "write", "write"]
        assert reg(device, L.REG_STATUS) == L.STATUS_DONE
    finally:
        device.close()


async def test_a_refused_message_transfer_completes_with_the_clients_errno():
    client = FakeClientMemory()
    device = Device(transport=client)
    try:
        device.dma.map(iova=0, size=0x10000, offset=0, flags=RW, fd=None)
        client.memory[DESC : DESC + 32] = L.DESCRIPTOR.pack(SRC, DST, 8, L.OP_COPY, 5)
        await reg_write(device, L.REG_DESC_LO, DESC)
        client.fail = errno.EPERM
        await reg_write(device, L.REG_DOORBELL, 1)
        assert reg(device, L.REG_STATUS) == L.STATUS_ERROR
    finally:
        device.close()


async def test_a_memfd_shrunk_under_the_mapping_faults_instead_of_killing_the_server(device):
    fd = make_memfd("shrinking", 0x10000)
    device.dma.map(iova=0, size=0x10000, offset=0, flags=RW, fd=fd.dup())
    os.ftruncate(fd.fileno(), 0x1000)
    fd.close()
    with pytest.raises(DmaFault):
        await device.dma.read(0x8000, 16)


# --------------------------------------------------------------------- DMA windows


async def test_dma_windows_follow_libvfio_users_rules(device, ram):
    fd, _ = ram
    dma = device.dma
    dma.map(iova=0x10000, size=0x10000, offset=0x10000, flags=RW, fd=fd.dup())
    dma.map(iova=0x10000, size=0x10000, offset=0x10000, flags=RW, fd=fd.dup())  # identical
    assert len(dma.windows) == 1
    refused = [
        {"iova": 0x10000, "size": 0x10000, "offset": 0, "flags": RW},  # other offset
        {"iova": 0x10000, "size": 0x10000, "offset": 0x10000, "flags": 1},  # other flags
        {"iova": 0x18000, "size": 0x10000, "offset": 0, "flags": RW},  # overlap
        {"iova": 0x8000, "size": 0x10000, "offset": 0, "flags": RW},  # overlap
        {"iova": 0, "size": 0x1000, "offset": 0, "flags": 0x4},  # MMAP extension flag
        {"iova": 0, "size": 0, "offset": 0, "flags": RW},  # empty
        {"iova": 0, "size": RAM * 2, "offset": 0, "flags": RW},  # beyond the file
    ]
    for args in refused:
        with pytest.raises(DeviceError) as info:
            dma.map(fd=fd.dup(), **args)
        assert info.value.errno == errno.EINVAL, args
    with pytest.raises(DeviceError) as info:
        dma.unmap(0x10000, 0x1000)
    assert info.value.errno == errno.ENOENT
    dma.unmap(0x10000, 0x10000)
    assert not dma.windows


def test_a_dma_map_fd_must_be_a_file_or_memfd(device):
    with pytest.raises(DeviceError) as info:
        device.dma.map(iova=0, size=8, offset=0, flags=RW, fd=make_eventfd())
    assert info.value.errno == errno.EINVAL


def test_unmap_all_drops_every_window(device, ram):
    fd, _ = ram
    for i in range(4):
        device.dma.map(iova=i << 12, size=0x1000, offset=i << 12, flags=RW, fd=fd.dup())
    device.dma.map(iova=0xFFFC0000, size=0x40000, offset=0, flags=DmaMapFlags.READ, fd=None)
    device.dma.unmap_all()
    assert not device.dma.windows


async def test_dirty_logging_reports_the_devices_own_writes_once(mapped):
    device, view = mapped
    device.dma.start_logging(0x1000)
    put_descriptor(view, dst=0x5FF8, length=16)
    await ring(device)
    bitmap = device.dma.report(0, RAM, 0x1000)
    assert len(bitmap) == RAM // 0x1000 // 8
    pages = {i for i in range(RAM // 0x1000) if bitmap[i // 8] >> (i % 8) & 1}
    assert pages == {0x1, 0x5, 0x6}  # the completion record, and dst across two pages
    assert device.dma.report(0, RAM, 0x1000) == bytes(len(bitmap))
    put_descriptor(view, dst=0x5FF8, length=16)
    await ring(device)
    coarse = device.dma.report(0, RAM, 0x10000)
    assert coarse == b"\x01" + bytes(7)


def test_dirty_reports_are_refused_as_libvfio_user_refuses_them(device, ram):
    fd, _ = ram
    dma = device.dma
    dma.map(iova=0, size=0x10000, offset=0, flags=RW, fd=fd.dup())
    dma.map(iova=0x10000, size=0x10000, offset=0, flags=RW, fd=None)
    with pytest.raises(DeviceError) as info:
        dma.report(0, 0x10000, 0x1000)
    assert info.value.errno == errno.EINVAL  # logging off
    dma.start_logging(0x1000)
    cases = [((0x100000, 0x1000, 0x1000), errno.ENOENT), ((0, 0x8000, 0x1000), errno.ENOTSUP),
             ((0, 0x10000, 0x3000), errno.EINVAL), ((0x10000, 0x10000, 0x1000), errno.EINVAL)]
    for args, code in cases:
        with pytest.raises(DeviceError) as info:
            dma.report(*args)
        assert info.value.errno == code, args
    with pytest.raises(DeviceError):
        dma.start_logging(0x2000)


# --------------------------------------------------------------------- interrupts


async def test_intx_fires_once_then_stays_masked_until_unmasked(mapped):
    device, view = mapped
    intx = install_eventfd(device, IrqIndex.INTX)
    try:
        put_descriptor(view)
        await ring(device)
        assert signals(intx) == 1
        assert cfg16(device, 0x06) & 0x08  # interrupt status
        await ring(device)
        assert signals(intx) == 0  # automasked
        device.set_irqs(IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_UNMASK, 0, 0, 1, b"", [])
        assert signals(intx) == 1  # the line is still asserted
        await reg_write(device, L.REG_IRQ_STATUS, L.IRQ_STATUS_DONE)
        assert not cfg16(device, 0x06) & 0x08
        device.set_irqs(IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_UNMASK, 0, 0, 1, b"", [])
        assert signals(intx) == 0
    finally:
        intx.close()


async def test_the_intx_disable_bit_holds_intx_back(mapped):
    device, view = mapped
    intx = install_eventfd(device, IrqIndex.INTX)
    try:
        await cfg_write(device, 0x04, 0x0400, 2)
        put_descriptor(view)
        await ring(device)
        assert signals(intx) == 0
        await cfg_write(device, 0x04, 0, 2)
        assert signals(intx) == 1
    finally:
        intx.close()


async def test_msi_is_used_when_enabled_and_holds_its_pending_bit_while_masked(mapped):
    device, view = mapped
    intx, msi = install_eventfd(device, IrqIndex.INTX), install_eventfd(device, IrqIndex.MSI)
    try:
        await cfg_write(device, L.CAP_MSI + 2, 0x1, 2)
        put_descriptor(view)
        await ring(device)
        assert (signals(msi), signals(intx)) == (1, 0)
        await cfg_write(device, L.CAP_MSI + 0x10, 1)
        await ring(device)
        assert signals(msi) == 0 and cfg32(device, L.CAP_MSI + 0x14) == 1
        await cfg_write(device, L.CAP_MSI + 0x10, 0)
        assert signals(msi) == 1 and cfg32(device, L.CAP_MSI + 0x14) == 0
    finally:
        intx.close()
        msi.close()


async def test_msix_vector_0_fires_and_masking_sets_the_pending_bit(mapped):
    device, view = mapped
    msix = install_eventfd(device, IrqIndex.MSIX)
    try:
        await cfg_write(device, L.CAP_MSIX + 2, 0x8000, 2)
        put_descriptor(view)
        await ring(device)
        assert signals(msix) == 1
        await cfg_write(device, L.CAP_MSIX + 2, 0xC000, 2)  # function mask
        await ring(device)
        assert signals(msix) == 0 and device.read_region(2, L.MSIX_PBA_OFFSET, 1) == b"\x01"
        await device.write_region(2, L.MSIX_TABLE_OFFSET + 12, b"\x01")  # vector mask
        await cfg_write(device, L.CAP_MSIX + 2, 0x8000, 2)
        assert signals(msix) == 0
        await device.write_region(2, L.MSIX_TABLE_OFFSET + 12, b"\x00")
        assert signals(msix) == 1 and device.read_region(2, L.MSIX_PBA_OFFSET, 1) == b"\x00"
    finally:
        msix.close()


async def test_a_vfio_masked_msix_vector_delivers_on_unmask(mapped):
    device, view = mapped
    msix = install_eventfd(device, IrqIndex.MSIX)
    try:
        await cfg_write(device, L.CAP_MSIX + 2, 0x8000, 2)
        device.set_irqs(IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_MASK, 2, 0, 1, b"", [])
        put_descriptor(view)
        await ring(device)
        assert signals(msix) == 0
        device.set_irqs(IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_UNMASK, 2, 0, 1, b"", [])
        assert signals(msix) == 1
    finally:
        msix.close()


NONE_TRIGGER = IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER


@pytest.mark.parametrize(
    ("flags", "index", "start", "count", "data", "nfds"),
    [
        (NONE_TRIGGER, 5, 0, 1, b"", 0),  # no such index
        (IrqSetFlags.DATA_NONE, 0, 0, 1, b"", 0),  # no action
        (NONE_TRIGGER | IrqSetFlags.ACTION_MASK, 0, 0, 1, b"", 0),  # two actions
        (IrqSetFlags.DATA_NONE | IrqSetFlags.DATA_BOOL | IrqSetFlags.ACTION_TRIGGER, 0, 0, 1,
         b"\x01", 0),
        (NONE_TRIGGER, 2, L.MSIX_VECTORS, 1, b"", 0),  # start beyond
        (NONE_TRIGGER, 2, 2, L.MSIX_VECTORS, b"", 0),  # start + count beyond
        (IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_MASK, 3, 0, 1, b"", 0),  # ERR: trigger only
        (NONE_TRIGGER, 0, 1, 0, b"", 0),  # count 0 needs start 0
        (TRIGGER_EVENTFD, 0, 0, 0, b"", 0),  # count 0 needs DATA_NONE
        (NONE_TRIGGER, 0, 0, 1, b"", 1),  # fds without DATA_EVENTFD
        (TRIGGER_EVENTFD, 2, 0, 2, b"", 1),  # fewer fds than vectors
        (IrqSetFlags.DATA_BOOL | IrqSetFlags.ACTION_TRIGGER, 2, 0, 2, b"\x01", 0),
    ],
)
def test_set_irqs_refuses_what_libvfio_user_refuses(device, flags, index, start, count, data,
                                                    nfds):
    fds = [make_eventfd() for _ in range(nfds)]
    with pytest.raises(DeviceError) as info:
        device.set_irqs(flags, index, start, count, data, fds)
    assert info.value.errno == errno.EINVAL
    assert all(fd.closed for fd in fds)


def test_set_irqs_refuses_an_fd_that_is_not_an_eventfd(device):
    memfd = make_memfd("not-an-eventfd", 8)
    with pytest.raises(DeviceError):
        device.set_irqs(TRIGGER_EVENTFD, 0, 0, 1, b"", [memfd])
    assert memfd.closed


def test_eventfds_replace_earlier_ones_and_count_0_disables_the_index(device):
    first, second = make_eventfd(), make_eventfd()
    try:
        device.set_irqs(TRIGGER_EVENTFD, 2, 0, 2, b"", [first.dup(), second.dup()])
        old = device.irqs.line(2, 0).eventfd
        replacement = make_eventfd()
        device.set_irqs(TRIGGER_EVENTFD, 2, 0, 1, b"", [replacement])
        assert old.closed and device.irqs.line(2, 0).eventfd is replacement
        device.set_irqs(TRIGGER_EVENTFD, 2, 1, 1, b"", [])  # no fds: remove
        assert device.irqs.line(2, 1).eventfd is None
        device.set_irqs(NONE_TRIGGER, 2, 0, 0, b"", [])
        assert replacement.closed and device.irqs.line(2, 0).eventfd is None
    finally:
        first.close()
        second.close()


def test_data_none_and_bool_triggers_fire_the_eventfds_directly(device):
    fds = [make_eventfd() for _ in range(L.MSIX_VECTORS)]
    try:
        device.set_irqs(TRIGGER_EVENTFD, 2, 0, len(fds), b"", [fd.dup() for fd in fds])
        device.set_irqs(NONE_TRIGGER, 2, 1, 2, b"", [])
        assert [signals(fd) for fd in fds] == [0, 1, 1, 0]
        device.set_irqs(IrqSetFlags.DATA_BOOL | IrqSetFlags.ACTION_TRIGGER, 2, 0, 4,
                        b"\x01\x00\x00\x01", [])
        assert [signals(fd) for fd in fds] == [1, 0, 0, 1]
    finally:
        close_all(fds)


def test_mask_and_unmask_with_eventfds_unmask_at_once_and_close_the_fds(device):
    fd = make_eventfd()
    device.irqs.line(0).masked = True
    device.set_irqs(IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_UNMASK, 0, 0, 1, b"", [fd])
    assert fd.closed and not device.irqs.line(0).masked


def test_a_full_eventfd_counter_never_blocks_the_device(device):
    fd = make_eventfd(nonblocking=False)
    try:
        os.eventfd_write(fd.fileno(), 0xFFFFFFFFFFFFFFFE)
        device.set_irqs(TRIGGER_EVENTFD, 3, 0, 1, b"", [fd.dup()])
        device.set_irqs(NONE_TRIGGER, 3, 0, 1, b"", [])
        assert os.eventfd_read(fd.fileno()) == 0xFFFFFFFFFFFFFFFE
    finally:
        fd.close()


# --------------------------------------------------------------------- reset


async def test_reset_restores_power_on_state_but_keeps_maps_eventfds_and_ram(mapped):
    device, _ = mapped
    intx = install_eventfd(device, IrqIndex.INTX)
    try:
        power_on = device.read_region(7, 0, L.CONFIG_SIZE)
        await cfg_write(device, 0x04, 0x0006, 2)
        await cfg_write(device, L.CAP_MSIX + 2, 0x8000, 2)
        await cfg_write(device, 0x10, 0xFEB80000)
        await reg_write(device, L.REG_SCRATCH, 7)
        await device.write_region(1, 0, b"\x01")
        await device.write_region(2, 0, b"ram")
        device.irqs.line(0).masked = True
        device.reset()
        assert device.read_region(7, 0, L.CONFIG_SIZE) == power_on
        assert reg(device, L.REG_SCRATCH) == 0 and device.read_region(1, 0, 1) == b"\0"
        assert device.read_region(2, 0, 3) == b"ram"
        assert not device.irqs.line(0).masked and device.irqs.line(0).eventfd is not None
        assert len(device.dma.windows) == 1
    finally:
        intx.close()


# --------------------------------------------------------------------- migration

S = MigrationState


@pytest.mark.parametrize(
    ("current", "target", "step"),
    [(S.RUNNING, S.STOP, S.STOP), (S.STOP_COPY, S.STOP, S.STOP), (S.RESUMING, S.STOP, S.STOP),
     (S.PRE_COPY, S.RUNNING, S.RUNNING), (S.STOP, S.RUNNING, S.RUNNING),
     (S.RUNNING, S.PRE_COPY, S.PRE_COPY), (S.STOP, S.STOP_COPY, S.STOP_COPY),
     (S.PRE_COPY, S.STOP_COPY, S.STOP_COPY), (S.STOP, S.RESUMING, S.RESUMING),
     (S.RUNNING, S.STOP_COPY, S.STOP), (S.RUNNING, S.RESUMING, S.STOP),
     (S.STOP_COPY, S.PRE_COPY, None), (S.RUNNING, S.ERROR, None), (S.ERROR, S.RUNNING, None),
     (S.RUNNING, S.RUNNING_P2P, None)],
)
def test_migration_steps_follow_libvfio_users_table(current, target, step):
    assert next_migration_state(current, target) == step


async def test_a_refused_migration_target_is_einval_and_error_is_left_only_by_reset(device):
    await device.set_migration_state(S.STOP_COPY)  # via STOP
    with pytest.raises(DeviceError):
        await device.set_migration_state(S.PRE_COPY)
    await device.set_migration_state(S.RESUMING)
    with pytest.raises(DeviceError):
        await device.set_migration_state(S.RUNNING)  # an empty stream
    assert device.migration_state == S.ERROR
    with pytest.raises(DeviceError):
        await device.set_migration_state(S.STOP)
    with pytest.raises(DeviceError):
        await device.set_migration_state(99)
    device.reset()
    assert device.migration_state == S.RUNNING


async def read_stream(device, chunk=1000):
    data = b""
    while piece := device.read_migration_data(chunk):
        data += piece
    return data


async def test_the_state_stream_moves_the_device_to_another_instance(mapped):
    device, view = mapped
    put_descriptor(view)
    await ring(device)
    await cfg_write(device, 0x04, 0x0006, 2)
    await device.write_region(2, 0x100, b"ram contents")
    await device.write_region(1, 4, b"\x77")
    await device.set_migration_state(S.PRE_COPY)
    early = device.read_migration_data(5000)
    await device.write_region(2, 0x100, b"RAM CONTENTS")  # changed after the pre-copy
    await device.set_migration_state(S.STOP_COPY)
    stream = early + await read_stream(device)
    await device.set_migration_state(S.STOP)
    target = Device()
    try:
        await target.set_migration_state(S.RESUMING)
        for at in range(0, len(stream), 4096):
            target.write_migration_data(stream[at : at + 4096])
        await target.set_migration_state(S.RUNNING)
        for index, size in ((0, 0x20), (1, 16), (2, L.BAR2_SIZE), (7, L.CONFIG_SIZE)):
            assert target.read_region(index, 0, size) == device.read_region(index, 0, size)
        assert target.read_region(2, 0x100, 12) == b"RAM CONTENTS"
    finally:
        target.close()


@pytest.mark.parametrize("damage", ["truncate", "flip", "extra", "other-device", "empty"])
async def test_a_bad_stream_fails_the_transition_and_puts_the_device_in_error(device, damage):
    await device.set_migration_state(S.STOP_COPY)
    stream = await read_stream(device)
    if damage == "other-device":
        source = Device(vendor_id=0x1234)
        await source.set_migration_state(S.STOP_COPY)
        stream = await read_stream(source)
        source.close()
    stream = {
        "truncate": stream[:-1],
        "flip": stream[:100] + bytes([stream[100] ^ 1]) + stream[101:],
        "extra": stream + b"\0",
        "other-device": stream,
        "empty": b"",
    }[damage]
    target = Device()
    try:
        await target.set_migration_state(S.RESUMING)
        target.write_migration_data(stream)
        with pytest.raises(DeviceError) as info:
            await target.set_migration_state(S.STOP)
        assert info.value.errno == errno.EINVAL and target.migration_state == S.ERROR
    finally:
        target.close()


def test_the_stream_decoder_names_what_is_wrong():
    with pytest.raises(DeviceError, match="no device record"):
        decode_state_stream(b"", vendor_id=L.VENDOR_ID, device_id=L.DEVICE_ID)


async def test_migration_data_only_flows_in_the_states_that_carry_it(device):
    with pytest.raises(DeviceError):
        device.read_migration_data(16)
    with pytest.raises(DeviceError):
        device.write_migration_data(b"x")
    await device.set_migration_state(S.RESUMING)
    with pytest.raises(DeviceError):
        device.write_migration_data(bytes(MAX_INCOMING_STREAM + 1))


async def test_a_doorbell_rung_while_stopped_runs_when_the_device_runs_again(mapped):
    device, view = mapped
    put_descriptor(view)
    await device.set_migration_state(S.STOP)
    await ring(device)
    assert reg(device, L.REG_DOORBELL_COUNT) == 0 and view[DST : DST + 16] == bytes(16)
    await device.set_migration_state(S.RUNNING)
    assert reg(device, L.REG_DOORBELL_COUNT) == 1 and completion(view)[0] == L.COMPLETION_OK
