"""Where a relay's CPU time goes per forwarded message, measured in place.

    .venv/bin/python bench/profile_proxy.py [--relays record,proxy,proxy-nodecode,bare-trio]
                                            [--patches P1,P2] [--seconds 5] [--json OUT]

Each relay runs in front of ``vu_echo`` and is driven by ``vu_ping`` (4-byte
REGION_READs, one at a time; ``--workload read|write``: 1 MiB), or with
``--workload realize`` in front of ``vfioproxy serve-device``, driven by
realize + reset + 20 doorbells; twice:
as it is, for its CPU time per forwarded message (the process CPU clock;
user/system split from ``/proc/PID/stat``), and with ``patched_proxy.py``'s
``instrument`` patch, which times every call that matters per message inside
the relay process:

- the socket syscalls ``recvmsg`` (header + fds; also the ones that fail with
  EAGAIN, which is how a trio task finds out that it must wait), ``recv``
  (body) and ``sendmsg``;
- trio's epoll: ``epoll_wait`` (thread CPU time, so sleeping does not count)
  and ``epoll_ctl`` (re-arming a one-shot registration for every wait);
- the digest: ``SessionState.observe`` (decode and checks), the trace
  writer (building the record, msgpack, ``write(2)``), fd inspection.

The timed calls are charged their own thread CPU time (the wrappers' cost,
measured at start-up, taken out); the rest of the uninstrumented run's CPU
time is Python: trio's run loop (task switches, checkpoints, events) and the
pump and digest code. (Instrumenting slows the process down beyond the
wrappers' own cost, so the timed calls may read a little high and the rest
a little low.) With ``--patches``, the relays run
with those ``patched_proxy.py`` patches (e.g. to profile the optimised proxy).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import proxy_overhead as bench

#: timed calls, in report order: (meter name, label, the timed call it runs inside)
PHASES = (
    ("recvmsg", "recvmsg (header + fds)", None),
    ("recvmsg EAGAIN", "recvmsg -> EAGAIN", None),
    ("recv", "recv (body)", None),
    ("recv EAGAIN", "recv -> EAGAIN", None),
    ("sendmsg", "sendmsg", None),
    ("epoll_wait", "epoll_wait", None),
    ("epoll_ctl", "epoll_ctl (re-arm one-shot)", None),
    ("observe", "observe: decode + checks", None),
    ("record", "record", None),
    ("record: pack + write", "  record: msgpack + write(2)", "record"),
    ("record: write(2)", "  record: write(2)", "record: pack + write"),
    ("fd inspection", "fd inspection", None),
)


def meter(proc: subprocess.Popen[bytes], path: Path) -> dict[str, Any]:
    """The relay's Meter totals now (it writes them on SIGUSR1)."""
    path.unlink(missing_ok=True)
    proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if path.exists():
            try:
                result: dict[str, Any] = json.loads(path.read_text())
                return result
            except json.JSONDecodeError:
                pass  # still being written
        time.sleep(0.01)
    raise RuntimeError("the relay did not write its meter")


def user_sys_ns(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = 1_000_000_000 // bench.CLK_TCK
    return int(fields[11]) * tick, int(fields[12]) * tick


def run_relay(
    relay: str, patches: list[str], seconds: float, tmp: Path, programs: dict[str, Path],
    instrument: bool, workload: str,
) -> dict[str, Any]:
    procs = bench.Processes(tmp, programs, [])
    meter_path = tmp / "meter.json"
    os.environ["VFIOPROXY_BENCH_METER"] = str(meter_path)
    try:
        server = procs.server("device" if workload == "realize" else "echo")
        all_patches = [*patches, "instrument"] if instrument else patches
        name = "+".join([relay, *all_patches]) if all_patches else relay
        tag = "timed" if instrument else "plain"
        listen = tmp / f"{tag}.sock"
        proc = procs.spawn(tag, procs.relay_argv(name, tag, listen, server), listen)
        time.sleep(0.5)
        if workload == "ping":
            ping = [str(programs["vu_ping"]), "--socket", str(listen), "--count", "5000",
                    "--warmup", "0"]
        elif workload in ("read", "write"):
            ping = [str(programs["vu_ping"]), "--socket", str(listen), "--mode", workload,
                    "--count", "100", "--warmup", "0"]
        else:
            ping = [bench.PYTHON, str(bench.BENCH / "ref_client.py"), "realize", "--socket",
                    str(listen), "--reps", "10", "--workload", "20"]
        bench.run_json(ping)  # the first session: imports, caches
        before = meter(proc, meter_path) if instrument else None
        cpu0, (user0, sys0) = bench.process_cpu_ns(proc.pid), user_sys_ns(proc.pid)
        messages = 0
        deadline = time.monotonic() + seconds
        trace = tmp / f"{tag}.trace"
        while time.monotonic() < deadline:
            out = bench.run_json(ping)
            if trace.exists():
                os.truncate(trace, 0)  # keep the page cache from filling up
            messages += out.get("messages") or sum(run["messages"] for run in out["runs"])
        cpu1, (user1, sys1) = bench.process_cpu_ns(proc.pid), user_sys_ns(proc.pid)
        after = meter(proc, meter_path) if instrument else None
    finally:
        procs.stop()
    out: dict[str, Any] = {
        "relay": name,
        "messages": messages,
        "cpu_us_per_msg": (cpu1 - cpu0) / messages / 1000,
        "user_us_per_msg": (user1 - user0) / messages / 1000,
        "sys_us_per_msg": (sys1 - sys0) / messages / 1000,
    }
    if before is not None and after is not None:
        out["phases"] = breakdown(before, after, messages)
    return out


def breakdown(
    before: dict[str, Any], after: dict[str, Any], messages: int
) -> dict[str, Any]:
    """Per message: each timed call's own CPU time in us (the wrappers' share
    taken out) and calls."""
    wrapper, bias = after["wrapper_ns"], after["bias_ns"]

    def delta(key: str, what: str) -> int:
        return int(after[what].get(key, 0) - before[what].get(key, 0))

    calls = {key: delta(key, "calls") for key, _, _ in PHASES}
    inner: dict[str, int] = dict.fromkeys(calls, 0)  # wrapped calls inside each one
    for key, _, parent in PHASES:
        while parent is not None:
            inner[parent] += calls[key]
            parent = next(p for k, _, p in PHASES if k == parent)
    phases: dict[str, Any] = {}
    for key, label, parent in PHASES:
        if calls[key]:
            own = delta(key, "ns") - bias * calls[key] - wrapper * inner[key]
            phases[label] = {"us_per_msg": own / messages / 1000,
                             "calls_per_msg": calls[key] / messages, "top": parent is None}
    return phases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--relays", default="record,proxy,proxy-nodecode,bare-trio")
    parser.add_argument("--patches", default="", help="patched_proxy.py patches for every relay")
    parser.add_argument("--seconds", type=float, default=5.0, help="per relay and mode")
    parser.add_argument("--workload", choices=("ping", "read", "write", "realize"),
                        default="ping", help="vu_ping <-> vu_echo (4-byte or 1 MiB "
                        "REGION_READs, 1 MiB REGION_WRITEs), or realize client <-> serve-device")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    programs = bench.build_c_programs()
    patches = [p for p in args.patches.split(",") if p]
    results = []
    for relay in args.relays.split(","):
        with tempfile.TemporaryDirectory(prefix="vfioproxy-prof-") as tmp:
            plain = run_relay(relay, patches, args.seconds, Path(tmp), programs, False,
                              args.workload)
        with tempfile.TemporaryDirectory(prefix="vfioproxy-prof-") as tmp:
            timed = run_relay(relay, patches, args.seconds, Path(tmp), programs, True,
                              args.workload)
        timed_total = sum(p["us_per_msg"] for p in timed["phases"].values() if p["top"])
        rest = plain["cpu_us_per_msg"] - timed_total
        results.append({"plain": plain, "instrumented": timed, "python_rest_us_per_msg": rest})
        print(f"\n{plain['relay']}: {plain['cpu_us_per_msg']:.1f} us CPU per forwarded "
              f"message (user {plain['user_us_per_msg']:.1f}, system "
              f"{plain['sys_us_per_msg']:.1f})")
        print(f"  {'':<44}{'us/msg':>8}{'calls/msg':>11}")
        for label, phase in timed["phases"].items():
            print(f"  {label:<44}{phase['us_per_msg']:>8.2f}{phase['calls_per_msg']:>11.2f}")
        print(f"  {'the rest: trio run loop, pump, digest loop':<44}{rest:>8.2f}")
        sys.stdout.flush()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
