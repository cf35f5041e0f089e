"""Plots of an experiment (matplotlib, optional: ``pip install 'vfioproxy[plot]'``).

Settings are on the x axis: at their values when every setting has a
distinct value in seconds (a delay or stall sweep: lines), else one
position each in sweep order (commands, errnos, rule texts: points, no
lines; the commands of the latency panel side by side around each
setting). A setting with a failed run is shaded red on every panel (a red
dotted line on a numeric axis), its count of failed runs above the panel.
The direct (no proxy) baseline is a dashed line in the colour of the
series it is the baseline of, on the panel of run times (the per-command
panels have none: without the proxy nothing measures commands). Legends
sit in a row of their own under the panels, outside the data.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from vfioproxy.experiment.model import PLOT_FILES, ExperimentResults, ResultRow
from vfioproxy.experiment.sweep import Setting

__all__ = [
    "FAILED_LABEL",
    "PLOT_HINT",
    "draw_breakdown",
    "draw_experiment",
    "have_matplotlib",
    "write_plots",
]

PLOT_HINT = "plots need matplotlib: pip install 'vfioproxy[plot]'"
#: commands drawn in the latency panel (the busiest ones)
MAX_COMMANDS = 8
#: one colour and one marker per command series (red is kept for failures, grey
#: for the p50/p99 key)
COLOURS = ("C0", "C1", "C2", "C4", "C5", "C6", "C8", "C9")
MARKERS = ("o", "s", "^", "D", "v", "P", "*", "h")
#: bar hatches, one per round through the colours (breakdown with many commands)
HATCHES = ("", "//", "..", "xx")
FAILED_COLOUR = "red"
#: legend label of the failed-setting marks (each mark's gid is ``failed:<setting>``)
FAILED_LABEL = "setting with failed runs (count above)"
#: width of the spread of the command points around a categorical setting
DODGE = 0.5
#: the direct baseline's line style
BASELINE_STYLE = (0, (5, 3))


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is missing."""
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        return None
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def have_matplotlib() -> bool:
    """Whether plots can be drawn."""
    return importlib.util.find_spec("matplotlib") is not None


def _ms(value: float | None) -> float:
    return float("nan") if value is None else value * 1000


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


@attrs.frozen
class _Axis:
    """Where the proxied settings go on the x axis."""

    settings: tuple[Setting, ...]
    xs: tuple[float, ...]
    #: tick labels: None on a numeric axis
    labels: tuple[str, ...] | None
    title: str

    @property
    def categorical(self) -> bool:
        return self.labels is not None

    @property
    def linestyle(self) -> str:
        """Lines join the points of a numeric sweep only."""
        return "none" if self.categorical else "-"


def _x_axis(settings: Sequence[Setting]) -> _Axis:
    """Numeric (sorted by value) when every setting has its own value in seconds,
    else categorical in sweep order."""
    seconds = [s.value_s for s in settings]
    values = [v for v in seconds if v is not None]
    if settings and len(values) == len(settings) and len(set(values)) == len(values):
        scale, unit = (1e6, "us") if max(values) < 1e-3 else (1e3, "ms")
        ordered = sorted(settings, key=lambda s: s.value_s or 0.0)
        xs = tuple((s.value_s or 0.0) * scale for s in ordered)
        return _Axis(tuple(ordered), xs, None, f"injected value ({unit})")
    labels = tuple(s.label for s in settings)
    return _Axis(tuple(settings), tuple(float(i) for i in range(len(settings))), labels, "setting")


def _time(row: ResultRow, builtin: bool) -> float | None:
    return row.realize_s if builtin else row.total_s


def _failed(rows: Sequence[ResultRow]) -> int:
    return sum(not row.ok for row in rows)


def _mark_failed(axis: Any, x: _Axis, rows_of: dict[int, list[ResultRow]]) -> list[Any]:
    """Shade each setting with a failed run (a dotted line on a numeric axis), its
    count (``2/3 failed``) above the panel; the legend handle, if any."""
    marks = [
        (position, setting, _failed(rows_of[setting.index]), len(rows_of[setting.index]))
        for position, setting in zip(x.xs, x.settings, strict=True)
        if _failed(rows_of[setting.index])
    ]
    if not marks:
        return []
    top = axis.get_xaxis_transform()  # x in data, y in the panel's height
    for position, setting, failed, runs in marks:
        if x.categorical:
            axis.axvspan(position - 0.45, position + 0.45, color=FAILED_COLOUR, alpha=0.12,
                         linewidth=0, zorder=0, gid=f"failed:{setting.label}")
        else:
            axis.axvline(position, color=FAILED_COLOUR, linestyle=":", linewidth=1.5,
                         zorder=0, gid=f"failed:{setting.label}")
        axis.annotate(f"{failed}/{runs} failed", (position, 1.0), xycoords=top,
                      xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                      fontsize="x-small", color=FAILED_COLOUR)
    patches = importlib.import_module("matplotlib.patches")
    return [patches.Patch(facecolor=FAILED_COLOUR, alpha=0.25, edgecolor=FAILED_COLOUR,
                          label=FAILED_LABEL)]


def _legend(key: Any, handles: Sequence[Any], ncol: int) -> None:
    """The legend in its own (axis-less) panel under the data."""
    key.axis("off")
    if handles:
        key.legend(handles=list(handles), loc="upper center", ncol=ncol, fontsize="small",
                   frameon=False)


def _log_ticks(axis: Any, values: Sequence[float]) -> None:
    """Labelled ticks of a log y axis that never crowd: 1-2-5 per decade over a
    short range, 1-3 over a longer one, decades beyond; minor ticks unlabelled."""
    ticker = importlib.import_module("matplotlib.ticker")
    finite = [v for v in values if math.isfinite(v) and v > 0]
    decades = math.log10(max(finite) / min(finite)) if finite else 0.0
    subs = (1.0, 2.0, 5.0) if decades <= 1.5 else (1.0, 3.0) if decades <= 3 else (1.0,)
    axis.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=subs))
    axis.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    axis.yaxis.set_minor_formatter(ticker.NullFormatter())


def _categorical_ticks(axis: Any, x: _Axis) -> None:
    if x.labels is not None:
        axis.set_xticks(x.xs, x.labels, rotation=20, ha="right", fontsize="small")
        axis.set_xlim(min(x.xs) - 0.5, max(x.xs) + 0.5)


def _figure(plt: Any, panels: Sequence[str], width: float) -> tuple[Any, dict[str, Any]]:
    """A figure with the named panels side by side, each with a legend panel under it."""
    fig, axes = plt.subplot_mosaic(
        [list(panels), [f"{name} key" for name in panels]],
        height_ratios=[4, 1.1], figsize=(width, 6.6), layout="constrained",
    )
    return fig, axes


def _title(axis: Any, text: str, marked: bool) -> None:
    # room above the panel for the failed counts
    axis.set_title(text, pad=16 if marked else 6)


def draw_experiment(results: ExperimentResults, plt: Any) -> Any:
    """The figure of ``experiment.png``: run time (and the direct baseline) and
    per-command p50/p99 latency at the proxy against the setting."""
    builtin = results.config.command is None
    x = _x_axis([s for s in results.settings if s.proxy])
    direct = [r for r in results.rows if not r.proxy]
    rows_of = {s.index: [r for r in results.rows if r.setting_index == s.index]
               for s in x.settings}
    fig, panels = _figure(plt, ("times", "latency"), 13)
    left, right = panels["times"], panels["latency"]

    what = "realize time" if builtin else "run time"

    def measured(row: ResultRow) -> float | None:
        return _time(row, builtin)

    def whole(row: ResultRow) -> float | None:
        return row.total_s

    series: list[tuple[str, Callable[[ResultRow], float | None], str, str]] = [
        (what, measured, "o", "C0")]
    if builtin:
        series.append(("whole run", whole, "s", "C1"))
    for name, value_of, marker, colour in series:
        medians, low, high = [], [], []
        for setting in x.settings:
            times = [t for r in rows_of[setting.index] if (t := value_of(r)) is not None]
            m = _median(times)
            medians.append(_ms(m))
            low.append(0.0 if m is None else _ms(m) - _ms(min(times)))
            high.append(0.0 if m is None else _ms(max(times)) - _ms(m))
        left.errorbar(x.xs, medians, yerr=[low, high], marker=marker, color=colour,
                      linestyle=x.linestyle, capsize=4,
                      label=f"{name}, median (bars: min..max)")
        baseline = _median([t for r in direct if (t := value_of(r)) is not None])
        if baseline is not None:
            left.axhline(_ms(baseline), color=colour, linestyle=BASELINE_STYLE, linewidth=1.2,
                         label=f"{name}, direct (no proxy)")
    left.set_ylim(bottom=0)
    left.set_xlabel(x.title)
    left.set_ylabel("ms")
    failed = _mark_failed(left, x, rows_of)
    _title(left, f"{what} vs setting", bool(failed))
    _categorical_ticks(left, x)
    handles, _ = left.get_legend_handles_labels()
    _legend(panels["times key"], [*handles, *failed], ncol=2)

    busiest = sorted(
        {c for r in results.rows for c in r.latency},
        key=lambda c: -sum(r.latency[c].count for r in results.rows if c in r.latency),
    )[:MAX_COMMANDS]
    line2d = importlib.import_module("matplotlib.lines").Line2D
    handles = []
    drawn: list[float] = []
    for number, command in enumerate(sorted(busiest)):
        colour, marker = COLOURS[number % len(COLOURS)], MARKERS[number % len(MARKERS)]
        xs = list(x.xs)
        if x.categorical and len(busiest) > 1:  # side by side around the setting
            shift = DODGE * (number / (len(busiest) - 1) - 0.5)
            xs = [position + shift for position in xs]
        for pct, style, face in (("p50", "-", colour), ("p99", "--", "white")):
            ys = []
            for setting in x.settings:
                values = [
                    getattr(r.latency[command], f"{pct}_s")
                    for r in rows_of[setting.index]
                    if command in r.latency
                ]
                ys.append(_ms(_median(values)))
            drawn += ys
            right.plot(xs, ys, linestyle="none" if x.categorical else style, marker=marker,
                       markerfacecolor=face, color=colour, label=f"{command} {pct}")
        handles.append(line2d([], [], color=colour, marker=marker,
                              linestyle=x.linestyle, label=command))
    if busiest:
        handles += [
            line2d([], [], color="grey", marker="o", linestyle=x.linestyle, label="p50 (filled)"),
            line2d([], [], color="grey", marker="o", markerfacecolor="white",
                   linestyle="none" if x.categorical else "--", label="p99 (hollow)"),
        ]
    right.set_xlabel(x.title)
    right.set_ylabel("request -> reply latency at the proxy (ms)")
    right.set_yscale("log")
    _log_ticks(right, drawn)
    failed = _mark_failed(right, x, rows_of)
    _title(right, "per-command latency at the proxy", bool(failed))
    _categorical_ticks(right, x)
    _legend(panels["latency key"], [*handles, *failed], ncol=3)
    fig.suptitle(results.config.sweep or "; ".join(results.config.rules) or "proxy")
    return fig


def draw_breakdown(results: ExperimentResults, plt: Any) -> Any:
    """The figure of ``breakdown.png``: per setting, the median time each command
    waited for its replies, stacked (one bar per setting)."""
    proxied = [s for s in results.settings if s.proxy]
    x = _Axis(tuple(proxied), tuple(float(i) for i in range(len(proxied))),
              tuple(s.label for s in proxied), "setting")
    rows_of = {s.index: [r for r in results.rows if r.setting_index == s.index] for s in proxied}
    fig, panels = _figure(plt, ("breakdown",), max(6.0, 1.2 * len(proxied) + 3))
    axis = panels["breakdown"]
    commands = sorted({c for r in results.rows for c in r.latency})
    bottom = [0.0] * len(proxied)
    for number, command in enumerate(commands):
        heights = []
        for setting in proxied:
            totals = [
                r.latency[command].total_s for r in rows_of[setting.index] if command in r.latency
            ]
            heights.append(_ms(_median(totals)) if totals else 0.0)
        axis.bar(x.xs, heights, bottom=bottom, label=command,
                 color=COLOURS[number % len(COLOURS)],
                 hatch=HATCHES[(number // len(COLOURS)) % len(HATCHES)])
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    _categorical_ticks(axis, x)
    axis.set_ylabel("time waiting for replies, median per run (ms)")
    failed = _mark_failed(axis, x, rows_of)
    _title(axis, "per-command breakdown of request -> reply time", bool(failed))
    handles, _ = axis.get_legend_handles_labels()
    _legend(panels["breakdown key"], [*handles, *failed], ncol=3)
    return fig


def write_plots(results: ExperimentResults) -> tuple[Path, ...]:
    """``experiment.png`` (:func:`draw_experiment`) and ``breakdown.png``
    (:func:`draw_breakdown`) in the output directory; () without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return ()
    paths = []
    for name, draw in zip(PLOT_FILES, (draw_experiment, draw_breakdown), strict=True):
        fig = draw(results, plt)
        path = results.config.output / name
        try:
            fig.savefig(path, dpi=110)
        finally:
            plt.close(fig)
        paths.append(path)
    return tuple(paths)
