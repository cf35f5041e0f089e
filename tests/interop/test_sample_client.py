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

The two recorded legs are then replayed: as server towards a fresh
samples/client (it runs its whole source leg and migrates, and stops at its
BAR1 CRC check, which compares the device with its own random writes), and
as client against a fresh samples/server (it stops at the clock the client
wrote to BAR0). The fault-injection runs use the same ``bin/`` trick to stop
the client right after its source leg (``bin/server`` puts a plain file
where the client expects the destination socket: "not a socket"), so they
take about 1 s instead of 11.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import shutil
import signal
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from tests.interop.conftest import SUMMARY, LvuBuild, short_dir
from tests.interop.peers import REAPER, Peers, Proc, deadline, read_json
from tests.interop.tracecheck import Recording, read_recording, shape
from tests.realdata import TRACES
from vfioproxy.io.fds import OwnedFd
from vfioproxy.io.transport import FdStream
from vfioproxy.io.unix import is_listening
from vfioproxy.protocol.bodies import RegionAccessBody, RegionInfoBody, SparseMmapCap
from vfioproxy.protocol.header import DEFAULT_MAX_MESSAGE_SIZE, Command, Header
from vfioproxy.replay.client import ClientReplayOptions, replay_client
from vfioproxy.replay.match import Matcher
from vfioproxy.replay.report import ReplayReport
from vfioproxy.replay.server import ServerReplayOptions, serve_replay
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
    source_trace: Path
    migrated_trace: Path
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
            if is_listening(real):
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
        source_trace=source_trace, migrated_trace=migrated_trace,
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


# ------------------------------------------------------------------ (3) replay

#: a REGION_WRITE of the client's clock to BAR0 (header 16 + access 16 + a time_t)
BAR0_WRITE = ("REGION_WRITE", "c2s", "cmd", 16 + 16 + 8, ())
#: samples/server's reply to the destination client's BAR1 read (its CRC check)
BAR1_READ_REPLY = ("REGION_READ", "s2c", "reply", 16 + 16 + 0x4000, ())
#: what a live request must share with a recorded one to be served its reply: what the
#: request is (every header field: command, flags, size; the region, offset and count it
#: accesses; its fds), not the bytes it writes (BAR0 gets the clock, BAR1 random bytes)
SAMPLE_MATCH = Matcher(("header", "fds", "region", "offset", "count"))
#: how long a replayed server waits for samples/client while recorded requests remain
SAMPLE_REPLAY_WAIT = 10.0
#: the migration destination is a replayed server already listening on <sock>_migrated:
#: the script the client's original process exec()s only leaves its arguments behind
#: what samples/client execs as its migration destination during a replay: it only
#: writes its arguments down. Builtins alone (no ``$(dirname ...)``): the client's
#: forked half is this shell's child, and a shell that waits for a subshell of its
#: own may reap that child instead, losing its exit status to the test's reaper.
REPLAY_WRAPPER = """#!/bin/sh
echo "$*" > "${0%/*}/server.argv"
"""


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return tuple(table)


_CRC32C = _crc32c_table()


def rte_hash_crc(data: bytes) -> int:
    """samples/client's checksum (DPDK's ``rte_hash_crc(data, len, 0)``): CRC-32C, initial
    value 0 and no final inversion."""
    crc = 0
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc


class IntxLine(FdStream):
    """A replayed server's stream to samples/client, plus samples/server's INTx line.

    samples/server raises INTx by writing to the eventfd the client passed with
    DEVICE_SET_IRQS, not with a vfio-user message, so no trace holds it and a replayed
    server never raises it. This stream keeps a duplicate of that eventfd and signals it
    once, just before the replay sends the first server DMA_WRITE: samples/server, when
    its timer expires, calls vfu_irq_trigger() and then DMA_WRITEs (do_dma_io).
    """

    def __init__(self, sock: trio.socket.SocketType) -> None:
        super().__init__(sock)
        self.eventfd: int | None = None
        self.raised = 0

    async def receive_message(self, max_size: int = DEFAULT_MAX_MESSAGE_SIZE,
                              ) -> tuple[bytes, list[OwnedFd]]:
        data, fds = await super().receive_message(max_size)
        header = Header.parse(data)
        if (header.command == Command.DEVICE_SET_IRQS and header.is_command and fds
                and self.eventfd is None):
            self.eventfd = os.dup(fds[0].fileno())
        return data, fds

    async def send_message(self, data: bytes | bytearray | memoryview,
                           fds: Sequence[int | OwnedFd] = ()) -> None:
        header = Header.parse(bytes(data[:16]))
        if (header.command == Command.DMA_WRITE and header.is_command and not self.raised
                and self.eventfd is not None):
            os.eventfd_write(self.eventfd, 1)
            self.raised += 1
        await super().send_message(data, fds)

    async def aclose(self) -> None:
        if self.eventfd is not None:
            os.close(self.eventfd)
            self.eventfd = None
        await super().aclose()


async def serve_leg(trace: Path, listen: Path, options: ServerReplayOptions,
                    out: list[tuple[ReplayReport, IntxLine]],
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """:func:`serve_replay` with an :class:`IntxLine` stream: listen, replay towards the
    first client, append (report, stream) to ``out``."""
    streams: list[IntxLine] = []

    def line(sock: trio.socket.SocketType) -> IntxLine:
        streams.append(IntxLine(sock))
        return streams[-1]

    report = await serve_replay(trace, listen, options, stream_factory=line,
                                task_status=task_status)
    out.append((report, streams[0]))


def client_lines(out: str) -> list[str]:
    """samples/client's own lines up to its migration (it forks there)."""
    lines = [line for line in out.splitlines() if line.startswith("client: ")]
    return lines[: lines.index("client: starting destination server") + 1]


async def test_sample_client_recording_replays(
    sample_sessions: SampleSessions, lvu: LvuBuild, peers: Peers, sockdir: Path
) -> None:
    """The recorded session, replayed as server, runs a fresh real samples/client through
    its whole source leg and its migration, up to the one check no replay can pass.

    Both legs the module recorded are served by :func:`serve_replay` (the source on
    ``SOCK``, the migrated one on ``SOCK_migrated``); a fresh ``samples/client SOCK``
    connects, and the destination "server" its original process exec()s at migration is a
    script that does nothing (the replayed destination already listens). Three things a
    replayed server cannot do by itself, and how this test deals with them:

    - the client writes its clock to BAR0 (``time(NULL) + 1``, then ``+ 10``) and random
      bytes to BAR1 (the fake guest thread), so requests are matched on what they are
      (:data:`SAMPLE_MATCH`), not on those bytes, and the report lists exactly these
      differences: the 2 BAR0 writes, whose live values are later than the recorded ones
      by the seconds between the two runs, and the fake guest's writes;
    - the fake guest writes a random number of times: live writes beyond the recorded
      ones are unmatched and pass through to a spare samples/server (``on_mismatch
      passthrough``, BAR1 accepts any write), recorded ones the client does not make are
      reported missing;
    - samples/server raises INTx by writing to the client's eventfd, outside the
      protocol, so the test does it for the replay (:class:`IntxLine`) before the first
      DMA_WRITE, as samples/server does. Without it the client waits on the eventfd
      forever and the replay times out waiting for its DMA_WRITE reply.

    Everything else is the recording: every reply (region info with BAR1's region file,
    config space, the dirty bitmaps the client asserts on, the migration data) and the
    server's DMA_WRITE/DMA_READ, whose replies from the live client match the recorded
    ones; the client prints what it printed against the real server. It then migrates:
    it writes the migration data the replay gave it to the replayed destination, which
    matches the recorded writes byte for byte, and reads BAR1 back. There it stops: the
    recorded destination's BAR1 is what the *recorded* fake guest wrote last, the client
    checks it against the CRC of its own last random write and aborts with ``CRC
    mismatch: <live> != <CRC of the recorded BAR1>``. The rest of the migrated leg
    (RUNNING, DMA maps, IRQs, the second INTx and DMA) is reported missing.

    Replayed as *client* instead, the session stops at the clock (the next test).
    """
    s = sample_sessions
    listen, bindir = sockdir / "r.sock", sockdir / "bin"
    migrated = Path(f"{listen}_migrated")
    bindir.mkdir()
    (bindir / "client").symlink_to(lvu.client)
    (bindir / "server").write_text(REPLAY_WRAPPER)
    (bindir / "server").chmod(0o755)
    spare_sock = sockdir / "spare.sock"
    spare = peers.start("spare-server", [lvu.server, "-v", spare_sock])
    peers.wait_for_socket(spare_sock, spare)
    options = ServerReplayOptions(match_on=SAMPLE_MATCH, on_mismatch="passthrough",
                                  passthrough=str(spare_sock), timeout=SAMPLE_REPLAY_WAIT)

    source_out: list[tuple[ReplayReport, IntxLine]] = []
    migrated_out: list[tuple[ReplayReport, IntxLine]] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_leg, s.source_trace, listen, options, source_out)
            await nursery.start(serve_leg, s.migrated_trace, migrated, options, migrated_out)
            # stdbuf: the client aborts, and a fully buffered stdout would lose its lines
            client = run_client(peers, "replayed-client",
                                ["stdbuf", "-oL", bindir / "client", listen],
                                sockdir / "reap.json")
        run = await trio.to_thread.run_sync(finish, client, sockdir / "reap.json", 15)
    [(source, source_line)] = source_out
    [(dest, dest_line)] = migrated_out

    # the client: through the source leg and the migration, aborted at the CRC check
    assert run.reaped["launched"]["exit"] == 0, client.describe()  # bin/server
    assert [p["exit"] for p in run.reaped["forked"]] == [-signal.SIGABRT], client.describe()
    assert (bindir / "server.argv").read_text().strip() == f"-v {migrated}"
    crc = re.search(r"client: CRC mismatch: (\d+) != (\d+)", client.err())
    assert crc is not None, client.describe()
    bar1 = next(m.observation.message.body for m in s.migrated.messages
                if shape(m.record) == BAR1_READ_REPLY)
    assert isinstance(bar1, RegionAccessBody)
    assert int(crc[2]) == rte_hash_crc(bar1.data) != int(crc[1])
    out = client.out()
    assert out.count("client: INTx triggered!") == 1 and source_line.raised == 1

    # the source leg: nothing differs but the clock and the fake guest
    recorded_bar0 = [m.record.seq for m in s.source.messages if shape(m.record) == BAR0_WRITE]
    recorded_guest = sum(1 for m in s.source.messages if shape(m.record) == FAKE_GUEST_WRITE)
    clock = [d for d in source.divergences if d.where == "BAR0 offset 0x0"]
    assert [(d.kind, d.seq, [f.field for f in d.diffs]) for d in clock] == [
        ("mismatch", seq, ["data"]) for seq in recorded_bar0], source.text()
    live_clock = [int(d.diffs[0].live, 16) for d in clock]
    later = [live - int(d.diffs[0].recorded, 16) for live, d in zip(live_clock, clock, strict=True)]
    assert all(0 < seconds < 600 for seconds in later), later
    guest = [d for d in source.divergences if d.where == "BAR1 offset 0x0"]
    assert len(clock) + len(guest) == len(source.divergences), source.text()
    kinds = Counter(d.kind for d in guest)
    assert set(kinds) <= {"mismatch", "unmatched", "missing"}
    assert all(f.field.startswith("data[") for d in guest for f in d.diffs)
    assert all(d.label == FAKE_GUEST_WRITE[0] + " cmd" for d in guest if d.kind != "unmatched")
    live_guest = kinds["mismatch"] + kinds["unmatched"]
    assert kinds["mismatch"] == min(live_guest, recorded_guest)
    assert kinds["missing"] == recorded_guest - kinds["mismatch"]
    assert source.compared == source.matched + len(clock) + kinds["mismatch"]
    assert source.replayed == source.recorded - kinds["missing"] * 2
    assert source.notes == ()
    if kinds["unmatched"]:  # the spare server took the extra writes, then the client left
        assert spare.wait(10) == 0, spare.describe()
    else:
        assert spare.poll() is None
    # it printed what it printed against the real samples/server, but its clock
    expected = [f"client: wrote to BAR0: {live_clock[0]}" if line.startswith(
        "client: wrote to BAR0: ") else line for line in client_lines(s.proxied.client.out())]
    assert client_lines(out) == expected

    # the migrated leg: whole up to the client's BAR1 read, then nothing more
    messages = s.migrated.messages
    read_at = next(i for i, m in enumerate(messages) if shape(m.record) == BAR1_READ_REPLY)
    after = [m.record.seq for m in messages[read_at + 1:]
             if shape(m.record)[2] == "cmd"]
    assert [(d.kind, d.seq) for d in dest.divergences] == [("missing", seq) for seq in after]
    requests = sum(1 for m in messages[: read_at + 1] if shape(m.record)[1:3] == ("c2s", "cmd"))
    assert dest.compared == dest.matched == requests, dest.text()
    assert dest.replayed == read_at + 1 and dest_line.raised == 0
    SUMMARY.append(
        f"samples/client against its recorded session replayed as server: source leg "
        f"{source.replayed} of {source.recorded} messages, differing only in its 2 BAR0 clock "
        f"writes (+{later[0]} s, +{later[1]} s) and the fake guest's BAR1 writes ({live_guest} "
        f"live, {recorded_guest} recorded: {kinds['unmatched']} passed through, "
        f"{kinds['missing']} missing); migrated leg {dest.replayed} of {dest.recorded} "
        f"until the client's BAR1 CRC check aborts it (the recorded guest's data); "
        f"client ran {run.elapsed:.2f} s"
    )


async def test_sample_client_recording_replayed_as_client_stops_at_the_clock(
    sample_sessions: SampleSessions, lvu: LvuBuild, peers: Peers, sockdir: Path
) -> None:
    """Replayed as client against a fresh samples/server, the session stops at the timer.

    The recorded client's BAR0 write holds an absolute time, ``time(NULL) + 1`` of the
    recording; the replay sends it as recorded, so samples/server arms its timer for a
    time already past (``arming timer to trigger in -N seconds``), setitimer() refuses,
    and the write is answered EINVAL. The BAR0 read then returns the server's clock minus
    the BAR0 value it never stored (0). The timer never fires, so neither do INTx nor the
    DMA_WRITEs the recording has next: the replay waits for them and stops. Everything
    before (VERSION, region infos, config space, reset, 16 DMA maps, IRQs, dirty logging)
    matches. Ignore rules cannot get further: they leave fields out of comparisons but do
    not change what the replay sends, nor let it skip recorded server messages that never
    come; that needs the replay engine to rewrite time-relative fields or to treat
    timer-driven server commands as optional.
    """
    s = sample_sessions
    dev = sockdir / "fresh.sock"
    server = peers.start("fresh-server", [lvu.server, "-v", dev])
    peers.wait_for_socket(dev, server)
    with trio.fail_after(20):
        report = await replay_client(s.source_trace, dev, ClientReplayOptions(timeout=1.0))
    seqs = [m.record.seq for m in s.source.messages]
    write = next(i for i, m in enumerate(s.source.messages) if shape(m.record) == BAR0_WRITE)
    dma = next(i for i, m in enumerate(s.source.messages)
               if shape(m.record)[:3] == ("DMA_WRITE", "s2c", "cmd"))
    assert dma == write + 4  # BAR0 write, its reply, BAR0 read, its reply, then the timer
    assert [(d.kind, d.seq) for d in report.divergences] == [
        ("mismatch", seqs[write + 1]), ("mismatch", seqs[write + 3]), ("timeout", seqs[dma])
    ], report.text()
    refused, read, _ = report.divergences
    fields = {f.field: (f.live, f.recorded) for f in refused.diffs}
    assert fields["header.error"] == (errno.EINVAL, 0)
    [value] = read.diffs
    assert value.field == "data"
    assert abs(int(value.live, 16) - time.time()) < 60  # the server's clock minus 0
    assert report.compared - report.matched == 2
    assert report.replayed == write + 4
    assert server.wait(10) == 0, server.describe()
    err = server.err()
    behind = re.search(r"arming timer to trigger in (-\d+) seconds", err)
    assert behind is not None and "failed to arm timer: Invalid argument" in err, err[-2000:]
    SUMMARY.append(
        f"the source leg replayed as client against a fresh samples/server: {write} messages "
        f"matched, then the recorded clock in the BAR0 write is {-int(behind[1])} s in the "
        f"past (EINVAL), the timer never fires, the replay stops waiting for the DMA_WRITE"
    )


# ------------------------------------------------------------------ (3) fault injection

#: the fault runs: a 2 ms delay on every server message, the same rule with no delay (the
#: reference: the same injecting proxy), and an error injected in place of region info
DELAY = 0.002
DELAY_RULE = "s2c * delay fixed(2ms)"
REFERENCE_RULE = "s2c * delay fixed(0ms)"
ERROR_RULE = "c2s DEVICE_GET_REGION_INFO error EIO"
#: the destination "server" of the fault runs: a plain file where the client expects the
#: destination's socket, so the client stops ("not a socket") right after the source leg
STOP_WRAPPER = """#!/bin/sh
echo "$*" > "$(dirname "$0")/server.argv"
: > "$2"
"""


@attrs.frozen
class FaultRun:
    dir: Path
    server: Proc
    recorder: Proc
    listen: Path
    trace: Path


def start_fault_run(peers: Peers, lvu: LvuBuild, base: Path, name: str, rule: str) -> FaultRun:
    """samples/server behind `vfioproxy record --rule RULE`, in ``base/name``."""
    run = base / name
    bindir = run / "bin"
    bindir.mkdir(parents=True)
    (bindir / "client").symlink_to(lvu.client)
    (bindir / "server").write_text(STOP_WRAPPER)
    (bindir / "server").chmod(0o755)
    dev, listen, trace = run / "dev.sock", run / "p.sock", run / "t.trace"
    server = peers.start(f"{name}-server", [lvu.server, "-v", dev])
    peers.wait_for_socket(dev, server)
    recorder = peers.vfioproxy(f"{name}-record", "record", "--listen", listen, "--server", dev,
                               "-o", trace, "--rule", rule, "--seed", "1")
    peers.wait_for_socket(listen, recorder)
    return FaultRun(run, server, recorder, listen, trace)


def busy_time(recording: Recording) -> float:
    """Seconds from the first message to the last, less the server's 1 s timer (the gap
    before its first DMA_WRITE)."""
    t = [m.record.t_ns for m in recording.messages]
    timer = next(i for i, m in enumerate(recording.messages)
                 if shape(m.record)[:3] == ("DMA_WRITE", "s2c", "cmd"))
    return (t[-1] - t[0] - (t[timer] - t[timer - 1])) / 1e9


def injected(recording: Recording) -> list[dict[str, Any]]:
    return [e.data for e in recording.events if e.kind == "inject"]


def test_sample_client_under_injected_faults(lvu: LvuBuild, peers: Peers, sockdir: Path,
                                             ) -> None:
    """A delay slows samples/client's session by about messages x delay; an error fails it.

    Three clients at once, each against its own samples/server behind its own
    `vfioproxy record --rule`: ``s2c * delay fixed(2ms)``, the same with 0 ms (the
    reference), and ``c2s DEVICE_GET_REGION_INFO error EIO``. The delayed and reference
    clients are stopped right after their source leg (the migration destination they start
    is :data:`STOP_WRAPPER`), which is all that measures the delay: the source leg is
    strictly one request at a time (the client's two threads share a mutex), so each
    delayed server message holds the client up by 2 ms. Measured on the traces: every
    client message that follows a server message comes at least 2 ms after it, and the
    busy time (first to last message, less samples/server's 1 s timer) grows by about the
    number of delayed messages (the inject events) x 2 ms. EIO rather than EINVAL, which
    the client already gets (and wants) for its bogus region read: it reports
    ``failed to get device region info: Input/output error`` and exits 1, and
    samples/server never hears of region info (its log has no ``region_info[``; the trace
    has the command and the inject event, and no reply from the server).
    """
    runs = {name: start_fault_run(peers, lvu, sockdir, name, rule) for name, rule in (
        ("reference", REFERENCE_RULE), ("delayed", DELAY_RULE), ("error", ERROR_RULE))}
    clients = {name: run_client(peers, f"{name}-client", [run.dir / "bin" / "client",
                                                          run.listen], run.dir / "reap.json")
               for name, run in runs.items()}
    limit = time.monotonic() + 30
    while any(c.poll() is None for c in clients.values()):
        assert time.monotonic() < limit, "\n".join(c.describe() for c in clients.values())
        time.sleep(0.002)
    done = {name: finish(c, runs[name].dir / "reap.json", 1) for name, c in clients.items()}
    for run in runs.values():
        assert run.recorder.stop(signal.SIGINT) == 0, run.recorder.describe()
        assert run.server.wait(10) == 0, run.server.describe()
    recordings = {name: read_recording(run.trace) for name, run in runs.items()}
    for recording in recordings.values():
        assert recording.undecoded() == [] and recording.violations() == []
        assert [e.data["closed_by"] for e in recording.events
                if e.kind == "session_close"] == ["client"]

    # delay: the same session, every server message 2 ms late
    reference, delayed = recordings["reference"], recordings["delayed"]
    for name, text, value in (("reference", "delay fixed(0s)", 0.0),
                              ("delayed", "delay fixed(2ms)", DELAY)):
        stopped, recording = done[name], recordings[name]
        assert stopped.reaped["launched"]["exit"] == 0  # the STOP_WRAPPER
        assert [p["exit"] for p in stopped.reaped["forked"]] == [1], stopped.client.describe()
        assert f"{runs[name].listen}_migrated: not a socket" in stopped.client.err()
        events = injected(recording)
        assert [e["index"] for e in events] == list(range(len(recording.records(Direction.S2C))))
        assert all(e["direction"] == "s2c" and e["applied"] == [
            {"rule": 1, "action": "delay", "text": text, "value": value}] for e in events)
    assert without_fake_guest(delayed)[0] == without_fake_guest(reference)[0]
    delayed_messages = len(injected(delayed))
    expected = sum(a["value"] for e in injected(delayed) for a in e["applied"])
    assert expected == pytest.approx(delayed_messages * DELAY)
    waits = [(b.record.t_ns - a.record.t_ns) / 1e9
             for a, b in itertools.pairwise(delayed.messages)
             if a.record.direction is Direction.S2C and b.record.direction is Direction.C2S]
    assert min(waits) >= DELAY - 0.0001, min(waits)
    added = busy_time(delayed) - busy_time(reference)
    assert 0.5 * expected < added < 2 * expected, (added, expected)
    slower = done["delayed"].elapsed - done["reference"].elapsed

    # error: the client fails with EIO, the server never sees the command
    failed, recording = done["error"], recordings["error"]
    assert failed.reaped == {"launched": failed.reaped["launched"], "forked": []}
    assert failed.reaped["launched"]["exit"] == 1, failed.client.describe()
    message = f"client: failed to get device region info: {os.strerror(errno.EIO)}"
    assert message in failed.client.err(), failed.client.describe()
    assert [shape(m.record)[:3] for m in recording.messages] == [
        ("VERSION", "c2s", "cmd"), ("VERSION", "s2c", "reply"),
        ("REGION_READ", "c2s", "cmd"), ("REGION_READ", "s2c", "error"),
        ("DEVICE_GET_INFO", "c2s", "cmd"), ("DEVICE_GET_INFO", "s2c", "reply"),
        ("DEVICE_GET_REGION_INFO", "c2s", "cmd"),
    ]
    assert injected(recording) == [{"direction": "c2s", "index": 3, "applied": [
        {"rule": 1, "action": "error", "text": "error EIO", "value": errno.EIO}]}]
    [opened] = [e for e in recording.events if e.kind == "session_open"]
    assert opened.data["inject"] == {"seed": 1, "rules": [
        {"id": 1, "direction": "c2s", "command": ["DEVICE_GET_REGION_INFO"], "action": "error",
         "errno": "EIO"}]}
    assert "region_info[0]" in runs["reference"].server.err()
    assert "devinfo flags" in runs["error"].server.err()
    assert "region_info[" not in runs["error"].server.err()
    SUMMARY.append(
        f"samples/client through `vfioproxy record --rule '{DELAY_RULE}'` (source leg): "
        f"{len(delayed.messages)} messages, {delayed_messages} delayed, busy time "
        f"{busy_time(delayed) * 1e3:.0f} ms vs {busy_time(reference) * 1e3:.0f} ms with 0 ms: "
        f"+{added * 1e3:.0f} ms for {expected * 1e3:.0f} ms expected (client +{slower * 1e3:.0f}"
        f" ms; each client turn >= {min(waits) * 1e3:.2f} ms); '{ERROR_RULE}': client exits 1 "
        f"with \"{message.removeprefix('client: ')}\", the server never saw the command"
    )


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
