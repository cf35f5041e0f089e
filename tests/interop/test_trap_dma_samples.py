"""``--trap-dma`` with libvfio-user's ``samples/client`` and ``samples/server``.

samples/client maps 16 one-page windows, each with its file's fd. When the
client writes BAR0, samples/server's timer goes off 1 s later and it does
DMA (``do_dma_io``): to window 1 *directly* (``vfu_addr_to_sgl`` then
``vfu_sgl_get``: it needs the mapping), then to window 0 by message
(``vfu_sgl_write``/``vfu_sgl_read``: DMA_WRITE/DMA_READ, which the client
answers). So the sample server follows the spec for window 0 only:

- every window trapped: its direct access finds no mapping, it exits 1
  (``vfu_sgl_get failed: Bad address``); the proxy records the trapped
  windows and, the server having closed the session with trapped windows
  mapped, a ``note`` event saying so;
- every window but 1 trapped: the session goes on as without the flag,
  window 0's DMA as messages, window 1 through its fd.

Both clients are stopped after their source leg (the destination "server"
is a plain file, as in test_sample_client.py's fault runs).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from tests.interop.conftest import SUMMARY, LvuBuild
from tests.interop.peers import Peers
from tests.interop.test_sample_client import STOP_WRAPPER, finish, run_client
from tests.interop.tracecheck import read_recording, shape

PAGE = 0x1000
WINDOWS = 16
ALL: tuple[str, ...] = ("--trap-dma",)
BUT_WINDOW_1 = ("--trap-dma", "0x0+0x1000", "--trap-dma", f"0x2000-{WINDOWS * PAGE:#x}")


def test_sample_server_with_trapped_windows(lvu: LvuBuild, peers: Peers, sockdir: Path) -> None:
    runs = {}
    for name, flags in (("all", ALL), ("but1", BUT_WINDOW_1)):
        run = sockdir / name
        (run / "bin").mkdir(parents=True)
        (run / "bin" / "client").symlink_to(lvu.client)
        (run / "bin" / "server").write_text(STOP_WRAPPER)
        (run / "bin" / "server").chmod(0o755)
        server = peers.start(f"{name}-server", [lvu.server, "-v", run / "dev.sock"])
        peers.wait_for_socket(run / "dev.sock", server)
        recorder = peers.vfioproxy(f"{name}-record", "record", "--listen", run / "p.sock",
                                   "--server", run / "dev.sock", "-o", run / "t.trace", *flags)
        peers.wait_for_socket(run / "p.sock", recorder)
        client = run_client(peers, f"{name}-client", [run / "bin" / "client", run / "p.sock"],
                            run / "reap.json")
        runs[name] = (run, server, recorder, client)
    limit = time.monotonic() + 30
    while any(c.poll() is None for _, _, _, c in runs.values()):
        assert time.monotonic() < limit, "\n".join(c.describe() for *_, c in runs.values())
        time.sleep(0.01)
    found = {}
    for name, (run, server, recorder, client) in runs.items():
        finish(client, run / "reap.json", 1)
        assert recorder.stop(signal.SIGINT) == 0, recorder.describe()
        found[name] = (server.wait(10), server.err(), recorder.err(),
                       read_recording(run / "t.trace"))

    # every window trapped: the server's direct access fails, it exits, the proxy says so
    code, err, log, recording = found["all"]
    assert code == 1 and "vfu_sgl_get failed: Bad address" in err, err[-2000:]
    maps = [m for m in recording.messages if shape(m.record)[:3] == ("DMA_MAP", "c2s", "cmd")]
    assert len(maps) == WINDOWS and all(m.record.fds == () for m in maps)
    trapped = [e.data for e in recording.events if e.kind == "interpose"]
    assert [(e["mode"], e["note"]["iova"], e["note"]["size"]) for e in trapped] == [
        ("trap-dma", i * PAGE, PAGE) for i in range(WINDOWS)]
    assert all([w["k"] for w in e["withheld"]] == ["file"] for e in trapped)
    (note,) = [e.data for e in recording.events if e.kind == "note"]
    assert note["mode"] == "trap-dma"
    assert note["text"].startswith(
        f"the server closed the session with {WINDOWS} trapped DMA window(s) mapped")
    assert "trap-dma: the server closed the session" in log
    counts = recording.counts()
    assert counts[("DMA_WRITE", "s2c", "cmd")] == counts[("DMA_READ", "s2c", "cmd")] == 0

    # window 1 (the one it reaches directly) kept: the session runs as without the flag
    code, err, log, recording = found["but1"]
    assert code == 0, err[-2000:]
    assert "do_dma_io: DIRECT success" in err and "do_dma_io: MESSAGE success" in err
    maps = [m for m in recording.messages if shape(m.record)[:3] == ("DMA_MAP", "c2s", "cmd")]
    assert [len(m.record.fds) for m in maps] == [0, 1] + [0] * (WINDOWS - 2)
    assert not [e for e in recording.events if e.kind == "note"]
    counts = recording.counts()
    writes, reads = counts[("DMA_WRITE", "s2c", "cmd")], counts[("DMA_READ", "s2c", "cmd")]
    assert writes == reads == 4  # 4 KiB written, read back as 2 x 2 KiB in 1 KiB messages
    assert counts[("DMA_WRITE", "c2s", "reply")] == writes
    assert counts[("DMA_READ", "c2s", "reply")] == reads
    assert recording.undecoded() == [] and recording.violations() == []
    SUMMARY.append(
        f"samples/client <-> samples/server with --trap-dma: all {WINDOWS} windows trapped, the "
        "server exits 1 at its first direct access (vfu_sgl_get: Bad address), a note is "
        f"recorded; every window but 1 trapped: it runs, window 0's {writes} DMA_WRITE and "
        f"{reads} DMA_READ by message, window 1 through its fd"
    )
