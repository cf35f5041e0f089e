"""``--trap-dma``: the server gets DMA windows without an fd, so device DMA is messages.

A DMA_MAP command (client to server) whose window ``[iova, iova + size)``
overlaps one of the trapped IOVA ranges (every window when no range is
given) has its fd withheld: the proxy closes its copy and the server gets
the command without one. The spec says a window without an fd is reached
with DMA_READ/DMA_WRITE messages, which the client answers from guest
memory (QEMU through ``pci_dma_read``/``pci_dma_write``), so every device
access to that window becomes a message the proxy records.

A window that overlaps a range only in part is trapped whole: a window is
one mapping, the server reaches all of it the same way.

What changes in the command's bytes is what a window without an fd must
say: ``offset`` (the window's place in the fd) becomes 0, as the spec asks
of a window that cannot be mapped and as QEMU writes it when it has no fd
(``vfio_user_dma_map``), so the server gets the very command a client
without a shareable memory backend would send; and the libvfio-user
access-mode flags ``MMAP`` (0x4) and ``FILE_IO`` (0x8), which say how to use
the fd and which libvfio-user refuses (EINVAL) without one, are cleared
(QEMU never sets them). ``READ``/``WRITE``, argsz and any trailing bytes are
kept. DMA_UNMAP needs nothing: it names the window by iova and size alone.
The ``interpose`` event's note gives the window (``iova``, ``size``), the
ranges it overlaps, and the fields changed as [arrived, sent] pairs
(``offset``, ``flags``); its ``withheld`` list the fd.

Servers differ in what they do with such a window (README, "--trap-dma"):
libvfio-user serves the DMA_READ/DMA_WRITE calls of its device code
(``vfu_sgl_read``/``vfu_sgl_write``) by message but a direct access
(``vfu_sgl_get``, ``vfu_addr_to_sgl`` + mmap'd pointers) finds no mapping;
QEMU's own vfio-user server drops fd-less windows (``dma_register`` returns
when there is no ``vaddr``), so its device models' DMA to them goes nowhere.
Trap only the windows such a server does not touch directly (a range per
window); the ``interpose`` event of each trapped DMA_MAP says which window
was trapped and which fd was withheld. The proxy cannot see a direct access
fail, only its outcome: when the server ends a session while trapped
windows are mapped (DMA_UNMAP commands taken into account), the mode says
so at the end (:meth:`TrapDma.closing`: the proxy logs a warning and
records a ``note`` event naming the windows).

A DMA_MAP that carries no fd, that does not decode, or that is a reply is
left alone.
"""

from __future__ import annotations

from typing import Any, ClassVar

from vfioproxy.errors import ProtocolError
from vfioproxy.interpose import FdFate, FdPlan, Interposed, IovaRange
from vfioproxy.protocol.bodies import DmaMapBody, DmaUnmapBody
from vfioproxy.protocol.constants import DmaMapFlags, DmaUnmapFlags
from vfioproxy.protocol.header import HEADER_SIZE, Command, Header
from vfioproxy.side import Direction

__all__ = ["TrapDma", "trapped_ranges"]

#: the access-mode flags that need an fd (libvfio-user: EINVAL without one)
_FD_ONLY = int(DmaMapFlags.MMAP | DmaMapFlags.FILE_IO)
_WITHHOLD = FdPlan(FdFate.WITHHOLD)
_UNMAP_ALL = int(DmaUnmapFlags.ALL)


def trapped_ranges(ranges: tuple[IovaRange, ...], iova: int,
                   size: int) -> tuple[IovaRange, ...] | None:
    """The ranges ``[iova, iova + size)`` overlaps (``()`` when ``ranges`` is
    empty: every window is trapped); None when the window is not trapped.
    A window that wraps past 2^64 is judged by its addresses below 2^64."""
    if not ranges:
        return ()
    end = min(iova + size, 1 << 64)
    hit = tuple(r for r in ranges if size and r.overlaps(iova, end - iova))
    return hit or None


class TrapDma:
    """The ``trap-dma`` mode of one session (see the module docstring).

    ``ranges``: the trapped IOVA ranges, every window when empty.
    :attr:`trapped` lists the windows trapped so far, as (iova, size)."""

    name: ClassVar[str] = "trap-dma"
    directions: ClassVar[frozenset[Direction]] = frozenset({Direction.C2S})

    def __init__(self, ranges: tuple[IovaRange, ...] = ()) -> None:
        self.ranges = ranges
        self.trapped: list[tuple[int, int]] = []
        #: the trapped windows not unmapped since (as far as DMA_UNMAP commands say)
        self.mapped: set[tuple[int, int]] = set()

    def closing(self, closed_by: str) -> str | None:
        """A warning when the server ends a session in which trapped windows
        were mapped: the proxy cannot tell from the wire why it left, but a
        server that reaches a window directly finds no memory in a trapped
        one, and some exit then. None otherwise."""
        if closed_by != "server" or not self.mapped:
            return None
        windows = ", ".join(f"[{iova:#x}, {iova + size:#x})"
                            for iova, size in sorted(self.mapped)[:4])
        more = f" and {len(self.mapped) - 4} more" if len(self.mapped) > 4 else ""
        return (f"the server closed the session with {len(self.mapped)} trapped DMA "
                f"window(s) mapped ({windows}{more}); a server that reaches a window "
                "directly rather than by DMA_READ/DMA_WRITE (libvfio-user's vfu_sgl_get, "
                "QEMU's own vfio-user server) finds no memory there: see its log, and trap "
                "only the windows it reaches by message (--trap-dma IOVA-RANGE)")

    def message(self, direction: Direction, data: bytes, nfds: int) -> Interposed | None:
        """A DMA_MAP command with an fd, for a trapped window: the fds withheld,
        the offset zeroed and the fd-only access flags cleared; None for anything else (a window
        outside the ranges, a map without fd, what does not decode)."""
        if direction is not Direction.C2S or len(data) < HEADER_SIZE:
            return None
        try:
            header = Header.parse(data)
        except ProtocolError:
            return None
        if header.command == Command.DMA_UNMAP and header.is_command:
            self._unmapped(data)
            return None
        if header.command != Command.DMA_MAP or not header.is_command or header.size != len(data):
            return None
        if nfds == 0:
            return None
        try:
            body = DmaMapBody.parse(data[HEADER_SIZE:])
        except (ProtocolError, ValueError):
            return None
        hit = trapped_ranges(self.ranges, body.iova, body.size)
        if hit is None:
            return None
        note: dict[str, Any] = {"iova": body.iova, "size": body.size}
        if hit:
            note["ranges"] = [str(r) for r in hit]
            if not _covered(hit, body.iova, body.size):
                note["whole"] = "the window overlaps the ranges in part; trapped whole"
        flags = body.flags & ~_FD_ONLY
        if flags != body.flags:
            note["flags"] = [body.flags, flags]
        if body.offset:
            note["offset"] = [body.offset, 0]
        new = DmaMapBody(body.argsz, flags, 0, body.iova, body.size, body.trailing)
        out = data[:HEADER_SIZE] + new.serialize()
        self.trapped.append((body.iova, body.size))
        self.mapped.add((body.iova, body.size))
        return Interposed(out, (_WITHHOLD,) * nfds, self.name, note)


    def _unmapped(self, data: bytes) -> None:
        """Forget the windows a DMA_UNMAP command names (all with UNMAP_ALL)."""
        try:
            body = DmaUnmapBody.parse(data[HEADER_SIZE:])
        except (ProtocolError, ValueError):
            return
        if body.flags & _UNMAP_ALL:
            self.mapped.clear()
        else:
            self.mapped.discard((body.iova, body.size))


def _covered(ranges: tuple[IovaRange, ...], iova: int, size: int) -> bool:
    """Whether the ranges together cover ``[iova, iova + size)``."""
    at, end = iova, iova + size
    for r in sorted(ranges):
        if r.start > at:
            return False
        at = max(at, r.end)
        if at >= end:
            return True
    return at >= end
