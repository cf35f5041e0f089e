"""``--trap-mmap`` against libvfio-user's ``samples/server`` (BAR1: 16 KiB, two
sparse-mmap areas backed by a file that comes with the region-info reply).

`vfioproxy realize` (QEMU's realize, step for step) through ``vfioproxy
record --trap-mmap``: BAR1 reaches the client without MMAP, sparse-mmap or
fd, so it maps nothing and reaches BAR1 with REGION_READ/REGION_WRITE; the
rest of the device is as without the flag; the server is unchanged (it exits
0 after its one client, as always). The trace holds what the client got and,
in the ``interpose`` events, what the server sent and the fd the proxy closed.
Replayed as server, the trapped recording gives the realize client the view
it had live; replayed as client against a fresh samples/server (which offers
the mapping, as always), the replay makes of the live replies what the proxy
made of them (``session_open`` says which modes were on) and nothing diverges.

With ``VFIOPROXY_QEMU``: QEMU realizes samples/server through ``record`` with
and without the flag; its own ``-trace vfio_region_mmap`` shows two mappings
without it (BAR1's sparse areas) and none with it.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.interop.conftest import SUMMARY, LvuBuild
from tests.interop.peers import VFIOPROXY, Peers
from tests.interop.test_qemu import qemu, qemu_argv, qmp_session  # noqa: F401 (fixture)
from tests.interop.test_realize import SERVERS, realize_json, start_server
from tests.interop.tracecheck import read_recording
from vfioproxy.protocol.bodies import RegionInfoBody
from vfioproxy.protocol.constants import RegionFlags
from vfioproxy.replay.client import replay_client
from vfioproxy.replay.report import ReplayReport
from vfioproxy.replay.server import ServerReplayOptions, serve_replay
from vfioproxy.side import Direction

SAMPLES_SERVER = SERVERS[0]
BAR1 = 1


def region(view: dict[str, Any], index: int) -> dict[str, Any]:
    return next(r for r in view["regions"] if r["index"] == index)


def without(view: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in view.items() if k not in keys}


async def test_realize_through_trap_mmap_maps_nothing_and_replays(
    lvu: LvuBuild, peers: Peers, sockdir: Path
) -> None:
    dev, prox, trace = sockdir / "dev.sock", sockdir / "p.sock", sockdir / "trapped.trace"
    server = start_server(peers, SAMPLES_SERVER, lvu, dev, "server")
    recorder = peers.vfioproxy("record", "record", "--listen", prox, "--server", dev,
                               "-o", trace, "--trap-mmap")
    peers.wait_for_socket(prox, recorder)
    view = realize_json(prox)
    assert recorder.stop(signal.SIGINT) == 0, recorder.describe()
    assert server.wait(timeout=10) == 0, server.describe()  # the server is unchanged

    direct_dev = sockdir / "direct.sock"
    start_server(peers, SAMPLES_SERVER, lvu, direct_dev, "server-direct")
    direct = realize_json(direct_dev)

    rw = RegionFlags.READ | RegionFlags.WRITE
    bar1, bar1_direct = region(view, BAR1), region(direct, BAR1)
    assert bar1_direct["fd"] and bar1_direct["mmapped"] == [[0, 0x1000], [0x2000, 0x1000]]
    assert bar1["fd"] is False and bar1["mmapped"] == [] and bar1["sparse_areas"] == []
    assert bar1["flags"] == rw and bar1["size"] == bar1_direct["size"] == 0x4000
    assert bar1["argsz"] == 32 and bar1["asks"] == 2  # told 80 first, then 32: no loop
    # with no region mapped, the client posts its BAR writes (QEMU does: realize-steps R4)
    assert view["posted_writes"] is True and direct["posted_writes"] is False
    # nothing else of the device differs
    assert [r for r in view["regions"] if r["index"] != BAR1] == [
        r for r in direct["regions"] if r["index"] != BAR1]
    assert without(view, "regions", "timings", "posted_writes") == without(
        direct, "regions", "timings", "posted_writes")

    recording = read_recording(trace)
    assert recording.undecoded() == [] and recording.violations() == []
    opened = [e for e in recording.events if e.kind == "session_open"]
    assert opened[0].data["interpose"] == {"trap-mmap": True}
    trapped = [m for m in recording.messages if m.interposition is not None]
    assert [m.observation.message.body.index for m in trapped] == [BAR1, BAR1]
    short, full = trapped
    assert short.record.fds == () and full.record.fds == ()
    (withheld,) = full.interposition.data["withheld"]
    assert withheld["k"] == "file" and withheld["z"] == 0x4000
    sent = RegionInfoBody.parse(full.arrived[16:])
    assert sent.flags & RegionFlags.MMAP and sent.argsz == 80 and len(sent.caps) == 1
    # no region of the session offers a mapping any more
    for item in recording.messages:
        body = item.observation.message.body
        if item.record.direction is Direction.S2C and isinstance(body, RegionInfoBody):
            assert not body.flags & RegionFlags.MMAP and item.record.fds == ()

    # the trapped recording, replayed as server, gives the client what it got live
    listen = sockdir / "replay.sock"
    reports: list[ReplayReport] = []

    async def serve(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        reports.append(await serve_replay(trace, listen, ServerReplayOptions(),
                                          task_status=task_status))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve)
            realize = await trio.run_process(
                [*VFIOPROXY, "realize", "--socket", str(listen), "--json"],
                capture_stdout=True, capture_stderr=True, check=False)
    assert realize.returncode == 0, realize.stderr.decode(errors="replace")
    (report,) = reports
    assert report.ok and report.matched == report.compared, report.text()
    replayed = json.loads(realize.stdout)
    assert without(replayed, "timings") == without(view, "timings")

    # replayed as client against a fresh samples/server (which offers the mapping
    # again): the replay makes of the live replies what the proxy made of them
    fresh = sockdir / "fresh.sock"
    fresh_server = start_server(peers, SAMPLES_SERVER, lvu, fresh, "server-fresh")
    with trio.fail_after(30):
        as_client = await replay_client(trace, fresh)
    assert as_client.ok and as_client.matched == as_client.compared, as_client.text()
    assert as_client.compared > 0 and as_client.divergences == ()
    assert fresh_server.wait(timeout=10) == 0, fresh_server.describe()
    SUMMARY.append(
        f"realize through record --trap-mmap vs samples/server: BAR1 mapped nothing "
        f"(direct: 2 sparse areas mmapped), 1 region fd withheld, "
        f"{len(recording.messages)} messages; "
        f"replayed as server: the same view; as client against a fresh samples/server: "
        f"no divergence ({as_client.compared} replies compared)"
    )



@pytest.mark.interop_timeout(120)
@pytest.mark.parametrize("trap", [False, True], ids=["mapped", "trapped"])
def test_qemu_realizes_samples_server_through_trap_mmap(
    qemu: tuple[str, tuple[int, int, int]], lvu: LvuBuild, peers: Peers, sockdir: Path,  # noqa: F811
    trap: bool
) -> None:
    """QEMU's own ``-trace vfio_region_mmap`` shows the mappings it makes: two
    (BAR1's sparse areas) without the flag, none with it; QEMU realizes either
    way and sees the same device."""
    binary, _ = qemu
    dev, prox, trace = sockdir / "dev.sock", sockdir / "p.sock", sockdir / "q.trace"
    start_server(peers, SAMPLES_SERVER, lvu, dev, "server")
    flags = ["--trap-mmap"] if trap else []
    recorder = peers.vfioproxy("record", "record", "--listen", prox, "--server", dev,
                               "-o", trace, *flags)
    peers.wait_for_socket(prox, recorder)
    qmp = sockdir / "qmp.sock"
    proc = peers.start("qemu", [*qemu_argv(binary, prox, qmp), "-trace", "vfio_region_mmap",
                                "-trace", "vfio_region_setup"])
    pci = qmp_session(qmp, proc)
    assert proc.wait(30) == 0, proc.describe()
    devices = [d for bus in pci for d in bus["devices"] if d.get("qdev_id") == "vu0"]
    assert [(d["id"]["vendor"], d["id"]["device"]) for d in devices] == [
        SAMPLES_SERVER.vendor_device]
    mmaps = re.findall(r"vfio_region_mmap Region .* \[0x[0-9a-f]+ - 0x[0-9a-f]+\]$",
                       proc.err(), re.MULTILINE)
    assert len(mmaps) == (0 if trap else 2), proc.err()
    assert recorder.stop(signal.SIGINT) == 0, recorder.describe()
    recording = read_recording(trace)
    assert recording.undecoded() == [] and recording.violations() == []
    trapped = [m for m in recording.messages if m.interposition is not None]
    assert len(trapped) == (2 if trap else 0)
    SUMMARY.append(f"QEMU realize vs samples/server through record{' --trap-mmap' * trap}: "
                   f"{len(mmaps)} vfio_region_mmap, {len(recording.messages)} messages")
