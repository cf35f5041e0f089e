"""``vfioproxy trace slice``: a part of a trace, as a trace that still replays.

:func:`slice_trace` reads a trace twice, record by record. The first pass
decides which messages stay, reading each message's header (and, for
``-Y``, decoding the trace: :func:`~vfioproxy.trace.decoded.decoded_records`):
those the selection (:class:`SliceSpec`: ``-Y``, ``--seq``, ``--time``,
``--session``) passes; with ``pair`` the reply of a
kept command and the command of a kept reply, paired by
:class:`~vfioproxy.protocol.pairing.Outstanding` as the session state pairs
them; with ``setup`` the VERSION exchange and the DMA_MAP/DMA_UNMAP
exchanges that came before a kept session's first selected message, so a
replay of the slice negotiates and maps guest memory as the recording did.
The second pass copies what stays, with the original sequence numbers
(FORMAT.md §7 lets a derived trace have gaps, so ``#58`` names the same
message in the slice as in its source), and the events that belong to it:
those written with a kept message, those naming a kept message by ``seq``,
the opens and closes of kept sessions, and, without ``-Y``, the other events
the ranges and the session pass.

What is kept is held as runs of sequence numbers, so memory grows with the
number of separate runs a selection makes (one for a range), not with the
trace.
"""

from __future__ import annotations

import os
from array import array
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import attrs

from recorder.reader import TraceReader
from recorder.records import (
    FORMAT_VERSION,
    TOOL_VERSION,
    EventKind,
    EventRecord,
    MessageRecord,
    Record,
)
from vfioproxy.protocol.codec import Dialects
from vfioproxy.protocol.header import HEADER_SIZE, Command, Header
from vfioproxy.protocol.pairing import MAX_OUTSTANDING, Outstanding
from vfioproxy.side import Direction
from vfioproxy.trace.decoded import (
    MAX_OPEN_SESSIONS,
    DecodedMessage,
    TornMessage,
    decoded_records,
)
from vfioproxy.trace.filter import Filter, marked
from vfioproxy.trace.provenance import (
    output_trace,
    refuse_as_output,
    require_copyable,
    source_entry,
)

__all__ = ["SETUP_COMMANDS", "SliceResult", "SliceSpec", "slice_trace"]

#: the commands ``setup`` keeps before a session's first selected message
SETUP_COMMANDS = frozenset({Command.VERSION, Command.DMA_MAP, Command.DMA_UNMAP})

Range = tuple[float | None, float | None]


def _in(value: float, bounds: Range | None) -> bool:
    if bounds is None:
        return True
    low, high = bounds
    return (low is None or value >= low) and (high is None or value <= high)


@attrs.frozen
class SliceSpec:
    """What a slice keeps. ``seq``: inclusive bounds of sequence numbers;
    ``time``: inclusive bounds in seconds since the trace's first record;
    either bound may be None (open). ``session``: only that session.
    ``filter``: only messages it passes. A message is selected when it
    passes all of those given. ``pair`` and ``setup``: see the module.
    ``max_open_sessions``: the sessions whose pairing and setup are followed
    at once (and decoded, with ``filter``); one more drops the one idle the
    longest, as :func:`~vfioproxy.trace.decoded.decoded_records` does."""

    filter: Filter | None = None
    seq: Range | None = None
    time: Range | None = None
    session: int | None = None
    pair: bool = True
    setup: bool = True
    dialects: Dialects | None = None
    max_open_sessions: int = MAX_OPEN_SESSIONS

    def provenance(self) -> dict[str, Any]:
        """The selection, for the output header's ``info.sliced_from``."""
        return {
            "filter": None if self.filter is None else self.filter.source,
            "seq": None if self.seq is None else list(self.seq),
            "time": None if self.time is None else list(self.time),
            "session": self.session,
            "paired": self.pair,
            "setup": self.setup,
            "seq_kept": True,
        }


@attrs.frozen
class SliceResult:
    """What :func:`slice_trace` wrote: records, messages, the messages kept
    only for pairing or setup (``added``), and the sessions kept."""

    records: int
    messages: int
    added: int
    sessions: tuple[int, ...]


class _Runs:
    """Sequence numbers of kept messages as runs ``[start, end]``: every
    message whose seq lies in a run is kept. Added in increasing order."""

    def __init__(self) -> None:
        self.starts = array("Q")
        self.ends = array("Q")

    def add(self, seq: int, *, extend: bool) -> None:
        """Keep ``seq``; ``extend``: the message before it was kept too."""
        if extend and self.ends:
            self.ends[-1] = seq
        else:
            self.starts.append(seq)
            self.ends.append(seq)

    def __contains__(self, seq: int) -> bool:
        at = bisect_right(self.starts, seq) - 1
        return at >= 0 and seq <= self.ends[at]


class _Kept:
    """The first pass's decisions: which messages, and which sessions, stay."""

    def __init__(self) -> None:
        self.runs = _Runs()
        #: kept messages that came before the decision (commands of kept replies, setup)
        self.added: set[int] = set()
        self.sessions: set[int] = set()

    def __contains__(self, seq: int) -> bool:
        return seq in self.added or seq in self.runs


class _Selector:
    """The first pass (see the module docstring)."""

    def __init__(self, reader: TraceReader, spec: SliceSpec) -> None:
        self.spec = spec
        self.kept = _Kept()
        self.origin: int | None = None
        self._previous_kept = False
        #: commands waiting for their replies, as the session state pairs them: seq by msg_id
        self._waiting: dict[tuple[int, Direction], Outstanding[int]] = {}
        #: setup messages of sessions with nothing selected yet
        self._setup: dict[int, list[int]] = {}
        #: the sessions followed (pairing tables, setup), the one idle the longest first
        self._open: OrderedDict[int, None] = OrderedDict()
        if spec.filter is None:  # the headers are enough
            for record in reader:
                if isinstance(record, EventRecord):
                    self._event(record)
                else:
                    whole = not record.torn and len(record.data) >= HEADER_SIZE
                    self._message(record, True, Header.parse(record.data) if whole else None)
            return
        items = decoded_records(reader, dialects=spec.dialects,
                                max_open_sessions=spec.max_open_sessions)
        for item, _, passed in marked(items, spec.filter, reader.header):
            if isinstance(item, EventRecord):
                self._event(item)
            elif isinstance(item, DecodedMessage):
                self._message(item.record, passed, item.observation.message.header)
            elif isinstance(item, TornMessage):
                self._message(item.record, False, None)

    def _event(self, event: EventRecord) -> None:
        if self.origin is None:
            self.origin = event.t_ns
        if event.kind == EventKind.SESSION_CLOSE and event.session is not None:
            self._forget(event.session)
            self._open.pop(event.session, None)

    def _follow(self, session: int) -> None:
        """``session`` sent a message: it is the one idle the shortest; past
        ``max_open_sessions`` the one idle the longest is forgotten (a reply
        to a command it sent before then is not paired)."""
        self._open[session] = None
        self._open.move_to_end(session)
        if len(self._open) > self.spec.max_open_sessions:
            gone, _ = self._open.popitem(last=False)
            self._forget(gone)

    def _forget(self, session: int) -> None:
        self._setup.pop(session, None)
        for direction in Direction:
            self._waiting.pop((session, direction), None)

    def selected(self, record: Record) -> bool:
        """Whether ``record`` lies in ``--seq``, ``--time`` and ``--session``."""
        assert self.origin is not None
        spec = self.spec
        return (
            _in(record.seq, spec.seq)
            and _in((record.t_ns - self.origin) / 1e9, spec.time)
            and spec.session in (None, record.session)
        )

    def _message(self, record: MessageRecord, passed: bool, header: Header | None) -> None:
        """Decide on ``record``: ``passed`` the filter; ``header`` (None: torn, or
        too short to have one) pairs it."""
        if self.origin is None:
            self.origin = record.t_ns
        session, seq = record.session, record.seq
        self._follow(session)
        keep = passed and self.selected(record)
        if self.spec.pair and header is not None:
            keep = self._pair(record, header, keep)
        if (
            not keep
            and self.spec.setup
            and header is not None
            and session not in self.kept.sessions
            and header.command in SETUP_COMMANDS
            and self.spec.session in (None, session)
        ):
            self._setup.setdefault(session, []).append(seq)
        if keep:
            if session not in self.kept.sessions:
                self.kept.sessions.add(session)
                self.kept.added.update(self._setup.pop(session, ()))
            self.kept.runs.add(seq, extend=self._previous_kept)
        self._previous_kept = keep

    def _pair(self, record: MessageRecord, header: Header, keep: bool) -> bool:
        """Mirror the session state's pairing table; returns whether ``record``
        stays once its pair is taken into account."""
        if header.is_command and not header.no_reply:
            self._table(record.session, record.direction).add(header.msg_id, record.seq)
        elif header.is_reply:
            command = self._table(record.session, record.direction.reverse).take(header.msg_id)
            if command is not None:
                if keep and command not in self.kept:
                    self._add_before(record.session, command)
                elif not keep and command in self.kept:
                    return True
        return keep

    def _add_before(self, session: int, seq: int) -> None:
        """Keep the earlier message ``seq`` (a kept reply's command)."""
        pending = self._setup.get(session)
        if pending is not None and seq in pending:
            return  # kept with the rest of the setup, when the session is
        self.kept.added.add(seq)

    def _table(self, session: int, direction: Direction) -> Outstanding[int]:
        table = self._waiting.get((session, direction))
        if table is None:
            table = self._waiting[(session, direction)] = Outstanding(MAX_OUTSTANDING)
        return table


def _copied(reader: TraceReader, chosen: _Selector) -> Iterator[Record]:
    """The second pass: the kept messages and their events, in file order."""
    kept, spec = chosen.kept, chosen.spec
    # the last message and whether it stays: events written with it follow it
    # directly, in its session and at its time
    last: MessageRecord | None = None
    last_kept = False
    for record in reader:
        if isinstance(record, MessageRecord):
            last, last_kept = record, record.seq in kept
            if last_kept:
                yield record
            continue
        attached = (last is not None and record.session == last.session
                    and record.t_ns == last.t_ns)
        if not attached:
            last = None
        about = record.data.get("seq")
        if type(about) is int:
            keep = about in kept
        elif record.kind in (EventKind.SESSION_OPEN, EventKind.SESSION_CLOSE):
            keep = record.session in kept.sessions
        elif attached:
            keep = last_kept
        else:
            keep = (
                spec.filter is None
                and chosen.selected(record)
                and (record.session in kept.sessions
                     if record.session is not None else spec.session is None)
            )
        if keep:
            yield record


def slice_trace(
    reader: TraceReader,
    out: str | os.PathLike[str],
    spec: SliceSpec,
    *,
    overwrite: bool = False,
) -> SliceResult:
    """Write the part of the trace ``reader`` reads that ``spec`` selects to
    ``out`` (see the module docstring), with the source's header, whose
    ``info.sliced_from`` names the source file, its SHA-256 and the selection.

    Raises :class:`~vfioproxy.errors.UsageError` when ``out`` is the source
    or the source's format version cannot be copied, and the reader's errors
    for a damaged source; ``out`` then stays as it was (nothing is written
    to it until the slice is complete). A torn tail of the source ends the
    slice there (``reader.truncation`` says so).
    """
    refuse_as_output(out, reader)
    require_copyable(reader)
    chosen = _Selector(reader, spec)
    source = reader.header
    info = dict(source.info)
    info["sliced_from"] = {**source_entry(reader), **spec.provenance()}
    header = attrs.evolve(source, info=info, tool="vfioproxy", tool_version=TOOL_VERSION,
                          version=FORMAT_VERSION)
    records = messages = 0
    with output_trace(out, header, overwrite=overwrite) as writer:
        for record in _copied(reader, chosen):
            writer.copy_record(record)
            records += 1
            messages += isinstance(record, MessageRecord)
    return SliceResult(records, messages, len(chosen.kept.added),
                       tuple(sorted(chosen.kept.sessions)))
