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
import threading
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


#: a row: label, peak RSS MiB, seconds, exit status (None: stopped at --limit), last line
Row = tuple[str, float, float, int | None, str]


def _reap(proc: subprocess.Popen[str], start: float, limit: float, label: str) -> Row:
    """Read ``proc``'s output and wait4 it (killed at ``limit`` seconds from ``start``)."""
    assert proc.stdout is not None
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()))  # type: ignore[union-attr]
    reader.start()
    killed = False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() - start > limit:
            proc.kill()
            killed = True
            _, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)
    took = time.perf_counter() - start
    reader.join()
    lines = [line for line in "".join(chunks).splitlines() if line.strip()]
    return (label, usage.ru_maxrss / 1024, took, None if killed else proc.returncode,
            lines[-1] if lines else "")


def _wait_for(path: Path, proc: subprocess.Popen[str], limit: float) -> bool:
    """Whether ``proc`` listens on ``path`` within ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def show(row: Row, base: Row | None) -> None:
    label, rss, took, status, last = row
    ratio_rss = f"{rss / base[1]:.1f}" if base else "1.0"
    ratio_time = f"{took / base[2]:.1f}" if base else "1.0"
    shown = "killed at --limit" if status is None else str(status)
    print(f"| {label} | {rss:.0f} | {ratio_rss} | {took:.2f} | {ratio_time} | {shown} |",
          flush=True)
    if last:
        print(f"|   {last} |||||", flush=True)


def run(unanswered: int, answered: int, extra: list[str], limit: float) -> None:
    import vfioproxy

    python = sys.executable
    # python -m puts the working directory first on sys.path: run the replays from the
    # checkout this process imported vfioproxy from (PYTHONPATH), not from this one
    os.chdir(Path(vfioproxy.__file__).resolve().parent.parent)
    replay = [python, "-m", "vfioproxy", "replay"]
    print("| run | peak RSS MiB | x baseline | time s | x baseline | exit |")
    print("|---|---:|---:|---:|---:|---:|", flush=True)
    with tempfile.TemporaryDirectory(prefix="replay-memory-") as tmp:
        base_dir = Path(tmp)
        start = time.perf_counter()
        proc = subprocess.Popen([python, "-c", "import vfioproxy.replay"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        base = _reap(proc, start, limit, "baseline: python -c 'import vfioproxy.replay'")
        show(base, None)
        traces = {}
        for name, count, with_replies in (("unanswered", unanswered, False),
                                          ("answered", answered, True)):
            path = base_dir / f"{name}.trace"
            write_trace(path, count, answered=with_replies)
            traces[name] = (path, f"{name} ({count} cmds, {path.stat().st_size / 1e6:.0f} MB)")
        device = base_dir / "dev.sock"
        server = subprocess.Popen([python, "-m", "vfioproxy", "serve-device", "--socket",
                                   str(device)], stderr=subprocess.DEVNULL)
        try:
            if not _wait_for(device, server, 60):  # type: ignore[arg-type]
                raise SystemExit("serve-device did not start")
            for path, what in traces.values():
                start = time.perf_counter()
                proc = subprocess.Popen(
                    [*replay, "client", str(path), "--session", "1", "--server", str(device),
                     *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                show(_reap(proc, start, limit, f"replay client, {what}"), base)
        finally:
            server.terminate()
            server.wait()
        for name, (path, what) in traces.items():
            listen = base_dir / f"replay-{name}.sock"
            start = time.perf_counter()
            proc = subprocess.Popen(
                [*replay, "server", str(path), "--session", "1", "--listen", str(listen),
                 *extra], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            client = None
            if _wait_for(listen, proc, limit):
                client = subprocess.Popen(
                    [*replay, "client", str(path), "--session", "1", "--server", str(listen),
                     *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            show(_reap(proc, start, limit, f"replay server, {what}"), base)
            if client is not None:
                client.kill()
                client.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unanswered", type=int, default=1_000_000, metavar="N",
                        help="commands of the unanswered trace (default 1000000)")
    parser.add_argument("--answered", type=int, default=200_000, metavar="M",
                        help="command/reply pairs of the answered trace (default 200000)")
    parser.add_argument("--limit", type=float, default=600, metavar="SECONDS",
                        help="kill a replay still running after this long (default 600)")
    parser.add_argument("extra", nargs="*", metavar="OPTION",
                        help="more options for every replay (after --)")
    args = parser.parse_args()
    import vfioproxy

    print(f"replay from {Path(vfioproxy.__file__).parent}; python {sys.version.split()[0]}")
    run(args.unanswered, args.answered, args.extra, args.limit)


if __name__ == "__main__":
    main()
