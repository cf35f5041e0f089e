"""``trace export --format parquet --partition-by``: Hive-partitioned tables, and
``trace query`` over them (alone and with unpartitioned directories and traces)."""

from __future__ import annotations

import csv
import io
import json
import os
from datetime import UTC, datetime
from pathlib import Path

import attrs
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from recorder.reader import TraceReader
from recorder.records import MessageRecord
from recorder.writer import TraceWriter
from tests.realdata import TRACES
from vfioproxy.cli import main
from vfioproxy.trace import parquet

BOOT = TRACES / "qemu-boot-qemu-server-e1000e-001.trace"
#: a host with every kind of character a partition value escapes, and some it keeps
ODD_HOST = "rack/7=a b:c%d?*#[x]^{y}'\"\\é"
MIDNIGHT = datetime(2026, 3, 1, tzinfo=UTC)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def copy_trace(path: Path, *, host: str | None, across_midnight: bool = False) -> Path:
    """BOOT's records again in ``path``, its header's host ``host``; with
    ``across_midnight`` its wall clock set so that the middle message is at
    midnight UTC (the first half on 28 February, the rest on 1 March)."""
    with TraceReader(BOOT) as reader:
        header = reader.header
        records = list(reader)
    header = attrs.evolve(header, host=host)
    if across_midnight:
        times = [r.t_ns for r in records if isinstance(r, MessageRecord)]
        middle = times[len(times) // 2]
        # wall_time(t) = created + (t - mono_ns): the middle message at MIDNIGHT
        header = attrs.evolve(header, mono_ns=middle, created=MIDNIGHT)
    with TraceWriter(path, header) as writer:
        for record in records:
            writer.copy_record(record)
    return path


def export(capsys, trace, outdir, *extra):
    code, out, err = run(capsys, "trace", "export", "--format", "parquet", "-o", outdir,
                         *extra, trace)
    assert (code, out, err) == (0, "", "")


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.parquet"))


def query(capsys, sql, *sources):
    code, out, err = run(capsys, "trace", "query", "--json", sql, *sources)
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


def test_partition_values_are_escaped_as_hive_and_spark_escape_them():
    assert parquet.partition_value("node-1.example.com") == "node-1.example.com"
    assert parquet.partition_value("a/b=c") == "a%2Fb%3Dc"
    assert parquet.partition_value(ODD_HOST) == (
        "rack%2F7%3Da b%3Ac%25d%3F%2A%23%5Bx%5D%5E%7By}%27%22%5Cé")
    assert parquet.partition_value("tab\there\x7f") == "tab%09here%7F"
    assert parquet.partition_value(None) == parquet.partition_value("") == (
        "__HIVE_DEFAULT_PARTITION__")


def test_host_and_date_partitions_with_the_columns_left_out_of_the_files(capsys, tmp_path):
    trace = copy_trace(tmp_path / "odd.trace", host=ODD_HOST, across_midnight=True)
    export(capsys, trace, tmp_path / "pq", "--partition-by", "host,date")
    host_dir = "host=" + parquet.partition_value(ODD_HOST)
    assert files(tmp_path / "pq") == [
        f"{table}/{host_dir}/date={day}/odd.parquet"
        for table in ("events", "messages") for day in ("2026-02-28", "2026-03-01")]
    flat = tmp_path / "flat"
    export(capsys, trace, flat)
    whole = pq.read_table(flat / "messages" / "odd.parquet")
    parts = [pq.read_table(tmp_path / "pq" / "messages" / host_dir / f"date={day}" / "odd.parquet")
             for day in ("2026-02-28", "2026-03-01")]
    for part in parts:
        assert part.column_names == [c for c in parquet.MESSAGE_COLUMNS if c != "host"]
    # every row is in the file of its own UTC date, in order, and nowhere else
    rows = whole.drop_columns(["host"]).to_pylist()
    assert parts[0].to_pylist() + parts[1].to_pylist() == rows
    assert {r["time"].date().isoformat() for r in parts[0].to_pylist()} == {"2026-02-28"}
    assert {r["time"].date().isoformat() for r in parts[1].to_pylist()} == {"2026-03-01"}
    assert parts[0].num_rows == len(rows) // 2
    # pyarrow reads the host back from the path as it was
    dataset = ds.dataset(tmp_path / "pq" / "messages", partitioning="hive", format="parquet")
    assert set(dataset.to_table(columns=["host"]).column("host").to_pylist()) == {ODD_HOST}


@pytest.mark.parametrize("keys", ["host", "date"])
def test_one_key(capsys, tmp_path, keys):
    trace = copy_trace(tmp_path / "t.trace", host="h1")
    export(capsys, trace, tmp_path, "--partition-by", keys)
    day = pq.read_table(tmp_path / "messages" / (
        "host=h1" if keys == "host" else f"date={_first_day(trace)}") / "t.parquet")
    assert ("host" in day.column_names) == (keys == "date")
    assert day.num_rows > 0


def _first_day(trace: Path) -> str:
    with TraceReader(trace) as reader:
        return reader.header.wall_time(next(iter(reader)).t_ns).date().isoformat()


def test_a_trace_without_host_goes_to_the_default_partition_read_as_null(capsys, tmp_path):
    export(capsys, BOOT, tmp_path, "--partition-by", "host")
    assert files(tmp_path) == [f"{t}/host=__HIVE_DEFAULT_PARTITION__/{BOOT.stem}.parquet"
                               for t in ("events", "messages")]
    assert query(capsys, "SELECT DISTINCT host FROM messages", tmp_path) == [{"host": None}]


def test_force_replaces_every_day_of_the_trace_and_nothing_else(capsys, tmp_path):
    trace = copy_trace(tmp_path / "t.trace", host="h1", across_midnight=True)
    out = tmp_path / "pq"
    export(capsys, trace, out, "--partition-by", "host,date")
    other = copy_trace(tmp_path / "other.trace", host="h1", across_midnight=True)
    export(capsys, other, out, "--partition-by", "host,date")
    before = files(out)
    code, _, err = run(capsys, "trace", "export", "--format", "parquet", "--partition-by",
                       "host,date", "-o", out, trace)
    assert code == 2 and err.count("\n") == 1
    assert "t.parquet already exists (--force replaces it)" in err
    assert files(out) == before
    # a narrower export with --force leaves no file of the day it no longer covers
    # (-c 3 stops reading after the third message: the events after it too)
    export(capsys, trace, out, "--partition-by", "host,date", "--force", "-c", "3")
    assert files(out) == sorted(f for f in before if not (
        f.endswith("/t.parquet") and "2026-03-01" in f))
    assert query(capsys, "SELECT trace, count(*) AS n FROM messages GROUP BY ALL ORDER BY 1",
                 out) == [{"trace": "other.trace", "n": 270}, {"trace": "t.trace", "n": 3}]


def test_bad_keys_and_other_formats_are_refused(capsys, tmp_path):
    for keys in ("date,host", "site", "host,host", ""):
        code, _, err = run(capsys, "trace", "export", "--format", "parquet", "--partition-by",
                           keys, "-o", tmp_path, BOOT)
        assert code == 2 and "give host, date or host,date" in err and err.count("\n") == 1
    code, _, err = run(capsys, "trace", "export", "--format", "csv", "--partition-by", "host",
                       BOOT)
    assert (code, err) == (2, "vfioproxy trace export: --partition-by is for --format parquet\n")
    assert list(tmp_path.iterdir()) == []


COOKBOOK = ("SELECT command, count(*) AS replies, round(quantile_cont(latency, 0.5), 1) AS p50, "
            "round(quantile_cont(latency, 0.99), 1) AS p99 FROM messages WHERE kind <> 'cmd' "
            "GROUP BY command ORDER BY replies DESC, command")
JOIN = ("SELECT m.trace, m.session, json_extract_string(e.data, '$.server') AS server, "
        "count(*) AS n FROM messages m JOIN events e ON e.kind = 'session_open' "
        "AND e.trace = m.trace AND e.session = m.session GROUP BY ALL ORDER BY ALL")


def test_queries_over_partitions_match_the_traces_and_restore_host_and_date(capsys, tmp_path):
    odd = copy_trace(tmp_path / "odd.trace", host=ODD_HOST, across_midnight=True)
    plain = copy_trace(tmp_path / "plain.trace", host="1234")  # a host that looks like a number
    export(capsys, odd, tmp_path / "pq", "--partition-by", "host,date")
    export(capsys, plain, tmp_path / "pq", "--partition-by", "host")  # a second layout
    for sql in (COOKBOOK, JOIN):
        assert query(capsys, sql, tmp_path / "pq") == query(capsys, sql, odd, plain)
    got = query(capsys, "SELECT host, date, count(*) AS n FROM messages GROUP BY ALL "
                "ORDER BY ALL", tmp_path / "pq")
    plain_day = _first_day(plain)
    assert got == sorted([{"host": "1234", "date": plain_day, "n": 270},
                          {"host": ODD_HOST, "date": "2026-02-28", "n": 135},
                          {"host": ODD_HOST, "date": "2026-03-01", "n": 135}],
                         key=lambda r: (r["host"], r["date"]))
    # host first, the other columns as the files hold them, date last
    columns = query(capsys, "SELECT * FROM messages LIMIT 1", tmp_path / "pq")[0]
    assert list(columns) == [*parquet.MESSAGE_COLUMNS, "date"]


def test_partitioned_and_flat_directories_and_traces_together(capsys, tmp_path):
    odd = copy_trace(tmp_path / "odd.trace", host=ODD_HOST, across_midnight=True)
    export(capsys, odd, tmp_path / "parts", "--partition-by", "host,date")
    export(capsys, BOOT, tmp_path / "flat")
    export(capsys, BOOT, tmp_path / "parts")  # a flat file in a partitioned directory too
    sql = ("SELECT host, trace, date, count(*) AS n FROM messages GROUP BY ALL ORDER BY ALL")
    got = query(capsys, sql, tmp_path / "parts", tmp_path / "flat", BOOT)
    boot_day = _first_day(BOOT)
    assert got == [
        {"host": ODD_HOST, "trace": "odd.trace", "date": "2026-02-28", "n": 135},
        {"host": ODD_HOST, "trace": "odd.trace", "date": "2026-03-01", "n": 135},
        {"host": None, "trace": BOOT.name, "date": boot_day, "n": 3 * 270},
    ]
    events = query(capsys, "SELECT count(*) AS n FROM events WHERE kind = 'session_open'",
                   tmp_path / "parts", tmp_path / "flat")
    assert events == [{"n": 3 * query(capsys, "SELECT count(*) AS n FROM events WHERE kind = "
                                      "'session_open'", BOOT)[0]["n"]}]


def test_a_table_without_rows_is_an_empty_view_with_its_columns(capsys, tmp_path):
    # -Y keeps the messages it selects (none here) and no event
    export(capsys, BOOT, tmp_path, "--partition-by", "host,date", "-Y", "command == MIG_DATA_READ")
    assert files(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == ["events", "messages"]
    code, out, err = run(capsys, "trace", "query", "--csv",
                         "SELECT host, seq, fd_kinds FROM messages", tmp_path)
    assert (code, out, err) == (0, "host,seq,fd_kinds\n", "")
    code, out, err = run(capsys, "trace", "query", "--csv", "SELECT * FROM events", tmp_path)
    assert (code, out, err) == (0, ",".join(parquet.EVENT_COLUMNS) + "\n", "")
    # with a directory that has rows, the view is that directory's
    export(capsys, BOOT, tmp_path / "more")
    assert query(capsys, "SELECT count(*) AS n FROM messages", tmp_path, tmp_path / "more") == [
        {"n": 270}]


def test_the_readme_cookbook_over_a_partitioned_export(capsys, tmp_path):
    """The cookbook's first query prints the same over ``--partition-by host,date`` exports
    of every bundled trace as over the traces."""
    readme = (TRACES.parent / "README.md").read_text()
    section = readme.split("### SQL over traces: Parquet and DuckDB\n", 1)[1].split("\n### ", 1)[0]
    first = section.split('$ vfioproxy trace query "', 1)[1].split('" traces/*.trace', 1)[0]
    traces = sorted(TRACES.glob("*.trace"))
    for trace in traces:
        export(capsys, trace, tmp_path, "--partition-by", "host,date")
    code, out, err = run(capsys, "trace", "query", "--csv", first, tmp_path)
    assert (code, err) == (0, "")
    code, want, _ = run(capsys, "trace", "query", "--csv", first, *traces)
    assert out == want and len(list(csv.reader(io.StringIO(out)))) == 7


def test_the_readme_object_storage_query_runs_over_a_partitioned_directory(capsys, tmp_path):
    """The README's DuckDB query over ``s3://bucket/vfio``, over a local directory instead."""
    import duckdb

    readme = (TRACES.parent / "README.md").read_text()
    sql = readme.split("read_parquet('s3://", 1)[0].rsplit("```sql\n", 1)[1] + (
        "read_parquet('s3://" + readme.split("read_parquet('s3://", 1)[1].split("```", 1)[0])
    odd = copy_trace(tmp_path / "odd.trace", host=ODD_HOST, across_midnight=True)
    export(capsys, odd, tmp_path / "vfio", "--partition-by", "host,date")
    export(capsys, copy_trace(tmp_path / "n.trace", host="1234"), tmp_path / "vfio",
           "--partition-by", "host,date")
    local = sql.replace("s3://bucket/vfio", str(tmp_path / "vfio")).replace(
        "DATE '2026-11-01'", "DATE '2026-03-01'").replace("LIMIT 10", "")
    rows = duckdb.sql(local).fetchall()
    # the day before 1 March is left out; the host that looks like a number stays a string
    assert {(host, day.isoformat()) for host, day, *_ in rows} == {
        (ODD_HOST, "2026-03-01"), ("1234", _first_day(BOOT))}
    assert len(rows) > 10
