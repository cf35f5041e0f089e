"""PCI config space with hardware write masks, power-on contents, the expansion ROM."""

from __future__ import annotations

import struct

from vfioproxy.peers import layout as L
from vfioproxy.protocol.pci import (
    BAR0_OFFSET,
    CAP_PTR,
    ROM_BAR,
    STATUS,
    STATUS_CAP_LIST,
    CapId,
)

# --------------------------------------------------------------------- config space

_COMMAND = 0x04
_COMMAND_WRITABLE = 0x0547  # I/O, memory, bus master, parity, SERR#, INTx disable
_COMMAND_INTX_DISABLE = 0x0400
_STATUS_INTERRUPT = 0x0008
_STATUS_RW1C = 0xF900
_MSI_CTL = L.CAP_MSI + 2
_MSI_MASK = L.CAP_MSI + 0x10
_MSI_PENDING = L.CAP_MSI + 0x14
_MSI_ENABLE = 0x0001
_MSIX_CTL = L.CAP_MSIX + 2
_MSIX_ENABLE = 0x8000
_MSIX_FUNCTION_MASK = 0x4000
_MSIX_ENTRY = 16
_MSIX_VECTOR_MASKED = 0x1
_MSIX_TABLE_SIZE = L.MSIX_VECTORS * _MSIX_ENTRY
#: per-entry write masks: address low (dword aligned), address high, data, vector control
_MSIX_ENTRY_WMASK = struct.pack("<IIII", 0xFFFFFFFC, 0xFFFFFFFF, 0xFFFFFFFF, 0x1)


class ConfigSpace:
    """4096 bytes of PCIe config space with per-byte write and RW1C masks."""

    def __init__(self) -> None:
        self.data = bytearray(L.CONFIG_SIZE)
        self.wmask = bytearray(L.CONFIG_SIZE)
        self.w1cmask = bytearray(L.CONFIG_SIZE)

    def define(self, offset: int, size: int, value: int, wmask: int = 0, w1c: int = 0) -> None:
        """Set a register's power-on value and which of its bits software may change."""
        self.data[offset : offset + size] = value.to_bytes(size, "little")
        self.wmask[offset : offset + size] = wmask.to_bytes(size, "little")
        self.w1cmask[offset : offset + size] = w1c.to_bytes(size, "little")

    def read(self, offset: int, count: int) -> bytes:
        return bytes(self.data[offset : offset + count])

    def write(self, offset: int, data: bytes) -> None:
        """A software write: only writable bits change, RW1C bits clear where 1 is written."""
        end = offset + len(data)
        old = int.from_bytes(self.data[offset:end], "little")
        wmask = int.from_bytes(self.wmask[offset:end], "little")
        w1c = int.from_bytes(self.w1cmask[offset:end], "little")
        value = int.from_bytes(data, "little")
        new = ((old & ~wmask) | (value & wmask)) & ~(value & w1c)
        self.data[offset:end] = new.to_bytes(len(data), "little")

    def u16(self, offset: int) -> int:
        return int.from_bytes(self.data[offset : offset + 2], "little")

    def u32(self, offset: int) -> int:
        return int.from_bytes(self.data[offset : offset + 4], "little")

    def set_u16(self, offset: int, value: int) -> None:
        """A device-side update (ignores the masks)."""
        self.data[offset : offset + 2] = value.to_bytes(2, "little")

    def set_u32(self, offset: int, value: int) -> None:
        """A device-side update (ignores the masks)."""
        self.data[offset : offset + 4] = value.to_bytes(4, "little")


def _bar_wmask(size: int, low: int) -> int:
    return ~(size - 1) & 0xFFFFFFFF & ~low


def power_on_config(vendor_id: int, device_id: int, *, rom: bool = True) -> ConfigSpace:
    """The config space of layout.py at power-on: type-0 header, PM → MSI → PCIe → MSI-X.

    Without ``rom`` the ROM BAR is read-only 0, as on hardware with no
    expansion ROM (sizing it reads back 0: no ROM BAR).
    """
    c = ConfigSpace()
    c.define(0x00, 2, vendor_id)
    c.define(0x02, 2, device_id)
    c.define(_COMMAND, 2, 0, wmask=_COMMAND_WRITABLE)
    c.define(STATUS, 2, STATUS_CAP_LIST, w1c=_STATUS_RW1C)
    c.define(0x08, 4, L.REVISION | L.CLASS_CODE << 8)
    c.define(0x0C, 1, 0, wmask=0xFF)  # cache line size
    c.define(0x0D, 1, 0, wmask=0xFF)  # latency timer
    c.define(BAR0_OFFSET, 4, 0x0, wmask=_bar_wmask(L.BAR0_SIZE, 0xF))  # mem32
    c.define(BAR0_OFFSET + 4, 4, 0x1, wmask=_bar_wmask(L.BAR1_SIZE, 0x3))  # I/O
    c.define(BAR0_OFFSET + 8, 4, 0xC, wmask=_bar_wmask(L.BAR2_SIZE, 0xF))  # mem64, prefetchable
    c.define(BAR0_OFFSET + 12, 4, 0x0, wmask=0xFFFFFFFF)  # BAR2's upper half
    c.define(0x2C, 2, L.SUBSYSTEM_VENDOR_ID)
    c.define(0x2E, 2, L.SUBSYSTEM_ID)
    if rom:
        c.define(ROM_BAR, 4, 0, wmask=_bar_wmask(L.ROM_SIZE, 0x7FF) | 0x1)  # address + enable
    c.define(CAP_PTR, 1, L.CAP_PM)
    c.define(0x3C, 1, 0, wmask=0xFF)  # interrupt line
    c.define(0x3D, 1, 0x01)  # interrupt pin INTA#
    # PM: version 3, D0 only, No_Soft_Reset; the power state bits are writable
    c.define(L.CAP_PM, 2, CapId.PM | L.CAP_MSI << 8)
    c.define(L.CAP_PM + 2, 2, 0x0003)
    c.define(L.CAP_PM + 4, 2, 0x0008, wmask=0x0003)
    # MSI: 64-bit, per-vector masking, 1 vector
    c.define(L.CAP_MSI, 2, CapId.MSI | L.CAP_PCIE << 8)
    c.define(_MSI_CTL, 2, 0x0180, wmask=0x0071)
    c.define(L.CAP_MSI + 4, 4, 0, wmask=0xFFFFFFFC)
    c.define(L.CAP_MSI + 8, 4, 0, wmask=0xFFFFFFFF)
    c.define(L.CAP_MSI + 0xC, 2, 0, wmask=0xFFFF)
    c.define(_MSI_MASK, 4, 0, wmask=(1 << L.MSI_VECTORS) - 1)
    # PCIe: version 2 endpoint, 2.5 GT/s x1
    c.define(L.CAP_PCIE, 2, CapId.PCIE | L.CAP_MSIX << 8)
    c.define(L.CAP_PCIE + 0x02, 2, 0x0002)
    c.define(L.CAP_PCIE + 0x04, 4, 0x00008000)  # device caps: role-based error reporting
    c.define(L.CAP_PCIE + 0x08, 2, 0x2810, wmask=0x79FF)  # device control
    c.define(L.CAP_PCIE + 0x0A, 2, 0, w1c=0x000F)  # device status
    c.define(L.CAP_PCIE + 0x0C, 4, 0x00000011)  # link caps
    c.define(L.CAP_PCIE + 0x10, 2, 0, wmask=0x00C3)  # link control
    c.define(L.CAP_PCIE + 0x12, 2, 0x0011)  # link status
    # MSI-X: table and PBA in BAR2; enable and function mask are writable
    c.define(L.CAP_MSIX, 2, CapId.MSIX)
    c.define(_MSIX_CTL, 2, L.MSIX_VECTORS - 1, wmask=_MSIX_ENABLE | _MSIX_FUNCTION_MASK)
    c.define(L.CAP_MSIX + 4, 4, L.MSIX_TABLE_OFFSET | L.MSIX_BAR)
    c.define(L.CAP_MSIX + 8, 4, L.MSIX_PBA_OFFSET | L.MSIX_BAR)
    return c


def build_rom(vendor_id: int, device_id: int) -> bytes:
    """A legacy x86 option ROM image: 55 aa, an init entry that returns, a PCIR
    structure naming this device, checksum byte making the image sum to 0."""
    rom = bytearray(L.ROM_SIZE)
    rom[0:3] = bytes((0x55, 0xAA, L.ROM_SIZE // 512))
    rom[3] = 0xCB  # init entry: retf
    struct.pack_into("<H", rom, 0x18, 0x20)  # offset of the PCI data structure
    # PCIR: ids, device list, length, revision, class code, image length, code
    # revision, code type (x86), indicator (last image), max runtime length
    struct.pack_into(
        "<4sHHHHBBBBHHBBH", rom, 0x20, b"PCIR", vendor_id, device_id, 0, 0x18, 0,
        L.CLASS_CODE & 0xFF, L.CLASS_CODE >> 8 & 0xFF, L.CLASS_CODE >> 16, L.ROM_SIZE // 512,
        1, 0, 0x80, 0,
    )
    rom[-1] = -sum(rom) & 0xFF
    return bytes(rom)
