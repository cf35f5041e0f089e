"""The reference client side of the proxy benchmarks (run as its own process).

    .venv/bin/python bench/ref_client.py ping --socket S [--count N] [--warmup W]
    .venv/bin/python bench/ref_client.py realize --socket S [--reps N] [--workload W]

``ping``: a :class:`vfioproxy.peers.endpoint.Endpoint` client sends VERSION,
then REGION_READs of 4 bytes of config space (region 7) one at a time, and
prints one JSON line like ``vu_ping``'s (round trip p50/p99/mean in ns and
``messages``, every message that crossed the socket; with ``--samples``, every
round trip as ``samples_ns``).

``realize``: ``N`` times, connect and run exactly what ``vfioproxy realize
--workload W`` runs (realize R1-R14, the machine reset S1-S7, W doorbells),
and print one JSON line with, per repetition, the realize and reset times,
the whole connection's time (connect to close) and the doorbell round trips,
all in ns.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from typing import Any

import trio

from vfioproxy.io.transport import open_unix_fd_stream
from vfioproxy.peers.client import QEMU_VERSION_JSON, RealizeOptions, open_realize_client
from vfioproxy.peers.endpoint import Endpoint
from vfioproxy.protocol.bodies import RegionAccessBody, VersionBody
from vfioproxy.protocol.header import Command
from vfioproxy.side import Side


def percentile(ordered: Sequence[float], p: float) -> float:
    """The nearest-rank percentile of already sorted samples."""
    return ordered[max(0, math.ceil(p * len(ordered)) - 1)]


async def ping(path: str, count: int, warmup: int, with_samples: bool) -> dict[str, Any]:
    stream = await open_unix_fd_stream(path, max_fds=16)
    endpoint = Endpoint(stream, Side.CLIENT)
    samples: list[int] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        await endpoint.request(Command.VERSION, VersionBody(0, 0, QEMU_VERSION_JSON))
        body = RegionAccessBody(offset=0, region=7, count=4)
        clock = time.perf_counter_ns
        start = 0
        for i in range(-warmup, count):
            if i == 0:
                start = clock()
            t0 = clock()
            await endpoint.request(Command.REGION_READ, body)
            if i >= 0:
                samples.append(clock() - t0)
        elapsed = clock() - start
        await endpoint.aclose()
        nursery.cancel_scope.cancel()
    ordered = sorted(samples)
    return {
        "mode": "ref-lat",
        "count": count,
        "messages": 2 * (1 + warmup + count),
        "min_ns": ordered[0],
        "p50_ns": percentile(ordered, 0.5),
        "p99_ns": percentile(ordered, 0.99),
        "mean_ns": sum(ordered) / len(ordered),
        "elapsed_ns": elapsed,
        **({"samples_ns": samples} if with_samples else {}),
    }


async def realize_reps(path: str, reps: int, workload: int) -> dict[str, Any]:
    options = RealizeOptions(workload=workload)
    runs = []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        async with open_realize_client(path, options) as client:
            await client.realize()
            await client.reset()
            if workload:
                await client.run_workload(workload)
            result = client.result()
            latencies = [round(s * 1e9) for s in client.latencies]
        total = time.perf_counter_ns() - t0
        timings = result.timings
        assert timings.realize is not None and timings.reset is not None
        runs.append({
            "realize_ns": round(timings.realize * 1e9),
            "reset_ns": round(timings.reset * 1e9),
            "total_ns": total,
            "doorbell_ns": latencies,
            "messages": sum(result.sent.values()) + sum(result.received.values()),
        })
    return {"mode": "realize", "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p_ping = commands.add_parser("ping")
    p_ping.add_argument("--socket", required=True)
    p_ping.add_argument("--count", type=int, default=2000)
    p_ping.add_argument("--warmup", type=int, default=100)
    p_ping.add_argument("--samples", action="store_true", help="include every round trip")
    p_realize = commands.add_parser("realize")
    p_realize.add_argument("--socket", required=True)
    p_realize.add_argument("--reps", type=int, default=5)
    p_realize.add_argument("--workload", type=int, default=20)
    args = parser.parse_args()
    if args.command == "ping":
        out = trio.run(ping, args.socket, args.count, args.warmup, args.samples)
    else:
        out = trio.run(realize_reps, args.socket, args.reps, args.workload)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
