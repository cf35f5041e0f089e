"""Replay legs: a realize recorded against libvfio-user's ``samples/server``, played back.

The recording is taken once per module, as test_realize.py takes it:
``vfioproxy realize`` through ``vfioproxy record`` in front of a real
``samples/server``. Then:

- replayed as client against a *fresh* ``samples/server``: no divergence;
- replayed as client against ``samples/gpio-pci-idio-16`` (another device):
  the report names what differs;
- replayed as server towards ``vfioproxy realize``: the realize completes
  and sees the device the real server showed it, without divergence.

Found: against gpio-pci-idio-16 the replay runs to the end (it answers every
message of the realize) and exactly 5 replies diverge: the region info of
BAR0 and BAR1 (sizes, flags, BAR1's sparse-mmap capability and region file;
gpio has neither BAR), of BAR2 (gpio's 256-byte BAR, absent on
samples/server), and config space's vendor, device and subsystem ids. The
device info (9 regions, 5 IRQ types), the error IRQ, the rest of config space
and every write, IRQ, reset and DMA reply are the same.
"""

from __future__ import annotations

import json
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from tests.interop.conftest import SUMMARY, LvuBuild, short_dir
from tests.interop.peers import VFIOPROXY, Peers, Proc, deadline
from tests.interop.test_realize import SERVERS, Served, realize_json, start_server
from tests.interop.tracecheck import read_recording
from vfioproxy.replay.client import replay_client
from vfioproxy.replay.report import ReplayReport
from vfioproxy.replay.server import ServerReplayOptions, serve_replay

SAMPLES_SERVER, GPIO = SERVERS
#: each replay's own bound, well inside the interop deadline (60 s)
REPLAY_LIMIT = 30.0


@attrs.frozen
class Recorded:
    trace: Path
    messages: int
    view: dict[str, Any]  # what `vfioproxy realize --json` saw through the recorder


def without_timings(view: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in view.items() if k != "timings"}


@pytest.fixture(scope="module")
def recorded(lvu: LvuBuild, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recorded]:
    """``vfioproxy realize`` -> ``vfioproxy record`` -> ``samples/server``, recorded once."""
    base = short_dir("replay")
    peers = Peers(tmp_path_factory.mktemp("replay-record-logs"))
    try:
        with deadline(60, "recording a realize against samples/server"):
            dev, prox, trace = base / "dev.sock", base / "p.sock", base / "realize.trace"
            server = start_server(peers, SAMPLES_SERVER, lvu, dev, "server")
            recorder = peers.vfioproxy(
                "record", "record", "--listen", prox, "--server", dev, "-o", trace,
                "--client-desc", "vfioproxy realize",
                "--server-desc", "libvfio-user samples/server")
            peers.wait_for_socket(prox, recorder)
            view = realize_json(prox)
            assert recorder.stop(signal.SIGINT) == 0, recorder.describe()
            assert server.wait(timeout=10) == 0, server.describe()
            recording = read_recording(trace)
            assert recording.truncation is None and recording.sessions == [1]
            assert recording.undecoded() == [] and recording.violations() == []
        yield Recorded(trace, len(recording.messages), view)
    finally:
        peers.close()
        shutil.rmtree(base, ignore_errors=True)


async def replay_against(peers: Peers, lvu: LvuBuild, served: Served, sock: Path,
                         trace: Path) -> tuple[ReplayReport, Proc]:
    """The recorded client, replayed against a freshly started ``served``."""
    server = start_server(peers, served, lvu, sock, f"fresh-{served.name}")
    with trio.fail_after(REPLAY_LIMIT):
        return await replay_client(trace, sock), server


def replayed_whole(report: ReplayReport, recorded: Recorded) -> None:
    """Every recorded message was played or met, and every live one compared."""
    assert report.stopped is None, report.text()
    assert report.replayed == report.recorded == recorded.messages, report.text()
    assert report.sent + report.received == report.recorded
    assert report.compared == report.received


def diffs(report: ReplayReport) -> list[tuple[int | None, str | None, dict[str, Any]]]:
    """(recorded message, where, {field: (live, recorded)}) of each divergence."""
    return [(d.seq, d.where, {f.field: (f.live, f.recorded) for f in d.diffs})
            for d in report.divergences]


async def test_realize_recording_replays_as_client_against_a_fresh_samples_server(
    recorded: Recorded, lvu: LvuBuild, peers: Peers, sockdir: Path
) -> None:
    report, server = await replay_against(peers, lvu, SAMPLES_SERVER, sockdir / "fresh.sock",
                                          recorded.trace)
    assert report.ok and report.exit_status == 0, report.text()
    replayed_whole(report, recorded)
    assert report.matched == report.compared
    assert report.notes == ()
    # samples/server serves one client: the replay's session ended cleanly
    assert server.wait(timeout=10) == 0, server.describe()
    SUMMARY.append(
        f"realize recorded against samples/server ({recorded.messages} messages) replayed as "
        f"client against a fresh samples/server: no divergence, {report.elapsed * 1e3:.1f} ms"
    )


async def test_realize_recording_replayed_against_gpio_reports_the_other_device(
    recorded: Recorded, lvu: LvuBuild, peers: Peers, sockdir: Path
) -> None:
    report, gpio = await replay_against(peers, lvu, GPIO, sockdir / "gpio.sock",
                                        recorded.trace)
    assert not report.ok and report.exit_status == 1
    assert gpio.poll() is None, "gpio-pci-idio-16 re-attaches: it waits for the next client"
    # gpio-pci-idio-16 answers every message the realize sends (it is a vfio-user PCI device
    # with the same 9 regions and 5 IRQ types): the replay runs to the end, and only what
    # makes it another device differs
    replayed_whole(report, recorded)
    assert report.compared - report.matched == len(report.divergences) == 5, report.text()
    assert {d.kind for d in report.divergences} == {"mismatch"}
    assert {d.label for d in report.divergences} == {"DEVICE_GET_REGION_INFO reply",
                                                      "REGION_READ reply"}
    (bar0, bar1, bar1_again, bar2, config) = diffs(report)
    rw, mmap, caps = 0x3, 0x4, 0x8  # VFIO_REGION_INFO_FLAG_READ | WRITE, MMAP, CAPS
    # samples/server: an 8-byte BAR0 and a 16 KiB BAR1; gpio: only a 256-byte BAR2
    assert SAMPLES_SERVER.bars == {0: 8, 1: 0x4000} and GPIO.bars == {2: 0x100}
    assert bar0 == (11, "region BAR0", {"flags": (0, rw), "size": (0, 8)})
    # BAR1 asked with argsz 32, then (told 80) again: samples/server has a sparse-mmap
    # capability and a file fd for it, gpio has nothing there
    assert bar1 == (13, "region BAR1", {"argsz": (32, 80), "flags": (0, rw | mmap),
                                        "size": (0, 0x4000)})
    seq, where, again = bar1_again
    assert (seq, where) == (15, "region BAR1")
    assert {k: again[k] for k in ("argsz", "flags", "size", "len(caps)", "fds",
                                  "fds[0].kind", "fds[0].size")} == {
        "argsz": (32, 80), "flags": (0, rw | mmap | caps), "size": (0, 0x4000),
        "len(caps)": (0, 1), "fds": (0, 1), "fds[0].kind": (None, "file"),
        "fds[0].size": (None, 0x4000),
    }
    assert {k: again[k] for k in again if k.startswith("caps[0].areas")} == {
        "caps[0].areas[0].offset": (None, 0), "caps[0].areas[0].size": (None, 0x1000),
        "caps[0].areas[1].offset": (None, 0x2000), "caps[0].areas[1].size": (None, 0x1000),
    }
    assert bar2 == (17, "region BAR2", {"flags": (rw, 0), "size": (0x100, 0)})
    # config space: the ids differ (and samples/server's subsystem ids), nothing else
    live_ids, recorded_ids = GPIO.vendor_device, SAMPLES_SERVER.vendor_device
    assert config == (29, "config space offset 0x0, 256 bytes", {
        "data[0x0:0x2]": (f"0x{live_ids[0]:04x}", f"0x{recorded_ids[0]:04x}"),
        "data[0x2:0x4]": (f"0x{live_ids[1]:04x}", f"0x{recorded_ids[1]:04x}"),
        "data[0x2c:0x2e]": ("0x0000", "0xcafe"),
        "data[0x2e:0x30]": ("0x0000", "0xbabe"),
    })
    assert [f.note for f in report.divergences[-1].diffs] == [
        "vendor_id", "device_id", "subsystem_vendor_id", "subsystem_id"]
    text = report.text()
    assert text.splitlines()[1] == f"FIRST DIVERGENCE: {report.divergences[0].headline()}"
    assert "data[0x2:0x4] (device_id) 0x0dc8 != recorded 0xbeef" in text
    SUMMARY.append(
        f"the same recording against gpio-pci-idio-16: {len(report.divergences)} divergences "
        f"(BAR0/BAR1/BAR2 region info, vendor/device/subsystem ids), "
        f"{report.elapsed * 1e3:.1f} ms"
    )


async def test_realize_recording_replayed_as_server_lets_vfioproxy_realize_complete(
    recorded: Recorded, sockdir: Path
) -> None:
    listen = sockdir / "replay.sock"
    reports: list[ReplayReport] = []

    async def serve(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        reports.append(await serve_replay(recorded.trace, listen, ServerReplayOptions(),
                                          task_status=task_status))

    with trio.fail_after(REPLAY_LIMIT):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve)
            realize = await trio.run_process(
                [*VFIOPROXY, "realize", "--socket", str(listen), "--json"],
                capture_stdout=True, capture_stderr=True, check=False)
    assert realize.returncode == 0, realize.stderr.decode(errors="replace")
    (report,) = reports
    assert report.ok, report.text()
    replayed_whole(report, recorded)
    assert report.matched == report.compared
    # the replayed server shows the realize client the device samples/server showed it,
    # down to BAR1's sparse areas mapped from the (rebuilt) region file
    view = json.loads(realize.stdout)
    assert without_timings(view) == without_timings(recorded.view)
    bar1 = next(r for r in view["regions"] if r["index"] == 1)
    assert bar1["fd"] and bar1["mmapped"] == [[0, 0x1000], [0x2000, 0x1000]]
    assert (view["vendor_id"], view["device_id"]) == SAMPLES_SERVER.vendor_device
    SUMMARY.append(
        f"the same recording replayed as server towards `vfioproxy realize`: realize and reset "
        f"completed, the same view as from samples/server, no divergence, "
        f"{report.elapsed * 1e3:.1f} ms"
    )
