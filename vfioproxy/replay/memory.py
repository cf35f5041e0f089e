"""The guest memory a client replay rebuilds from its DMA_MAPs, and DMA answers from it.

Each DMA_MAP the replay sends adds a window: backed by the fresh fd it
carried (mapped shared, so the live server sees the same bytes) or, without
an fd, by private memory of the window's size (as QEMU backs ROMs). DMA_UNMAP
removes windows. The memory also tracks which bytes it *knows*: those the
live server wrote with DMA_WRITE during the replay, and windows whose fd was
filled with recorded contents. Other bytes are what the recorded guest's CPU
wrote, which no trace shows. :meth:`ReplayMemory.answer` turns a live DMA_READ/DMA_WRITE
into the reply the recorded client would have sent, in its layout
(protocol.md §2.11, §2.12): QEMU's (DMA_READ: count u32 and 4 padding bytes;
DMA_WRITE: header only) or the spec's (count u64; DMA_WRITE echoes address
and count); errors as QEMU answers them (EFAULT outside every window, EPERM
writing a read-only one, E2BIG above the server's max_data_xfer_size).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os

import attrs

from vfioproxy.io.fds import OwnedFd
from vfioproxy.protocol.bodies import DmaAccessBody, DmaLayout, DmaMapBody, DmaUnmapBody
from vfioproxy.protocol.codec import Message, build_error_reply, build_reply
from vfioproxy.protocol.constants import DmaMapFlags, DmaUnmapFlags
from vfioproxy.protocol.header import Command

__all__ = ["ReplayMemory"]

_QEMU_READ_PADDING = bytes(4)


class _Fault(Exception):
    def __init__(self, err: int) -> None:
        super().__init__(err)
        self.errno = err


@attrs.frozen
class _Window:
    iova: int
    size: int
    writable: bool
    backing: mmap.mmap
    offset: int

    @property
    def end(self) -> int:
        return self.iova + self.size


class ReplayMemory:
    """Windows of guest memory by IOVA (see the module docstring); :meth:`close` once."""

    def __init__(self) -> None:
        self._windows: list[_Window] = []
        self._shared: dict[int, mmap.mmap] = {}  # id(fd) -> mapping of the whole fd
        self._private: list[mmap.mmap] = []
        self._known: list[tuple[int, int]] = []  # [start, end) IOVA ranges, sorted, disjoint

    def map(self, body: DmaMapBody, fd: OwnedFd | None, *, known: bool = False) -> None:
        """Add the window a DMA_MAP announces (replacing any it overlaps);
        ``known``: its fd holds recorded contents."""
        if body.size <= 0:
            return
        self._forget(body.iova, body.iova + body.size)
        if fd is None:
            backing = mmap.mmap(-1, body.size)
            self._private.append(backing)
            offset = 0
        else:
            shared = self._shared.get(id(fd))
            if shared is None:
                length = os.fstat(fd.fileno()).st_size
                if body.offset + body.size > length or not length:
                    return  # accesses would fault (SIGBUS): leave it unmapped
                shared = self._shared[id(fd)] = mmap.mmap(fd.fileno(), length)
            if body.offset + body.size > len(shared):
                return
            backing, offset = shared, body.offset
        window = _Window(body.iova, body.size, bool(body.flags & DmaMapFlags.WRITE),
                         backing, offset)
        self._windows = [w for w in self._windows
                         if w.end <= window.iova or window.end <= w.iova]
        self._windows.append(window)
        if known:
            self._learn(window.iova, window.end)

    def unmap(self, body: DmaUnmapBody) -> None:
        """Remove the windows a DMA_UNMAP covers (all of them with UNMAP_ALL)."""
        if body.flags & DmaUnmapFlags.ALL:
            self._windows = []
            self._known = []
            return
        end = body.iova + body.size
        self._windows = [w for w in self._windows if not (body.iova <= w.iova and w.end <= end)]
        self._forget(body.iova, end)

    def knows(self, iova: int, count: int) -> bool:
        """Whether every byte of [iova, iova + count) is known (see the module docstring)."""
        end = iova + count
        return any(start <= iova and end <= stop for start, stop in self._known)

    def _learn(self, start: int, end: int) -> None:
        merged = [(start, end)]
        for a, b in self._known:
            if b < merged[0][0] or merged[0][1] < a:
                merged.append((a, b))
            else:
                merged[0] = (min(a, merged[0][0]), max(b, merged[0][1]))
        self._known = sorted(merged)

    def _forget(self, start: int, end: int) -> None:
        kept: list[tuple[int, int]] = []
        for a, b in self._known:
            kept.extend((x, y) for x, y in ((a, min(b, start)), (max(a, end), b)) if x < y)
        self._known = kept

    def read(self, iova: int, count: int) -> bytes:
        return b"".join(b[o : o + n] for b, o, n in self._pieces(iova, count, write=False))

    def write(self, iova: int, data: bytes) -> None:
        """Write through the windows (the bytes become known); nothing is written
        unless all of it is writable."""
        pos = 0
        for backing, offset, n in self._pieces(iova, len(data), write=True):
            backing[offset : offset + n] = data[pos : pos + n]
            pos += n
        if data:
            self._learn(iova, iova + len(data))

    def _pieces(self, iova: int, count: int, *, write: bool) -> list[tuple[mmap.mmap, int, int]]:
        pieces = []
        addr, end = iova, iova + count
        while addr < end:
            window = next((w for w in self._windows if w.iova <= addr < w.end), None)
            if window is None:
                raise _Fault(errno.EFAULT)
            if write and not window.writable:
                raise _Fault(errno.EPERM)
            n = min(end, window.end) - addr
            pieces.append((window.backing, window.offset + addr - window.iova, n))
            addr += n
        return pieces

    def apply(self, command: Message) -> None:
        """Apply a DMA_WRITE's data to guest memory where it can go (faults are ignored:
        the reply sent for it is the recorded one)."""
        body = command.body
        if command.command == Command.DMA_WRITE and isinstance(body, DmaAccessBody):
            with contextlib.suppress(_Fault):
                self.write(body.address, body.data[: body.count])

    def answer(self, command: Message, *, layout: DmaLayout, max_data_xfer_size: int
               ) -> Message | None:
        """The reply to a live DMA_READ/DMA_WRITE (None for a successful no_reply one).

        ``command`` is decoded in the server's layout; ``layout`` is the one the
        recorded client answered in; ``max_data_xfer_size`` the server's limit.
        """
        body = command.body
        header = command.header
        if header.command not in (Command.DMA_READ, Command.DMA_WRITE):
            return build_error_reply(command, errno.ENOSYS)
        if not isinstance(body, DmaAccessBody):
            return build_error_reply(command, errno.EINVAL)
        try:
            if header.command == Command.DMA_READ:
                if body.count > max_data_xfer_size:
                    raise _Fault(errno.E2BIG)
                padding = _QEMU_READ_PADDING if layout is DmaLayout.QEMU else b""
                reply = DmaAccessBody(body.address, body.count,
                                      self.read(body.address, body.count), padding, layout)
            else:
                if len(body.data) < body.count:
                    raise _Fault(errno.E2BIG)
                self.write(body.address, body.data[: body.count])
                reply = DmaAccessBody(body.address, body.count, layout=DmaLayout.SPEC)
        except _Fault as fault:
            return build_error_reply(command, fault.errno)
        if header.no_reply:
            return None
        if header.command == Command.DMA_WRITE and layout is DmaLayout.QEMU:
            return build_reply(command)
        return build_reply(command, reply)

    def close(self) -> None:
        """Unmap everything; idempotent (the fds stay the rebuilder's)."""
        self._windows = []
        self._known = []
        for backing in [*self._shared.values(), *self._private]:
            backing.close()
        self._shared.clear()
        self._private.clear()
