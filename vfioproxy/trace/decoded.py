"""A trace read back with every message decoded, paired and described.

:func:`decoded_records` walks a trace once, keeps one
:class:`~vfioproxy.protocol.session.SessionState` and one
:class:`~vfioproxy.protocol.pci_view.PciView` per open session, and yields each record with
what the tools need: the decoded message, the command a reply answers, the
request-to-reply latency, protocol violations, and a PCI-aware description.

Memory is bounded by the window of open sessions, not by the trace: a
session's state is dropped at its ``session_close`` event, and when more than
``max_open_sessions`` sessions are open at once, the one idle the longest is
dropped (a :class:`SessionNotice` says so; if it goes on, it is decoded
afresh, with a second notice). What one session keeps is bounded too (at
most :data:`~vfioproxy.protocol.pairing.MAX_OUTSTANDING` commands waiting
per direction).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator

import attrs

from recorder.reader import Paused
from recorder.records import EventKind, EventRecord, MessageRecord, Record, arrived_bytes
from vfioproxy.protocol.codec import Dialects
from vfioproxy.protocol.header import Command
from vfioproxy.protocol.listing import RequestTimes
from vfioproxy.protocol.pci import Capability
from vfioproxy.protocol.pci_view import PciView, describe
from vfioproxy.protocol.session import (
    InjectionBlame,
    Observation,
    SessionState,
    Violation,
    injection_cause,
)
from vfioproxy.side import Direction


@attrs.frozen
class DecodedMessage:
    """A message record with its decoding; ``latency_ns`` is set on replies.

    ``injection`` is the ``inject`` event recorded with the message, if any;
    ``interposition`` its ``interpose`` event (an interposition mode acted on
    it: FORMAT.md §6); ``arrived`` the message as it arrived from its sender
    when the proxy rewrote it, by either (the record holds what the receiver
    got); ``caps`` the PCI capabilities
    of the session's config space as read up to this message (they name the
    capability fields a config access covers); ``request_seq`` the seq of
    the request a reply answers, as the reader paired them (set with
    ``latency_ns``); ``dialects`` the session's DMA_READ/DMA_WRITE layouts,
    None while they are still to be detected (before the client's VERSION)."""

    record: MessageRecord
    observation: Observation
    text: str
    latency_ns: int | None = None
    injection: EventRecord | None = None
    arrived: bytes | None = None
    caps: tuple[Capability, ...] = ()
    request_seq: int | None = None
    dialects: Dialects | None = None
    interposition: EventRecord | None = None


@attrs.frozen
class TornMessage:
    """A message record its sender never finished (``record.torn``): the bytes
    that arrived, and the violation that says so. Nothing of it is decoded."""

    record: MessageRecord
    violation: Violation
    text: str


@attrs.frozen
class SessionNegotiated:
    """Emitted once per session when the VERSION reply has been seen."""

    session: int
    state: SessionState
    detected: bool


@attrs.frozen
class SessionNotice:
    """What the reader says about its own decoding of a session (not a record):
    ``kind`` ``evicted`` when the session's state was dropped to keep within
    the window of open sessions, ``resumed`` when it goes on after that and is
    decoded afresh. ``t_ns``: the time of the record that caused it."""

    session: int
    kind: str
    text: str
    t_ns: int


DecodedItem = DecodedMessage | TornMessage | EventRecord | SessionNegotiated | SessionNotice

#: how many sessions may be open (seen, not yet closed) at once before the
#: one idle the longest has its decoding state dropped
MAX_OPEN_SESSIONS = 1024

#: per window slot, how many dropped sessions are remembered (to say so, and
#: to go on numbering their messages, if they continue)
EVICTED_MEMORY = 16


class _Session:
    def __init__(self, dialects: Dialects | None) -> None:
        self.state = SessionState(dialects=dialects)
        self.pci = PciView()
        self.times = RequestTimes()
        self.blame = InjectionBlame()
        self.announced = False


@attrs.frozen
class DecodeStatistics:
    """How much decoding state :class:`DecodedRecords` holds and has held."""

    open_sessions: int
    peak_open_sessions: int
    evicted: int
    closed: int
    waiting_requests: int


def _written_with(record: MessageRecord, event: Record | None,
                  attached: list[EventRecord]) -> EventRecord | None:
    """``event`` when it is an event written with message ``record``, after the
    ``attached`` ones: its ``interpose`` event (first), its ``inject`` event."""
    if (
        isinstance(event, EventRecord)
        and event.session == record.session
        and event.data.get("direction") == record.direction.value
        and (
            (event.kind == "interpose" and not attached)
            or (event.kind == "inject" and all(e.kind != "inject" for e in attached))
        )
    ):
        return event
    return None


class DecodedRecords(Iterator[DecodedItem]):
    """The decoded items of ``records``, one pass: see :func:`decoded_records`."""

    def __init__(
        self,
        records: Iterable[Record | Paused],
        *,
        dialects: Dialects | None = None,
        session: int | None = None,
        max_open_sessions: int = MAX_OPEN_SESSIONS,
    ) -> None:
        if max_open_sessions < 1:
            raise ValueError(f"max_open_sessions must be at least 1, got {max_open_sessions}")
        self.max_open_sessions = max_open_sessions
        self._dialects = dialects
        # open sessions, the one idle the longest first
        self._sessions: OrderedDict[int, _Session] = OrderedDict()
        # dropped sessions: their message counts per direction and DMA layouts (None:
        # not known yet)
        self._evicted: OrderedDict[int, tuple[dict[Direction, int], Dialects | None, bool]] = (
            OrderedDict())
        self._peak = 0
        self._evictions = 0
        self._closed = 0
        self._items = self._walk(records, session)

    def __next__(self) -> DecodedItem:
        return next(self._items)

    def statistics(self) -> DecodeStatistics:
        """The sessions whose state is held now and at most, and how many were
        dropped (window) or closed."""
        return DecodeStatistics(
            len(self._sessions), self._peak, self._evictions, self._closed,
            sum(len(s.state.outstanding(d)) for s in self._sessions.values()
                for d in Direction),
        )

    def _walk(self, records: Iterable[Record | Paused], only: int | None,
              ) -> Iterator[DecodedItem]:
        pending: MessageRecord | None = None
        attached: list[EventRecord] = []  # the events written with ``pending`` so far
        for record in records:
            if isinstance(record, Paused):  # a followed file stopped growing: let go
                if pending is not None:
                    yield from self._decode(pending, attached)
                    pending = None
                    attached = []
                continue
            if only is not None and record.session != only:
                continue
            if pending is not None:
                event = _written_with(pending, record, attached)
                if event is not None:
                    attached.append(event)
                    if event.kind != "inject":  # an inject event may follow
                        continue
                yield from self._decode(pending, attached)
                pending = None
                attached = []
                if event is not None:
                    continue
            if isinstance(record, EventRecord):
                yield record
                if record.kind == EventKind.SESSION_CLOSE and record.session is not None:
                    if self._sessions.pop(record.session, None) is not None:
                        self._closed += 1
                    self._evicted.pop(record.session, None)
            elif record.torn:
                yield from self._decode(record, [])
            else:
                pending = record
        if pending is not None:
            yield from self._decode(pending, attached)

    def _state(self, record: MessageRecord) -> Iterator[DecodedItem]:
        """Make sure ``record``'s session has a state (dropping the one idle the
        longest when the window is full), saying so."""
        session = record.session
        if session in self._sessions:
            self._sessions.move_to_end(session)
            return
        if len(self._sessions) >= self.max_open_sessions:
            gone, state = self._sessions.popitem(last=False)
            self._evictions += 1
            self._evicted[gone] = (dict(state.state.counts), state.state.known_dialects,
                                   state.announced)
            if len(self._evicted) > EVICTED_MEMORY * self.max_open_sessions:
                self._evicted.popitem(last=False)
            yield SessionNotice(
                gone, "evicted",
                f"more than {self.max_open_sessions} sessions open at once "
                f"(--max-open-sessions): the decoding state of session {gone}, idle the "
                "longest, is dropped; if it goes on, it is decoded afresh", record.t_ns)
        evicted = self._evicted.pop(session, None)
        known = None if evicted is None else evicted[1]
        # a DMA layout known before is kept (and known): the VERSION is not seen again
        state = self._sessions[session] = _Session(self._dialects if known is None else known)
        self._peak = max(self._peak, len(self._sessions))
        if evicted is not None:
            counts, _, announced = evicted
            state.state.counts.update(counts)
            state.announced = announced
            yield SessionNotice(
                session, "resumed",
                f"session {session} goes on after its decoding state was dropped: replies "
                "to its earlier commands are unpaired, its negotiated limits are the "
                "defaults (its DMA layout is kept)", record.t_ns)

    def _decode(
        self, record: MessageRecord, attached: list[EventRecord]
    ) -> Iterator[DecodedItem]:
        """The decoded message, then the events written with it."""
        yield from self._state(record)
        injection = interposition = None
        for event in attached:
            if event.kind == "inject":
                injection = event
            else:
                interposition = event
        yield from _decode(self._sessions[record.session], record, injection, interposition,
                           self._dialects)
        yield from attached


def decoded_records(
    records: Iterable[Record | Paused],
    *,
    dialects: Dialects | None = None,
    session: int | None = None,
    max_open_sessions: int = MAX_OPEN_SESSIONS,
) -> DecodedRecords:
    """Decode ``records`` (from a :class:`~recorder.reader.TraceReader`).

    ``dialects`` overrides the DMA layouts that are otherwise detected per
    session; ``session`` keeps only that session's records. A message is
    decoded with the ``inject`` event recorded right after it: violations of
    a message an injected action rewrote, and of the answer to it, are
    attributed to the injection (:attr:`Violation.caused_by`). At most
    ``max_open_sessions`` sessions' states are kept (see the module's
    docstring); :meth:`DecodedRecords.statistics` says how many are.
    ``records`` may be :meth:`~recorder.reader.TraceReader.follow`'s: at each
    :data:`~recorder.reader.PAUSED` the message held back to see the
    events after it is decoded with those seen so far.
    """
    return DecodedRecords(records, dialects=dialects, session=session,
                          max_open_sessions=max_open_sessions)


def _decode(
    state: _Session,
    record: MessageRecord,
    injection: EventRecord | None,
    interposition: EventRecord | None,
    dialects: Dialects | None,
) -> Iterator[DecodedItem]:
    if record.torn:
        violation = state.state.torn(record.direction, record.data, record.length)
        yield TornMessage(record, violation, f"torn: {record.wire_length} bytes, then EOF")
        return
    obs = state.state.observe(record.direction, record.data, record.fds, length=record.length)
    message = obs.message
    arrived = None
    cause = None
    if injection is not None and "arrived" in injection.data:
        arrived = arrived_bytes(record.data, injection.data["arrived"])
        cause = injection_cause(injection.data.get("applied"))
    if interposition is not None and "arrived" in interposition.data:
        # what the mode made of it is what the injector saw (or the record itself)
        before = arrived_bytes(record.data if arrived is None else arrived,
                               interposition.data["arrived"])
        if before is not None:
            arrived = before
    obs = state.blame.observe(obs, cause)
    latency = state.times.latency(obs, record.t_ns, record.seq)
    text = describe(obs, state.pci)
    yield DecodedMessage(record, obs, text, latency, injection, arrived, state.pci.capabilities,
                         state.times.request_seq, state.state.known_dialects, interposition)
    if (
        not state.announced
        and message.command == Command.VERSION
        and message.is_reply
        and record.direction is Direction.S2C
    ):
        state.announced = True
        yield SessionNegotiated(record.session, state.state, dialects is None)
