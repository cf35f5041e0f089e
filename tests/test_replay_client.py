"""Replay as client: recorded clients against live servers (real sockets, real fds)."""

from __future__ import annotations

import select
from pathlib import Path

import pytest
import trio
import trio.testing

from recorder.reader import TraceReader
from recorder.records import MessageRecord
from recorder.sink import TraceSink
from tests.conftest import FD_HYGIENE
from tests.realdata import TRACES
from vfioproxy.io.fds import OwnedFd, close_all, make_memfd
from vfioproxy.io.transport import FdStream, fd_stream_pair
from vfioproxy.io.unix import open_unix_listener
from vfioproxy.peers import device, layout
from vfioproxy.peers.server import DeviceOptions, open_device_server
from vfioproxy.proxy import open_proxy
from vfioproxy.replay.client import ClientReplayOptions, replay_client, replay_client_on
from vfioproxy.replay.fdrebuild import FdRebuilder
from vfioproxy.replay.script import load_script
from vfioproxy.side import Direction

pytestmark = FD_HYGIENE

REFERENCE = sorted(TRACES.glob("reference-realize-*.trace"))
REALIZE = TRACES / "reference-realize-001.trace"
WORKLOAD = TRACES / "reference-realize-workload-intx-001.trace"
E1000E = TRACES / "qemu-realize-qemu-server-e1000e-001.trace"


def test_the_reference_traces_are_realize_sessions_of_the_reference_peers():
    assert [p.name for p in REFERENCE] == [
        "reference-realize-001.trace",
        "reference-realize-workload-intx-001.trace",
        "reference-realize-workload-msix-001.trace",
    ]
    for path in REFERENCE:
        script = load_script(path)
        assert script.notes == () and script.unanswered == ()
        with TraceReader(path) as reader:
            assert "reference device" in reader.header.info["server"]


@pytest.mark.parametrize("path", REFERENCE, ids=lambda p: p.stem)
async def test_reference_traces_replay_against_the_reference_server_without_divergence(
    path, tmp_path
):
    async with open_device_server(tmp_path / "dev.sock"):
        report = await replay_client(path, tmp_path / "dev.sock")
    assert report.ok, report.text()
    assert report.replayed == report.recorded == len(load_script(path).steps)
    assert report.sent + report.received == report.recorded
    assert report.matched == report.compared == report.received
    assert report.stopped is None


async def test_a_changed_device_id_is_reported_as_the_config_register_that_differs(tmp_path):
    async with open_device_server(tmp_path / "dev.sock", options=DeviceOptions(device_id=0x1101)):
        report = await replay_client(REALIZE, tmp_path / "dev.sock")
    assert not report.ok and report.exit_status == 1
    assert [d.headline() for d in report.divergences] == [
        "message #29 REGION_READ reply (config space offset 0x0, 4096 bytes): "
        "data[0x2:0x4] (device_id) 0x1101 != recorded 0x1100"
    ]
    assert report.compared - report.matched == 1


async def test_a_changed_bar_size_is_reported_in_the_region_info_reply(tmp_path, monkeypatch):
    monkeypatch.setitem(device.REGION_SIZES, 0, 2 * layout.BAR0_SIZE)
    async with open_device_server(tmp_path / "dev.sock"):
        report = await replay_client(REALIZE, tmp_path / "dev.sock")
    assert [d.headline() for d in report.divergences] == [
        "message #11 DEVICE_GET_REGION_INFO reply (region BAR0): size 0x2000 != recorded 0x1000"
    ]


async def test_region_fd_contents_are_compared_where_the_recording_has_them(
    tmp_path, monkeypatch
):
    def scribbled_memfd(name: str, size: int = 0, data: bytes = b"") -> OwnedFd:
        return make_memfd(name, size, data or b"\x01")

    monkeypatch.setattr(device.model, "make_memfd", scribbled_memfd)  # BAR2's RAM, not all zero
    async with open_device_server(tmp_path / "dev.sock"):
        report = await replay_client(REALIZE, tmp_path / "dev.sock")
    (divergence,) = report.divergences
    assert divergence.headline().startswith(
        "message #17 DEVICE_GET_REGION_INFO reply (region BAR2): fds[0].sha256 (contents) ")


async def test_a_real_qemu_trace_against_another_device_lists_every_difference(tmp_path):
    async with open_device_server(tmp_path / "dev.sock"):
        report = await replay_client(E1000E, tmp_path / "dev.sock")
    texts = [d.headline() for d in report.divergences]
    assert report.replayed == report.recorded  # every message played, differences listed
    assert texts[0].startswith("message #3 VERSION reply: json.capabilities.pgsizes 0x1000 "
                               "!= recorded (absent)")
    assert "message #9 DEVICE_GET_INFO reply: num_regions 0x9 != recorded 0xa" in texts
    assert ("message #45 REGION_READ reply (config space offset 0xa2 MSI-X[0xa0].msg_ctl): "
            "data 0x0000 != recorded 0x0004") in texts
    config = next(t for t in texts if t.startswith("message #27 "))
    assert "data[0x0:0x2] (vendor_id) 0x1b36 != recorded 0x8086" in config


async def test_ignore_rules_silence_what_legitimately_differs(tmp_path):
    from vfioproxy.replay.match import DEFAULT_IGNORES, IgnoreRule

    rules = (*DEFAULT_IGNORES, IgnoreRule.parse("REGION_READ reply:data[0x0:0x4]"))
    async with open_device_server(tmp_path / "dev.sock", options=DeviceOptions(device_id=0x1101)):
        report = await replay_client(REALIZE, tmp_path / "dev.sock",
                                     ClientReplayOptions(ignore=rules))
    assert report.ok, report.text()


def c2s_bytes(path: Path) -> list[tuple[bytes, tuple[str, ...]]]:
    with TraceReader(path) as reader:
        return [(r.data, tuple(fd.kind.value for fd in r.fds)) for r in reader
                if isinstance(r, MessageRecord) and r.direction is Direction.C2S]


async def test_two_replays_put_identical_bytes_on_the_wire(tmp_path):
    runs = []
    async with open_device_server(tmp_path / "dev.sock"):
        for run in range(2):
            trace = tmp_path / f"replay-{run}.trace"
            with TraceSink(trace) as sink:
                async with open_proxy(tmp_path / "p.sock", tmp_path / "dev.sock",
                                      sink=sink) as proxy:
                    report = await replay_client(WORKLOAD, tmp_path / "p.sock")
                    with trio.fail_after(5):
                        await proxy.wait_sessions()
            assert report.ok, report.text()
            runs.append(c2s_bytes(trace))
    assert runs[0] == runs[1]
    assert runs[0] == c2s_bytes(WORKLOAD)  # and they are the recorded bytes, DMA answers too


async def strict_server(stream: FdStream, path: Path) -> None:
    """Plays the recorded server and checks the client's causality: before each
    server message it sends, every client message recorded before it has come,
    and none recorded after it."""
    script = load_script(path)
    rebuilder = FdRebuilder()
    for step in script.steps:
        if step.direction is Direction.C2S:
            with trio.fail_after(1):  # a client that waited instead of pipelining stalls here
                data, fds = await stream.receive_message()
            close_all(fds)
            assert data == step.data, step.describe()
            continue
        await trio.testing.wait_all_tasks_blocked()
        assert not _readable(stream), f"the client did not wait for {step.describe()}"
        fds = rebuilder.fresh(Direction.S2C, step.fds)
        await stream.send_message(step.data, fds)
        close_all(fds)
    rebuilder.close()


def _readable(stream: FdStream) -> bool:
    poll = select.poll()
    poll.register(stream.fileno(), select.POLLIN)
    return bool(poll.poll(0))


@pytest.mark.parametrize("path", [E1000E, WORKLOAD], ids=lambda p: p.stem)
async def test_the_replay_waits_where_the_client_waited_and_pipelines_where_it_pipelined(path):
    client, server = fd_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(strict_server, server, path)
        report = await replay_client_on(load_script(path), client, ClientReplayOptions())
    await server.aclose()
    assert report.ok, report.text()


async def test_recorded_timing_keeps_the_gaps_divided_by_speed(tmp_path, autojump_clock):
    script = load_script(REALIZE)
    c2s = script.of_direction(Direction.C2S)
    span = (c2s[-1].t_ns - c2s[0].t_ns) / 1e9
    async with open_device_server(tmp_path / "dev.sock"):
        start = trio.current_time()
        report = await replay_client(script, tmp_path / "dev.sock",
                                     ClientReplayOptions(timing="recorded", speed=4))
        took = trio.current_time() - start
        asap = await replay_client(script, tmp_path / "dev.sock")
    assert report.ok and asap.ok
    assert took == pytest.approx(span / 4, abs=1e-6)
    assert asap.elapsed == 0  # in virtual time: nothing but causality to wait for


async def test_a_server_that_never_answers_is_reported_as_a_timeout(tmp_path, autojump_clock):
    listener = await open_unix_listener(tmp_path / "hang.sock")
    async with trio.open_nursery() as nursery:
        async def accept_and_hang() -> None:
            async with await listener.accept():
                await trio.sleep_forever()

        nursery.start_soon(accept_and_hang)
        report = await replay_client(REALIZE, tmp_path / "hang.sock",
                                     ClientReplayOptions(timeout=2))
        nursery.cancel_scope.cancel()
    await listener.aclose()
    assert report.elapsed == pytest.approx(2)
    assert [d.headline() for d in report.divergences] == [
        "message #3 VERSION reply: no live counterpart within 2 s "
        "(the server hangs or never sends it)"
    ]
    assert report.stopped == ("waiting for message #3 VERSION reply: no live counterpart "
                              "within 2 s (the server hangs or never sends it)")
    assert report.sent == 1 and report.replayed == 1


async def test_a_server_that_closes_early_is_reported_where_it_left(tmp_path):
    listener = await open_unix_listener(tmp_path / "quit.sock")

    async def answer_version_then_quit() -> None:
        async with FdStream((await listener.accept()).socket) as stream:
            await stream.receive_message()
            await stream.send_message(load_script(REALIZE).steps[1].data)
            for _ in range(2):  # the DMA_MAP burst, then leave without answering it
                _, fds = await stream.receive_message()
                close_all(fds)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer_version_then_quit)
        report = await replay_client(REALIZE, tmp_path / "quit.sock")
    await listener.aclose()
    assert report.divergences[0].kind == "closed"
    assert report.divergences[0].headline().startswith(
        "message #6 DMA_MAP reply: the server closed the connection")
    assert report.matched == 1
