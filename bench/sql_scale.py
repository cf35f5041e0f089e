"""SQL over traces at scale: ``trace export --format parquet`` and ``trace query``
on traces of 100k and 1M messages, as ratios to reading the same trace.

    .venv/bin/python bench/sql_scale.py                        # 100k and 1M messages
    .venv/bin/python bench/sql_scale.py --messages 100000,300000 --json out.json
    .venv/bin/python bench/sql_scale.py --dir /var/tmp/sql --keep  # reuse the traces

Generates each trace with :func:`trace_memory.write_realistic` (the sessions
of ``traces/*.trace`` over and over, renumbered, written by
:class:`recorder.writer.TraceWriter`), in a child so this process stays
small. Then runs, each as its own ``python -m vfioproxy`` child with its
output to /dev/null, and reports the child's wall time and peak RSS
(``ru_maxrss`` from ``os.wait4``, :func:`trace_memory.measure`):

- the baselines, on the same trace in the same run: ``trace stats`` (read
  and decode every record: what every trace tool pays) and ``trace export
  --format csv`` (the same rows as text); and ``python -c 'import
  vfioproxy.cli, pyarrow.parquet, duckdb'`` (the RSS before any row);
- ``trace export --format parquet`` (flat) and with ``--partition-by
  host,date``: rows/s, the output's size;
- ``trace query`` over each exported directory, for three cookbook queries
  (README: SQL over traces): rows scanned/s (the ``messages`` rows); and
  ``SELECT 1`` over it, what starting the query costs before any row;
- ``trace query`` over the ``.trace`` itself (exported to a temporary
  directory, then queried).

Every time is also given as a ratio to ``trace stats`` on the same trace,
every RSS as a ratio to ``trace stats``'s. Prints Markdown to stdout
(``--json``: also the raw figures). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from trace_memory import ROOT, MiB, measure, write_realistic

#: the cookbook queries measured (README: SQL over traces), by short name
QUERIES = {
    "latency percentiles": (
        "SELECT command, count(*) AS replies, round(quantile_cont(latency, 0.5), 1) AS p50_us, "
        "round(quantile_cont(latency, 0.99), 1) AS p99_us FROM messages WHERE kind <> 'cmd' "
        "GROUP BY command ORDER BY replies DESC LIMIT 6"),
    "bytes by region": (
        "SELECT command, region, count(*) AS n, sum(count) AS bytes FROM messages "
        "WHERE kind = 'cmd' AND command IN ('REGION_READ', 'REGION_WRITE', 'DMA_READ', "
        "'DMA_WRITE') GROUP BY ALL ORDER BY bytes DESC LIMIT 8"),
    "errors by server": (
        "SELECT json_extract_string(e.data, '$.server')[:40] AS server, m.command, m.errno, "
        "count(*) AS n FROM messages m JOIN events e ON e.kind = 'session_open' "
        "AND e.trace = m.trace AND e.session = m.session WHERE m.kind = 'error' "
        "GROUP BY ALL ORDER BY n DESC"),
}


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_size(python: str, trace: Path, work: Path, messages: int,
             timeout: float) -> dict[str, Any]:
    """Every measurement on one trace of ``messages`` messages."""
    vfio = [python, "-m", "vfioproxy", "trace"]
    runs: dict[str, dict[str, Any]] = {}

    def timed(name: str, argv: list[str]) -> dict[str, Any]:
        m = measure(argv, ROOT, timeout)
        runs[name] = m
        print(f"# {messages} {name}: {m['seconds']:.2f} s, {m['rss_mib']:.0f} MiB, "
              f"exit {m['status']} {m['stderr']}", file=sys.stderr)
        return m

    timed("stats (baseline)", [*vfio, "stats", str(trace)])
    timed("export csv", [*vfio, "export", "--format", "csv", str(trace)])
    pcap = work / "trace.pcapng"  # the Wireshark export streams too: its cost beside parquet's
    pcap.unlink(missing_ok=True)
    timed("export pcapng", [*vfio, "export", "--format", "pcapng", "-o", str(pcap), str(trace)])
    pcapng_bytes = pcap.stat().st_size if pcap.exists() else 0
    pcap.unlink(missing_ok=True)
    outputs = {"flat": work / "flat", "host,date": work / "partitioned"}
    sizes = {}
    for layout, out in outputs.items():
        shutil.rmtree(out, ignore_errors=True)
        extra = [] if layout == "flat" else ["--partition-by", layout]
        timed(f"export parquet {layout}",
              [*vfio, "export", "--format", "parquet", *extra, "-o", str(out), str(trace)])
        sizes[layout] = {"bytes": _du(out), "files": len(list(out.rglob("*.parquet")))}
    for layout, out in outputs.items():  # starting DuckDB and reading the directory
        timed(f"query {layout}: SELECT 1 (floor)", [*vfio, "query", "--csv", "SELECT 1",
                                                    str(out)])
    for query, sql in QUERIES.items():
        for layout, out in outputs.items():
            timed(f"query {layout}: {query}", [*vfio, "query", "--csv", sql, str(out)])
    timed(f"query .trace: {next(iter(QUERIES))}",
          [*vfio, "query", "--csv", next(iter(QUERIES.values())), str(trace)])
    return {"messages": messages, "trace_bytes": trace.stat().st_size, "runs": runs,
            "outputs": sizes, "pcapng_bytes": pcapng_bytes}


def markdown(results: dict[str, Any]) -> list[str]:
    """The figures as Markdown: a table per trace, and RSS by trace size."""
    lines = [f"floor: `import vfioproxy.cli, pyarrow.parquet, duckdb` "
             f"{results['floor']['rss_mib']:.0f} MiB", ""]
    for entry in results["sizes"]:
        n = entry["messages"]
        base = entry["runs"]["stats (baseline)"]
        lines += [f"### {n:,} messages ({entry['trace_bytes'] / MiB:.0f} MiB trace)", "",
                  "| run | s | rows/s | µs/row | × stats time | peak RSS MiB | × stats RSS |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, m in entry["runs"].items():
            flag = "" if m["status"] == 0 else f" (exit {m['status']})"
            lines.append(
                f"| {name}{flag} | {m['seconds']:.2f} | {n / m['seconds']:,.0f} | "
                f"{m['seconds'] / n * 1e6:.1f} | {m['seconds'] / base['seconds']:.2f} | "
                f"{m['rss_mib']:.0f} | {m['rss_mib'] / base['rss_mib']:.2f} |")
        lines.append("")
        for layout, out in entry["outputs"].items():
            lines.append(f"- parquet {layout}: {out['bytes'] / MiB:.1f} MiB in {out['files']} "
                         f"files ({out['bytes'] / entry['trace_bytes']:.3f} × the trace)")
        if entry.get("pcapng_bytes"):
            lines.append(f"- pcapng: {entry['pcapng_bytes'] / MiB:.1f} MiB "
                         f"({entry['pcapng_bytes'] / entry['trace_bytes']:.3f} × the trace)")
        lines.append("")
    if len(results["sizes"]) > 1:
        small, big = results["sizes"][0], results["sizes"][-1]
        lines += [f"### Peak RSS, {small['messages']:,} vs {big['messages']:,} messages", "",
                  "| run | small MiB | big MiB | big / small |", "|---|---:|---:|---:|"]
        for name, m in big["runs"].items():
            s = small["runs"][name]["rss_mib"]
            lines.append(f"| {name} | {s:.0f} | {m['rss_mib']:.0f} | {m['rss_mib'] / s:.2f} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", default="100000,1000000",
                        help="messages of each trace, comma-separated (default: %(default)s)")
    parser.add_argument("--dir", type=Path, help="where traces and exports go (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep the traces (and reuse them)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    parser.add_argument("--generate", nargs=2, metavar=("MESSAGES", "PATH"),
                        help=argparse.SUPPRESS)  # internal: the child that writes a trace
    args = parser.parse_args()
    if args.generate:
        count, path = args.generate
        written = write_realistic(Path(path), messages=int(count), source="bench sql_scale")
        Path(path + ".messages").write_text(f"{written}\n")  # at least count: whole sessions
        return 0
    python = str(ROOT / ".venv" / "bin" / "python")
    where = args.dir or Path(tempfile.mkdtemp(prefix="sql-scale-"))
    where.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"sizes": []}
    try:
        results["floor"] = measure(
            [python, "-c", "import vfioproxy.cli, pyarrow.parquet, duckdb"], ROOT, args.timeout)
        for count in (int(c) for c in args.messages.split(",")):
            trace = where / f"realistic-{count}.trace"
            if not (args.keep and trace.exists()):
                start = time.perf_counter()
                subprocess.run([sys.executable, __file__, "--generate", str(count), str(trace)],
                               check=True)
                print(f"# generated {trace} ({trace.stat().st_size / MiB:.0f} MiB) in "
                      f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
            written = int(Path(f"{trace}.messages").read_text())
            work = where / f"out-{count}"
            work.mkdir(exist_ok=True)
            results["sizes"].append(run_size(python, trace, work, written, args.timeout))
            shutil.rmtree(work, ignore_errors=True)
            if not args.keep:
                trace.unlink()
                Path(f"{trace}.messages").unlink()
    finally:
        if args.dir is None and not args.keep:
            shutil.rmtree(where, ignore_errors=True)
    print("\n".join(markdown(results)))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
