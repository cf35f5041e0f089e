"""DMA windows: fd-backed through mmap, the others by message; dirty-page logging."""

from __future__ import annotations

import errno
import mmap
import os
import stat
from bisect import bisect_right

import attrs

from vfioproxy.io.fds import OwnedFd
from vfioproxy.peers.device.base import MAX_DMA_MAPS, DeviceError, DmaFault, MessageDma
from vfioproxy.protocol.constants import (
    DmaMapFlags,
)

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
