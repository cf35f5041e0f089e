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

from recorder.records import EventRecord, MessageRecord, Record
from vfioproxy.protocol.codec import Dialects
from vfioproxy.protocol.header import Command
from vfioproxy.protocol.pci_view import PciView, describe
from vfioproxy.protocol.session import Observation, SessionState, Violation
from vfioproxy.side import Direction


@attrs.frozen
class DecodedMessage:
    """A message record with its decoding; ``latency_ns`` is set on replies."""

    record: MessageRecord
    observation: Observation
    text: str
    latency_ns: int | None = None


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
        self.sent_at: dict[int, int] = {}
        self.announced = False


def decoded_records(
    records: Iterable[Record],
    *,
    dialects: Dialects | None = None,
    session: int | None = None,
) -> Iterator[DecodedItem]:
    """Decode ``records`` (from a :class:`~recorder.reader.TraceReader`).

    ``dialects`` overrides the DMA layouts that are otherwise detected per
    session; ``session`` keeps only that session's records.
    """
    sessions: dict[int, _Session] = {}
    for record in records:
        if session is not None and record.session != session:
            continue
        if isinstance(record, EventRecord):
            yield record
            continue
        state = sessions.get(record.session)
        if state is None:
            state = sessions[record.session] = _Session(dialects)
        if record.torn:
            violation = state.state.torn(record.direction, record.data, record.length)
            yield TornMessage(record, violation, f"torn: {record.wire_length} bytes, then EOF")
            continue
        obs = state.state.observe(record.direction, record.data, record.fds,
                                  length=record.length)
        message = obs.message
        latency = None
        if message.header.is_command and not message.header.no_reply:
            state.sent_at[id(message)] = record.t_ns
        elif obs.request is not None:
            sent = state.sent_at.pop(id(obs.request), None)
            latency = None if sent is None else record.t_ns - sent
        yield DecodedMessage(record, obs, describe(obs, state.pci), latency)
        if (
            not state.announced
            and message.command == Command.VERSION
            and message.is_reply
            and record.direction is Direction.S2C
        ):
            state.announced = True
            yield SessionNegotiated(record.session, state.state, dialects is None)
