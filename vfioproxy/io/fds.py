"""Owned file descriptors and what kind of thing an fd refers to.

vfio-user passes memfds (guest RAM, region files), eventfds (interrupts) and
occasionally sockets as SCM_RIGHTS. :class:`OwnedFd` makes "who closes this
fd" explicit; :func:`inspect_fd` reports what an fd is from what the kernel
says about it (``/proc/self/fd``, ``fstat``, ``fcntl``), never by guessing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import stat
import warnings
from collections.abc import Iterable

import attrs

from recorder.closing import Closing
from recorder.records import FdKind, FdRecord

__all__ = [
    "FdInfo",
    "FdKind",
    "OwnedFd",
    "close_all",
    "count_open_fds",
    "fd_number",
    "inspect_fd",
    "make_eventfd",
    "make_memfd",
    "read_fd_contents",
]


class OwnedFd(Closing):
    """Sole owner of one open file descriptor.

    :meth:`close` closes it exactly once; later calls do nothing. An
    ``OwnedFd`` that is garbage-collected while still open closes its fd and
    emits a :class:`ResourceWarning`, as :class:`socket.socket` does.
    """

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        if fd < 0:
            raise ValueError(f"not a file descriptor: {fd}")
        self._fd = fd

    def fileno(self) -> int:
        """The fd number; :class:`ValueError` once closed or detached."""
        if self._fd < 0:
            raise ValueError("fileno() of a closed OwnedFd")
        return self._fd

    @property
    def closed(self) -> bool:
        """True once closed or detached."""
        return self._fd < 0

    def close(self) -> None:
        """Close the fd; a no-op if already closed or detached."""
        fd = self._fd
        if fd >= 0:
            # Forget the number before closing: even if close() fails, a second
            # call must never close a number the kernel may have handed out again.
            self._fd = -1
            os.close(fd)

    def detach(self) -> int:
        """Give up ownership and return the fd number, which stays open."""
        fd = self.fileno()
        self._fd = -1
        return fd

    def dup(self) -> OwnedFd:
        """A new owner of a close-on-exec duplicate (same open file description)."""
        return OwnedFd(os.dup(self.fileno()))


    def __repr__(self) -> str:
        return "<OwnedFd closed>" if self._fd < 0 else f"<OwnedFd fd={self._fd}>"

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:  # __init__ may have raised before setting it
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2, source=self)
            with contextlib.suppress(OSError):
                self.close()


def close_all(fds: Iterable[object]) -> None:
    """Close every :class:`OwnedFd` of ``fds`` (each closes once: an already
    closed one does nothing; anything else, such as None or a number someone
    else owns, is left alone): the one loop for dropping fds."""
    for fd in fds:
        if isinstance(fd, OwnedFd):
            fd.close()


def fd_number(fd: int | OwnedFd) -> int:
    """The fd number of an int or an :class:`OwnedFd`."""
    return fd if isinstance(fd, int) else fd.fileno()



@attrs.frozen
class FdInfo:
    """What the kernel says about one fd.

    ``size`` is ``st_size`` for memfds and regular files (``None`` otherwise),
    ``flags`` the ``F_GETFL`` file status flags (shared by every duplicate of
    the open file description, see protocol.md §6 pitfall 18), ``seals`` the
    ``F_GET_SEALS`` mask of a memfd (``None`` otherwise), ``target`` the
    ``/proc/self/fd`` link text such as ``"/memfd:guest-ram (deleted)"``.
    """

    kind: FdKind
    size: int | None
    flags: int
    seals: int | None
    inode: int
    target: str


_MEMFD_PREFIX = "/memfd:"
_EVENTFD_TARGET = "anon_inode:[eventfd]"


def inspect_fd(fd: int | OwnedFd) -> FdInfo:
    """Describe an open fd: kind, size, flags, seals, inode and link target."""
    n = fd_number(fd)
    st = os.fstat(n)
    target = os.readlink(f"/proc/self/fd/{n}")
    if target.startswith(_MEMFD_PREFIX):
        kind = FdKind.MEMFD
    elif target == _EVENTFD_TARGET:
        kind = FdKind.EVENTFD
    elif stat.S_ISSOCK(st.st_mode):
        kind = FdKind.SOCKET
    elif stat.S_ISREG(st.st_mode):
        kind = FdKind.FILE
    else:
        kind = FdKind.OTHER
    return FdInfo(
        kind=kind,
        size=st.st_size if kind in (FdKind.MEMFD, FdKind.FILE) else None,
        flags=fcntl.fcntl(n, fcntl.F_GETFL),
        seals=fcntl.fcntl(n, fcntl.F_GET_SEALS) if kind is FdKind.MEMFD else None,
        inode=st.st_ino,
        target=target,
    )


def read_fd_contents(fd: int | OwnedFd, limit: int) -> bytes | None:
    """The whole contents of a memfd or regular file if its size is at most ``limit``.

    Reads with ``pread`` from offset 0, so the fd's file offset (shared with
    every duplicate, including the peer's) never moves. Returns ``None`` for
    anything larger than ``limit``, for fds that are not memfds or regular
    files, and for fds not open for reading.
    """
    n = fd_number(fd)
    st = os.fstat(n)
    if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
        return None
    flags = fcntl.fcntl(n, fcntl.F_GETFL)
    if flags & os.O_PATH or flags & os.O_ACCMODE == os.O_WRONLY:
        return None
    chunks: list[bytes] = []
    offset = 0
    while offset < st.st_size:
        chunk = os.pread(n, st.st_size - offset, offset)
        if not chunk:  # the file shrank since fstat
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def make_memfd(name: str, size: int = 0, data: bytes = b"", *, seals: int = 0) -> OwnedFd:
    """A new close-on-exec memfd that allows sealing.

    ``data`` is written at offset 0 and the file is sized to
    ``max(size, len(data))`` (zero-filled); ``seals`` (``fcntl.F_SEAL_*``) are
    added last. The file offset stays at 0.
    """
    owned = OwnedFd(os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING))
    try:
        view = memoryview(data)
        written = 0
        while written < len(view):
            written += os.pwrite(owned.fileno(), view[written:], written)
        if size > len(data):
            os.ftruncate(owned.fileno(), size)
        if seals:
            fcntl.fcntl(owned.fileno(), fcntl.F_ADD_SEALS, seals)
    except BaseException:
        owned.close()
        raise
    return owned


def make_eventfd(initval: int = 0, nonblocking: bool = True) -> OwnedFd:
    """A new close-on-exec eventfd holding ``initval``."""
    flags = os.EFD_CLOEXEC | (os.EFD_NONBLOCK if nonblocking else 0)
    return OwnedFd(os.eventfd(initval, flags))


def count_open_fds() -> int:
    """How many fds this process has open (from ``/proc/self/fd``).

    The directory fd used to list them is not counted.
    """
    return len(os.listdir("/proc/self/fd")) - 1


def fd_record(fd: int | OwnedFd, position: int, *, contents_limit: int = 0) -> FdRecord:
    """What a trace keeps of one passed fd: kind, size, flags, seals, inode and,
    for memfds of at most ``contents_limit`` bytes, their contents and SHA-256."""
    info = inspect_fd(fd)
    contents = None
    digest = None
    if contents_limit and info.kind is FdKind.MEMFD and info.size is not None:
        data = read_fd_contents(fd, contents_limit)
        if data is not None and len(data) == info.size:
            contents = data
            digest = hashlib.sha256(data).digest()
    return FdRecord(
        position=position,
        kind=info.kind,
        size=info.size,
        flags=info.flags,
        seals=info.seals,
        inode=info.inode,
        contents=contents,
        sha256=digest,
    )
