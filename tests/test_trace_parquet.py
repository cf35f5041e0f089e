"""``trace export --format parquet``: the messages and events tables of the bundled traces."""

from __future__ import annotations

import csv
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recorder.reader import TraceReader
from recorder.records import EventRecord
from tests.realdata import TRACES
from vfioproxy.cli import main
from vfioproxy.trace import parquet

ALL = sorted(TRACES.glob("*.trace"))
BOOT = TRACES / "qemu-boot-qemu-server-e1000e-001.trace"

#: columns whose csv cell is the parquet value written as csv writes it
SAME_AS_CSV = ("seq", "session", "dir", "kind", "command", "msg_id", "size", "t", "latency",
               "region", "offset", "count", "errno", "fds", "violation", "inject", "register")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def csv_rows(capsys, path, *extra):
    code, out, _ = run(capsys, "trace", "export", "--format", "csv", *extra, path)
    assert code == 0
    return list(csv.DictReader(io.StringIO(out)))


def parquet_tables(capsys, path, outdir, *extra):
    code, out, err = run(capsys, "trace", "export", "--format", "parquet", "-o", outdir,
                         *extra, path)
    assert (code, out) == (0, ""), err
    return (pq.read_table(outdir / "messages" / f"{path.stem}.parquet"),
            pq.read_table(outdir / "events" / f"{path.stem}.parquet"))


def cell(value):
    """A parquet value as ``trace export --format csv`` writes it."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return " ".join(value)
    return str(value)


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.stem)
def test_a_row_per_csv_row_with_the_same_values(capsys, tmp_path, path):
    rows = csv_rows(capsys, path)
    messages, events = parquet_tables(capsys, path, tmp_path)
    assert messages.num_rows == len(rows) > 0
    got = messages.to_pylist()
    for row, want in zip(got, rows, strict=True):
        assert row["trace"] == path.name
        for name in SAME_AS_CSV:
            assert cell(row[name]) == want[name], (name, row["seq"])
        assert cell(row["fd_kinds"]) == want["fd.kind"]
        assert cell(None if row["time"] is None else row["time"].isoformat()) == want["time"]
    with TraceReader(path) as reader:
        records = [r for r in reader if isinstance(r, EventRecord)]
    assert [(e["seq"], e["kind"], json.loads(e["data"])) for e in events.to_pylist()] == [
        (r.seq, r.kind, json.loads(json.dumps(r.data, default=bytes.hex))) for r in records]


def test_columns_are_typed(capsys, tmp_path):
    messages, events = parquet_tables(capsys, BOOT, tmp_path)
    assert messages.column_names == list(parquet.MESSAGE_COLUMNS)
    assert events.column_names == list(parquet.EVENT_COLUMNS)
    types = dict(zip(messages.column_names, messages.schema.types, strict=True))
    assert types["seq"] == types["t_ns"] == types["msg_id"] == pa.int64()
    assert types["offset"] == types["count"] == pa.uint64()
    assert types["latency"] == types["t"] == pa.float64()
    assert types["time"] == pa.timestamp("us", tz="UTC")
    assert types["fd_kinds"] == pa.list_(pa.string())
    assert types["violation"] == types["inject"] == pa.bool_()
    assert types["command"] == types["errno"] == pa.string()
    assert "data" not in types
    assert events.schema.field("time").type == pa.timestamp("us", tz="UTC")
    # a message that carries fds lists their kinds
    kinds = {k for row in messages.column("fd_kinds").to_pylist() for k in row}
    assert "memfd" in kinds


def test_written_in_batches_of_the_same_rows(capsys, tmp_path, monkeypatch):
    whole, _ = parquet_tables(capsys, BOOT, tmp_path / "whole")
    monkeypatch.setattr(parquet, "BATCH_ROWS", 7)
    batched, _ = parquet_tables(capsys, BOOT, tmp_path / "batched")
    files = pq.ParquetFile(tmp_path / "batched" / "messages" / f"{BOOT.stem}.parquet")
    assert files.metadata.num_row_groups == -(-whole.num_rows // 7)
    assert batched.equals(whole)


def test_filter_session_and_count_narrow_the_messages_as_csv(capsys, tmp_path):
    extra = ("-Y", "command == REGION_READ", "-c", "5")
    rows = csv_rows(capsys, BOOT, *extra)
    messages, _ = parquet_tables(capsys, BOOT, tmp_path, *extra)
    assert messages.column("seq").to_pylist() == [int(r["seq"]) for r in rows]
    assert len(rows) == 5


def test_output_must_be_a_directory_and_is_not_replaced_without_force(capsys, tmp_path):
    code, _, err = run(capsys, "trace", "export", "--format", "parquet", BOOT)
    assert code == 2 and "name it with -o OUTDIR" in err
    a_file = tmp_path / "file"
    a_file.write_text("")
    code, _, err = run(capsys, "trace", "export", "--format", "parquet", "-o", a_file, BOOT)
    assert code == 2 and "is not a directory" in err
    parquet_tables(capsys, BOOT, tmp_path / "out")
    code, _, err = run(capsys, "trace", "export", "--format", "parquet", "-o",
                       tmp_path / "out", BOOT)
    assert code == 2 and "already exists (--force replaces it)" in err
    assert err.count("\n") == 1
    parquet_tables(capsys, BOOT, tmp_path / "out", "--force")


def test_missing_pyarrow_names_the_extra(capsys, tmp_path, monkeypatch):
    def no_module(name):
        raise ImportError(f"No module named {name!r}")
    monkeypatch.setattr(parquet, "import_module", no_module)
    code, _, err = run(capsys, "trace", "export", "--format", "parquet", "-o", tmp_path, BOOT)
    assert code == 2
    assert err.startswith("vfioproxy trace export: Parquet needs pyarrow")
    assert "pip install 'vfioproxy[sql]'" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
