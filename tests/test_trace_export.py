"""``vfioproxy trace export``: jsonl, pairs and csv on the bundled real traces."""

from __future__ import annotations

import csv
import io
import json

import pytest

from recorder.reader import TraceReader
from recorder.records import TraceHeader
from recorder.writer import TraceWriter
from tests.realdata import TRACES
from tests.test_proxy_inject import read_cmd
from vfioproxy.cli import main
from vfioproxy.protocol.bodies import VersionBody
from vfioproxy.protocol.codec import build_command, build_reply, decode
from vfioproxy.protocol.codec import encode as encode_with_fds
from vfioproxy.protocol.header import Command
from vfioproxy.side import Direction
from vfioproxy.trace.decoded import DecodedMessage, decoded_records
from vfioproxy.trace.export import CSV_COLUMNS, CSV_DATA_MAX
from vfioproxy.trace.filter import FIELDS

ALL = sorted(TRACES.glob("*.trace"))
BOOT = TRACES / "qemu-boot-qemu-server-e1000e-001.trace"
NAMES = [spec.name for spec in FIELDS]


def encode(message):
    return encode_with_fds(message)[0]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert err == "" or "warning" in err, err
    return code, out


def decoded(path):
    with TraceReader(path) as reader:
        return [i for i in decoded_records(reader) if isinstance(i, DecodedMessage)]


def export(capsys, path, fmt, *extra):
    code, out = run(capsys, "trace", "export", "--format", fmt, *extra, path)
    assert code == 0
    if fmt == "csv":
        return list(csv.DictReader(io.StringIO(out)))
    return [json.loads(line) for line in out.splitlines()]


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.stem)
def test_jsonl_is_trace_show_json_with_every_field_named_as_the_filter_names_it(capsys, path):
    lines = export(capsys, path, "jsonl")
    _, shown = run(capsys, "trace", "show", "--json", path)
    assert lines == [json.loads(line) for line in shown.splitlines()]
    messages = [obj for obj in lines if obj["record"] == "message" and "fields" in obj]
    expected = decoded(path)
    assert [m["seq"] for m in messages] == [m.record.seq for m in expected]
    assert [m["command"] for m in messages] == [
        m.observation.message.header.command_name for m in expected]
    for obj in messages:
        fields = obj["fields"]
        assert list(fields) == NAMES
        assert (fields["seq"], fields["session"], fields["dir"], fields["msg_id"],
                fields["size"]) == (obj["seq"], obj["session"], obj["dir"], obj["msg_id"],
                                    obj["size"])
        assert fields["command"] == obj["command"]
        assert fields["fds"] == len(obj["fds"])
        assert fields["violation"] == bool(obj["violations"])
        assert (fields["latency"] is None) == (obj["latency_ns"] is None)


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.stem)
def test_pairs_hold_every_request_once_and_every_reply_once(capsys, path):
    pairs = export(capsys, path, "pairs")
    messages = decoded(path)
    requests = [m.record.seq for m in messages if m.observation.message.header.is_command]
    replies = [m.record.seq for m in messages if not m.observation.message.header.is_command]
    got_requests = [p["request"]["seq"] for p in pairs if p["request"] is not None]
    got_replies = [p["reply"]["seq"] for p in pairs if p["reply"] is not None]
    assert sorted(got_requests) == requests
    assert sorted(got_replies) == replies
    for pair in pairs:
        request, reply = pair["request"], pair["reply"]
        if request is not None and reply is not None:
            assert request["msg_id"] == reply["msg_id"] == pair["msg_id"]
            assert request["command"] == reply["command"] == pair["command"]
            assert request["session"] == reply["session"] == pair["session"]
            assert request["dir"] != reply["dir"] and pair["dir"] == request["dir"]
            assert request["seq"] < reply["seq"]
            assert pair["latency"] == reply["fields"]["latency"] is not None
            assert pair["latency"] == pytest.approx((reply["t_ns"] - request["t_ns"]) / 1e3)
        else:
            assert pair["latency"] is None


def test_pairs_pair_nearly_every_request_of_a_real_boot(capsys):
    pairs = export(capsys, BOOT, "pairs")
    answered = [p for p in pairs if p["request"] and p["reply"]]
    assert len(answered) >= len(pairs) - 2 and len(answered) > 100


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.stem)
def test_csv_has_a_row_per_message_under_the_filter_names(capsys, path):
    rows = export(capsys, path, "csv")
    messages = decoded(path)
    assert len(rows) == len(messages)
    assert list(rows[0]) == list(CSV_COLUMNS) == [*NAMES, "summary"]
    assert [int(r["seq"]) for r in rows] == [m.record.seq for m in messages]
    assert [r["command"] for r in rows] == [
        m.observation.message.header.command_name for m in messages]
    for row, message in zip(rows, messages, strict=True):
        data = getattr(message.observation.message.body, "data", None)
        if isinstance(data, bytes) and len(data) <= CSV_DATA_MAX:
            assert bytes.fromhex(row["data"]) == data
        elif isinstance(data, bytes):  # longer than a spreadsheet cell holds
            assert row["data"] == data[:CSV_DATA_MAX].hex() + "..."
        assert row["violation"] == ("true" if message.observation.violations else "false")


@pytest.mark.parametrize("expr", [
    "command == REGION_READ and region == CONFIG",
    "kind == reply and latency > 50",
    "step matches \"^R\" and dir == s2c",
    "fd.kind == eventfd or errno == EINVAL",
])
def test_a_filter_narrows_all_three_formats_alike(capsys, expr):
    _, shown = run(capsys, "trace", "show", "-Y", expr, BOOT)
    seqs = [int(line.split()[0]) for line in shown.splitlines() if not line.startswith("#")]
    assert seqs
    jsonl = [o["seq"] for o in export(capsys, BOOT, "jsonl", "-Y", expr)]
    rows = [int(r["seq"]) for r in export(capsys, BOOT, "csv", "-Y", expr)]
    pairs = export(capsys, BOOT, "pairs", "-Y", expr)
    in_pairs = {m["seq"] for p in pairs for m in (p["request"], p["reply"]) if m}
    assert jsonl == rows == seqs
    assert set(seqs) <= in_pairs
    # every pair holds at least one message the filter passed
    assert all({m["seq"] for m in (p["request"], p["reply"]) if m} & set(seqs) for p in pairs)


def test_count_stops_each_format_after_n(capsys):
    assert len(export(capsys, BOOT, "jsonl", "-c", "5", "-Y", "kind == cmd")) == 5
    assert len(export(capsys, BOOT, "csv", "-c", "7")) == 7
    pairs = export(capsys, BOOT, "pairs", "-c", "3")
    assert [p["request"]["seq"] for p in pairs] == sorted(p["request"]["seq"] for p in pairs)
    assert len(pairs) == 3


def test_session_keeps_one_session_and_names_one_the_trace_lacks(capsys):
    rows = export(capsys, BOOT, "csv", "--session", "1")
    assert len(rows) == len(decoded(BOOT)) and {r["session"] for r in rows} == {"1"}
    assert main(["trace", "export", "--session", "2", str(BOOT)]) == 2
    assert "session 2" in capsys.readouterr().err


def test_output_file_is_claimed_like_every_other_output(capsys, tmp_path):
    out = tmp_path / "boot.csv"
    code, printed = run(capsys, "trace", "export", "--format", "csv", "-o", out, BOOT)
    assert code == 0 and printed == ""
    assert len(list(csv.DictReader(out.open()))) == len(decoded(BOOT))
    code = main(["trace", "export", "-o", str(out), str(BOOT)])
    _, err = capsys.readouterr()
    assert code == 2
    assert err == f"vfioproxy trace export: {out} already exists (--force replaces it)\n"
    assert main(["trace", "export", "-o", str(out), "--force", str(BOOT)]) == 0
    assert json.loads(out.read_text().splitlines()[0])["record"] == "event"
    code = main(["trace", "export", "-o", str(tmp_path) + "/", str(BOOT)])
    assert code == 2 and "is a directory" in capsys.readouterr().err


def test_a_bad_format_or_filter_is_one_line(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["trace", "export", "--format", "xml", str(BOOT)])
    assert exited.value.code == 2
    assert "invalid choice: 'xml'" in capsys.readouterr().err
    assert main(["trace", "export", "-Y", "regoin == ROM", str(BOOT)]) == 2
    assert capsys.readouterr().err.startswith("vfioproxy trace export: filter: unknown field")


def test_pairs_emit_unanswered_requests_at_session_close_and_orphan_replies(capsys, tmp_path):
    """Session 1: VERSION answered, REGION_READ 1 never answered (closed), a
    no_reply command, a reply to nothing; session 2: a request at trace end."""
    trace = tmp_path / "t.trace"
    version = encode(build_command(Command.VERSION, 0, VersionBody.build(0, 0, None)))
    with TraceWriter(trace, TraceHeader.now("test", {})) as writer:
        for session in (1, 2):
            writer.write_event(session, "session_open", 0, {})
            writer.append_message(session, Direction.C2S, 1, version, ())
            writer.append_message(session, Direction.S2C, 2, encode(build_reply(
                decode(version), VersionBody.build(0, 0, None))), ())
        writer.append_message(1, Direction.C2S, 3, read_cmd(1), ())
        writer.append_message(1, Direction.C2S, 4, encode(build_command(
            Command.DEVICE_RESET, 2, no_reply=True)), ())
        writer.append_message(1, Direction.S2C, 5, encode(build_reply(decode(read_cmd(9)))), ())
        writer.write_event(1, "session_close", 6, {"closed_by": "client"})
        writer.append_message(2, Direction.C2S, 7, read_cmd(3), ())
    pairs = export(capsys, trace, "pairs")
    summary = [(p["session"], p["command"], p["msg_id"],
                None if p["request"] is None else p["request"]["seq"],
                None if p["reply"] is None else p["reply"]["seq"]) for p in pairs]
    seqs = {m.record.seq: m for m in decoded(trace)}
    first = {(m.record.session, m.record.t_ns): s for s, m in seqs.items()}
    assert summary == [
        (1, "VERSION", 0, first[1, 1], first[1, 2]),
        (2, "VERSION", 0, first[2, 1], first[2, 2]),
        (1, "DEVICE_RESET", 2, first[1, 4], None),   # wants no reply: at once
        (1, "REGION_READ", 9, None, first[1, 5]),    # a reply to nothing
        (1, "REGION_READ", 1, first[1, 3], None),    # unanswered when session 1 closed
        (2, "REGION_READ", 3, first[2, 7], None),    # unanswered at the trace's end
    ]
    assert [p["latency"] for p in pairs][2:] == [None] * 4


def test_steps_are_labelled_only_when_asked_so_export_streams_by_default(capsys):
    trace = TRACES / "qemu-realize-gpio-001.trace"
    plain = export(capsys, trace, "csv")
    assert {row["step"] for row in plain} == {""}
    labelled = export(capsys, trace, "csv", "--steps")
    steps = [row["step"] for row in labelled]
    assert steps[0] == "R1" and "" not in steps
    assert [row["seq"] for row in labelled] == [row["seq"] for row in plain]
    # a filter on step labels without --steps, and labels only what it keeps
    kept = export(capsys, trace, "jsonl", "-Y", 'step == "R1"')
    assert kept and {obj["fields"]["step"] for obj in kept if "fields" in obj} == {"R1"}


def test_pairs_hold_waiting_requests_only_of_the_sessions_decoded_at_once(capsys, tmp_path):
    """Session 1 leaves a request unanswered and never closes; sessions 2-4
    each answer theirs. With a window of 2 open sessions, session 1 is dropped
    when session 3 starts, and its request goes out unanswered then, not at
    the trace's end: what pairs hold follows the window, not the trace."""
    trace = tmp_path / "t.trace"
    version = encode(build_command(Command.VERSION, 0, VersionBody.build(0, 0, None)))
    version_reply = encode(build_reply(decode(version), VersionBody.build(0, 0, None)))
    with TraceWriter(trace, TraceHeader.now("test", {})) as writer:
        writer.append_message(1, Direction.C2S, 1, read_cmd(1), ())
        for session in (2, 3, 4):
            writer.append_message(session, Direction.C2S, 2 * session, version, ())
            writer.append_message(session, Direction.S2C, 2 * session + 1, version_reply, ())
    order = [p["session"] for p in export(capsys, trace, "pairs")]
    assert order == [2, 3, 4, 1]  # every session stays open: session 1 waits to the end
    windowed = export(capsys, trace, "pairs", "--max-open-sessions", "2")
    assert [p["session"] for p in windowed] == [2, 1, 3, 4]
    assert windowed[1]["reply"] is None and windowed[1]["command"] == "REGION_READ"
