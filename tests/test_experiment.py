"""``vfioproxy experiment``: sweeps, runs against the reference peers, commands, CLI."""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
import textwrap
from pathlib import Path

import pytest

from recorder.records import EventRecord
from tests.conftest import FD_HYGIENE
from vfioproxy.experiment import (
    ExperimentConfig,
    ExperimentError,
    SweepError,
    expand_sweep,
    make_settings,
    run_experiment,
)
from vfioproxy.experiment.analysis import inject_items
from vfioproxy.experiment.cli import add_experiment_command
from vfioproxy.experiment.report import print_summary, summary_lines, wrap_note
from vfioproxy.inject import Delay, Error, Fixed
from vfioproxy.peers.client import RealizeOptions
from vfioproxy.peers.server import open_device_server

pytestmark = FD_HYGIENE

# ------------------------------------------------------------------ sweeps


def test_a_sweep_expands_into_one_rule_per_value() -> None:
    expanded = expand_sweep("c2s * delay fixed({0,50, 100}us)")
    assert [(value, seconds) for value, seconds, _ in expanded] == [
        ("0us", 0.0), ("50us", 50e-6), ("100us", 100e-6)]
    assert [rule.to_text() for _, _, rule in expanded] == [
        "c2s * delay fixed(0s)", "c2s * delay fixed(50us)", "c2s * delay fixed(100us)"]
    assert expanded[1][2].action == Delay(Fixed(50e-6))


def test_sweep_values_split_at_top_level_commas_only() -> None:
    expanded = expand_sweep("s2c * delay {fixed(1ms),normal(2ms,100us)}")
    assert [value for value, _, _ in expanded] == ["fixed(1ms)", "normal(2ms,100us)"]
    assert expanded[0][1] == pytest.approx(1e-3)  # not a duration: the delay's mean
    assert expanded[1][1] == pytest.approx(2e-3, rel=1e-3)


def test_a_sweep_over_commands_has_no_value_in_seconds() -> None:
    expanded = expand_sweep("c2s {DEVICE_GET_REGION_INFO,DEVICE_GET_IRQ_INFO} error EINVAL")
    assert [(value, seconds) for value, seconds, _ in expanded] == [
        ("DEVICE_GET_REGION_INFO", None), ("DEVICE_GET_IRQ_INFO", None)]
    assert all(isinstance(rule.action, Error) for _, _, rule in expanded)


@pytest.mark.parametrize(
    ("sweep", "words"),
    [
        ("c2s * delay fixed(1ms)", ["no {a,b,...} group"]),
        ("c2s {REGION_READ,REGION_WRITE} delay fixed({1,2}ms)", ["2 {...} groups", "position 43"]),
        ("c2s * delay fixed({1,2ms)", ["not closed"]),
        ("c2s * delay fixed({}ms)", ["has no values"]),
        ("c2s * delay fixed({1,,2}ms)", ["value 2", "empty"]),
        ("c2s * delay fixed({1,1}ms)", ["'1' is given twice"]),
        ("c2s * delay fixed(1}ms)", ["no {a,b,...} group"]),
        ("c2s * delay fixed({1,2}ms})", ["unmatched '}'"]),
        ("c2s * delay fixed({1,x}ms)", ["sweep value 'x'", "'c2s * delay fixed(xms)'"]),
        ("c2s {REGION_READ,NOPE} drop", ["sweep value 'NOPE'", "unknown command"]),
    ],
)
def test_bad_sweeps_are_refused_naming_the_part(sweep: str, words: list[str]) -> None:
    with pytest.raises(SweepError) as info:
        expand_sweep(sweep)
    for word in words:
        assert word in str(info.value)


def test_settings_put_the_swept_rule_first_then_the_fixed_rules() -> None:
    settings = make_settings(
        "c2s * delay fixed({0,1}ms)", ["s2c DEVICE_SET_IRQS drop"], direct=True
    )
    assert [(s.label, s.proxy, s.slug) for s in settings] == [
        ("direct", False, "00-direct"), ("0ms", True, "01-0ms"), ("1ms", True, "02-1ms")]
    assert settings[0].rules == ()
    assert [(r.id, r.to_text()) for r in settings[2].rules] == [
        (1, "c2s * id=1 delay fixed(1ms)"), (2, "s2c DEVICE_SET_IRQS id=2 drop")]
    assert [s.label for s in make_settings(None, [])] == ["proxy"]
    with pytest.raises(SweepError, match=r"rule 2 'c2s \* bogus'"):
        make_settings(None, ["c2s * drop", "c2s * bogus"])


def test_inject_events_are_read_in_either_shape() -> None:
    events = [
        EventRecord(1, 1, 0, "inject", {"direction": "c2s", "index": 0, "applied": [
            {"rule": 1, "action": "delay", "text": "delay fixed(1ms)", "value": 0.001}]}),
        EventRecord(2, 1, 0, "inject", {"rule": "r", "action": "delay", "value": 2_000_000}),
        EventRecord(3, 1, 0, "violation", {"message": "x"}),
    ]
    assert [(i["action"], i["value"]) for i in inject_items(events)] == [
        ("delay", 0.001), ("delay", 0.002)]


# ------------------------------------------------------------------ built-in peers


async def test_a_delay_sweep_with_the_built_in_peers(tmp_path: Path) -> None:
    out = tmp_path / "results"
    seen: list[tuple[int, int]] = []
    results = await run_experiment(
        ExperimentConfig(out, sweep="c2s * delay fixed({0,1}ms)", runs=2, direct=True,
                         plot=False),
        progress=lambda done, total, what: seen.append((done, total)),
    )
    assert seen[0] == (0, 6) and seen[-1] == (6, 6)
    assert [(r.setting, r.run, r.status, r.proxy) for r in results.rows] == [
        ("direct", 1, "ok", False), ("direct", 2, "ok", False),
        ("0ms", 1, "ok", True), ("0ms", 2, "ok", True),
        ("1ms", 1, "ok", True), ("1ms", 2, "ok", True)]
    direct, base, slow = (results.rows[i] for i in (0, 2, 4))
    assert direct.trace is None and direct.messages and not direct.latency
    for row in results.rows:
        assert row.realize_s and row.reset_s and row.total_s
        assert row.total_s >= row.realize_s + row.reset_s
        # the session as the proxy saw it: from VERSION to the reset's reply
        assert (row.session_s is None) == (not row.proxy)
        assert row.session_s is None or 0 < row.session_s < row.total_s
    c2s = slow.actions["delay"]  # every client message got its delay, 0 included
    assert base.actions == {"delay": c2s} and c2s * 2 == slow.messages
    assert slow.expected_delay_s == pytest.approx(c2s * 1e-3)
    # the client waits for every reply but pipelines a few maps: fewer turns than messages
    assert slow.expected_turns_delay_s is not None
    assert 0 < slow.expected_turns_delay_s <= slow.expected_delay_s
    assert slow.injected_delay_s == pytest.approx(c2s * 1e-3)
    assert base.expected_delay_s == 0 and direct.expected_delay_s is None
    assert {"VERSION", "DEVICE_GET_REGION_INFO", "REGION_READ"} <= set(slow.latency)
    assert slow.latency["REGION_READ"].p50_s > 1e-3 > base.latency["REGION_READ"].p50_s
    for row in results.rows[2:]:
        assert row.trace is not None and (out / row.trace).stat().st_size > 0
    assert sorted(p.name for p in (out / "traces").iterdir()) == [
        "01-0ms-1.trace", "01-0ms-2.trace", "02-1ms-1.trace", "02-1ms-2.trace"]

    fast_s, slow_s = (s for s in results.summary if s.setting != "direct")
    assert slow_s.expected_added_s == pytest.approx(c2s * 1e-3)
    assert slow_s.added_s is not None and slow_s.ratio is not None
    assert 0.5 * c2s * 1e-3 < slow_s.added_s < 4 * c2s * 1e-3  # generous: timer slack
    assert fast_s.added_s == 0 and fast_s.ratio is None
    assert results.summary[0].added_s is not None and results.summary[0].added_s < 0
    text = "\n".join(summary_lines(results))
    assert "1ms" in text and "ok×2" in text

    with open(out / "results.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    assert [(r["setting"], r["run"], r["status"]) for r in lines] == [
        (r.setting, str(r.run), r.status) for r in results.rows]
    assert float(lines[4]["total_s"]) == pytest.approx(slow.total_s)
    assert lines[4]["value_s"] == "0.001" and lines[4]["rule"] == "c2s * delay fixed(1ms)"
    assert float(lines[4]["REGION_READ_p99_s"]) == pytest.approx(slow.latency["REGION_READ"].p99_s)
    assert lines[0]["REGION_READ_p50_s"] == "" and lines[4]["actions"] == f"delay:{c2s}"
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["sweep"] == "c2s * delay fixed({0,1}ms)"
    assert [s["label"] for s in data["settings"]] == ["direct", "0ms", "1ms"]
    assert data["rows"][4]["latency"]["VERSION"]["count"] == 1
    assert data["summary"][2]["ratio"] == pytest.approx(slow_s.ratio)


async def test_an_error_sweep_records_how_the_client_failed(tmp_path: Path) -> None:
    results = await run_experiment(ExperimentConfig(
        tmp_path, sweep="c2s {DEVICE_GET_REGION_INFO,DEVICE_GET_IRQ_INFO} error EINVAL",
        runs=1, plot=False))
    region, irq = results.rows
    assert (region.status, irq.status) == ("error", "error")
    assert region.error.startswith("R4 region info") and "errno 22 (EINVAL)" in region.error
    assert irq.error.startswith("R10 ") and "EINVAL" in irq.error
    assert region.actions == {"error": 1} and region.injected == 1
    assert region.realize_s is None and region.total_s is not None and region.total_s > 0
    assert region.messages is not None and irq.messages is not None
    assert region.messages < irq.messages  # R4 fails before R10
    assert results.summary[0].error == region.error and results.summary[0].ok == 0


async def test_the_summary_notes_wrap_at_word_boundaries(tmp_path: Path) -> None:
    results = await run_experiment(ExperimentConfig(
        tmp_path, sweep="c2s {DEVICE_GET_REGION_INFO,DEVICE_GET_IRQ_INFO} error EINVAL",
        runs=1, plot=False))
    out = io.StringIO()
    print_summary(results, file=out, width=50)
    text = out.getvalue().splitlines()
    notes = text[text.index(next(t for t in text if t.startswith("realize, total:"))):]
    assert all(len(line) <= 50 for line in notes)
    # the table is too wide for 50 columns: the last note says what it left out
    left_out = next(n for n, line in enumerate(notes) if line.startswith("left out"))
    notes = notes[:left_out]
    # the same words in the same order: none cut, none lost
    words = " ".join(summary_lines(results)[-4:]).split()
    assert " ".join(notes).split() == words
    errors = notes[notes.index("errors (first of each setting):") + 1:]
    assert errors[0].startswith("  DEVICE_GET_REGION_INFO: R4")
    assert errors[1].startswith("    ")  # the error goes on, indented under its setting
    assert errors == [
        part for row in results.summary for part in wrap_note(f"  {row.setting}: {row.error}", 50)]
    # a table too wide for the terminal leaves out columns, never the settings or statuses
    out = io.StringIO()
    print_summary(results, file=out, width=80)
    text = out.getvalue().splitlines()
    assert all(len(line) <= 80 for line in text)
    rows = [line for line in text if line.startswith("DEVICE_GET_")]
    assert [line.split()[0] for line in rows] == [s.setting for s in results.summary]
    assert all(line.split()[-1] == "error×1" for line in rows)
    header = "\n".join(text[:next(n for n, line in enumerate(text) if line.startswith("─"))])
    assert "setting" in header and "status" in header and "min..max" not in header
    assert "left out for the terminal's width: total min..max, expected ratio," in out.getvalue()
    out = io.StringIO()
    print_summary(results, file=out)  # 160 columns off a terminal: the whole table
    assert "min..max" in out.getvalue() and "left out" not in out.getvalue()
    # a word longer than the width stays whole, on its own line
    long = "/tmp/" + "x" * 30 + "/device.sock"
    assert wrap_note(f"  0us: cannot connect to {long}: refused", 20) == [
        "  0us: cannot", "    connect to", f"    {long}:", "    refused"]


async def test_a_dropped_reply_times_the_built_in_client_out(tmp_path: Path) -> None:
    results = await run_experiment(ExperimentConfig(
        tmp_path, rules=["s2c DEVICE_SET_IRQS drop"], runs=1, timeout=0.2, plot=False,
        realize=RealizeOptions(reset=False)))
    (row,) = results.rows
    assert (row.setting, row.status, row.actions) == ("rules", "timeout", {"drop": 1})
    assert "DEVICE_SET_IRQS" in row.error and "0.2 s" in row.error
    assert row.total_s is not None and row.total_s >= 0.2


# ------------------------------------------------------------------ external commands

CLIENT = textwrap.dedent("""
    import socket, sys, time
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(sys.argv[1])
    time.sleep(float(sys.argv[3]))
    if sys.argv[2] != "0":
        print("\\nclient: device refused (errno 22)\\n  at realize step R4", file=sys.stderr)
    sys.exit(int(sys.argv[2]))
""")


@pytest.mark.parametrize(("code", "status"), [(0, "ok"), (3, "exit 3")])
async def test_a_command_per_run_records_its_exit_status(
    tmp_path: Path, code: int, status: str
) -> None:
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    async with open_device_server(tmp_path / "dev.sock"):
        results = await run_experiment(ExperimentConfig(
            tmp_path / "out", sweep="c2s * delay fixed({0,1}ms)", runs=1, plot=False,
            server=str(tmp_path / "dev.sock"),
            command=(sys.executable, str(script), "{socket}", str(code), "0")))
    assert [(r.status, r.exit_code) for r in results.rows] == [(status, code)] * 2
    for row in results.rows:
        assert row.realize_s is None and row.total_s is not None and row.messages == 0
        assert row.trace is not None and (tmp_path / "out" / row.trace).exists()
        if code == 0:  # nothing on stderr: no file
            assert (row.error, row.stderr) == ("", None)
            continue
        # the first line in the results, the whole stderr next to the run's trace
        assert row.error == "client: device refused (errno 22)"
        assert row.stderr == row.trace.removesuffix(".trace") + ".stderr"
        assert (tmp_path / "out" / row.stderr).read_text() == (
            "\nclient: device refused (errno 22)\n  at realize step R4\n")
    assert sorted(p.name for p in (tmp_path / "out" / "traces").iterdir()) == sorted(
        [Path(r.trace or "").name for r in results.rows]
        + [Path(r.stderr).name for r in results.rows if r.stderr])


async def test_a_command_that_fails_silently_gets_its_exit_status_as_error(
    tmp_path: Path,
) -> None:
    script = tmp_path / "client.py"
    script.write_text("import os, signal, sys\n"
                      "os.kill(os.getpid(), signal.SIGTERM) if sys.argv[2] == 'kill' "
                      "else sys.exit(4)\n")
    results = await run_experiment(ExperimentConfig(
        tmp_path / "out", sweep="c2s * error {EIO,EINVAL}", runs=1, plot=False,
        command=(sys.executable, str(script), "{socket}", "exit")))
    assert [(r.status, r.error, r.stderr) for r in results.rows] == [
        ("exit 4", "exit status 4, nothing on stderr", None)] * 2
    assert [s.error for s in results.summary] == ["exit status 4, nothing on stderr"] * 2
    results = await run_experiment(ExperimentConfig(
        tmp_path / "out2", runs=1, plot=False,
        command=(sys.executable, str(script), "{socket}", "kill")))
    assert [(r.status, r.error) for r in results.rows] == [
        ("exit -15", "killed by SIGTERM, nothing on stderr")]


async def test_a_command_that_hangs_is_killed_at_the_timeout(tmp_path: Path) -> None:
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    results = await run_experiment(ExperimentConfig(
        tmp_path, runs=1, timeout=0.3, plot=False,
        command=(sys.executable, str(script), "{socket}", "0", "30")))
    (row,) = results.rows
    assert (row.status, row.exit_code, row.error) == ("timeout", None, "no exit within 0.3 s")
    assert row.total_s is not None and 0.3 <= row.total_s < 5


async def test_bad_setups_fail_before_any_run(tmp_path: Path) -> None:
    with pytest.raises(ExperimentError, match=re.escape("must contain {socket}")):
        await run_experiment(ExperimentConfig(tmp_path, command=("true",)))
    with pytest.raises(ExperimentError, match="command not found: 'no-such-client-x'"):
        await run_experiment(ExperimentConfig(tmp_path, command=("no-such-client-x", "{socket}")))
    with pytest.raises(ExperimentError, match=re.escape("nothing.sock: No such file")):
        await run_experiment(ExperimentConfig(tmp_path, server=str(tmp_path / "nothing.sock")))
    with pytest.raises(SweepError, match=re.escape("no {a,b,...} group")):
        await run_experiment(ExperimentConfig(tmp_path, sweep="c2s * drop"))
    assert not (tmp_path / "traces").exists()


# ------------------------------------------------------------------ CLI


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vfioproxy")
    add_experiment_command(parser.add_subparsers(dest="command_name"))
    return parser.parse_args(argv)


def test_the_cli_runs_an_experiment_and_prints_the_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _parse(["experiment", "--sweep", "c2s * delay fixed({0,200}us)", "--runs", "1",
                   "--rule", "c2s DEVICE_RESET delay fixed(1ms)", "--seed", "7",
                   "--no-plot", "-o", str(tmp_path / "o"), "--no-reset"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "0us" in out and "200us" in out and "ok×1" in out and "results.csv" in out
    data = json.loads((tmp_path / "o" / "results.json").read_text())
    assert data["config"]["rules"] == ["c2s DEVICE_RESET delay fixed(1ms)"]
    assert data["config"]["realize"]["reset"] is False
    assert [row["seed"] for row in data["rows"]] == [7, 7]
    assert data["settings"][1]["rules"] == [
        "c2s * id=1 delay fixed(200us)", "c2s DEVICE_RESET id=2 delay fixed(1ms)"]


def test_the_cli_exits_1_after_all_runs_when_a_client_failed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the client fails through the proxy only: the direct runs succeed
    script = tmp_path / "client.py"
    script.write_text("import os, sys\n"
                      "if os.path.basename(sys.argv[1]).startswith('proxy'):\n"
                      "    sys.exit('client: BAR0 region info refused\\nsecond line')\n")
    out = tmp_path / "o"
    args = _parse(["experiment", "--sweep", "c2s * delay fixed({0,100}us)", "--runs", "2",
                   "--direct", "--no-plot", "-o", str(out),
                   "--command", f"{sys.executable} {script} {{socket}}"])
    assert args.func(args) == 1
    captured = capsys.readouterr()
    assert "vfioproxy: 4 of 6 run(s) failed" in captured.err
    assert "0us: client: BAR0 region info refused" in captured.out
    assert "second line" not in captured.out
    assert "6 trace(s)" not in captured.out and "4 client stderr file(s)" in captured.out
    with open(out / "results.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    assert [(r["setting"], r["status"], r["error"]) for r in lines] == [
        ("direct", "ok", ""), ("direct", "ok", ""),
        *[(label, "exit 1", "client: BAR0 region info refused")
          for label in ("0us", "0us", "100us", "100us")]]
    assert [r["stderr"] for r in lines] == [
        "", "", "traces/01-0us-1.stderr", "traces/01-0us-2.stderr",
        "traces/02-100us-1.stderr", "traces/02-100us-2.stderr"]
    assert (out / "traces/02-100us-2.stderr").read_text() == (
        "client: BAR0 region info refused\nsecond line\n")
    data = json.loads((out / "results.json").read_text())
    assert [s["error"] for s in data["summary"]] == [
        "", "client: BAR0 region info refused", "client: BAR0 region info refused"]
    assert data["rows"][5]["stderr"] == "traces/02-100us-2.stderr"


def test_the_cli_refuses_a_bad_sweep_before_starting(tmp_path: Path) -> None:
    args = _parse(["experiment", "--sweep", "c2s * delay fixed({1,2}ms) {x}",
                   "-o", str(tmp_path)])
    with pytest.raises(SweepError, match=re.escape("2 {...} groups")):
        args.func(args)
    args = _parse(["experiment", "--command", "qemu 'unclosed", "-o", str(tmp_path)])
    with pytest.raises(ExperimentError, match="--command"):
        args.func(args)


def test_turns_count_the_messages_whose_sender_had_waited(tmp_path: Path) -> None:
    from recorder.records import TraceHeader
    from recorder.writer import TraceWriter
    from vfioproxy.experiment import analyse_trace
    from vfioproxy.side import Direction

    trace = tmp_path / "t.trace"
    message = bytes(16)
    with TraceWriter(trace, TraceHeader.now("test", {})) as writer:
        for t, direction in enumerate(["c", "c", "s", "s", "c", "s"]):
            writer.write_message(1, Direction.C2S if direction == "c" else Direction.S2C,
                                 t, message)
    facts = analyse_trace(trace)
    assert facts.turns == {"c2s": 2, "s2c": 2} and facts.span_s == 5e-9
