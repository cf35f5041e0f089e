"""Replay as client: play a recorded client against a live device server.

:func:`replay_client` connects to the server and sends the recorded
client's messages in recorded order, byte for byte: message ids are kept
(the client numbers its own commands, so the recorded ids are valid ones;
replies are matched by id, FIFO for reused ids) and only the fds change —
fresh ones of the recorded kind and size (:mod:`.fdrebuild`).

Causality, not timing, decides when a message goes out: a client message
recorded after some server message is sent only once that server message's
live counterpart has arrived (the reply to the same command, or the n-th
server command for the n-th recorded one). Messages the recorded client
sent without waiting (a DMA_MAP burst, posted writes) go out without
waiting again. ``timing="recorded"`` also keeps the recorded gaps (divided
by ``speed``); either way the bytes sent are the same on every run.

The server's own DMA_READ/DMA_WRITE are answered at the point the recorded
client answered them, from the guest memory the replay rebuilt from its
DMA_MAPs (:mod:`.memory`), in the recorded client's layout. Guest memory
serves a DMA_READ when it knows every byte (written by the live server during
the replay, or restored from recorded fd contents); bytes the recorded
guest's CPU wrote are in no trace, so a DMA_READ of others that is identical
to the recorded one gets the recorded reply. An identical DMA_WRITE is
applied to guest memory and acknowledged with the recorded reply. A server
command with no recorded counterpart is answered from guest memory at once
and reported.

Every live reply and server command is compared with its recorded
counterpart field by field (:mod:`.match`); the result is a
:class:`~vfioproxy.replay.report.ReplayReport`. Waiting is bounded: no live
counterpart within ``timeout`` seconds, or the server closing the
connection, ends the replay with a divergence saying what was awaited.

Memory does not grow with the session: the recorded messages are read from
the trace as they are played (:class:`~vfioproxy.replay.script.Cursor`), and
at most ``window`` sent commands await their reply at once (with that many
waiting, the replay waits for replies before it sends more).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal, NoReturn

import attrs
import trio

from vfioproxy.errors import ConnectionClosedError, TransportError, os_reason
from vfioproxy.interpose import FdFate, session_interposer
from vfioproxy.io.fds import OwnedFd, close_all
from vfioproxy.io.transport import FdStream, open_unix_fd_stream
from vfioproxy.protocol.bodies import DmaAccessBody, DmaMapBody, DmaUnmapBody
from vfioproxy.protocol.codec import Message, decode, encode
from vfioproxy.protocol.header import DEFAULT_MAX_MESSAGE_SIZE, Command, Header
from vfioproxy.protocol.pairing import Outstanding
from vfioproxy.replay.base import Replay
from vfioproxy.replay.fields import flatten, live_fd_facts, recorded_fd_facts, where
from vfioproxy.replay.match import DEFAULT_IGNORES, IgnoreRule, compare
from vfioproxy.replay.memory import ReplayMemory
from vfioproxy.replay.report import (
    DEFAULT_MAX_DIVERGENCES,
    Divergence,
    DivergenceKind,
    ReplayReport,
    StopReplay,
)
from vfioproxy.replay.script import DEFAULT_WINDOW, ReplayError, Script, Step, load_script
from vfioproxy.side import Direction, Side

__all__ = ["ClientReplayOptions", "replay_client", "replay_client_on"]


@attrs.frozen
class ClientReplayOptions:
    """How to replay: which ``session``; ``timing`` ``"asap"`` (causality only)
    or ``"recorded"`` (recorded gaps divided by ``speed``); ``timeout``: seconds
    to wait for each live message; ``ignore``: what may differ; ``window``: how
    many sent commands may await their reply at once (the replay waits for
    replies beyond that, and stops if none comes within ``timeout``);
    ``max_divergences``: how many divergences the report keeps (the rest are
    counted)."""

    session: int | None = None
    timing: Literal["asap", "recorded"] = attrs.field(
        default="asap", validator=attrs.validators.in_(("asap", "recorded")))
    speed: float = attrs.field(default=1.0, validator=attrs.validators.gt(0))
    timeout: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    ignore: tuple[IgnoreRule, ...] = DEFAULT_IGNORES
    window: int = attrs.field(default=DEFAULT_WINDOW, validator=attrs.validators.ge(1))
    max_divergences: int = attrs.field(default=DEFAULT_MAX_DIVERGENCES,
                                       validator=attrs.validators.ge(1))


async def replay_client(
    trace: str | os.PathLike[str] | Script,
    server: str | os.PathLike[str],
    options: ClientReplayOptions = ClientReplayOptions(),
) -> ReplayReport:
    """Replay the recorded client of ``trace`` against the server listening at ``server``.

    Raises :class:`~vfioproxy.replay.script.ReplayError` when the server
    cannot be reached or the trace has nothing to replay (and the
    recorder's ``TraceError`` for a file that is not a readable trace);
    everything the live server does differently is in the report.
    Cancellation closes the connection and releases every fd.
    """
    script = trace if isinstance(trace, Script) else load_script(
        trace, options.session, keep=options.window)
    try:
        stream = await open_unix_fd_stream(server)
    except OSError as exc:
        raise ReplayError(
            f"cannot connect to the server at {os.fspath(server)}: {os_reason(exc)}"
        ) from exc
    return await replay_client_on(script, stream, options, peer=os.fspath(server))


async def replay_client_on(
    script: Script, stream: FdStream, options: ClientReplayOptions, *, peer: str = "stream"
) -> ReplayReport:
    """:func:`replay_client` over a connected stream (closed when done)."""
    return await _ClientReplay(script, stream, options, peer).run()


class _ClientReplay(Replay):
    mode = "client"
    options: ClientReplayOptions

    def __init__(
        self, script: Script, stream: FdStream, options: ClientReplayOptions, peer: str
    ) -> None:
        super().__init__(script, stream, options, peer)
        self.memory = ReplayMemory()
        self.send_lock = trio.Lock()
        #: the recorded messages as the player plays them, the recorded replies live
        #: ones are compared with, the recorded server commands: each a forward reader
        self.player = script.cursor()
        self.replies = script.cursor()
        self.commands = script.cursor()
        #: recorded server messages, in order, that the player still has to see arrive
        self.s2c = script.positions(Direction.S2C)
        self.waiting: int | None = next(self.s2c, None)
        #: those whose live counterpart arrived before the player got to them
        self.arrived: set[int] = set()
        #: set (and replaced) when a live message arrives or the server closes
        self.progress = trio.Event()
        #: sent commands waiting for their reply, by msg_id (FIFO for reused ids):
        #: position, and the recorded command when its recorded reply is to be compared
        self.expect: Outstanding[tuple[int, Message | None]] = Outstanding()
        #: recorded server commands not yet met live, in order
        self.server_commands = script.positions(Direction.S2C, commands=True)
        #: live server commands the replay answers at their recorded reply's place,
        #: with the recorded command
        self.live_commands: dict[int, tuple[Message, Message]] = {}
        #: the recording proxy's interposition modes: the live server's messages
        #: become what the recorded client got before they are compared
        self.interposer = session_interposer(script.interpose)

    # ------------------------------------------------------------- running

    def _release(self) -> None:
        self.memory.close()
        for cursor in (self.player, self.replies, self.commands):
            cursor.close()
        self.script.hold(-sum(request is not None for _, request in self.expect))
        self.script.hold(-len(self.live_commands))

    async def _main(self) -> None:
        origin: tuple[float, int] | None = None
        for position in self.script.positions(Direction.C2S):
            await self._await_server_before(position)
            step = self.player.get(position)
            if self.options.timing == "recorded":
                if origin is None:
                    origin = (trio.current_time(), step.t_ns)
                else:
                    gap = (step.t_ns - origin[1]) / 1e9 / self.options.speed
                    await trio.sleep_until(origin[0] + max(gap, 0.0))
            if step.is_reply:
                await self._answer_recorded(step)
            else:
                await self._send_command(step)
        await self._await_server_before(len(self.script))

    def _has_arrived(self, position: int) -> bool:
        script = self.script
        return position in self.arrived or (  # a reply to nothing: nothing to wait for
            script.is_reply(position) and script.answers(position) is None)

    async def _await_server_before(self, position: int) -> None:
        """Wait until every recorded server message before ``position`` was met live."""
        while self.waiting is not None and self.waiting < position:
            pos = self.waiting
            with trio.move_on_after(self.options.timeout):
                if self._has_arrived(pos) or self.closed is not None:
                    await trio.lowlevel.checkpoint()
                while not self._has_arrived(pos) and self.closed is None:
                    await self.progress.wait()
            if self._has_arrived(pos):
                self.arrived.discard(pos)
                self.waiting = next(self.s2c, None)
                continue
            step = self.script.step(pos)
            if self.closed is not None:
                self._stop("closed", step, f"the server closed the connection ({self.closed}) "
                           f"before sending it")
            self._stop("timeout", step,
                       f"no live counterpart within {self.options.timeout:g} s "
                       "(the server hangs or never sends it)")

    def _stop(self, kind: DivergenceKind, step: Step, detail: str) -> NoReturn:
        self.diverged(Divergence(kind, step.label, step.seq,
                                 where(step.message, self.script.pci), detail=detail))
        self.stopped = f"waiting for message {step.describe()}: {detail}"
        raise StopReplay

    def _progress(self) -> None:
        self.progress.set()
        self.progress = trio.Event()

    # ------------------------------------------------------------- sending

    async def _send(self, data: bytes, fds: Sequence[OwnedFd], step: Step | None) -> None:
        try:
            async with self.send_lock:
                await self.stream.send_message(data, fds)
        except (ConnectionClosedError, TransportError, trio.ClosedResourceError) as exc:
            if step is None:
                return
            self._stop("closed", step, f"the server closed the connection ({exc})")
        finally:
            close_all(fds)
        self.sent += 1

    async def _send_command(self, step: Step) -> None:
        body = step.message.body
        if isinstance(body, DmaMapBody):
            fd = self.fds.original(Direction.C2S, step.fds[0]) if step.fds else None
            self.memory.map(body, fd, known=bool(step.fds) and step.fds[0].contents is not None)
        elif isinstance(body, DmaUnmapBody):
            self.memory.unmap(body)
        if not step.no_reply or step.reply is not None:  # a posted write may get an error
            await self._window(step)
            kept = None if step.reply is None else step.message
            self.expect.add(step.message.msg_id, (step.position, kept))
            if kept is not None:
                self.script.hold()
        await self._send(step.data, self.fds.fresh(Direction.C2S, step.fds), step)
        self.replayed += 1

    async def _window(self, step: Step) -> None:
        """Wait while ``options.window`` sent commands await their reply; stop
        the replay if the server answers none of them within the timeout."""
        window = self.options.window
        if len(self.expect) < window:
            return
        with trio.move_on_after(self.options.timeout):
            while len(self.expect) >= window and self.closed is None:
                await self.progress.wait()
        if len(self.expect) >= window:
            self.stopped = (f"at message {step.describe()}: {len(self.expect)} commands await "
                            f"the server's reply, the window (--window {window}), and none "
                            f"was answered within {self.options.timeout:g} s")
            raise StopReplay

    async def _answer_recorded(self, step: Step) -> None:
        """Send the client's reply to a server command where the recording has it."""
        if step.answers is None:
            self.notes.append(f"{step.describe()} answers no recorded command: not sent")
            return
        live, recorded = self.live_commands.pop(step.answers)
        self.script.hold(-1)
        body = live.body
        identical = (live.header.command, live.header.flags, body) == (
            recorded.header.command, recorded.header.flags, recorded.body)
        if identical and live.command == Command.DMA_WRITE:
            self.memory.apply(live)  # the recorded reply acknowledges the same write
        elif not identical or (isinstance(body, DmaAccessBody)
                               and self.memory.knows(body.address, body.count)):
            await self._answer_from_memory(live, step)
            self.replayed += 1
            return
        await self._send(step.with_id(live.msg_id), self.fds.fresh(Direction.C2S, step.fds),
                         step)
        self.replayed += 1

    async def _answer_from_memory(self, command: Message, step: Step | None = None) -> None:
        reply = self.memory.answer(command, layout=self.script.dialects.client,
                                   max_data_xfer_size=self._server_xfer())
        if reply is not None:
            await self._send(encode(reply)[0], (), step)

    def _server_xfer(self) -> int:
        return self.script.server_caps.effective_max_data_xfer_size()

    # ------------------------------------------------------------- receiving

    async def _read(self) -> None:
        while True:
            try:
                data, fds = await self.stream.receive_message(DEFAULT_MAX_MESSAGE_SIZE)
            except (ConnectionClosedError, TransportError, trio.ClosedResourceError) as exc:
                self.closed = str(exc)
                self._progress()  # wake the player: it sees what did not arrive
                return
            self.received += 1
            try:
                if self.interposer is not None:
                    data, fds = self._interposed(data, fds)
                if Header.parse(data).is_reply:
                    self._on_reply(data, fds)
                else:
                    await self._on_server_command(data, fds)
            finally:
                close_all(fds)

    def _interposed(self, data: bytes, fds: list[OwnedFd]) -> tuple[bytes, list[OwnedFd]]:
        """A live server message as the recording proxy's modes made it (the
        recorded client got that): its bytes, and its fds less those withheld
        (closed now). Fds a mode interposed on stay as they are (no substitute
        here)."""
        assert self.interposer is not None
        done = self.interposer.message(Direction.S2C, data, len(fds))
        if done is None or len(done.fds) != len(fds):
            return data, fds
        kept = []
        for fd, plan in zip(fds, done.fds, strict=True):
            if plan.fate is FdFate.WITHHOLD:
                fd.close()
            else:
                kept.append(fd)
        return done.data, kept

    def _arrive(self, position: int) -> None:
        if self.waiting is not None and position >= self.waiting:
            self.arrived.add(position)
        self._progress()

    def _on_reply(self, data: bytes, fds: list[OwnedFd]) -> None:
        header = Header.parse(data)
        taken = self.expect.take(header.msg_id)
        if taken is None:
            self.diverged(Divergence(
                "unexpected", f"{header.command_name} reply id={header.msg_id}",
                detail="a reply to no command the replay is waiting for"))
            return
        position, request = taken
        reply = self.script.reply(position)
        if request is None or reply is None:
            self._progress()  # a command of the window less
            return  # the recording ends before this reply: nothing to compare with
        self.script.hold(-1)
        live = decode(data, fds, sender=Side.SERVER, dialects=self.script.dialects,
                      request=request)
        # a recorded reply just ahead of the player is read by its cursor (the player
        # then finds it kept); one further on by a cursor of its own
        near = reply < self.player.ahead + self.player.keep // 2
        self._compare(live, fds, (self.player if near else self.replies).get(reply), request)
        self._arrive(reply)

    async def _on_server_command(self, data: bytes, fds: list[OwnedFd]) -> None:
        live = decode(data, fds, sender=Side.SERVER, dialects=self.script.dialects)
        position = next(self.server_commands, None)
        if position is None:
            self.diverged(Divergence(
                "unexpected", f"{live.header.command_name} cmd id={live.msg_id} from the server",
                detail="the recording has no further server command; answered from guest "
                       "memory"))
            await self._answer_from_memory(live)
            return
        step = self.commands.get(position)
        self._compare(live, fds, step, step.message)
        if step.reply is None:
            await self._answer_from_memory(live)  # the recording lacks the client's answer
        else:
            self.live_commands[position] = (live, step.message)
            self.script.hold()
        self._arrive(position)

    def _compare(self, live: Message, fds: list[OwnedFd], recorded: Step, request: Message
                 ) -> None:
        recorded_facts = recorded_fd_facts(recorded.fds)
        diffs = compare(
            flatten(live, live_fd_facts(fds, recorded_facts)),
            flatten(recorded.message, recorded_facts),
            label=recorded.label, message=recorded.message, pci=self.script.pci,
            rules=self.options.ignore,
        )
        self.compared += 1
        self.replayed += 1
        if not diffs:
            self.matched += 1
            return
        self.diverged(Divergence(
            "mismatch", recorded.label, recorded.seq, where(request, self.script.pci),
            tuple(diffs)))
