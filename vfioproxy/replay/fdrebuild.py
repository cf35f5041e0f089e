"""Fresh fds standing in for recorded ones: same kind, same size, recorded contents.

A trace keeps metadata of every fd a message carried (kind, size, inode,
sometimes the contents of a small memfd), never the fd. A replay needs real
fds in their place:

- ``memfd``: a new sparse memfd of the recorded size, filled with the
  recorded contents when the trace has them;
- ``file``: an unlinked regular file (``O_TMPFILE``) of that size, with its
  contents (a memfd where ``O_TMPFILE`` is not available);
- ``eventfd``: a new eventfd; ``socket``: one end of a new socketpair (the
  other end is kept open until :meth:`FdRebuilder.close`); anything else:
  ``/dev/null``.

Memory-like fds that stand for the same object get the same fresh fd: by
recorded inode when the trace has one, else by kind and size within one
direction (guest RAM passed again with each DMA_MAP, a region file passed
again with each region-info reply — true of every bundled capture). Event
fds and sockets are always new. The rebuilder owns what it made and closes
it once; callers send duplicates.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Sequence

from recorder.records import FdRecord
from vfioproxy.io.fds import FdKind, OwnedFd, close_all, make_eventfd, make_memfd
from vfioproxy.side import Direction

__all__ = ["FdRebuilder"]

_SHARED_KINDS = (FdKind.MEMFD, FdKind.FILE)


class FdRebuilder:
    """Makes and keeps the fresh fds of one replay (see the module docstring)."""

    def __init__(self, name: str = "vfioproxy-replay") -> None:
        self.name = name
        self._made: dict[tuple[object, ...], OwnedFd] = {}
        self._kept: list[OwnedFd] = []

    def fresh(self, direction: Direction, records: Sequence[FdRecord]) -> list[OwnedFd]:
        """Duplicates of the fresh fds for one message's recorded fds (the caller
        sends and closes them)."""
        return [self.original(direction, record).dup() for record in records]

    def original(self, direction: Direction, record: FdRecord) -> OwnedFd:
        """The fresh fd standing for ``record`` (owned by the rebuilder)."""
        key: tuple[object, ...] | None = None
        if record.kind in _SHARED_KINDS:
            key = ((record.kind, record.inode) if record.inode is not None
                   else (direction, record.kind, record.size))
            made = self._made.get(key)
            if made is not None:
                return made
        fd = self._make(record)
        if key is None:
            self._kept.append(fd)
        else:
            self._made[key] = fd
        return fd

    def _make(self, record: FdRecord) -> OwnedFd:
        size = record.size or 0
        contents = record.contents or b""
        if record.kind is FdKind.MEMFD:
            return make_memfd(self.name, size, contents)
        if record.kind is FdKind.FILE:
            return _tmpfile(self.name, size, contents)
        if record.kind is FdKind.EVENTFD:
            return make_eventfd()
        if record.kind is FdKind.SOCKET:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            self._kept.append(OwnedFd(ours.detach()))
            return OwnedFd(theirs.detach())
        return OwnedFd(os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC))

    def close(self) -> None:
        """Close every fd made; idempotent."""
        close_all([*self._made.values(), *self._kept])
        self._made.clear()
        self._kept.clear()


def _tmpfile(name: str, size: int, contents: bytes) -> OwnedFd:
    try:
        fd = OwnedFd(os.open(tempfile.gettempdir(), os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600))
    except OSError:
        return make_memfd(name, size, contents)
    try:
        os.pwrite(fd.fileno(), contents, 0)
        os.ftruncate(fd.fileno(), max(size, len(contents)))
    except BaseException:
        fd.close()
        raise
    return fd
