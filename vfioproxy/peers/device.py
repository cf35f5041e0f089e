"""The reference device model behind ``vfioproxy serve-device`` (no socket code).

One :class:`Device` per client session implements the programming model of
:mod:`vfioproxy.peers.layout` the way a libvfio-user device author would:

- PCI config space (:class:`ConfigSpace`) with write masks as hardware has
  them: writable, read-only and write-1-to-clear bits, BAR and ROM sizing;
- the regions: BAR0 registers and the DMA engine, BAR1 I/O scratch, BAR2
  RAM (a memfd the client may mmap) plus the emulated MSI-X table and PBA,
  the expansion ROM, config space;
- DMA windows (:class:`DmaSpace`): fd-backed windows through mmap, the
  others through DMA_READ/DMA_WRITE messages that the session sends for it
  (:class:`MessageDma`), dirty-page logging of the device's own writes;
- interrupts (:class:`Interrupts`): the eventfds the client installed,
  VFIO masking, INTx automask, MSI/MSI-X pending bits;
- VFIO migration: the state machine, and the state stream of
  :func:`encode_state_records` / :func:`decode_state_stream`.

Whatever the caller asks, the model never crashes: a request it refuses
raises :class:`DeviceError` carrying the errno for the error reply, and a
DMA that faults completes its descriptor with an error status.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import select
import stat
import struct
import zlib
from bisect import bisect_right
from collections.abc import Sequence
from typing import Protocol

import attrs

from vfioproxy.errors import VfioProxyError
from vfioproxy.io.fds import FdKind, OwnedFd, close_all, inspect_fd, make_memfd
from vfioproxy.peers import layout as L
from vfioproxy.protocol.constants import (
    IRQ_SET_ACTION_MASK,
    IRQ_SET_DATA_MASK,
    DmaMapFlags,
    IrqIndex,
    IrqInfoFlags,
    IrqSetFlags,
    MigrationState,
)
from vfioproxy.protocol.pci import (
    BAR0_OFFSET,
    CAP_PTR,
    ROM_BAR,
    STATUS,
    STATUS_CAP_LIST,
    CapId,
    Region,
)

__all__ = [
    "IRQ_COUNTS",
    "IRQ_INFO_FLAGS",
    "MAX_DMA_MAPS",
    "MAX_INCOMING_STREAM",
    "NUM_REGIONS",
    "REGION_SIZES",
    "ConfigSpace",
    "Device",
    "DeviceError",
    "DmaFault",
    "DmaSpace",
    "DmaWindow",
    "Interrupts",
    "IrqLine",
    "MessageDma",
    "Registers",
    "Snapshot",
    "build_rom",
    "decode_state_stream",
    "encode_state_records",
    "next_migration_state",
    "power_on_config",
]


class DeviceError(VfioProxyError):
    """The device refuses a request; ``errno`` is what the error reply carries."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{text} ({errno.errorcode.get(code, code)})")
        self.errno = code


class DmaFault(DeviceError):
    """A DMA access failed (unmapped iova, permission, or the client refused it)."""


class MessageDma(Protocol):
    """Access to DMA windows that have no fd: DMA_READ / DMA_WRITE messages.

    Implemented by the session; each call raises :class:`DmaFault` when the
    client cannot complete the transfer.
    """

    async def dma_read(self, iova: int, count: int) -> bytes: ...

    async def dma_write(self, iova: int, data: bytes) -> None: ...


# --------------------------------------------------------------------- regions

NUM_REGIONS = 9
#: region index -> size (BAR3 is the upper half of 64-bit BAR2; BAR4/5 and VGA are absent)
REGION_SIZES: dict[int, int] = {
    Region.BAR0: L.BAR0_SIZE,
    Region.BAR1: L.BAR1_SIZE,
    Region.BAR2: L.BAR2_SIZE,
    Region.ROM: L.ROM_SIZE,
    Region.CONFIG: L.CONFIG_SIZE,
}
#: the client-visible scratch of BAR1: 4 dwords; the rest of the I/O BAR reads 0
_BAR1_SCRATCH = 16
#: largest DMA window table, as advertised in VERSION (``max_dma_maps``)
MAX_DMA_MAPS = 65535


def _span(offset: int, count: int, start: int, end: int) -> tuple[int, int] | None:
    """The part of ``[offset, offset+count)`` inside ``[start, end)``, or None."""
    lo, hi = max(offset, start), min(offset + count, end)
    return (lo, hi) if lo < hi else None


def _merge_write(old: int, new: bytes, shift: int, width: int = 4) -> int:
    """``old`` (a ``width``-byte register) with the bytes of ``new`` placed at byte ``shift``."""
    raw = bytearray(old.to_bytes(width, "little"))
    raw[shift : shift + len(new)] = new
    return int.from_bytes(raw, "little")


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


def power_on_config(vendor_id: int, device_id: int) -> ConfigSpace:
    """The config space of layout.py at power-on: type-0 header, PM → MSI → PCIe → MSI-X."""
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


# --------------------------------------------------------------------- DMA

#: the DMA_MAP flags the device takes (an int: ``~`` of an IntFlag keeps only known bits)
_DMA_MAP_FLAGS = int(DmaMapFlags.READ | DmaMapFlags.WRITE)


@attrs.define(eq=False)
class DmaWindow:
    """One DMA_MAP'd window; ``dirty`` (byte ranges inside it) is None unless logging."""

    iova: int
    size: int
    flags: int
    offset: int = 0
    fd: OwnedFd | None = None
    mapping: mmap.mmap | None = None
    delta: int = 0  # where the window starts inside ``mapping`` (mmap offsets are page-aligned)
    identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the fd's file
    dirty: list[tuple[int, int]] | None = None

    @property
    def end(self) -> int:
        return self.iova + self.size

    def close(self) -> None:
        if self.mapping is not None:
            self.mapping.close()
            self.mapping = None
        if self.fd is not None:
            self.fd.close()
            self.fd = None


def _bitmap_size(length: int, page_size: int) -> int:
    """Bytes of a dirty bitmap: u64 words, one bit per page (protocol.md §2.16)."""
    pages = -(-length // page_size)
    return -(-pages // 64) * 8


class DmaSpace:
    """The client's DMA windows as the device reaches them.

    Windows with an fd are mmap'd whole at DMA_MAP time (a mapping costs
    address space, not memory, so 512 MiB of guest RAM is fine) and reached
    directly; every access first checks that the file still covers the range,
    so a client that shrinks its memfd gets a fault, not a SIGBUS. Windows
    without an fd go through ``transport`` (DMA_READ/DMA_WRITE messages).
    Access rights follow the window's READ/WRITE flags, like an IOMMU.
    """

    def __init__(self, transport: MessageDma | None = None) -> None:
        self.transport = transport
        self.windows: list[DmaWindow] = []  # sorted by iova, never overlapping
        self.log_page_size = 0  # 0: dirty logging off

    # ----------------------------------------------------------- map / unmap

    def map(self, *, iova: int, size: int, offset: int, flags: int, fd: OwnedFd | None) -> None:
        """Add a window; takes ``fd`` (closed on refusal or on an identical re-map).

        Like libvfio-user: unknown flag bits, an empty or wrapping window, a
        partial overlap, a full table or an fd that cannot back the window
        → EINVAL; an identical re-map (same range, offset, file, flags) is a
        no-op.
        """
        try:
            window = self._new_window(iova, size, offset, flags, fd)
        except BaseException:
            if fd is not None:
                fd.close()
            raise
        existing = self.find(iova)
        if existing is not None and (existing.iova, existing.size) == (iova, size):
            same = (existing.offset, existing.identity, existing.flags) == (
                window.offset, window.identity, window.flags)
            window.close()
            if not same:
                raise DeviceError(errno.EINVAL, "DMA_MAP differs from the identical window")
            return
        try:
            self._insert(window)
        except BaseException:
            window.close()
            raise

    def _new_window(
        self, iova: int, size: int, offset: int, flags: int, fd: OwnedFd | None
    ) -> DmaWindow:
        if flags & ~_DMA_MAP_FLAGS:
            raise DeviceError(errno.EINVAL, f"unsupported DMA_MAP flags {flags:#x}")
        if size == 0 or iova + size > 1 << 64:
            raise DeviceError(errno.EINVAL, f"bad DMA window [{iova:#x}+{size:#x})")
        window = DmaWindow(iova, size, flags, offset)
        if fd is not None:
            window.identity = self._check_backing(fd, offset, size)
            window.fd = fd
            try:
                self._mmap(window)
            except BaseException:
                window.fd = None  # the caller closes ``fd``
                raise
        return window

    @staticmethod
    def _check_backing(fd: OwnedFd, offset: int, size: int) -> tuple[int, int]:
        st = os.fstat(fd.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise DeviceError(errno.EINVAL, "DMA_MAP fd is not a file or memfd")
        if st.st_size < offset + size:
            raise DeviceError(
                errno.EINVAL,
                f"DMA_MAP fd of {st.st_size:#x} bytes cannot back offset {offset:#x} "
                f"size {size:#x}",
            )
        return st.st_dev, st.st_ino

    @staticmethod
    def _mmap(window: DmaWindow) -> None:
        assert window.fd is not None
        window.delta = window.offset % mmap.ALLOCATIONGRANULARITY
        prot = mmap.PROT_READ if window.flags & DmaMapFlags.READ else 0
        prot |= mmap.PROT_WRITE if window.flags & DmaMapFlags.WRITE else 0
        try:
            window.mapping = mmap.mmap(
                window.fd.fileno(), window.delta + window.size, flags=mmap.MAP_SHARED,
                prot=prot or mmap.PROT_READ, offset=window.offset - window.delta,
            )
        except (OSError, ValueError, OverflowError) as exc:
            code = getattr(exc, "errno", None) or errno.EINVAL
            raise DeviceError(code, f"cannot mmap the DMA window: {exc}") from None

    def _insert(self, window: DmaWindow) -> None:
        at = bisect_right([w.iova for w in self.windows], window.iova)
        before = self.windows[at - 1] if at else None
        after = self.windows[at] if at < len(self.windows) else None
        if (before and before.end > window.iova) or (after and after.iova < window.end):
            raise DeviceError(errno.EINVAL, f"DMA window at {window.iova:#x} overlaps another")
        if len(self.windows) >= MAX_DMA_MAPS:
            raise DeviceError(errno.EINVAL, "DMA window table is full")
        if self.log_page_size and window.fd is not None:
            window.dirty = []
        self.windows.insert(at, window)

    def unmap(self, iova: int, size: int) -> None:
        """Remove the window that is exactly ``[iova, iova+size)`` (else ENOENT)."""
        window = self.find(iova)
        if window is None or (window.iova, window.size) != (iova, size):
            raise DeviceError(errno.ENOENT, f"no DMA window [{iova:#x}+{size:#x})")
        self.windows.remove(window)
        window.close()

    def unmap_all(self) -> None:
        for window in self.windows:
            window.close()
        self.windows.clear()

    close = unmap_all

    def find(self, iova: int) -> DmaWindow | None:
        """The window containing ``iova``."""
        at = bisect_right([w.iova for w in self.windows], iova)
        if at and self.windows[at - 1].end > iova:
            return self.windows[at - 1]
        return None

    # ----------------------------------------------------------- access

    def _pieces(self, iova: int, count: int, right: int) -> list[tuple[DmaWindow, int, int]]:
        """``(window, start inside it, length)`` for each part of the range (EFAULT on a hole)."""
        pieces = []
        addr, left = iova, count
        while left:
            window = self.find(addr)
            if window is None:
                raise DmaFault(errno.EFAULT, f"DMA to unmapped iova {addr:#x}")
            if not window.flags & right:
                what = "read from" if right == DmaMapFlags.READ else "write to"
                raise DmaFault(errno.EFAULT, f"DMA {what} a window without that right")
            n = min(left, window.end - addr)
            pieces.append((window, addr - window.iova, n))
            addr, left = addr + n, left - n
        return pieces

    @staticmethod
    def _mapped(window: DmaWindow, start: int, n: int) -> mmap.mmap:
        """The mapping, once the file still covers the range (else EFAULT, not SIGBUS)."""
        assert window.fd is not None and window.mapping is not None
        if os.fstat(window.fd.fileno()).st_size < window.offset + start + n:
            raise DmaFault(errno.EFAULT, "the DMA window's file shrank under the mapping")
        return window.mapping

    def _message_transport(self) -> MessageDma:
        if self.transport is None:
            raise DmaFault(errno.EFAULT, "no message transport for a window without fd")
        return self.transport

    async def read(self, iova: int, count: int) -> bytes:
        """Read guest memory (DmaFault on a hole, a missing READ right, a failed transfer)."""
        out = bytearray()
        for window, start, n in self._pieces(iova, count, DmaMapFlags.READ):
            if window.mapping is not None:
                at = window.delta + start
                out += self._mapped(window, start, n)[at : at + n]
            else:
                out += await self._message_transport().dma_read(window.iova + start, n)
        return bytes(out)

    async def write(self, iova: int, data: bytes) -> None:
        """Write guest memory; marks fd-window pages dirty while logging."""
        done = 0
        for window, start, n in self._pieces(iova, len(data), DmaMapFlags.WRITE):
            piece = data[done : done + n]
            if window.mapping is not None:
                at = window.delta + start
                self._mapped(window, start, n)[at : at + n] = piece
                self._mark_dirty(window, start, n)
            else:
                await self._message_transport().dma_write(window.iova + start, piece)
            done += n

    # ----------------------------------------------------------- dirty logging

    def _mark_dirty(self, window: DmaWindow, start: int, n: int) -> None:
        if window.dirty is not None:
            page = self.log_page_size
            first = start // page * page
            window.dirty.append((first, min(-(-(start + n) // page) * page, window.size)))

    def start_logging(self, page_size: int) -> None:
        """DMA_LOGGING_START: log the fd-backed windows (now and later ones)."""
        if page_size == 0:
            raise DeviceError(errno.EINVAL, "dirty logging page size 0")
        if self.log_page_size:
            if self.log_page_size != page_size:
                raise DeviceError(errno.EINVAL, "dirty logging already on with another page size")
            return
        self.log_page_size = page_size
        for window in self.windows:
            if window.fd is not None:
                window.dirty = []

    def stop_logging(self) -> None:
        self.log_page_size = 0
        for window in self.windows:
            window.dirty = None

    def bitmap_size(self, length: int, page_size: int) -> int:
        """Bitmap bytes for a report (EINVAL for a page size 0 or above the length)."""
        if page_size == 0 or length < page_size:
            raise DeviceError(errno.EINVAL, f"bad dirty bitmap page size {page_size:#x}")
        return _bitmap_size(length, page_size)

    def report(self, iova: int, length: int, page_size: int) -> bytes:
        """DMA_LOGGING_REPORT: the window's dirty bitmap at ``page_size``; clears it.

        As libvfio-user: the range must be exactly one window (ENOENT when
        unmapped, ENOTSUP for part of a window), logging must be on, the page
        size a power of two, the window fd-backed (EINVAL).
        """
        window = self.find(iova)
        if window is None:
            raise DeviceError(errno.ENOENT, f"no DMA window at {iova:#x}")
        if (window.iova, window.size) != (iova, length):
            raise DeviceError(errno.ENOTSUP, "dirty report range is not exactly one window")
        if not self.log_page_size:
            raise DeviceError(errno.EINVAL, "dirty logging is not on")
        if page_size & (page_size - 1) or window.dirty is None:
            raise DeviceError(errno.EINVAL, "bad page size, or a window without fd")
        size = self.bitmap_size(length, page_size)
        pages = -(-length // page_size)
        bits = 0
        for start, end in window.dirty:
            first, last = start // page_size, min((end - 1) // page_size, pages - 1)
            bits |= ((1 << (last - first + 1)) - 1) << first
        window.dirty.clear()
        return bits.to_bytes(size, "little")


# --------------------------------------------------------------------- interrupts

#: vectors per IRQ index
IRQ_COUNTS: dict[int, int] = {
    IrqIndex.INTX: 1,
    IrqIndex.MSI: L.MSI_VECTORS,
    IrqIndex.MSIX: L.MSIX_VECTORS,
    IrqIndex.ERR: 1,
    IrqIndex.REQ: 1,
}
#: DEVICE_GET_IRQ_INFO flags per index
IRQ_INFO_FLAGS: dict[int, int] = {
    IrqIndex.INTX: IrqInfoFlags.EVENTFD | IrqInfoFlags.MASKABLE | IrqInfoFlags.AUTOMASKED,
    IrqIndex.MSI: IrqInfoFlags.EVENTFD | IrqInfoFlags.MASKABLE,
    IrqIndex.MSIX: IrqInfoFlags.EVENTFD | IrqInfoFlags.MASKABLE | IrqInfoFlags.NORESIZE,
    IrqIndex.ERR: IrqInfoFlags.EVENTFD,
    IrqIndex.REQ: IrqInfoFlags.EVENTFD,
}


def _signal_eventfd(fd: OwnedFd) -> None:
    """Add 1 to an eventfd without ever blocking (a counter at its maximum stays there)."""
    poller = select.poll()
    poller.register(fd.fileno(), select.POLLOUT)
    if poller.poll(0):
        with contextlib.suppress(BlockingIOError):
            os.eventfd_write(fd.fileno(), 1)


@attrs.define
class IrqLine:
    """One vector: the client's eventfd, VFIO mask, and an interrupt held while masked."""

    eventfd: OwnedFd | None = None
    masked: bool = False
    pending: bool = False

    def fire(self) -> None:
        if self.eventfd is not None:
            _signal_eventfd(self.eventfd)

    def install(self, fd: OwnedFd | None) -> None:
        """Replace the eventfd (the old one is closed)."""
        if self.eventfd is not None:
            self.eventfd.close()
        self.eventfd = fd


class Interrupts:
    """The eventfds of every IRQ index and their VFIO-level state (DEVICE_SET_IRQS)."""

    def __init__(self) -> None:
        self.lines = {index: [IrqLine() for _ in range(n)] for index, n in IRQ_COUNTS.items()}

    def line(self, index: int, vector: int = 0) -> IrqLine:
        return self.lines[index][vector]

    def signal(self, index: int, vector: int) -> None:
        """Raise an edge interrupt; a VFIO-masked vector keeps it pending."""
        line = self.line(index, vector)
        if line.masked:
            line.pending = True
        else:
            line.fire()

    def assert_intx(self) -> None:
        """The INTx line is asserted: fire unless masked, then automask (as VFIO does)."""
        line = self.line(IrqIndex.INTX)
        if not line.masked:
            line.fire()
            line.masked = True

    def deliver_pending(self) -> None:
        for index in (IrqIndex.MSI, IrqIndex.MSIX):
            for line in self.lines[index]:
                if line.pending and not line.masked:
                    line.pending = False
                    line.fire()

    def set_irqs(
        self, flags: int, index: int, start: int, count: int, data: bytes, fds: list[OwnedFd]
    ) -> None:
        """DEVICE_SET_IRQS with libvfio-user's checks (protocol.md §2.8); takes ``fds``."""
        try:
            self._validate(flags, index, start, count, data, fds)
            action, kind = flags & IRQ_SET_ACTION_MASK, flags & IRQ_SET_DATA_MASK
            lines = self.lines[index]
            if action != IrqSetFlags.ACTION_TRIGGER:
                for line in lines[start : start + count]:
                    line.masked = action == IrqSetFlags.ACTION_MASK
                return
            if count == 0 or (kind == IrqSetFlags.DATA_EVENTFD and not fds):
                for line in lines[start : start + (count or len(lines))]:
                    line.install(None)
            elif kind == IrqSetFlags.DATA_EVENTFD:
                for line, fd in zip(lines[start : start + count], fds, strict=True):
                    line.install(fd)
                fds.clear()
            else:
                wanted = data if kind == IrqSetFlags.DATA_BOOL else b"\x01" * count
                for line, flag in zip(lines[start : start + count], wanted, strict=True):
                    if flag == 1:
                        line.fire()
        finally:
            close_all(fds)

    @staticmethod
    def _validate(
        flags: int, index: int, start: int, count: int, data: bytes, fds: Sequence[OwnedFd]
    ) -> None:
        action, kind = flags & IRQ_SET_ACTION_MASK, flags & IRQ_SET_DATA_MASK
        vectors = IRQ_COUNTS.get(index, 0)
        problem = None
        if kind == IrqSetFlags.DATA_BOOL and len(data) != count:
            problem = "DATA_BOOL needs one byte per vector"
        elif not vectors:
            problem = f"IRQ index {index} does not exist"
        elif action not in (IrqSetFlags.ACTION_MASK, IrqSetFlags.ACTION_UNMASK,
                            IrqSetFlags.ACTION_TRIGGER):
            problem = "exactly one action is needed"
        elif kind not in (IrqSetFlags.DATA_NONE, IrqSetFlags.DATA_BOOL, IrqSetFlags.DATA_EVENTFD):
            problem = "exactly one data type is needed"
        elif start >= vectors or start + count > vectors:
            problem = f"vectors [{start}, {start + count}) outside the {vectors} of index {index}"
        elif index in (IrqIndex.ERR, IrqIndex.REQ) and action != IrqSetFlags.ACTION_TRIGGER:
            problem = "ERR and REQ only take TRIGGER"
        elif count == 0 and (
            start or (action, kind) != (IrqSetFlags.ACTION_TRIGGER, IrqSetFlags.DATA_NONE)
        ):
            problem = "count 0 only with DATA_NONE|ACTION_TRIGGER and start 0"
        elif fds and (kind != IrqSetFlags.DATA_EVENTFD or len(fds) != count):
            problem = f"{len(fds)} fds for {count} vectors"
        elif any(inspect_fd(fd).kind is not FdKind.EVENTFD for fd in fds):
            problem = "an fd is not an eventfd"
        if problem:
            raise DeviceError(errno.EINVAL, f"DEVICE_SET_IRQS refused: {problem}")

    def reset(self) -> None:
        """Power-on masks; the eventfds stay (they belong to the client)."""
        for lines in self.lines.values():
            for line in lines:
                line.masked = line.pending = False

    def close(self) -> None:
        for lines in self.lines.values():
            for line in lines:
                line.install(None)


# --------------------------------------------------------------------- migration

_S = MigrationState
#: libvfio-user's ``next_state`` table: the step taken from a state towards a target
#: (direct arcs, else the shortest path not passing through PRE_COPY/STOP_COPY)
_NEXT_STATE: dict[int, dict[int, int]] = {
    _S.STOP: {_S.RUNNING: _S.RUNNING, _S.STOP_COPY: _S.STOP_COPY, _S.RESUMING: _S.RESUMING,
              _S.PRE_COPY: _S.RUNNING},
    _S.RUNNING: {_S.STOP: _S.STOP, _S.STOP_COPY: _S.STOP, _S.RESUMING: _S.STOP,
                 _S.PRE_COPY: _S.PRE_COPY},
    _S.STOP_COPY: {_S.STOP: _S.STOP, _S.RUNNING: _S.STOP, _S.RESUMING: _S.STOP},
    _S.RESUMING: {_S.STOP: _S.STOP, _S.RUNNING: _S.STOP, _S.STOP_COPY: _S.STOP,
                  _S.PRE_COPY: _S.STOP},
    _S.PRE_COPY: {_S.STOP: _S.RUNNING, _S.RUNNING: _S.RUNNING, _S.STOP_COPY: _S.STOP_COPY,
                  _S.RESUMING: _S.RUNNING},
}  # fmt: skip
_RUNNING_STATES = frozenset({_S.RUNNING, _S.PRE_COPY})


def next_migration_state(current: int, target: int) -> int | None:
    """The next state on the way from ``current`` to ``target``; None if refused
    (ERROR and the P2P states, STOP_COPY → PRE_COPY, anything out of ERROR)."""
    return _NEXT_STATE.get(current, {}).get(target)


# The migration stream (version 1) is a sequence of records, each
#   magic b"VFPS" | kind u16 | version u16 | payload length u32 | crc32 u32 | payload
# kind 1, device state: config space (4096) | BAR0 registers (_REGS: DESC lo/hi,
#   STATUS, IRQ_STATUS, DOORBELL_COUNT, SCRATCH, latched doorbell) | BAR1 scratch
#   (16) | BAR2 RAM (BAR2_MMAP_SIZE) | MSI-X table (64) | PBA u64 | per vector in
#   _LINE_ORDER: VFIO masked u8, pending u8;
# kind 2, end: empty, last.
# Entering PRE_COPY queues a device record (a pre-copy snapshot); entering
# STOP_COPY appends the final device record and the end record. Reads take the
# queue in order, so a pre-copy record read only in part stays whole in the
# stream; the destination keeps the last device record.
#: record header: magic, kind, version, payload length, crc32 of the payload
_RECORD = struct.Struct("<4sHHII")
_MAGIC = b"VFPS"
_STREAM_VERSION = 1
_KIND_DEVICE = 1
_KIND_END = 2
_REGS = struct.Struct("<IIIIIIB3x")
_LINE_ORDER = tuple((index, v) for index, n in IRQ_COUNTS.items() for v in range(n))
_DEVICE_PARTS = (
    ("config", L.CONFIG_SIZE),
    ("registers", _REGS.size),
    ("bar1", _BAR1_SCRATCH),
    ("ram", L.BAR2_MMAP_SIZE),
    ("msix_table", _MSIX_TABLE_SIZE),
    ("pba", 8),
    ("irq_lines", 2 * len(_LINE_ORDER)),
)
_DEVICE_SIZE = sum(size for _, size in _DEVICE_PARTS)
#: incoming stream bytes a RESUMING device accepts: a pre-copy and a final
#: device record and the end record, with room to spare
MAX_INCOMING_STREAM = 4 * (_DEVICE_SIZE + _RECORD.size)


@attrs.define
class Registers:
    """BAR0's registers; ``latched``: a doorbell rung while the device was stopped."""

    desc_lo: int = 0
    desc_hi: int = 0
    status: int = 0
    irq_status: int = 0
    doorbell_count: int = 0
    scratch: int = 0
    latched: bool = False

    def value(self, offset: int) -> int:
        """What a read of the dword at ``offset`` returns."""
        return {
            L.REG_ID: L.REG_ID_VALUE,
            L.REG_STATUS: self.status,
            L.REG_DESC_LO: self.desc_lo,
            L.REG_DESC_HI: self.desc_hi,
            L.REG_IRQ_STATUS: self.irq_status,
            L.REG_DOORBELL_COUNT: self.doorbell_count,
            L.REG_SCRATCH: self.scratch,
        }.get(offset, 0)

    @property
    def descriptor(self) -> int:
        return self.desc_hi << 32 | self.desc_lo


@attrs.frozen
class Snapshot:
    """Everything the migration stream carries (not DMA windows or eventfds:
    the destination's client maps and sends those again)."""

    config: bytes
    registers: Registers
    bar1: bytes
    ram: bytes
    msix_table: bytes
    pba: int
    irq_lines: tuple[tuple[bool, bool], ...]  # (masked, pending) in _LINE_ORDER


def _record(kind: int, payload: bytes) -> bytes:
    header = _RECORD.pack(_MAGIC, kind, _STREAM_VERSION, len(payload), zlib.crc32(payload))
    return header + payload


def _device_payload(snap: Snapshot) -> bytes:
    r = snap.registers
    regs = _REGS.pack(r.desc_lo, r.desc_hi, r.status, r.irq_status, r.doorbell_count,
                      r.scratch, r.latched)
    lines = bytes(b for masked, pending in snap.irq_lines for b in (masked, pending))
    return b"".join(
        (snap.config, regs, snap.bar1, snap.ram, snap.msix_table, snap.pba.to_bytes(8, "little"),
         lines)
    )


def encode_state_records(snap: Snapshot, *, final: bool) -> bytes:
    """A device-state record, followed by the end record if ``final`` (STOP_COPY)."""
    out = _record(_KIND_DEVICE, _device_payload(snap))
    return out + _record(_KIND_END, b"") if final else out


def _bad_stream(text: str) -> DeviceError:
    return DeviceError(errno.EINVAL, f"migration stream refused: {text}")


def _decode_device(payload: bytes, vendor_id: int, device_id: int) -> Snapshot:
    if len(payload) != _DEVICE_SIZE:
        raise _bad_stream(f"device record of {len(payload)} bytes, expected {_DEVICE_SIZE}")
    parts: dict[str, bytes] = {}
    pos = 0
    for name, size in _DEVICE_PARTS:
        parts[name] = payload[pos : pos + size]
        pos += size
    ids = struct.unpack_from("<HH", parts["config"])
    if ids != (vendor_id, device_id):
        raise _bad_stream(f"state of device {ids[0]:04x}:{ids[1]:04x}")
    desc_lo, desc_hi, status, irq_status, count, scratch, latched = _REGS.unpack(
        parts["registers"]
    )
    lines = parts["irq_lines"]
    return Snapshot(
        config=parts["config"],
        registers=Registers(desc_lo, desc_hi, status, irq_status, count, scratch, bool(latched)),
        bar1=parts["bar1"],
        ram=parts["ram"],
        msix_table=parts["msix_table"],
        pba=int.from_bytes(parts["pba"], "little") & ((1 << L.MSIX_VECTORS) - 1),
        irq_lines=tuple((bool(lines[i]), bool(lines[i + 1])) for i in range(0, len(lines), 2)),
    )


def decode_state_stream(data: bytes, *, vendor_id: int, device_id: int) -> Snapshot:
    """The state a whole stream carries: its last device record (earlier ones are
    pre-copy snapshots it supersedes). Every record must be intact (magic,
    version, length, crc32), the stream must end with the end record, and the
    state must be of this device (vendor/device id); else EINVAL."""
    snap = None
    pos = 0
    ended = False
    while pos < len(data):
        if ended:
            raise _bad_stream("data after the end record")
        if len(data) - pos < _RECORD.size:
            raise _bad_stream("truncated record header")
        magic, kind, version, length, crc = _RECORD.unpack_from(data, pos)
        payload = data[pos + _RECORD.size : pos + _RECORD.size + length]
        if magic != _MAGIC or version != _STREAM_VERSION:
            raise _bad_stream(f"record at {pos} has magic {magic!r} version {version}")
        if len(payload) != length or zlib.crc32(payload) != crc:
            raise _bad_stream(f"record at {pos} is truncated or corrupt")
        if kind == _KIND_DEVICE:
            snap = _decode_device(payload, vendor_id, device_id)
        elif kind != _KIND_END or length:
            raise _bad_stream(f"record at {pos} has unknown kind {kind}")
        ended = kind == _KIND_END
        pos += _RECORD.size + length
    if snap is None or not ended:
        raise _bad_stream("no device record, or no end record")
    return snap


# --------------------------------------------------------------------- the device

_OPS = {L.OP_COPY, L.OP_INVERT, L.OP_CRC32}


_INVERT = bytes(b ^ 0xFF for b in range(256))


def _apply_op(op: int, data: bytes) -> bytes:
    if op == L.OP_INVERT:
        return data.translate(_INVERT)
    if op == L.OP_CRC32:
        return zlib.crc32(data).to_bytes(4, "little")
    return data


class Device:
    """The device of layout.py, as one client session sees it.

    ``transport`` carries DMA to windows mapped without an fd (the session's
    DMA_READ/DMA_WRITE messages); without one such DMA faults. The caller
    must :meth:`close` it (DMA mappings, eventfds, the BAR2 memfd).
    """

    def __init__(
        self,
        *,
        vendor_id: int = L.VENDOR_ID,
        device_id: int = L.DEVICE_ID,
        transport: MessageDma | None = None,
    ) -> None:
        self.vendor_id = vendor_id
        self.device_id = device_id
        self.rom = build_rom(vendor_id, device_id)
        #: BAR2's memory: the fd a region-info reply passes; the client's mmap sees the same bytes
        self.bar2_fd = make_memfd("vfioproxy-bar2", L.BAR2_SIZE)
        try:
            self._ram = mmap.mmap(self.bar2_fd.fileno(), L.BAR2_SIZE)
        except BaseException:
            self.bar2_fd.close()
            raise
        self.dma = DmaSpace(transport)
        self.irqs = Interrupts()
        self.migration_state: int = MigrationState.RUNNING
        self._outgoing = bytearray()
        self._incoming = bytearray()
        self._power_on()

    def _power_on(self) -> None:
        self.config = power_on_config(self.vendor_id, self.device_id)
        self.regs = Registers()
        self.bar1 = bytearray(_BAR1_SCRATCH)
        # Vector control mask bits start clear, where the PCI spec has them set:
        # QEMU emulates the MSI-X table itself and never writes the device's copy,
        # so behind QEMU a device that starts masked could never signal MSI-X.
        self.msix_table = bytearray(_MSIX_TABLE_SIZE)
        self.pba = 0
        self.irqs.reset()

    def close(self) -> None:
        """Drop every DMA mapping and eventfd and the BAR2 memory; idempotent."""
        self.dma.close()
        self.irqs.close()
        self._ram.close()
        self.bar2_fd.close()

    @property
    def running(self) -> bool:
        """RUNNING or PRE_COPY: the device may DMA and interrupt."""
        return self.migration_state in _RUNNING_STATES

    # ----------------------------------------------------------- regions

    @staticmethod
    def check_region_access(index: int, offset: int, count: int) -> None:
        """EINVAL unless ``[offset, offset+count)`` lies inside region ``index``."""
        if index >= NUM_REGIONS:
            raise DeviceError(errno.EINVAL, f"no region {index}")
        if offset + count > REGION_SIZES.get(index, 0):
            raise DeviceError(
                errno.EINVAL, f"access [{offset:#x}+{count:#x}) outside region {index}"
            )

    def read_region(self, index: int, offset: int, count: int) -> bytes:
        """Region bytes as a driver reads them (EINVAL outside the region)."""
        self.check_region_access(index, offset, count)
        if not count:
            return b""
        if index == Region.CONFIG:
            return self.config.read(offset, count)
        if index == Region.BAR0:
            return self._bar0_read(offset, count)
        if index == Region.BAR1:
            return bytes(self.bar1[offset : offset + count].ljust(count, b"\0"))
        if index == Region.BAR2:
            return self._bar2_read(offset, count)
        return self.rom[offset : offset + count]

    async def write_region(self, index: int, offset: int, data: bytes) -> None:
        """A driver's write (EINVAL outside the region and for the ROM).

        A write that rings the doorbell returns once the descriptor completed
        and the interrupt was raised (or latched, while the device is stopped).
        """
        self.check_region_access(index, offset, len(data))
        if index == Region.ROM:
            raise DeviceError(errno.EINVAL, "the expansion ROM is read-only")
        if not data:
            return
        if index == Region.CONFIG:
            self.config.write(offset, data)
            self._service_interrupts()
        elif index == Region.BAR0:
            await self._bar0_write(offset, data)
        elif index == Region.BAR1:
            if offset < _BAR1_SCRATCH:
                piece = data[: _BAR1_SCRATCH - offset]
                self.bar1[offset : offset + len(piece)] = piece
        else:
            self._bar2_write(offset, data)

    def _bar0_read(self, offset: int, count: int) -> bytes:
        first = offset & ~3
        raw = b"".join(
            self.regs.value(o).to_bytes(4, "little") for o in range(first, offset + count, 4)
        )
        return raw[offset - first : offset - first + count]

    async def _bar0_write(self, offset: int, data: bytes) -> None:
        rung = False
        regs = self.regs
        for reg in range(offset & ~3, offset + len(data), 4):
            lo, hi = max(offset, reg), min(offset + len(data), reg + 4)
            piece, shift = data[lo - offset : hi - offset], lo - reg
            if reg == L.REG_DESC_LO:
                regs.desc_lo = _merge_write(regs.desc_lo, piece, shift)
            elif reg == L.REG_DESC_HI:
                regs.desc_hi = _merge_write(regs.desc_hi, piece, shift)
            elif reg == L.REG_SCRATCH:
                regs.scratch = _merge_write(regs.scratch, piece, shift)
            elif reg == L.REG_IRQ_STATUS:
                regs.irq_status &= ~_merge_write(0, piece, shift)
                self._update_interrupt_status()
            elif reg == L.REG_DOORBELL:
                rung = True
        if rung:
            await self.ring_doorbell()

    def _bar2_read(self, offset: int, count: int) -> bytes:
        out = bytearray(count)
        span = _span(offset, count, 0, L.BAR2_MMAP_SIZE)
        if span:
            out[span[0] - offset : span[1] - offset] = self._ram[span[0] : span[1]]
        pba = self.pba.to_bytes(8, "little")
        for start, blob in ((L.MSIX_TABLE_OFFSET, self.msix_table), (L.MSIX_PBA_OFFSET, pba)):
            span = _span(offset, count, start, start + len(blob))
            if span:
                out[span[0] - offset : span[1] - offset] = blob[span[0] - start : span[1] - start]
        return bytes(out)

    def _bar2_write(self, offset: int, data: bytes) -> None:
        span = _span(offset, len(data), 0, L.BAR2_MMAP_SIZE)
        if span:
            self._ram[span[0] : span[1]] = data[span[0] - offset : span[1] - offset]
        table = L.MSIX_TABLE_OFFSET
        span = _span(offset, len(data), table, table + _MSIX_TABLE_SIZE)
        if span:
            for pos in range(*span):
                i = pos - table
                wmask = _MSIX_ENTRY_WMASK[i % _MSIX_ENTRY]
                self.msix_table[i] = (self.msix_table[i] & ~wmask) | (data[pos - offset] & wmask)
            self._service_interrupts()

    def ram(self) -> bytes:
        """BAR2's mmap-able part (what the client's mapping shows)."""
        return self._ram[: L.BAR2_MMAP_SIZE]

    # ----------------------------------------------------------- the DMA engine

    async def ring_doorbell(self) -> None:
        """Run the descriptor at DESC now, or latch the doorbell while stopped."""
        if not self.running:
            self.regs.latched = True
            return
        self.regs.latched = False
        desc = self.regs.descriptor
        try:
            src, dst, length, op, cookie = L.DESCRIPTOR.unpack(
                await self.dma.read(desc, L.DESCRIPTOR.size)
            )
        except DmaFault:
            self._complete(ok=False)
            return
        try:
            if op not in _OPS or length > L.MAX_TRANSFER:
                raise DeviceError(errno.EINVAL, f"bad descriptor: op {op} length {length:#x}")
            result = _apply_op(op, await self.dma.read(src, length))
            await self.dma.write(dst, result)
            record = L.COMPLETION.pack(L.COMPLETION_OK, zlib.crc32(result), cookie, len(result))
            ok = True
        except DeviceError as failure:
            record = L.COMPLETION.pack(L.COMPLETION_ERROR | failure.errno, 0, cookie, 0)
            ok = False
        try:
            await self.dma.write(desc + L.COMPLETION_OFFSET, record)
        except DmaFault:
            ok = False
        self._complete(ok=ok)

    def _complete(self, *, ok: bool) -> None:
        regs = self.regs
        regs.status = L.STATUS_DONE if ok else L.STATUS_ERROR
        regs.doorbell_count = (regs.doorbell_count + 1) & 0xFFFFFFFF
        regs.irq_status |= L.IRQ_STATUS_DONE
        if self.msix_enabled:
            self.pba |= 1
        elif self.msi_enabled:
            self.config.set_u32(_MSI_PENDING, self.config.u32(_MSI_PENDING) | 1)
        self._update_interrupt_status()
        self._service_interrupts()

    # ----------------------------------------------------------- interrupts

    @property
    def msix_enabled(self) -> bool:
        return bool(self.config.u16(_MSIX_CTL) & _MSIX_ENABLE)

    @property
    def msi_enabled(self) -> bool:
        return bool(self.config.u16(_MSI_CTL) & _MSI_ENABLE)

    def _msix_vector_masked(self, vector: int) -> bool:
        control = self.msix_table[vector * _MSIX_ENTRY + 12]
        return bool(control & _MSIX_VECTOR_MASKED)

    def _update_interrupt_status(self) -> None:
        """Status bit 3 follows the INTx level (IRQ_STATUS not clear)."""
        status = self.config.u16(STATUS) & ~_STATUS_INTERRUPT
        self.config.set_u16(STATUS, status | (_STATUS_INTERRUPT if self.regs.irq_status else 0))

    def _service_interrupts(self) -> None:
        """Deliver what is pending and no longer masked; nothing while stopped.

        MSI-X: a PBA bit whose vector and function are unmasked. MSI: the
        pending bit of an unmasked vector. INTx (only with MSI and MSI-X off):
        the level (IRQ_STATUS ≠ 0) unless the command register disables it.
        Then the vectors the client had masked with SET_IRQS and unmasked since.
        """
        if not self.running:
            return
        config = self.config
        if self.msix_enabled and not config.u16(_MSIX_CTL) & _MSIX_FUNCTION_MASK:
            for vector in range(L.MSIX_VECTORS):
                if self.pba >> vector & 1 and not self._msix_vector_masked(vector):
                    self.pba &= ~(1 << vector)
                    self.irqs.signal(IrqIndex.MSIX, vector)
        if self.msi_enabled:
            live = config.u32(_MSI_PENDING) & ~config.u32(_MSI_MASK) & 1
            if live:
                config.set_u32(_MSI_PENDING, config.u32(_MSI_PENDING) & ~live)
                self.irqs.signal(IrqIndex.MSI, 0)
        intx_on = not (self.msi_enabled or self.msix_enabled)
        if intx_on and self.regs.irq_status and not config.u16(_COMMAND) & _COMMAND_INTX_DISABLE:
            self.irqs.assert_intx()
        self.irqs.deliver_pending()

    def set_irqs(
        self, flags: int, index: int, start: int, count: int, data: bytes, fds: list[OwnedFd]
    ) -> None:
        """DEVICE_SET_IRQS (see :meth:`Interrupts.set_irqs`); takes ``fds``."""
        self.irqs.set_irqs(flags, index, start, count, data, fds)
        self._service_interrupts()

    # ----------------------------------------------------------- reset

    def reset(self) -> None:
        """DEVICE_RESET: back to power-on (config, registers, BAR1, MSI-X table,
        IRQ masks, migration state RUNNING). DMA windows, dirty logging, the
        client's eventfds and BAR2's RAM stay, as with a VFIO device reset."""
        self._power_on()
        self.migration_state = MigrationState.RUNNING
        self._outgoing.clear()
        self._incoming.clear()

    # ----------------------------------------------------------- migration

    def snapshot(self) -> Snapshot:
        lines = tuple(
            (self.irqs.line(index, v).masked, self.irqs.line(index, v).pending)
            for index, v in _LINE_ORDER
        )
        return Snapshot(
            config=bytes(self.config.data),
            registers=attrs.evolve(self.regs),
            bar1=bytes(self.bar1),
            ram=self.ram(),
            msix_table=bytes(self.msix_table),
            pba=self.pba,
            irq_lines=lines,
        )

    def restore(self, snap: Snapshot) -> None:
        self.config.data[:] = snap.config
        self.regs = attrs.evolve(snap.registers)
        self.bar1[:] = snap.bar1
        self._ram[: L.BAR2_MMAP_SIZE] = snap.ram
        self.msix_table[:] = snap.msix_table
        self.pba = snap.pba
        for (index, v), (masked, pending) in zip(_LINE_ORDER, snap.irq_lines, strict=True):
            line = self.irqs.line(index, v)
            line.masked, line.pending = masked, pending

    async def set_migration_state(self, target: int) -> None:
        """DEVICE_FEATURE MIG_DEVICE_STATE SET: walk to ``target`` step by step.

        EINVAL for a refused target (state left at the last step reached).
        Leaving RESUMING takes the received state; a bad stream fails the
        step with EINVAL and puts the device in ERROR, which only
        :meth:`reset` leaves. Entering RUNNING runs a latched doorbell.
        """
        if target not in MigrationState.__members__.values():
            raise DeviceError(errno.EINVAL, f"unknown migration state {target}")
        while self.migration_state != target:
            step = next_migration_state(self.migration_state, target)
            if step is None:
                raise DeviceError(
                    errno.EINVAL,
                    f"no migration path from {MigrationState(self.migration_state).name} "
                    f"to {MigrationState(target).name}",
                )
            await self._enter(step)

    async def _enter(self, state: int) -> None:
        previous = self.migration_state
        if state == MigrationState.PRE_COPY:
            self._outgoing[:] = encode_state_records(self.snapshot(), final=False)
        elif state == MigrationState.STOP_COPY:
            self._outgoing += encode_state_records(self.snapshot(), final=True)
        elif state == MigrationState.RESUMING:
            self._incoming.clear()
        elif previous == MigrationState.RESUMING:
            self._take_incoming()
        else:
            self._outgoing.clear()
        self.migration_state = state
        if self.running:
            self._service_interrupts()
            if self.regs.latched:
                await self.ring_doorbell()

    def _take_incoming(self) -> None:
        data = bytes(self._incoming)
        self._incoming.clear()
        try:
            snap = decode_state_stream(data, vendor_id=self.vendor_id, device_id=self.device_id)
        except DeviceError:
            self.migration_state = MigrationState.ERROR
            raise
        self.restore(snap)

    def read_migration_data(self, size: int) -> bytes:
        """MIG_DATA_READ: up to ``size`` stream bytes; b"" = nothing more (PRE_COPY)
        or the end of the stream (STOP_COPY). EINVAL in other states."""
        if self.migration_state not in (MigrationState.PRE_COPY, MigrationState.STOP_COPY):
            raise DeviceError(errno.EINVAL, "migration data is read in PRE_COPY or STOP_COPY")
        chunk = bytes(self._outgoing[:size])
        del self._outgoing[:size]
        return chunk

    def write_migration_data(self, data: bytes) -> None:
        """MIG_DATA_WRITE: collect stream bytes (EINVAL outside RESUMING, or beyond
        :data:`MAX_INCOMING_STREAM`, which also spoils the stream)."""
        if self.migration_state != MigrationState.RESUMING:
            raise DeviceError(errno.EINVAL, "migration data is written in RESUMING")
        if len(self._incoming) + len(data) > MAX_INCOMING_STREAM:
            self._incoming[:] = b"\0" * _RECORD.size  # no longer a valid stream
            raise DeviceError(errno.EINVAL, "more migration data than a device state")
        self._incoming += data
