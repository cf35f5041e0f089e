"""Do ``trace slice`` and ``trace merge`` stream? Peak memory and time on big traces.

    .venv/bin/python bench/trace_cut.py                  # a 300 MiB trace (and a 75 MiB one)
    .venv/bin/python bench/trace_cut.py --size 600 --dir /var/tmp/cut
    .venv/bin/python bench/trace_cut.py --json OUT.json

Generates a trace of ``--size`` MiB, and one of a quarter of that on a second
host, from the real sessions of ``traces/reference-*.trace``: each is
repeated, session after session (new session ids, times moved on, the
sessions of a repetition interleaved as a proxy serving several clients
records them), until the file is big enough. Then runs each command below as
its own process, one at a time: its wall time, CPU time (the rusage of
:func:`os.wait4`) and peak RSS. The peak RSS is the process's own ``VmHWM``
(``/proc/self/status``), read by a launcher as the command ends:
``ru_maxrss`` would not do, since Linux counts in it the memory of the
process that forked the child (this script, with its traces) before the exec.

Figures are ratios to baselines measured in the same run: peak RSS to that of
``python -c 'import vfioproxy.cli'`` (the interpreter and the code, nothing
read), time to ``cp`` of the same input (reading and writing its bytes).
Streaming shows as the same RSS for the big trace as for the quarter one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs

from recorder.reader import TraceReader
from recorder.records import EventRecord, Record, TraceHeader
from recorder.writer import TraceWriter

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "traces").glob("reference-*.trace"))
PYTHON = sys.executable


def _sessions() -> list[tuple[TraceHeader, list[Record]]]:
    found = []
    for path in SOURCES:
        with TraceReader(path) as reader:
            found.append((reader.header, list(reader)))
    return found


def generate(path: Path, size: int, host: str) -> int:
    """Write a trace of about ``size`` bytes to ``path``; returns its sessions."""
    sources = _sessions()
    header = attrs.evolve(sources[0][0], host=host, source="bench trace_cut",
                          info={"generated_by": "bench/trace_cut.py"})
    base = header.mono_ns
    session = seq = 0
    with TraceWriter(path, header, overwrite=True) as writer:
        while writer.bytes_written < size:
            # one repetition: each source's session, interleaved by time
            shifted = []
            for _, records in sources:
                session += 1
                start = records[0].t_ns
                for record in records:
                    t_ns = base + (record.t_ns - start)
                    shifted.append((t_ns, session, record))
            shifted.sort(key=lambda entry: entry[0])
            for t_ns, number, record in shifted:
                seq += 1
                if isinstance(record, EventRecord):
                    copy: Record = EventRecord(seq, number, t_ns, record.kind, record.data)
                else:
                    copy = attrs.evolve(record, seq=seq, session=number, t_ns=t_ns)
                writer.copy_record(copy)
            base = shifted[-1][0] + 1_000_000
    return session


#: runs ``python -m vfioproxy ARGS`` (or, with no ARGS, only imports the CLI)
#: and then writes its own peak RSS (KiB) to the fd $TRACE_CUT_FD
LAUNCHER = """
import os, runpy, sys
code = 0
try:
    if len(sys.argv) > 1:
        sys.argv[0] = "vfioproxy"
        runpy.run_module("vfioproxy", run_name="__main__", alter_sys=True)
    else:
        import vfioproxy.cli
except SystemExit as exc:
    code = exc.code
finally:
    peak = next(line.split()[1] for line in open("/proc/self/status")
                if line.startswith("VmHWM:"))
    os.write(int(os.environ["TRACE_CUT_FD"]), peak.encode())
sys.exit(code)
"""


def measure(argv: list[str], **env: str) -> dict[str, Any]:
    """Run ``argv`` as a process: wall and CPU seconds, and its peak RSS in KiB
    (what it writes to $TRACE_CUT_FD; None when it writes nothing)."""
    read, write = os.pipe()
    started = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**os.environ, **env, "TRACE_CUT_FD": str(write)},
                               pass_fds=(write,))
    os.close(write)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    with os.fdopen(read, "rb") as pipe:
        peak = pipe.read()
    assert process.stderr is not None
    with process.stderr:
        stderr = process.stderr.read().decode()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({code}): {stderr}")
    return {"rss_kib": int(peak) if peak else None, "seconds": elapsed,
            "cpu_seconds": usage.ru_utime + usage.ru_stime}


def vfioproxy(*args: str | Path) -> list[str]:
    return [PYTHON, "-c", LAUNCHER, *map(str, args)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=300, help="MiB of the big trace")
    parser.add_argument("--dir", type=Path, help="where the traces go (default: a temporary "
                        "directory, removed afterwards)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="trace_cut."))
    work.mkdir(parents=True, exist_ok=True)
    try:
        run(args, work)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> None:
    big, quarter = work / "big.trace", work / "quarter.trace"
    started = time.perf_counter()
    sessions = generate(big, args.size << 20, "vm")
    generate(quarter, args.size << 18, "vm2")
    print(f"generated {big} ({big.stat().st_size >> 20} MiB, {sessions} sessions) and "
          f"{quarter} ({quarter.stat().st_size >> 20} MiB) in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    with TraceReader(big) as reader:
        last = 0
        for last_record in reader:
            last = last_record.seq
    middle = f"{last * 45 // 100}:{last * 55 // 100}"
    out = work / "out.trace"
    env = {"PYTHONPATH": str(ROOT)}
    rows: list[tuple[str, str, dict[str, Any]]] = []

    def row(name: str, argv: list[str], base: str) -> None:
        if out.exists():
            out.unlink()
        figures = measure(argv, **env)
        figures["out_mib"] = out.stat().st_size / (1 << 20) if out.exists() else 0.0
        rows.append((name, base, figures))
        rss = "-" if figures["rss_kib"] is None else f"{figures['rss_kib'] / 1024:.1f} MiB"
        print(f"  {name}: {rss} peak RSS, {figures['seconds']:.1f} s", flush=True)

    row("python -c 'import vfioproxy.cli'", vfioproxy(), "")
    row("cp big", ["cp", str(big), str(out)], "")
    row("cp quarter", ["cp", str(quarter), str(out)], "")
    row("slice big --seq (middle 10%)", vfioproxy("trace", "slice", big, out, "--seq", middle),
        "cp big")
    row("slice quarter --seq (middle 10%)",
        vfioproxy("trace", "slice", quarter, out, "--seq", middle_of(quarter)), "cp quarter")
    row("slice big --session 2", vfioproxy("trace", "slice", big, out, "--session", "2"),
        "cp big")
    row("slice big -Y 'command == REGION_READ and kind == reply'",
        vfioproxy("trace", "slice", big, out, "-Y", "command == REGION_READ and kind == reply"),
        "cp big")
    row("merge big quarter", vfioproxy("trace", "merge", out, big, quarter), "cp big")
    report(args, big, quarter, rows)


def middle_of(path: Path) -> str:
    with TraceReader(path) as reader:
        last = 0
        for record in reader:
            last = record.seq
    return f"{last * 45 // 100}:{last * 55 // 100}"


def report(args: argparse.Namespace, big: Path, quarter: Path,
           rows: list[tuple[str, str, dict[str, Any]]]) -> None:
    figures = {name: f for name, _, f in rows}
    rss0 = figures["python -c 'import vfioproxy.cli'"]["rss_kib"]
    print()
    print(f"big {big.stat().st_size / (1 << 20):.0f} MiB, quarter "
          f"{quarter.stat().st_size / (1 << 20):.0f} MiB; Python {platform.python_version()}")
    print("| run | peak RSS MiB | x import | time s | CPU s | x cp | output MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, base, f in rows:
        ratio = f"{f['seconds'] / figures[base]['seconds']:.0f}" if base else ""
        rss = f["rss_kib"]
        memory = "-- | --" if rss is None else f"{rss / 1024:.1f} | {rss / rss0:.2f}"
        print(f"| {name} | {memory} | {f['seconds']:.2f} | {f['cpu_seconds']:.2f} | {ratio} | "
              f"{f['out_mib']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({
            "big_bytes": big.stat().st_size, "quarter_bytes": quarter.stat().st_size,
            "python": platform.python_version(),
            "runs": [{"name": n, "baseline": b, **f} for n, b, f in rows],
        }, indent=2))


if __name__ == "__main__":
    main()
