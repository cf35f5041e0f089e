"""Replay as server: play a recorded device server towards a live client.

:func:`serve_replay` listens on a UNIX socket and, for the first client that
connects, answers each live request with the recorded reply of the recorded
request it matches. Matching is in order: the earliest recorded request not
yet used, among the first ``window`` of them (decoded in memory; the rest of
the session is read from the trace as the window moves), whose fields agree
with the live one on what the :class:`~vfioproxy.replay.match.Matcher` looks
at (by default the command, the header flags, every body field and the fds'
kinds and sizes; the command number must always agree), ignore rules applied. So repeated
identical requests (QEMU reads the interrupt pin twice, the ROM BAR before
and after sizing) get their recorded replies in recorded order. The reply is
the recorded bytes with the live request's msg_id, and fresh fds of the
recorded kinds and sizes (a memfd or file for a sparse-mmap region).

Server-initiated commands (DMA_READ/DMA_WRITE) are sent at the same points
of the exchange as recorded: those recorded between a request and its reply
before that reply, those recorded right after a reply right after it; each
waits for the live client's reply, which is compared with the recorded one.
The recorded server's ids are kept for them.

A live request that matches nothing is reported with the nearest recorded
requests and their field-level differences, then, per ``on_mismatch``:
``error`` answers it with EINVAL (nothing for a no_reply request), ``close``
closes the connection, ``passthrough`` forwards it to a live server (which
first gets the client's VERSION; its own DMA commands go to the client) and
relays the reply. When the client closes, recorded requests it never sent
are reported as missing. Waiting is bounded by ``timeout`` while recorded
requests remain: a client that goes quiet ends the replay, reported as such.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, NoReturn

import attrs
import trio

from vfioproxy.errors import ConnectionClosedError, TransportError
from vfioproxy.interpose.irqs import InterposeIrqs
from vfioproxy.io.fds import OwnedFd, close_all
from vfioproxy.io.transport import FdStream, open_unix_fd_stream
from vfioproxy.io.unix import open_unix_listener
from vfioproxy.protocol.codec import Message, build_error_reply, decode, encode
from vfioproxy.protocol.header import DEFAULT_MAX_MESSAGE_SIZE, Command, Header
from vfioproxy.replay.base import Replay
from vfioproxy.replay.fields import flatten, live_fd_facts, recorded_fd_facts, where
from vfioproxy.replay.match import DEFAULT_IGNORES, IgnoreRule, Matcher, compare
from vfioproxy.replay.report import (
    DEFAULT_MAX_DIVERGENCES,
    Divergence,
    FieldDiff,
    Nearest,
    ReplayReport,
    StopReplay,
)
from vfioproxy.replay.script import DEFAULT_WINDOW, ReplayError, Script, Step, load_script
from vfioproxy.side import Direction, Side

__all__ = ["ServerReplayOptions", "replay_server_on", "serve_replay"]

#: nearest recorded requests shown for an unmatched live one
NEAREST = 3

OnMismatch = Literal["error", "close", "passthrough"]


def _check_passthrough(instance: ServerReplayOptions, _: Any, value: str | None) -> None:
    if instance.on_mismatch == "passthrough" and not value:
        raise ValueError("on_mismatch='passthrough' needs a passthrough server socket")


@attrs.frozen
class ServerReplayOptions:
    """How to serve a replay: which ``session``; ``match_on`` (what makes a live
    request match a recorded one); ``ignore`` (what may differ); ``on_mismatch``
    and the ``passthrough`` server's socket; ``timeout``: seconds to wait for
    the client while recorded requests remain, and for each of its replies;
    ``window``: how many unused recorded requests, the first ones, a live
    request is matched against; ``max_divergences``: how many divergences the
    report keeps (the rest are counted)."""

    session: int | None = None
    match_on: Matcher = attrs.field(factory=Matcher)
    ignore: tuple[IgnoreRule, ...] = DEFAULT_IGNORES
    on_mismatch: OnMismatch = attrs.field(
        default="error", validator=attrs.validators.in_(("error", "close", "passthrough")))
    passthrough: str | None = attrs.field(default=None, validator=_check_passthrough)
    timeout: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    window: int = attrs.field(default=DEFAULT_WINDOW, validator=attrs.validators.ge(1))
    max_divergences: int = attrs.field(default=DEFAULT_MAX_DIVERGENCES,
                                       validator=attrs.validators.ge(1))


async def serve_replay(
    trace: str | os.PathLike[str] | Script,
    listen: str | os.PathLike[str],
    options: ServerReplayOptions = ServerReplayOptions(),
    *,
    stream_factory: Callable[[trio.socket.SocketType], FdStream] = FdStream,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> ReplayReport:
    """Listen on ``listen``, replay the recorded server towards the first client, return the report.

    ``task_status.started()`` once the socket listens; the socket is removed
    when the client is accepted. ``stream_factory`` wraps the accepted
    socket (a subclass of FdStream can act beside the replay, e.g. raise the
    interrupts a real server signals through eventfds, which a trace holds
    only when recorded with ``--interpose-irqs``: then the replay raises them
    itself, on the eventfds the live client gives in DEVICE_SET_IRQS, each
    after the message recorded just before it). Raises
    :class:`~vfioproxy.replay.script.ReplayError` (or a ``TraceError``) when
    the trace has nothing to replay. Cancellation closes everything.
    """
    script = trace if isinstance(trace, Script) else load_script(
        trace, options.session, keep=options.window)
    path = os.fspath(listen)
    listener = await open_unix_listener(path)
    try:
        task_status.started()
        accepted = await listener.accept()
    finally:
        with trio.CancelScope(shield=True):
            await listener.aclose()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return await replay_server_on(script, stream_factory(accepted.socket), options, peer=path)


async def replay_server_on(
    script: Script, stream: FdStream, options: ServerReplayOptions, *, peer: str = "stream"
) -> ReplayReport:
    """:func:`serve_replay` over a connected client stream (closed when done)."""
    return await _ServerReplay(script, stream, options, peer).run()


Live = tuple[bytes, list[OwnedFd]]


class _ServerReplay(Replay):
    mode = "server"
    options: ServerReplayOptions

    def __init__(
        self, script: Script, stream: FdStream, options: ServerReplayOptions, peer: str
    ) -> None:
        super().__init__(script, stream, options, peer)
        #: recorded requests not yet taken into the window, in order
        self.requests = script.positions(Direction.C2S, commands=True)
        #: the window: the first ``options.window`` recorded requests not matched
        #: yet, in order, with their flattened fields once compared
        self.unused: dict[int, Step] = {}
        self.flat: dict[int, dict[str, Any]] = {}
        self.windowed = -1  # the last position taken into the window
        self.more = True  # whether requests remain outside the window
        self.reader = script.cursor()  # fills the window
        self.outbound = script.cursor()  # the recorded replies and server commands sent
        #: server commands sent, by position (a byte each)
        self.sent_steps = bytearray(len(script))
        self.inbox_in, self.inbox = trio.open_memory_channel[Live](math.inf)
        self.deferred: deque[Live] = deque()
        self.client_version: bytes | None = None
        self.passthrough: FdStream | None = None
        #: with recorded interrupts: the client's SET_IRQS eventfds, by (index,
        #: vector), followed as the proxy's interpose-irqs mode follows them
        self.irq_mode = InterposeIrqs() if script.irqs else None
        self.irq_fds: dict[tuple[int, int], OwnedFd] = {}
        self.irqs_raised = 0  # the next recorded interrupt (index into script.irqs)

    # ------------------------------------------------------------- running

    def _release(self) -> None:
        for data_fds in [*self.deferred, *self._drain_inbox()]:
            close_all(data_fds[1])
        close_all(list(self.irq_fds.values()))
        self.irq_fds.clear()
        self.reader.close()
        self.outbound.close()
        self.script.hold(-len(self.unused))
        self.unused.clear()
        self.flat.clear()

    async def _aclose(self) -> None:
        if self.passthrough is not None:
            await self.passthrough.aclose()

    def _drain_inbox(self) -> list[Live]:
        items = []
        while True:
            try:
                items.append(self.inbox.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                return items

    async def _read(self) -> None:
        async with self.inbox_in:
            while True:
                try:
                    item = await self.stream.receive_message(DEFAULT_MAX_MESSAGE_SIZE)
                except (ConnectionClosedError, TransportError, trio.ClosedResourceError) as exc:
                    self.closed = str(exc)
                    return
                self.received += 1
                self.inbox_in.send_nowait(item)

    async def _main(self) -> None:
        await self._server_commands_after(-1)
        while True:
            item = await self._next()
            if item is None:
                break
            data, fds = item
            if Header.parse(data).is_reply:
                self._unexpected_reply(data)
                close_all(fds)
                continue
            await self._request(data, fds)
        self._report_missing()

    async def _next(self) -> Live | None:
        """The next live message, None once the client closed."""
        if self.deferred:
            return self.deferred.popleft()
        waiting = self._next_request()
        limit = self.options.timeout if waiting is not None else math.inf
        with trio.move_on_after(limit):
            try:
                return await self.inbox.receive()
            except trio.EndOfChannel:
                return None
        assert waiting is not None
        self._stop("timeout", waiting,
                   f"the client sent nothing for {self.options.timeout:g} s; "
                   "the recording continues with this request")

    def _fill(self) -> None:
        """Take recorded requests into the window until it holds ``options.window``."""
        while len(self.unused) < self.options.window and self.more:
            position = next(self.requests, None)
            if position is None:
                self.more = False
                break
            self.unused[position] = self.reader.get(position)
            self.windowed = position
            self.script.hold()

    def _unused(self) -> list[int]:
        """Positions of the recorded requests in the window, in order (see
        :class:`ServerReplayOptions`)."""
        self._fill()
        return list(self.unused)

    def _next_request(self) -> Step | None:
        self._fill()
        return next(iter(self.unused.values()), None)

    def _use(self, position: int) -> None:
        del self.unused[position]
        self.flat.pop(position, None)
        self.script.hold(-1)

    def _stop(self, kind: Literal["timeout", "closed"], step: Step, detail: str) -> NoReturn:
        self.diverged(Divergence(kind, step.label, step.seq,
                                 where(step.message, self.script.pci), detail=detail))
        self.stopped = f"at message {step.describe()}: {detail}"
        raise StopReplay

    def _missing(self) -> Iterator[int]:
        """Recorded requests never matched and server commands never sent, in order."""
        script = self.script
        for position in range(len(script)):
            if not script.is_command(position):
                continue
            if script.direction(position) is Direction.C2S:
                if position in self.unused or position > self.windowed:
                    yield position
            elif not self.sent_steps[position]:
                yield position

    def _report_missing(self) -> None:
        self._fill()
        count = 0
        first: str | None = None
        cursor = self.script.cursor(keep=1)
        for position in self._missing():
            count += 1
            if first is None:
                first = self.script.describe(position)
            if len(self.divergences) >= self.options.max_divergences:
                self.dropped += 1
                continue
            step = self.unused.get(position) or cursor.get(position)
            detail = ("the client never sent it" if step.direction is Direction.C2S
                      else "the replay never got to send it")
            self.diverged(Divergence("missing", step.label, step.seq,
                                     where(step.message, self.script.pci), detail=detail))
        cursor.close()
        if count:
            self.stopped = (f"the client closed the connection with {count} recorded "
                            f"message(s) still to come, the first {first}")

    # ------------------------------------------------------------- requests

    def _recorded_flat(self, step: Step) -> dict[str, Any]:
        flat = self.flat.get(step.position)
        if flat is None:
            flat = flatten(step.message, recorded_fd_facts(step.fds))
            if step.position in self.unused:
                self.flat[step.position] = flat
        return flat

    def _diffs(self, live: dict[str, Any], step: Step, *, matching: bool) -> list[FieldDiff]:
        return compare(live, self._recorded_flat(step), label=step.label,
                       message=step.message, pci=self.script.pci, rules=self.options.ignore,
                       only=self.options.match_on.selects if matching else None)

    async def _request(self, data: bytes, fds: list[OwnedFd]) -> None:
        live = decode(data, fds, sender=Side.CLIENT, dialects=self.script.dialects)
        if live.command == Command.VERSION:
            self.client_version = data
        flat = flatten(live, live_fd_facts(fds))
        self._fill()
        match = next(
            (step for step in self.unused.values()
             if step.message.command == live.command
             and not self._diffs(flat, step, matching=True)),
            None,
        )
        if match is None:
            await self._unmatched(live, flat, data, fds)
            return
        self._keep_irq_fds(data, fds)
        close_all(fds)
        self._use(match.position)
        self._raise_irqs(match.position)
        self.compared += 1
        self.replayed += 1
        diffs = self._diffs(flat, match, matching=False)
        if diffs:
            self.diverged(Divergence("mismatch", match.label, match.seq,
                                     where(match.message, self.script.pci), tuple(diffs)))
        else:
            self.matched += 1
        end = match.reply if match.reply is not None else match.position
        await self._server_commands_between(match.position, end)
        if match.reply is None:
            if not live.header.no_reply:
                self.stopped = (f"the recording ends before the reply to {match.describe()}: "
                                "the replay stops there")
                raise StopReplay
        else:  # a no_reply command's recorded reply is an error reply: sent too
            reply = self.outbound.get(match.reply)
            await self._send(reply.with_id(live.msg_id),
                             self.fds.fresh(Direction.S2C, reply.fds))
            self.replayed += 1
            self._raise_irqs(match.reply)
        await self._server_commands_after(end)

    def _keep_irq_fds(self, data: bytes, fds: list[OwnedFd]) -> None:
        """Keep the eventfds of a SET_IRQS (taken out of ``fds``) when the
        recording has interrupts to raise; close those it re-points or disables."""
        if self.irq_mode is None:
            return
        done = self.irq_mode.message(Direction.C2S, data, len(fds))
        if done is None:
            return
        # a released vector's fd, or the one a vector is re-pointed from, is closed
        re_pointed = [(plan.irq, fd) for fd, plan in zip(fds, done.fds, strict=True)
                      if plan.irq is not None]
        for irq in (*done.release, *(irq for irq, _ in re_pointed)):
            old = self.irq_fds.pop(irq, None)
            if old is not None:
                old.close()
        self.irq_fds.update(re_pointed)
        kept = [fd for _, fd in re_pointed]
        fds[:] = [fd for fd in fds if fd not in kept]

    def _raise_irqs(self, position: int) -> None:
        """Signal the recorded interrupts placed up to ``position`` (those the
        client got live: a dropped one is not raised), on the eventfds the
        live client gave for their vectors, in recorded order."""
        marks = self.script.irqs
        while self.irqs_raised < len(marks) and marks[self.irqs_raised].after <= position:
            mark = marks[self.irqs_raised]
            self.irqs_raised += 1
            fd = self.irq_fds.get((mark.index, mark.vector))
            if fd is None or mark.fate == "dropped":
                continue
            with contextlib.suppress(BlockingIOError, OSError):
                os.eventfd_write(fd.fileno(), mark.count)

    async def _unmatched(
        self, live: Message, flat: dict[str, Any], data: bytes, fds: list[OwnedFd]
    ) -> None:
        detail = "no recorded request matches it"
        first = self._next_request()
        if first is None:
            detail = (f"the recording has no more requests (it ends at "
                      f"{self.script.describe(len(self.script) - 1)})")
        elif self.more:
            detail += (f" among the first {len(self.unused)} unused recorded requests, "
                       f"from {first.describe()} (the window, --window "
                       f"{self.options.window}; more follow)")
        self.diverged(Divergence(
            "unmatched", f"live {live.header.describe()}", None, where(live, self.script.pci),
            detail=detail, nearest=self._nearest(live, flat)))
        mode = self.options.on_mismatch
        if mode == "passthrough":
            await self._pass_through(live, data, fds)
            return
        close_all(fds)
        if mode == "close":
            self.stopped = (f"closed the connection at the unmatched {live.header.describe()} "
                            "(on_mismatch close)")
            raise StopReplay
        if not live.header.no_reply:
            await self._send(encode(build_error_reply(live, errno.EINVAL))[0], [])

    def _nearest(self, live: Message, flat: dict[str, Any]) -> tuple[Nearest, ...]:
        unused = self._unused()
        steps = self.unused
        same = [p for p in unused if steps[p].message.command == live.command]
        ranked = sorted(
            ((len(diffs), i, p, diffs)
             for i, p in enumerate(same)
             for diffs in [self._diffs(flat, steps[p], matching=False)]),
            key=lambda item: (item[0], item[1]),
        )
        if ranked:
            picks = [(p, diffs) for _, _, p, diffs in ranked[:NEAREST]]
        else:
            picks = [(p, self._diffs(flat, steps[p], matching=False))
                     for p in unused[:NEAREST]]
        return tuple(Nearest(steps[p].seq, steps[p].label, tuple(diffs))
                     for p, diffs in picks)

    # ------------------------------------------------------------- server commands

    def _is_server_command(self, position: int) -> bool:
        return (self.script.direction(position) is Direction.S2C
                and self.script.is_command(position))

    async def _server_commands_between(self, start: int, end: int) -> None:
        for position in range(start + 1, end):
            if self._is_server_command(position):
                await self._server_command(position)

    async def _server_commands_after(self, position: int) -> None:
        """Send the server commands recorded right after ``position`` (before the
        client's next request), each with its awaited reply."""
        script = self.script
        for later in range(position + 1, len(script)):
            if self._is_server_command(later):
                await self._server_command(later)
            elif not (script.direction(later) is Direction.C2S and script.is_reply(later)):
                return

    async def _server_command(self, position: int) -> None:
        if self.sent_steps[position]:
            return
        self.sent_steps[position] = 1
        self._raise_irqs(position - 1)
        step = self.outbound.get(position)
        await self._send(step.data, self.fds.fresh(Direction.S2C, step.fds))
        self.replayed += 1
        if step.no_reply:
            return
        data, fds = await self._await_reply(step.message.msg_id, step)
        try:
            if step.reply is None:
                return
            recorded = self.outbound.get(step.reply)
            live = decode(data, fds, sender=Side.CLIENT, dialects=self.script.dialects,
                          request=step.message)
            diffs = self._diffs(flatten(live, live_fd_facts(fds)), recorded, matching=False)
            self.compared += 1
            self.replayed += 1
            if diffs:
                self.diverged(Divergence(
                    "mismatch", recorded.label, recorded.seq,
                    where(step.message, self.script.pci), tuple(diffs)))
            else:
                self.matched += 1
        finally:
            close_all(fds)

    async def _client_reply(self, msg_id: int, *, other_replies_unexpected: bool) -> Live | None:
        """The client's reply to ``msg_id`` (None: none before the timeout or
        the client's EOF). Its requests meanwhile wait in ``deferred``; replies
        to other ids wait there too, or are divergences and dropped."""
        with trio.move_on_after(self.options.timeout):
            while True:
                try:
                    data, fds = await self.inbox.receive()
                except trio.EndOfChannel:
                    return None
                header = Header.parse(data)
                if header.is_reply and header.msg_id == msg_id:
                    return data, fds
                if header.is_reply and other_replies_unexpected:
                    self._unexpected_reply(data)
                    close_all(fds)
                else:
                    self.deferred.append((data, fds))
        return None

    async def _await_reply(self, msg_id: int, step: Step) -> Live:
        """The client's reply to our command ``msg_id``; its requests meanwhile wait."""
        reply = await self._client_reply(msg_id, other_replies_unexpected=True)
        if reply is not None:
            return reply
        if self.closed is not None:
            self._stop("closed", step, f"the client closed the connection ({self.closed}) "
                       "before replying")
        self._stop("timeout", step, f"no reply within {self.options.timeout:g} s")

    def _unexpected_reply(self, data: bytes) -> None:
        header = Header.parse(data)
        self.diverged(Divergence(
            "unexpected", f"live {header.describe()}",
            detail="a reply to no command the replay sent"))

    # ------------------------------------------------------------- passthrough

    async def _pass_through(self, live: Message, data: bytes, fds: list[OwnedFd]) -> None:
        """Forward an unmatched request to the live server and relay its answer."""
        try:
            server = await self._passthrough_server(live)
            await server.send_message(data, fds)
            close_all(fds)
            if live.header.no_reply:
                return
            reply, reply_fds = await self._passthrough_reply(server, live.msg_id)
        except (OSError, TransportError, ReplayError, trio.TooSlowError) as exc:
            self.notes.append(f"passthrough of {live.header.describe()} failed "
                              f"({exc or 'timeout'}); answered EINVAL instead")
            if not live.header.no_reply:
                await self._send(encode(build_error_reply(live, errno.EINVAL))[0], [])
            return
        finally:
            close_all(fds)
        await self._send(reply, reply_fds)

    async def _passthrough_server(self, live: Message) -> FdStream:
        if self.passthrough is not None:
            return self.passthrough
        assert self.options.passthrough is not None
        server = self.passthrough = await open_unix_fd_stream(self.options.passthrough)
        if self.client_version is not None and live.command != Command.VERSION:
            await server.send_message(self.client_version)
            _, fds = await self._passthrough_reply(server, Header.parse(self.client_version).msg_id)
            close_all(fds)
        return server

    async def _passthrough_reply(self, server: FdStream, msg_id: int) -> Live:
        """The passthrough server's reply to ``msg_id``; its DMA commands go to the client."""
        with trio.fail_after(self.options.timeout):
            while True:
                data, fds = await server.receive_message(DEFAULT_MAX_MESSAGE_SIZE)
                header = Header.parse(data)
                if header.is_reply and header.msg_id == msg_id:
                    return data, fds
                if header.is_reply:
                    close_all(fds)
                    continue
                await self._send(data, fds)
                if not header.no_reply:
                    reply, reply_fds = await self._relay_reply(header)
                    await server.send_message(reply, reply_fds)
                    close_all(reply_fds)

    async def _relay_reply(self, header: Header) -> Live:
        """The client's reply to a command of the passthrough server's."""
        reply = await self._client_reply(header.msg_id, other_replies_unexpected=False)
        if reply is not None:
            return reply
        raise ReplayError(f"the client did not answer the passthrough server's "
                          f"{header.describe()}")

    # ------------------------------------------------------------- sending

    async def _send(self, data: bytes, fds: Sequence[OwnedFd]) -> None:
        try:
            await self.stream.send_message(data, fds)
        except (ConnectionClosedError, TransportError, trio.ClosedResourceError) as exc:
            self.stopped = f"the client closed the connection ({exc})"
            raise StopReplay from exc
        finally:
            close_all(fds)
        self.sent += 1


