"""The timeline as a PNG (matplotlib, optional: ``pip install 'vfioproxy[plot]'``).

One panel per session, one lane per step (in step order, top down), each
message a tick at its time (milliseconds from the session's first message),
and the time a request of the step was outstanding at the server shaded
behind the ticks: what is shaded is the server's share, the gaps between
shades the client's."""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Sequence
from typing import Any

from vfioproxy.errors import UsageError
from vfioproxy.trace.timeline.model import SessionTimeline
from vfioproxy.trace.timeline.spans import server_spans
from vfioproxy.trace.timeline.table import session_start_ns, session_title, step_name

__all__ = ["PNG_HINT", "draw_timelines", "have_matplotlib", "write_png"]

PNG_HINT = "--png needs matplotlib: pip install 'vfioproxy[plot]'"
#: height of one lane, inches
LANE_INCHES = 0.28
#: a tick's height, as a fraction of the lane
TICK_HEIGHT = 0.7


def have_matplotlib() -> bool:
    """Whether the PNG can be drawn."""
    return importlib.util.find_spec("matplotlib") is not None


def _pyplot() -> Any:
    matplotlib = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def _draw_session(axes: Any, timeline: SessionTimeline) -> None:
    lanes = [s.step for s in timeline.steps]
    lane_of = {step: i for i, step in enumerate(lanes)}
    start = session_start_ns(timeline)
    for span in server_spans(timeline.messages):
        lane = lane_of.get(span.step)
        if lane is not None:
            axes.broken_barh([((span.start_ns - start) / 1e6, (span.end_ns - span.start_ns) / 1e6)],
                             (lane - 0.45, 0.9), facecolors="C1", alpha=0.35, linewidth=0,
                             gid=f"server:{span.step}")
    for lane, step in enumerate(lanes):
        times = [(m.t_ns - start) / 1e6 for m in timeline.messages if m.label.step == step]
        axes.vlines(times, lane - TICK_HEIGHT / 2, lane + TICK_HEIGHT / 2, colors="C0",
                    linewidth=0.8, gid=f"ticks:{step}")
    axes.set_yticks(range(len(lanes)))
    axes.set_yticklabels([f"{s}  {step_name(s)}" for s in lanes], fontsize=7)
    axes.set_ylim(len(lanes) - 0.5, -0.5)
    axes.set_title(session_title(timeline) + (" (cut short)" if timeline.cut_short else ""),
                   fontsize=9, loc="left")
    axes.grid(axis="x", linewidth=0.3)


def draw_timelines(timelines: Sequence[SessionTimeline]) -> Any:
    """The matplotlib figure of ``timelines`` (one panel each)."""
    pyplot = _pyplot()
    heights = [max(len(t.steps), 1) for t in timelines]
    figure, panels = pyplot.subplots(
        len(timelines), 1, squeeze=False, figsize=(11, 1.2 + LANE_INCHES * sum(heights)
                                                   + 0.6 * len(timelines)),
        gridspec_kw={"height_ratios": heights},
    )
    for axes, timeline in zip(panels[:, 0], timelines, strict=True):
        _draw_session(axes, timeline)
    panels[-1, 0].set_xlabel("ms from the session's first message "
                             "(ticks: messages; shaded: a request outstanding at the server)")
    figure.tight_layout()
    return figure


def write_png(timelines: Sequence[SessionTimeline], path: str | os.PathLike[str]) -> None:
    """Draw ``timelines`` into the PNG ``path``; :class:`UsageError` without matplotlib."""
    if not have_matplotlib():
        raise UsageError(PNG_HINT)
    figure = draw_timelines(timelines)
    try:
        figure.savefig(path, dpi=120)
    finally:
        _pyplot().close(figure)
