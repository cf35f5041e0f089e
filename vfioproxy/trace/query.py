"""``vfioproxy trace query``: SQL over traces, by DuckDB, in process.

The views ``messages`` and ``events`` are the union of the Parquet tables
``trace export --format parquet`` writes (:mod:`vfioproxy.trace.parquet`) of
every source: a directory such an export wrote (``DIR/messages/*.parquet``,
``DIR/events/*.parquet``), or a trace, exported to a temporary directory
first (by the caller). duckdb is imported when a query runs: it comes with
the ``vfioproxy[sql]`` extra.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, TextIO

import attrs

from vfioproxy.errors import UsageError
from vfioproxy.trace import export, parquet

__all__ = ["TABLES", "QueryResult", "cell", "is_export_directory", "plain", "run_query",
           "write_csv", "write_json"]

#: the views a query sees
TABLES = ("messages", "events")


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


def run_query(sql: str, directories: Sequence[str]) -> QueryResult:
    """Run ``sql`` in a fresh in-memory DuckDB whose views ``messages`` and
    ``events`` read ``DIR/TABLE/*.parquet`` of every directory of
    ``directories`` (columns matched by name). A :class:`UsageError` with
    DuckDB's message (its first line) when the SQL fails, and one naming the
    extra when duckdb is missing."""
    try:
        duckdb = parquet.import_module("duckdb")
    except ImportError as exc:
        raise UsageError(f"SQL needs duckdb ({exc}): pip install 'vfioproxy[sql]'") from exc
    connection = duckdb.connect(":memory:")
    try:
        for table in TABLES:
            globs = ", ".join(_literal(os.path.join(d, table, "*.parquet")) for d in directories)
            connection.execute(f"CREATE VIEW {table} AS SELECT * FROM "
                               f"read_parquet([{globs}], union_by_name = true)")
        try:
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
