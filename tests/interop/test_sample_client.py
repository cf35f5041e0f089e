"""(2) and (3): libvfio-user's ``samples/client``, the real client with migration.

``samples/client SOCK`` runs about 11 s: VERSION, a bogus region read it
wants refused (EINVAL), device and region info (BAR1's sparse-mmap file fd),
config space, reset, 16 DMA_MAPs with fds, IRQ info and an INTx eventfd, DMA
dirty logging, a BAR0 write that makes the server raise INTx 1 s later and
DMA_WRITE/DMA_READ to the client, dirty-page reports, unmaps, then migration:
PRE_COPY and STOP_COPY reads (a "fake guest" thread writes random 16 KiB to
BAR1 meanwhile, a random number of times), and finally it **forks**: its
original process exec()s ``<dir of argv[0]>/server -v SOCK_migrated`` (the
destination server) while the forked child goes on as the client, connects
to ``SOCK_migrated``, writes the migration data back, checks BAR1's CRC,
maps the other 8 DMA regions and waits 10 s for the interrupt the source
scheduled; it prints ``INTx triggered`` and exits 0.

How the migrated leg goes through a second proxy: the client is started as
``bin/client P`` where ``bin/client`` is a symlink to the real client and
``bin/server`` a two-line script, so the destination server it starts is
``bin/server -v P_migrated``; the script execs the real ``samples/server -v
P_migrated.real`` (same process, same moment, another path). A second
``vfioproxy record`` listens on a staging path from the start, forwarding to
``P_migrated.real``; once the destination server listens there, the test
renames the proxy's listening socket to ``P_migrated`` (a bound UNIX socket
keeps working under its new name), so the client, which polls
``stat(P_migrated)``, connects to the proxy only when the proxy can reach the
server. The rename waits until the destination server *listens*, not only
until its socket file exists: the file appears at bind(), and a client that
connects before listen() is refused (through the proxy, the client's
connection is then reset; seen in about 1 of 15 loaded runs). The direct run
next to it (for comparison) uses the same ``bin/`` pair without a proxy: the
destination server's own socket is renamed to ``SOCK_migrated`` once it
listens, which closes the same race in the client itself (it polls for the
file and connects at once). ``reaper.py`` (a child subreaper) collects the
exit status of the forked client, which is otherwise a grandchild nobody
reaps.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.interop.conftest import SUMMARY, LvuBuild, short_dir
from tests.interop.peers import REAPER, Peers, Proc, deadline, listening, read_json
from tests.interop.tracecheck import Recording, read_recording, shape
from tests.realdata import TRACES
from vfioproxy.protocol.bodies import RegionInfoBody, SparseMmapCap
from vfioproxy.side import Direction

#: a REGION_WRITE of the fake guest thread: 16 KiB to BAR1 (header 16 + access 16 + data)
FAKE_GUEST_WRITE = ("REGION_WRITE", "c2s", "cmd", 16 + 16 + 0x4000, ())
FAKE_GUEST_WRITE_REPLY = ("REGION_WRITE", "s2c", "reply", 16 + 16, ())

SERVER_WRAPPER = """#!/bin/sh
# samples/client starts "<dir of its argv[0]>/server -v <sock>_migrated" as the
# migration destination; a recording proxy owns <sock>_migrated, so the real
# server listens behind it on <sock>_migrated.real (same process, same moment).
echo "$*" > "$(dirname "$0")/server.argv"
exec '{server}' "$1" "$2.real"
"""


@attrs.frozen
class ClientRun:
    client: Proc
    reaped: dict[str, Any]
    elapsed: float


@attrs.frozen
class SampleSessions:
    proxied: ClientRun
    direct: ClientRun
    source: Recording
    migrated: Recording
    wrapper_argv: str
    migrated_path: Path
    direct_wrapper_argv: str
    direct_migrated_path: Path
    source_server_exit: int
    recorder_exits: tuple[int, int]


def run_client(peers: Peers, name: str, argv: list[Any], report: Path) -> Proc:
    return peers.start(name, [*REAPER, report, *argv])


def finish(proc: Proc, report: Path, timeout: float) -> ClientRun:
    proc.wait(timeout)
    return ClientRun(proc, read_json(report), proc.elapsed)


@pytest.fixture(scope="module")
def sample_sessions(lvu: LvuBuild, tmp_path_factory: pytest.TempPathFactory,
                    ) -> Iterator[SampleSessions]:
    """samples/client <-> samples/server, direct and through two recording proxies at once."""
    base = short_dir("sample")
    peers = Peers(tmp_path_factory.mktemp("sample-client-logs"))
    try:
        with deadline(120, "samples/client sessions"):
            sessions = _run_sessions(lvu, peers, base)
        yield sessions
    finally:
        peers.close()
        shutil.rmtree(base, ignore_errors=True)


def migration_bin(bindir: Path, lvu: LvuBuild) -> Path:
    """``bindir/client`` (the real client) beside ``bindir/server`` (SERVER_WRAPPER)."""
    bindir.mkdir()
    (bindir / "client").symlink_to(lvu.client)
    wrapper = bindir / "server"
    wrapper.write_text(SERVER_WRAPPER.format(server=lvu.server))
    wrapper.chmod(0o755)
    return bindir


def _run_sessions(lvu: LvuBuild, peers: Peers, base: Path) -> SampleSessions:
    source_dev, listen = base / "dev.sock", base / "p.sock"
    migrated = Path(f"{listen}_migrated")
    migrated_real, staging = Path(f"{migrated}.real"), base / "staging.sock"
    source_trace, migrated_trace = base / "source.trace", base / "migrated.trace"
    bindir = migration_bin(base / "bin", lvu)

    source_server = peers.start("source-server", [lvu.server, "-v", source_dev])
    peers.wait_for_socket(source_dev, source_server)
    desc = ["--client-desc", "libvfio-user samples/client",
            "--server-desc", "libvfio-user samples/server"]
    rec_source = peers.vfioproxy("record-source", "record", "--listen", listen,
                                 "--server", source_dev, "-o", source_trace, *desc)
    rec_migrated = peers.vfioproxy("record-migrated", "record", "--listen", staging,
                                   "--server", migrated_real, "-o", migrated_trace, *desc)
    peers.wait_for_socket(listen, rec_source)
    peers.wait_for_socket(staging, rec_migrated)

    direct_dir = base / "direct"
    direct_dir.mkdir()
    direct_dev = direct_dir / "s.sock"
    direct_migrated = Path(f"{direct_dev}_migrated")
    direct_bin = migration_bin(direct_dir / "bin", lvu)
    direct_server = peers.start("direct-server", [lvu.server, "-v", direct_dev])
    peers.wait_for_socket(direct_dev, direct_server)

    direct = run_client(peers, "direct-client", [direct_bin / "client", direct_dev],
                        direct_dir / "reap.json")
    client = run_client(peers, "client", [bindir / "client", listen], base / "reap.json")
    # Each client starts its destination server through bin/server, on <sock>_migrated.real.
    # Once that listens, the client gets its <sock>_migrated: through the proxy, the second
    # proxy's socket; direct, the destination server's own socket.
    pending = {
        migrated_real: (staging, migrated, client),
        Path(f"{direct_migrated}.real"): (Path(f"{direct_migrated}.real"), direct_migrated,
                                           direct),
    }
    limit = time.monotonic() + 60
    while pending:
        for real, (bound, name, proc) in list(pending.items()):
            if listening(real):
                os.rename(bound, name)
                del pending[real]
            elif proc.poll() is not None:
                raise AssertionError(f"{proc.name} ended before migrating\n{proc.describe()}")
        assert time.monotonic() < limit, f"no destination server listens at {list(pending)}"
        time.sleep(0.002)

    proxied_run = finish(client, base / "reap.json", 60)
    direct_run = finish(direct, direct_dir / "reap.json", 60)
    assert direct_server.wait(10) == 0, direct_server.describe()
    recorder_exits = (rec_source.stop(signal.SIGINT), rec_migrated.stop(signal.SIGINT))
    source_exit = source_server.wait(10)
    return SampleSessions(
        proxied=proxied_run, direct=direct_run,
        source=read_recording(source_trace), migrated=read_recording(migrated_trace),
        wrapper_argv=(bindir / "server.argv").read_text().strip(), migrated_path=migrated,
        direct_wrapper_argv=(direct_bin / "server.argv").read_text().strip(),
        direct_migrated_path=direct_migrated,
        source_server_exit=source_exit, recorder_exits=recorder_exits,
    )


def without_fake_guest(recording: Recording) -> tuple[list[tuple[Any, ...]], int]:
    """Each message's shape, minus the fake guest's BAR1 writes (random in number and
    timing) and their replies; and how many such writes there were."""
    shapes = [shape(r) for r in recording.records()]
    writes = shapes.count(FAKE_GUEST_WRITE)
    kept, skip_replies = [], 0
    for s in shapes:
        if s == FAKE_GUEST_WRITE:
            skip_replies += 1
        elif s == FAKE_GUEST_WRITE_REPLY and skip_replies:
            skip_replies -= 1
        else:
            kept.append(s)
    return kept, writes


def per_direction(shapes: list[tuple[Any, ...]]) -> dict[str, list[tuple[Any, ...]]]:
    return {d.value: [s for s in shapes if s[1] == d.value] for d in Direction}


def test_sample_client_completes_through_two_recording_proxies(
    sample_sessions: SampleSessions,
) -> None:
    s = sample_sessions
    for run in (s.proxied, s.direct):
        out = run.client.out()
        assert run.reaped["launched"]["exit"] == 0, run.client.describe()  # destination server
        assert [p["exit"] for p in run.reaped["forked"]] == [0], run.client.describe()  # client
        assert "INTx triggered" in out, run.client.describe()
    # each client started its destination server for <sock>_migrated
    assert s.wrapper_argv == f"-v {s.migrated_path}"
    assert s.direct_wrapper_argv == f"-v {s.direct_migrated_path}"
    assert s.recorder_exits == (0, 0)
    assert s.source_server_exit == 0


def test_sample_client_sessions_are_whole_in_the_traces(sample_sessions: SampleSessions) -> None:
    s = sample_sessions
    captures = {
        "source": read_recording(TRACES / "libvfio-user-client-server-001.trace"),
        "migrated": read_recording(TRACES / "libvfio-user-client-server-migrated-001.trace"),
    }
    for leg, recording in (("source", s.source), ("migrated", s.migrated)):
        capture = captures[leg]
        assert recording.truncation is None
        assert recording.sessions == [1], f"{leg}: one session per proxy"
        assert recording.undecoded() == [], f"{leg}: every message decodes"
        assert recording.violations() == []
        closes = [e for e in recording.events if e.kind == "session_close"]
        assert [e.data["closed_by"] for e in closes] == ["client"]
        # the same messages as the real capture, shape for shape (command, direction,
        # type, size, fd kinds), in order, once the fake guest's writes are set aside
        mine, writes = without_fake_guest(recording)
        theirs, capture_writes = without_fake_guest(capture)
        assert per_direction(mine) == per_direction(theirs), leg
        assert len(recording.messages) == len(capture.messages) + 2 * (writes - capture_writes)
        assert recording.fd_kinds() == capture.fd_kinds(), leg
        # every command answered once, the one bogus REGION_READ with EINVAL
        commands: Counter[tuple[str, str]] = Counter()
        answers: Counter[tuple[str, str]] = Counter()
        for (command, direction, kind), n in recording.counts().items():
            if kind == "cmd":
                commands[(command, direction)] += n
            else:
                answers[(command, "c2s" if direction == "s2c" else "s2c")] += n
        assert commands == answers, leg
    assert len(s.migrated.messages) == 90
    assert s.source.counts()[("REGION_READ", "s2c", "error")] == 1
    _, writes = without_fake_guest(s.source)
    assert len(s.source.messages) == 220 + 2 * writes  # 230 with 5 writes, 224 with 2
    fds = sum(len(r.fds) for rec in (s.source, s.migrated) for r in rec.records())
    assert fds == 16 + 1 + 1 + 8 + 1  # DMA_MAP files, BAR1 file, INTx eventfd (x2 legs)
    SUMMARY.append(
        f"samples/client <-> samples/server through two `vfioproxy record`s: "
        f"{len(s.source.messages)} + {len(s.migrated.messages)} messages "
        f"({writes} fake-guest BAR1 write{'' if writes == 1 else 's'}), {fds} fds, "
        f"every message decoded; "
        f"client ran {s.proxied.elapsed:.2f} s proxied vs {s.direct.elapsed:.2f} s direct"
    )


def test_sample_client_recording_replays() -> None:
    pytest.skip("issue 6 (replay) has not landed: the recorded samples/client sessions "
                "(source and migrated) should replay against fresh samples/servers")


def test_sample_client_under_injected_faults() -> None:
    pytest.skip("issue 7 (fault injection) has not landed: a delay rule between samples/client "
                "and samples/server should slow the session by about messages x delay, and an "
                "error rule make the client fail with that errno")


# ------------------------------------------------------------------ (2) against serve-device

def test_sample_client_against_serve_device_gets_as_far_as_its_assumptions_allow(
    lvu: LvuBuild, peers: Peers, sockdir: Path
) -> None:
    """samples/client cannot complete against `vfioproxy serve-device`, by design.

    The client is written for samples/server only. Besides the ids
    (0xdead:0xbeef, which ``--vendor-id/--device-id`` give) it asserts that
    only BAR1 has a sparse-mmap capability and that it comes with exactly one
    fd, subsystem ids 0xcafe:0xbabe, and then needs samples/server's device
    model: a BAR0 timer register that raises INTx a second after a write and
    then DMA_WRITEs 'A'..'D' and DMA_READs them back at fixed addresses,
    exactly one dirty page per report, migration data that is BAR1 (16 KiB)
    plus a time_t in 16 and 17 chunks of 1 KiB, and BAR1's CRC after
    migration. The reference device (vfioproxy/peers/layout.py) has a
    sparse-mmap BAR2 (the MSI-X table part is not mappable) and a doorbell DMA
    engine instead; satisfying the client would take a device model made only
    for it. So this test pins how far it gets: VERSION (protocol 0.2 with the
    client's own capabilities), the bogus region read refused with EINVAL as
    it wants, DEVICE_GET_INFO (9 regions, as it wants), region info for BAR0
    and BAR1, then BAR2's sparse-mmap reply (asked twice: argsz 32, then 64),
    where the client's assertion fails and it aborts.
    """
    dev, prox, trace = sockdir / "dev.sock", sockdir / "p.sock", sockdir / "t.trace"
    device = peers.vfioproxy("serve-device", "serve-device", "--socket", dev,
                             "--vendor-id", "0xdead", "--device-id", "0xbeef")
    peers.wait_for_socket(dev, device)
    recorder = peers.vfioproxy("record", "record", "--listen", prox, "--server", dev, "-o", trace)
    peers.wait_for_socket(prox, recorder)

    client = peers.start("client", [lvu.client, prox])
    assert client.wait(30) == -signal.SIGABRT, client.describe()
    err = client.err()
    assert "failed to read from region -559038737 0-0x3: Invalid argument" in err  # as it wants
    assert ("get_device_region_info: Assertion `index == VFU_PCI_DEV_BAR1_REGION_IDX "
            "&& nr_fds == 1' failed.") in err
    assert recorder.stop(signal.SIGINT) == 0, recorder.describe()
    assert device.poll() is None  # the server lives on; only that session ended

    recording = read_recording(trace)
    assert recording.undecoded() == [] and recording.violations() == []
    assert [shape(m.record)[:3] for m in recording.messages] == [
        ("VERSION", "c2s", "cmd"), ("VERSION", "s2c", "reply"),
        ("REGION_READ", "c2s", "cmd"), ("REGION_READ", "s2c", "error"),
        ("DEVICE_GET_INFO", "c2s", "cmd"), ("DEVICE_GET_INFO", "s2c", "reply"),
        *[("DEVICE_GET_REGION_INFO", d, k) for _ in range(4) for d, k in
          (("c2s", "cmd"), ("s2c", "reply"))],
    ]
    asked = [m.observation.message.body for m in recording.messages[6::2]]
    assert all(isinstance(b, RegionInfoBody) for b in asked)
    assert [(b.index, b.argsz) for b in asked if isinstance(b, RegionInfoBody)] == [
        (0, 32), (1, 32), (2, 32), (2, 64)
    ]
    last = recording.messages[-1]
    body = last.observation.message.body
    assert isinstance(body, RegionInfoBody)
    assert [type(c) for c in body.caps] == [SparseMmapCap]
    assert [fd.kind.value for fd in last.record.fds] == ["memfd"]
    assert [e.data["closed_by"] for e in recording.events if e.kind == "session_close"] == [
        "client"
    ]
