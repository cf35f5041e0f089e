"""Replay as server: recorded servers towards live clients (real sockets, real fds)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from recorder.reader import TraceReader
from recorder.records import EventRecord
from recorder.writer import TraceWriter
from tests.conftest import FD_HYGIENE
from tests.realdata import TRACES
from vfioproxy.io.transport import open_unix_fd_stream
from vfioproxy.peers.client import RealizeError, RealizeOptions, realize
from vfioproxy.peers.server import open_device_server
from vfioproxy.replay.client import replay_client
from vfioproxy.replay.report import ReplayReport
from vfioproxy.replay.script import Script, load_script
from vfioproxy.replay.server import ServerReplayOptions, serve_replay

pytestmark = FD_HYGIENE

E1000E = TRACES / "qemu-realize-qemu-server-e1000e-001.trace"
LIBVFIO_USER = TRACES / "qemu-realize-libvfio-user-server-001.trace"
ALL_TRACES = sorted(TRACES.glob("*.trace"))


class ReplayServer:
    """``serve_replay`` in a nursery; ``report`` once its client has left."""

    def __init__(self, trace: Path | Script, path: Path, options: ServerReplayOptions) -> None:
        self.trace, self.path, self.options = trace, path, options
        self.report: ReplayReport | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.report = await serve_replay(self.trace, self.path, self.options,
                                         task_status=task_status)


async def serve(nursery: trio.Nursery, trace: Path | Script, path: Path,
                options: ServerReplayOptions | None = None) -> ReplayServer:
    server = ReplayServer(trace, path, options or ServerReplayOptions())
    await nursery.start(server.run)
    return server


@pytest.mark.parametrize("path", [E1000E, LIBVFIO_USER], ids=lambda p: p.stem)
async def test_a_real_qemu_realize_trace_replayed_as_server_lets_the_realize_client_complete(
    path, tmp_path
):
    async with trio.open_nursery() as nursery:
        server = await serve(nursery, path, tmp_path / "replay.sock")
        result = await realize(tmp_path / "replay.sock")
    assert result.timings.realize is not None and result.timings.reset is not None
    assert server.report is not None and server.report.ok, server.report.text()
    assert server.report.replayed == server.report.recorded
    if path == E1000E:
        assert (result.vendor_id, result.device_id) == (0x8086, 0x10D3)
        assert result.msix is not None and result.msix.entries == 5
    else:  # its BAR1 comes with a region file the client mmaps (sparse areas)
        bar1 = result.regions[1]
        assert bar1.fd and bar1.mmapped == ((0x0, 0x1000), (0x2000, 0x1000))


@pytest.mark.parametrize("path", ALL_TRACES, ids=lambda p: p.stem)
async def test_every_bundled_trace_replays_against_its_own_recorded_server(path, tmp_path):
    script = load_script(path)
    async with trio.open_nursery() as nursery:
        server = await serve(nursery, script, tmp_path / "replay.sock")
        client = await replay_client(script, tmp_path / "replay.sock")
    assert client.ok, client.text()
    assert server.report is not None and server.report.ok, server.report.text()
    assert client.replayed == server.report.replayed == len(script.steps)


async def test_a_request_no_recording_has_is_answered_einval_and_reported_with_the_nearest(
    tmp_path,
):
    async with trio.open_nursery() as nursery:
        server = await serve(nursery, E1000E, tmp_path / "replay.sock")
        with pytest.raises(RealizeError) as failure:
            await realize(tmp_path / "replay.sock", RealizeOptions(ram_fd=False))
    assert failure.value.step == "R2" and failure.value.errno == 22
    report = server.report
    assert report is not None
    first = report.divergences[0]
    assert first.kind == "unmatched"
    assert first.text().splitlines()[:4] == [
        "live DMA_MAP cmd id=1 (iova 0x0 size 0x20000000): no recorded request matches it",
        "  nearest recorded requests:",
        "    #4 DMA_MAP cmd: fds 0 != recorded 1; fds[0].kind (absent) != recorded memfd; "
        "fds[0].size (absent) != recorded 0x20000000",
        "    #6 DMA_MAP cmd: flags 3 != recorded 1; iova 0x0 != recorded 0xfffc0000; "
        "size 0x20000000 != recorded 0x40000",
    ]


async def test_on_mismatch_close_closes_the_connection_at_the_unmatched_request(tmp_path):
    options = ServerReplayOptions(on_mismatch="close")
    async with trio.open_nursery() as nursery:
        server = await serve(nursery, E1000E, tmp_path / "replay.sock", options)
        with pytest.raises(RealizeError):
            await realize(tmp_path / "replay.sock", RealizeOptions(ram_fd=False))
    assert server.report is not None
    assert server.report.stopped == (
        "closed the connection at the unmatched DMA_MAP cmd id=1 (on_mismatch close)")


async def test_on_mismatch_passthrough_forwards_the_request_to_a_live_server(tmp_path):
    options = ServerReplayOptions(on_mismatch="passthrough",
                                  passthrough=str(tmp_path / "dev.sock"))
    async with open_device_server(tmp_path / "dev.sock"), trio.open_nursery() as nursery:
        server = await serve(nursery, E1000E, tmp_path / "replay.sock", options)
        # the fd-less DMA_MAP matches no recorded one: the live server answers it
        result = await realize(tmp_path / "replay.sock",
                               RealizeOptions(ram_fd=False, reset=False))
    assert (result.vendor_id, result.device_id) == (0x8086, 0x10D3)  # the rest is recorded
    assert server.report is not None and server.report.notes == ()
    kinds = [d.kind for d in server.report.divergences]
    assert kinds[0] == "unmatched" and set(kinds[1:]) == {"missing"}  # no reset this time


async def test_recorded_requests_the_client_skips_are_reported_as_missing(tmp_path):
    async with trio.open_nursery() as nursery:
        server = await serve(nursery, E1000E, tmp_path / "replay.sock")
        await realize(tmp_path / "replay.sock", RealizeOptions(rombar=False))
    report = server.report
    assert report is not None
    assert [d.headline() for d in report.divergences] == [
        "message #28 REGION_READ cmd (config space offset 0x30 ROM BAR): the client never sent it",
        "message #30 REGION_WRITE cmd (config space offset 0x30 ROM BAR): "
        "the client never sent it",
        "message #32 REGION_READ cmd (config space offset 0x30 ROM BAR): the client never sent it",
        "message #34 REGION_WRITE cmd (config space offset 0x30 ROM BAR): "
        "the client never sent it",
    ]
    assert report.stopped is not None and "4 recorded message(s) still to come" in report.stopped


async def test_a_client_that_goes_quiet_is_reported_as_a_timeout(tmp_path, autojump_clock):
    version = load_script(E1000E).steps[0].data
    async with trio.open_nursery() as nursery:
        server = await serve(nursery, E1000E, tmp_path / "replay.sock",
                             ServerReplayOptions(timeout=3))
        async with await open_unix_fd_stream(tmp_path / "replay.sock") as stream:
            await stream.send_message(version)
            await stream.receive_message()
            await trio.sleep(10)
    report = server.report
    assert report is not None
    assert [d.headline() for d in report.divergences] == [
        "message #4 DMA_MAP cmd (iova 0x0 size 0x20000000): the client sent nothing for 3 s; "
        "the recording continues with this request"
    ]
    assert report.matched == 1 and report.elapsed == pytest.approx(3)


async def test_the_client_answers_dma_reads_of_bytes_the_server_wrote_from_guest_memory(tmp_path):
    """The recorded server's first DMA_WRITE is changed; the replayed client sees the
    change, and its answer to the DMA_READ of the same bytes carries the new data."""
    source = TRACES / "libvfio-user-client-server-001.trace"
    changed = tmp_path / "changed.trace"
    with TraceReader(source) as reader, TraceWriter(changed, reader.header) as writer:
        for record in reader:
            if isinstance(record, EventRecord):
                writer.write_event(record.session, record.kind, record.t_ns, record.data)
                continue
            data = record.data
            if record.seq == 82:  # DMA_WRITE #1: 1 KiB of "A" at iova 0
                data = data[:32] + b"Z" * (len(data) - 32)
            writer.write_message(record.session, record.direction, record.t_ns, data,
                                 record.fds)
    async with trio.open_nursery() as nursery:
        server = await serve(nursery, changed, tmp_path / "replay.sock")
        client = await replay_client(source, tmp_path / "replay.sock")
    assert [d.headline()[:90] for d in client.divergences] == [
        "message #82 DMA_WRITE cmd (iova 0x0): data[0x0:0x8] 5a5a5a5a5a5a5a5a != recorded 414141414"
    ]
    assert server.report is not None
    assert [d.headline()[:90] for d in server.report.divergences] == [
        "message #91 DMA_READ reply (iova 0x0): data[0x0:0x8] 5a5a5a5a5a5a5a5a != recorded 41414141"
    ]
