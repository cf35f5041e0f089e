"""What a display filter costs on the live path: ns per message of ``-Y EXPR``.

    .venv/bin/python bench/filter_cost.py                 # every trace in traces/
    .venv/bin/python bench/filter_cost.py --reps 31 --passes 20
    .venv/bin/python bench/filter_cost.py --json OUT.json

Measured offline, in this process, on the real messages of
``traces/*.trace`` in the live path's form: each message decoded once, as
the proxy's live checks decode it (:class:`SessionState.observe`), with the
latency the live view gives replies, so that a filter sees exactly the
``accept(session, obs, t_ns, seq, latency_ns, session_start_ns)`` call of
:class:`~vfioproxy.proxy.live.MessageLog`. Each expression is compiled once
(``compile_filter(EXPR, live=True).on_observations()``) and called on every
message ``--passes`` times a repeat; the figure is the median of ``--reps``
repeats, the candidates taking turns within each round. ``bare call`` is a
function with ``accept``'s signature returning a constant (the loop and the
call); ``net`` subtracts it.

The two references, per message over the same messages: ``decode``, the
live checks' ``SessionState.observe`` (what the path pays for ``-v`` before
any filter), and ``live line``, :class:`MessageLog` printing every message
without a filter (describe, latency, format, write to an in-memory stream).
The exit status is 1 when a filter costs more than ``--budget`` ns (2000).
"""

from __future__ import annotations

import argparse
import io
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
from vfioproxy.protocol.listing import RequestTimes
from vfioproxy.protocol.pci import Capability
from vfioproxy.protocol.pci_view import PciView, describe
from vfioproxy.protocol.session import Observation, SessionState
from vfioproxy.proxy.live import Accept, MessageLog
from vfioproxy.side import Direction
from vfioproxy.trace.filter import compile_filter

TRACES = Path(__file__).resolve().parent.parent / "traces"

#: README's examples that the live path takes (step is refused there)
EXPRESSIONS = (
    "command == REGION_READ and region == ROM",
    'register == "COMMAND" and dir == c2s',
    "errno in {EINVAL, ENOTSUP} or violation",
    "latency > 100 and not (region == config)",
    "kind == error or violation or latency > 1000",
)

#: (session, direction, data, fds, t_ns, seq) of one message as the proxy sees it
Raw = tuple[int, Direction, bytes, tuple[int, ...], int, int]
#: the arguments of one ``accept`` call (``Accept`` of the live view)
Call = tuple[int, Observation, int, int, int | None, int, tuple[Capability, ...]]


def load(paths: Sequence[Path]) -> list[Raw]:
    """Every message of the traces, sessions renumbered to be distinct across traces."""
    raw: list[Raw] = []
    sessions: dict[tuple[int, int], int] = {}
    for number, path in enumerate(paths):
        with TraceReader(path) as reader:
            for record in reader:
                if isinstance(record, MessageRecord) and not record.torn:
                    session = sessions.setdefault((number, record.session), len(sessions) + 1)
                    raw.append((session, record.direction, bytes(record.data),
                                tuple(range(len(record.fds))), record.t_ns, record.seq))
    return raw


def decode_all(raw: Sequence[Raw]) -> list[Observation]:
    """Each message decoded as the live checks decode it, one state per session."""
    states: dict[int, SessionState] = {}
    out = []
    for session, direction, data, fds, _, _ in raw:
        state = states.get(session)
        if state is None:
            state = states[session] = SessionState()
        out.append(state.observe(direction, data, fds))
    return out


def calls(raw: Sequence[Raw], observations: Sequence[Observation]) -> list[Call]:
    """The ``accept`` calls the live view makes for these messages (each
    session's PCI view taught by its messages, as the live view's is)."""
    times: dict[int, RequestTimes] = {}
    starts: dict[int, int] = {}
    views: dict[int, PciView] = {}
    out: list[Call] = []
    for (session, _, _, _, t_ns, seq), obs in zip(raw, observations, strict=True):
        latency = times.setdefault(session, RequestTimes()).latency(obs, t_ns)
        pci = views.setdefault(session, PciView())
        describe(obs, pci)
        out.append((session, obs, t_ns, seq, latency, starts.setdefault(session, t_ns),
                    pci.capabilities))
    return out


def bare(session: int, obs: Observation, t_ns: int, seq: int, latency_ns: int | None,
         start: int, caps: tuple[Capability, ...]) -> bool:
    """The cheapest function with ``accept``'s signature."""
    return True


class _Session:
    def __init__(self, sid: int) -> None:
        self.id = sid


Timed = Callable[[], float]


def filter_pass(accept: Accept, todo: Sequence[Call], passes: int) -> Timed:
    def run() -> float:
        start = time.perf_counter_ns()
        for _ in range(passes):
            for args in todo:
                accept(*args)
        return (time.perf_counter_ns() - start) / (passes * len(todo))
    return run


def decode_pass(raw: Sequence[Raw], passes: int) -> Timed:
    def run() -> float:
        elapsed = 0
        for _ in range(passes):
            states = {session: SessionState() for session, *_ in raw}
            start = time.perf_counter_ns()
            for session, direction, data, fds, _, _ in raw:
                states[session].observe(direction, data, fds)
            elapsed += time.perf_counter_ns() - start
        return elapsed / (passes * len(raw))
    return run


def line_pass(raw: Sequence[Raw], observations: Sequence[Observation], passes: int) -> Timed:
    sessions = {session: _Session(session) for session, *_ in raw}
    work = [(sessions[r[0]], obs, r[4], r[5]) for r, obs in zip(raw, observations, strict=True)]

    def run() -> float:
        elapsed = 0
        for _ in range(passes):
            log = MessageLog(io.StringIO())
            start = time.perf_counter_ns()
            for session, obs, t_ns, seq in work:
                log(session, obs, t_ns, seq)
            elapsed += time.perf_counter_ns() - start
        return elapsed / (passes * len(work))
    return run


def measure(candidates: dict[str, Timed], reps: int) -> dict[str, float]:
    """Median ns per message of each candidate over ``reps`` rounds (one
    untimed round first; the candidates take turns within a round)."""
    return median_rounds(candidates, reps)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("traces", nargs="*", type=Path, help="default: traces/*.trace")
    parser.add_argument("--reps", type=int, default=21, help="timed repeats (median)")
    parser.add_argument("--passes", type=int, default=5, help="passes over the messages a repeat")
    parser.add_argument("--budget", type=float, default=2000.0,
                        help="ns per message a filter may cost (net)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    paths = args.traces or sorted(TRACES.glob("*.trace"))
    raw = load(paths)
    observations = decode_all(raw)
    todo = calls(raw, observations)
    print(f"{len(raw)} messages from {len(paths)} traces; "
          f"python {platform.python_version()}, {os.cpu_count()} CPUs")
    candidates: dict[str, Timed] = {
        "decode": decode_pass(raw, args.passes),
        "live line": line_pass(raw, observations, args.passes),
        "bare call": filter_pass(bare, todo, args.passes),
    }
    matched: dict[str, int] = {}
    for expr in EXPRESSIONS:
        accept = compile_filter(expr, live=True).on_observations()
        matched[expr] = sum(accept(*call) for call in todo)
        candidates[expr] = filter_pass(accept, todo, args.passes)
    costs = measure(candidates, args.reps)
    base, decode, line = costs["bare call"], costs["decode"], costs["live line"]
    print(f"decode {decode:.0f} ns/message, live line {line:.0f} ns/message, "
          f"bare call {base:.0f} ns")
    print(f"{'expression':<46} {'match':>5} {'ns':>6} {'net ns':>6} {'/decode':>7} {'/line':>6}")
    over = []
    results: dict[str, Any] = {"messages": len(raw), "decode_ns": decode, "live_line_ns": line,
                               "bare_call_ns": base, "filters": {}}
    for expr in EXPRESSIONS:
        cost = costs[expr]
        net = cost - base
        print(f"{expr:<46} {matched[expr]:5d} {cost:6.0f} {net:6.0f} {net / decode:7.2f} "
              f"{net / line:6.2f}")
        results["filters"][expr] = {"ns_per_message": cost, "net_ns": net,
                                    "matched": matched[expr]}
        if net > args.budget:
            over.append(expr)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if over:
        print(f"over the {args.budget:.0f} ns budget: {', '.join(over)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
