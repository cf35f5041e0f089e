"""A trace read back with every message decoded, paired and described.

:func:`decoded_records` walks a trace once, keeps one
:class:`~vfioproxy.protocol.session.SessionState` and one
:class:`~vfioproxy.protocol.pci_view.PciView` per session, and yields each record with
what the tools need: the decoded message, the command a reply answers, the
request-to-reply latency, protocol violations, and a PCI-aware description.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import attrs

from recorder.records import EventKind, EventRecord, MessageRecord, Record, arrived_bytes
from vfioproxy.protocol.codec import Dialects
from vfioproxy.protocol.header import Command
from vfioproxy.protocol.listing import RequestTimes
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
    ``arrived`` the message as it arrived when an injected action rewrote it
    (the record holds what the receiver got)."""

    record: MessageRecord
    observation: Observation
    text: str
    latency_ns: int | None = None
    injection: EventRecord | None = None
    arrived: bytes | None = None


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


DecodedItem = DecodedMessage | TornMessage | EventRecord | SessionNegotiated


class _Session:
    def __init__(self, dialects: Dialects | None) -> None:
        self.state = SessionState(dialects=dialects)
        self.pci = PciView()
        self.times = RequestTimes()
        self.blame = InjectionBlame()
        self.announced = False


def _injection_of(record: MessageRecord, event: Record | None) -> EventRecord | None:
    """``event`` when it is the ``inject`` event written with message ``record``."""
    if (
        isinstance(event, EventRecord)
        and event.kind == "inject"
        and event.session == record.session
        and event.data.get("direction") == record.direction.value
    ):
        return event
    return None


def decoded_records(
    records: Iterable[Record],
    *,
    dialects: Dialects | None = None,
    session: int | None = None,
) -> Iterator[DecodedItem]:
    """Decode ``records`` (from a :class:`~recorder.reader.TraceReader`).

    ``dialects`` overrides the DMA layouts that are otherwise detected per
    session; ``session`` keeps only that session's records. A message is
    decoded with the ``inject`` event recorded right after it: violations of
    a message an injected action rewrote, and of the answer to it, are
    attributed to the injection (:attr:`Violation.caused_by`). A session's
    state is dropped at its ``session_close`` event, so memory grows with the
    sessions open at once, not with the trace.
    """
    sessions: dict[int, _Session] = {}
    pending: MessageRecord | None = None
    for record in records:
        if session is not None and record.session != session:
            continue
        if pending is not None:
            injection = _injection_of(pending, record)
            yield from _decode(sessions, pending, injection, dialects)
            pending = None
            if injection is not None:
                yield injection
                continue
        if isinstance(record, EventRecord):
            if record.kind == EventKind.SESSION_CLOSE and record.session is not None:
                sessions.pop(record.session, None)  # nothing of a session follows its close
            yield record
        elif record.torn:
            yield from _decode(sessions, record, None, dialects)
        else:
            pending = record
    if pending is not None:
        yield from _decode(sessions, pending, None, dialects)


def _decode(
    sessions: dict[int, _Session],
    record: MessageRecord,
    injection: EventRecord | None,
    dialects: Dialects | None,
) -> Iterator[DecodedItem]:
    state = sessions.get(record.session)
    if state is None:
        state = sessions[record.session] = _Session(dialects)
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
    obs = state.blame.observe(obs, cause)
    latency = state.times.latency(obs, record.t_ns)
    yield DecodedMessage(record, obs, describe(obs, state.pci), latency, injection, arrived)
    if (
        not state.announced
        and message.command == Command.VERSION
        and message.is_reply
        and record.direction is Direction.S2C
    ):
        state.announced = True
        yield SessionNegotiated(record.session, state.state, dialects is None)
