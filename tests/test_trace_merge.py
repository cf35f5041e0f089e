"""``vfioproxy trace merge``: the bundled real traces of two hosts (a second
host made by rewriting a copy's header) and of several runs, as one trace."""

from __future__ import annotations

import hashlib
import itertools
import os
from datetime import UTC, datetime, timedelta

import attrs
import pytest

from recorder.reader import TraceReader
from recorder.records import EventRecord, MessageRecord, TraceHeader
from recorder.writer import TraceWriter
from tests.conftest import FD_HYGIENE
from tests.realdata import TRACES
from tests.test_cli_errors import one_error_line, run
from tests.test_trace_slice import WORKLOAD, newer
from vfioproxy.peers.server import open_device_server
from vfioproxy.replay.client import ClientReplayOptions, replay_client
from vfioproxy.side import Direction
from vfioproxy.trace.merge import merge_traces

pytestmark = FD_HYGIENE

REALIZE = TRACES / "reference-realize-001.trace"
GPIO = TRACES / "qemu-realize-gpio-001.trace"


def on_host(src, path, host, **changes):
    """A copy of the trace ``src`` whose header says it was recorded on ``host``
    (and ``changes``)."""
    with TraceReader(src) as reader, TraceWriter(path, attrs.evolve(reader.header, host=host,
                                                                     **changes)) as writer:
        for record in reader:
            writer.copy_record(record)
    return path


def contents(path):
    with TraceReader(path) as reader:
        return reader.header, list(reader)


def wall_ns(header, t_ns):
    """FORMAT.md §3: a record's wall-clock time, in ns since the epoch."""
    since_epoch = header.created - datetime(1970, 1, 1, tzinfo=UTC)
    return since_epoch // timedelta(microseconds=1) * 1000 + t_ns - header.mono_ns


def origins(records):
    """Each merged session's ``merged_from`` event: {new session: (input, old session)}."""
    return {r.session: (r.data["input"], r.data["session"]) for r in records
            if isinstance(r, EventRecord) and r.kind == "merged_from"}


def copied(records):
    """The records copied from the inputs (not the merge's own events)."""
    return [r for r in records if not (isinstance(r, EventRecord) and r.kind == "merged_from")]


def merged(tmp_path, *paths):
    out = tmp_path / "merged.trace"
    readers = [TraceReader(p) for p in paths]
    try:
        result = merge_traces(readers, out)
    finally:
        for reader in readers:
            reader.close()
    return out, result


@pytest.fixture
def two_hosts(tmp_path):
    """REALIZE (host vm) and the workload trace as recorded on host vm2 at the
    same time (its clock anchored 0.5 ms after REALIZE's)."""
    with TraceReader(REALIZE) as reader:
        created = reader.header.created + timedelta(microseconds=500)
    return REALIZE, on_host(WORKLOAD, tmp_path / "vm2.trace", "vm2", created=created)


def test_two_hosts_merge_into_one_trace_ordered_by_wall_clock(tmp_path, two_hosts):
    out, result = merged(tmp_path, *two_hosts)
    header, records = contents(out)
    inputs = [contents(p) for p in two_hosts]
    assert (result.records, result.messages) == (98 + 154 + 2, 96 + 152)
    assert result.sessions == ({1: 1}, {1: 2})  # REALIZE started first
    assert [r.seq for r in records] == list(range(1, 255))
    records = copied(records)
    assert header.source == "vfioproxy trace merge" and header.host is None
    # each input's records are there, in their order, at their wall-clock time
    for session, (in_header, in_records) in enumerate(inputs, start=1):
        mine = [r for r in records if r.session == session]
        assert len(mine) == len(in_records)
        for new, old in zip(mine, in_records, strict=True):
            assert wall_ns(header, new.t_ns) == wall_ns(in_header, old.t_ns)
            if isinstance(old, MessageRecord):
                assert (new.direction, new.data, new.fds) == (old.direction, old.data, old.fds)
            else:
                assert (new.kind, new.data) == (old.kind, old.data)
    # the merge took the earliest record at each step: two records in a row from
    # different inputs are in wall-clock order (within one input, file order)
    for a, b in itertools.pairwise(records):
        if a.session != b.session:
            assert wall_ns(header, a.t_ns) <= wall_ns(header, b.t_ns)
    assert len({r.session for r in records[:20]}) == 2  # the two sessions interleave


def test_the_merged_header_says_where_each_session_came_from(tmp_path, two_hosts):
    out, _ = merged(tmp_path, *two_hosts)
    header, records = contents(out)
    entries = header.info["merged_from"]
    assert [(e["path"], e["host"], e["source"]) for e in entries] == [
        (str(two_hosts[0]), "vm", "vfioproxy record"),
        (str(two_hosts[1]), "vm2", "vfioproxy record"),
    ]
    # each session's first record is its merged_from event, naming input and session
    assert origins(records) == {1: (0, 1), 2: (1, 1)}
    for session in (1, 2):
        first = next(r for r in records if r.session == session)
        assert (first.kind, first.data["input"]) == ("merged_from", session - 1)
    for entry, path in zip(entries, two_hosts, strict=True):
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["version"] == [1, 0]
        assert entry["info"] == contents(path)[0].info
    # the output's clock is that of the input whose clock started earliest
    vm2 = contents(two_hosts[1])[0]
    assert wall_ns(vm2, 0) < wall_ns(contents(REALIZE)[0], 0)  # a later anchor, a later boot
    assert (header.created, header.mono_ns) == (vm2.created, vm2.mono_ns)


async def test_each_session_of_a_merged_trace_replays(tmp_path, two_hosts):
    out, _ = merged(tmp_path, *two_hosts)
    for session, messages in ((1, 96), (2, 152)):
        async with open_device_server(tmp_path / "dev.sock"):
            report = await replay_client(out, tmp_path / "dev.sock",
                                         ClientReplayOptions(session=session))
        assert report.ok, report.text()
        assert report.replayed == messages


def test_two_runs_of_one_host_merge_with_their_sessions_renumbered(tmp_path):
    out, result = merged(tmp_path, GPIO, TRACES / "qemu-realize-gpio-002.trace", GPIO)
    header, records = contents(out)
    # gpio-001 was captured at 01:57:23.6, gpio-002 at 01:57:24.8: the first input
    # and its copy start together (input order breaks the tie), then gpio-002
    assert result.sessions == ({1: 1}, {1: 3}, {1: 2})
    assert result.records == 3 * 80 + 3
    assert origins(records) == {1: (0, 1), 2: (2, 1), 3: (1, 1)}
    records = copied(records)
    assert header.host is None  # rawcap imports name no host
    assert [r.session for r in records[:2]] == [1, 2]
    assert {r.session for r in records[160:]} == {3}


def test_merging_is_deterministic(tmp_path, two_hosts):
    out, _ = merged(tmp_path, *two_hosts)
    again = tmp_path / "again"
    again.mkdir()
    out2, _ = merged(again, *two_hosts)
    assert out.read_bytes() == out2.read_bytes()


def test_events_naming_messages_and_sessions_are_renumbered(tmp_path):
    src = tmp_path / "twins.trace"
    header = TraceHeader.now("vfioproxy record")
    command = bytes.fromhex("000004001000000000000000" "00000000")  # DEVICE_GET_INFO
    with TraceWriter(src, header) as writer:
        writer.write_event(1, "session_open", 10, {})
        writer.write_event(2, "session_open", 11, {"twin_of": 1})
        seq = writer.append_message(1, Direction.C2S, 20, command)
        writer.write_event(1, "note", 21, {"text": "that one", "seq": seq})
    out, result = merged(tmp_path, GPIO, src)
    _, records = contents(out)
    events = {r.kind: r for r in records if isinstance(r, EventRecord) and r.session in (2, 3)}
    message = next(r for r in records if isinstance(r, MessageRecord) and r.session == 2)
    assert result.sessions == ({1: 1}, {1: 2, 2: 3})
    assert events["session_open"].data == {"twin_of": 2}
    assert events["note"].data == {"text": "that one", "seq": message.seq}


def test_the_cli_merges_and_names_the_renumbered_sessions(capsys, tmp_path, two_hosts):
    out = tmp_path / "both.trace"
    code, text, _ = run(capsys, "trace", "merge", out, *two_hosts)
    assert code == 0
    assert text == (f"{two_hosts[0]}: sessions 1 -> 1\n{two_hosts[1]}: sessions 1 -> 2\n"
                    f"-> {out}: 248 messages, 254 records\n")
    code, text, _ = run(capsys, "trace", "show", "--session", "2", out)
    assert code == 0 and "s2 VERSION cmd" in text


@pytest.mark.parametrize(("inputs", "words"), [
    (["{bogus}"], "notes.txt: not a vfioproxy trace"),
    (["{major}"], "major.trace: record 0: trace format 2.0 is newer than this vfioproxy "
                  "supports (1.x); upgrade vfioproxy"),
    (["{minor}"], "minor.trace: trace format 1.7 is newer than this vfioproxy writes (1.1): "
                  "copying it would drop what 1.7 added; upgrade vfioproxy"),
    (["{missing}"], "nope.trace: No such file or directory"),
])
def test_bad_inputs_are_one_line_errors_and_write_nothing(capsys, tmp_path, inputs, words):
    bogus = tmp_path / "notes.txt"
    bogus.write_text("hello\n")
    values = {"bogus": bogus, "major": newer(tmp_path / "major.trace", (2, 0)),
              "minor": newer(tmp_path / "minor.trace", (1, 7)), "missing": tmp_path / "nope.trace"}
    before = sorted(os.listdir(tmp_path))
    argv = [REALIZE, *(a.format(**values) for a in inputs)]
    code, _, err = run(capsys, "trace", "merge", tmp_path / "out.trace", *argv)
    assert code == 2
    assert words in one_error_line(err)
    assert sorted(os.listdir(tmp_path)) == before


def test_an_existing_output_is_kept_without_force_and_an_input_never_replaced(capsys, tmp_path):
    out = tmp_path / "out.trace"
    out.write_text("mine\n")
    code, _, err = run(capsys, "trace", "merge", out, REALIZE, GPIO)
    assert code == 2 and one_error_line(err).endswith("out.trace already exists (--force "
                                                       "replaces it)")
    assert out.read_text() == "mine\n"
    copy = tmp_path / "copy.trace"
    copy.write_bytes(GPIO.read_bytes())
    code, _, err = run(capsys, "trace", "merge", copy, REALIZE, copy, "--force")
    assert code == 2 and "copy.trace is also an input" in one_error_line(err)
    assert copy.read_bytes() == GPIO.read_bytes()
    code, _, _ = run(capsys, "trace", "merge", out, REALIZE, GPIO, "--force")
    assert code == 0 and contents(out)[0].source == "vfioproxy trace merge"


def test_one_input_is_not_a_merge(capsys, tmp_path):
    code, _, err = run(capsys, "trace", "merge", tmp_path / "out.trace", REALIZE)
    assert code == 2 and "merging needs at least two traces" in one_error_line(err)


def test_a_torn_input_is_merged_up_to_its_last_whole_record_with_a_warning(capsys, tmp_path):
    torn = tmp_path / "torn.trace"
    torn.write_bytes(GPIO.read_bytes()[:-7])  # into the final session_close
    out = tmp_path / "out.trace"
    code, text, err = run(capsys, "trace", "merge", out, torn, REALIZE)
    assert code == 0
    assert "torn.trace: trace truncated after record 79" in err
    assert text.endswith("174 messages, 179 records\n")  # 78 + 96; 79 + 98 records + 2 origins
