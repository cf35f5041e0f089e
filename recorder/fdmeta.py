"""Fd metadata for trace records, taken from a live fd as it passes."""

from __future__ import annotations

import hashlib

from recorder.records import FdRecord
from vfioproxy.fds import FdKind, OwnedFd, inspect_fd, read_fd_contents


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
