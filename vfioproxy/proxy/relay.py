"""The forwarding steps of one session, shared by both ways of waiting.

A :class:`Relay` owns a session's two connected sockets (non-blocking) and
moves messages between them: :meth:`Relay.readable` reads one message from
a peer, asks the :class:`~vfioproxy.proxy.ledger.SessionLedger` what
becomes of it, queues it for the other peer and sends what the kernel
takes at once, then records it (after the send, so the peer is not kept
waiting; before the next message, so a SIGKILL loses at most the record
being written). :meth:`Relay.writable` and :meth:`Relay.release` send what
waited. The forwarders (:mod:`vfioproxy.proxy.threaded`: one thread
polling the sockets; :mod:`vfioproxy.proxy.tasks`: trio tasks) only wait
for what :meth:`Relay.wants_read`, :meth:`Relay.wants_write` and
:meth:`Relay.next_release` say, and call these steps.

The two directions are independent: a message half-sent by one peer, or a
peer that stops reading, holds up nothing in the other direction. A peer
that stops reading fills its own queue up to a bound; the proxy then stops
reading from the sender (recorded as ``queue_full``), as the kernel would
stop a direct sender.

Ends mirror a direct connection. A peer that closes its sending side (EOF)
has everything it sent delivered, then the other peer reads EOF. A peer
that can receive no more (it closed: ``POLLHUP``, ``EPIPE``, a reset) loses
what was queued for it (each such message gets an ``undelivered`` event with
the bytes it did get), and the other peer's sending side is shut so that
its next write fails as it would directly; what it had already sent is read
and recorded. The session ends when both directions are done. A session
the proxy ends (strict, an injected close, shutdown) records what was
queued as undelivered and how many bytes it left unread in each socket.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import select
import socket
import termios
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import trio

from recorder.records import FdRecord, rewritten
from vfioproxy.inject import Decision
from vfioproxy.interpose import FdFate, Interposed
from vfioproxy.io.fds import OwnedFd, close_all, fd_record
from vfioproxy.protocol.negotiation import TwinSocket, is_version
from vfioproxy.proxy import fastpath
from vfioproxy.proxy.ledger import SessionLedger
from vfioproxy.proxy.substitutes import Substitutes
from vfioproxy.proxy.wire import (
    Message,
    MessageReader,
    Outbox,
    Outgoing,
    PeerClosed,
    PeerGone,
    Piece,
    Taken,
)
from vfioproxy.side import Direction, Side

__all__ = ["Leg", "Relay", "SpawnTwin"]

#: starts the relay of a twin socket: (server's end, proxy's end of the
#: client's pair) -> the twin session's id
SpawnTwin = Callable[[socket.socket, socket.socket], int]

_NO_FDS: list[OwnedFd] = []
#: the C lane hands the counts back at least this often (messages) ...
LANE_BATCH = 4096
#: ... and once nothing came for this long after a message (ms): statistics stay fresh
LANE_IDLE_MS = 50
#: what :meth:`Relay.run_lane` returns when the lane's wake-up fd became readable
LANE_WOKEN = 3


#: every command (a C lane command mask)
ALL_COMMANDS = (1 << 64) - 1


class LanePlan(NamedTuple):
    """What the C lane does with each direction (:meth:`Relay.lane_plan`):
    ``handback`` bit 0 (c2s) / bit 1 (s2c): hand its messages back for the
    fault rules or an interposition mode to decide, those of the commands
    in that direction's mask (``c2s_commands``, ``s2c_commands``: bit N for
    command N, bit 63 for 63 and above); else forward them, writing the
    inject event whose parts are given with each (None: none), numbered from
    the index given."""

    handback: int
    c2s_event: tuple[bytes, bytes, bytes, bytes] | None
    s2c_event: tuple[bytes, bytes, bytes, bytes] | None
    c2s_index: int
    s2c_index: int
    c2s_commands: int = ALL_COMMANDS
    s2c_commands: int = ALL_COMMANDS


_PLAIN = LanePlan(0, None, None, 0, 0)


def command_mask(commands: frozenset[int] | None) -> int:
    """The C lane's mask of ``commands`` (None: every command)."""
    if commands is None:
        return ALL_COMMANDS
    return sum({1 << min(command, 63) for command in commands})


class _Stream:
    """A message too large to buffer, being handed on piece by piece."""

    __slots__ = ("decision", "fds", "forward", "length", "prefix", "received", "release_at",
                 "t_ns")

    def __init__(self, head: bytes, length: int, t_ns: int, fds: list[FdRecord],
                 forward: bool, release_at: float | None, decision: Decision | None) -> None:
        self.prefix = bytearray(head)
        self.length = length
        self.received = len(head)
        self.t_ns = t_ns
        self.fds = fds
        self.forward = forward
        self.release_at = release_at
        self.decision = decision


class Leg:
    """One peer's connection: what it sends (``reader``) and what goes to it (``outbox``)."""

    def __init__(self, side: Side, sock: socket.socket, *, buffer_limit: int,
                 queue_limit: int) -> None:
        sock.setblocking(False)
        self.side = side
        self.name = side.value
        self.sock = sock
        self.fd = sock.fileno()
        #: the direction of the messages this peer sends
        self.direction = Direction.C2S if side is Side.CLIENT else Direction.S2C
        self.reader = MessageReader(sock, buffer_limit=buffer_limit)
        self.outbox = Outbox(sock, limit_bytes=queue_limit)
        self.peer: Leg = self
        self.eof = False  # everything this peer sent has been read
        self.gone = False  # this peer receives no more
        self.shut_wr = False  # the proxy shut its sending side towards this peer
        self.full_noted = False  # queue_full recorded for the current episode
        self.stream: _Stream | None = None


class Relay:
    """Moves one session's messages (see the module docstring).

    ``clock`` is the injector's clock (seconds; trio's under trio).
    ``capture_fd_contents`` records memfd contents up to that size (read
    before the send, as they passed); fd metadata is taken after the send
    otherwise. ``spawn_twin`` starts the relay of a twin socket.
    ``substitutes`` makes and keeps the fds forwarded in place of those an
    interposition mode interposes on (None: such fds are forwarded as they
    are); it is closed with the session.
    """

    def __init__(
        self,
        ledger: SessionLedger,
        client: socket.socket,
        server: socket.socket,
        *,
        buffer_limit: int,
        queue_limit: int,
        clock: Callable[[], float] = time.monotonic,
        capture_fd_contents: int = 0,
        spawn_twin: SpawnTwin | None = None,
        substitutes: Substitutes | None = None,
    ) -> None:
        self.ledger = ledger
        self.substitutes = substitutes
        self.client = Leg(Side.CLIENT, client, buffer_limit=buffer_limit, queue_limit=queue_limit)
        self.server = Leg(Side.SERVER, server, buffer_limit=buffer_limit, queue_limit=queue_limit)
        self.client.peer, self.server.peer = self.server, self.client
        self.legs = (self.client, self.server)
        self.clock = clock
        self.capture_fd_contents = capture_fd_contents
        self.inspect_fds = ledger.writer is not None
        self.spawn_twin = spawn_twin
        #: the framing limit (follows the VERSION exchange)
        self.max_message_size = ledger.max_message_size
        self.closed = False
        #: set whenever what to wait for may have changed (forwarders re-arm then)
        self.changed = True

    # ------------------------------------------------------------- what to wait for

    def wants_read(self, leg: Leg) -> bool:
        return not leg.eof and not leg.peer.outbox.full

    @staticmethod
    def wants_write(leg: Leg) -> bool:
        return leg.outbox.blocked and not leg.gone

    def next_release(self) -> float | None:
        """The earliest time a held message falls due (None: nothing held)."""
        first = None
        for leg in self.legs:
            at = leg.outbox.next_release()
            if at is not None and not leg.outbox.blocked and (first is None or at < first):
                first = at
        return first

    @property
    def finished(self) -> bool:
        """Both directions are done (or the session was stopped)."""
        return self.closed or (self._done(self.client) and self._done(self.server))

    @staticmethod
    def _done(src: Leg) -> bool:
        """Everything ``src`` sent has been read and delivered (or cannot be)."""
        return src.eof and src.stream is None and (src.peer.gone or not src.peer.outbox)

    # ------------------------------------------------------------- steps

    def readable(self, leg: Leg, taken: Taken | None = None) -> bool:
        """Read and handle the next message (or piece) ``leg`` has; False when
        it had nothing (yet) to read. ``taken``: what the C lane read of it."""
        try:
            got = leg.reader.read(self.max_message_size, taken)
        except PeerClosed as closed:
            self._closed(leg, closed)
            return True
        if got is None:
            return False
        if type(got) is Message:
            self._message(leg, got)
        else:
            assert isinstance(got, Piece)
            self._piece(leg, got)
        return True

    def writable(self, leg: Leg) -> None:
        """Send what waits for ``leg`` and may go now."""
        self._flush(leg)

    def release(self) -> None:
        """Send every held message whose time has come."""
        for leg in self.legs:
            if leg.outbox and not leg.outbox.blocked:
                self._flush(leg)

    # ------------------------------------------------------------- the C lane

    def lane_plan(self) -> LanePlan | None:
        """Whether the next messages may take the C lane
        (:mod:`vfioproxy.proxy.fastpath`): None when not (live checks on the path,
        something queued, held, part-read or ended, a trace that takes no plain
        appends now, fault rules deciding both directions); else what it is
        to do with each direction: hand it back for the fault rules to decide,
        or forward it, with the inject events of its zero delays (see
        :meth:`~vfioproxy.inject.Injector.unchanged`)."""
        ledger = self.ledger
        if ledger.checks is not None or self.closed or ledger.stop_reason is not None:
            return None
        for leg in self.legs:
            if (leg.eof or leg.gone or leg.stream is not None or not leg.reader.idle
                    or leg.outbox.items or leg.outbox.blocked):
                return None
        writer = ledger.writer
        if writer is not None and not (writer.appender.fast
                                       and type(writer.appender) is fastpath.Appender):
            return None
        injector = ledger.injector
        interposer = ledger.interposer
        # the messages an interposition mode must see come back to Python
        handback = 0
        masks = [ALL_COMMANDS, ALL_COMMANDS]
        if interposer is not None:
            for bit, direction in enumerate((Direction.C2S, Direction.S2C)):
                if direction in interposer.directions:
                    handback |= 1 << bit
                    masks[bit] = command_mask(interposer.commands(direction))
        if injector is None:
            if handback == 3 and masks == [ALL_COMMANDS, ALL_COMMANDS]:
                return None
            if not handback:
                return _PLAIN
            return LanePlan(handback, None, None, 0, 0, masks[0], masks[1])
        now = self.clock()
        events: list[tuple[bytes, bytes, bytes, bytes] | None] = [None, None]
        indexes = [0, 0]
        for bit, direction in enumerate((Direction.C2S, Direction.S2C)):
            applied = injector.unchanged(ledger.id, direction, now)
            if applied is None:  # the fault rules decide every message of it
                handback |= 1 << bit
                masks[bit] = ALL_COMMANDS
            else:
                events[bit] = ledger.inject_parts(direction, applied)
                indexes[bit] = injector.next_index(ledger.id, direction)
        if handback == 3 and masks == [ALL_COMMANDS, ALL_COMMANDS]:
            return None
        return LanePlan(handback, events[0], events[1], indexes[0], indexes[1], masks[0],
                        masks[1])

    def run_lane(self, lane: Callable[..., tuple[Any, ...]], wake_fd: int, plan: LanePlan) -> int:
        """Let the C lane forward and record plain messages as ``plan`` says
        until it returns, then take on what it handed back, with the same steps
        as any message (:meth:`readable`, :meth:`_message`). Returns -1 when
        the lane may go on, :data:`LANE_WOKEN` when ``wake_fd`` became
        readable, else the caller's own poll must see the sockets before the
        lane runs again (a hang-up, a poll error)."""
        ledger = self.ledger
        writer = ledger.writer
        if writer is None:
            appender, c2s_parts, s2c_parts = None, None, None
        else:
            appender = writer.appender
            c2s_parts = writer.plain_parts(ledger.id, Direction.C2S)
            s2c_parts = writer.plain_parts(ledger.id, Direction.S2C)
        result = lane(self.client.fd, self.server.fd, wake_fd, self.max_message_size,
                      self.client.reader.buffer_limit, appender, c2s_parts, s2c_parts,
                      plan.c2s_event, plan.s2c_event, plan.c2s_index, plan.s2c_index,
                      plan.handback, LANE_BATCH, LANE_IDLE_MS, plan.c2s_commands,
                      plan.s2c_commands)
        code, c2s_messages, c2s_bytes, s2c_messages, s2c_bytes, index = result[:6]
        if c2s_messages:
            ledger.forwarded(Direction.C2S, c2s_messages, c2s_bytes)
        if s2c_messages:
            ledger.forwarded(Direction.S2C, s2c_messages, s2c_bytes)
        if code == 0:
            return int(index)
        leg = self.legs[index]
        if code == 1:  # a header it does not take (fds, VERSION, a part, EOF, ...)
            self.readable(leg, Taken(*result[6:]))
        else:  # a framed message whose send or record it did not finish
            data, t_ns, sent, error = result[6:]
            self._message(leg, Message(data, _NO_FDS, len(data)), t_ns=t_ns,
                          offered=(sent, error))
        return -1

    def hangup(self, leg: Leg) -> None:
        """``leg``'s peer closed its socket (``POLLHUP``): it receives no more."""
        if not leg.gone:
            self._gone(leg, "closed the connection")

    # ------------------------------------------------------------- a message

    def _message(self, src: Leg, message: Message, *, t_ns: int = 0,
                 offered: tuple[int, int] | None = None) -> None:
        """Handle one message read from ``src`` (``t_ns``: when it arrived, if
        known; ``offered``: (bytes, errno) of the C lane's send of it)."""
        ledger = self.ledger
        direction = src.direction
        dst = src.peer
        data = message.data
        fds = message.fds
        if not t_ns:
            t_ns = time.monotonic_ns()
        version = is_version(data)
        if version and fds:  # a twin socket must be swapped before the reply goes on
            version = False
            self._version(direction, data, fds)
        length = message.length  # on the wire (more than ``data`` when streamed on)
        interposed: dict[str, Any] | None = None
        if ledger.interposer is not None and length == len(data) and offered is None:
            done = ledger.interposer.message(direction, data, len(fds))
            if done is not None:
                data, interposed = self._interpose(direction, data, fds, done)
                length = len(data)
        # (a message the C lane sent is of a direction whose decisions forward at
        # once, unchanged: the decision records that; rules changed meanwhile
        # cannot take back or rewrite what was sent)
        decision = None if ledger.injector is None else ledger.decide(direction, data,
                                                                      self.clock())
        if offered is not None and decision is not None and (
                not decision.forward or decision.data is not data):
            decision = None
        fd_records: list[FdRecord] = []
        if fds and self.inspect_fds and (self.capture_fd_contents or decision is not None):
            fd_records = self._fd_records(fds)  # contents as they passed; held fds now
        item = None
        if decision is None:
            item = self._send(dst, data, fds, None, length=length, offered=offered)
        elif decision.forward:
            close_after = None
            if decision.close_after:
                close_after = f"injected close after {self._where(direction, decision)}"
            item = self._send(dst, decision.data, fds, decision.release_at,
                              length=length, close_after=close_after,
                              offered=offered)
        else:
            close_all(fds)
        if version:  # after the send: the negotiation sets the limit of the next messages
            self._version(direction, data, fds)
        if fds:
            if self.inspect_fds and not fd_records:
                fd_records = self._fd_records(fds)  # after the send, before the close
            dst.outbox.close_sent()
        if length > len(data):
            forward = decision is None or decision.forward
            release_at = None if decision is None else decision.release_at
            src.stream = _Stream(data, length, t_ns, fd_records, forward, release_at,
                                 decision)
            seq = 0
        else:
            seq = ledger.record(direction, t_ns, data, fd_records, nfds=len(fds),
                                decision=decision, interposed=interposed)
        self._recorded(item, dst, seq)
        if message.fds_dropped or message.fds_truncated:
            ledger.fds_dropped(direction, seq, message.fds_dropped, message.fds_truncated)
        if decision is not None:
            if decision.reply is not None:  # in place of the receiver, back to the sender
                self._send(src, decision.reply, [], decision.release_at, forwarded=False)
            if decision.close_before:
                ledger.stop(f"injected close before {self._where(direction, decision)}")
        if dst.outbox.items:
            self._check_full(dst)

    def _interpose(self, direction: Direction, data: bytes, fds: list[OwnedFd],
                   done: Interposed) -> tuple[bytes, dict[str, Any] | None]:
        """Apply what an interposition mode made of a message that arrived as
        ``data`` with ``fds``: ``fds`` becomes what the receiver gets (withheld
        ones closed, interposed ones swapped for their substitutes); returns the
        bytes it gets and the ``interpose`` event's data (FORMAT.md §6). A plan
        that does not fit the fds (another count) changes nothing; an fd no
        substitute can be made for is forwarded as it is, which the event says."""
        if len(done.fds) != len(fds):
            return data, None
        event: dict[str, Any] = {"mode": done.mode, "direction": direction.value,
                                 "note": done.note}
        if done.data != data:
            event["arrived"] = rewritten(data, done.data)
        withheld: list[dict[str, Any]] = []
        swapped: list[dict[str, Any]] = []
        kept: list[OwnedFd] = []
        for position, (fd, plan) in enumerate(zip(fds, done.fds, strict=True)):
            if plan.fate is FdFate.FORWARD:
                kept.append(fd)
                continue
            entry = self._fd_entry(fd, position)
            if plan.fate is FdFate.WITHHOLD:
                fd.close()
                withheld.append(entry)
                continue
            if plan.irq is not None:
                entry["irq"] = list(plan.irq)
            substitute = None
            if self.substitutes is not None:
                try:
                    substitute = self.substitutes.interpose(fd, plan)
                except OSError as exc:
                    entry["failed"] = str(exc)
            else:
                entry["failed"] = "no substitutes in this proxy"
            kept.append(fd if substitute is None else substitute)
            swapped.append(entry)
        fds[:] = kept
        if withheld:
            event["withheld"] = withheld
        if swapped:
            event["interposed"] = swapped
        if done.release and self.substitutes is not None:
            self.substitutes.release(done.release)
            event["released"] = [list(irq) for irq in done.release]
        return done.data, event

    def _fd_entry(self, fd: OwnedFd, position: int) -> dict[str, Any]:
        """What the ``interpose`` event says of an fd the receiver does not get
        (its metadata as a message record's fds hold it; ``position``: its
        place in the message as it arrived)."""
        if not self.inspect_fds:
            return {"i": position}
        try:
            return fd_record(fd, position, contents_limit=self.capture_fd_contents).to_wire()
        except (OSError, ValueError):
            return {"i": position}

    def _piece(self, src: Leg, piece: Piece) -> None:
        stream = src.stream
        assert stream is not None
        stream.received += len(piece.data)
        room = src.reader.buffer_limit - len(stream.prefix)
        if room > 0:
            stream.prefix += piece.data[:room]
        if stream.forward:
            self._send(src.peer, piece.data, [], stream.release_at, length=stream.length,
                       message_start=False)
        if piece.last:
            src.stream = None
            self.ledger.record(src.direction, stream.t_ns, bytes(stream.prefix), stream.fds,
                               length=stream.length, decision=stream.decision)
        self._check_full(src.peer)

    def _send(
        self,
        dst: Leg,
        data: bytes,
        fds: list[OwnedFd],
        release_at: float | None,
        *,
        length: int = 0,
        message_start: bool = True,
        forwarded: bool = True,
        close_after: str | None = None,
        offered: tuple[int, int] | None = None,
    ) -> Outgoing | None:
        """Send a message to ``dst`` now if nothing waits before it and it is due,
        else queue it (``offered``: the C lane sent it already, with this
        result). Returns None when it went whole at once, else its queue item
        (``dropped`` when ``dst`` is gone: the caller records that)."""
        sent = -1
        if not dst.gone and (release_at is None or release_at <= self.clock()):
            try:
                if offered is None:
                    sent = dst.outbox.offer(data, fds)
                else:
                    sent = dst.outbox.offered(data, *offered)
            except PeerGone as exc:
                self._gone(dst, f"EOF while forwarding ({exc})")
            if sent == len(data):
                if close_after is not None:
                    self.ledger.stop(close_after)
                return None
        item = Outgoing(data, fds if sent <= 0 else [], release_at, length=length,
                        message_start=message_start, forwarded=forwarded,
                        close_after=close_after)
        if sent > 0:
            item.sent = sent
        if dst.gone:
            item.dropped = True
            close_all(item.fds)
            item.fds = []
            return item
        dst.outbox.append(item)
        self.changed = True  # blocked, or held: the forwarder waits for it
        return item

    def _flush(self, dst: Leg) -> None:
        outbox = dst.outbox
        was_blocked = outbox.blocked
        try:
            done = outbox.send(self.clock())
        except PeerGone as exc:
            outbox.close_sent()
            self._gone(dst, f"EOF while forwarding ({exc})")
            return
        outbox.close_sent()
        if done or outbox.blocked != was_blocked:
            self.changed = True
        for item in done:
            if item.close_after is not None:
                self.ledger.stop(item.close_after)
        if dst.full_noted and not outbox.full:
            dst.full_noted = False
        if not outbox and dst.peer.eof and dst.peer.stream is None:
            self._shut_wr(dst)

    def _check_full(self, dst: Leg) -> None:
        if dst.outbox.full and not dst.full_noted:
            dst.full_noted = True
            self.changed = True
            self.ledger.queue_full(dst.peer.direction, dst.outbox.bytes, dst.outbox.fds)

    # ------------------------------------------------------------- ends

    def _closed(self, src: Leg, closed: PeerClosed) -> None:
        """``src`` closed its sending side: hand on a torn message, then EOF."""
        ledger = self.ledger
        direction = src.direction
        dst = src.peer
        reason = "EOF"
        if closed.partial:  # a message it never finished: the receiver gets the same
            t_ns = time.monotonic_ns()
            fds = closed.fds
            item = self._send(dst, closed.partial, fds, None)
            fd_records = self._fd_records(fds) if fds and self.inspect_fds else []
            dst.outbox.close_sent()
            seq = ledger.record(direction, t_ns, closed.partial, fd_records,
                                nfds=len(fds), torn=True)
            ledger.torn(direction, seq, closed.received)
            self._recorded(item, dst, seq)
            reason = f"EOF mid-message (after {closed.received} bytes of a message)"
        elif closed.streamed and src.stream is not None:
            stream = src.stream
            ledger.torn(direction, self._record_torn_stream(src), stream.received)
            reason = f"EOF mid-message (after {stream.received} of {stream.length} bytes)"
        else:
            close_all(closed.fds)
        src.eof = True
        self.changed = True
        ledger.end(src.name, reason)
        if closed.reset or _hung_up(src.sock):
            self.hangup(src)
        if not dst.outbox and not dst.gone:
            self._shut_wr(dst)

    def _gone(self, leg: Leg, why: str) -> None:
        """``leg``'s peer receives no more: drop what waits for it and make the
        other peer's writes fail from now on, as they would directly."""
        leg.gone = True
        self.changed = True
        self.ledger.end(leg.name, why)
        self._undeliverable(leg, f"the {leg.name} is gone")
        other = leg.peer
        if not other.eof:
            with contextlib.suppress(OSError):
                other.sock.shutdown(socket.SHUT_RD)

    def _undeliverable(self, leg: Leg, why: str) -> None:
        """Drop what was queued for ``leg``'s peer, recording each message it did not
        get whole (items not yet recorded are told by :meth:`_recorded`)."""
        for item in leg.outbox.drop_all():
            if item.forwarded and item.message_start and item.seq:
                self.ledger.undelivered(leg.peer.direction, item.seq, item.sent,
                                        item.length, why)

    def _recorded(self, item: Outgoing | None, dst: Leg, seq: int) -> None:
        """A message just recorded as ``seq``: name it in its queue item, and if the
        item was dropped before that (its receiver gone), say so now."""
        if item is not None:
            item.seq = seq
            if item.dropped and seq:
                self.ledger.undelivered(dst.peer.direction, seq, item.sent, item.length,
                                        f"the {dst.name} is gone")

    def _record_torn_stream(self, src: Leg) -> int:
        """Record the start of a streamed message its sender never finished; its seq."""
        stream = src.stream
        assert stream is not None
        src.stream = None
        return self.ledger.record(src.direction, stream.t_ns, bytes(stream.prefix), stream.fds,
                                  length=stream.received, torn=True, decision=stream.decision)

    def _shut_wr(self, leg: Leg) -> None:
        if not leg.shut_wr and leg.peer.eof:
            leg.shut_wr = True
            with contextlib.suppress(OSError):
                leg.sock.shutdown(socket.SHUT_WR)

    def end(self, failure: BaseException | None = None) -> None:
        """How a forwarder ends a session: closed if both directions are done;
        else stopped, for the ledger's reason (strict, an injected close), the
        ``failure`` that ended the forwarding (cancellation: shutdown), or a
        proxy shutting down."""
        if failure is None and self.finished:
            self.close()
            return
        if failure is None or isinstance(failure, trio.Cancelled):
            why = self.ledger.stop_reason or "proxy shut down"
        else:
            why = f"internal error: {failure!r}"
        self.ledger.end("proxy", why)
        self.stop(why)

    def stop(self, why: str) -> None:
        """End the session now (``why``: strict, an injected close, shutdown, an
        error): record what waited as undelivered and what was left unread, close."""
        if self.closed:
            return
        for leg in self.legs:
            if leg.stream is not None:
                self._record_torn_stream(leg)
            self._undeliverable(leg, why)
        self.close()

    def close(self) -> None:
        """Close both sockets and record the session's close; idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.substitutes is not None:
            self.substitutes.close()
        unread = {}
        for leg in self.legs:
            pending = _unread_bytes(leg.sock)
            if pending:
                unread[leg.direction.value] = pending
            leg.reader.close()
            leg.outbox.drop_all()
            leg.sock.close()
        self.ledger.close(unread)

    # ------------------------------------------------------------- helpers

    def _fd_records(self, fds: list[OwnedFd]) -> list[FdRecord]:
        limit = self.capture_fd_contents
        records = []
        for i, fd in enumerate(fds):
            try:
                records.append(fd_record(fd, i, contents_limit=limit))
            except (OSError, ValueError):
                continue  # already closed (its receiver vanished mid-send): nothing to say
        return records

    def _version(self, direction: Direction, data: bytes, fds: list[OwnedFd]) -> None:
        """Follow a VERSION message: the framing limit, and a twin socket it hands over."""
        twin = self.ledger.version(direction, data)
        self.max_message_size = self.ledger.max_message_size
        if twin is not None and fds:
            self._twin(twin, fds)

    def _twin(self, twin: TwinSocket, fds: list[OwnedFd]) -> None:
        """Give the client a proxy-owned twin socket and relay it (see Proxy)."""
        index = twin.fd_index
        if self.spawn_twin is None or not 0 <= index < len(fds):
            return  # forwarded as it is: the client will refuse it
        server_end = socket.socket(fileno=fds[index].detach())
        if server_end.family != socket.AF_UNIX or server_end.type != socket.SOCK_STREAM:
            fds[index] = OwnedFd(server_end.detach())
            self.ledger.event("note", {
                "text": f"the twin socket at fd_index {index} is not an AF_UNIX stream socket; "
                        "forwarded as it is"})
            return
        client_end, proxy_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds[index] = OwnedFd(client_end.detach())
        twin_id = self.spawn_twin(server_end, proxy_end)
        self.ledger.event("note", {"text": f"twin socket relayed as session {twin_id}"})

    @staticmethod
    def _where(direction: Direction, decision: Decision) -> str:
        return f"{direction.sender.value} message {direction.value}[{decision.index}]"


def _hung_up(sock: socket.socket) -> bool:
    """True when the peer closed its end entirely (it receives no more)."""
    poller = select.poll()
    poller.register(sock, 0)
    return any(events & select.POLLHUP for _, events in poller.poll(0))


def _unread_bytes(sock: socket.socket) -> int:
    buf = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
    except OSError:
        return 0
    return buf[0]
