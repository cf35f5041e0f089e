"""One session's timeline as a table: a row per step (its QEMU step name,
messages, first time, duration, the server's and the client's share, bytes,
ROM throughput), with the unlabelled count and a cut-short note under it.

The cells are text, shared by the terminal table (rich) and the HTML view.
Times are milliseconds from the session's first message."""

from __future__ import annotations

from rich.table import Table

from vfioproxy.trace.tables import table, table_lines
from vfioproxy.trace.timeline.model import SessionTimeline, StepTimes
from vfioproxy.trace.timeline.steps import STEP_INFO

__all__ = [
    "STEP_COLUMNS",
    "ms",
    "session_lines",
    "session_notes",
    "session_span_ns",
    "session_start_ns",
    "session_title",
    "step_name",
    "step_rows",
    "step_table",
]

STEP_COLUMNS = ("step", "QEMU step", "msgs", "first ms", "duration ms", "server ms",
                "client ms", "bytes", "ROM MB/s")


def ms(ns: int) -> str:
    """``ns`` as milliseconds, three decimals (microseconds)."""
    return f"{ns / 1e6:.3f}"


def step_name(step: str) -> str:
    """The QEMU step behind ``step`` (``config copy``), empty if it has none."""
    info = STEP_INFO.get(step)
    return info.name if info is not None else ""


def session_start_ns(timeline: SessionTimeline) -> int:
    """The earliest time of the session's messages (0 for an empty one; the
    record times of the two directions need not be in trace order)."""
    return min((m.t_ns for m in timeline.messages), default=0)


def session_span_ns(timeline: SessionTimeline) -> int:
    """From the session's earliest message to its latest."""
    return max((m.t_ns for m in timeline.messages), default=0) - session_start_ns(timeline)


def session_title(timeline: SessionTimeline) -> str:
    """``TRACE session N``."""
    return f"{timeline.trace} session {timeline.session}"


def _step_label(step: StepTimes) -> str:
    """The step, with ``?`` (and how many) when some of its labels are uncertain."""
    return f"{step.step}? ({step.uncertain})" if step.uncertain else step.step


def _throughput(step: StepTimes) -> str:
    rate = step.rom_throughput
    return "" if rate is None else f"{rate / 1e6:.1f}"


def step_rows(timeline: SessionTimeline) -> list[list[str]]:
    """A row of :data:`STEP_COLUMNS` per step of ``timeline``, in step order."""
    start = session_start_ns(timeline)
    return [
        [_step_label(s), step_name(s.step), str(s.messages), ms(s.first_ns - start),
         ms(s.duration_ns), ms(s.server_ns), ms(s.client_ns), str(s.bytes), _throughput(s)]
        for s in timeline.steps
    ]


def session_notes(timeline: SessionTimeline) -> list[str]:
    """What the table does not show: unlabelled messages, uncertain labels, a
    trace that ends inside the session."""
    notes = [f"{len(timeline.messages)} messages, "
             f"{timeline.unlabelled} unlabelled"
             + (" (the reason of each is in --json: label.reason)" if timeline.unlabelled
                else "")]
    uncertain = sum(s.uncertain for s in timeline.steps)
    if uncertain:
        notes.append(f"{uncertain} labels the wire alone cannot decide (shown with ?; "
                     "the reason is in --json)")
    if timeline.cut_short:
        notes.append("cut short: the trace ends inside this session; labelled up to its "
                     "last message")
    return notes


def step_table(timeline: SessionTimeline) -> Table:
    """The rich table of ``timeline``'s steps, titled with its trace and session."""
    return table(session_title(timeline), STEP_COLUMNS, step_rows(timeline), left=2)


def session_lines(timeline: SessionTimeline) -> list[str]:
    """``timeline``'s table as text lines, its notes under it."""
    return [*table_lines([step_table(timeline)]), *session_notes(timeline)]
