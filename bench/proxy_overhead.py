"""What the proxy costs: round trips, realize, throughput, memory and CPU, in one run.

    .venv/bin/python bench/proxy_overhead.py            # full run (a few minutes)
    .venv/bin/python bench/proxy_overhead.py --quick    # short run (well under a minute)

Every relay is a process of its own, started once and measured in interleaved
rounds (the order shuffled per round), next to the direct path:

- ``c-relay``: ``bench/c/vu_relay.c``, the C baseline;
- ``bare-trio``: ``bench/bare_relay.py``, FdStream receive + one sendmsg on trio tasks,
  nothing else (the baseline of ``--forwarding trio``);
- ``bare-threads``: ``bench/bare_thread_relay.py``, the same with BlockingFdSocket on one
  thread per session polling both sockets (the baseline of the proxy's default,
  threaded forwarding);
- ``proxy``: ``vfioproxy proxy`` (frames and forwards; decodes nothing but VERSION);
- ``proxy-trio``: ``vfioproxy proxy --forwarding trio`` (the same on trio tasks);
- ``record``: ``vfioproxy record`` (also appends each message's raw record);
- ``record-live``: ``vfioproxy record --check-live`` (also decodes and checks every
  message on the path: what the opt-in live checks cost);
- ``record-inject``: ``vfioproxy record --rule 'c2s * delay fixed(0us)'``: the fault
  injection path (every client message decided on, an ``inject`` event each) with a
  zero delay, what an experiment's 0 setting measures.

Measured: (a) small REGION_READ round trips, C ping <-> C echo and a Python
Endpoint client <-> ``vfioproxy serve-device``; (b) realize + reset (and
doorbells) of the realize client against ``vfioproxy serve-device``; (c) 1 MiB
REGION_READ/REGION_WRITE throughput; (d) the RSS of ``vfioproxy record`` along
one long session; (e) CPU time per forwarded message of each relay process.
Results are printed and written to ``bench/results.json``.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import json
import math
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BUILD = BENCH / ".build"
C_PROGRAMS = ("vu_relay", "vu_echo", "vu_ping")
PYTHON = sys.executable
VFIOPROXY = str(Path(PYTHON).parent / "vfioproxy")
CLK_TCK = os.sysconf("SC_CLK_TCK")

#: the relays, in table order; "direct" has no relay
BASE_CONFIGS = ("direct", "c-relay", "bare-trio", "bare-threads", "proxy", "proxy-trio",
                "record", "record-live", "record-inject", "proxy-trap-mmap", "record-trap-mmap")
#: what a run measures unless --configs says (the interposition modes only when asked)
DEFAULT_CONFIGS = tuple(c for c in BASE_CONFIGS if "trap" not in c)

#: the injection rule of ``record-inject``: every command delayed by nothing
ZERO_DELAY_RULE = "c2s * delay fixed(0us)"


# ----------------------------------------------------------------------------- helpers


def build_c_programs() -> dict[str, Path]:
    """Compile the C helpers with ``cc -O2`` into bench/.build/ (when out of date)."""
    BUILD.mkdir(exist_ok=True)
    header = BENCH / "c" / "vu_common.h"
    out = {}
    for name in C_PROGRAMS:
        src = BENCH / "c" / f"{name}.c"
        exe = BUILD / name
        newest = max(src.stat().st_mtime, header.stat().st_mtime)
        if not exe.exists() or exe.stat().st_mtime < newest:
            subprocess.run(
                ["cc", "-O2", "-Wall", "-Wextra", "-o", str(exe), str(src)], check=True
            )
        out[name] = exe
    return out


def process_cpu_ns(pid: int) -> int:
    """CPU time (user + system) of a whole process so far, in ns, from its CPU clock."""
    return time.clock_gettime_ns(((~pid) << 3) | 2)  # MAKE_PROCESS_CPUCLOCK(pid, SCHED)


def process_stat_ns(pid: int) -> tuple[int, int]:
    """utime and stime of ``/proc/PID/stat`` (clock-tick resolution), in ns."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = 1_000_000_000 // CLK_TCK
    return int(fields[11]) * tick, int(fields[12]) * tick


def proc_status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def percentile(ordered: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of sorted samples."""
    return ordered[max(0, math.ceil(p * len(ordered)) - 1)]


def wait_for_socket(
    path: Path, proc: subprocess.Popen[bytes], log: Path, timeout: float = 15.0
) -> None:
    """Until the process creates its listening socket ``path`` (its output is in ``log``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = log.read_text(errors="replace") if log.exists() else ""
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}: {text}")
        if path.exists():
            return
        time.sleep(0.02)
    raise RuntimeError(f"{path} did not appear")


def machine_info() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    hypervisor = ""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in lscpu.splitlines():
            if line.startswith(("Hypervisor vendor", "Model:", "CPU family")):
                hypervisor += line.split(":", 1)[0] + "=" + line.split(":", 1)[1].strip() + " "
    import msgpack  # type: ignore[import-untyped]
    import trio

    cc = subprocess.run(["cc", "--version"], capture_output=True, text=True).stdout.splitlines()
    return {
        "cpu": model,
        "cpu_details": hypervisor.strip(),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "trio": trio.__version__,
        "msgpack": ".".join(map(str, msgpack.version)),
        "cc": cc[0] if cc else "?",
        "mem_total_kib": _meminfo_total(),
        "background_busy_cpus_at_start": round(background_busy_cpus(), 2),
    }


def background_busy_cpus(seconds: float = 1.0) -> float:
    """How many CPUs something else keeps busy (sampled while the benchmark is idle)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + values[4]  # idle + iowait
        return sum(values) - idle, sum(values)

    busy0, total0 = sample()
    time.sleep(seconds)
    busy1, total1 = sample()
    return (busy1 - busy0) / max(1, total1 - total0) * (os.cpu_count() or 1)


def _meminfo_total() -> int:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1])


# ----------------------------------------------------------------------------- processes


@dataclass
class Relay:
    """One relay process between a client socket ``listen`` and a server."""

    name: str
    listen: Path
    proc: subprocess.Popen[bytes] | None = None  # None: the direct path
    trace: Path | None = None  # what it records to

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu(self) -> tuple[int, int, int]:
        """CPU clock, utime and stime so far, in ns."""
        if self.proc is None:
            return 0, 0, 0
        return process_cpu_ns(self.pid), *process_stat_ns(self.pid)

    def truncate_trace(self) -> None:
        """Empty the trace between batches (the writer appends with O_APPEND), so
        the page cache and the disk do not fill up over a run."""
        if self.trace is not None and self.trace.exists():
            os.truncate(self.trace, 0)


class Processes:
    """Starts the servers and relays of a run and stops them all at the end."""

    def __init__(self, tmp: Path, programs: dict[str, Path]) -> None:
        self.tmp = tmp
        self.programs = programs
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Any] = []

    def spawn(self, name: str, argv: list[str], listen: Path) -> subprocess.Popen[bytes]:
        path = self.tmp / f"{name}.log"
        log = open(path, "wb")  # noqa: SIM115 (closed in stop())
        self.logs.append(log)
        proc = subprocess.Popen(argv, stdout=log, stderr=log, cwd=ROOT)
        self.procs.append(proc)
        wait_for_socket(listen, proc, path)
        return proc

    def server(self, kind: str) -> Path:
        """Start the C echo server (``echo``) or the reference device (any other
        ``kind``, which names its socket and log: ``device``, ``device0``, ...)."""
        path = self.tmp / f"{kind}.sock"
        if kind == "echo":
            argv = [str(self.programs["vu_echo"]), "--socket", str(path)]
        else:
            argv = [VFIOPROXY, "serve-device", "--socket", str(path)]
        self.spawn(f"server-{kind}", argv, path)
        return path

    def relays(self, prefix: str, server: Path, only: Sequence[str]) -> dict[str, Relay]:
        """Direct plus one relay process of each kind in front of ``server``."""
        out = {}
        for i, name in enumerate(BASE_CONFIGS):
            if name not in only:
                continue
            if name == "direct":
                out[name] = Relay(name, server)
                continue
            tag = f"{prefix}{i}"  # socket paths are limited to 107 bytes
            listen = self.tmp / f"{tag}.sock"
            trace = self.tmp / f"{tag}.trace" if name.startswith("record") else None
            out[name] = Relay(name, listen, self.spawn(
                tag, self.relay_argv(name, tag, listen, server), listen), trace)
        return out

    def relay_argv(self, name: str, tag: str, listen: Path, server: Path) -> list[str]:
        ends = ["--listen", str(listen), "--server", str(server)]
        trace = str(self.tmp / f"{tag}.trace")
        if name == "c-relay":
            return [str(self.programs["vu_relay"]), *ends]
        if name == "bare-trio":
            return [PYTHON, str(BENCH / "bare_relay.py"), *ends]
        if name == "bare-threads":
            return [PYTHON, str(BENCH / "bare_thread_relay.py"), *ends]
        if name == "proxy":
            return [VFIOPROXY, "proxy", *ends]
        if name == "proxy-trio":
            return [VFIOPROXY, "proxy", "--forwarding", "trio", *ends]
        if name == "record":
            return [VFIOPROXY, "record", *ends, "-o", trace]
        if name == "record-live":
            return [VFIOPROXY, "record", *ends, "-o", trace, "--check-live"]
        if name == "record-inject":
            return [VFIOPROXY, "record", *ends, "-o", trace, "--rule", ZERO_DELAY_RULE]
        if name == "proxy-trap-mmap":
            return [VFIOPROXY, "proxy", *ends, "--trap-mmap"]
        if name == "record-trap-mmap":
            return [VFIOPROXY, "record", *ends, "-o", trace, "--trap-mmap"]
        raise ValueError(f"unknown relay configuration {name!r} (known: {BASE_CONFIGS})")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self.logs:
            log.close()


def run_json(argv: list[str]) -> dict[str, Any]:
    out = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"{argv!r} failed ({out.returncode}): {out.stderr.strip()}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# ----------------------------------------------------------------------------- measuring


@dataclass
class Series:
    """Everything measured for one configuration in one experiment."""

    samples: list[float] = field(default_factory=list)  # round trips, ns
    batch_p50: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)  # per-batch figures (MiB/s)
    runs: list[dict[str, Any]] = field(default_factory=list)  # realize repetitions
    cpu_ns: int = 0
    user_ns: int = 0
    sys_ns: int = 0
    messages: int = 0
    cpu_batches: list[float] = field(default_factory=list)  # us per message, per batch

    def measure(
        self, relay: Relay, argv: list[str], count: Callable[[dict[str, Any]], int]
    ) -> dict[str, Any]:
        """Run ``argv`` (JSON out) and charge the relay's CPU time to its messages."""
        cpu0, user0, sys0 = relay.cpu()
        out = run_json(argv)
        cpu1, user1, sys1 = relay.cpu()
        relay.truncate_trace()
        messages = count(out)
        self.cpu_ns += cpu1 - cpu0
        self.user_ns += user1 - user0
        self.sys_ns += sys1 - sys0
        self.messages += messages
        if relay.proc is not None:
            self.cpu_batches.append((cpu1 - cpu0) / messages / 1000)
        return out

    def absorb(self, other: Series) -> None:
        """Add what ``other`` measured (another set of processes) to this series."""
        self.samples += other.samples
        self.batch_p50 += other.batch_p50
        self.values += other.values
        self.runs += other.runs
        self.cpu_ns += other.cpu_ns
        self.user_ns += other.user_ns
        self.sys_ns += other.sys_ns
        self.messages += other.messages
        self.cpu_batches += other.cpu_batches

    def cpu_summary(self) -> dict[str, Any]:
        if not self.messages or not self.cpu_ns:
            return {}
        return {
            "messages": self.messages,
            "cpu_us_per_msg": self.cpu_ns / self.messages / 1000,
            "stat_us_per_msg": (self.user_ns + self.sys_ns) / self.messages / 1000,
            "user_us_per_msg": self.user_ns / self.messages / 1000,
            "sys_us_per_msg": self.sys_ns / self.messages / 1000,
            "cpu_batches_us_per_msg": [round(x, 2) for x in self.cpu_batches],
            "cpu_s": self.cpu_ns / 1e9,
        }


def interleaved(names: Sequence[str], rounds: int, seed: int) -> Iterator[tuple[int, str]]:
    rng = random.Random(seed)
    for r in range(rounds):
        order = list(names)
        rng.shuffle(order)
        for name in order:
            yield r, name


def latency_summary(series: dict[str, Series]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, s in series.items():
        ordered = sorted(s.samples)
        out[name] = {
            "n": len(ordered),
            "p50_us": percentile(ordered, 0.5) / 1000,
            "p90_us": percentile(ordered, 0.9) / 1000,
            "p99_us": percentile(ordered, 0.99) / 1000,
            "mean_us": statistics.fmean(ordered) / 1000,
            "batch_p50_us": [round(x / 1000, 1) for x in s.batch_p50],
            **s.cpu_summary(),
        }
    add_ratios(out, ("p50_us", "p99_us"))
    return out


def add_ratios(table: dict[str, dict[str, Any]], keys: Sequence[str]) -> None:
    """Each row's ``key`` over direct's and over the C relay's (``x_direct``, ``x_c``)."""
    for key in keys:
        for base, suffix in (("direct", "x_direct"), ("c-relay", "x_c")):
            if base not in table:
                continue
            for row in table.values():
                row[f"{key}_{suffix}"] = row[key] / table[base][key]


def small_round_trips(
    procs: Processes, programs: dict[str, Path], relays: dict[str, Relay], rounds: int, count: int
) -> dict[str, dict[str, Any]]:
    """(a) vu_ping <-> vu_echo: REGION_READ of 4 bytes, one at a time."""
    series = {name: Series() for name in relays}
    samples_file = procs.tmp / "samples.bin"
    for r, name in interleaved(list(relays), rounds, seed=1):
        relay, s = relays[name], series[name]
        argv = [str(programs["vu_ping"]), "--socket", str(relay.listen), "--count", str(count),
                "--warmup", "200", "--samples", str(samples_file)]
        out = s.measure(relay, argv, lambda out: int(out["messages"]))
        batch = array.array("Q")
        batch.frombytes(samples_file.read_bytes())
        s.samples.extend(batch)
        s.batch_p50.append(out["p50_ns"])
        progress(f"(a) echo round {r + 1}/{rounds} {name}: p50 {out['p50_ns'] / 1000:.1f} us")
    return latency_summary(series)


def reference_round_trips(
    relays: dict[str, Relay], rounds: int, count: int
) -> dict[str, dict[str, Any]]:
    """(a') Endpoint client <-> vfioproxy serve-device: REGION_READ of 4 config bytes."""
    series = {name: Series() for name in relays}
    for r, name in interleaved(list(relays), rounds, seed=2):
        relay, s = relays[name], series[name]
        argv = [PYTHON, str(BENCH / "ref_client.py"), "ping", "--socket", str(relay.listen),
                "--count", str(count), "--warmup", "100", "--samples"]
        out = s.measure(relay, argv, lambda out: int(out["messages"]))
        s.samples.extend(out["samples_ns"])
        s.batch_p50.append(out["p50_ns"])
        progress(f"(a) reference round {r + 1}/{rounds} {name}: p50 {out['p50_ns'] / 1000:.1f} us")
    return latency_summary(series)


def realize_times(
    procs_for: Callable[[int], tuple[Processes, dict[str, Relay]]],
    restarts: int, rounds: int, reps: int, workload: int,
) -> dict[str, dict[str, Any]]:
    """(b) realize + reset + ``workload`` doorbells against serve-device, ``reps`` per batch.

    The rounds are split over ``restarts`` sets of processes (``procs_for(i)``
    starts a fresh server and relays): where the scheduler first places a
    long-lived process decides a good part of its figures for the rest of its
    life, so each set gives one ratio to direct and their spread is the run's
    placement luck."""
    series = {name: Series() for name in BASE_CONFIGS}
    by_restart: dict[str, list[float]] = {}
    done = 0
    for restart in range(restarts):
        share = (rounds - done) // (restarts - restart)
        done += share
        procs, relays = procs_for(restart)
        batch = {name: Series() for name in relays}
        try:
            for r, name in interleaved(list(relays), share, seed=3 + restart):
                relay, s = relays[name], batch[name]
                argv = [PYTHON, str(BENCH / "ref_client.py"), "realize", "--socket",
                        str(relay.listen), "--reps", str(reps), "--workload", str(workload)]
                out = s.measure(relay, argv,
                                lambda out: sum(run["messages"] for run in out["runs"]))
                s.runs.extend(out["runs"])
                median = statistics.median(
                    run["realize_ns"] + run["reset_ns"] for run in out["runs"])
                progress(f"(b) realize set {restart + 1}/{restarts} round {r + 1}/{share} "
                         f"{name}: realize+reset {median / 1e6:.2f} ms")
        finally:
            procs.stop()
        medians = {name: statistics.median(run["realize_ns"] + run["reset_ns"] for run in b.runs)
                   for name, b in batch.items() if b.runs}
        for name, b in batch.items():
            series[name].absorb(b)
            if "direct" in medians and name in medians:
                by_restart.setdefault(name, []).append(medians[name] / medians["direct"])
    series = {name: s for name, s in series.items() if s.runs}
    out_table: dict[str, dict[str, Any]] = {}
    for name, s in series.items():
        row: dict[str, Any] = {"n": len(s.runs)}
        for key in ("realize", "reset", "realize_reset", "total"):
            values = sorted(
                run["realize_ns"] + run["reset_ns"] if key == "realize_reset" else run[f"{key}_ns"]
                for run in s.runs
            )
            row[f"{key}_p50_ms"] = percentile(values, 0.5) / 1e6
            row[f"{key}_p90_ms"] = percentile(values, 0.9) / 1e6
        doorbells = sorted(x for run in s.runs for x in run["doorbell_ns"])
        if doorbells:
            row["doorbell_p50_us"] = percentile(doorbells, 0.5) / 1000
            row["doorbell_p99_us"] = percentile(doorbells, 0.99) / 1000
        row["messages_per_run"] = s.messages / max(1, len(s.runs))
        row.update(s.cpu_summary())
        if name in by_restart:
            ratios = by_restart[name]
            row["realize_reset_x_direct_by_set"] = [round(x, 3) for x in ratios]
            row["realize_reset_x_direct_set_median"] = statistics.median(ratios)
            row["realize_reset_x_direct_set_min"] = min(ratios)
            row["realize_reset_x_direct_set_max"] = max(ratios)
        out_table[name] = row
    keys = ["realize_p50_ms", "realize_reset_p50_ms", "realize_reset_p90_ms", "total_p50_ms"]
    if workload:
        keys.append("doorbell_p50_us")
    add_ratios(out_table, keys)
    return out_table


def throughput(
    programs: dict[str, Path], relays: dict[str, Relay], rounds: int, count: int
) -> dict[str, dict[str, Any]]:
    """(c) 1 MiB REGION_READ and REGION_WRITE, one at a time, MiB/s of payload."""
    out: dict[str, dict[str, Any]] = {}
    for mode in ("read", "write"):
        series = {name: Series() for name in relays}
        for r, name in interleaved(list(relays), rounds, seed=4 if mode == "read" else 5):
            relay, s = relays[name], series[name]
            argv = [str(programs["vu_ping"]), "--socket", str(relay.listen), "--mode", mode,
                    "--count", str(count), "--warmup", "10", "--size", str(1 << 20)]
            res = s.measure(relay, argv, lambda out: int(out["messages"]))
            s.values.append(res["mib_s"])
            progress(f"(c) {mode} round {r + 1}/{rounds} {name}: {res['mib_s']:.0f} MiB/s")
        table = {}
        for name, s in series.items():
            row = {"mib_s": statistics.median(s.values), "batches": s.values, **s.cpu_summary()}
            if "cpu_us_per_msg" in row:
                # every round trip forwards 1 MiB one way and a small message the other
                row["cpu_us_per_mib"] = 2 * row.pop("cpu_us_per_msg")
                for key in ("stat", "user", "sys", "cpu_batches"):
                    row.pop(f"{key}_us_per_msg")
            table[name] = row
        add_ratios(table, ("mib_s",))
        out[mode] = table
    return out


def rss_growth(
    procs: Processes, programs: dict[str, Path], server: Path, checkpoints: Sequence[int]
) -> dict[str, Any]:
    """(d) VmRSS of fresh ``vfioproxy record`` and ``vfioproxy proxy`` along one long session."""
    out: dict[str, Any] = {}
    for name in ("record", "proxy"):
        listen = procs.tmp / f"rss-{name}.sock"
        trace = procs.tmp / "rss.trace"
        argv = [VFIOPROXY, name, "--listen", str(listen), "--server", str(server)]
        if name == "record":
            argv += ["-o", str(trace)]
        proc = procs.spawn(f"rss-{name}", argv, listen)
        time.sleep(0.2)
        points = [{"messages": 0, "rss_kib": proc_status_kib(proc.pid, "VmRSS")}]
        total = max(checkpoints)
        ping = subprocess.Popen(
            [str(programs["vu_ping"]), "--socket", str(listen), "--count", str(total // 2),
             "--warmup", "0", "--pause-at", ",".join(map(str, [4, *checkpoints]))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert ping.stdin is not None and ping.stdout is not None
        for line in ping.stdout:
            if not line.startswith("pause"):
                continue
            time.sleep(0.05)  # let the digest catch up
            point = {
                "messages": int(line.split()[1]),
                "rss_kib": proc_status_kib(proc.pid, "VmRSS"),
                "hwm_kib": proc_status_kib(proc.pid, "VmHWM"),
                "fds": len(os.listdir(f"/proc/{proc.pid}/fd")),
            }
            if name == "record":
                point["trace_bytes"] = trace.stat().st_size
            points.append(point)
            progress(f"(d) {name}: {point['messages']} messages, RSS {point['rss_kib']} KiB")
            ping.stdin.write("\n")
            ping.stdin.flush()
        ping.wait()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        after_session = points[1]["rss_kib"]
        out[name] = {
            "points": points,
            "growth_kib_after_first_1k": points[-1]["rss_kib"] - points[2]["rss_kib"],
            "growth_kib_since_session_start": points[-1]["rss_kib"] - after_session,
        }
    return out


def progress(text: str) -> None:
    print(f"  {text}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- report


def fmt(value: Any, spec: str = ".1f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def print_table(
    title: str, rows: dict[str, dict[str, Any]], columns: list[tuple[str, str]]
) -> None:
    print(f"\n{title}")
    width = max(26, *(len(name) + 2 for name in rows))
    print(f"{'':<{width}}" + "".join(f"{label:>12}" for label, _ in columns))
    for name, row in rows.items():
        cells = []
        for _, key in columns:
            spec = ".2f" if key.endswith(("x_direct", "x_c", "_ms")) else ".1f"
            cells.append(f"{fmt(row.get(key), spec):>12}")
        print(f"{name:<{width}}" + "".join(cells))


def cpu_table(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """(e) CPU time of each relay process per forwarded message, every experiment."""
    table: dict[str, dict[str, Any]] = {}
    sources = (("echo_us", "echo_round_trip", "cpu_us_per_msg"),
               ("echo_user_us", "echo_round_trip", "user_us_per_msg"),
               ("echo_sys_us", "echo_round_trip", "sys_us_per_msg"),
               ("reference_us", "reference_round_trip", "cpu_us_per_msg"),
               ("realize_us", "realize", "cpu_us_per_msg"))
    for column, experiment, key in sources:
        for name, row in results.get(experiment, {}).items():
            if name != "direct" and key in row:
                table.setdefault(name, {})[column] = row[key]
    for mode, rows in results.get("throughput", {}).items():
        for name, row in rows.items():
            if name != "direct" and "cpu_us_per_mib" in row:
                table.setdefault(name, {})[f"{mode}_us_per_mib"] = row["cpu_us_per_mib"]
    for row in table.values():
        if "c-relay" in table and "echo_us" in row and "echo_us" in table["c-relay"]:
            row["echo_x_c"] = row["echo_us"] / table["c-relay"]["echo_us"]
    return table


def report(results: dict[str, Any]) -> None:
    lat_cols = [("p50 us", "p50_us"), ("p99 us", "p99_us"), ("p50/direct", "p50_us_x_direct"),
                ("p50/C", "p50_us_x_c"), ("p99/direct", "p99_us_x_direct"),
                ("p99/C", "p99_us_x_c"), ("CPU us/msg", "cpu_us_per_msg")]
    if "echo_round_trip" in results:
        print_table("(a) REGION_READ 4 B round trip, vu_ping <-> vu_echo",
                    results["echo_round_trip"], lat_cols)
    if "reference_round_trip" in results:
        print_table("(a) REGION_READ 4 B round trip, Endpoint client <-> serve-device",
                    results["reference_round_trip"], lat_cols)
    if "realize" in results:
        print_table("(b) realize + reset (+ doorbells), realize client <-> serve-device",
                    results["realize"], [
                        ("realize ms", "realize_p50_ms"), ("+reset p50", "realize_reset_p50_ms"),
                        ("+reset p90", "realize_reset_p90_ms"),
                        ("/direct", "realize_reset_p50_ms_x_direct"),
                        ("/C", "realize_reset_p50_ms_x_c"),
                        ("doorbell us", "doorbell_p50_us"),
                        ("db/direct", "doorbell_p50_us_x_direct"),
                        ("CPU us/msg", "cpu_us_per_msg")])
        for name, row in results["realize"].items():
            if name != "direct" and "realize_reset_x_direct_by_set" in row:
                sets = ", ".join(f"{x:.3f}" for x in row["realize_reset_x_direct_by_set"])
                print(f"  {name}: realize+reset / direct per set of processes: {sets}")
    if "throughput" in results:
        for mode, rows in results["throughput"].items():
            print_table(f"(c) 1 MiB REGION_{mode.upper()} throughput", rows, [
                ("MiB/s", "mib_s"), ("/direct", "mib_s_x_direct"), ("/C", "mib_s_x_c"),
                ("CPU us/MiB", "cpu_us_per_mib")])
    if results.get("cpu"):
        print_table("(e) relay CPU time per forwarded message, us (1 MiB: per MiB forwarded)",
                    results["cpu"], [
                        ("echo", "echo_us"), ("user", "echo_user_us"), ("system", "echo_sys_us"),
                        ("echo/C", "echo_x_c"), ("reference", "reference_us"),
                        ("realize", "realize_us"), ("read MiB", "read_us_per_mib"),
                        ("write MiB", "write_us_per_mib")])
    if "rss" in results:
        for name, rss in results["rss"].items():
            print(f"\n(d) RSS of vfioproxy {name} along one session")
            for point in rss["points"]:
                print(f"  {point['messages']:>8} messages: VmRSS {point['rss_kib']:>7} KiB"
                      + (f", trace {point['trace_bytes']} B" if "trace_bytes" in point else ""))
            print(f"  growth after the first 1k messages: {rss['growth_kib_after_first_1k']} KiB")
    if "targets" in results:
        print("\nTargets")
        for target in results["targets"]:
            if target["limit"] is None:
                print(f"  [info] {target['what']}: {target['value']:.3f}")
                continue
            print(f"  [{'met' if target['met'] else 'MISSED'}] {target['what']}: "
                  f"{target['value']:.3f} (limit {target['limit']})")


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets and the developers' guide's 1.5x rule, checked, and what the
    proxy adds to its own forwarding (no limit: reported only)."""
    out = []

    def check(what: str, value: float, limit: float | None) -> None:
        """A target (``limit``), or with None a figure reported next to them."""
        met = None if limit is None else value <= limit
        out.append({"what": what, "value": value, "limit": limit, "met": met})

    for key, label in (("echo_round_trip", "C ping/echo"),
                       ("reference_round_trip", "reference peers")):
        rows = results.get(key, {})
        if "record" in rows and "proxy" in rows:
            check(f"recording over proxying, p50 round trip, {label}",
                  rows["record"]["p50_us"] / rows["proxy"]["p50_us"], 1.10)
        if "record" in rows and "c-relay" in rows:
            check(f"full proxy (record) over C relay, p50 round trip, {label}",
                  rows["record"]["p50_us"] / rows["c-relay"]["p50_us"], 1.5)
        if "proxy" in rows and "c-relay" in rows:
            check(f"proxy over C relay, p50 round trip, {label}",
                  rows["proxy"]["p50_us"] / rows["c-relay"]["p50_us"], 1.5)
        if "proxy" in rows and "bare-threads" in rows:
            check(f"proxy over its own forwarding baseline (bare-threads), p50 round trip, "
                  f"{label}", rows["proxy"]["p50_us"] / rows["bare-threads"]["p50_us"], None)
    rows = results.get("realize", {})
    if "direct" in rows:
        for name in ("proxy", "record"):
            if name in rows:
                check(f"{name} realize+reset over direct, p50",
                      rows[name]["realize_reset_p50_ms_x_direct"], 1.5)
                if len(rows[name].get("realize_reset_x_direct_by_set", ())) > 1:
                    check(f"{name} realize+reset over direct, median of the sets' ratios "
                          f"(range {rows[name]['realize_reset_x_direct_set_min']:.3f}-"
                          f"{rows[name]['realize_reset_x_direct_set_max']:.3f})",
                          rows[name]["realize_reset_x_direct_set_median"], None)
        if "record" in rows and "proxy" in rows:
            check("recording over proxying, realize+reset p50",
                  rows["record"]["realize_reset_p50_ms"] / rows["proxy"]["realize_reset_p50_ms"],
                  1.10)
        if "record-inject" in rows and "record" in rows:
            check("injecting (c2s * delay fixed(0us)) over plain record, realize+reset p50",
                  rows["record-inject"]["realize_reset_p50_ms"]
                  / rows["record"]["realize_reset_p50_ms"], 1.10)
    rss = results.get("rss", {}).get("record")
    if rss:
        check("record RSS growth from 1k to the last checkpoint, KiB",
              float(rss["growth_kib_after_first_1k"]), 1024.0)
    return out


# ----------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (well under a minute)")
    parser.add_argument("--only", default="a,ref,b,c,d",
                        help="experiments to run, of a,ref,b,c,d (default all)")
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                        help="relay configurations to measure (default all but the "
                        "interposition ones, proxy-trap-mmap and record-trap-mmap)")
    parser.add_argument("--rounds", type=int, help="override the number of interleaved rounds")
    parser.add_argument("--sets", type=int, help="(b): fresh sets of server and relay "
                        "processes the rounds are split over (default 3, --quick 1)")
    parser.add_argument("--rss-checkpoints", help="messages at which (d) reads the RSS, "
                        "e.g. 1000,10000,100000")
    parser.add_argument("-o", "--output", default=str(BENCH / "results.json"))
    args = parser.parse_args()

    only = set(args.only.split(","))
    configs = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(configs) - set(BASE_CONFIGS))
    if unknown:
        parser.error(f"unknown --configs {', '.join(unknown)} (known: {', '.join(BASE_CONFIGS)})")
    if args.sets is not None and args.sets < 1:
        parser.error(f"--sets must be at least 1, got {args.sets}")
    quick = args.quick
    rounds = args.rounds or (5 if quick else 15)
    plan = {
        "echo_count": 2000 if quick else 4000,
        "ref_count": 500 if quick else 1000,
        "ref_rounds": max(2, rounds * 2 // 3) if quick else rounds * 2 // 3,
        "realize_reps": 3 if quick else 5,
        "realize_workload": 20,
        "realize_rounds": max(2, rounds * 2 // 3),
        "realize_sets": min(args.sets or (1 if quick else 3), max(2, rounds * 2 // 3)),
        "mib_count": 50 if quick else 100,
        "mib_rounds": max(2, rounds // 2),
        "rss_checkpoints": [1000, 10_000, 100_000] if quick else [1000, 10_000, 100_000, 300_000],
    }
    if args.rss_checkpoints:
        plan["rss_checkpoints"] = [int(x) for x in args.rss_checkpoints.split(",")]
    programs = build_c_programs()
    tmp = Path(tempfile.mkdtemp(prefix="vfioproxy-bench-"))
    procs = Processes(tmp, programs)
    started = time.monotonic()
    results: dict[str, Any] = {
        "machine": machine_info(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "quick": quick,
        "rounds": rounds,
        "plan": plan,
        "configs": configs,
    }
    try:
        if only & {"a", "c", "d"}:
            echo = procs.server("echo")
            echo_relays = procs.relays("echo", echo, configs)
            time.sleep(0.5)
            if "a" in only:
                results["echo_round_trip"] = small_round_trips(
                    procs, programs, echo_relays, rounds, plan["echo_count"])
            if "c" in only:
                results["throughput"] = throughput(
                    programs, echo_relays, plan["mib_rounds"], plan["mib_count"])
            if "d" in only:
                results["rss"] = rss_growth(procs, programs, echo, plan["rss_checkpoints"])
        if "ref" in only:
            device = procs.server("device")
            dev_relays = procs.relays("dev", device, configs)
            time.sleep(0.5)
            results["reference_round_trip"] = reference_round_trips(
                dev_relays, plan["ref_rounds"], plan["ref_count"])
        if "b" in only:
            def realize_set(i: int) -> tuple[Processes, dict[str, Relay]]:
                own = Processes(tmp, programs)
                try:
                    device = own.server(f"device{i}")
                    relays = own.relays(f"set{i}-", device, configs)
                except BaseException:
                    own.stop()
                    raise
                time.sleep(0.5)
                return own, relays

            results["realize"] = realize_times(
                realize_set, plan["realize_sets"], plan["realize_rounds"],
                plan["realize_reps"], plan["realize_workload"])
    finally:
        procs.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    results["machine"]["background_busy_cpus_at_end"] = round(background_busy_cpus(), 2)
    results["cpu"] = cpu_table(results)
    results["targets"] = targets(results)
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    report(results)
    busy = max(results["machine"]["background_busy_cpus_at_start"],
               results["machine"]["background_busy_cpus_at_end"])
    print(f"\nother load on the machine: {busy:.2f} CPUs busy before/after the run"
          + (" -- WARNING: the figures are disturbed" if busy > 0.2 else ""))
    Path(args.output).write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {args.output} ({results['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)

