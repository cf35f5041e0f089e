"""Plots of an experiment (matplotlib, optional: ``pip install 'vfioproxy[plot]'``)."""

from __future__ import annotations

import importlib
import importlib.util
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vfioproxy.experiment.model import PLOT_FILES, ExperimentResults, ResultRow
from vfioproxy.experiment.sweep import Setting

__all__ = ["PLOT_HINT", "have_matplotlib", "write_plots"]

PLOT_HINT = "plots need matplotlib: pip install 'vfioproxy[plot]'"
#: commands drawn in the latency panel (the busiest ones)
MAX_COMMANDS = 8


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


def _x_axis(settings: Sequence[Setting]) -> tuple[list[float], list[str] | None, str]:
    """x positions, tick labels (None: numeric axis) and the axis label."""
    seconds = [s.value_s for s in settings]
    if settings and all(v is not None for v in seconds):
        scale, unit = (1e6, "us") if max(v or 0.0 for v in seconds) < 1e-3 else (1e3, "ms")
        return [(v or 0.0) * scale for v in seconds], None, f"injected value ({unit})"
    return [float(i) for i in range(len(settings))], [s.label for s in settings], "setting"


def _time(row: ResultRow, builtin: bool) -> float | None:
    return row.realize_s if builtin else row.total_s


def write_plots(results: ExperimentResults) -> tuple[Path, ...]:
    """``experiment.png`` (time and per-command p50/p99 vs the injected value) and
    ``breakdown.png`` (time per command and setting); () without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return ()
    out = results.config.output
    builtin = results.config.command is None
    proxied = [s for s in results.settings if s.proxy]
    direct = next((s for s in results.settings if not s.proxy), None)
    xs, labels, xlabel = _x_axis(proxied)
    rows_of = {s.index: [r for r in results.rows if r.setting_index == s.index] for s in proxied}

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    what = "realize time" if builtin else "run time"
    medians, low, high = [], [], []
    for setting in proxied:
        times = [t for r in rows_of[setting.index] if (t := _time(r, builtin)) is not None]
        m = _median(times)
        medians.append(_ms(m))
        low.append(0.0 if m is None else _ms(m) - _ms(min(times)))
        high.append(0.0 if m is None else _ms(max(times)) - _ms(m))
    left.errorbar(xs, medians, yerr=[low, high], marker="o", capsize=4,
                  label=f"{what}, median (bars: min..max)")
    if builtin:
        totals = [
            _ms(_median([r.total_s for r in rows_of[s.index] if r.total_s is not None]))
            for s in proxied
        ]
        left.plot(xs, totals, marker="s", linestyle=":", label="whole run, median")
    if direct is not None:
        times = [t for r in results.rows if not r.proxy if (t := _time(r, builtin)) is not None]
        if times:
            left.axhline(_ms(_median(times)), color="grey", linestyle="--",
                         label="direct (no proxy)")
    left.set_xlabel(xlabel)
    left.set_ylabel("ms")
    left.set_title(f"{what} vs injected value")
    left.legend(fontsize="small")

    busiest = sorted(
        {c for r in results.rows for c in r.latency},
        key=lambda c: -sum(r.latency[c].count for r in results.rows if c in r.latency),
    )[:MAX_COMMANDS]
    for number, command in enumerate(sorted(busiest)):
        color = f"C{number % 10}"
        for pct, style in (("p50", "-"), ("p99", "--")):
            ys = []
            for setting in proxied:
                values = [
                    getattr(r.latency[command], f"{pct}_s")
                    for r in rows_of[setting.index]
                    if command in r.latency
                ]
                ys.append(_ms(_median(values)))
            right.plot(xs, ys, linestyle=style, marker=".", color=color,
                       label=f"{command} {pct}")
    right.set_xlabel(xlabel)
    right.set_ylabel("request -> reply latency at the proxy (ms)")
    right.set_yscale("log")
    ticker = importlib.import_module("matplotlib.ticker")
    right.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    right.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%g"))
    right.set_title("per-command latency (solid p50, dashed p99)")
    if busiest:
        right.legend(fontsize="x-small", ncol=2)
    if labels is not None:
        for axis in (left, right):
            axis.set_xticks(xs, labels, rotation=20, ha="right", fontsize="small")
    title = results.config.sweep or "; ".join(results.config.rules) or "proxy"
    fig.suptitle(title)
    fig.tight_layout()
    main = out / PLOT_FILES[0]
    fig.savefig(main, dpi=110)
    plt.close(fig)

    fig, axis = plt.subplots(figsize=(max(6.0, 1.2 * len(proxied) + 3), 5))
    commands = sorted({c for r in results.rows for c in r.latency})
    positions = list(range(len(proxied)))
    bottom = [0.0] * len(proxied)
    for number, command in enumerate(commands):
        heights = []
        for setting in proxied:
            totals = [
                r.latency[command].total_s for r in rows_of[setting.index] if command in r.latency
            ]
            heights.append(_ms(_median(totals)) if totals else 0.0)
        axis.bar(positions, heights, bottom=bottom, label=command,
                 color=f"C{number % 10}", hatch="" if number < 10 else "//")
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    axis.set_xticks(positions, [s.label for s in proxied], rotation=20, ha="right")
    axis.set_ylabel("time waiting for replies, median per run (ms)")
    axis.set_title("per-command breakdown of request -> reply time")
    if commands:
        axis.legend(fontsize="x-small", ncol=2, loc="upper left")
    fig.tight_layout()
    breakdown = out / PLOT_FILES[1]
    fig.savefig(breakdown, dpi=110)
    plt.close(fig)
    return (main, breakdown)
