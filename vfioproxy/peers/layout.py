"""The reference device's programming model, shared by its server and the client.

Everything a driver needs to know about the device that
``vfioproxy serve-device`` emulates and ``vfioproxy realize --workload``
drives: ids, BARs, registers, the DMA descriptor and its completion record,
and the guest-memory layout the realize client uses for the workload.
"""

from __future__ import annotations

import struct

# --------------------------------------------------------------------- identity

VENDOR_ID = 0x1B36  # Red Hat, Inc. (QEMU's vendor id for emulated test devices)
DEVICE_ID = 0x1100
SUBSYSTEM_VENDOR_ID = 0x1B36
SUBSYSTEM_ID = 0x1100
REVISION = 0x01
CLASS_CODE = 0xFF0000  # "unassigned class": a device no guest driver claims

# --------------------------------------------------------------------- regions

CONFIG_SIZE = 4096  # PCIe config space (no extended capabilities: dword 0x100 is 0)

#: BAR0: 32-bit memory BAR with the registers below (not mmap-able)
BAR0_SIZE = 0x1000
#: BAR1: I/O BAR (4 scratch dwords)
BAR1_SIZE = 0x100
#: BAR2 (+BAR3, its upper half): 64-bit prefetchable memory BAR backed by a
#: memfd. [0, MSIX_TABLE_OFFSET) is device RAM offered as a sparse-mmap area;
#: the MSI-X table and PBA above it are not mmap-able.
BAR2_SIZE = 0x10000
BAR2_MMAP_SIZE = 0x8000
MSIX_BAR = 2
MSIX_TABLE_OFFSET = 0x8000
MSIX_PBA_OFFSET = 0x9000
MSIX_VECTORS = 4
#: expansion ROM, starting with the 0x55 0xaa signature
ROM_SIZE = 0x1000

# --------------------------------------------------------------------- capabilities

CAP_PM = 0x40
CAP_MSI = 0x50  # 64-bit, per-vector masking, 1 vector
CAP_PCIE = 0x70  # PCIe endpoint, version 2
CAP_MSIX = 0xB0
MSI_VECTORS = 1

# --------------------------------------------------------------------- BAR0 registers

REG_ID = 0x00  # RO: REG_ID_VALUE
REG_ID_VALUE = 0x55504656  # "VFPU" little-endian
REG_STATUS = 0x04  # RO: STATUS_* bits
REG_DESC_LO = 0x08  # RW: IOVA of the next descriptor, low half
REG_DESC_HI = 0x0C  # RW: high half
REG_DOORBELL = 0x10  # WO: any write runs the descriptor at DESC
REG_IRQ_STATUS = 0x14  # RW1C: IRQ_STATUS_DONE set when the device raised its interrupt
REG_DOORBELL_COUNT = 0x18  # RO: doorbells processed since reset
REG_SCRATCH = 0x1C  # RW

STATUS_DONE = 0x1
STATUS_ERROR = 0x2
IRQ_STATUS_DONE = 0x1

# --------------------------------------------------------------------- descriptor

#: src_iova u64, dst_iova u64, length u32, op u32, cookie u64
DESCRIPTOR = struct.Struct("<QQIIQ")
#: written by the device at descriptor + COMPLETION_OFFSET when done:
#: status u32 (COMPLETION_OK, or COMPLETION_ERROR | errno), crc32 u32 of the
#: bytes written to dst, cookie u64 (echoed), bytes u64 (written to dst)
COMPLETION = struct.Struct("<IIQQ")
COMPLETION_OFFSET = 32
DESCRIPTOR_SIZE = 64
COMPLETION_OK = 1
COMPLETION_ERROR = 0x80000000
MAX_TRANSFER = 0x10000

OP_COPY = 0  # dst = src
OP_INVERT = 1  # dst = src ^ 0xff
OP_CRC32 = 2  # dst = crc32(src) as u32 (4 bytes)

# --------------------------------------------------------------------- client memory map

#: guest RAM of the realize client (QEMU q35, -m 512, memory-backend-memfd share=on)
GUEST_RAM_SIZE = 0x20000000
#: the BIOS ROM window QEMU maps read-only without an fd
BIOS_IOVA = 0xFFFC0000
BIOS_SIZE = 0x40000
#: where the workload puts its descriptor and buffers (inside guest RAM)
WORKLOAD_BASE = 0x00200000
