"""``vfioproxy trace export --format parquet``: a trace as two typed Parquet tables.

``OUTDIR/messages/NAME.parquet``: one row per decoded message, a column per
display filter field (:data:`~vfioproxy.trace.filter.FIELDS`, the values
:func:`~vfioproxy.trace.filter.values` gives, as ``trace export --format
csv`` writes them) but ``data`` (bytes, left out: a record may hold megabytes)
and with ``fd.kind`` named ``fd_kinds`` (a list of strings), after ``host``
(the trace header's), ``trace`` (the trace's file name) and ``t_ns`` (the
record's monotonic time). ``time`` is a ``timestamp[ns, UTC]``.

``OUTDIR/events/NAME.parquet``: one row per event record (session open and
close, violations, injections, rules, ...): ``host``, ``trace``, ``seq``,
``session``, ``t_ns``, ``time``, ``kind`` and ``data`` (its map as JSON).

Rows are written in batches of :data:`BATCH_ROWS`, so memory stays flat
whatever the trace's length. pyarrow is imported when a table is written:
it comes with the ``vfioproxy[sql]`` extra (:func:`require_pyarrow`).
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Iterable
from types import ModuleType
from typing import Any

import attrs

from recorder.reader import TraceReader
from recorder.records import EventRecord, TraceHeader
from vfioproxy.errors import UsageError
from vfioproxy.trace.decoded import MAX_OPEN_SESSIONS, DecodedItem, DecodedMessage, decoded_records
from vfioproxy.trace.filter import FIELDS, Facts, select_facts, values
from vfioproxy.trace.show import jsonable

__all__ = ["BATCH_ROWS", "EVENT_COLUMNS", "MESSAGE_COLUMNS", "ParquetCounts", "export_trace",
           "import_module", "output_paths", "require_pyarrow", "write_parquet"]

#: rows held before a batch is written
BATCH_ROWS = 10_000

#: filter fields a ``messages`` row leaves out, and the ones it renames
_LEFT_OUT = frozenset({"data"})
_RENAMED = {"fd.kind": "fd_kinds"}

#: the ``messages`` columns, in order
MESSAGE_COLUMNS: tuple[str, ...] = (
    "host", "trace", "t_ns",
    *(_RENAMED.get(spec.name, spec.name) for spec in FIELDS if spec.name not in _LEFT_OUT))

#: the ``events`` columns, in order
EVENT_COLUMNS: tuple[str, ...] = ("host", "trace", "seq", "session", "t_ns", "time", "kind",
                                  "data")

#: the Arrow type of each field, by field kind (``name`` fields are written as
#: their names, as csv does); a few fields by name
_KIND_TYPES = {"int": "int64", "number": "float64", "name": "string", "text": "string",
               "bool": "bool_", "time": "time"}
_FIELD_TYPES = {"offset": "uint64", "count": "uint64", "fd.kind": "list"}

#: the function that imports a module: tests replace it to see the error a
#: missing extra gives
import_module = importlib.import_module


def require_pyarrow() -> tuple[ModuleType, ModuleType]:
    """``pyarrow`` and ``pyarrow.parquet``; a :class:`UsageError` naming the
    extra to install when they are missing."""
    try:
        return import_module("pyarrow"), import_module("pyarrow.parquet")
    except ImportError as exc:
        raise UsageError(f"Parquet needs pyarrow ({exc}): pip install 'vfioproxy[sql]'") from exc


def output_paths(outdir: str, trace_name: str) -> dict[str, str]:
    """The files :func:`write_parquet` writes, by table: ``OUTDIR/TABLE/NAME.parquet``
    (``NAME``: ``trace_name`` without its ``.trace``)."""
    stem = trace_name[:-len(".trace")] if trace_name.endswith(".trace") else trace_name
    return {table: os.path.join(outdir, table, f"{stem}.parquet")
            for table in ("messages", "events")}


def _arrow_type(pa: ModuleType, name: str) -> Any:
    if name == "string":
        return pa.string()
    if name == "time":
        return pa.timestamp("ns", tz="UTC")
    if name == "list":
        return pa.list_(pa.string())
    return getattr(pa, name)()


def _message_schema(pa: ModuleType) -> Any:
    columns = [pa.field("host", pa.string()), pa.field("trace", pa.string()),
               pa.field("t_ns", pa.int64())]
    for spec in FIELDS:
        if spec.name in _LEFT_OUT:
            continue
        kind = _FIELD_TYPES.get(spec.name, _KIND_TYPES[spec.kind])
        columns.append(pa.field(_RENAMED.get(spec.name, spec.name), _arrow_type(pa, kind)))
    return pa.schema(columns)


def _event_schema(pa: ModuleType) -> Any:
    return pa.schema([
        pa.field("host", pa.string()), pa.field("trace", pa.string()),
        pa.field("seq", pa.int64()), pa.field("session", pa.int64()),
        pa.field("t_ns", pa.int64()), pa.field("time", pa.timestamp("ns", tz="UTC")),
        pa.field("kind", pa.string()), pa.field("data", pa.string()),
    ])


@attrs.frozen
class ParquetCounts:
    """The rows :func:`write_parquet` wrote, and where."""

    messages: int
    events: int
    messages_path: str
    events_path: str


class _Table:
    """One Parquet file written a batch of rows at a time."""

    def __init__(self, pq: ModuleType, pa: ModuleType, path: str, schema: Any) -> None:
        self.pa = pa
        self.schema = schema
        self.writer = pq.ParquetWriter(path, schema)
        self.columns: dict[str, list[Any]] = {name: [] for name in schema.names}
        self.rows = 0
        self.pending = 0

    def add(self, row: dict[str, Any]) -> None:
        for name, column in self.columns.items():
            column.append(row[name])
        self.pending += 1
        if self.pending >= BATCH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            batch = self.pa.RecordBatch.from_pydict(self.columns, schema=self.schema)
            self.writer.write_batch(batch)
            self.rows += self.pending
            self.pending = 0
            for column in self.columns.values():
                column.clear()

    def close(self) -> None:
        self.flush()
        self.writer.close()


def write_parquet(selected: Iterable[tuple[DecodedItem, Facts | None]], header: TraceHeader,
                  trace_name: str, outdir: str) -> ParquetCounts:
    """Write ``OUTDIR/messages/NAME.parquet`` and ``OUTDIR/events/NAME.parquet``
    (``NAME``: ``trace_name`` without its ``.trace``) from ``selected``: a
    row per decoded message, a row per event record. Creates the two
    directories; replaces files of those names. On an error or cancellation
    the files written so far are closed (each a valid Parquet file of the
    batches written) and the error propagates. A :class:`UsageError` when
    pyarrow is missing."""
    pa, pq = require_pyarrow()
    host = header.host
    paths = output_paths(outdir, trace_name)
    for path in paths.values():
        os.makedirs(os.path.dirname(path), exist_ok=True)
    messages = _Table(pq, pa, paths["messages"], _message_schema(pa))
    try:
        events = _Table(pq, pa, paths["events"], _event_schema(pa))
        try:
            for item, facts in selected:
                if isinstance(item, DecodedMessage) and facts is not None:
                    row = values(facts, raw_bytes=True)  # data: left out, not hexed
                    for name, new in _RENAMED.items():
                        row[new] = row.pop(name)
                    row["time"] = None if facts.wall is None else facts.wall(facts.t_ns)
                    row.update(host=host, trace=trace_name, t_ns=facts.t_ns)
                    messages.add(row)
                elif isinstance(item, EventRecord):
                    events.add({"host": host, "trace": trace_name, "seq": item.seq,
                                "session": item.session, "t_ns": item.t_ns,
                                "time": header.wall_time(item.t_ns), "kind": item.kind,
                                "data": json.dumps(jsonable(item.data), sort_keys=True)})
        finally:
            events.close()
    finally:
        messages.close()
    return ParquetCounts(messages.rows, events.rows, paths["messages"], paths["events"])


def export_trace(reader: TraceReader, outdir: str, *,
                 max_open_sessions: int = MAX_OPEN_SESSIONS,
                 steps: bool = False) -> ParquetCounts:
    """Every message and event of ``reader`` to ``outdir`` (:func:`write_parquet`),
    decoded as ``trace export`` decodes it by default; ``steps``: with each
    message's realize step label (``--steps``)."""
    items = decoded_records(reader, max_open_sessions=max_open_sessions)
    selected = select_facts(items, None, None, reader.header, steps=steps)
    return write_parquet(selected, reader.header, os.path.basename(reader.path), outdir)

