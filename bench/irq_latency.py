"""Interrupt latency added by ``--interpose-irqs``: eventfd write -> the client's
eventfd readable, direct vs through the proxy's IRQ watcher.

    .venv/bin/python bench/irq_latency.py                   # 3000 interrupts a case
    .venv/bin/python bench/irq_latency.py --count 10000 --rounds 5 --json OUT.json

A "server" process writes 1 to an eventfd and notes the time; a "client"
process blocked in ``poll`` on its eventfd notes the time it wakes, reads
the counter and acknowledges on a second eventfd, and the server waits for
that, then ``--gap`` (default 100 us: interrupts apart, as completions
of a device are, not back to back) before the next interrupt. The latency is wake time - write time
(``time.perf_counter_ns``: CLOCK_MONOTONIC, the same in every process). The
watcher runs in this process, as in the proxy; the peers are processes of
their own, as live, so none of them contends for the watcher's GIL.

Cases, taking turns round by round so that load elsewhere spreads over all:

- ``direct``: the server writes the client's own eventfd (no proxy);
- ``bare-hop``: the floor of any watcher thread in Python: a thread that
  waits in ``epoll`` on one eventfd, reads it and writes the client's, and
  does nothing else (no lock, no record, no fault injection);
- ``interposed``: the server writes the substitute eventfd an
  :class:`~vfioproxy.proxy.irqs.IrqWatcher` handed out; the watcher's thread
  reads it, records an ``irq`` event and writes the client's eventfd;
  recording into a real trace file (:class:`~recorder.writer.TraceWriter`);
- ``interposed-norecord``: the same, with a recorder that does nothing (the
  watcher's own cost without the trace writer);
- ``interposed-rule``: recording, with ``irq * p=0 drop`` (an irq rule that
  is asked about every interrupt and never fires).

The figure of a case is the median over rounds of each round's p50 (and
p99); the ratios are interposed / direct p50.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recorder.records import TraceHeader
from recorder.writer import TraceWriter
from vfioproxy.inject import Injector
from vfioproxy.interpose import FdFate, FdPlan
from vfioproxy.io.fds import OwnedFd
from vfioproxy.proxy.irqs import IrqWatcher

CASES = ("direct", "bare-hop", "interposed", "interposed-norecord", "interposed-rule")


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def run_case(case: str, count: int, workdir: Path, gap: float = 0.0) -> list[int]:
    """``count`` interrupts one at a time; their latencies in ns."""
    client = _eventfd()
    ack = _eventfd()
    writer: TraceWriter | None = None
    watcher: IrqWatcher | None = None
    server_fd = client
    forwarded: OwnedFd | None = None
    if case != "direct":
        record: Callable[[dict[str, Any], int], object]
        if case == "interposed-norecord":
            def record(data: dict[str, Any], t_ns: int) -> object:
                return 0
        else:
            writer = TraceWriter(workdir / f"{case}.trace", TraceHeader.now("bench"),
                                 overwrite=True)
            bound = writer

            def record(data: dict[str, Any], t_ns: int) -> object:
                return bound.append_event(1, "irq", t_ns, data)
        decide = None
        if case == "interposed-rule":
            injector = Injector(["irq * p=0 drop"])

            def decide(index: int, vector: int, now: float) -> Any:
                return injector.irq(1, index, vector, now)
        watcher = IrqWatcher(record, decide)
        forwarded = watcher.interpose(OwnedFd(os.dup(client)), FdPlan(FdFate.INTERPOSE, (2, 0)))
        server_fd = forwarded.fileno()
    hop: threading.Thread | None = None
    if case == "bare-hop":
        substitute = _eventfd()
        server_fd = substitute
        stop = threading.Event()

        def bare() -> None:
            epoll = select.epoll()
            epoll.register(substitute, select.EPOLLIN)
            while not stop.is_set():
                for _ in epoll.poll(0.1):
                    os.eventfd_write(client, os.eventfd_read(substitute))
            epoll.close()

        hop = threading.Thread(target=bare)
        hop.start()
    # the server and the client are processes of their own, as they are live
    # (neither contends for the proxy's GIL); CLOCK_MONOTONIC is system-wide
    client_pid, woke_pipe = _fork(lambda: _client(client, ack, count))
    server_pid, wrote_pipe = _fork(lambda: _server(server_fd, ack, count, gap))
    wrote, woke = _collect(wrote_pipe, server_pid), _collect(woke_pipe, client_pid)
    if hop is not None:
        stop.set()
        hop.join()
        os.close(substitute)
    if watcher is not None:
        watcher.close()
    if forwarded is not None:
        forwarded.close()
    if writer is not None:
        writer.close()
    os.close(client)
    os.close(ack)
    return [w - s for s, w in zip(wrote, woke, strict=True)]


def _client(client: int, ack: int, count: int) -> list[int]:
    """Wait for each interrupt, note the time, read it, acknowledge it."""
    poller = select.poll()
    poller.register(client, select.POLLIN)
    woke = []
    for _ in range(count):
        while not poller.poll(5000):
            pass
        woke.append(time.perf_counter_ns())
        os.eventfd_read(client)
        os.eventfd_write(ack, 1)
    return woke


def _server(server_fd: int, ack: int, count: int, gap: float) -> list[int]:
    """Interrupt, note the time, wait for the acknowledgement, wait ``gap``
    seconds; ``count`` times."""
    acked = select.poll()
    acked.register(ack, select.POLLIN)
    wrote = []
    for _ in range(count):
        wrote.append(time.perf_counter_ns())
        os.eventfd_write(server_fd, 1)
        while not acked.poll(5000):
            pass
        os.eventfd_read(ack)
        if gap:
            time.sleep(gap)
    return wrote


def _fork(body: Callable[[], list[int]]) -> tuple[int, int]:
    """Run ``body`` in a child process; its pid and the pipe its result comes on."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only os, select and time, then _exit
        try:
            os.close(read_end)
            data = json.dumps(body()).encode()
            with os.fdopen(write_end, "wb") as out:
                out.write(data)
        finally:
            os._exit(0)
    os.close(write_end)
    return pid, read_end


def _collect(read_end: int, pid: int) -> list[int]:
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    values: list[int] = json.loads(data)
    return values


def pct(values: list[int], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] / 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=3000, help="interrupts per case and round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (cases take turns)")
    parser.add_argument("--gap", type=float, default=100.0,
                        help="microseconds between an acknowledgement and the next interrupt")
    parser.add_argument("--json", metavar="OUT", help="write the figures as JSON")
    args = parser.parse_args()
    p50s: dict[str, list[float]] = {case: [] for case in CASES}
    p99s: dict[str, list[float]] = {case: [] for case in CASES}
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:  # warm-up
            run_case(case, min(args.count, 300), Path(tmp), args.gap / 1e6)
        for _ in range(args.rounds):
            for case in CASES:
                got = run_case(case, args.count, Path(tmp), args.gap / 1e6)
                p50s[case].append(pct(got, 0.50))
                p99s[case].append(pct(got, 0.99))
    direct = statistics.median(p50s["direct"])
    result: dict[str, Any] = {
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "count": args.count, "rounds": args.rounds, "gap_us": args.gap, "cases": {}}
    print(f"{'case':22} {'p50 us':>8} {'rounds p50 us':>16} {'p99 us':>8} {'p50 / direct':>13} "
          f"{'added p50 us':>13}")
    for case in CASES:
        p50, p99 = statistics.median(p50s[case]), statistics.median(p99s[case])
        result["cases"][case] = {"p50_us": p50, "p99_us": p99, "ratio": p50 / direct,
                                 "added_us": p50 - direct, "round_p50s": p50s[case]}
        spread = f"{min(p50s[case]):.1f}-{max(p50s[case]):.1f}"
        print(f"{case:22} {p50:8.1f} {spread:>16} {p99:8.1f} {p50 / direct:13.2f} "
              f"{p50 - direct:13.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
