"""How much memory and time ``vfioproxy replay client`` / ``replay server`` take on big traces.

    .venv/bin/python bench/replay_memory.py                      # 1M unanswered, 200k answered
    .venv/bin/python bench/replay_memory.py --unanswered 100000 --answered 20000
    PYTHONPATH=/work/main .venv/bin/python bench/replay_memory.py   # another checkout's replay

Generates two traces into a temporary directory with
:class:`recorder.writer.TraceWriter`, each one session that starts with the
VERSION exchange of ``traces/reference-realize-001.trace``:

- ``unanswered``: then N REGION_READ commands (config space offset 0, 4
  bytes) that the recorded server never answered (no reply, no session
  close: the recording was cut off);
- ``answered``: then M such commands, each followed by the reply the
  reference device server gives.

Each replay runs as a subprocess (``python -m vfioproxy replay ...``) and is
measured with ``os.wait4``: peak RSS (``ru_maxrss``) and wall time.
``replay client`` plays against the reference device server
(``vfioproxy serve-device``); ``replay server`` plays towards ``replay client``
of the same trace (the server's figures are reported). The baseline, measured
in the same run, is ``python -c 'import vfioproxy.replay'``: RSS is given in
MiB and as a ratio to it, time in seconds and as a ratio to it. The replays'
exit status and the last line of their report are shown too.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from recorder.reader import TraceReader
from recorder.records import EventKind, MessageRecord, TraceHeader
from recorder.writer import TraceWriter
from vfioproxy.protocol.bodies import RegionAccessBody
from vfioproxy.protocol.codec import build_command, build_reply, encode
from vfioproxy.protocol.header import Command
from vfioproxy.protocol.pci import Region
from vfioproxy.side import Direction

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "traces" / "reference-realize-001.trace"
#: what the reference device server answers to a 4-byte read of config offset 0
VENDOR_DEVICE = bytes.fromhex("361b0011")


def _version_exchange() -> list[bytes]:
    with TraceReader(REFERENCE) as reader:
        messages = [r.data for r in reader if isinstance(r, MessageRecord)][:2]
    return messages


def write_trace(path: Path, commands: int, *, answered: bool) -> None:
    """One session: the VERSION exchange, then ``commands`` config reads."""
    t_ns = 1_000_000
    with TraceWriter(path, TraceHeader.now("bench/replay_memory.py", {})) as writer:
        writer.write_event(1, EventKind.SESSION_OPEN, t_ns, {"server_path": "bench"})
        for direction, data in zip((Direction.C2S, Direction.S2C), _version_exchange(),
                                   strict=True):
            t_ns += 1000
            writer.write_message(1, direction, t_ns, data)
        for n in range(commands):
            msg_id = (n + 1) % 0x10000
            command = build_command(Command.REGION_READ, msg_id,
                                    RegionAccessBody(0, Region.CONFIG, 4))
            t_ns += 1000
            writer.write_message(1, Direction.C2S, t_ns, encode(command)[0])
            if answered:
                reply = build_reply(command, RegionAccessBody(0, Region.CONFIG, 4, VENDOR_DEVICE))
                t_ns += 1000
                writer.write_message(1, Direction.S2C, t_ns, encode(reply)[0])
        if answered:
            writer.write_event(1, EventKind.SESSION_CLOSE, t_ns + 1000, {})


def measure(argv: list[str], **popen: object) -> tuple[float, float, int, str]:
    """(peak RSS MiB, seconds, exit status, last output line) of one subprocess."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)  # type: ignore[call-overload]
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    took = time.perf_counter() - start
    lines = [line for line in out.splitlines() if line.strip()]
    return usage.ru_maxrss / 1024, took, proc.returncode, lines[-1] if lines else ""


def _wait_for(path: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 600
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{proc.args} did not start listening on {path}")
        time.sleep(0.05)


def run(unanswered: int, answered: int, extra: list[str]) -> list[tuple[str, float, float, int,
                                                                          str]]:
    python = sys.executable
    env = dict(os.environ)
    rows = []
    with tempfile.TemporaryDirectory(prefix="replay-memory-") as tmp:
        base = Path(tmp)
        rss, took, status, _ = measure([python, "-c", "import vfioproxy.replay"], env=env)
        rows.append(("baseline: import vfioproxy.replay", rss, took, status, ""))
        traces = {}
        for name, count, with_replies in (("unanswered", unanswered, False),
                                          ("answered", answered, True)):
            path = base / f"{name}.trace"
            write_trace(path, count, answered=with_replies)
            traces[name] = (path, count)
        device = base / "dev.sock"
        server = subprocess.Popen([python, "-m", "vfioproxy", "serve-device", "--socket",
                                   str(device)], env=env, stderr=subprocess.DEVNULL, text=True)
        try:
            _wait_for(device, server)
            for name, (path, count) in traces.items():
                size = path.stat().st_size / 1e6
                label = f"replay client, {name} ({count} cmds, {size:.0f} MB)"
                rss, took, status, last = measure(
                    [python, "-m", "vfioproxy", "replay", "client", str(path), "--session", "1",
                     "--server", str(device), *extra], env=env)
                rows.append((label, rss, took, status, last))
        finally:
            server.terminate()
            server.wait()
        for name, (path, count) in traces.items():
            size = path.stat().st_size / 1e6
            listen = base / f"replay-{name}.sock"
            replayer = subprocess.Popen(
                [python, "-m", "vfioproxy", "replay", "server", str(path), "--session", "1",
                 "--listen", str(listen), *extra],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            start = time.perf_counter()
            _wait_for(listen, replayer)
            client = subprocess.run(
                [python, "-m", "vfioproxy", "replay", "client", str(path), "--session", "1",
                 "--server", str(listen), *extra],
                env=env, capture_output=True, text=True, check=False)
            assert replayer.stdout is not None
            out = replayer.stdout.read()
            _, status, usage = os.wait4(replayer.pid, 0)
            took = time.perf_counter() - start
            lines = [line for line in out.splitlines() if line.strip()]
            rows.append((f"replay server, {name} ({count} cmds, {size:.0f} MB)",
                         usage.ru_maxrss / 1024, took, os.waitstatus_to_exitcode(status),
                         lines[-1] if lines else ""))
            del client
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unanswered", type=int, default=1_000_000, metavar="N",
                        help="commands of the unanswered trace (default 1000000)")
    parser.add_argument("--answered", type=int, default=200_000, metavar="M",
                        help="command/reply pairs of the answered trace (default 200000)")
    parser.add_argument("extra", nargs="*", metavar="OPTION",
                        help="more options for every replay (after --)")
    args = parser.parse_args()
    import vfioproxy

    print(f"replay from {Path(vfioproxy.__file__).parent}; python {sys.version.split()[0]}")
    rows = run(args.unanswered, args.answered, args.extra)
    base_rss, base_time = rows[0][1], rows[0][2]
    print("| run | peak RSS MiB | x baseline | time s | x baseline | exit |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, rss, took, status, _ in rows:
        print(f"| {label} | {rss:.0f} | {rss / base_rss:.1f} | {took:.2f} | "
              f"{took / base_time:.1f} | {status} |")
    print()
    for label, *_, last in rows[1:]:
        print(f"{label}: {last}")


if __name__ == "__main__":
    main()
