"""TraceSink's per-session files: two recordings into one directory never share a file."""

from __future__ import annotations

from recorder import sink as sink_module
from recorder.reader import TraceReader
from recorder.records import MessageRecord
from recorder.sink import TraceSink
from vfioproxy.side import Direction


def test_two_recordings_started_in_the_same_second_get_their_own_files(tmp_path, monkeypatch):
    monkeypatch.setattr(sink_module.time, "strftime", lambda fmt: "20261206-215900")
    out = tmp_path / "traces"
    with TraceSink(f"{out}/") as first, TraceSink(f"{out}/") as second:
        first.writer_for(1).write_message(1, Direction.C2S, 1, b"first")
        second.writer_for(1).write_message(1, Direction.C2S, 1, b"second")
        second.writer_for(2).write_message(2, Direction.C2S, 1, b"second, s2")
        assert first.files() == [out / "20261206-215900-s1.trace"]
        assert second.files() == [out / "20261206-215900-s1-2.trace",
                                  out / "20261206-215900-s2.trace"]
    for path, data in ((out / "20261206-215900-s1.trace", b"first"),
                       (out / "20261206-215900-s1-2.trace", b"second"),
                       (out / "20261206-215900-s2.trace", b"second, s2")):
        with TraceReader(path) as reader:
            assert [r.data for r in reader if isinstance(r, MessageRecord)] == [data]
