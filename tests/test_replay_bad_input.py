"""Replaying traces that are cut short, too new, or hold nothing to replay."""

from __future__ import annotations

import os
from pathlib import Path

import attrs
import pytest
import trio

from recorder.errors import TraceFormatError, TraceVersionError
from recorder.reader import TraceReader
from recorder.records import EventRecord, MessageRecord, TraceHeader
from recorder.writer import TraceWriter
from tests.conftest import FD_HYGIENE
from tests.realdata import TRACES
from vfioproxy.peers.client import RealizeError, realize
from vfioproxy.peers.server import open_device_server
from vfioproxy.replay.client import replay_client
from vfioproxy.replay.script import ReplayError, load_script
from vfioproxy.replay.server import serve_replay
from vfioproxy.trace.sessions import NoSuchSessionError

pytestmark = FD_HYGIENE

REALIZE = TRACES / "reference-realize-001.trace"


def copy_trace(src: Path, dst: Path, *, upto_seq: int | None = None,
               header: TraceHeader | None = None) -> list[int]:
    """Copy ``src``'s records (up to ``upto_seq``) into ``dst``; returns the file size
    after each record, so a test can tear the file anywhere."""
    sizes = []
    with TraceReader(src) as reader, TraceWriter(dst, header or reader.header) as writer:
        sizes.append(writer.bytes_written)
        for record in reader:
            if upto_seq is not None and record.seq > upto_seq:
                break
            if isinstance(record, MessageRecord):
                writer.write_message(record.session, record.direction, record.t_ns,
                                     record.data, record.fds)
            elif isinstance(record, EventRecord):
                writer.write_event(record.session, record.kind, record.t_ns, record.data)
            sizes.append(writer.bytes_written)
    return sizes


async def test_a_torn_trace_replays_up_to_its_last_whole_record_and_says_where_it_stopped(
    tmp_path,
):
    sizes = copy_trace(REALIZE, tmp_path / "torn.trace")
    os.truncate(tmp_path / "torn.trace", sizes[28] + 7)  # 7 bytes into record 29
    script = load_script(tmp_path / "torn.trace")
    assert script.steps[-1].describe() == "#28 REGION_READ cmd"
    assert script.notes == (
        "trace truncated after record 28 (7 trailing bytes): the replay ends where the trace does",
    )
    async with open_device_server(tmp_path / "dev.sock"):
        report = await replay_client(tmp_path / "torn.trace", tmp_path / "dev.sock")
    assert report.ok, report.text()
    assert report.stopped == "the recording ends before the reply to #28 REGION_READ cmd"
    assert report.sent == 14 and report.replayed == 27
    assert "stopped: the recording ends before the reply to #28 REGION_READ cmd" in report.text()


async def test_a_session_cut_off_mid_realize_replays_partially_as_client_and_as_server(tmp_path):
    copy_trace(REALIZE, tmp_path / "cut.trace", upto_seq=29)  # no session close
    async with open_device_server(tmp_path / "dev.sock"):
        client = await replay_client(tmp_path / "cut.trace", tmp_path / "dev.sock")
    assert client.ok
    assert client.stopped == ("the recording was cut off after #29 REGION_READ reply "
                              "(no session close): replayed up to there")
    async with trio.open_nursery() as nursery:
        reports = []

        async def run(task_status: trio.TaskStatus[None]) -> None:
            reports.append(await serve_replay(tmp_path / "cut.trace", tmp_path / "r.sock",
                                              task_status=task_status))

        await nursery.start(run)
        with pytest.raises(RealizeError, match="R8 ROM BAR size probe: peer replied errno 22"):
            await realize(tmp_path / "r.sock")
    (server,) = reports
    assert server.divergences[0].headline() == (
        "live REGION_READ cmd id=14 (config space offset 0x30 ROM BAR): the recording has no "
        "more requests (it ends at #29 REGION_READ reply)"
    )
    assert server.stopped == client.stopped


def test_a_trace_from_a_newer_format_version_is_refused_naming_the_file(tmp_path):
    with TraceReader(REALIZE) as reader:
        newer = attrs.evolve(reader.header, version=(2, 0))
    copy_trace(REALIZE, tmp_path / "newer.trace", header=newer)
    with pytest.raises(TraceVersionError) as refused:
        load_script(tmp_path / "newer.trace")
    assert str(tmp_path / "newer.trace") in str(refused.value)
    assert "2.0" in str(refused.value)


def test_a_file_that_is_not_a_trace_is_refused(tmp_path):
    (tmp_path / "x.trace").write_bytes(b"\x00not a trace at all")
    with pytest.raises(TraceFormatError, match="not a vfioproxy trace"):
        load_script(tmp_path / "x.trace")


def test_a_trace_without_messages_has_nothing_to_replay(tmp_path):
    copy_trace(REALIZE, tmp_path / "empty.trace", upto_seq=1)  # the session_open event only
    with pytest.raises(ReplayError, match="holds no messages to replay"):
        load_script(tmp_path / "empty.trace")


def test_an_unknown_session_is_refused_naming_the_sessions_there():
    with pytest.raises(NoSuchSessionError,
                       match=r"no session 7 in the trace \(sessions with messages: 1\)"):
        load_script(REALIZE, session=7)


async def test_a_server_that_is_not_there_is_a_replay_error(tmp_path):
    with pytest.raises(ReplayError, match="cannot connect to the server"):
        await replay_client(REALIZE, tmp_path / "nobody.sock")
