"""One end of a vfio-user connection, for peers that speak the protocol.

An :class:`Endpoint` owns an :class:`~vfioproxy.io.transport.FdStream`. It
numbers and sends its own commands and routes each incoming reply to the
command waiting for it (by msg_id, FIFO for reused ids); incoming commands
are handed, strictly in arrival order, to a handler whose answer is sent
back. Commands are handled in a separate task from the reader, so a handler
may itself send a command and wait for its reply (a device doing
DMA_READ while it serves a REGION_WRITE) without deadlocking the reader.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from vfioproxy.errors import ConnectionClosedError, TransportError, VfioProxyError
from vfioproxy.io.fds import OwnedFd, close_all
from vfioproxy.protocol.bodies import Body
from vfioproxy.protocol.codec import (
    DEFAULT_DIALECTS,
    Dialects,
    Message,
    build_command,
    decode,
    encode,
)
from vfioproxy.protocol.header import DEFAULT_MAX_MESSAGE_SIZE, Header, command_name
from vfioproxy.protocol.pairing import Outstanding
from vfioproxy.side import Side

log = logging.getLogger(__name__)

#: QEMU's default ``x-msg-timeout``
DEFAULT_REPLY_TIMEOUT = 5.0

CommandHandler = Callable[[Message], Awaitable[Message | None]]


def _kind(header: Header) -> str:
    """``REGION_READ cmd`` / ``REGION_READ reply``: the key of the message counters."""
    return f"{command_name(header.command)} {'reply' if header.is_reply else 'cmd'}"


class ErrorReplyError(VfioProxyError):
    """The peer answered a command with an error reply; ``errno`` says which."""

    def __init__(self, request: Message, reply: Message) -> None:
        self.request = request
        self.reply = reply
        self.errno = reply.header.error
        super().__init__(
            f"{request.header.describe()} failed: peer replied errno {self.errno}"
        )


class ReplyTimeoutError(VfioProxyError):
    """No reply came within the timeout (the command is forgotten, as QEMU does)."""


class MessageIds:
    """The msg_ids of one or more endpoints' commands, 0..0xffff then 0 again.

    An endpoint makes its own; endpoints given one shared instance number
    their commands from one counter, as QEMU does for every device of a
    process (so each connection sees gaps in its ids).
    """

    def __init__(self, first: int = 0) -> None:
        self.next = first & 0xFFFF

    def allocate(self) -> int:
        msg_id = self.next
        self.next = (msg_id + 1) & 0xFFFF
        return msg_id


class PendingReply:
    """A sent command whose reply has not been collected yet."""

    def __init__(self, endpoint: Endpoint, request: Message) -> None:
        self._endpoint = endpoint
        self.request = request
        self._event = trio.Event()
        self._reply: Message | None = None
        self._failure: BaseException | None = None

    def _resolve(self, reply: Message) -> None:
        self._reply = reply
        self._event.set()

    def _fail(self, exc: BaseException) -> None:
        self._failure = exc
        self._event.set()

    async def wait(self, timeout: float | None = None) -> Message:
        """The reply (its fds are the caller's to close).

        Raises :class:`ErrorReplyError` for an error reply,
        :class:`ReplyTimeoutError` after ``timeout`` seconds (default: the
        endpoint's), :class:`ConnectionClosedError` if the peer went away.
        On cancellation the command is forgotten: a late reply is dropped.
        """
        limit = self._endpoint.reply_timeout if timeout is None else timeout
        with trio.move_on_after(math.inf if limit is None else limit) as scope:
            try:
                await self._event.wait()
            except BaseException:
                self._endpoint._forget(self)
                raise
        if scope.cancelled_caught or not self._event.is_set():
            self._endpoint._forget(self)
            raise ReplyTimeoutError(
                f"no reply to {self.request.header.describe()} within {limit} s"
            )
        if self._failure is not None:
            raise self._failure
        assert self._reply is not None
        if self._reply.header.is_error:
            close_all(self._reply.fds)
            raise ErrorReplyError(self.request, self._reply)
        return self._reply


class Endpoint:
    """A vfio-user connection seen from one side (``side``: who we are).

    Its commands are numbered from ``first_id``, or from ``ids`` when several
    endpoints share one :class:`MessageIds`.
    """

    def __init__(
        self,
        stream: Any,
        side: Side,
        *,
        handler: CommandHandler | None = None,
        dialects: Dialects = DEFAULT_DIALECTS,
        reply_timeout: float | None = DEFAULT_REPLY_TIMEOUT,
        first_id: int = 0,
        ids: MessageIds | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self.stream = stream
        self.side = side
        self.handler = handler
        self.dialects = dialects
        self.reply_timeout = reply_timeout
        self.max_message_size = max_message_size
        self.ids = MessageIds(first_id) if ids is None else ids
        self.sent: Counter[str] = Counter()
        self.received: Counter[str] = Counter()
        self.unexpected_replies = 0
        self.closed: BaseException | None = None
        self._waiting: Outstanding[PendingReply] = Outstanding()
        self._send_lock = trio.Lock()
        self._commands_in, self._commands_out = trio.open_memory_channel[Message](math.inf)

    # ------------------------------------------------------------- sending

    @property
    def next_id(self) -> int:
        """The msg_id the next command gets."""
        return self.ids.next

    @next_id.setter
    def next_id(self, value: int) -> None:
        self.ids.next = value & 0xFFFF

    def allocate_id(self) -> int:
        return self.ids.allocate()

    async def send(self, message: Message) -> None:
        """Send ``message`` exactly as it is (fds as SCM_RIGHTS with it)."""
        data, fds = encode(message)
        async with self._send_lock:
            await self.stream.send_message(data, fds)
        self.sent[_kind(message.header)] += 1

    async def send_command(
        self,
        command: int,
        body: Body | None = None,
        *,
        fds: Sequence[Any] = (),
        no_reply: bool = False,
        msg_id: int | None = None,
    ) -> PendingReply | None:
        """Send a command without waiting; returns what to wait on (None if no_reply)."""
        message = build_command(
            command, self.allocate_id() if msg_id is None else msg_id, body, fds=fds,
            no_reply=no_reply,
        )
        pending = None
        if not no_reply:
            pending = PendingReply(self, message)
            if self.closed is not None:  # the peer left before: no reply can come
                pending._fail(self.closed)
            else:
                self._waiting.add(message.msg_id, pending)
        try:
            await self.send(message)
        except BaseException:
            if pending is not None:
                self._forget(pending)
            raise
        return pending

    async def request(
        self,
        command: int,
        body: Body | None = None,
        *,
        fds: Sequence[Any] = (),
        timeout: float | None = None,
    ) -> Message:
        """Send a command and wait for its reply (see :meth:`PendingReply.wait`)."""
        pending = await self.send_command(command, body, fds=fds)
        assert pending is not None
        return await pending.wait(timeout)

    def _forget(self, pending: PendingReply) -> None:
        self._waiting.discard(pending.request.msg_id, pending)

    # ------------------------------------------------------------- receiving

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read and dispatch messages until the peer closes the connection.

        Returns normally when the peer closes (or the stream is closed under
        it, or breaks: :attr:`closed` says why); commands still queued are
        dropped (their fds closed) and waiting commands fail with that error.
        Cancellation stops reading at once.
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._handle_commands)
            task_status.started()
            try:
                while True:
                    data, fds = await self.stream.receive_message(self.max_message_size)
                    self._dispatch(data, fds)
            except (ConnectionClosedError, trio.ClosedResourceError) as exc:
                self.closed = exc  # the peer left, or our side closed the stream
            except TransportError as exc:
                self.closed = exc  # e.g. fds truncated: the stream cannot be framed any more
            finally:
                self._fail_waiting(self.closed or ConnectionClosedError("endpoint stopped"))
                nursery.cancel_scope.cancel()
                self._drain()

    def _dispatch(self, data: bytes, fds: list[OwnedFd]) -> None:
        header = Header.parse(data)
        sender = self.side.other
        if header.is_reply:
            pending = self._waiting.take(header.msg_id)
            if pending is None:
                self.unexpected_replies += 1
                log.warning("unexpected reply %s", header.describe())
                close_all(fds)
                return
            reply = decode(data, fds, sender=sender, dialects=self.dialects,
                           request=pending.request)
            self.received[_kind(header)] += 1
            pending._resolve(reply)
            return
        message = decode(data, fds, sender=sender, dialects=self.dialects)
        self.received[_kind(header)] += 1
        if self.handler is None:
            close_all(fds)
            return
        self._commands_in.send_nowait(message)

    async def _handle_commands(self) -> None:
        handler = self.handler
        if handler is None:
            return
        async for message in self._commands_out:
            reply = await handler(message)
            if reply is not None and not message.header.no_reply:
                try:
                    await self.send(reply)
                except (TransportError, trio.ClosedResourceError):
                    return  # the peer left or the stream broke; the reader ends the endpoint

    def _fail_waiting(self, exc: BaseException) -> None:
        for pending in self._waiting.clear():
            pending._fail(exc)

    def _drain(self) -> None:
        while True:
            try:
                message = self._commands_out.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return
            close_all(message.fds)

    async def aclose(self) -> None:
        await self.stream.aclose()
