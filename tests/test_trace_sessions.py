"""``--session`` of trace show, trace stats and replay: one check, one error, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from recorder.reader import TraceReader
from recorder.records import EventRecord, MessageRecord
from recorder.writer import TraceWriter
from tests.realdata import TRACES
from vfioproxy.cli import main
from vfioproxy.replay.script import load_script
from vfioproxy.trace.sessions import NoSuchSessionError, TraceSessions

REALIZE = TRACES / "reference-realize-001.trace"


@pytest.fixture
def two_sessions(tmp_path: Path) -> Path:
    """The realize session as session 3, and a session 5 that only opened and closed
    (its server was unreachable), plus a proxy-wide event (no session)."""
    path = tmp_path / "two.trace"
    with TraceReader(REALIZE) as reader, TraceWriter(path, reader.header) as writer:
        for record in reader:
            if isinstance(record, MessageRecord):
                writer.write_message(3, record.direction, record.t_ns, record.data, record.fds)
            elif isinstance(record, EventRecord):
                writer.write_event(3, record.kind, record.t_ns, record.data)
        writer.write_event(5, "session_open", 1, {})
        writer.write_event(5, "session_close", 2, {"closed_by": "proxy"})
        writer.write_event(None, "rules_changed", 3, {})
    return path


def test_the_sessions_of_a_trace_are_those_with_messages_and_those_with_events_only(
    two_sessions,
):
    found = TraceSessions.read(two_sessions)
    assert (found.with_messages, found.events_only) == ((3,), (5,))
    found.require(3)
    found.require(3, messages=True)
    found.require(5)
    with pytest.raises(NoSuchSessionError, match=r"no session 5 with messages \("):
        found.require(5, messages=True)


@pytest.mark.parametrize("argv", [["trace", "show"], ["trace", "stats"],
                                  ["trace", "show", "--json"], ["trace", "stats", "--json"],
                                  ["replay", "client", "--server", "nobody.sock"]])
def test_a_session_the_trace_does_not_hold_exits_2_naming_the_sessions_there(
    capsys, two_sessions, argv
):
    code = main([*argv, "--session", "7", str(two_sessions)])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    verb = " ".join(argv[:2])
    assert err == (f"vfioproxy {verb}: {two_sessions}: no session 7 in the trace (sessions "
                   "with messages: 3; with events only: 5)\n")


def test_show_and_stats_select_a_session_with_events_only_and_replay_refuses_it(
    capsys, two_sessions
):
    assert main(["trace", "show", "--session", "5", str(two_sessions)]) == 0
    out = capsys.readouterr().out
    assert "s5 session_open" in out and " s3 " not in out
    assert main(["trace", "stats", "--json", "--session", "3", str(two_sessions)]) == 0
    assert '"messages": 96' in capsys.readouterr().out
    with pytest.raises(NoSuchSessionError, match="no session 5 with messages"):
        load_script(two_sessions, session=5)
