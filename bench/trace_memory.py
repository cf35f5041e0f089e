"""Peak memory (RSS) and time of the trace tools on large traces.

    .venv/bin/python bench/trace_memory.py                       # every shape, 1 GB realistic
    .venv/bin/python bench/trace_memory.py --size 100M --shapes realistic,sessions
    .venv/bin/python bench/trace_memory.py --checkout before=/work/main --checkout after=.
    .venv/bin/python bench/trace_memory.py --dir /var/tmp/traces --keep   # reuse the files

Generates (with :class:`recorder.writer.TraceWriter`, into a temporary
directory or ``--dir``) the shapes of issue 19:

- ``sessions``: 100k sessions of one VERSION command each, never closed (~5 MB);
- ``unanswered``: one session of 1M REGION_READ commands no reply answers (~51 MB);
- ``huge``: one session whose REGION_WRITE is a single 79 MiB record;
- ``realistic``: the sessions of the real traces in ``traces/`` again and
  again (renumbered, one after the other, each opened and closed), up to
  ``--size`` bytes (default 1 GB).

Then runs every tool of :data:`TOOLS` on every shape, each as its own
``python -m vfioproxy`` child with its output to /dev/null, and reports the
child's peak RSS (``ru_maxrss`` from ``os.wait4``) and wall time, one
checkout after the other (``--checkout NAME=DIR``: DIR's ``.venv/bin/python``
run in DIR; default: this checkout). Baselines measured in the same run:
the RSS of ``python -c 'import vfioproxy.cli'`` (what any tool costs before
reading anything) and the time of ``cat FILE >/dev/null`` (reading the
file). Prints a Markdown table to stdout (``--json``: also the raw figures).
The generated traces are deleted at the end unless ``--keep``. Not part of
the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from recorder.records import EventRecord, MessageRecord

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT / "traces"
MiB = 1024 * 1024

#: tool name -> its arguments after ``python -m vfioproxy`` ({trace}: the file,
#: {out}: a trace it writes, deleted after the run).
#: Add a row per tool; a checkout that lacks the command shows its exit status.
TOOLS: dict[str, list[str]] = {
    "show": ["trace", "show", "{trace}"],
    "show --json": ["trace", "show", "--json", "{trace}"],
    "show -v": ["trace", "show", "-v", "{trace}"],
    "stats": ["trace", "stats", "{trace}"],
    "stats --json": ["trace", "stats", "--json", "{trace}"],
    "export pairs": ["trace", "export", "--format", "pairs", "{trace}"],
    "export csv": ["trace", "export", "--format", "csv", "{trace}"],
    "slice --seq": ["trace", "slice", "--seq", "1000:2000", "{trace}", "{out}"],
    "slice -Y": ["trace", "slice", "-Y", "command == REGION_READ and region == CONFIG",
                 "{trace}", "{out}"],
    "merge": ["trace", "merge", "{out}", "{trace}", "{trace}"],
    "diff": ["trace", "diff", "{trace}:1", "{trace}:1"],
}


# The generators run in a child (``--generate``): a child's ru_maxrss starts
# at its parent's RSS when it was forked, so this process stays small.


def _header(msg_id: int, command: int, size: int, flags: int = 0) -> bytes:
    return struct.pack("<HHIII", msg_id & 0xFFFF, command, size, flags, 0)


VERSION_BODY = struct.pack("<HH", 0, 1) + b'{"capabilities":{"max_msg_fds":8}}\0'
VERSION_CMD = _header(1, 1, 16 + len(VERSION_BODY)) + VERSION_BODY


def _writer(path: Path, source: str) -> Any:
    from recorder.records import TraceHeader
    from recorder.writer import TraceWriter

    return TraceWriter(path, TraceHeader.now(source), overwrite=True)


def gen_sessions(path: Path, size: int) -> None:
    """100k sessions, each one VERSION command, none closed."""
    from vfioproxy.side import Direction

    with _writer(path, "bench sessions") as writer:
        for session in range(1, 100_001):
            writer.append_message(session, Direction.C2S, session * 1000, VERSION_CMD)


def gen_unanswered(path: Path, size: int) -> None:
    """One session: VERSION, then 1M REGION_READ commands that nothing answers."""
    from vfioproxy.side import Direction

    with _writer(path, "bench unanswered") as writer:
        writer.append_message(1, Direction.C2S, 1, VERSION_CMD)
        body = struct.pack("<QII", 0, 7, 4)  # offset, region CONFIG, count
        for i in range(1_000_000):
            data = _header(i + 2, 9, 16 + len(body)) + body
            writer.append_message(1, Direction.C2S, 2 + i, data)


def gen_huge(path: Path, size: int) -> None:
    """One session whose REGION_WRITE carries 79 MiB (one record)."""
    payload = 79 * MiB - 64
    body = struct.pack("<QII", 0, 0, payload)
    from vfioproxy.side import Direction

    with _writer(path, "bench huge") as writer:
        writer.append_message(1, Direction.C2S, 1, VERSION_CMD)
        data = _header(2, 10, 16 + len(body) + payload) + body + os.urandom(payload)
        writer.append_message(1, Direction.C2S, 2, data)
        writer.append_message(1, Direction.S2C, 3, _header(2, 10, 16 + 16, 1) + body)


def _templates() -> list[list[MessageRecord | EventRecord]]:
    """The sessions of the real traces, each as its records in file order."""
    from recorder.reader import TraceReader
    from recorder.records import MessageRecord
    sessions: list[list[MessageRecord | EventRecord]] = []
    for trace in sorted(TRACES.glob("*.trace")):
        with TraceReader(trace) as reader:
            by_session: dict[int, list[MessageRecord | EventRecord]] = {}
            for record in reader:
                if record.session is not None:
                    by_session.setdefault(record.session, []).append(record)
        sessions += [records for records in by_session.values()
                     if any(isinstance(r, MessageRecord) for r in records)]
    return sessions


def gen_realistic(path: Path, size: int) -> None:
    """The real traces' sessions over and over, one after the other, up to ``size`` bytes."""
    write_realistic(path, size=size)


def write_realistic(path: Path, *, size: int | None = None, messages: int | None = None,
                    source: str = "bench realistic") -> int:
    """Write the real traces' sessions over and over into ``path`` (renumbered,
    one after the other, each opened and closed) until the file holds ``size``
    bytes or ``messages`` messages (whichever comes first; one of them must be
    given), stopping at the end of a session. Returns the messages written.
    Importable: ``bench/sql_scale.py`` generates its traces with it."""
    from recorder.records import MessageRecord

    if size is None and messages is None:
        raise ValueError("write_realistic needs size or messages")
    size_limit = size if size is not None else float("inf")
    message_limit = messages if messages is not None else float("inf")
    templates = _templates()
    session = 0
    t_base = 0
    written = 0
    with _writer(path, source) as writer:
        while writer.bytes_written < size_limit and written < message_limit:
            for template in templates:
                session += 1
                first = template[0].t_ns
                for record in template:
                    t = t_base + record.t_ns - first
                    if isinstance(record, MessageRecord):
                        writer.append_message(session, record.direction, t, record.data,
                                              record.fds, length=record.length, torn=record.torn)
                        written += 1
                    else:
                        writer.append_event(session, record.kind, t, record.data)
                t_base += template[-1].t_ns - first + 1000
                if writer.bytes_written >= size_limit or written >= message_limit:
                    break
    return written


SHAPES: dict[str, Callable[[Path, int], None]] = {
    "sessions": gen_sessions,
    "unanswered": gen_unanswered,
    "huge": gen_huge,
    "realistic": gen_realistic,
}


def measure(argv: list[str], cwd: Path, timeout: float) -> dict[str, Any]:
    """Run ``argv`` (output to /dev/null); its peak RSS in MiB, seconds and exit status."""
    with tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        child = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=errors)
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                child.kill()
                pid, status, usage = os.wait4(child.pid, 0)
                break
            time.sleep(0.02)
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        errors.seek(0)
        stderr = errors.read().decode(errors="replace")
    return {"rss_mib": usage.ru_maxrss / 1024, "seconds": seconds, "status": child.returncode,
            "stderr": stderr.strip().splitlines()[-1:] if child.returncode else []}


def _size(text: str) -> int:
    units = {"K": 1000, "M": 1000**2, "G": 1000**3}
    if text[-1:].upper() in units:
        return int(float(text[:-1]) * units[text[-1].upper()])
    return int(text)


def _rows(results: dict[str, Any], checkouts: list[str]) -> Iterator[str]:
    head = "| shape | size | tool | " + " | ".join(
        f"{name} RSS MiB | {name} s" for name in checkouts) + " |"
    yield head
    yield "|" + "---|" * (3 + 2 * len(checkouts))
    for shape, entry in results["shapes"].items():
        for tool, by_checkout in entry["tools"].items():
            cells = []
            for name in checkouts:
                m = by_checkout[name]
                flag = "" if m["status"] == 0 else f" (exit {m['status']})"
                cells.append(f"{m['rss_mib']:.0f}{flag} | {m['seconds']:.1f}")
            yield (f"| {shape} | {entry['mib']:.0f} MiB | {tool} | " + " | ".join(cells) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G", help="bytes of the realistic trace (1G, 200M)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="which shapes, by name")
    parser.add_argument("--tools", default=",".join(TOOLS), help="which tools, by name")
    parser.add_argument("--dir", type=Path, help="where the traces go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the traces (and reuse them)")
    parser.add_argument("--checkout", action="append", metavar="NAME=DIR",
                        help="a checkout to measure (its .venv/bin/python); repeatable")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per tool run")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    parser.add_argument("--generate", nargs=3, metavar=("SHAPE", "PATH", "SIZE"),
                        help=argparse.SUPPRESS)  # internal: the child that writes a trace
    args = parser.parse_args()
    if args.generate:
        shape, path, size_text = args.generate
        SHAPES[shape](Path(path), int(size_text))
        return 0
    checkouts = [tuple(spec.split("=", 1)) for spec in args.checkout or [f"this={ROOT}"]]
    shapes = args.shapes.split(",")
    tools = args.tools.split(",")
    size = _size(args.size)
    need = (size if "realistic" in shapes else 0) + 200 * MiB
    where = args.dir or Path(tempfile.mkdtemp(prefix="trace-memory-"))
    where.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(where).free < 2 * need:
        print(f"not enough free space in {where} for {need} bytes of traces", file=sys.stderr)
        return 1
    results: dict[str, Any] = {"baseline": {}, "shapes": {}}
    try:
        for name, directory in checkouts:
            python = str(Path(directory).resolve() / ".venv" / "bin" / "python")
            results["baseline"][name] = measure(
                [python, "-c", "import vfioproxy.cli"], Path(directory), args.timeout)
        for shape in shapes:
            path = where / f"{shape}.trace"
            if not (args.keep and path.exists()):
                start = time.perf_counter()
                subprocess.run([sys.executable, __file__, "--generate", shape, str(path),
                                str(size)], check=True)
                print(f"# generated {path} ({path.stat().st_size / MiB:.1f} MiB) in "
                      f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
            cat = measure(["cat", str(path)], ROOT, args.timeout)
            entry: dict[str, Any] = {"mib": path.stat().st_size / MiB, "cat_s": cat["seconds"],
                                     "tools": {}}
            for tool in tools:
                entry["tools"][tool] = {}
                for name, directory in checkouts:
                    python = str(Path(directory).resolve() / ".venv" / "bin" / "python")
                    out = where / "out.trace"
                    argv = [python, "-m", "vfioproxy",
                            *(a.replace("{trace}", str(path)).replace("{out}", str(out))
                              for a in TOOLS[tool])]
                    m = measure(argv, Path(directory), args.timeout)
                    out.unlink(missing_ok=True)
                    entry["tools"][tool][name] = m
                    print(f"# {shape} {tool} {name}: {m['rss_mib']:.0f} MiB, "
                          f"{m['seconds']:.1f} s, exit {m['status']} {m['stderr']}",
                          file=sys.stderr)
            results["shapes"][shape] = entry
            if not args.keep:
                path.unlink()
    finally:
        if args.dir is None and not args.keep:
            shutil.rmtree(where, ignore_errors=True)
    names = [name for name, _ in checkouts]
    print("baseline: " + ", ".join(
        f"{name}: `import vfioproxy.cli` {results['baseline'][name]['rss_mib']:.0f} MiB"
        for name in names))
    print("cat FILE: " + ", ".join(
        f"{shape} {entry['cat_s']:.2f} s" for shape, entry in results["shapes"].items()))
    print()
    for line in _rows(results, names):
        print(line)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
