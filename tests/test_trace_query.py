"""``trace query``: SQL (DuckDB) over the bundled traces, checked against csv exports."""

from __future__ import annotations

import csv
import io
import json
import shlex
import statistics
from collections import Counter, defaultdict

import pytest

from recorder.reader import TraceReader
from recorder.records import EventRecord
from tests.realdata import TRACES
from vfioproxy.cli import main
from vfioproxy.trace import parquet
from vfioproxy.trace.decoded import DecodedMessage, decoded_records
from vfioproxy.trace.timeline.labels import label_messages

ALL = sorted(TRACES.glob("*.trace"))
BOOT = TRACES / "qemu-boot-qemu-server-e1000e-001.trace"

PER_COMMAND = ("SELECT command, count(*) AS replies, quantile_cont(latency, 0.5) AS p50 "
               "FROM messages WHERE kind <> 'cmd' GROUP BY command ORDER BY command")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def query(capsys, sql, *sources, fmt="--csv"):
    code, out, err = run(capsys, "trace", "query", fmt, sql, *sources)
    assert code == 0, err
    if fmt == "--csv":
        return list(csv.DictReader(io.StringIO(out)))
    return [json.loads(line) for line in out.splitlines()]


def csv_rows(capsys, path):
    code, out, _ = run(capsys, "trace", "export", "--format", "csv", path)
    assert code == 0
    return list(csv.DictReader(io.StringIO(out)))


def test_per_command_replies_and_median_latency_across_every_trace(capsys):
    got = query(capsys, PER_COMMAND, *ALL)
    latencies = defaultdict(list)
    for path in ALL:
        for row in csv_rows(capsys, path):
            if row["kind"] != "cmd":
                latencies[row["command"]].append(
                    float(row["latency"]) if row["latency"] else None)
    assert [r["command"] for r in got] == sorted(latencies)
    for row in got:
        values = latencies[row["command"]]
        assert int(row["replies"]) == len(values)
        known = [v for v in values if v is not None]
        if known:
            assert float(row["p50"]) == pytest.approx(statistics.median(known))
        else:
            assert row["p50"] == ""
    assert sum(int(r["replies"]) for r in got) > 1000


def test_rows_per_trace_and_events_as_the_traces_hold(capsys):
    got = query(capsys, "SELECT trace, count(*) AS n FROM messages GROUP BY trace "
                "ORDER BY trace", *ALL, fmt="--json")
    assert got == [{"trace": p.name, "n": len(csv_rows(capsys, p))} for p in ALL]
    opened = query(capsys, "SELECT count(*) AS n FROM events WHERE kind = 'session_open'",
                   *ALL, fmt="--json")
    want = 0
    for path in ALL:
        with TraceReader(path) as reader:
            want += sum(isinstance(r, EventRecord) and r.kind == "session_open" for r in reader)
    assert opened == [{"n": want}] and want > 0


def test_an_export_directory_reads_as_the_trace_does(capsys, tmp_path):
    code, _, err = run(capsys, "trace", "export", "--format", "parquet", "-o", tmp_path, BOOT)
    assert code == 0, err
    sql = ("SELECT seq, command, time, fd_kinds, violation FROM messages "
           "WHERE fds > 0 ORDER BY seq")
    from_dir = query(capsys, sql, tmp_path, fmt="--json")
    assert from_dir == query(capsys, sql, BOOT, fmt="--json")
    assert from_dir and all(r["fd_kinds"] and r["time"].endswith("+00:00") for r in from_dir)
    # the same trace twice counts twice
    twice = query(capsys, "SELECT count(*) AS n FROM messages", tmp_path, BOOT, fmt="--json")
    assert twice == [{"n": 2 * len(csv_rows(capsys, BOOT))}]


def test_a_table_by_default(capsys):
    code, out, err = run(capsys, "trace", "query",
                         "SELECT command, count(*) AS n FROM messages WHERE command = "
                         "'VERSION' GROUP BY command", BOOT)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["command", "n"]
    assert lines[2].split() == ["VERSION", "2"]


def test_bad_sql_is_one_line_with_duckdbs_message(capsys):
    code, out, err = run(capsys, "trace", "query", "SELEC 1", BOOT)
    assert (code, out) == (2, "")
    assert err.startswith("vfioproxy trace query: SQL: Parser Error") and err.count("\n") == 1
    code, _, err = run(capsys, "trace", "query", "SELECT nosuch FROM messages", BOOT)
    assert code == 2 and "nosuch" in err and err.count("\n") == 1


def test_a_directory_no_export_wrote_is_refused(capsys, tmp_path):
    code, _, err = run(capsys, "trace", "query", "SELECT 1", tmp_path)
    assert code == 2 and "without messages/" in err


def test_missing_duckdb_names_the_extra(capsys, tmp_path, monkeypatch):
    real = parquet.import_module

    def no_duckdb(name):
        if name == "duckdb":
            raise ImportError("No module named 'duckdb'")
        return real(name)
    monkeypatch.setattr(parquet, "import_module", no_duckdb)
    code, out, err = run(capsys, "trace", "query", "SELECT 1", BOOT)
    assert (code, out) == (2, "")
    assert err == ("vfioproxy trace query: SQL needs duckdb (No module named 'duckdb'): "
                   "pip install 'vfioproxy[sql]'\n")


def test_the_readme_cookbook_prints_what_it_shows(capsys):
    readme = (TRACES.parent / "README.md").read_text()
    section = readme.split("### SQL over traces: Parquet and DuckDB\n", 1)[1].split("\n### ", 1)[0]
    block = section.split("```console\n", 1)[1].split("```", 1)[0]
    examples = [e for e in block.split("$ ")[1:]]
    assert len(examples) == 4
    for example in examples:
        command, _, shown = example.partition(" traces/*.trace\n")
        argv = shlex.split(command)
        assert argv[:3] == ["vfioproxy", "trace", "query"]
        code, out, err = run(capsys, *argv[1:], *ALL)
        assert (code, err) == (0, "")
        assert out.strip("\n") == shown.strip("\n"), command


def test_steps_fill_the_step_column_of_the_traces_given(capsys):
    sql = ("SELECT step, count(*) AS n FROM messages WHERE step IS NOT NULL "
           "GROUP BY step ORDER BY step")
    gpio = TRACES / "qemu-realize-gpio-001.trace"
    code, out, _ = run(capsys, "trace", "query", "--csv", sql, gpio)
    assert (code, out.splitlines()) == (0, ["step,n"])  # without --steps: no labels
    code, out, _ = run(capsys, "trace", "query", "--csv", "--steps", sql, gpio)
    with TraceReader(gpio) as reader:
        messages = [i for i in decoded_records(reader) if isinstance(i, DecodedMessage)]
    want = Counter(label.text() for _, label in label_messages(messages))
    got = {row["step"]: int(row["n"]) for row in csv.DictReader(io.StringIO(out))}
    assert code == 0 and got == dict(want)


def test_the_readme_slowest_steps_query_prints_what_it_shows(capsys):
    readme = (TRACES.parent / "README.md").read_text()
    section = readme.split("### SQL over traces: Parquet and DuckDB\n", 1)[1].split("\n### ", 1)[0]
    block = section.split("$ vfioproxy trace query --steps ", 1)[1].split("```", 1)[0]
    command, _, shown = block.partition(" traces/qemu-realize-*.trace\n")
    code, out, err = run(capsys, "trace", "query", "--steps", *shlex.split(command),
                         *sorted(TRACES.glob("qemu-realize-*.trace")))
    assert (code, err) == (0, "")
    assert out.strip("\n") == shown.strip("\n")
