"""``vfioproxy experiment`` plots (matplotlib keeps its font files open: no fd check here).

The figures are checked through their matplotlib objects (legend and panel
extents, artist types and styles, failed-setting marks, tick label extents),
not pixels. matplotlib is optional: without it these tests skip, except on
CI (CI=true), which installs the test extra and must run them.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from vfioproxy.experiment import ExperimentConfig, ResultRow, run_experiment
from vfioproxy.experiment.model import CommandLatency, ExperimentResults, summarize
from vfioproxy.experiment.plot import (
    COLOURS,
    FAILED_COLOUR,
    FAILED_LABEL,
    MAX_COMMANDS,
    draw_breakdown,
    draw_experiment,
    have_matplotlib,
)
from vfioproxy.protocol.header import Command

pytestmark = pytest.mark.skipif(
    not have_matplotlib() and not os.environ.get("CI"),
    reason="matplotlib is not installed (pip install 'vfioproxy[plot]')",
)

COMMANDS = [command.name for command in Command][:MAX_COMMANDS]


@pytest.fixture
def plt() -> Iterator[Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot

    yield matplotlib.pyplot
    matplotlib.pyplot.close("all")


def results_of(
    out: Path,
    sweep: str,
    *,
    failed: Sequence[tuple[str, int]] = (),
    latency_ms: tuple[float, float] = (0.1, 0.9),
    command: bool = False,
) -> ExperimentResults:
    """Two runs per setting of ``sweep`` plus a direct baseline, as run_experiment
    would record them: the (setting, run) pairs in ``failed`` failed; the commands'
    latencies spread geometrically over ``latency_ms``."""
    config = ExperimentConfig(out, sweep=sweep, runs=2, direct=True,
                              command=("client", "{socket}") if command else None)
    settings = config.settings()
    low, high = latency_ms
    steps = len(COMMANDS) * len(settings)
    rows = []
    for setting, run in itertools.product(settings, (1, 2)):
        bad = (setting.label, run) in failed
        latency = {}
        for number, name in enumerate(COMMANDS):
            p50 = low * (high / low) ** ((number * len(settings) + setting.index) / steps)
            p99 = min(high, p50 * 1.3)
            latency[name] = CommandLatency(4, p50 / 1000, p99 / 1000, 4 * p50 / 1000)
        rows.append(ResultRow(
            setting=setting.label, setting_index=setting.index, rule=setting.rule,
            value=setting.value, value_s=setting.value_s, run=run, seed=run - 1,
            proxy=setting.proxy, status="error" if bad else "ok",
            error="R4 region info for BAR0: peer replied errno 22 (EINVAL)" if bad else "",
            realize_s=None if bad else 0.004 + 0.001 * setting.index + 0.0001 * run,
            total_s=0.008 + 0.001 * setting.index + 0.0001 * run,
            latency=latency if setting.proxy else {},
        ))
    return ExperimentResults(config, settings, tuple(rows), summarize(settings, rows),
                             out / "results.csv", out / "results.json")


def data_panels(fig: Any) -> list[Any]:
    return [axis for axis in fig.axes if axis.axison]


def series(axis: Any) -> dict[str, Any]:
    """The data lines of a panel by label (no baselines, no failed marks): an
    errorbar's line under its container's label."""
    lines = {container.get_label(): container.lines[0] for container in axis.containers
             if container.lines and container.lines[0] is not None}
    lines.update((line.get_label(), line) for line in axis.get_lines()
                 if not line.get_label().startswith("_") and "direct" not in line.get_label()
                 and not (line.get_gid() or "").startswith("failed:"))
    return lines


def failed_marks(axis: Any) -> dict[str, Any]:
    return {artist.get_gid().removeprefix("failed:"): artist
            for artist in axis.get_children()
            if (artist.get_gid() or "").startswith("failed:")}


def test_legends_sit_outside_the_data_of_every_panel(tmp_path: Path, plt: Any) -> None:
    results = results_of(tmp_path, "c2s * delay fixed({0,50,100,200,500}us)",
                         failed=[("200us", 1)])
    for fig in (draw_experiment(results, plt), draw_breakdown(results, plt)):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        panels = data_panels(fig)
        legends = [axis.get_legend() for axis in fig.axes if axis.get_legend() is not None]
        assert panels and len(legends) == len(panels)
        everything = fig.bbox
        for legend in legends:
            box = legend.get_window_extent(renderer)
            assert not any(box.overlaps(axis.get_window_extent(renderer)) for axis in panels)
            assert everything.contains(box.x0, box.y0) and everything.contains(box.x1, box.y1)
        assert all(axis.get_legend() is None for axis in panels)
    labels = [text.get_text() for text in legends[0].get_texts()]
    assert FAILED_LABEL in labels


def test_a_numeric_sweep_draws_lines_in_value_order(tmp_path: Path, plt: Any) -> None:
    results = results_of(tmp_path, "c2s * delay fixed({500,0,100}us)")
    times, latency = data_panels(draw_experiment(results, plt))
    for axis in (times, latency):
        lines = list(series(axis).values())
        assert lines and all(line.get_linestyle() in ("-", "--") for line in lines)
        assert all(list(line.get_xdata()) == [0.0, 100.0, 500.0] for line in lines)
    assert times.get_xlabel() == "injected value (us)"


@pytest.mark.parametrize(
    "sweep",
    ["c2s DEVICE_RESET error {EIO,EINVAL,ENODEV}",
     "c2s {DEVICE_GET_REGION_INFO,DEVICE_GET_IRQ_INFO} error EINVAL",
     "c2s * delay {fixed(1ms),normal(1ms,100us)}"],  # two values, one mean: no numeric axis
)
def test_a_categorical_sweep_draws_points_and_bars_not_lines(
    tmp_path: Path, plt: Any, sweep: str
) -> None:
    results = results_of(tmp_path, sweep)
    labels = [s.label for s in results.settings if s.proxy]
    times, latency = data_panels(draw_experiment(results, plt))
    for axis in (times, latency):
        lines = list(series(axis).values())
        assert lines and all(line.get_linestyle() == "None" for line in lines)
        assert all(line.get_marker() not in ("", "None", None) for line in lines)
        assert [t.get_text() for t in axis.get_xticklabels()] == labels
    # the commands sit side by side around their setting, not on top of each other
    xs = {line.get_xdata()[0] for line in series(latency).values()}
    assert len(xs) == len(COMMANDS) and all(-0.5 < x < 0.5 for x in xs)
    (breakdown,) = data_panels(draw_breakdown(results, plt))
    assert len(breakdown.patches) == len(COMMANDS) * len(labels)
    assert [t.get_text() for t in breakdown.get_xticklabels()] == labels


def test_failed_settings_are_marked_on_every_panel_with_their_count(
    tmp_path: Path, plt: Any
) -> None:
    failed = [("EIO", 1), ("EIO", 2), ("ENODEV", 2)]
    results = results_of(tmp_path, "c2s DEVICE_RESET error {EIO,EINVAL,ENODEV}", failed=failed)
    figures = [draw_experiment(results, plt), draw_breakdown(results, plt)]
    panels = [axis for fig in figures for axis in data_panels(fig)]
    assert len(panels) == 3
    for axis in panels:
        marks = failed_marks(axis)
        assert sorted(marks) == ["EIO", "ENODEV"]
        assert all(mark.get_facecolor()[:3] == (1.0, 0.0, 0.0) for mark in marks.values())
        counts = [t.get_text() for t in axis.texts if t.get_text().endswith("failed")]
        assert counts == ["2/2 failed", "1/2 failed"]
    times = panels[0]
    # the realize time of EIO is missing (both runs failed), ENODEV keeps its good run
    realize = series(times)["realize time, median (bars: min..max)"]
    assert str(realize.get_ydata()[0]) == "nan" and realize.get_ydata()[2] > 0
    results = results_of(tmp_path, "c2s * delay fixed({0,100}us)", failed=[("100us", 2)])
    times, latency = data_panels(draw_experiment(results, plt))
    for axis in (times, latency):  # a line at the value on a numeric axis
        (mark,) = failed_marks(axis).values()
        assert list(mark.get_xdata()) == [100.0, 100.0] and mark.get_color() == FAILED_COLOUR


@pytest.mark.parametrize("latency_ms", [(0.1, 0.9), (0.05, 20.0), (0.002, 900.0)])
def test_log_tick_labels_never_overlap(
    tmp_path: Path, plt: Any, latency_ms: tuple[float, float]
) -> None:
    results = results_of(tmp_path, "c2s * delay fixed({0,50,100,200,500}us)",
                         latency_ms=latency_ms)
    fig = draw_experiment(results, plt)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    latency = data_panels(fig)[1]
    assert latency.get_yscale() == "log"
    low, high = latency.get_ylim()
    shown = [label for label in latency.get_yticklabels()
             if label.get_text() and low <= label.get_position()[1] <= high]
    assert len(shown) >= 2
    boxes = [label.get_window_extent(renderer) for label in shown]
    assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
    assert not any(label.get_text() for label in latency.get_yticklabels(minor=True))


@pytest.mark.parametrize("command", [False, True])
def test_the_direct_baseline_is_on_the_time_panel_for_each_series(
    tmp_path: Path, plt: Any, command: bool
) -> None:
    results = results_of(tmp_path, "c2s * delay fixed({0,100}us)", command=command)
    times, latency = data_panels(draw_experiment(results, plt))
    baselines = {line.get_label(): line for line in times.get_lines()
                 if "direct" in line.get_label()}
    direct = [r for r in results.rows if not r.proxy]
    expected = {"whole run" if not command else "run time": [r.total_s for r in direct]}
    if not command:
        expected["realize time"] = [r.realize_s for r in direct]
    assert sorted(baselines) == sorted(f"{name}, direct (no proxy)" for name in expected)
    for name, values in expected.items():
        line = baselines[f"{name}, direct (no proxy)"]
        median = sum(v or 0.0 for v in values) / len(values) * 1000  # two runs
        assert list(line.get_ydata()) == pytest.approx([median, median])
    assert not any("direct" in line.get_label() for line in latency.get_lines())


def test_each_command_has_its_own_colour_and_marker(tmp_path: Path, plt: Any) -> None:
    results = results_of(tmp_path, "c2s * delay fixed({0,100}us)")
    fig = draw_experiment(results, plt)
    latency = data_panels(fig)[1]
    styles = {}
    for label, line in series(latency).items():
        command = label.rsplit(" ", 1)[0]
        styles.setdefault(command, set()).add((line.get_color(), line.get_marker()))
    assert sorted(styles) == sorted(COMMANDS)
    assert all(len(pairs) == 1 for pairs in styles.values())  # p50 and p99 alike
    colours = [next(iter(pairs))[0] for pairs in styles.values()]
    markers = [next(iter(pairs))[1] for pairs in styles.values()]
    assert len(set(colours)) == len(set(markers)) == len(COMMANDS) == len(COLOURS)
    assert FAILED_COLOUR not in colours


async def test_plots_are_written_when_matplotlib_is_there(tmp_path: Path) -> None:
    results = await run_experiment(ExperimentConfig(
        tmp_path, sweep="s2c * delay fixed({0,500}us)", runs=1, direct=True))
    assert [p.name for p in results.plots] == ["experiment.png", "breakdown.png"]
    for path in results.plots:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
