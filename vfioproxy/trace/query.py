"""``vfioproxy trace query``: SQL over traces, by DuckDB, in process.

The views ``messages`` and ``events`` are the union of the Parquet tables
``trace export --format parquet`` writes (:mod:`vfioproxy.trace.parquet`) of
every source: a directory such an export wrote (``DIR/messages/*.parquet``,
``DIR/events/*.parquet``, or Hive-partitioned, ``DIR/messages/host=H/
date=D/*.parquet``: the partition columns ``host`` and ``date`` read from
the path), or a trace, exported to a temporary directory first (by the
caller). duckdb is imported when a query runs: it comes with
the ``vfioproxy[sql]`` extra.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Sequence
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, TextIO

import attrs

from vfioproxy.errors import UsageError
from vfioproxy.trace import export, parquet

__all__ = ["TABLES", "QueryResult", "cell", "is_export_directory", "layouts", "plain",
           "run_query",
           "write_csv", "write_json"]

#: the views a query sees
TABLES = parquet.TABLES

#: the DuckDB type of each partition column
_PARTITION_TYPES = {"host": "VARCHAR", "date": "DATE"}


@attrs.frozen
class QueryResult:
    """A query's column names and rows (DuckDB's Python values)."""

    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]


def is_export_directory(path: str) -> bool:
    """Whether ``path`` is a directory ``trace export --format parquet`` wrote
    into (it holds ``messages/``)."""
    return os.path.isdir(os.path.join(path, "messages"))


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def layouts(root: str) -> dict[tuple[str, ...], list[str]]:
    """The Parquet files under one table's directory ``root``, as globs by
    partition layout: ``()`` for ``ROOT/*.parquet``, ``("host", "date")``
    for ``ROOT/host=*/date=*/*.parquet``, ... (only layouts that hold a file;
    one directory may hold several)."""
    found: dict[tuple[str, ...], list[str]] = {}

    def visit(directory: str, keys: tuple[str, ...]) -> None:
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.endswith(".parquet") and entry.is_file():
                    found.setdefault(keys, [])
                elif entry.is_dir() and "=" in entry.name:
                    key = entry.name.split("=", 1)[0]
                    if key in parquet.PARTITION_KEYS and key not in keys:
                        visit(entry.path, (*keys, key))

    visit(root, ())
    for keys in found:
        parts = [glob.escape(root), *(f"{key}=*" for key in keys), "*.parquet"]
        found[keys] = [os.path.join(*parts)]
    return found


def _view(table: str, directories: Sequence[str]) -> str | None:
    """The SELECT of the view ``table`` over ``directories``: a ``read_parquet``
    per partition layout, unioned by name, ``host`` first; when some files are
    partitioned by date, the others' ``date`` is their ``time``'s UTC date.
    None when no file."""
    by_layout: dict[tuple[str, ...], list[str]] = {}
    for directory in directories:
        root = os.path.join(directory, table)
        if os.path.isdir(root):
            for keys, globs in layouts(root).items():
                by_layout.setdefault(keys, []).extend(globs)
    if not by_layout:
        return None
    dated = any("date" in keys for keys in by_layout)
    selects = []
    for keys, globs in sorted(by_layout.items()):
        files = ", ".join(_literal(g) for g in globs)
        options = "union_by_name = true"
        if keys:
            types = ", ".join(f"{_literal(k)}: {_literal(_PARTITION_TYPES[k])}" for k in keys)
            options += f", hive_partitioning = true, hive_types = {{{types}}}"
        # files not partitioned by date get theirs from time, as the export computes it
        date = (", CAST(timezone('UTC', time) AS DATE) AS date"
                if dated and "date" not in keys else "")
        selects.append(f"SELECT *{date} FROM read_parquet([{files}], {options})")
    union = " UNION ALL BY NAME ".join(selects)
    return f"SELECT host, * EXCLUDE (host) FROM ({union})"


def run_query(sql: str, directories: Sequence[str]) -> QueryResult:
    """Run ``sql`` in a fresh in-memory DuckDB whose views ``messages`` and
    ``events`` read the Parquet files of ``DIR/TABLE`` of every directory of
    ``directories``, flat or Hive-partitioned (:func:`layouts`; columns
    matched by name, partition columns from the paths; a table no directory
    holds a file of is empty, with its columns). A :class:`UsageError` with
    DuckDB's message (its first line) when the SQL fails, and one naming the
    extra when duckdb is missing."""
    try:
        duckdb = parquet.import_module("duckdb")
    except ImportError as exc:
        raise UsageError(f"SQL needs duckdb ({exc}): pip install 'vfioproxy[sql]'") from exc
    connection = duckdb.connect(":memory:")
    try:
        try:
            for table in TABLES:
                select = _view(table, directories)
                if select is None:
                    pa, _ = parquet.require_pyarrow()
                    empty = parquet.schema(pa, table).empty_table()
                    connection.from_arrow(empty).create_view(table)
                else:
                    connection.execute(f"CREATE VIEW {table} AS {select}")
            cursor = connection.execute(sql)
            if cursor.description is None:
                return QueryResult((), [])
            columns = tuple(d[0] for d in cursor.description)
            return QueryResult(columns, cursor.fetchall())
        except duckdb.Error as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"SQL: {first}") from exc
    finally:
        connection.close()


def plain(value: Any) -> Any:
    """A DuckDB value as JSON data: ISO 8601 for times, hex for bytes, a
    float for a decimal, lists and objects as they are."""
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return value


def cell(value: Any) -> str:
    """A DuckDB value as one table or CSV cell: :func:`~vfioproxy.trace.export.cell`
    of its :func:`plain` value (times in ISO 8601)."""
    return export.cell(plain(value))


def write_csv(result: QueryResult, out: TextIO) -> None:
    """``result`` as CSV: a header row, then a row per result row (:func:`cell`)."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(result.columns)
    for row in result.rows:
        writer.writerow([cell(v) for v in row])


def write_json(result: QueryResult, out: TextIO) -> None:
    """``result`` as JSON lines: an object per row, by column name (:func:`plain`)."""
    for row in result.rows:
        out.write(json.dumps(dict(zip(result.columns, (plain(v) for v in row), strict=True)))
                  + "\n")
