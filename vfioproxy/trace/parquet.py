"""``vfioproxy trace export --format parquet``: a trace as two typed Parquet tables.

``OUTDIR/messages/NAME.parquet``: one row per decoded message, a column per
display filter field (:data:`~vfioproxy.trace.filter.FIELDS`, the values
:func:`~vfioproxy.trace.filter.values` gives, as ``trace export --format
csv`` writes them) but ``data`` (bytes, left out: a record may hold megabytes)
and with ``fd.kind`` named ``fd_kinds`` (a list of strings), after ``host``
(the trace header's), ``trace`` (the trace's file name) and ``t_ns`` (the
record's monotonic time). ``time`` is a ``timestamp[us, UTC]`` (the
wall clock a trace header anchors is in microseconds; Spark reads no
nanosecond timestamps).

``OUTDIR/events/NAME.parquet``: one row per event record (session open and
close, violations, injections, rules, ...): ``host``, ``trace``, ``seq``,
``session``, ``t_ns``, ``time``, ``kind`` and ``data`` (its map as JSON).

``partition_by`` (``--partition-by``: ``host``, ``date`` or both, in that
order) writes Hive-partitioned tables instead, as Spark, pyarrow and DuckDB
read them: ``OUTDIR/TABLE/host=H/date=YYYY-MM-DD/NAME.parquet``, ``H`` the
header's host escaped as Hive and Spark escape a partition value
(:func:`partition_value`), ``date`` each row's UTC date (a trace that spans
midnight writes a file per day); a partition column is then left out of the
files (the path holds it).

Rows are written in batches of :data:`BATCH_ROWS`, one writer per partition
in use, so memory stays flat whatever the trace's length. pyarrow is
imported when a table is written: it comes with the ``vfioproxy[sql]``
extra (:func:`require_pyarrow`).
"""

from __future__ import annotations

import contextlib
import glob
import importlib
import json
import os
from collections.abc import Iterable, Sequence
from datetime import date, datetime
from types import ModuleType
from typing import Any

import attrs

from recorder.reader import TraceReader
from recorder.records import EventRecord, TraceHeader
from vfioproxy.errors import UsageError
from vfioproxy.trace.decoded import MAX_OPEN_SESSIONS, DecodedItem, DecodedMessage, decoded_records
from vfioproxy.trace.filter import FIELDS, Facts, select_facts, values
from vfioproxy.trace.show import jsonable

__all__ = ["BATCH_ROWS", "DEFAULT_PARTITION", "EVENT_COLUMNS", "MESSAGE_COLUMNS",
           "PARTITION_KEYS", "TABLES", "ParquetCounts", "existing_outputs", "export_trace",
           "import_module", "output_paths", "partition_value", "require_pyarrow", "schema",
           "write_parquet"]

#: the tables, each a directory of OUTDIR
TABLES = ("messages", "events")

#: the columns a table may be partitioned by, in the order their directories nest
PARTITION_KEYS = ("host", "date")

#: a partition directory's value for a missing (None or empty) value, as Hive
#: and Spark write it (and read it back as NULL, as pyarrow and DuckDB do)
DEFAULT_PARTITION = "__HIVE_DEFAULT_PARTITION__"

#: the characters Hive and Spark escape in a partition value (as %XX;
#: ``ExternalCatalogUtils.escapePathName``)
_ESCAPED = frozenset([chr(c) for c in range(0x20)] + list('"#%\'*/:=?\\\x7f{[]^'))

#: rows held before a batch is written
BATCH_ROWS = 10_000

#: filter fields a ``messages`` row leaves out, and the ones it renames
_LEFT_OUT = frozenset({"data"})
_RENAMED = {"fd.kind": "fd_kinds"}

#: the fields :func:`values` gives a ``messages`` row (``time`` is set apart:
#: a datetime, not its ISO 8601 text)
_ROW_FIELDS = tuple(spec for spec in FIELDS if spec.name not in _LEFT_OUT | {"time"})

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


def _stem(trace_name: str) -> str:
    return trace_name[:-len(".trace")] if trace_name.endswith(".trace") else trace_name


def output_paths(outdir: str, trace_name: str) -> dict[str, str]:
    """The files :func:`write_parquet` writes unpartitioned, by table:
    ``OUTDIR/TABLE/NAME.parquet`` (``NAME``: ``trace_name`` without its ``.trace``)."""
    return {table: os.path.join(outdir, table, f"{_stem(trace_name)}.parquet")
            for table in TABLES}


def partition_value(value: str | None) -> str:
    """``value`` as a partition directory holds it (``KEY=VALUE``), as Hive
    and Spark write it: ``/``, ``=``, ``%``, ``:``, ``?``, ``*``, quotes,
    brackets and control characters as ``%XX`` (upper-case hex of the
    character), the rest as it is; :data:`DEFAULT_PARTITION` for None or
    empty. Spark, pyarrow and DuckDB read it back as ``value``."""
    if not value:
        return DEFAULT_PARTITION
    return "".join(f"%{ord(c):02X}" if c in _ESCAPED else c for c in value)


def _partition_dirs(partition_by: Sequence[str], host: str | None,
                    day: date | None) -> list[str]:
    """The ``KEY=VALUE`` directories of one partition, outermost first."""
    parts = {"host": partition_value(host),
             "date": partition_value(None if day is None else day.isoformat())}
    return [f"{key}={parts[key]}" for key in partition_by]


def existing_outputs(outdir: str, trace_name: str, host: str | None,
                     partition_by: Sequence[str] = ()) -> list[str]:
    """The files of ``outdir`` that exporting the trace ``trace_name`` of
    ``host`` with ``partition_by`` would replace, sorted: its
    ``TABLE/NAME.parquet`` files; partitioned, its ``NAME.parquet`` of every
    date of ``host`` (a new export of the trace may cover other days)."""
    if not partition_by:
        return sorted(p for p in output_paths(outdir, trace_name).values()
                      if os.path.lexists(p))
    found = []
    for table in TABLES:
        parts = [glob.escape(os.path.join(outdir, table))]
        for key in partition_by:
            parts.append(glob.escape(f"host={partition_value(host)}") if key == "host"
                         else "date=*")
        parts.append(glob.escape(f"{_stem(trace_name)}.parquet"))
        found += glob.glob(os.path.join(*parts))
    return sorted(found)


def _arrow_type(pa: ModuleType, name: str) -> Any:
    if name == "string":
        return pa.string()
    if name == "time":
        return pa.timestamp("us", tz="UTC")
    if name == "list":
        return pa.list_(pa.string())
    return getattr(pa, name)()


def schema(pa: ModuleType, table: str, partition_by: Sequence[str] = ()) -> Any:
    """The Arrow schema of ``table`` (``messages`` or ``events``) as its files
    hold it: without the columns of ``partition_by`` (their directories hold them)."""
    whole = _message_schema(pa) if table == "messages" else _event_schema(pa)
    for key in partition_by:
        if key in whole.names:
            whole = whole.remove(whole.get_field_index(key))
    return whole


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
        pa.field("t_ns", pa.int64()), pa.field("time", pa.timestamp("us", tz="UTC")),
        pa.field("kind", pa.string()), pa.field("data", pa.string()),
    ])


@attrs.frozen
class ParquetCounts:
    """The rows :func:`write_parquet` wrote, and the files it wrote, by table
    (sorted; one per partition in use, or the one file unpartitioned)."""

    messages: int
    events: int
    paths: dict[str, tuple[str, ...]]


class _Table:
    """One Parquet file written a batch of rows at a time."""

    def __init__(self, pq: ModuleType, pa: ModuleType, path: str, schema: Any) -> None:
        self.pa = pa
        self.path = path
        self.schema = schema
        self.writer = pq.ParquetWriter(path, schema)
        self.pending: list[dict[str, Any]] = []
        self.rows = 0

    def add(self, row: dict[str, Any]) -> None:
        """Hold ``row`` (its keys not in the schema are left out); a batch when full."""
        self.pending.append(row)
        if len(self.pending) >= BATCH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            batch = self.pa.RecordBatch.from_pylist(self.pending, schema=self.schema)
            self.writer.write_batch(batch)
            self.rows += len(self.pending)
            self.pending = []

    def close(self) -> None:
        self.flush()
        self.writer.close()


class _Partitions:
    """A table's :class:`_Table` per partition, each opened when its first row comes."""

    def __init__(self, pq: ModuleType, pa: ModuleType, outdir: str, table: str,
                 trace_name: str, host: str | None, partition_by: Sequence[str]) -> None:
        self.pq, self.pa = pq, pa
        self.root = os.path.join(outdir, table)
        self.name = f"{_stem(trace_name)}.parquet"
        self.host = host
        self.partition_by = partition_by
        self.by_date = "date" in partition_by
        self.schema = schema(pa, table, partition_by)
        self.tables: dict[date | None, _Table] = {}
        os.makedirs(self.root, exist_ok=True)
        if not partition_by:  # the one file, written even when no row comes
            self._open(None)

    def _open(self, day: date | None) -> _Table:
        directory = os.path.join(self.root, *_partition_dirs(self.partition_by, self.host, day))
        os.makedirs(directory, exist_ok=True)
        table = self.tables[day] = _Table(self.pq, self.pa, os.path.join(directory, self.name),
                                          self.schema)
        return table

    def add(self, row: dict[str, Any], time: datetime | None) -> None:
        day = time.date() if self.by_date and time is not None else None
        table = self.tables.get(day)
        if table is None:
            table = self._open(day)
        table.add(row)

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tables.values())

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(sorted(t.path for t in self.tables.values()))

    def close(self) -> None:
        """Close every file, all of them even when one fails (its error then propagates)."""
        with contextlib.ExitStack() as stack:
            for table in self.tables.values():
                stack.callback(table.close)


def write_parquet(selected: Iterable[tuple[DecodedItem, Facts | None]], header: TraceHeader,
                  trace_name: str, outdir: str,
                  partition_by: Sequence[str] = ()) -> ParquetCounts:
    """Write ``OUTDIR/messages/NAME.parquet`` and ``OUTDIR/events/NAME.parquet``
    (``NAME``: ``trace_name`` without its ``.trace``) from ``selected``: a
    row per decoded message, a row per event record; with ``partition_by``
    (keys of :data:`PARTITION_KEYS`, in that order) a ``NAME.parquet`` in
    each partition directory that gets a row instead (none for a table
    without rows). Creates the directories; replaces files of those names.
    On an error or cancellation the files written so far are closed (each a
    valid Parquet file of the batches written) and the error propagates. A
    :class:`UsageError` when pyarrow is missing."""
    pa, pq = require_pyarrow()
    host = header.host
    messages = _Partitions(pq, pa, outdir, "messages", trace_name, host, partition_by)
    try:
        events = _Partitions(pq, pa, outdir, "events", trace_name, host, partition_by)
        try:
            for item, facts in selected:
                if isinstance(item, DecodedMessage) and facts is not None:
                    row = values(facts, raw_bytes=True, fields=_ROW_FIELDS)
                    for name, new in _RENAMED.items():
                        row[new] = row.pop(name)
                    time = None if facts.wall is None else facts.wall(facts.t_ns)
                    row.update(host=host, trace=trace_name, t_ns=facts.t_ns, time=time)
                    messages.add(row, time)
                elif isinstance(item, EventRecord):
                    time = header.wall_time(item.t_ns)
                    events.add({"host": host, "trace": trace_name, "seq": item.seq,
                                "session": item.session, "t_ns": item.t_ns,
                                "time": time, "kind": item.kind,
                                "data": json.dumps(jsonable(item.data), sort_keys=True)}, time)
        finally:
            events.close()
    finally:
        messages.close()
    return ParquetCounts(messages.rows, events.rows,
                         {"messages": messages.paths, "events": events.paths})


def export_trace(reader: TraceReader, outdir: str, *,
                 max_open_sessions: int = MAX_OPEN_SESSIONS,
                 steps: bool = False) -> ParquetCounts:
    """Every message and event of ``reader`` to ``outdir`` (:func:`write_parquet`),
    decoded as ``trace export`` decodes it by default; ``steps``: with each
    message's realize step label (``--steps``)."""
    items = decoded_records(reader, max_open_sessions=max_open_sessions)
    selected = select_facts(items, None, None, reader.header, steps=steps)
    return write_parquet(selected, reader.header, os.path.basename(reader.path), outdir)

