"""Timing several candidates fairly: rounds in which each takes its turn.

Shared by the per-call cost benchmarks (``inject_cost.py``, ``filter_cost.py``):
every round times one repeat of each candidate in turn, so that a burst of
load elsewhere on the machine spreads over all of them; one untimed repeat
of each comes first, and the garbage collector is off while timing.
"""

from __future__ import annotations

import gc
import statistics
from collections.abc import Callable


def median_rounds(candidates: dict[str, Callable[[], float]], reps: int) -> dict[str, float]:
    """The median of ``reps`` rounds of each candidate's own figure (what one
    call of it returns, e.g. ns per message)."""
    for run in candidates.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    gc.collect()
    gc.disable()
    try:
        for _ in range(reps):
            for name, run in candidates.items():
                times[name].append(run())
    finally:
        gc.enable()
    return {name: statistics.median(values) for name, values in times.items()}
