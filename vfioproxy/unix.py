"""UNIX-socket listeners that replace only stale sockets."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat

import trio

from vfioproxy.errors import VfioProxyError

#: the longest path an AF_UNIX address holds (sun_path, less its terminating NUL)
_SUN_PATH_MAX = 107


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
    any other existing file is left alone and :class:`SocketPathError` raised.
    The socket appears at ``path`` already listening (it is bound to a
    temporary name next to it and renamed), so a client that connects as
    soon as the path exists is never refused.
    """
    target = os.fspath(path)
    _remove_stale(target)
    staging = f"{target}.{os.getpid()}.tmp"
    if len(os.fsencode(staging)) > _SUN_PATH_MAX:
        staging = target  # no room for a longer name: bind in place
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(staging).st_mode):
                os.unlink(staging)  # left by a process of this pid that died
        old_umask = os.umask(0o777 & ~mode)
        try:
            await sock.bind(staging)
        finally:
            os.umask(old_umask)
        os.chmod(staging, mode)
        sock.listen(backlog)
        if staging != target:
            os.rename(staging, target)
    except BaseException:
        sock.close()
        if staging != target:
            with contextlib.suppress(OSError):
                os.unlink(staging)
        raise
    return trio.SocketListener(sock)
