"""What handling a message costs on top of forwarding, stage by stage.

    .venv/bin/python bench/profile_digest.py                  # every trace in traces/
    .venv/bin/python bench/profile_digest.py --with-fds       # also fd_record of the fds
    .venv/bin/python bench/profile_digest.py --profile        # plus a cProfile of observe
    .venv/bin/python bench/profile_digest.py --json OUT.json

Measured offline, in this process, on the real messages of ``traces/*.trace``
(each trace's sessions replayed in file order). On the forwarding path
``vfioproxy record`` appends the raw record (and fd metadata); decoding and
checking (``observe``) is what readers of the trace do, and what the opt-in
live checks add on the path. The stages are timed separately, each as the
thread CPU time (``time.thread_time_ns``) of whole passes over a trace
divided by its messages, the median of ``--reps`` passes (after one
untimed warm-up pass):

- ``observe``: ``SessionState.observe`` (decode, reply matching, checks),
  a fresh ``SessionState`` per session and pass, as a reader (or
  ``--check-live``) does;
- ``append``: ``TraceWriter.append_message`` to a temporary trace file
  (one ``write(2)`` per message), what ``vfioproxy record`` adds;
- ``fd_record`` (``--with-fds``): ``vfioproxy.io.fds.fd_record`` of every fd
  a message carries, on real fds made for it (an eventfd for a recorded
  eventfd, a memfd of the recorded size for anything else), what
  ``vfioproxy record`` does on the forwarding path after the send;
  charged per message (messages without fds cost nothing);
- ``live``: the live view's line (``vfioproxy.proxy.live.MessageLog``, ``-v``)
  written to an ``io.StringIO``.

Printed: per trace and stage us/msg, then per stage the p50 over the traces
and the figure over all messages together (``total``). The forwarding itself
(receive + send on the blocking threads) is ``bench/bare_thread_relay.py``,
measured by ``bench/proxy_overhead.py``.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from recorder.reader import TraceReader
from recorder.records import FdRecord, MessageRecord, TraceHeader
from recorder.writer import TraceWriter
from vfioproxy.io.fds import FdKind, OwnedFd, fd_record, make_eventfd, make_memfd
from vfioproxy.protocol.session import Observation, SessionState
from vfioproxy.proxy.live import MessageLog

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("observe", "append", "fd_record", "live")


@dataclass
class Trace:
    name: str
    messages: list[MessageRecord]
    observations: list[Observation] = field(default_factory=list)
    fds: dict[int, list[OwnedFd]] = field(default_factory=dict)  # message index -> real fds

    @property
    def fd_count(self) -> int:
        return sum(len(m.fds) for m in self.messages)


def load_traces(directory: Path) -> list[Trace]:
    out = []
    for path in sorted(directory.glob("*.trace")):
        with TraceReader(path) as reader:
            messages = [r for r in reader if isinstance(r, MessageRecord)]
        if messages:
            out.append(Trace(path.stem, messages))
    return out


def real_fd(record: FdRecord, name: str) -> OwnedFd:
    """A live fd like the recorded one, for fd_record to inspect."""
    if record.kind is FdKind.EVENTFD:
        return make_eventfd()
    return make_memfd(name, record.size or 0)  # sparse: no memory is used


# ----------------------------------------------------------------------------- stages


def observe_feed(trace: Trace) -> list[tuple[Any, ...]]:
    """(observe, direction, data, fds) per message, a fresh SessionState per session."""
    states: dict[int, SessionState] = {}
    for m in trace.messages:
        states.setdefault(m.session, SessionState())
    return [(states[m.session].observe, m.direction, m.data, list(m.fds)) for m in trace.messages]


def observe_pass(trace: Trace) -> Callable[[], None]:
    feed = observe_feed(trace)

    def run() -> None:
        for observe, direction, data, fds in feed:
            observe(direction, data, fds)

    return run


def append_pass(trace: Trace, writer: TraceWriter) -> Callable[[], None]:
    append = writer.append_message
    feed = [(m.session, m.direction, m.t_ns, m.data, list(m.fds)) for m in trace.messages]

    def run() -> None:
        for session, direction, t_ns, data, fds in feed:
            append(session, direction, t_ns, data, fds)

    return run


def fd_record_pass(trace: Trace) -> Callable[[], None]:
    feed = list(trace.fds.values())

    def run() -> None:
        for fds in feed:
            [fd_record(fd, i, contents_limit=0) for i, fd in enumerate(fds)]

    return run


def live_pass(trace: Trace) -> Callable[[], None]:
    log = MessageLog(io.StringIO())
    sessions = {m.session: SimpleNamespace(id=m.session) for m in trace.messages}
    feed = [(sessions[m.session], obs, m.t_ns)
            for m, obs in zip(trace.messages, trace.observations, strict=True)]

    def run() -> None:
        for session, obs, t_ns in feed:
            log(session, obs, t_ns)  # type: ignore[arg-type]

    return run


def cpu_ns(make: Callable[[], Callable[[], None]], reps: int,
           after: Callable[[], None] = lambda: None) -> float:
    """Median thread CPU time of one pass (each pass set up afresh, untimed)."""
    times = []
    for rep in range(reps + 1):
        run = make()
        gc.collect()
        t0 = time.thread_time_ns()
        run()
        t1 = time.thread_time_ns()
        after()
        if rep:  # the first pass warms up
            times.append(t1 - t0)
    return statistics.median(times)


def measure(traces: Sequence[Trace], reps: int, with_fds: bool, tmp: str) -> dict[str, Any]:
    path = os.path.join(tmp, "digest.trace")
    per_trace: dict[str, dict[str, Any]] = {}
    with TraceWriter(path, TraceHeader.now("profile_digest")) as writer:
        for trace in traces:
            # the observations the live view formats (a pass of their own, untimed)
            trace.observations = [observe(direction, data, fds)
                                  for observe, direction, data, fds in observe_feed(trace)]
            n = len(trace.messages)
            row: dict[str, Any] = {"messages": n, "fds": trace.fd_count}
            row["observe"] = cpu_ns(lambda t=trace: observe_pass(t), reps) / n / 1000
            row["append"] = cpu_ns(lambda t=trace: append_pass(t, writer), reps,
                                   after=lambda: os.truncate(path, 0)) / n / 1000
            if with_fds:
                trace.fds = {
                    i: [real_fd(f, f"profile-{i}-{j}") for j, f in enumerate(m.fds)]
                    for i, m in enumerate(trace.messages) if m.fds
                }
                try:
                    row["fd_record"] = cpu_ns(lambda t=trace: fd_record_pass(t), reps) / n / 1000
                finally:
                    for fds in trace.fds.values():
                        for fd in fds:
                            fd.close()
                    trace.fds = {}
            row["live"] = cpu_ns(lambda t=trace: live_pass(t), reps) / n / 1000
            per_trace[trace.name] = row
    stages = [s for s in STAGES if s in next(iter(per_trace.values()))]
    total_messages = sum(r["messages"] for r in per_trace.values())
    summary = {
        stage: {
            "p50_us_per_msg": statistics.median(r[stage] for r in per_trace.values()),
            "min_us_per_msg": min(r[stage] for r in per_trace.values()),
            "max_us_per_msg": max(r[stage] for r in per_trace.values()),
            "total_us_per_msg": sum(r[stage] * r["messages"] for r in per_trace.values())
            / total_messages,
        }
        for stage in stages
    }
    return {"traces": per_trace, "stages": stages, "summary": summary,
            "messages": total_messages,
            "fds": sum(r["fds"] for r in per_trace.values())}


def profile_observe(traces: Sequence[Trace], reps: int, top: int = 15) -> list[dict[str, Any]]:
    """cProfile of ``reps`` observe passes over every trace: the top functions by own time."""
    runs = [observe_pass(t) for _ in range(reps) for t in traces]
    messages = reps * sum(len(t.messages) for t in traces)
    profiler = cProfile.Profile()
    profiler.enable()
    for run in runs:
        run()
    profiler.disable()
    stats = pstats.Stats(profiler)
    rows = []
    for (filename, line, func), (_, ncalls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        if filename == __file__ or func == "<method 'disable' of '_lsprof.Profiler' objects>":
            continue  # the harness
        where = os.path.relpath(filename, ROOT) if filename.startswith(str(ROOT)) else filename
        rows.append({
            "function": f"{func} ({where}:{line})" if line else func,
            "calls_per_msg": ncalls / messages,
            "own_us_per_msg": tottime / messages * 1e6,
            "cum_us_per_msg": cumtime / messages * 1e6,
        })
    rows.sort(key=lambda r: r["own_us_per_msg"], reverse=True)
    return rows[:top]


# ----------------------------------------------------------------------------- report


def report(results: dict[str, Any]) -> None:
    stages = results["stages"]
    width = max(len(name) for name in results["traces"]) + 2
    print(f"\nDigest CPU per message, us (thread CPU, median of {results['reps']} passes)")
    print(f"{'trace':<{width}}{'msgs':>6}{'fds':>5}"
          + "".join(f"{s:>11}" for s in stages) + f"{'sum':>11}")
    for name, row in results["traces"].items():
        print(f"{name:<{width}}{row['messages']:>6}{row['fds']:>5}"
              + "".join(f"{row[s]:>11.2f}" for s in stages)
              + f"{sum(row[s] for s in stages):>11.2f}")
    summary = results["summary"]
    print(f"\n{'stage':<12}{'p50 us/msg':>12}{'min':>9}{'max':>9}{'total':>9}"
          f"   ({len(results['traces'])} traces, {results['messages']} messages, "
          f"{results['fds']} fds; total: over all messages)")
    for stage in stages:
        s = summary[stage]
        print(f"{stage:<12}{s['p50_us_per_msg']:>12.2f}{s['min_us_per_msg']:>9.2f}"
              f"{s['max_us_per_msg']:>9.2f}{s['total_us_per_msg']:>9.2f}")
    for label, parts in (("proxy", ("observe",)),
                         ("record", ("observe", "append", "fd_record"))):
        present = [p for p in parts if p in stages]
        total = sum(summary[p]["total_us_per_msg"] for p in present)
        print(f"{label:<12}{'':>12}{'':>9}{'':>9}{total:>9.2f}   = {' + '.join(present)}")
    if "fd_record" in stages and results["fds"]:
        per_fd = summary["fd_record"]["total_us_per_msg"] * results["messages"] / results["fds"]
        print(f"(fd_record: {per_fd:.2f} us per fd)")
    if "profile" in results:
        print("\ncProfile of observe, top functions by own time (us/msg; profiled, so slower)")
        print(f"{'own':>8}{'cum':>8}{'calls':>7}  function")
        for row in results["profile"]:
            print(f"{row['own_us_per_msg']:>8.2f}{row['cum_us_per_msg']:>8.2f}"
                  f"{row['calls_per_msg']:>7.1f}  {row['function']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--traces", default=str(ROOT / "traces"), help="directory of *.trace")
    parser.add_argument("--reps", type=int, default=15, help="timed passes per trace and stage")
    parser.add_argument("--with-fds", action="store_true",
                        help="also time fd_record on real fds (eventfds and memfds)")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile observe: the top 15 functions")
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON")
    args = parser.parse_args()

    traces = load_traces(Path(args.traces))
    if not traces:
        parser.error(f"no traces in {args.traces}")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="profile-digest-") as tmp:
        results = measure(traces, args.reps, args.with_fds, tmp)
    results["reps"] = args.reps
    if args.profile:
        results["profile"] = profile_observe(traces, max(1, args.reps // 3))
    results["python"] = platform.python_version()
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    print(f"({results['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
