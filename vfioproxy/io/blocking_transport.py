"""Blocking message I/O for the proxy's forwarding threads.

:class:`BlockingFdSocket` frames messages exactly as
:class:`vfioproxy.io.transport.FdStream` does (header and its fds with one
``recvmsg``, the body without an ancillary buffer, sizes that cannot be
framed taken as a header alone, one ``sendmsg`` per message with its fds on
the first byte), but on a blocking socket: a thread blocked in ``recvmsg``
is woken by the kernel itself, without an event loop's ``epoll`` round,
readiness re-registration and task switch. For a relay that is most of the
cost of a small message (see ``bench/RESULTS.md``).

A thread blocked here is stopped with :meth:`BlockingFdSocket.shutdown`
from another thread: its receive then sees EOF and its send ``EPIPE``.
"""

from __future__ import annotations

import contextlib
import socket
from array import array
from collections.abc import Sequence

from vfioproxy.errors import ConnectionClosedError, TransportError
from vfioproxy.io.fds import OwnedFd, close_all, fd_number
from vfioproxy.io.receive import (
    FD_SIZE,
    RECV_FLAGS,
    SCM_MAX_FD,
    eof_in_header,
    fds_truncated,
    reset_error,
    take_fds,
)
from vfioproxy.protocol.header import DEFAULT_MAX_MESSAGE_SIZE, HEADER_SIZE, framed_body_length
from vfioproxy.protocol.offsets import SIZE, SIZE_ONLY

__all__ = ["BlockingFdSocket"]

# plain ints: the socket module's flags are IntFlag members, and every
# operation on those builds a new enum member (a microsecond on each message)
_WAITALL = int(socket.MSG_WAITALL)
_SEND_FLAGS = int(socket.MSG_NOSIGNAL)
_CTRUNC = int(socket.MSG_CTRUNC)
_SCM = (socket.SOL_SOCKET, socket.SCM_RIGHTS)


class BlockingFdSocket:
    """vfio-user messages and their fds over a blocking AF_UNIX stream socket.

    One thread may receive while another sends. Errors are those of
    :class:`~vfioproxy.io.transport.FdStream`: EOF and resets raise
    :class:`~vfioproxy.errors.ConnectionClosedError` (``mid_message``,
    ``received`` and ``partial`` say how much of a message had arrived), too
    many fds raise :class:`~vfioproxy.errors.FdsTruncatedError`.
    """

    def __init__(self, sock: socket.socket, *, max_fds: int = SCM_MAX_FD) -> None:
        """Take ownership of ``sock`` (connected, AF_UNIX/SOCK_STREAM) and make it blocking."""
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ValueError(f"BlockingFdSocket needs an AF_UNIX SOCK_STREAM socket, got {sock!r}")
        sock.setblocking(True)
        self.socket = sock
        self.max_fds = max_fds
        self._ancbufsize = socket.CMSG_LEN(max_fds * FD_SIZE)

    def fileno(self) -> int:
        return self.socket.fileno()

    def __repr__(self) -> str:
        return f"<BlockingFdSocket fd={self.fileno()} max_fds={self.max_fds}>"

    def send_message(self, data: bytes | bytearray, fds: Sequence[int | OwnedFd] = ()) -> None:
        """Send one whole message in one ``sendmsg``, ``fds`` on its first byte."""
        sock = self.socket
        total = len(data)
        sent = 0
        try:
            if fds:
                sent = sock.sendmsg([data], [(*_SCM, array("i", map(fd_number, fds)))], _SEND_FLAGS)
            else:
                sent = sock.send(data, _SEND_FLAGS)
            while sent < total:
                sent += sock.send(memoryview(data)[sent:], _SEND_FLAGS)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ConnectionClosedError(
                f"peer closed the connection; sent {sent} of {total} message bytes",
                mid_message=sent > 0,
            ) from exc

    def receive_message(
        self, max_size: int = DEFAULT_MAX_MESSAGE_SIZE
    ) -> tuple[bytes, list[OwnedFd]]:
        """Receive one framed message and the fds of its header (the caller owns them)."""
        header, fds = self._read_header()
        body_len = framed_body_length(SIZE_ONLY.unpack_from(header, SIZE.offset)[0], max_size)
        if not body_len:
            return header, fds
        total = HEADER_SIZE + body_len
        pieces = [header]
        got = HEADER_SIZE
        try:
            # usually one recv: the whole body, one syscall and one copy
            while got < total:
                piece = self.socket.recv(total - got, _WAITALL)
                if not piece:
                    raise ConnectionClosedError(
                        f"peer closed the connection after {got} of {total} message bytes",
                        mid_message=True,
                        received=got,
                        partial=b"".join(pieces),
                    )
                pieces.append(piece)
                got += len(piece)
        except BaseException as exc:
            close_all(fds)
            if isinstance(exc, ConnectionResetError):
                raise reset_error(got, total, "message", b"".join(pieces)) from exc
            raise
        return header + pieces[1] if len(pieces) == 2 else b"".join(pieces), fds

    def _read_header(self) -> tuple[bytes, list[OwnedFd]]:
        sock = self.socket
        fds: list[OwnedFd] = []
        header = b""
        try:
            while True:
                chunk, ancdata, flags, _ = sock.recvmsg(
                    HEADER_SIZE - len(header), self._ancbufsize, RECV_FLAGS
                )
                if ancdata:
                    take_fds(ancdata, fds)
                if flags & _CTRUNC:
                    raise fds_truncated(self.max_fds, len(fds))
                if not chunk:
                    raise eof_in_header(header)
                header += chunk
                if len(header) == HEADER_SIZE:
                    return header, fds
        except BaseException as exc:
            close_all(fds)
            if isinstance(exc, ConnectionResetError):
                raise reset_error(len(header), HEADER_SIZE, "header", header) from exc
            if isinstance(exc, OSError) and not isinstance(exc, TransportError):
                raise TransportError(f"receiving a header failed: {exc}") from exc
            raise

    def shutdown(self) -> None:
        """Wake and end whatever another thread does on this socket (both directions)."""
        with contextlib.suppress(OSError):  # not connected any more: nothing blocks on it
            self.socket.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.socket.close()
