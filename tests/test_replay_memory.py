"""Replay memory is bounded by the replay's options, not by the trace: checked structurally.

A generated session of a few thousand config reads (answered, or never
answered) is replayed with a small ``window``; the script's statistics say
how many decoded messages were held at once, which must stay under the
window plus what the cursors keep, whatever the session's length.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from recorder.reader import TraceReader
from recorder.records import EventKind, MessageRecord, TraceHeader
from recorder.writer import TraceWriter
from tests.conftest import FD_HYGIENE
from tests.realdata import TRACES
from vfioproxy.io.transport import FdStream
from vfioproxy.io.unix import open_unix_listener
from vfioproxy.peers.server import DeviceOptions, open_device_server
from vfioproxy.protocol.bodies import RegionAccessBody
from vfioproxy.protocol.codec import build_command, build_reply, encode
from vfioproxy.protocol.header import Command
from vfioproxy.protocol.pci import Region
from vfioproxy.replay.client import ClientReplayOptions, replay_client
from vfioproxy.replay.script import CURSOR_KEEP, ReplayError, load_script
from vfioproxy.replay.server import ServerReplayOptions, serve_replay
from vfioproxy.side import Direction

pytestmark = FD_HYGIENE

COMMANDS = 1000
WINDOW = 32
#: what the reference device server answers to a 4-byte read of config offset 0
VENDOR_DEVICE = bytes.fromhex("361b0011")


def version_exchange() -> list[bytes]:
    with TraceReader(TRACES / "reference-realize-001.trace") as reader:
        return [r.data for r in reader if isinstance(r, MessageRecord)][:2]


def write_session(path: Path, commands: int, *, answered: bool, burst: bool = False) -> Path:
    """The reference VERSION exchange, then ``commands`` config reads (``burst``: all
    the commands, then all the replies)."""
    t_ns = 1000
    with TraceWriter(path, TraceHeader.now("test", {})) as writer:
        writer.write_event(1, EventKind.SESSION_OPEN, t_ns, {})
        for direction, data in zip((Direction.C2S, Direction.S2C), version_exchange(),
                                   strict=True):
            t_ns += 1000
            writer.write_message(1, direction, t_ns, data)
        for n in range(commands):
            command = build_command(Command.REGION_READ, n + 1,
                                    RegionAccessBody(0, Region.CONFIG, 4))
            t_ns += 1000
            writer.write_message(1, Direction.C2S, t_ns, encode(command)[0])
            if answered and not burst:
                reply = build_reply(command, RegionAccessBody(0, Region.CONFIG, 4, VENDOR_DEVICE))
                t_ns += 1000
                writer.write_message(1, Direction.S2C, t_ns, encode(reply)[0])
        for n in range(commands if burst else 0):
            command = build_command(Command.REGION_READ, n + 1,
                                    RegionAccessBody(0, Region.CONFIG, 4))
            reply = build_reply(command, RegionAccessBody(0, Region.CONFIG, 4, VENDOR_DEVICE))
            t_ns += 1000
            writer.write_message(1, Direction.S2C, t_ns, encode(reply)[0])
        writer.write_event(1, EventKind.SESSION_CLOSE, t_ns + 1000, {})
    return path


def bound(cursors: int) -> int:
    """Decoded messages a replay with ``cursors`` cursors may hold at once."""
    return WINDOW + cursors * CURSOR_KEEP


async def test_a_long_session_is_indexed_not_kept_and_read_again_in_one_pass_per_cursor(
    tmp_path,
):
    trace = write_session(tmp_path / "answered.trace", COMMANDS, answered=True)
    script = load_script(trace, keep=WINDOW)
    assert len(script) == 2 + 2 * COMMANDS
    stats = script.statistics()
    assert stats["held"] == stats["most_held"] == 0 and stats["passes"] == 0
    async with open_device_server(tmp_path / "dev.sock"):
        report = await replay_client(script, tmp_path / "dev.sock",
                                     ClientReplayOptions(window=WINDOW))
    assert report.ok, report.text()
    assert report.compared == report.matched == COMMANDS + 1
    stats = script.statistics()
    assert 0 < stats["most_held"] <= bound(3) < len(script) and stats["held"] == 0
    # one pass: the player's cursor also reads each recorded reply, just ahead of it
    assert stats["passes"] == 1 and stats["restarts"] == 0


async def test_a_burst_longer_than_the_window_is_sent_as_replies_make_room(tmp_path):
    trace = write_session(tmp_path / "burst.trace", COMMANDS, answered=True, burst=True)
    script = load_script(trace, keep=WINDOW)
    async with open_device_server(tmp_path / "dev.sock"):
        report = await replay_client(script, tmp_path / "dev.sock",
                                     ClientReplayOptions(window=WINDOW))
    assert report.ok, report.text()
    assert report.compared == report.matched == COMMANDS + 1
    stats = script.statistics()
    assert 0 < stats["most_held"] <= bound(3) and stats["restarts"] == 0
    assert stats["passes"] == 2  # the replies, far ahead of the player, have a cursor of their own


async def test_a_long_session_replayed_as_server_holds_its_window_only(tmp_path):
    trace = write_session(tmp_path / "answered.trace", COMMANDS, answered=True)
    served, played = load_script(trace, keep=WINDOW), load_script(trace, keep=WINDOW)
    async with trio.open_nursery() as nursery:
        reports = []

        async def run(task_status: trio.TaskStatus[None]) -> None:
            reports.append(await serve_replay(served, tmp_path / "replay.sock",
                                              ServerReplayOptions(window=WINDOW),
                                              task_status=task_status))

        await nursery.start(run)
        client = await replay_client(played, tmp_path / "replay.sock",
                                     ClientReplayOptions(window=WINDOW))
    assert client.ok and reports[0].ok, reports[0].text()
    assert reports[0].replayed == reports[0].recorded == len(served)
    stats = served.statistics()
    assert 0 < stats["most_held"] <= bound(2) and stats["restarts"] == 0


async def test_unanswered_commands_against_a_live_server_hold_nothing_per_command(tmp_path):
    trace = write_session(tmp_path / "unanswered.trace", COMMANDS, answered=False)
    script = load_script(trace, keep=WINDOW)
    async with open_device_server(tmp_path / "dev.sock"):
        report = await replay_client(script, tmp_path / "dev.sock",
                                     ClientReplayOptions(window=WINDOW))
    assert report.ok, report.text()
    assert report.sent == report.replayed - 1 == COMMANDS + 1
    assert report.stopped == "the recording ends before the reply to #4 REGION_READ cmd"
    assert script.statistics()["most_held"] <= bound(3)


async def test_a_server_answering_nothing_stops_the_replay_at_the_window(
    tmp_path, autojump_clock
):
    trace = write_session(tmp_path / "unanswered.trace", COMMANDS, answered=False)
    script = load_script(trace, keep=WINDOW)
    listener = await open_unix_listener(tmp_path / "mute.sock")

    async def answer_version_then_only_read() -> None:
        async with FdStream((await listener.accept()).socket) as stream:
            await stream.receive_message()
            await stream.send_message(version_exchange()[1])
            while True:
                await stream.receive_message()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer_version_then_only_read)
        report = await replay_client(script, tmp_path / "mute.sock",
                                     ClientReplayOptions(window=WINDOW, timeout=2))
        nursery.cancel_scope.cancel()
    await listener.aclose()
    assert report.sent == 1 + WINDOW and report.elapsed == pytest.approx(2)
    assert report.stopped == (
        f"at message #{4 + WINDOW} REGION_READ cmd: {WINDOW} commands await the server's "
        f"reply, the window (--window {WINDOW}), and none was answered within 2 s")


async def test_divergences_beyond_max_divergences_are_counted_not_kept(tmp_path):
    trace = write_session(tmp_path / "answered.trace", 200, answered=True)
    async with open_device_server(tmp_path / "dev.sock", options=DeviceOptions(vendor_id=0x1AF4)):
        report = await replay_client(trace, tmp_path / "dev.sock",
                                     ClientReplayOptions(max_divergences=5))
    assert len(report.divergences) == 5 and report.dropped == 195 and not report.ok
    assert report.to_json()["divergences_dropped"] == 195
    text = report.text().splitlines()
    assert "divergences (200):" in text
    assert ("  ... and 195 more divergence(s) counted, not kept (the report keeps the "
            "first 5: --max-divergences)") in text


async def test_a_long_session_whose_trace_changes_under_the_replay_is_an_error(tmp_path):
    trace = write_session(tmp_path / "session.trace", 100, answered=True)
    script = load_script(trace, keep=WINDOW)
    trace.unlink()
    write_session(trace, 100, answered=False)  # the same seqs, other messages
    async with open_device_server(tmp_path / "dev.sock"):
        with pytest.raises(ReplayError, match=r"session.trace: the trace changed during the "
                           r"replay \(message #5 is not the one loaded\)"):
            await replay_client(script, tmp_path / "dev.sock")
