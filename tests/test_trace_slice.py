"""``vfioproxy trace slice``: parts of the bundled real traces, as valid traces
that keep their provenance, their pairs and their setup, and still replay."""

from __future__ import annotations

import hashlib
import os

import msgpack
import pytest
import trio

from recorder.reader import TraceReader
from recorder.records import FORMAT_VERSION, EventRecord, MessageRecord, TraceHeader
from recorder.writer import TraceWriter
from tests.conftest import FD_HYGIENE
from tests.realdata import TRACES
from tests.test_cli_errors import one_error_line, run
from tests.test_replay_server import serve
from vfioproxy.peers.server import open_device_server
from vfioproxy.replay.client import ClientReplayOptions, replay_client
from vfioproxy.replay.script import load_script
from vfioproxy.side import Direction
from vfioproxy.trace.decoded import DecodedMessage, decoded_records
from vfioproxy.trace.filter import compile_filter
from vfioproxy.trace.slice import SliceSpec, slice_trace

pytestmark = FD_HYGIENE

WORKLOAD = TRACES / "reference-realize-workload-intx-001.trace"
E1000E = TRACES / "qemu-realize-qemu-server-e1000e-001.trace"
NVME_BOOT = TRACES / "qemu-boot-qemu-server-nvme-001.trace"

#: the setup of WORKLOAD's session: VERSION (#2, #3) and the first DMA maps (#4..#7)
SETUP = [2, 3, 4, 5, 6, 7]
#: DMA_UNMAP and DMA_MAPs (#88..#97) the client sent before #100
REMAP = list(range(88, 98))


def sliced(tmp_path, src, name="part.trace", **spec):
    out = tmp_path / name
    with TraceReader(src) as reader:
        result = slice_trace(reader, out, SliceSpec(**spec))
    return out, result


def records(path):
    with TraceReader(path) as reader:
        return reader.header, list(reader)


def seqs(path, kind=MessageRecord):
    return [r.seq for r in records(path)[1] if isinstance(r, kind)]


def assert_valid_derived_trace(path, source):
    """FORMAT.md's invariants: seq increasing, events name kept messages, the
    source's header kept with its provenance added."""
    header, kept = records(path)
    original, _ = records(source)
    assert [r.seq for r in kept] == sorted({r.seq for r in kept})
    messages = {r.seq for r in kept if isinstance(r, MessageRecord)}
    for record in kept:
        if isinstance(record, EventRecord) and "seq" in record.data:
            assert record.data["seq"] in messages
    assert (header.created, header.mono_ns, header.host, header.source) == (
        original.created, original.mono_ns, original.host, original.source)
    assert header.version == FORMAT_VERSION
    assert {k: v for k, v in header.info.items() if k != "sliced_from"} == original.info
    provenance = header.info["sliced_from"]
    assert provenance["path"] == str(source)
    assert provenance["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    return header, kept


def test_a_seq_range_keeps_its_messages_with_their_original_numbers_and_the_setup(tmp_path):
    out, result = sliced(tmp_path, WORKLOAD, seq=(100, 154))
    header, kept = assert_valid_derived_trace(out, WORKLOAD)
    assert seqs(out) == SETUP + REMAP + list(range(100, 154))
    assert [(r.seq, r.kind) for r in kept if isinstance(r, EventRecord)] == [
        (1, "session_open"), (154, "session_close")]
    assert (result.messages, result.records, result.added, result.sessions) == (70, 72, 16, (1,))
    assert header.info["sliced_from"] == {
        "path": str(WORKLOAD), "sha256": header.info["sliced_from"]["sha256"],
        "filter": None, "seq": [100, 154], "time": None, "session": None,
        "paired": True, "setup": True, "seq_kept": True,
    }
    # the records are the source's, byte for byte
    with TraceReader(WORKLOAD) as reader:
        source = {r.seq: r for r in reader}
    assert all(source[r.seq] == r for r in kept)


def test_a_filter_selecting_a_seq_range_keeps_what_the_range_keeps(tmp_path):
    # -Y decodes the trace, --seq reads only the headers: the same pairs and setup
    by_range, _ = sliced(tmp_path, WORKLOAD, seq=(100, 154))
    flt = compile_filter("seq >= 100 and seq <= 154")
    by_filter, _ = sliced(tmp_path, WORKLOAD, "filtered.trace", filter=flt)
    assert records(by_filter)[1] == records(by_range)[1]


def test_without_setup_a_seq_range_keeps_only_itself(tmp_path):
    out, result = sliced(tmp_path, WORKLOAD, seq=(100, 154), setup=False)
    assert seqs(out) == list(range(100, 154))
    assert result.added == 0


def test_a_filter_on_replies_keeps_their_commands(tmp_path):
    flt = compile_filter("command == REGION_READ and kind == reply")
    out, result = sliced(tmp_path, WORKLOAD, filter=flt)
    assert_valid_derived_trace(out, WORKLOAD)
    # 15 REGION_READ replies, their 15 commands, and the setup before the first
    assert (result.messages, result.added) == (36, 21)
    _, kept = records(out)
    decoded = [i for i in decoded_records(kept) if isinstance(i, DecodedMessage)]
    reads = [d for d in decoded if d.observation.message.command != 1 and d.record.seq > 7]
    assert len(reads) == 30
    assert all(not d.observation.violations for d in decoded)  # every reply has its command
    assert sum(d.observation.message.header.is_reply for d in reads) == 15


def test_without_pairing_a_filter_on_replies_keeps_only_the_replies(tmp_path):
    flt = compile_filter("command == REGION_READ and kind == reply")
    out, result = sliced(tmp_path, WORKLOAD, filter=flt, pair=False, setup=False)
    assert result.messages == 15 and result.added == 0
    _, kept = records(out)
    decoded = [i for i in decoded_records(kept) if isinstance(i, DecodedMessage)]
    assert all(d.observation.message.header.is_reply for d in decoded)
    assert {v.kind for d in decoded for v in d.observation.violations} == {"unknown_reply_id"}


def test_a_time_range_counts_seconds_from_the_first_record_and_keeps_the_pair_at_its_end(
    tmp_path,
):
    out, result = sliced(tmp_path, WORKLOAD, time=(0.005, 0.008))
    assert_valid_derived_trace(out, WORKLOAD)
    # #42 (5.035 ms) .. #68 (7.964 ms, a command): its reply #69 comes with it
    assert seqs(out) == SETUP + list(range(42, 70))
    assert result.added == 6


def test_a_session_of_a_merged_trace_is_sliced_alone(capsys, tmp_path):
    merged = tmp_path / "merged.trace"
    code, _, _ = run(capsys, "trace", "merge", merged, TRACES / "reference-realize-001.trace",
                     WORKLOAD)
    assert code == 0
    out, result = sliced(tmp_path, merged, session=2)
    _, kept = records(out)
    assert {r.session for r in kept} == {2}
    assert result.messages == 152 and result.sessions == (2,)


async def test_a_slice_of_the_middle_replays_against_the_reference_server(tmp_path):
    out, _ = sliced(tmp_path, WORKLOAD, seq=(100, 154))
    async with open_device_server(tmp_path / "dev.sock"):
        report = await replay_client(out, tmp_path / "dev.sock")
    assert report.ok, report.text()
    assert report.replayed == report.recorded == 70 and report.stopped is None


async def test_a_slice_of_the_middle_without_its_setup_does_not_replay(tmp_path):
    out, _ = sliced(tmp_path, WORKLOAD, seq=(100, 154), setup=False)
    async with open_device_server(tmp_path / "dev.sock"):
        report = await replay_client(out, tmp_path / "dev.sock",
                                     ClientReplayOptions(timeout=0.3))
    assert not report.ok  # no VERSION, no guest memory: the device's DMA goes nowhere
    assert any("VERSION" in note for note in load_script(out).notes)


@pytest.mark.parametrize(("src", "seq"), [(E1000E, (40, 80)), (NVME_BOOT, (500, 700))],
                         ids=["e1000e-realize", "nvme-boot"])
async def test_a_slice_of_a_real_qemu_trace_replays_as_client_against_itself_as_server(
    tmp_path, src, seq
):
    out, result = sliced(tmp_path, src, seq=seq)
    assert_valid_derived_trace(out, src)
    script = load_script(out)
    assert script.notes == () and script.unanswered == ()
    async with trio.open_nursery() as nursery:
        server = await serve(nursery, script, tmp_path / "replay.sock")
        client = await replay_client(script, tmp_path / "replay.sock")
    assert client.ok, client.text()
    assert server.report is not None and server.report.ok, server.report.text()
    assert client.replayed == server.report.replayed == len(script.steps) == result.messages


def injected_trace(path):
    """A session whose messages carry an ``inject`` event each and a ``note``
    naming one: written the way the proxy writes them."""
    header = TraceHeader.now("vfioproxy record")
    command = bytes.fromhex("0400100000000000000000000000")  # DEVICE_GET_INFO cmd, after msg_id
    with TraceWriter(path, header) as writer:
        writer.write_event(1, "session_open", 10, {"server_path": "s.sock"})
        for i in range(4):
            data = i.to_bytes(2, "little") + command
            applied = [{"rule": 1, "action": "delay", "text": "delay 1ms", "value": 0.001}]
            writer.append_message(1, Direction.C2S, 100 + i, data,
                                  events=[("inject", {"direction": "c2s", "index": i,
                                                      "applied": applied})])
        writer.write_event(1, "note", 200, {"text": "about #4", "seq": 4})
        writer.write_event(1, "session_close", 300, {"closed_by": "client", "reason": "EOF"})


def test_events_go_with_the_messages_they_belong_to(tmp_path):
    src = tmp_path / "injected.trace"
    injected_trace(src)
    assert [(r.seq, getattr(r, "kind", "m")) for r in records(src)[1]] == [
        (1, "session_open"), (2, "m"), (3, "inject"), (4, "m"), (5, "inject"), (6, "m"),
        (7, "inject"), (8, "m"), (9, "inject"), (10, "note"), (11, "session_close")]
    out, _ = sliced(tmp_path, src, seq=(4, 5), pair=False, setup=False)
    assert [r.seq for r in records(out)[1]] == [1, 4, 5, 10, 11]
    out, _ = sliced(tmp_path, src, "other.trace", seq=(6, 9), pair=False, setup=False)
    assert [r.seq for r in records(out)[1]] == [1, 6, 7, 8, 9, 11]


def test_a_torn_source_is_sliced_up_to_its_last_whole_record_with_a_warning(capsys, tmp_path):
    torn = tmp_path / "torn.trace"
    torn.write_bytes(WORKLOAD.read_bytes()[:-7])  # into the final session_close
    code, out, err = run(capsys, "trace", "slice", torn, tmp_path / "part.trace", "--seq", "100:")
    assert code == 0
    assert "trace truncated after record 153" in err
    assert "70 messages (16 added for pairing and setup), 71 records" in out
    assert seqs(tmp_path / "part.trace", EventRecord) == [1]


def test_the_cli_slices_and_says_what_it_kept(capsys, tmp_path):
    out = tmp_path / "rom.trace"
    code, text, _ = run(capsys, "trace", "slice", WORKLOAD, out, "-Y", "kind == reply",
                        "--seq", ":20", "--no-setup")
    assert code == 0
    assert text == (f"{WORKLOAD} -> {out}: 18 messages (9 added for pairing and setup), "
                    "20 records, sessions 1\n")  # and the open, the close
    code, text, _ = run(capsys, "trace", "show", out)
    assert code == 0 and "VERSION reply" in text


def newer(path, version):
    """A copy of WORKLOAD whose header claims format ``version``."""
    with open(WORKLOAD, "rb") as file:
        unpacker = msgpack.Unpacker(file, raw=False)
        header = next(unpacker)
        consumed = unpacker.tell()
    header["version"] = list(version)
    path.write_bytes(msgpack.packb(header) + WORKLOAD.read_bytes()[consumed:])
    return path


@pytest.mark.parametrize(("argv", "words"), [
    (["{out}", "--seq", "5:3"], "argument --seq: expected A:B"),
    (["{out}", "--time", "x:"], "argument --time: expected A:B"),
    (["{out}", "-Y", "commnd == VERSION"], "command"),
    (["{out}", "--session", "7"], "no session 7 in the trace"),
    (["{existing}"], "already exists (--force replaces it)"),
    (["{src}", "--force"], "is also an input"),
    (["{nodir}"], "nodir/out.trace: No such file or directory"),
])
def test_bad_slices_are_one_line_errors_and_leave_nothing_behind(capsys, tmp_path, argv, words):
    existing = tmp_path / "existing.trace"
    existing.write_text("mine\n")
    src = tmp_path / "src.trace"
    src.write_bytes(WORKLOAD.read_bytes())
    values = {"out": tmp_path / "out.trace", "existing": existing, "src": src,
              "nodir": tmp_path / "nodir" / "out.trace"}
    argv = [a.format(**values) for a in argv]
    before = sorted(os.listdir(tmp_path))
    code, _, err = run(capsys, "trace", "slice", src, *argv)
    assert code == 2
    assert words in one_error_line(err)
    assert sorted(os.listdir(tmp_path)) == before
    assert existing.read_text() == "mine\n" and src.read_bytes() == WORKLOAD.read_bytes()


@pytest.mark.parametrize(("version", "words"), [
    ((2, 0), "trace format 2.0 is newer than this vfioproxy supports (1.x)"),
    ((1, 9), "trace format 1.9 is newer than this vfioproxy writes (1.1)"),
])
def test_a_newer_format_version_is_refused(capsys, tmp_path, version, words):
    src = newer(tmp_path / "newer.trace", version)
    code, _, err = run(capsys, "trace", "slice", src, tmp_path / "out.trace")
    assert code == 2 and words in one_error_line(err) and "newer.trace" in err
    assert not (tmp_path / "out.trace").exists()


def test_a_file_that_is_not_a_trace_is_refused(capsys, tmp_path):
    bogus = tmp_path / "notes.txt"
    bogus.write_text("hello\n")
    code, _, err = run(capsys, "trace", "slice", bogus, tmp_path / "out.trace")
    assert code == 2 and "notes.txt: not a vfioproxy trace" in one_error_line(err)


def test_pairing_follows_at_most_max_open_sessions_sessions(tmp_path):
    """Session 1 sends a command, sessions 2 and 3 talk, then session 1's reply
    comes. Slicing out that reply keeps its command while session 1 is
    followed; with a window of 2 sessions it was forgotten (the memory a slice
    takes follows the sessions open at once, not the trace)."""
    src = tmp_path / "three.trace"
    command = bytes.fromhex("0400" "10000000" "00000000" "00000000")  # DEVICE_GET_INFO
    reply = bytes.fromhex("0400" "10000000" "01000000" "00000000")
    with TraceWriter(src, TraceHeader.now("vfioproxy record")) as writer:
        writer.append_message(1, Direction.C2S, 10, (1).to_bytes(2, "little") + command)
        for session in (2, 3):
            writer.append_message(session, Direction.C2S, 20, (7).to_bytes(2, "little") + command)
        last = writer.append_message(1, Direction.S2C, 30, (1).to_bytes(2, "little") + reply)
    out, _ = sliced(tmp_path, src, seq=(last, last), setup=False)
    assert seqs(out) == [1, last]
    out, _ = sliced(tmp_path, src, "windowed.trace", seq=(last, last), setup=False,
                    max_open_sessions=2)
    assert seqs(out) == [last]
