"""Moving vfio-user messages on non-blocking sockets, one step at a time.

The proxy's two forwarders (a thread polling a session's sockets, or trio
tasks) share these two pieces and only differ in how they wait:

- :class:`MessageReader` frames what one peer sends exactly as a receiver
  does (protocol.md §1.5, §6 pitfalls 2, 3, 20): the 16-byte header with an
  ancillary buffer for its fds, then exactly the body without one. It never
  blocks: a call returns what is whole and keeps the rest for the next call,
  so a peer that stops half-way through a message holds up nothing else.
  A message larger than the reader's buffer limit is handed on in pieces as
  it arrives (:class:`Piece`), so the memory a peer can make the proxy commit
  is the limit, not whatever its header announces.
- :class:`Outbox` holds what goes to one peer, in order, each item no
  earlier than its release time (fault injection), and sends each message in
  one ``sendmsg`` with its fds on the first byte; what the kernel does not
  take stays queued, and the proxy waits for the socket to become writable.

Neither decides anything: :mod:`vfioproxy.proxy.ledger` does.
"""

from __future__ import annotations

import errno
import os
import socket
from array import array
from collections import deque

from vfioproxy.io.fds import OwnedFd, close_all
from vfioproxy.io.receive import FD_SIZE, RECV_FLAGS, SCM_MAX_FD
from vfioproxy.protocol.header import HEADER_SIZE, framed_body_length
from vfioproxy.protocol.offsets import SIZE, SIZE_ONLY

__all__ = [
    "SCM_MAX_FD",
    "Message",
    "MessageReader",
    "Outbox",
    "Outgoing",
    "PeerClosed",
    "PeerGone",
    "Piece",
    "Taken",
]

#: the most a streamed (over-limit) message is read in at a time
PIECE_SIZE = 256 * 1024

_SIZE = SIZE_ONLY
_SIZE_AT = SIZE.offset
_ANCBUFSIZE = socket.CMSG_LEN(SCM_MAX_FD * FD_SIZE)
_SEND_FLAGS = int(socket.MSG_NOSIGNAL)
_CTRUNC = int(socket.MSG_CTRUNC)
_SOL_SOCKET = socket.SOL_SOCKET
_SCM_RIGHTS = socket.SCM_RIGHTS
#: a send that fails with one of these found the receiver gone
_GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN})


class PeerClosed(Exception):
    """The peer closed (EOF, or a reset: ``reset``) its sending side.

    ``partial`` holds the bytes of a message it had started and not finished
    (empty at a message boundary); ``fds`` the fds that came with them (the
    caller owns them). ``streamed`` is set when the torn message was being
    handed on in pieces: ``partial`` then holds only what was not handed on
    yet, and ``received`` counts every byte of the message that arrived.
    """

    def __init__(
        self,
        partial: bytes = b"",
        fds: list[OwnedFd] | None = None,
        *,
        reset: bool = False,
        streamed: bool = False,
        received: int = 0,
    ) -> None:
        super().__init__("peer reset the connection" if reset else "peer closed the connection")
        self.partial = partial
        self.fds = [] if fds is None else fds
        self.reset = reset
        self.streamed = streamed
        self.received = received or len(partial)


class PeerGone(Exception):
    """A send found the receiver gone (EPIPE, ECONNRESET): it reads no more."""


class Message:
    """One framed message as it arrived (the caller owns ``fds``).

    ``length`` is its length on the wire; when it exceeds ``len(data)`` the
    message is too large to buffer and its remaining bytes follow as
    :class:`Piece` s. ``fds_dropped`` counts fds that arrived with its header
    but could not be kept (more than one ``sendmsg`` can carry: closed), and
    ``fds_truncated`` says the kernel dropped some (``MSG_CTRUNC``).
    ``unframable``: the header's size could not be framed (below 16 or above
    the limit), so the message is the header alone.
    """

    __slots__ = ("data", "fds", "fds_dropped", "fds_truncated", "length", "unframable")

    def __init__(
        self,
        data: bytes,
        fds: list[OwnedFd],
        length: int,
        fds_dropped: int = 0,
        fds_truncated: bool = False,
        unframable: bool = False,
    ) -> None:
        self.data = data
        self.fds = fds
        self.length = length
        self.fds_dropped = fds_dropped
        self.fds_truncated = fds_truncated
        self.unframable = unframable


class Piece:
    """The next bytes of a message too large to buffer; ``last`` ends it."""

    __slots__ = ("data", "last")

    def __init__(self, data: bytes, last: bool) -> None:
        self.data = data
        self.last = last


_NO_FDS: list[OwnedFd] = []  # shared by messages without fds: never appended to


class Taken:
    """What the C lane (:mod:`vfioproxy.proxy.fastpath`) read of a message before
    handing it back: the header's ``recvmsg`` (``chunk``, ``ancdata``,
    ``flags`` as :meth:`socket.socket.recvmsg` gives them; ``error`` its
    errno, 0 when it read) and, when ``body_read``, one ``recv`` of the body:
    ``body`` (``b""``: EOF), or None with ``body_error`` its errno."""

    __slots__ = ("ancdata", "body", "body_error", "body_read", "chunk", "error", "flags")

    def __init__(self, chunk: bytes, ancdata: list[tuple[int, int, bytes]], flags: int,
                 error: int, body: bytes | None, body_error: int) -> None:
        self.chunk = chunk
        self.ancdata = ancdata
        self.flags = flags
        self.error = error
        self.body = body
        self.body_error = body_error
        self.body_read = body is not None or body_error != 0

    def header(self) -> tuple[bytes, list[tuple[int, int, bytes]], int]:
        """The header's ``recvmsg`` as it went (raising its error, as it would:
        ``OSError`` picks the subclass of the errno)."""
        if self.error:
            raise OSError(self.error, os.strerror(self.error))
        return self.chunk, self.ancdata, self.flags

    def received_body(self) -> bytes:
        """The body's ``recv`` as it went (raising its error, as ``recv`` would)."""
        if self.body is not None:
            return self.body
        raise OSError(self.body_error, os.strerror(self.body_error))


class MessageReader:
    """Frames one peer's byte stream into :class:`Message` s, never blocking.

    ``sock`` must be non-blocking. :meth:`read` returns the next whole
    message (or the start of an over-limit one, then its pieces), or None
    when the socket has nothing more right now; EOF and resets raise
    :class:`PeerClosed`. ``max_message_size`` (the negotiated framing limit)
    may change between calls; ``buffer_limit`` caps what one message may
    make the proxy buffer.
    """

    def __init__(self, sock: socket.socket, *, buffer_limit: int) -> None:
        self.sock = sock
        self.buffer_limit = max(buffer_limit, HEADER_SIZE)
        self._header = bytearray()
        self._fds: list[OwnedFd] = []
        self._dropped = 0
        self._truncated = False
        self._body: bytearray | None = None  # the body being read into
        self._got = 0  # bytes of the body read so far
        self._stream_left = 0  # bytes of a streamed message still to come
        self._streamed = 0  # bytes of a streamed message handed on so far
        self._resume = False  # a message is part-way: the next read continues it

    @property
    def idle(self) -> bool:
        """At a message boundary, holding nothing."""
        return not self._resume

    def read(self, max_message_size: int, taken: Taken | None = None) -> Message | Piece | None:
        """The next message or piece, or None when the socket would block.

        ``taken``: what the C lane already read of the next message (its
        header's ``recvmsg``, maybe one ``recv`` of its body), in place of
        those reads."""
        if self._resume:
            return self._read_slowly(max_message_size)
        # the usual case, kept short: a whole header without fds, then its whole body
        try:
            if taken is None:
                chunk, ancdata, flags, _ = self.sock.recvmsg(HEADER_SIZE, _ANCBUFSIZE,
                                                             RECV_FLAGS)
            else:
                chunk, ancdata, flags = taken.header()
        except BlockingIOError:
            return None
        except ConnectionResetError:
            raise self._closed(b"", reset=True) from None
        if ancdata or flags & _CTRUNC or len(chunk) != HEADER_SIZE:
            self._resume = True
            self._took(chunk, ancdata, flags)
            return self._read_slowly(max_message_size)
        size = _SIZE.unpack_from(chunk, _SIZE_AT)[0]
        body_len = framed_body_length(size, max_message_size)
        if not body_len:
            return Message(chunk, _NO_FDS, HEADER_SIZE, unframable=size != HEADER_SIZE)
        if HEADER_SIZE + body_len <= self.buffer_limit:
            try:
                if taken is None or not taken.body_read:
                    body = self.sock.recv(body_len)
                else:
                    body = taken.received_body()
            except BlockingIOError:
                body = None
            except ConnectionResetError:
                self._header += chunk
                raise self._closed(b"", reset=True) from None
            if body is not None and len(body) == body_len:
                return Message(chunk + body, _NO_FDS, HEADER_SIZE + body_len)
        else:
            body = None
        self._resume = True  # the body comes in pieces (or is too large): the slow way
        self._header += chunk
        if body:
            self._body = bytearray(body_len)
            self._body[: len(body)] = body
            self._got = len(body)
        elif body is not None:  # b"": EOF right after the header
            raise self._closed(b"")
        return self._read_slowly(max_message_size)

    def _read_slowly(self, max_message_size: int) -> Message | Piece | None:
        """Go on with a message that did not come whole in one go."""
        if self._stream_left:
            return self._read_piece()
        if self._body is None:
            if not self._read_header():
                return None
            header = self._header
            size = _SIZE.unpack_from(header, _SIZE_AT)[0]
            body_len = framed_body_length(size, max_message_size)
            if not body_len:
                return self._finish(bytes(header), HEADER_SIZE, unframable=size != HEADER_SIZE)
            total = HEADER_SIZE + body_len
            if total > self.buffer_limit:
                message = self._finish(bytes(header), total)
                self._resume = True
                self._stream_left = body_len
                self._streamed = HEADER_SIZE
                return message
            self._body = bytearray(body_len)
            self._got = 0
        body = self._body
        view = memoryview(body)
        try:
            while self._got < len(body):
                try:
                    n = self.sock.recv_into(view[self._got :])
                except BlockingIOError:
                    return None
                except ConnectionResetError:
                    raise self._closed(bytes(body[: self._got]), reset=True) from None
                if not n:
                    raise self._closed(bytes(body[: self._got]))
                self._got += n
        finally:
            view.release()
        data = bytes(self._header) + body
        self._body = None
        return self._finish(data, len(data))

    def _read_header(self) -> bool:
        """Read (the rest of) a header with its fds; True once it is whole."""
        header = self._header
        while len(header) < HEADER_SIZE:
            try:
                chunk, ancdata, flags, _ = self.sock.recvmsg(
                    HEADER_SIZE - len(header), _ANCBUFSIZE, RECV_FLAGS
                )
            except BlockingIOError:
                return False
            except ConnectionResetError:
                raise self._closed(b"", reset=True) from None
            self._took(chunk, ancdata, flags)
        return True

    def _took(self, chunk: bytes, ancdata: list[tuple[int, int, bytes]], flags: int) -> None:
        """Keep what one read of a header brought: bytes, fds, the kernel's
        truncation flag; an empty read is EOF (raised)."""
        if ancdata:
            self._take_fds(ancdata)
        if flags & _CTRUNC:
            self._truncated = True
        if not chunk:
            if self._fds and not self._header:  # fds with no byte: nothing to frame them
                self._close_fds()
            raise self._closed(b"")
        self._header += chunk

    def _take_fds(self, ancdata: list[tuple[int, int, bytes]]) -> None:
        for level, kind, data in ancdata:
            if level != _SOL_SOCKET or kind != _SCM_RIGHTS:
                continue
            numbers = array("i")
            numbers.frombytes(data[: len(data) - len(data) % FD_SIZE])
            for number in numbers:
                fd = OwnedFd(number)
                if len(self._fds) < SCM_MAX_FD:
                    self._fds.append(fd)
                else:  # no sendmsg could pass it on
                    fd.close()
                    self._dropped += 1

    def _read_piece(self) -> Piece | None:
        try:
            data = self.sock.recv(min(self._stream_left, PIECE_SIZE))
        except BlockingIOError:
            return None
        except ConnectionResetError:
            raise self._closed_streaming(reset=True) from None
        if not data:
            raise self._closed_streaming(reset=False)
        self._stream_left -= len(data)
        self._streamed += len(data)
        if not self._stream_left:
            self._resume = False
        return Piece(data, last=not self._stream_left)

    def _finish(self, data: bytes, length: int, *, unframable: bool = False) -> Message:
        message = Message(data, self._fds, length, self._dropped, self._truncated, unframable)
        self._resume = False
        self._header = bytearray()
        self._fds = []
        self._dropped = 0
        self._truncated = False
        return message

    def _closed(self, body: bytes, *, reset: bool = False) -> PeerClosed:
        partial = bytes(self._header) + body if self._header else b""
        fds, self._fds = self._fds, []
        self._header = bytearray()
        self._body = None
        self._resume = False
        return PeerClosed(partial, fds, reset=reset)

    def _closed_streaming(self, *, reset: bool) -> PeerClosed:
        received = self._streamed
        self._stream_left = 0
        self._resume = False
        return PeerClosed(b"", reset=reset, streamed=True, received=received)

    def _close_fds(self) -> None:
        close_all(self._fds)
        self._fds = []

    def close(self) -> None:
        """Close the fds of a message that will never be finished."""
        self._close_fds()
        self._body = None


class Outgoing:
    """One message (or piece of one) queued for a peer.

    ``fds`` go with its first byte (the proxy's copies then move to the
    outbox's :attr:`Outbox.sent_fds`). ``release_at`` is the earliest time
    it may go (None: at once), on the forwarder's clock. ``seq`` names its
    trace record (0: not recorded, or not yet), ``sent`` counts the bytes the
    kernel took, ``length`` is the whole message's length on the wire.
    ``message_start`` is false for the pieces after the first of a streamed
    message; ``forwarded`` false for a reply the proxy made up (fault
    injection); ``close_after`` ends the session once it is sent;
    ``dropped`` is set when it was taken out unsent (its receiver is gone).
    """

    __slots__ = ("close_after", "data", "dropped", "fds", "forwarded", "length",
                 "message_start", "release_at", "sent", "seq")

    def __init__(
        self,
        data: bytes,
        fds: list[OwnedFd],
        release_at: float | None = None,
        *,
        length: int = 0,
        message_start: bool = True,
        forwarded: bool = True,
        close_after: str | None = None,
    ) -> None:
        self.data = data
        self.fds = fds
        self.release_at = release_at
        self.length = length or len(data)
        self.message_start = message_start
        self.forwarded = forwarded
        self.close_after = close_after
        self.seq = 0
        self.sent = 0
        self.dropped = False


class Outbox:
    """What goes to one peer, in order (see the module docstring)."""

    def __init__(self, sock: socket.socket, *, limit_bytes: int) -> None:
        self.sock = sock
        self.items: deque[Outgoing] = deque()
        self.bytes = 0  # bytes queued and not yet sent
        self.fds = 0  # fds queued and not yet sent
        self.limit_bytes = limit_bytes
        self.blocked = False  # the kernel took less than offered: wait for POLLOUT
        #: fds the kernel has taken with a send, for the owner to inspect and close
        self.sent_fds: list[OwnedFd] = []

    @property
    def full(self) -> bool:
        """Over its limit: stop reading what would go into it."""
        return self.bytes >= self.limit_bytes or self.fds >= SCM_MAX_FD

    def __bool__(self) -> bool:
        return bool(self.items)

    def next_release(self) -> float | None:
        """The release time of the first item (None: nothing queued, or due at once)."""
        return self.items[0].release_at if self.items else None

    def offer(self, data: bytes, fds: list[OwnedFd]) -> int:
        """Send a message at once if nothing waits before it: the bytes the
        kernel took (0: it would block), or -1 when something waits (then
        :meth:`append` it). Sent fds go to :attr:`sent_fds`; raises
        :class:`PeerGone` when the receiver left."""
        if self.items or self.blocked:
            return -1
        n = self._transmit(data, fds, 0)
        if n < len(data):
            self.blocked = True
        return n

    def offered(self, data: bytes, sent: int, error: int) -> int:
        """:meth:`offer` of a message the C lane already sent ``sent`` bytes of
        (``error``: the send's errno, 0 when it took some or all)."""
        if error in _GONE:
            raise PeerGone(os.strerror(error))
        if error and error != errno.EAGAIN:
            raise OSError(error, os.strerror(error))
        if sent < len(data):
            self.blocked = True
        return sent

    def append(self, item: Outgoing) -> None:
        """Queue ``item`` (after what waits; ``item.sent`` bytes of it went already)."""
        self.items.append(item)
        self.bytes += len(item.data) - item.sent
        self.fds += len(item.fds)

    def send(self, now: float | None) -> list[Outgoing]:
        """Send what is due at ``now`` (None: ignore release times) until the
        queue is empty, the first item is not due, or the kernel takes no more
        (``blocked``). Returns the items sent whole, in order; raises
        :class:`PeerGone` when the receiver left (the item it failed on stays
        first, with ``sent`` saying how much of it the receiver got)."""
        done: list[Outgoing] = []
        items = self.items
        self.blocked = False
        while items:
            item = items[0]
            if now is not None and item.release_at is not None and item.release_at > now:
                break
            fds = item.fds
            n = self._transmit(item.data, fds, item.sent)
            if fds and n:
                self.fds -= len(fds)
                item.fds = []
            item.sent += n
            self.bytes -= n
            if item.sent < len(item.data):
                self.blocked = True
                break
            items.popleft()
            done.append(item)
        return done

    def _transmit(self, data: bytes, fds: list[OwnedFd], sent: int) -> int:
        """One ``sendmsg`` of ``data[sent:]`` with ``fds`` (given only while
        nothing of the message went yet): the bytes the kernel took, 0 when it
        would block. Fds the kernel took go to :attr:`sent_fds`."""
        try:
            if fds:
                numbers = array("i", [fd.fileno() for fd in fds])
                n: int = self.sock.sendmsg(
                    [data], [(_SOL_SOCKET, _SCM_RIGHTS, numbers)], _SEND_FLAGS)
                self.sent_fds.extend(fds)
                return n
            if sent:
                return self.sock.send(memoryview(data)[sent:], _SEND_FLAGS)
            return self.sock.send(data, _SEND_FLAGS)
        except BlockingIOError:
            return 0
        except OSError as exc:
            if exc.errno in _GONE:
                raise PeerGone(exc.strerror or str(exc)) from exc
            raise

    def close_sent(self) -> None:
        """Close the proxy's copies of the fds sent so far."""
        close_all(self.sent_fds)
        self.sent_fds.clear()

    def drop_all(self) -> list[Outgoing]:
        """Take every queued item out (their fds closed, ``dropped`` set); returns them."""
        dropped = list(self.items)
        self.items.clear()
        for item in dropped:
            item.dropped = True
            close_all(item.fds)
            item.fds = []
        self.bytes = 0
        self.fds = 0
        self.blocked = False
        self.close_sent()
        return dropped

