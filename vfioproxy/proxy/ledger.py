"""One session's decisions and bookkeeping, with no I/O.

For every message the forwarding reads, the :class:`SessionLedger` says
what becomes of it (:meth:`~SessionLedger.decide`: forward now, or what the
fault injector decided: hold until, drop, answer with an error, close), and
records what happened (:meth:`~SessionLedger.record`: the raw message with
its time and fd metadata, the injected actions in the same write, counters,
and, only when asked, the live checks). It also follows the VERSION
exchange, which fixes the framing limit, and keeps who ended the session
and why. The forwarding itself (:mod:`vfioproxy.proxy.relay`) moves the
bytes and calls it; nothing here touches a socket.

A failure to record never ends a session: the writer pauses on a full disk
(and says so in the trace), any other error is logged once and the messages
that could not be recorded are counted in the session's close.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from recorder.errors import TraceError
from recorder.records import EventPacker, FdRecord, rewritten
from recorder.writer import Event, TraceWriter
from vfioproxy.inject import Applied, Decision, Injector
from vfioproxy.interpose import SessionInterposer
from vfioproxy.protocol.negotiation import Negotiation, TwinSocket
from vfioproxy.protocol.session import injection_cause
from vfioproxy.proxy.checks import LiveChecks
from vfioproxy.proxy.model import Counters
from vfioproxy.side import Direction

__all__ = ["Numbering", "SessionLedger"]

log = logging.getLogger("vfioproxy.proxy")

_C2S, _S2C = Direction.C2S, Direction.S2C


def _sent(arrived: bytes, rewritten_start: bytes) -> bytes:
    """The bytes forwarded of a message whose start (``rewritten_start``, the
    whole of it unless it was streamed on in pieces) an action rewrote."""
    if len(arrived) > len(rewritten_start):
        return rewritten_start + arrived[len(rewritten_start):]
    return rewritten_start


class Numbering:
    """The ``seq`` numbers a trace would give, for a proxy that records nothing
    but shows messages (``proxy -v``): one count over all of its sessions'
    records, messages and events alike, as a :class:`~recorder.writer.TraceWriter`
    counts them."""

    def __init__(self) -> None:
        self.last = 0
        self._lock = threading.Lock()  # an IRQ watcher's thread numbers its events too

    def take(self, records: int) -> int:
        """Number ``records`` records; returns the first one's seq (any thread)."""
        with self._lock:
            first = self.last + 1
            self.last += records
        return first


class SessionLedger:
    """The state of one proxied session that is not a socket.

    ``writer`` records the session (None: nothing is recorded);
    ``injector`` decides faults (None: every message is forwarded at once,
    and :meth:`decide` is not even asked); ``checks`` decodes and checks on
    the path (None: nothing is decoded but VERSION); ``numbering`` numbers
    what is not recorded as a trace would (the live view of ``proxy -v``);
    ``interposer`` the interposition modes that are on (None: none), which act
    on each message before the fault injector does.
    """

    def __init__(
        self,
        session: int,
        *,
        writer: TraceWriter | None = None,
        injector: Injector | None = None,
        checks: LiveChecks | None = None,
        numbering: Numbering | None = None,
        interposer: SessionInterposer | None = None,
    ) -> None:
        self.id = session
        self.interposer = interposer
        self.writer = writer
        #: numbers records as a trace would when there is no ``writer``
        self.numbering = None if writer is not None else numbering
        self.injector = injector
        self.checks = checks
        self.negotiation = Negotiation()
        self.counters = {_C2S: Counters(), _S2C: Counters()}
        #: who ended the session and why (the first to say so wins)
        self.closed_by: str | None = None
        self.reason: str | None = None
        #: set when the session must end now (strict, an injected close)
        self.stop_reason: str | None = None
        self.unrecorded = 0
        #: the session's close has been recorded
        self.closed = False
        self._record_error_logged = False
        #: per direction: the last applied records, their inject event packer, their dicts
        self._inject: dict[Direction, tuple[tuple[Applied, ...], EventPacker | None,
                                            list[dict[str, Any]]]] = {}

    @property
    def max_message_size(self) -> int:
        """The framing limit now (it follows the VERSION exchange)."""
        return self.negotiation.max_message_size

    @property
    def violations(self) -> int:
        """Violations found on the path (0 when nothing is checked there)."""
        return 0 if self.checks is None else self.checks.violations

    # ------------------------------------------------------------------ deciding

    def version(self, direction: Direction, data: bytes) -> TwinSocket | None:
        """Follow a VERSION message (framing limit); returns a twin socket it hands over."""
        return self.negotiation.observe(direction, data)

    def decide(self, direction: Direction, data: bytes, now: float) -> Decision | None:
        """What becomes of a message that arrived at ``now`` (None: forward it now)."""
        if self.injector is None:
            return None
        return self.injector.decide(self.id, direction, data, now)

    # ------------------------------------------------------------------ recording

    def forwarded(self, direction: Direction, messages: int, nbytes: int) -> None:
        """Count plain messages the C lane forwarded and recorded (no fds; the
        fault injector let them by undecided: it counts them too)."""
        counters = self.counters[direction]
        counters.messages += messages
        counters.bytes += nbytes
        if self.injector is not None:  # it let them by undecided (Injector.unchanged)
            self.injector.passed(self.id, direction, messages)

    def record(
        self,
        direction: Direction,
        t_ns: int,
        data: bytes,
        fds: Sequence[FdRecord],
        *,
        nfds: int = 0,
        length: int | None = None,
        torn: bool = False,
        decision: Decision | None = None,
        interposed: dict[str, Any] | None = None,
    ) -> int:
        """Account for one message that arrived (``length``: its size on the wire
        when ``data`` holds only its start; ``nfds``: how many fds it carried
        when ``fds`` are not inspected; ``decision``: the injector's, whose
        applied actions are recorded with it; ``interposed``: the ``interpose``
        event of an interposition mode that acted on it, recorded with it
        before any ``inject`` event: ``data`` is then the message as the mode
        made it, which the injector decided on). Counters count what is
        forwarded. Returns its trace ``seq`` (0: not recorded). Live checks
        may set :attr:`stop_reason`."""
        if decision is None or decision.forward:
            counters = self.counters[direction]
            counters.messages += 1
            counters.bytes += len(data) if length is None else length
            counters.fds += len(fds) or nfds
        seq = 0
        arrived: bytes | None = None
        rewritten_by: str | None = None
        if decision is not None and decision.data is not data and decision.forward:
            # a rewriting action: record (and check) what the receiver got, keep what arrived
            arrived, data = data, _sent(data, decision.data)
            if arrived == data:
                arrived = None
            else:
                applied = [a.to_dict() for a in decision.applied]
                rewritten_by = injection_cause(applied)
        writer = self.writer
        if writer is not None:
            events: list[Event] = []
            if interposed is not None:
                events.append(("interpose", interposed))
            if arrived is not None:
                assert decision is not None
                events.append(("inject", {"direction": direction.value,
                                          "index": decision.index, "applied": applied,
                                          "arrived": rewritten(arrived, data)}))
            elif decision is not None and decision.applied:
                events.append(self._inject_event(writer, direction, decision.applied,
                                                 decision.index))
            try:
                seq = writer.append_message(
                    self.id, direction, t_ns, data, fds, length=length, torn=torn, events=events
                )
            except (TraceError, OSError, ValueError) as exc:
                self._not_recorded(exc)
            if not seq:
                self._unrecorded(writer)
        elif self.numbering is not None:
            seq = self.numbering.take(1 + (decision is not None and bool(decision.applied))
                                      + (interposed is not None))
        checks = self.checks
        if checks is not None:
            reason = checks.observe(direction, data, fds or range(nfds), t_ns, seq,
                                    length=length, torn=torn, rewritten_by=rewritten_by)
            if reason is not None:
                self.stop(reason)
        return seq

    def _inject_event(self, writer: TraceWriter, direction: Direction,
                      applied: tuple[Applied, ...], index: int) -> Event:
        """The ``inject`` event of message ``index``. The injector hands the same
        ``applied`` for every message of fixed delays: from its second time,
        the event is packed from parts packed once."""
        if not self._cache_applied(direction, applied):
            return "inject", {"direction": direction.value, "index": index,
                              "applied": self._inject[direction][2]}
        return self._inject_packer(writer, direction), index

    def inject_parts(
        self, direction: Direction, applied: tuple[Applied, ...]
    ) -> tuple[bytes, bytes, bytes, bytes] | None:
        """The parts of the ``inject`` events of ``direction`` while every message
        gets ``applied`` (the C lane writes them); None when nothing is recorded
        or nothing is applied."""
        if self.writer is None or not applied:
            return None
        self._cache_applied(direction, applied)
        return self._inject_packer(self.writer, direction).parts()

    def _cache_applied(self, direction: Direction, applied: tuple[Applied, ...]) -> bool:
        """Keep ``applied`` (and its records' dicts) as ``direction``'s last; True
        when it was already."""
        cached = self._inject.get(direction)
        if cached is not None and cached[0] is applied:
            return True
        self._inject[direction] = (applied, None, [entry.to_dict() for entry in applied])
        return False

    def _inject_packer(self, writer: TraceWriter, direction: Direction) -> EventPacker:
        """The event packer of ``direction``'s last applied records (made once)."""
        applied, packer, dicts = self._inject[direction]
        if packer is None:
            packer = writer.event_packer(self.id, "inject", {
                "direction": direction.value, "index": 0, "applied": dicts}, "index")
            self._inject[direction] = (applied, packer, dicts)
        return packer

    def event(self, kind: str, data: dict[str, Any], t_ns: int | None = None) -> int:
        """Record an event of this session; returns its ``seq`` (0: not recorded)."""
        if self.writer is None:
            return 0 if self.numbering is None else self.numbering.take(1)
        try:
            return self.writer.append_event(
                self.id, kind, time.monotonic_ns() if t_ns is None else t_ns, data
            )
        except (TraceError, OSError, ValueError, TypeError) as exc:
            self._not_recorded(exc)
            return 0

    def _unrecorded(self, writer: TraceWriter) -> None:
        self.unrecorded += 1
        if writer.paused and not self._record_error_logged:
            self._record_error_logged = True
            log.error("session %d: %s: the disk is full: recording paused, the session is "
                      "still forwarded", self.id, writer.path)

    def _not_recorded(self, exc: BaseException) -> None:
        if not self._record_error_logged:
            self._record_error_logged = True
            log.error("session %d: cannot record: %s", self.id, exc)

    # ------------------------------------------------------------------ facts

    def torn(self, direction: Direction, seq: int, received: int) -> None:
        """The sender closed in the middle of a message (recorded as ``seq``)."""
        sender = direction.sender.value
        self.event("error", {
            "text": f"{sender} closed in the middle of a message: framing lost",
            "side": sender,
            "direction": direction.value,
            "received": received,
            "seq": seq,
        })
        log.warning("session %d: %s closed after %d bytes of a message", self.id, sender,
                    received)

    def undelivered(
        self, direction: Direction, seq: int, delivered: int, length: int, reason: str
    ) -> None:
        """A message (record ``seq``) of which the receiver got only ``delivered`` bytes."""
        self.event("undelivered", {
            "direction": direction.value,
            "seq": seq,
            "delivered": delivered,
            "length": length,
            "reason": reason,
        })

    def fds_dropped(self, direction: Direction, seq: int, dropped: int, truncated: bool) -> None:
        """Fds that came with a message's header but could not be passed on."""
        text = []
        if dropped:
            text.append(f"{dropped} fd(s) beyond the {253} one sendmsg can pass were closed")
        if truncated:
            text.append("the kernel dropped fds that did not fit (MSG_CTRUNC)")
        self.event("fds_dropped", {
            "direction": direction.value, "seq": seq, "dropped": dropped,
            "truncated": truncated, "text": "; ".join(text),
        })
        log.warning("session %d: %s message #%d: %s", self.id, direction.value, seq,
                    "; ".join(text))

    def queue_full(self, direction: Direction, queued: int, fds: int) -> None:
        """The receiver of ``direction`` stopped reading: the proxy stops reading its sender."""
        self.event("queue_full", {"direction": direction.value, "bytes": queued, "fds": fds})

    # ------------------------------------------------------------------ ending

    def stop(self, reason: str) -> None:
        """End the session now, by the proxy's decision."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self.end("proxy", reason)

    def end(self, closed_by: str, reason: str) -> None:
        """Say who ended the session and why (the first to say it wins)."""
        if self.closed_by is None:
            self.closed_by, self.reason = closed_by, reason

    def close(self, unread: dict[str, int] | None = None) -> None:
        """Record the session's close (flushing the live checks' counts first); once."""
        if self.closed:
            return
        self.closed = True
        now = time.monotonic_ns()
        if self.checks is not None:
            self.checks.flush(now)
        if self.injector is not None:
            self.injector.forget(self.id)
        if self.interposer is not None:
            for mode, text in self.interposer.closing(self.closed_by or "proxy"):
                log.warning("session %d: %s: %s", self.id, mode, text)
                self.event("note", {"mode": mode, "text": text}, now)
        data: dict[str, Any] = {"closed_by": self.closed_by or "proxy",
                                "reason": self.reason or "proxy shut down"}
        if unread:
            data["unread"] = unread
        if self.unrecorded:
            data["unrecorded"] = self.unrecorded
        self.event("session_close", data, now)
