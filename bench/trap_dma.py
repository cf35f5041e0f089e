"""What ``--trap-dma`` costs: device DMA bytes per second through messages vs through memory.

    .venv/bin/python bench/trap_dma.py
    .venv/bin/python bench/trap_dma.py --doorbells 300 --rounds 5 --json OUT.json

The reference device server and the reference client (QEMU-like; it answers
DMA_READ/DMA_WRITE from guest memory) talk through ``vfioproxy record``'s
proxy (threads, the C lane when built, a trace in a temporary directory),
with and without trap-dma on every window. After realize and reset the
client rings ``--doorbells`` COPY doorbells of one size each; the device
reads the descriptor and the source and writes the destination and the
completion, by mmap of the memfd (untrapped) or by DMA_READ/DMA_WRITE
messages (trapped), then raises INTx; the client checks every result. The
figure per size and configuration is the median over ``--rounds`` rounds
(configurations take turns within a round) of the device's DMA bytes per
second of wall time (descriptor + source + destination + completion, per
doorbell) and doorbells per second.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

import trio

from recorder.sink import TraceSink
from vfioproxy.interpose import InterposeOptions
from vfioproxy.peers import layout
from vfioproxy.peers.client import RealizeOptions, open_realize_client
from vfioproxy.peers.server import open_device_server
from vfioproxy.proxy import ProxyOptions, open_proxy

SIZES = (64, 4096, 65536)
CONFIGS = {"memory": None, "trap-dma": ()}


async def one(workdir: Path, size: int, doorbells: int, trap: tuple[()] | None) -> float:
    """Seconds for ``doorbells`` COPY doorbells of ``size`` bytes through the proxy."""
    sink = TraceSink(workdir / "t.trace")
    options = ProxyOptions(interpose=InterposeOptions(trap_dma=trap))
    data = bytes(range(256)) * (size // 256) or bytes(range(size))
    try:
        async with open_device_server(workdir / "dev.sock"), \
                open_proxy(workdir / "p.sock", workdir / "dev.sock", sink=sink,
                           options=options) as proxy:
            async with open_realize_client(workdir / "p.sock", RealizeOptions()) as client:
                await client.realize()
                await client.reset()
                await client.doorbell(layout.OP_COPY, data)  # enables the device
                start = time.perf_counter()
                for _ in range(doorbells):
                    await client.doorbell(layout.OP_COPY, data)
                took = time.perf_counter() - start
                if trap is not None:
                    assert sum(client.dma_answers.values()) >= 4 * doorbells
                else:
                    assert not client.dma_answers
            await proxy.wait_sessions()
    finally:
        sink.close()
        (workdir / "t.trace").unlink()
    return took


def dma_bytes(size: int) -> int:
    """What the device reads and writes of guest memory for one COPY doorbell."""
    return layout.DESCRIPTOR.size + 2 * size + layout.COMPLETION.size


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    times: dict[tuple[int, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="trapdma") as tmp:
        for _ in range(args.rounds):
            for size in SIZES:
                for name, trap in CONFIGS.items():
                    took = await one(Path(tmp), size, args.doorbells, trap)
                    times.setdefault((size, name), []).append(took)
    rows = []
    for (size, name), seconds in times.items():
        t = median(seconds)
        rows.append({"size": size, "config": name, "seconds": t,
                     "doorbells_per_s": args.doorbells / t,
                     "dma_mib_per_s": args.doorbells * dma_bytes(size) / t / 2**20})
    return {"machine": platform.node(), "python": sys.version.split()[0],
            "doorbells": args.doorbells, "rounds": args.rounds, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--doorbells", type=int, default=200, help="doorbells per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (the median is kept)")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    out = trio.run(main_async, args)
    print(f"{'size':>6} {'config':>9} {'doorbells/s':>12} {'DMA MiB/s':>10}")
    for row in out["rows"]:
        print(f"{row['size']:>6} {row['config']:>9} {row['doorbells_per_s']:>12.0f} "
              f"{row['dma_mib_per_s']:>10.2f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
