"""UNIX-socket listeners that replace only stale sockets."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat

import trio

from vfioproxy.errors import VfioProxyError, os_reason

#: __SO_ACCEPTCON in the Flags column of /proc/net/unix: the socket listens
_ACCEPTCON = 0x10000


def is_listening(path: str | os.PathLike[str]) -> bool:
    """Whether a UNIX socket bound to ``path`` (as it was bound) listens: its file
    appears at ``bind()``, and a client connecting before ``listen()`` is
    refused. Read from ``/proc/net/unix``, without connecting."""
    target = os.fspath(path)
    with open("/proc/net/unix") as table:
        next(table)
        for line in table:
            fields = line.split(None, 7)
            if (len(fields) == 8 and fields[7].rstrip("\n") == target
                    and int(fields[3], 16) & _ACCEPTCON):
                return True
    return False


class SocketPathError(VfioProxyError):
    """The listening path cannot be used (in use, or not a socket)."""


def _remove_stale(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketPathError(f"{path} exists and is not a socket; not removing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # stale: nothing listens on it
        return
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise
    finally:
        probe.close()
    raise SocketPathError(f"{path} is in use: something is listening on it")


async def open_unix_listener(
    path: str | os.PathLike[str], *, mode: int = 0o600, backlog: int = 16
) -> trio.SocketListener:
    """Listen on ``path``, created with permissions ``mode``.

    An existing socket at ``path`` is replaced only when nothing listens on it;
    any other existing file is left alone and :class:`SocketPathError` raised,
    as it is when the OS refuses (``cannot listen on PATH: <the OS's words>``).
    """
    target = os.fspath(path)
    try:
        return await _listen(target, mode, backlog)
    except OSError as exc:
        raise SocketPathError(f"cannot listen on {target}: {os_reason(exc)}") from exc


async def _listen(target: str, mode: int, backlog: int) -> trio.SocketListener:
    _remove_stale(target)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old_umask = os.umask(0o777 & ~mode)
        try:
            await sock.bind(target)
        finally:
            os.umask(old_umask)
        os.chmod(target, mode)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)
