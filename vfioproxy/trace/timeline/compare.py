"""Sessions side by side, aligned by step: each step's duration in every
session and its delta against the first session, the steps present in some
sessions only, and for each session the step that explains most of its
difference to the first.

A session's total is its span (first to last message); a step's duration
runs from its first to its last message; the time *between steps* is the
part of the span no step covers (QEMU's work between steps, and a reply
held back by the proxy: a message's time is when the proxy got it). A step
a session lacks counts as 0 ms in the deltas and is named as absent."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
from rich.table import Table

from vfioproxy.trace.tables import table, table_lines
from vfioproxy.trace.timeline.model import STEP_ORDER, SessionTimeline
from vfioproxy.trace.timeline.table import ms, session_span_ns, session_title, step_name

__all__ = [
    "BETWEEN",
    "Comparison",
    "Explanation",
    "StepComparison",
    "compare",
    "comparison_columns",
    "comparison_lines",
    "comparison_notes",
    "comparison_rows",
]


#: the pseudo-step of the time between steps
BETWEEN = "between steps"


@attrs.frozen
class StepComparison:
    """One step across the sessions: its duration and server share in each
    (None where the session lacks the step)."""

    step: str
    durations_ns: tuple[int | None, ...]
    server_ns: tuple[int | None, ...]

    def delta_ns(self, index: int) -> int:
        """Session ``index``'s duration minus the first session's (absent: 0)."""
        return (self.durations_ns[index] or 0) - (self.durations_ns[0] or 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step, "name": step_name(self.step),
            "durations_ns": list(self.durations_ns), "server_ns": list(self.server_ns),
            "deltas_ns": [self.delta_ns(i) for i in range(len(self.durations_ns))],
        }


@attrs.frozen
class Explanation:
    """Session ``index`` against the first: the difference of their spans,
    the step that explains most of it, the one with the largest delta of the
    same sign (None when neither session has a step), and the delta of the
    time between steps."""

    index: int
    total_delta_ns: int
    step: str | None
    delta_ns: int
    #: the delta of the time between steps (:data:`BETWEEN`)
    between_delta_ns: int

    @property
    def share(self) -> float | None:
        """The step's delta as a fraction of the total difference."""
        return None if self.total_delta_ns == 0 else self.delta_ns / self.total_delta_ns

    @property
    def between_share(self) -> float | None:
        """The between-steps delta as a fraction of the total difference."""
        return None if self.total_delta_ns == 0 else self.between_delta_ns / self.total_delta_ns

    def to_dict(self) -> dict[str, Any]:
        return {"session": self.index, "total_delta_ns": self.total_delta_ns,
                "step": self.step, "delta_ns": self.delta_ns, "share": self.share,
                "between_delta_ns": self.between_delta_ns, "between_share": self.between_share}


@attrs.frozen
class Comparison:
    """The sessions (``timelines``, the first the reference) side by side."""

    timelines: tuple[SessionTimeline, ...]
    steps: tuple[StepComparison, ...]
    #: the time no step covers, as a pseudo-step :data:`BETWEEN`
    between: StepComparison
    explanations: tuple[Explanation, ...]

    def spans_ns(self) -> list[int]:
        return [session_span_ns(t) for t in self.timelines]

    def only_in(self, index: int) -> list[str]:
        """The steps session ``index`` has and some other session lacks."""
        return [s.step for s in self.steps
                if s.durations_ns[index] is not None and None in s.durations_ns]

    def to_dict(self) -> dict[str, Any]:
        return {
            "sessions": [{"trace": t.trace, "session": t.session, "span_ns": span,
                          "only_here": self.only_in(i)}
                         for i, (t, span) in enumerate(zip(self.timelines, self.spans_ns(),
                                                           strict=True))],
            "steps": [s.to_dict() for s in self.steps],
            "between_steps": self.between.to_dict(),
            "explanations": [e.to_dict() for e in self.explanations],
        }


def _covered_ns(timeline: SessionTimeline) -> int:
    """The time some step of ``timeline`` covers (the union of their spans)."""
    covered, end = 0, None
    for first, last in sorted((s.first_ns, s.last_ns) for s in timeline.steps):
        if end is None or first > end:
            covered += last - first
            end = last
        elif last > end:
            covered += last - end
            end = last
    return covered


def _explaining(steps: Sequence[StepComparison], index: int,
                total_ns: int) -> StepComparison | None:
    """The step with the largest delta of the total's sign (any sign when the
    total is 0 or no step has its sign)."""
    same = [s for s in steps if s.delta_ns(index) * total_ns > 0]
    return max(same or steps, key=lambda s: abs(s.delta_ns(index)), default=None)


def compare(timelines: Sequence[SessionTimeline]) -> Comparison:
    """``timelines`` aligned by step, each against the first."""
    steps: list[StepComparison] = []
    extra = [s.step for t in timelines for s in t.steps if s.step not in STEP_ORDER]
    for name in (*STEP_ORDER, *dict.fromkeys(extra)):
        found = [t.step(name) for t in timelines]
        if any(s is not None for s in found):
            steps.append(StepComparison(
                name,
                tuple(None if s is None else s.duration_ns for s in found),
                tuple(None if s is None else s.server_ns for s in found),
            ))
    spans = [session_span_ns(t) for t in timelines]
    between = StepComparison(
        BETWEEN, tuple(span - _covered_ns(t) for span, t in zip(spans, timelines, strict=True)),
        tuple(None for _ in timelines),
    )
    explanations = []
    for index in range(1, len(timelines)):
        biggest = _explaining(steps, index, spans[index] - spans[0])
        explanations.append(Explanation(
            index, spans[index] - spans[0], None if biggest is None else biggest.step,
            0 if biggest is None else biggest.delta_ns(index), between.delta_ns(index),
        ))
    return Comparison(tuple(timelines), tuple(steps), between, tuple(explanations))


def _signed_ms(ns: int) -> str:
    return ("+" if ns >= 0 else "") + ms(ns)


def comparison_columns(comparison: Comparison) -> list[str]:
    """step, QEMU step, ``#1 ms``, then ``#i ms`` and ``Δ#i ms`` per later session."""
    columns = ["step", "QEMU step", "#1 ms"]
    for index in range(2, len(comparison.timelines) + 1):
        columns += [f"#{index} ms", f"Δ#{index} ms"]
    return columns


def comparison_rows(comparison: Comparison) -> list[list[str]]:
    """A row per step (``absent`` where a session lacks it), the time between
    steps, then the totals."""
    rows = []
    for step in (*comparison.steps, comparison.between):
        first = step.durations_ns[0]
        name = "in no step" if step is comparison.between else step_name(step.step)
        row = [step.step, name, "absent" if first is None else ms(first)]
        for index in range(1, len(comparison.timelines)):
            duration = step.durations_ns[index]
            row += ["absent" if duration is None else ms(duration),
                    _signed_ms(step.delta_ns(index))]
        rows.append(row)
    spans = comparison.spans_ns()
    total = ["total", "first to last message", ms(spans[0])]
    for index in range(1, len(spans)):
        total += [ms(spans[index]), _signed_ms(spans[index] - spans[0])]
    rows.append(total)
    return rows


def comparison_notes(comparison: Comparison) -> list[str]:
    """Which session is which, the steps only some sessions have, and the
    step that explains most of each difference."""
    notes = [f"#{i}: {session_title(t)}" for i, t in enumerate(comparison.timelines, 1)]
    for index in range(len(comparison.timelines)):
        only = comparison.only_in(index)
        if only:
            notes.append(f"steps #{index + 1} has and another session lacks: {', '.join(only)}")
    for e in comparison.explanations:
        head = f"#{e.index + 1} vs #1: {_signed_ms(e.total_delta_ns)} ms in total"
        between = f"between steps {_signed_ms(e.between_delta_ns)} ms{_share(e.between_share)}"
        if e.step is None:
            notes.append(f"{head}; no step to compare; {between}")
            continue
        name = step_name(e.step)
        notes.append(f"{head}; the step explaining most of it is {e.step}"
                     + (f" ({name})" if name else "")
                     + f": {_signed_ms(e.delta_ns)} ms{_share(e.share)}; {between}")
    return notes


def _share(share: float | None) -> str:
    return "" if share is None else f" ({share:.0%})"


def comparison_table(comparison: Comparison) -> Table:
    return table("side by side (durations, Δ against #1)", comparison_columns(comparison),
                 comparison_rows(comparison), left=2)


def comparison_lines(comparison: Comparison) -> list[str]:
    """The side-by-side table as text lines, its notes under it."""
    return [*table_lines([comparison_table(comparison)]), *comparison_notes(comparison)]
