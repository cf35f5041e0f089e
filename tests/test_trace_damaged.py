"""Damaged records and bounded memory in the trace readers (issue 19).

A damaged record is named (file, record, byte offset), skipped and counted,
the tools go on and exit 1; the strict reader still raises. The decoding
state is bounded by a window of open sessions and by what one session may
keep waiting, not by the trace.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import msgpack
import pytest

from recorder.errors import TraceFormatError
from recorder.reader import TraceReader
from recorder.records import MessageRecord, TraceHeader
from recorder.writer import TraceWriter
from vfioproxy.cli import main
from vfioproxy.errors import RemoteProtocolError
from vfioproxy.protocol.bodies import RegionAccessBody
from vfioproxy.protocol.codec import decode
from vfioproxy.protocol.header import HEADER_SIZE, Command
from vfioproxy.protocol.listing import RequestTimes
from vfioproxy.protocol.session import SessionState
from vfioproxy.side import Direction
from vfioproxy.trace import show
from vfioproxy.trace.decoded import DecodedMessage, SessionNotice, decoded_records
from vfioproxy.trace.stats import LatencySample, LatencyStats, TraceStats, text_report

C2S, S2C = Direction.C2S, Direction.S2C


def message(msg_id: int, command: int, body: bytes = b"", *, reply: bool = False) -> bytes:
    return struct.pack("<HHIII", msg_id, command, HEADER_SIZE + len(body), int(reply), 0) + body


VERSION = struct.pack("<HH", 0, 1) + b"{}\0"


def read4(msg_id: int) -> bytes:
    return message(msg_id, Command.REGION_READ, struct.pack("<QII", 0, 7, 4))


def read4_reply(msg_id: int) -> bytes:
    return message(msg_id, Command.REGION_READ, struct.pack("<QII", 0, 7, 4) + b"\x86\x80\x00\x00",
                   reply=True)


def append(path: Path, data: bytes) -> int:
    """Append raw bytes to a trace; returns the offset they start at."""
    with path.open("ab") as file:
        offset = file.tell()
        file.write(data)
    return offset


def record(**wire: object) -> bytes:
    return msgpack.packb(wire, use_bin_type=True)


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def damaged(tmp_path: Path) -> tuple[Path, list[int]]:
    """A trace with, in the middle, a message record shorter than a header, a
    record with a bad direction, and bytes that are not msgpack (offsets
    returned), then a whole session's worth of records after them."""
    path = tmp_path / "damaged.trace"
    with TraceWriter(path, TraceHeader.now("test")) as writer:
        writer.write_event(1, "session_open", 1)
        writer.write_message(1, C2S, 10, message(1, Command.VERSION, VERSION))
    offsets = [
        append(path, record(k="m", q=3, s=1, d="s2c", t=20, f=[], b=b"\x01\x00")),
        append(path, record(k="m", q=4, s=1, d="up", t=21, f=[], b=read4(9))),
        # garbage that even holds the start of a record (whose seq is too small)
        append(path, b"\xc1\xc1garbage" + record(k="m", q=2, s=1, d="s2c", t=1, f=[],
                                                 b=read4(2))[:-3]),
    ]
    append(path, record(k="m", q=6, s=1, d="s2c", t=30, f=[],
                        b=message(1, Command.VERSION, VERSION, reply=True)))
    append(path, record(k="m", q=7, s=1, d="c2s", t=40, f=[], b=read4(2)))
    append(path, record(k="m", q=8, s=1, d="s2c", t=50, f=[], b=read4_reply(2)))
    append(path, record(k="e", q=9, s=1, t=60, e="session_close", a={}))
    return path, offsets


def test_the_strict_reader_still_raises_at_the_first_damaged_record(damaged):
    path, offsets = damaged
    with (TraceReader(path, min_message_bytes=HEADER_SIZE) as reader,
          pytest.raises(TraceFormatError) as raised):
        list(reader)
    assert (raised.value.record, raised.value.offset) == (3, offsets[0])
    with TraceReader(path) as reader, pytest.raises(TraceFormatError) as raised:
        list(reader)  # the format itself does not interpret a message's bytes
    assert (raised.value.record, raised.value.field) == (4, "d (direction)")
    assert str(raised.value).startswith(f"{path}: record 4: byte offset {offsets[1]}: ")


def test_a_lenient_reader_skips_names_and_counts_damaged_records(damaged):
    path, offsets = damaged
    with TraceReader(path, skip_damaged=True, min_message_bytes=HEADER_SIZE) as reader:
        seqs = [r.seq for r in reader]
        assert seqs == [1, 2, 6, 7, 8, 9]
        assert reader.damaged_count == 3
        found = [(d.record, d.offset) for d in reader.damaged]
        assert found == list(zip((3, 4, 5), offsets, strict=True))
        assert [d.size for d in reader.damaged[:2]] == [offsets[1] - offsets[0],
                                                         offsets[2] - offsets[1]]
        assert "invalid msgpack byte 0xc1" in str(reader.damaged[2])
        assert reader.truncation is None
        # a second pass starts afresh
        assert len(list(reader)) == 6 and reader.damaged_count == 3


@pytest.mark.parametrize("tool", [["show"], ["show", "--json"], ["stats", "--json"]])
def test_show_and_stats_name_each_damaged_record_go_on_and_exit_1(capsys, damaged, tool):
    path, offsets = damaged
    code, out, err = run(capsys, "trace", *tool, path)
    assert code == 1
    lines = err.splitlines()
    assert lines[0] == (
        f"vfioproxy: damaged record: {path}: record 3: byte offset {offsets[0]}: field b (data): "
        "a message of 2 bytes, shorter than the 16-byte header, and not marked torn "
        f"(x: 'eof'); skipped {offsets[1] - offsets[0]} bytes")
    assert lines[1].startswith(f"vfioproxy: damaged record: {path}: record 4: byte offset "
                               f"{offsets[1]}: field d (direction)")
    assert lines[2].startswith(f"vfioproxy: damaged record: {path}: record 5: byte offset "
                               f"{offsets[2]}: invalid msgpack byte 0xc1")
    assert lines[3:] == [f"vfioproxy: {path}: skipped 3 damaged records"]
    if tool == ["show"]:  # the records after the damage are all there, paired
        assert "     8       0.000 s2c s1 REGION_READ reply id=2" in out
        assert "session_close" in out
    elif tool == ["show", "--json"]:
        assert [json.loads(line).get("seq") for line in out.splitlines()
                if json.loads(line)["record"] != "negotiated"] == [1, 2, 6, 7, 8, 9]
    else:
        assert json.loads(out)["messages"] == 4


def test_many_damaged_records_are_named_up_to_a_cap_then_counted(capsys, tmp_path):
    path = tmp_path / "many.trace"
    with TraceWriter(path, TraceHeader.now("test")) as writer:
        writer.write_message(1, C2S, 1, message(1, Command.VERSION, VERSION))
    for seq in range(2, 32):
        append(path, record(k="m", q=seq, s=1, d="c2s", t=seq, f=[], b=b"short"))
    code, _, err = run(capsys, "trace", "stats", path)
    lines = err.splitlines()
    assert code == 1 and len(lines) == 22
    assert lines[-2:] == ["vfioproxy: ... and 10 more damaged records",
                          f"vfioproxy: {path}: skipped 30 damaged records"]


def test_a_torn_tail_is_still_a_warning_not_damage(capsys, tmp_path):
    path = tmp_path / "torn.trace"
    with TraceWriter(path, TraceHeader.now("test")) as writer:
        writer.write_message(1, C2S, 1, message(1, Command.VERSION, VERSION))
    whole = record(k="m", q=2, s=1, d="c2s", t=2, f=[], b=read4(2))
    append(path, whole[:-5])
    code, out, err = run(capsys, "trace", "show", path)
    assert code == 0 and "VERSION cmd id=1" in out
    assert err == f"vfioproxy: warning: {path}: trace truncated after record 1 " \
                  f"({len(whole) - 5} trailing bytes)\n"


def test_a_length_damaged_past_the_end_is_skipped_when_records_follow(tmp_path):
    path = tmp_path / "length.trace"
    with TraceWriter(path, TraceHeader.now("test")) as writer:
        writer.write_message(1, C2S, 1, message(1, Command.VERSION, VERSION))
    bad = bytearray(record(k="m", q=2, s=1, d="c2s", t=2, f=[], b=read4(2)))
    bad[-33] = 0xC6  # bin 8 -> bin 32: its length now runs far past the end of the file
    offset = append(path, bytes(bad))
    append(path, record(k="m", q=3, s=1, d="c2s", t=3, f=[], b=read4(3)))
    with TraceReader(path, skip_damaged=True) as reader:
        assert [r.seq for r in reader] == [1, 3]
        assert [(d.record, d.offset) for d in reader.damaged] == [(2, offset)]
        assert "runs past the end of the file" in str(reader.damaged[0])
        assert reader.truncation is None


def test_a_message_shorter_than_its_header_is_a_violation_not_an_exception():
    state = SessionState()
    obs = state.observe(S2C, b"\x01\x00")
    (violation,) = obs.violations
    assert violation.kind == "short_message" and violation.got == 2
    assert not obs.message.decoded and obs.index == 0
    assert state.observe(S2C, message(1, Command.VERSION, VERSION, reply=True)).index == 1
    with pytest.raises(RemoteProtocolError, match="shorter than the 16-byte header"):
        SessionState(strict=True).observe(C2S, b"")


def sessions_trace(path: Path, sessions: int, *, close: bool) -> Path:
    with TraceWriter(path, TraceHeader.now("test")) as writer:
        for session in range(1, sessions + 1):
            writer.write_event(session, "session_open", session * 10)
            writer.write_message(session, C2S, session * 10 + 1,
                                 message(1, Command.VERSION, VERSION))
            writer.write_message(session, S2C, session * 10 + 2,
                                 message(1, Command.VERSION, VERSION, reply=True))
            if close:
                writer.write_event(session, "session_close", session * 10 + 3)
    return path


def test_closed_sessions_are_dropped_and_open_ones_bounded_by_the_window(tmp_path):
    closed = sessions_trace(tmp_path / "closed.trace", 200, close=True)
    with TraceReader(closed) as reader:
        items = decoded_records(reader, max_open_sessions=8)
        assert sum(isinstance(i, DecodedMessage) for i in items) == 400
        found = items.statistics()
    assert (found.peak_open_sessions, found.open_sessions, found.closed) == (1, 0, 200)
    assert found.evicted == 0
    left_open = sessions_trace(tmp_path / "open.trace", 200, close=False)
    with TraceReader(left_open) as reader:
        items = decoded_records(reader, max_open_sessions=8)
        notices = [i for i in items if isinstance(i, SessionNotice)]
        found = items.statistics()
    assert (found.peak_open_sessions, found.open_sessions, found.evicted) == (8, 8, 192)
    assert [n.session for n in notices] == list(range(1, 193))
    assert {n.kind for n in notices} == {"evicted"}


def test_show_and_stats_say_when_the_window_drops_sessions(capsys, tmp_path):
    path = sessions_trace(tmp_path / "open.trace", 30, close=False)
    code, out, err = run(capsys, "trace", "show", "--max-open-sessions", "4", path)
    assert code == 0 and err == ""
    assert out.count("is dropped; if it goes on, it is decoded afresh") == 26
    assert "# session 1: more than 4 sessions open at once (--max-open-sessions)" in out
    code, out, _ = run(capsys, "trace", "stats", "--max-open-sessions", "4", path)
    assert code == 0
    assert "decoding state of 26 sessions dropped" in out
    code, out, _ = run(capsys, "trace", "stats", "--json", "--max-open-sessions", "4", path)
    assert json.loads(out)["notices"] == {"evicted": 26}


def test_a_session_that_goes_on_after_being_dropped_is_decoded_afresh(tmp_path):
    path = tmp_path / "resumed.trace"
    with TraceWriter(path, TraceHeader.now("test")) as writer:
        writer.write_message(1, C2S, 1, message(1, Command.VERSION, VERSION))
        writer.write_message(1, S2C, 2, message(1, Command.VERSION, VERSION, reply=True))
        writer.write_message(1, C2S, 3, read4(2))
        for session in (2, 3):
            writer.write_message(session, C2S, 4, message(1, Command.VERSION, VERSION))
        writer.write_message(1, S2C, 5, read4_reply(2))
        writer.write_message(1, C2S, 6, read4(3))
        writer.write_message(1, S2C, 7, read4_reply(3))
    with TraceReader(path) as reader:
        items = list(decoded_records(reader, max_open_sessions=2))
    notices = [(i.session, i.kind) for i in items if isinstance(i, SessionNotice)]
    assert notices == [(1, "evicted"), (2, "evicted"), (1, "resumed")]
    ones = [i for i in items if isinstance(i, DecodedMessage) and i.record.session == 1]
    # the reply to a command sent before the state was dropped is unpaired...
    assert [v.kind for v in ones[3].observation.violations] == ["unknown_reply_id"]
    # ... the message numbering goes on, and what follows pairs as usual
    assert [i.observation.index for i in ones] == [0, 0, 1, 1, 2, 2]
    assert ones[5].observation.violations == () and ones[5].latency_ns == 1
    assert "version_not_first" not in {v.kind for i in ones for v in i.observation.violations}


def test_request_times_forget_the_oldest_unanswered_requests():
    state, times = SessionState(), RequestTimes(limit=16)
    state.observe(C2S, message(1, Command.VERSION, VERSION))
    state.observe(S2C, message(1, Command.VERSION, VERSION, reply=True))
    for msg_id in range(2, 1002):
        times.latency(state.observe(C2S, read4(msg_id)), msg_id)
    assert len(times) == 16
    assert times.latency(state.observe(S2C, read4_reply(1001)), 2000) == 999
    assert times.latency(state.observe(S2C, read4_reply(900)), 2000) is None


def test_latency_percentiles_are_exact_up_to_the_sample_size_then_estimated():
    exact = LatencySample(size=100)
    for ns in range(100, 0, -1):
        exact.add(ns)
    assert LatencyStats.of(exact) == LatencyStats.of(list(range(1, 101)))
    sampled = LatencySample(size=100)
    for ns in range(1, 100_001):
        sampled.add(ns)
    stats = LatencyStats.of(sampled)
    assert (stats.count, stats.max_ns, stats.exact, len(sampled.values)) == (
        100_000, 100_000, False, 100)
    assert 35_000 < stats.p50_ns < 65_000  # a uniform sample's median


def test_a_big_access_payload_decodes_the_same_from_a_view():
    data = bytes(range(256)) * 1024
    raw = message(5, Command.REGION_WRITE, struct.pack("<QII", 0x40, 2, len(data)) + data)
    decoded = decode(raw)
    assert decoded.body == RegionAccessBody.parse(raw[HEADER_SIZE:])
    assert type(decoded.body.data) is bytes and decoded.body.data == data


def test_show_json_writes_big_bytes_as_the_same_lines(tmp_path, monkeypatch):
    path = tmp_path / "big.trace"
    data = bytes(range(256)) * 1024
    with TraceWriter(path, TraceHeader.now("test")) as writer:
        writer.write_message(1, C2S, 1, message(1, Command.VERSION, VERSION))
        writer.write_message(1, C2S, 2, message(
            2, Command.REGION_WRITE, struct.pack("<QII", 0, 2, len(data)) + data))

    class Out:
        def __init__(self) -> None:
            self.pieces: list[str] = []

        def write(self, text: str) -> None:
            self.pieces.append(text)

    with TraceReader(path) as reader:
        out = Out()
        show.write_json(map(show.json_object, decoded_records(reader)), out)  # type: ignore[arg-type]
        with monkeypatch.context() as patched:  # every value whole: one line at a time
            patched.setattr(show, "BIG_BYTES", 1 << 62)
            whole = Out()
            show.write_json(map(show.json_object, decoded_records(reader)), whole)  # type: ignore[arg-type]
        expected = "".join(whole.pieces)
        assert len(whole.pieces) == len(expected.splitlines())
    assert "".join(out.pieces) == expected
    assert max(len(piece) for piece in out.pieces) < len(data)
    assert json.loads(expected.splitlines()[-1])["body"]["data"] == data.hex()


def test_a_record_bigger_than_a_read_chunk_reads_back_whole_after_damage(tmp_path):
    path = tmp_path / "big-after.trace"
    with TraceWriter(path, TraceHeader.now("test")) as writer:
        writer.write_message(1, C2S, 1, message(1, Command.VERSION, VERSION))
    append(path, b"\xc1" * 10)
    big = message(2, Command.REGION_WRITE, struct.pack("<QII", 0, 2, 600_000) + bytes(600_000))
    append(path, record(k="m", q=2, s=1, d="c2s", t=2, f=[], b=big))
    with TraceReader(path, skip_damaged=True) as reader:
        records = list(reader)
    assert [r.seq for r in records] == [1, 2] and reader.damaged_count == 1
    assert isinstance(records[1], MessageRecord) and records[1].data == big


def test_stats_marks_estimated_percentiles():
    collected = TraceStats()
    collected.latencies["REGION_READ"] = sample = LatencySample(size=2)
    for ns in (1000, 2000, 3000):
        sample.add(ns)
    report = "\n".join(text_report(collected))
    assert "~: latency percentiles estimated from a uniform sample of 2 per command" in report
    assert "REGION_READ   3   ~1.0   ~3.0   ~3.0   3.0" in report
    assert collected.to_dict()["latency"]["REGION_READ"]["exact"] is False
    assert collected.to_dict()["latency"]["REGION_READ"]["count"] == 3


@pytest.mark.parametrize("tool", ["export", "diff", "slice", "merge"])
def test_every_trace_tool_names_damaged_records_goes_on_and_exits_1(capsys, damaged, tmp_path,
                                                                       tool):
    path, offsets = damaged
    out_trace = tmp_path / "out.trace"
    argv = {
        "export": ["export", "--format", "csv", path],
        "diff": ["diff", path, path],
        "slice": ["slice", "--session", "1", path, out_trace],
        "merge": ["merge", out_trace, path, path],
    }[tool]
    code, out, err = run(capsys, "trace", *argv)
    assert code == 1
    named = [line for line in err.splitlines() if "damaged record" in line]
    assert named[0].startswith(f"vfioproxy: damaged record: {path}: record 3: byte offset "
                               f"{offsets[0]}: ")
    assert f"vfioproxy: {path}: skipped 3 damaged records" in err.splitlines()
    if tool == "export":  # the messages after the damage are all there
        assert [row.split(",")[0] for row in out.splitlines()[1:]] == ["2", "6", "7", "8"]
    elif tool == "diff":
        assert "equal: 2 exchanges paired: 2 equal" in out
    else:
        with TraceReader(out_trace) as reader:  # what it wrote is a whole, valid trace
            messages = [r for r in reader if isinstance(r, MessageRecord)]
        assert len(messages) == (4 if tool == "slice" else 8)


def test_a_seq_damaged_ahead_costs_its_own_record_not_every_later_one(tmp_path):
    """A record whose seq jumped far ahead (a flipped high bit) is the damaged
    one, not every record after it; a seq that went back is still skipped."""
    path = tmp_path / "jump.trace"
    with TraceWriter(path, TraceHeader.now("test")) as writer:
        writer.write_message(1, C2S, 10, message(1, Command.VERSION, VERSION))
    reply = message(1, Command.VERSION, VERSION, reply=True)
    jumped = append(path, record(k="m", q=1 << 40, s=1, d="s2c", t=20, f=[], b=reply))
    for seq, t in ((3, 30), (4, 40)):
        append(path, record(k="m", q=seq, s=1, d="c2s", t=t, f=[], b=read4(seq)))
    back = append(path, record(k="m", q=2, s=1, d="s2c", t=45, f=[], b=read4_reply(3)))
    append(path, record(k="m", q=5, s=1, d="s2c", t=50, f=[], b=read4_reply(3)))
    with TraceReader(path, skip_damaged=True) as reader:
        assert [r.seq for r in reader] == [1, 3, 4, 5]
        assert [(d.record, d.offset) for d in reader.damaged] == [(2, jumped), (5, back)]
        assert "jumped ahead" in str(reader.damaged[0])
        assert "seq 2 after seq 4" in str(reader.damaged[1])
    with TraceReader(path) as reader, pytest.raises(TraceFormatError):
        list(reader)  # strict: the first non-increasing seq raises, as before
