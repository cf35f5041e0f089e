"""Following a trace that is still being written: ``TraceReader.follow`` and
``vfioproxy trace export --follow`` (pcapng into a pipe, as ``wireshark -k -i -``
reads it)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time

import pytest

from recorder.reader import PAUSED, TraceReader
from recorder.records import EventRecord, MessageRecord, TraceHeader
from recorder.writer import TraceWriter
from tests.realdata import TRACES
from tests.test_cli_live import VFIOPROXY
from tests.test_pcapng import Capture, blocks
from tests.test_proxy_inject import read_cmd
from tests.test_views import version_exchange
from vfioproxy.side import Direction
from vfioproxy.trace.decoded import DecodedMessage, decoded_records
from vfioproxy.trace.reading import open_trace

REFERENCE = TRACES / "reference-realize-001.trace"
#: how long a test waits for the follower at most (it polls every 0.1 s)
PATIENCE = 10.0


def source_records():
    with open_trace(REFERENCE) as reader:
        return reader.header, list(reader)


def written(tmp_path, count):
    """The bytes of a trace of the reference trace's first ``count`` records, and
    where each record ends in them (the header's end first)."""
    header, records = source_records()
    path = tmp_path / "whole.trace"
    ends = []
    with TraceWriter(path, header) as writer:
        ends.append(os.path.getsize(path))
        for record in records[:count]:
            writer.copy_record(record)
            ends.append(os.path.getsize(path))
    return path.read_bytes(), ends, records[:count]


def test_follow_pauses_at_the_end_waits_for_more_and_ends_when_the_file_goes(tmp_path):
    data, ends, records = written(tmp_path, 5)
    trace = tmp_path / "t.trace"
    trace.write_bytes(data[:ends[3]])
    idle = []
    with TraceReader(trace, skip_damaged=True) as reader:
        followed = reader.follow(poll=0.01, idle=lambda: idle.append(True))
        # the lenient reader's held record is let go at the pause
        assert [next(followed) for _ in range(4)] == [*records[:3], PAUSED]
        assert idle == []  # called when the consumer comes back, after writing
        with open(trace, "ab") as file:
            file.write(data[ends[3]:ends[4]])
        assert next(followed) == records[3] and idle == [True]
        assert next(followed) is PAUSED
        # a record not yet whole is no damage: it is waited for
        with open(trace, "ab") as file:
            file.write(data[ends[4]:ends[4] + 5])
        assert next(followed) is PAUSED
        with open(trace, "ab") as file:
            file.write(data[ends[4] + 5:])
        assert next(followed) == records[4]
        assert next(followed) is PAUSED
        assert reader.damaged_count == 0 and len(idle) >= 3
        os.unlink(trace)
        with pytest.raises(StopIteration):
            next(followed)


def test_follow_ends_when_the_path_names_another_file(tmp_path):
    trace = tmp_path / "t.trace"
    header, records = source_records()
    with TraceWriter(trace, header) as writer:
        writer.copy_record(records[0])
    with TraceReader(trace) as reader:
        followed = reader.follow(poll=0.01)
        assert next(followed) == records[0] and next(followed) is PAUSED
        with TraceWriter(tmp_path / "other.trace", header) as other:
            other.copy_record(records[0])
        os.replace(tmp_path / "other.trace", trace)
        assert list(followed) == []


def test_a_pause_lets_go_of_the_message_held_for_its_inject_event(tmp_path):
    trace = tmp_path / "t.trace"
    with TraceWriter(trace, TraceHeader.now("test", {})) as writer:
        version_exchange(writer)
        writer.append_message(1, Direction.C2S, 5, read_cmd(1), ())
    with TraceReader(trace) as reader:
        records = list(reader)
    inject = EventRecord(9, 1, 6, "inject", {"direction": "c2s", "index": 1, "applied": []})
    items = list(decoded_records([*records, PAUSED, inject]))
    messages = [i for i in items if isinstance(i, DecodedMessage)]
    assert [m.record.seq for m in messages] == [r.seq for r in records]
    assert messages[-1].injection is None and items[-1] == inject
    # without the pause, the event is the message's
    joined = [i for i in decoded_records([*records, inject]) if isinstance(i, DecodedMessage)]
    assert joined[-1].injection == inject


# --- the command line, in a pipe ----------------------------------------------------


class Follower:
    """``trace export --format pcapng --follow TRACE -`` in a subprocess, its
    output read as it comes."""

    def __init__(self, trace):
        self.proc = subprocess.Popen(
            [*VFIOPROXY, "trace", "export", "--format", "pcapng", "--follow", str(trace), "-"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.data = b""

    def seqs(self):
        found, _ = blocks(self.data)
        if not found:
            return []
        capture = Capture(self.data, whole=False)
        return [packet["seq"] for packet in capture.packets]

    def until(self, seq):
        """Read until the packet of ``seq`` has come; the seqs read."""
        deadline = time.monotonic() + PATIENCE
        while seq not in self.seqs():
            left = deadline - time.monotonic()
            assert left > 0, f"no packet {seq} from the follower: {self.seqs()}"
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
                assert chunk, self.proc.stderr.read()
                self.data += chunk
        return self.seqs()

    def ended(self):
        """The exit status and stderr once it ends by itself (within PATIENCE)."""
        try:
            _, err = self.proc.communicate(timeout=PATIENCE)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.communicate()
        return self.proc.returncode, err.decode()


def _cut_after_message(records, at):
    """The index just past the first message record at or after ``at``."""
    while not isinstance(records[at], MessageRecord):
        at += 1
    return at + 1


def test_export_follow_streams_records_as_they_are_written_until_the_trace_goes(tmp_path):
    trace = tmp_path / "live.trace"
    header, records = source_records()
    first, second = _cut_after_message(records, 10), _cut_after_message(records, 40)
    with TraceWriter(trace, header) as writer:
        for record in records[:first]:
            writer.copy_record(record)
        follower = Follower(trace)
        # the last one is a message: held to see an inject event, let go at the pause
        assert follower.until(records[first - 1].seq) == [r.seq for r in records[:first]]
        for record in records[first:second]:
            writer.copy_record(record)
        assert follower.until(records[second - 1].seq) == [r.seq for r in records[:second]]
        assert follower.proc.poll() is None
    os.unlink(trace)
    assert follower.ended() == (0, "")


def test_export_follow_ends_quietly_when_the_pipe_closes_or_on_ctrl_c(tmp_path):
    trace = tmp_path / "live.trace"
    header, records = source_records()
    with TraceWriter(trace, header) as writer:
        writer.copy_record(records[0])
        closed, interrupted = Follower(trace), Follower(trace)
        closed.until(records[0].seq)
        interrupted.until(records[0].seq)
        closed.proc.stdout.close()  # nothing more written: it sees the pipe close anyway
        assert closed.ended() == (0, "")
        for record in records[1:]:
            writer.copy_record(record)
        interrupted.until(records[-1].seq)
        interrupted.proc.send_signal(signal.SIGINT)
        assert interrupted.ended() == (0, "")
