"""A trio stream of vfio-user messages with their file descriptors.

Implements protocol.md §1.5 and §6 pitfalls 1-3 and 5: a message and its fds
leave in one ``sendmsg`` (fds on the first byte, the rest of a short send
follows at once without them); a receiver collects fds only while reading a
16-byte header (``recvmsg`` with room for ``max_fds`` fds and
``MSG_CMSG_CLOEXEC``), reads the body with plain ``recv`` and treats
``MSG_CTRUNC`` as fatal.

Speed: :class:`FdStream` calls the non-blocking socket directly and waits for
readiness only when the kernel says it would block, with one trio checkpoint
per operation (trio's own socket methods make two per syscall, which doubles
the cost of a small message). A message already in the socket buffer costs
two syscalls: ``recvmsg`` for the header and ``recv`` for the body.
"""

from __future__ import annotations

import os
import socket
from array import array
from collections.abc import Sequence

import trio

from vfioproxy.errors import ConnectionClosedError, TransportError
from vfioproxy.io.fds import OwnedFd, close_all, fd_number
from vfioproxy.io.receive import (
    FD_SIZE,
    RECV_FLAGS,
    SCM_MAX_FD,
    check_max_fds,
    eof_in_header,
    fds_truncated,
    reset_error,
    take_fds,
)
from vfioproxy.protocol.header import DEFAULT_MAX_MESSAGE_SIZE, HEADER_SIZE, framed_body_length
from vfioproxy.protocol.offsets import SIZE, SIZE_ONLY

__all__ = ["SCM_MAX_FD", "FdStream", "fd_stream_pair", "open_unix_fd_stream"]

_SEND_FLAGS = socket.MSG_NOSIGNAL


class FdStream(trio.abc.AsyncResource):
    """vfio-user messages and their fds over a connected AF_UNIX stream socket.

    Not safe for concurrent use in one direction: two tasks sending (or two
    receiving) at once get :class:`trio.BusyResourceError`; one sender and one
    receiver may run concurrently.

    Cancellation: every operation is a trio checkpoint. If it is cancelled
    before any byte of the message moved, the stream is intact and the call
    can be repeated. If it is cancelled (or fails) after part of a message was
    sent or received, the byte stream can no longer be framed: the stream is
    marked broken and every later send or receive raises
    :class:`~vfioproxy.errors.TransportError` ``"stream broken: ..."``; only
    :meth:`send_eof`, :meth:`aclose` and :meth:`fileno` still work. Fds that
    arrived with a receive that does not return are closed.

    A peer that closed or reset the connection surfaces as
    :class:`~vfioproxy.errors.ConnectionClosedError`.
    """

    def __init__(self, sock: trio.socket.SocketType, *, max_fds: int = SCM_MAX_FD) -> None:
        """Wrap ``sock`` (connected, ``AF_UNIX``/``SOCK_STREAM``); the stream owns it.

        ``max_fds`` is how many fds one header read can take (0 to 253); a
        message carrying more raises :class:`~vfioproxy.errors.FdsTruncatedError`.
        """
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ValueError(f"FdStream needs an AF_UNIX SOCK_STREAM socket, got {sock!r}")
        check_max_fds(max_fds)
        # trio has no public accessor for the stdlib socket it wraps; we need it
        # to make the syscalls without trio's per-call checkpoints.
        raw = getattr(sock, "_sock", None)
        if not isinstance(raw, socket.socket):
            raise TypeError(f"expected a trio socket, got {sock!r}")
        self.socket = sock
        self.max_fds = max_fds
        self._raw = raw
        # CMSG_LEN, not CMSG_SPACE: the kernel fills whatever fits, and
        # CMSG_SPACE's padding to 8 bytes makes room for one more fd when
        # max_fds is odd (CMSG_SPACE(4) takes 2 fds without MSG_CTRUNC).
        self._ancbufsize = socket.CMSG_LEN(max_fds * FD_SIZE)
        self._broken: str | None = None
        self._closed = False
        self._sending = False
        self._receiving = False

    def fileno(self) -> int:
        """The socket's fd number (-1 once closed)."""
        return self._raw.fileno()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"broken: {self._broken}" if self._broken else "open"
        return f"<FdStream fd={self.fileno()} max_fds={self.max_fds} {state}>"

    def _check_usable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this FdStream was closed")
        if self._broken is not None:
            raise TransportError(f"stream broken: {self._broken}")

    def _break(self, what: str, done: int, total: int, exc: BaseException) -> None:
        self._broken = f"interrupted {what} after {done} of {total} bytes (by {type(exc).__name__})"

    # -- sending -----------------------------------------------------------

    async def send_message(
        self,
        data: bytes | bytearray | memoryview,
        fds: Sequence[int | OwnedFd] = (),
    ) -> None:
        """Send one whole message, with ``fds`` as SCM_RIGHTS on its first byte.

        Everything goes in one ``sendmsg``; if the kernel takes only part, the
        rest follows at once without the fds. The caller keeps ownership of
        ``fds`` (the kernel passes duplicates). On cancellation see the class
        docstring: cancelled while waiting for the first byte to be accepted,
        nothing was sent; cancelled later, the stream is broken.
        """
        self._check_usable()
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this FdStream")
        view = memoryview(data).cast("B")
        total = len(view)
        if fds and not total:
            raise ValueError("fds need at least one byte of data to travel with")
        ancdata = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", map(fd_number, fds)))] if fds else []
        )
        await trio.lowlevel.checkpoint_if_cancelled()
        raw = self._raw
        self._sending = True
        sent = 0
        try:
            while True:
                try:
                    sent = raw.sendmsg([view], ancdata, _SEND_FLAGS)
                    break
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(raw)
            while sent < total:
                try:
                    sent += raw.send(view[sent:], _SEND_FLAGS)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(raw)
        except (BrokenPipeError, ConnectionResetError) as exc:
            if sent:
                self._break("sending a message", sent, total, exc)
            raise ConnectionClosedError(
                f"peer closed the connection; sent {sent} of {total} message bytes",
                mid_message=sent > 0,
            ) from exc
        except BaseException as exc:
            if sent:
                self._break("sending a message", sent, total, exc)
            self._raise_if_closed(exc)
            raise
        finally:
            self._sending = False
        await trio.lowlevel.cancel_shielded_checkpoint()

    def send_eof(self) -> None:
        """Shut down the sending direction (``SHUT_WR``); the peer then reads EOF."""
        if self._closed:
            raise trio.ClosedResourceError("this FdStream was closed")
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this FdStream")
        self._raw.shutdown(socket.SHUT_WR)

    # -- receiving ---------------------------------------------------------

    def _begin_receive(self) -> None:
        self._check_usable()
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this FdStream")

    async def receive_header(self) -> tuple[bytes, list[OwnedFd]]:
        """Receive exactly one 16-byte header and the fds that came with it.

        The caller owns the returned fds. Raises
        :class:`~vfioproxy.errors.ConnectionClosedError` on EOF (``mid_message``
        false if no byte had arrived) and
        :class:`~vfioproxy.errors.FdsTruncatedError` if the peer sent more fds
        than ``max_fds`` (those that arrived are closed; the stream is then
        broken). Cancellation: see the class docstring.
        """
        self._begin_receive()
        await trio.lowlevel.checkpoint_if_cancelled()
        self._receiving = True
        try:
            result = await self._read_header()
        finally:
            self._receiving = False
        await trio.lowlevel.cancel_shielded_checkpoint()
        return result

    async def receive_exactly(self, n: int) -> bytes:
        """Receive exactly ``n`` bytes (a message body) without taking fds.

        No ancillary buffer is offered, as QEMU and libvfio-user read bodies:
        fds a peer attached to a later part of a message are discarded by the
        kernel. EOF raises :class:`~vfioproxy.errors.ConnectionClosedError`
        with ``mid_message`` true and ``received`` = bytes of this call.
        Cancellation: see the class docstring.
        """
        if n < 0:
            raise ValueError(f"cannot receive {n} bytes")
        self._begin_receive()
        await trio.lowlevel.checkpoint_if_cancelled()
        self._receiving = True
        try:
            first, rest = await self._read_body(n, 0)
        finally:
            self._receiving = False
        await trio.lowlevel.cancel_shielded_checkpoint()
        return first if rest is None else first + rest

    async def receive_message(
        self, max_size: int = DEFAULT_MAX_MESSAGE_SIZE
    ) -> tuple[bytes, list[OwnedFd]]:
        """Receive one framed message (header + body) and the fds of its header.

        The body length is ``framed_body_length(size, max_size)``: a header
        whose ``size`` is below 16 or above ``max_size`` is returned alone, 16
        bytes, and the next 16 bytes are taken as the next header (protocol.md
        §6 pitfall 20). The caller owns the returned fds. Errors as for
        :meth:`receive_header` and :meth:`receive_exactly` (``received`` counts
        from the first header byte). Cancellation: see the class docstring.
        """
        self._begin_receive()
        await trio.lowlevel.checkpoint_if_cancelled()
        self._receiving = True
        try:
            message, fds = await self._read_header()
            body_len = framed_body_length(SIZE_ONLY.unpack_from(message, SIZE.offset)[0], max_size)
            if body_len:
                try:
                    first, rest = await self._read_body(body_len, HEADER_SIZE)
                except BaseException as exc:
                    close_all(fds)
                    if isinstance(exc, ConnectionClosedError):
                        exc.partial = message + exc.partial
                    raise
                # one copy of the body, however many pieces it arrived in
                message = message + first if rest is None else b"".join((message, first, rest))
        finally:
            self._receiving = False
        await trio.lowlevel.cancel_shielded_checkpoint()
        return message, fds

    async def _read_header(self) -> tuple[bytes, list[OwnedFd]]:
        raw = self._raw
        fds: list[OwnedFd] = []
        header = bytearray()
        try:
            while True:
                try:
                    chunk, ancdata, flags, _ = raw.recvmsg(
                        HEADER_SIZE - len(header), self._ancbufsize, RECV_FLAGS
                    )
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(raw)
                    continue
                if ancdata:
                    take_fds(ancdata, fds)
                if flags & socket.MSG_CTRUNC:
                    header += chunk
                    raise fds_truncated(self.max_fds, len(fds))
                if len(chunk) == HEADER_SIZE:
                    return chunk, fds
                if not chunk:
                    raise eof_in_header(bytes(header))
                header += chunk
                if len(header) == HEADER_SIZE:
                    return bytes(header), fds
        except ConnectionResetError as exc:
            self._fail_receive("receiving a header", fds, len(header), HEADER_SIZE, exc)
            raise reset_error(len(header), HEADER_SIZE, "header", bytes(header)) from exc
        except BaseException as exc:
            self._fail_receive("receiving a header", fds, len(header), HEADER_SIZE, exc)
            self._raise_if_closed(exc)
            raise

    async def _read_body(self, n: int, before: int) -> tuple[bytes, bytearray | None]:
        """Receive exactly ``n`` bytes as ``(first, rest)``.

        ``rest`` is ``None`` when ``first`` holds them all; ``before`` = bytes
        of this message already received (for errors). The first try is
        one ``recv`` of everything: a body already in the socket buffer then
        costs one syscall and no extra copy. Whatever is still missing goes
        into one preallocated buffer with ``recv_into`` (a fresh ``recv``
        buffer per piece is slower for bodies larger than the socket buffer).
        """
        if not n:
            return b"", None
        raw = self._raw
        got = 0
        first = b""
        rest: bytearray | None = None
        try:
            try:
                first = raw.recv(n)
            except BlockingIOError:
                first = b""
            else:
                if len(first) == n:
                    return first, None
                if not first:
                    raise self._eof(before, 0, n, b"")
                got = len(first)
            rest = bytearray(n - got)
            view = memoryview(rest)
            while got < n:
                try:
                    k = raw.recv_into(view[got - len(first) :])
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(raw)
                    continue
                if not k:
                    raise self._eof(before, got, n, self._arrived(first, rest, got))
                got += k
        except ConnectionResetError as exc:
            self._fail_receive("receiving a message", [], before + got, before + n, exc)
            # the caller puts the header in front of the body's bytes
            partial = self._arrived(first, rest, got)
            raise reset_error(before + got, before + n, "message", partial) from exc
        except BaseException as exc:
            self._fail_receive("receiving a message", [], before + got, before + n, exc)
            self._raise_if_closed(exc)
            raise
        return first, rest

    @staticmethod
    def _arrived(first: bytes, rest: bytearray | None, got: int) -> bytes:
        """The ``got`` bytes of a body that arrived as ``first`` and then into ``rest``."""
        return first if rest is None else first + bytes(rest[: got - len(first)])

    @staticmethod
    def _eof(before: int, got: int, n: int, partial: bytes) -> ConnectionClosedError:
        return ConnectionClosedError(
            f"peer closed the connection after {before + got} of {before + n} message bytes",
            mid_message=True,
            received=before + got,
            partial=partial,
        )

    def _raise_if_closed(self, exc: BaseException) -> None:
        """A syscall that lost the race with :meth:`aclose` from another task
        fails with EBADF; report it the way trio reports a close under a waiter."""
        if self._closed and isinstance(exc, OSError):
            raise trio.ClosedResourceError("another task closed this stream") from exc

    def _fail_receive(
        self, what: str, fds: list[OwnedFd], done: int, total: int, exc: BaseException
    ) -> None:
        close_all(fds)
        if done:
            self._break(what, done, total, exc)

    # -- closing -----------------------------------------------------------

    async def aclose(self) -> None:
        """Close the socket; idempotent.

        Tasks blocked on the stream get :class:`trio.ClosedResourceError`.
        Always a checkpoint; the socket is closed even if already cancelled.
        """
        if not self._closed:
            self._closed = True
            self.socket.close()
        await trio.lowlevel.checkpoint()


async def open_unix_fd_stream(
    path: str | os.PathLike[str], *, max_fds: int = SCM_MAX_FD
) -> FdStream:
    """Connect to the AF_UNIX stream socket at ``path``.

    Cancellation: the half-made socket is closed and nothing is returned.
    """
    check_max_fds(max_fds)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.connect(os.fspath(path))
        return FdStream(sock, max_fds=max_fds)
    except BaseException:
        sock.close()
        raise


def fd_stream_pair(*, max_fds: int = SCM_MAX_FD) -> tuple[FdStream, FdStream]:
    """Two connected streams over a socketpair (tests, in-process peers)."""
    check_max_fds(max_fds)
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return FdStream(a, max_fds=max_fds), FdStream(b, max_fds=max_fds)
