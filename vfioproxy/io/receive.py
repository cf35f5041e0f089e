"""The receive side both transports share: SCM_RIGHTS facts and the errors of a
message that did not arrive whole (protocol.md §1.5, §6 pitfalls 1-3).

The trio transport (:mod:`vfioproxy.io.transport`), the blocking one
(:mod:`vfioproxy.io.blocking_transport`) and the proxy's framing reader
(:mod:`vfioproxy.proxy.wire`) read the same way; what they must agree on is
here, once.
"""

from __future__ import annotations

import socket
from array import array

from vfioproxy.errors import ConnectionClosedError, FdsTruncatedError
from vfioproxy.io.fds import OwnedFd
from vfioproxy.protocol.header import HEADER_SIZE

__all__ = [
    "FD_SIZE",
    "RECV_FLAGS",
    "SCM_MAX_FD",
    "check_max_fds",
    "eof_in_header",
    "fds_truncated",
    "reset_error",
    "take_fds",
]

#: Linux's limit on fds in one ``sendmsg`` (include/net/scm.h)
SCM_MAX_FD = 253

#: bytes of one fd number in an SCM_RIGHTS cmsg
FD_SIZE = array("i").itemsize
#: the flags of every ``recvmsg`` that may carry fds: they arrive close-on-exec
RECV_FLAGS = int(socket.MSG_CMSG_CLOEXEC)


def check_max_fds(max_fds: int) -> None:
    """Refuse a ``max_fds`` outside what one message can carry."""
    if not 0 <= max_fds <= SCM_MAX_FD:
        raise ValueError(f"max_fds must be in 0..{SCM_MAX_FD}, got {max_fds}")


def take_fds(ancdata: list[tuple[int, int, bytes]], into: list[OwnedFd]) -> None:
    """Wrap the fds of every SCM_RIGHTS cmsg in ``ancdata`` (the kernel installed them)."""
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            numbers = array("i")
            numbers.frombytes(data[: len(data) - len(data) % FD_SIZE])
            into.extend(map(OwnedFd, numbers))


def eof_in_header(received: bytes) -> ConnectionClosedError:
    """The error for EOF before a header was whole (``received``: its bytes so far)."""
    if not received:
        return ConnectionClosedError("peer closed the connection", mid_message=False)
    return ConnectionClosedError(
        f"peer closed the connection after {len(received)} of {HEADER_SIZE} header bytes",
        mid_message=True,
        received=len(received),
        partial=received,
    )


def reset_error(received: int, total: int, unit: str, partial: bytes) -> ConnectionClosedError:
    """The error for a reset after ``received`` of ``total`` bytes of a ``unit``
    (``"header"`` or ``"message"``); ``partial``: the bytes that did arrive."""
    return ConnectionClosedError(
        f"peer reset the connection after {received} of {total} {unit} bytes",
        mid_message=received > 0,
        received=received,
        partial=partial,
    )


def fds_truncated(max_fds: int, arrived: int) -> FdsTruncatedError:
    """The error for a header whose fds did not all fit (``MSG_CTRUNC``)."""
    return FdsTruncatedError(
        f"a message header arrived with more fds than fit (max_fds={max_fds}) or than "
        f"this process may open; the kernel dropped the rest and the {arrived} that "
        f"arrived were closed"
    )
