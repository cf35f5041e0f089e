"""A trace's client sessions as timelines: labelled messages and per-step times.

:func:`session_timelines` reads a trace once, labels each session's messages
(:func:`~vfioproxy.trace.timeline.labels.label_messages`) and sums them per
step (:func:`step_times`). What the shares mean:

* ``server_ns``: the time a request of the step was outstanding at the server
  (from a client command to its reply; overlapping requests of a DMA burst
  count once);
* ``client_ns``: the time the client took between a reply and its next
  command, counted only when both belong to the step and nothing else was
  sent in between (the gaps between separate runs of a step belong to
  neither share).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Sequence

from recorder.reader import TraceReader
from recorder.records import EventKind, EventRecord
from vfioproxy.protocol.bodies import RegionAccessBody
from vfioproxy.protocol.codec import Dialects
from vfioproxy.protocol.header import Command
from vfioproxy.protocol.pci import Region
from vfioproxy.side import Direction
from vfioproxy.trace.decoded import (
    MAX_OPEN_SESSIONS,
    DecodedMessage,
    TornMessage,
    decoded_records,
)
from vfioproxy.trace.timeline.labels import label_messages
from vfioproxy.trace.timeline.model import (
    STEP_ORDER,
    UNLABELLED,
    Label,
    LabelledMessage,
    SessionTimeline,
    StepTimes,
)
from vfioproxy.trace.timeline.steps import STEP_INFO

__all__ = ["reader_timelines", "session_timeline", "session_timelines", "step_times"]


def _labelled(item: DecodedMessage, label: Label) -> LabelledMessage:
    record = item.record
    message = item.observation.message
    info = STEP_INFO.get(label.substep or label.step)
    return LabelledMessage(
        seq=record.seq, t_ns=record.t_ns, direction=record.direction, msg_id=message.msg_id,
        command=message.command, is_reply=message.is_reply, size=record.wire_length,
        label=label, summary=item.text, function=info.function if info else "",
    )


def _rom_bytes(item: DecodedMessage) -> int:
    """Bytes of ROM a REGION_READ reply on region 6 carried (0 for anything else)."""
    message = item.observation.message
    body = message.body
    if (message.is_reply and message.command == Command.REGION_READ
            and isinstance(body, RegionAccessBody) and body.region == Region.ROM):
        return len(body.data)
    return 0


class _Shares:
    """The server's and the client's share of one step, fed its messages in order.

    Each share counts only time not counted yet (``covered``): record times of
    the two directions need not be in order, and a span is never counted twice,
    so the two shares never add up to more than the step's duration."""

    def __init__(self) -> None:
        self.server_ns = 0
        self.client_ns = 0
        self.outstanding = 0
        self.busy_since = 0
        self.done_at: int | None = None
        self.covered: int | None = None

    def _span(self, start: int, end: int) -> int:
        if self.covered is not None:
            start = max(start, self.covered)
        self.covered = end if self.covered is None else max(self.covered, end)
        return max(0, end - start)

    def command(self, t_ns: int, *, follows_step: bool, posted: bool) -> None:
        if self.outstanding == 0 and self.done_at is not None and follows_step:
            self.client_ns += self._span(self.done_at, t_ns)
        self.done_at = None
        if posted:
            if self.outstanding == 0:
                self.done_at = t_ns
            return
        if self.outstanding == 0:
            self.busy_since = t_ns
        self.outstanding += 1

    def reply(self, t_ns: int) -> None:
        if self.outstanding == 0:
            return
        self.outstanding -= 1
        if self.outstanding == 0:
            self.server_ns += self._span(self.busy_since, t_ns)
            self.done_at = t_ns


def step_times(
    labelled: Sequence[tuple[DecodedMessage, Label]],
) -> tuple[StepTimes, ...]:
    """One :class:`StepTimes` per step present in ``labelled`` (one session, in
    trace order), in :data:`STEP_ORDER`; a guest reset's messages count under
    ``guest-reset``."""
    members: dict[str, list[DecodedMessage]] = defaultdict(list)
    uncertain: dict[str, int] = defaultdict(int)
    shares: dict[str, _Shares] = defaultdict(_Shares)
    previous_command: str | None = None
    for item, label in labelled:
        step = label.step
        members[step].append(item)
        uncertain[step] += not label.certain
        message = item.observation.message
        if item.record.direction is not Direction.C2S:
            if message.is_reply:
                shares[step].reply(item.record.t_ns)
            continue
        if message.is_reply:
            continue
        shares[step].command(item.record.t_ns, follows_step=previous_command == step,
                             posted=message.header.no_reply)
        previous_command = step
    result = []
    for step in STEP_ORDER:
        items = members.get(step)
        if not items:
            continue
        times = [item.record.t_ns for item in items]
        rom = sum(_rom_bytes(item) for item in items) if step == "rom-load" else None
        result.append(StepTimes(
            step=step, messages=len(items), first_ns=min(times), last_ns=max(times),
            server_ns=shares[step].server_ns, client_ns=shares[step].client_ns,
            bytes=sum(item.record.wire_length for item in items), rom_bytes=rom,
            uncertain=uncertain[step],
        ))
    return tuple(result)


def session_timeline(
    trace: str, session: int, items: Iterable[DecodedMessage], *, cut_short: bool = False
) -> SessionTimeline:
    """The timeline of one session's decoded messages (in trace order)."""
    labelled = label_messages(items)
    messages = tuple(_labelled(item, label) for item, label in labelled)
    return SessionTimeline(
        trace=trace, session=session, messages=messages, steps=step_times(labelled),
        unlabelled=sum(m.label.step == UNLABELLED for m in messages), cut_short=cut_short,
    )


def session_timelines(
    path: str | os.PathLike[str], *, dialects: Dialects | None = None
) -> list[SessionTimeline]:
    """Every client session of the trace at ``path`` (those with messages), in
    session order, each labelled and with its per-step times. A session the
    trace ends inside (no ``session_close`` event, or a torn last message) is
    labelled up to where it ends and marked ``cut_short``."""
    with TraceReader(path) as reader:
        return reader_timelines(reader, dialects=dialects)


def reader_timelines(
    reader: TraceReader,
    *,
    dialects: Dialects | None = None,
    max_open_sessions: int = MAX_OPEN_SESSIONS,
) -> list[SessionTimeline]:
    """:func:`session_timelines` of an open trace (read once, from its start);
    afterwards ``reader.truncation`` says whether its last record was torn.
    ``max_open_sessions``: see :func:`~vfioproxy.trace.decoded.decoded_records`
    (the timelines themselves hold every message of every session)."""
    sessions: dict[int, list[DecodedMessage]] = defaultdict(list)
    closed: set[int] = set()
    torn: set[int] = set()
    for item in decoded_records(reader, dialects=dialects, max_open_sessions=max_open_sessions):
        if isinstance(item, DecodedMessage):
            sessions[item.record.session].append(item)
        elif isinstance(item, TornMessage):
            torn.add(item.record.session)
        elif (isinstance(item, EventRecord) and item.kind == EventKind.SESSION_CLOSE
              and item.session is not None):
            closed.add(item.session)
    return [
        session_timeline(reader.path, session, items,
                         cut_short=session in torn or session not in closed)
        for session, items in sorted(sessions.items())
    ]
