"""What the proxy refuses, at start and when a client arrives, and how it lets go.

* :func:`check_not_itself`: a server path that is the proxy's own listening
  socket (the same path, a symlink to it, another name of the same inode)
  would connect every session to the proxy again, which connects again...:
  refused when the proxy starts, with :class:`ProxyLoopError`.
* :class:`LoopGuard`: the same, found at run time (the server path became
  such a link later). A session's connection to the server that landed on
  the proxy's own listener is known at once (the socket it reached is bound
  to the listener's name and was set listening by this process); the
  session is refused, and the connection it made, waiting in the proxy's
  own listen queue, is marked with a random token so that, accepted, it is
  closed without becoming a session. No session or fd storm can start.
* :func:`server_problem`: why the server path cannot be connected to now
  (missing, not a socket, nobody listening), for the warning at start; the
  proxy goes on serving, as the server may come up later.
* :func:`close_cleanly`: a client refused before its session ran reads EOF,
  not a connection reset (which unread bytes at close would cause).
"""

from __future__ import annotations

import os
import secrets
import socket
import stat
import struct

import trio

from vfioproxy.errors import UsageError
from vfioproxy.io.unix import is_listening

__all__ = [
    "CLOSE_DRAIN",
    "LoopGuard",
    "ProxyLoopError",
    "check_not_itself",
    "close_cleanly",
    "server_problem",
]

#: how long a refused client may take to close after reading EOF
CLOSE_DRAIN = 1.0
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ProxyLoopError(UsageError):
    """The server path leads back to the proxy's own listening socket."""


def check_not_itself(listen_path: str, server_path: str) -> None:
    """Raise :class:`ProxyLoopError` when ``server_path`` names the socket at
    ``listen_path``: the same path once symlinks are resolved (a dangling link
    too), or, both existing, the same inode (another name of the socket)."""
    same = os.path.realpath(listen_path) == os.path.realpath(server_path)
    if not same:
        try:
            mine, theirs = os.stat(listen_path), os.stat(server_path)
        except OSError:
            return  # one is not there (yet): nothing else to compare
        same = (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)
    if same:
        how = "is" if os.path.abspath(listen_path) == os.path.abspath(server_path) else (
            "leads to")
        raise ProxyLoopError(
            f"--server {server_path} {how} this proxy's own --listen socket {listen_path}: "
            "every session would connect to the proxy itself")


def server_problem(server_path: str) -> str | None:
    """Why nothing can connect to ``server_path`` now, or None when a socket
    there listens (looked up without connecting: a one-shot server must not
    see a probe as its client)."""
    try:
        st = os.stat(server_path)
    except FileNotFoundError:
        return "does not exist"
    except OSError as exc:
        return f"cannot be reached ({exc.strerror})"
    if not stat.S_ISSOCK(st.st_mode):
        return "is not a socket"
    names = {server_path, os.path.abspath(server_path), os.path.realpath(server_path)}
    if not any(is_listening(name) for name in names):
        return "is a socket nothing listens on"
    return None


class LoopGuard:
    """Finds sessions whose server connection came back to this proxy's listener."""

    def __init__(self) -> None:
        self.listen_name: str | bytes | None = None
        self.refused = 0  # sessions refused as loops
        self._token = secrets.token_bytes(16)
        self._pending = 0  # marked connections not yet accepted

    def came_back(self, server: socket.socket) -> bool:
        """Whether ``server`` (just connected) reached this proxy's own listener;
        if so it is marked for :meth:`is_marked` (close it afterwards)."""
        try:
            if self.listen_name is None or server.getpeername() != self.listen_name:
                return False
            pid = _PEERCRED.unpack(server.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))[0]
        except OSError:
            return False
        if pid != os.getpid():
            return False
        self.refused += 1
        try:
            server.send(self._token)  # an empty socket buffer always takes 16 bytes
        except OSError:
            return True  # the listener closed it already: nothing will be accepted
        self._pending += 1
        return True

    def is_marked(self, client: socket.socket) -> bool:
        """Whether an accepted ``client`` is a connection :meth:`came_back` marked.
        Only looked at while marked connections wait; peeks, reads nothing."""
        if not self._pending:
            return False
        try:
            head = client.recv(len(self._token), socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except OSError:
            return False
        if head != self._token:
            return False
        self._pending -= 1
        return True


async def close_cleanly(sock: socket.socket, *, within: float = CLOSE_DRAIN) -> None:
    """Close ``sock`` so that its peer reads EOF: shut down our sending side,
    discard what the peer sent until it closes (at most ``within`` seconds),
    then close. Cancellation closes at once."""
    try:
        sock.setblocking(False)
        sock.shutdown(socket.SHUT_WR)
        with trio.move_on_after(within):
            while True:
                await trio.lowlevel.wait_readable(sock)
                if not sock.recv(65536):
                    break
    except OSError:
        pass
    finally:
        sock.close()
