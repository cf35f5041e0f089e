"""What fault injection costs on the forwarding path: ns per ``Injector.decide`` call.

    .venv/bin/python bench/inject_cost.py                 # every trace in traces/
    .venv/bin/python bench/inject_cost.py --reps 31 --passes 20
    .venv/bin/python bench/inject_cost.py --json OUT.json

Measured offline, in this process, on the real messages of
``traces/*.trace`` (both directions, in file order; each trace's sessions
renumbered so that no two traces share one). For every rule set below, one
injector decides every message ``--passes`` times in a row (``now`` grows by
1 us a message, so nothing ever waits); a repeat is timed with
``time.perf_counter_ns`` and divided by its calls, and the figure is the
median of ``--reps`` repeats (after one untimed warm-up repeat); the rule
sets take turns, one repeat each per round, so that load elsewhere on the
machine spreads over all of them. The
``bare call`` row is a Python function with ``decide``'s signature that
returns a constant: the loop and the call themselves; ``net`` subtracts it.

Rule sets: none; ``c2s * delay fixed(0us)`` (matches every client message
and changes nothing observable); a region filter that matches rarely; five
rules of different shapes.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rounds import median_rounds  # bench/rounds.py, beside this script

from recorder.reader import TraceReader
from recorder.records import MessageRecord
from vfioproxy.inject import Injector
from vfioproxy.side import Direction

TRACES = Path(__file__).resolve().parent.parent / "traces"

RULE_SETS: dict[str, tuple[str, ...]] = {
    "no rules": (),
    "c2s * delay fixed(0us)": ("c2s * delay fixed(0us)",),
    "region filter, rarely matching": (
        "c2s REGION_READ region=CONFIG offset=0x40..0x50 delay 1ms",
    ),
    "five rules": (
        "c2s * delay fixed(0us)",
        "c2s REGION_READ region=CONFIG offset=0x40..0x50 delay 1ms",
        "s2c * reply p=0.01 delay uniform(10us,20us)",
        "c2s DMA_MAP,DMA_UNMAP delay normal(50us,10us)",
        "c2s DEVICE_RESET error EIO",
    ),
}

Message = tuple[int, Direction, bytes]
Decide = Callable[[int, Direction, bytes, float], object]


def load_messages(paths: Sequence[Path]) -> list[Message]:
    """Every message of the traces, sessions renumbered to be distinct across traces."""
    messages: list[Message] = []
    sessions: dict[tuple[int, int], int] = {}
    for number, path in enumerate(paths):
        with TraceReader(path) as reader:
            for record in reader:
                if isinstance(record, MessageRecord):
                    session = sessions.setdefault((number, record.session), len(sessions) + 1)
                    messages.append((session, record.direction, bytes(record.data)))
    return messages


def bare(session: int, direction: Direction, data: bytes, now: float) -> object:
    """The cheapest function with ``decide``'s signature."""
    return None


def one_repeat(
    decide: Decide, messages: Sequence[Message], passes: int, clock: list[float]
) -> float:
    """ns per call of ``passes`` passes over ``messages``."""
    now = clock[0]
    start = time.perf_counter_ns()
    for _ in range(passes):
        for session, direction, data in messages:
            now += 1e-6
            decide(session, direction, data, now)
    elapsed = time.perf_counter_ns() - start
    clock[0] = now
    return elapsed / (passes * len(messages))


def measure(
    candidates: dict[str, Decide], messages: Sequence[Message], passes: int, reps: int
) -> dict[str, float]:
    """Median ns per call of each candidate over ``reps`` rounds.

    Every round times one repeat of each candidate, in turn, so that a
    burst of load elsewhere on the machine spreads over all of them; one
    untimed repeat of each comes first.
    """
    clocks = {name: [0.0] for name in candidates}
    return median_rounds({
        name: functools.partial(one_repeat, decide, messages, passes, clocks[name])
        for name, decide in candidates.items()
    }, reps)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("traces", nargs="*", type=Path, help="default: traces/*.trace")
    parser.add_argument("--reps", type=int, default=21, help="timed repeats (median)")
    parser.add_argument("--passes", type=int, default=10, help="passes over the messages a repeat")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    paths = args.traces or sorted(TRACES.glob("*.trace"))
    messages = load_messages(paths)
    c2s = sum(direction is Direction.C2S for _, direction, _ in messages)
    print(f"{len(messages)} messages ({c2s} c2s) from {len(paths)} traces; "
          f"python {platform.python_version()}, {os.cpu_count()} CPUs")
    candidates: dict[str, Decide] = {"bare call": bare}
    for name, rules in RULE_SETS.items():
        candidates[name] = Injector(rules, seed=1).decide
    costs = measure(candidates, messages, args.passes, args.reps)
    base = costs["bare call"]
    results: dict[str, Any] = {"messages": len(messages), "bare_call_ns": base, "rule_sets": {}}
    print(f"{'rule set':<34} {'ns/call':>8} {'net ns':>8}")
    for name, cost in costs.items():
        print(f"{name:<34} {cost:8.0f} {cost - base:8.0f}")
        if name in RULE_SETS:
            results["rule_sets"][name] = {"rules": list(RULE_SETS[name]), "ns_per_call": cost}
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
