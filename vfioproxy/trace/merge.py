"""``vfioproxy trace merge``: several traces (hosts, runs) as one.

:func:`merge_traces` streams its inputs through one k-way merge
(:func:`heapq.merge`) ordered by each record's wall-clock time, ``created +
(t - mono_ns)`` of its own header, ties broken by (host, session, seq) as
FORMAT.md §3 says, then by input; each input keeps its own file order. The
output is on one clock: its header's ``created`` and ``mono_ns`` are those
of the input whose clock started earliest (``created - mono_ns``), and every
``t`` is moved onto it, so a record's wall-clock time is the same in the
output as in its input. Records are renumbered ``1, 2, ...``; sessions are
renumbered ``1, 2, ...`` in the order they start (their first record). The
header's ``info.merged_from`` says, per input, its path, SHA-256, host,
source, creation time, version and ``info``; a ``merged_from`` event right
before each session's first record names the input (its index there) and
the session's number in it, so a session keeps its host and source however
many sessions there are.

Events that name a message (``a.seq``) or a session (``a.twin_of``) are
renumbered with it. Such a reference is followed for the last
:data:`SEQ_WINDOW` messages of each input (they name recent messages); an
older one loses ``seq`` and keeps the original number in ``source_seq``.
Memory does not grow with the inputs' length: a first pass finds where each
session starts, the second merges record by record (a few integers a
session are kept: the renumbering).
"""

from __future__ import annotations

import heapq
import os
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import attrs

from recorder.reader import TraceReader
from recorder.records import EventKind, EventRecord, MessageRecord, Record, TraceHeader
from vfioproxy.errors import UsageError
from vfioproxy.trace.provenance import (
    output_trace,
    refuse_as_output,
    require_copyable,
    source_entry,
)

__all__ = ["SEQ_WINDOW", "MergeResult", "merge_traces"]

#: how many recent messages of each input an event's ``a.seq`` is looked up in
SEQ_WINDOW = 1 << 14

_SOURCE = "vfioproxy trace merge"


@attrs.frozen
class MergeResult:
    """What :func:`merge_traces` wrote: records, messages, and per input the
    new number of each of its sessions."""

    records: int
    messages: int
    sessions: tuple[dict[int, int], ...]


class _Input:
    """One input: its clock offset (wall ns minus ``t``), and its sessions'
    starts in wall-clock ns (the first pass)."""

    def __init__(self, index: int, reader: TraceReader) -> None:
        self.index = index
        self.reader = reader
        header = reader.header
        self.host = header.host or ""
        self.offset = header.wall_ns(0)
        self.starts: dict[int, int] = {}
        for record in reader:
            if record.session is not None and record.session not in self.starts:
                self.starts[record.session] = record.t_ns + self.offset
        self.sessions: dict[int, int] = {}
        self._seqs: dict[int, int] = {}
        self._order: deque[int] = deque()

    def keyed(self) -> Iterator[tuple[tuple[int, str, int, int, int], Record]]:
        """The records in file order, each with its place in the merge."""
        for record in self.reader:
            session = -1 if record.session is None else record.session
            yield (record.t_ns + self.offset, self.host, session, record.seq, self.index), record

    def remember(self, old: int, new: int) -> None:
        """Message ``old`` of this input is ``new`` in the output."""
        self._seqs[old] = new
        self._order.append(old)
        if len(self._order) > SEQ_WINDOW:
            del self._seqs[self._order.popleft()]

    def new_seq(self, old: int) -> int | None:
        return self._seqs.get(old)


def _renumbered(source: _Input, record: Record, seq: int, t_ns: int) -> Record:
    """``record`` of ``source`` as record ``seq`` of the output, at ``t_ns``."""
    if isinstance(record, MessageRecord):
        source.remember(record.seq, seq)
        return attrs.evolve(record, seq=seq, session=source.sessions[record.session], t_ns=t_ns)
    session = None if record.session is None else source.sessions[record.session]
    data = record.data
    about, twin = data.get("seq"), data.get("twin_of")
    if type(about) is int or (type(twin) is int and twin in source.sessions):
        data = dict(data)
        if type(about) is int:
            new = source.new_seq(about)
            if new is None:
                del data["seq"]
                data["source_seq"] = about
            else:
                data["seq"] = new
        if type(twin) is int and twin in source.sessions:
            data["twin_of"] = source.sessions[twin]
    return EventRecord(seq, session, t_ns, record.kind, data)


def _header(inputs: Sequence[_Input], entries: list[dict[str, Any]]) -> TraceHeader:
    clock = min(inputs, key=lambda i: (i.offset, i.index)).reader.header
    hosts = {i.reader.header.host for i in inputs}
    orders = [i.reader.header.byte_order for i in inputs]
    return TraceHeader(
        created=clock.created,
        mono_ns=clock.mono_ns,
        source=_SOURCE,
        host=hosts.pop() if len(hosts) == 1 else None,
        byte_order=max(set(orders), key=orders.count),
        info={"merged_from": entries},
    )


def merge_traces(
    readers: Sequence[TraceReader],
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> MergeResult:
    """Merge the traces ``readers`` read into ``out`` (see the module docstring).

    Raises :class:`~vfioproxy.errors.UsageError` when there are fewer than
    two inputs, when ``out`` is one of them, or when an input's format
    version cannot be written as this vfioproxy's; the readers' errors for a
    damaged input. ``out`` then stays as it was: nothing is written to it
    until the merge is complete. A torn tail of an input ends that input
    there (its ``reader.truncation`` says so).
    """
    if len(readers) < 2:
        raise UsageError("merging needs at least two traces")
    for reader in readers:
        refuse_as_output(out, reader)
        require_copyable(reader)
    inputs = [_Input(index, reader) for index, reader in enumerate(readers)]
    starts = sorted((start, source.host, session, source.index)
                    for source in inputs for session, start in source.starts.items())
    for new, (_, _, session, index) in enumerate(starts, start=1):
        inputs[index].sessions[session] = new
    entries = []
    for source in inputs:
        header = source.reader.header
        entries.append({
            **source_entry(source.reader),
            "host": header.host,
            "source": header.source,
            "created": header.created.isoformat(),
            "version": list(source.reader.file_version),
            "info": header.info,
        })
    header = _header(inputs, entries)
    zero = header.wall_ns(0)
    records = messages = 0
    merged = heapq.merge(*(source.keyed() for source in inputs), key=lambda pair: pair[0])
    announced: set[int] = set()
    with output_trace(out, header, overwrite=overwrite) as writer:
        for (wall, *_, index), record in merged:
            source = inputs[index]
            if record.session is not None and source.sessions[record.session] not in announced:
                new = source.sessions[record.session]
                announced.add(new)
                records += 1
                writer.copy_record(EventRecord(records, new, wall - zero, EventKind.MERGED_FROM,
                                               {"input": index, "session": record.session}))
            records += 1
            writer.copy_record(_renumbered(source, record, records, wall - zero))
            messages += isinstance(record, MessageRecord)
    return MergeResult(records, messages, tuple(source.sessions for source in inputs))
