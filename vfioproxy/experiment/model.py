"""The data of an experiment: its configuration, one row per run, a summary per setting."""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from vfioproxy.experiment.sweep import Setting, make_settings
from vfioproxy.peers.client import RealizeOptions
from vfioproxy.proxy import ProxyOptions

__all__ = [
    "OUTPUT_NAMES",
    "PLOT_FILES",
    "RESULTS_CSV",
    "RESULTS_JSON",
    "TRACES_DIR",
    "CommandLatency",
    "ExperimentConfig",
    "ExperimentResults",
    "ResultRow",
    "SummaryRow",
]

#: seconds an external command may run by default
DEFAULT_COMMAND_TIMEOUT = 60.0

#: what a run writes into its output directory, and all it writes there
#: (``experiment -o DIR --force`` clears these, and only these, first)
RESULTS_CSV = "results.csv"
RESULTS_JSON = "results.json"
TRACES_DIR = "traces"
PLOT_FILES = ("experiment.png", "breakdown.png")
OUTPUT_NAMES = (RESULTS_CSV, RESULTS_JSON, TRACES_DIR, *PLOT_FILES)


def _tuple_of_str(value: Sequence[str]) -> tuple[str, ...]:
    return tuple(value)


@attrs.frozen
class ExperimentConfig:
    """What to run, how often, and where the results go.

    ``sweep`` is one rule text with one ``{a,b,...}`` group (None: no sweep,
    one setting with the fixed ``rules``); ``rules`` apply in every setting;
    ``runs`` per setting, run ``r`` (1-based) injecting with seed
    ``seed + r - 1`` in every setting (so settings see the same draws);
    ``direct`` adds a no-proxy baseline. ``server``: an existing device
    server socket (None: the reference device, in-process). ``command``: an
    external client's argv template, ``{socket}`` replaced by the socket to
    connect to (None: the built-in realize client with ``realize``).
    ``timeout``: for the built-in client the wait for each reply (None:
    ``realize.reply_timeout``), for a command its whole run (None: 60 s).
    ``plot``: draw PNGs when matplotlib is there.
    """

    output: Path = attrs.field(converter=Path)
    sweep: str | None = None
    rules: tuple[str, ...] = attrs.field(default=(), converter=_tuple_of_str)
    runs: int = attrs.field(default=3, validator=attrs.validators.ge(1))
    seed: int = 0
    direct: bool = False
    server: str | None = None
    command: tuple[str, ...] | None = None
    timeout: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.gt(0))
    )
    realize: RealizeOptions = attrs.field(factory=RealizeOptions)
    proxy_options: ProxyOptions = attrs.field(factory=ProxyOptions)
    plot: bool = True

    def settings(self) -> tuple[Setting, ...]:
        """The expanded settings (raises :class:`SweepError` for a bad sweep or rule)."""
        return make_settings(self.sweep, self.rules, direct=self.direct)

    @property
    def client_timeout(self) -> float:
        if self.timeout is not None:
            return self.timeout
        return DEFAULT_COMMAND_TIMEOUT if self.command is not None else self.realize.reply_timeout

    def to_json(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "sweep": self.sweep,
            "rules": list(self.rules),
            "runs": self.runs,
            "seed": self.seed,
            "direct": self.direct,
            "server": self.server,
            "command": None if self.command is None else list(self.command),
            "timeout": self.client_timeout,
            "realize": None if self.command is not None else _jsonable(attrs.asdict(self.realize)),
        }


def _jsonable(value: Any) -> Any:
    """Enums as their values, anything else unknown as text."""
    return json.loads(json.dumps(value, default=lambda o: getattr(o, "value", str(o))))


@attrs.frozen
class CommandLatency:
    """Request -> reply latency of one command at the proxy, in seconds."""

    count: int
    p50_s: float
    p99_s: float
    total_s: float


@attrs.frozen
class ResultRow:
    """One run of one setting.

    ``status``: ``ok``, ``error`` (the built-in client failed, or a command
    could not start), ``timeout``, or ``exit N`` (a command's exit status).
    ``error``: why a failed run failed, in one line (the built-in client's
    error; a command's first line on stderr, else its exit status).
    ``total_s`` is the run's wall time, up to the failure for failed runs.
    ``trace`` and ``stderr`` are relative to the output directory: the run's
    trace (None for a direct run) and a command's whole stderr (None when it
    wrote nothing there, and for the built-in client). ``messages`` were
    seen by the proxy (by the built-in client for a direct run; None when
    unknown); ``injected`` counts the actions taken from the
    trace's ``inject`` events, ``actions`` per action name, and
    ``injected_delay_s`` sums their delays. ``expected_delay_s``: for delay
    rules on ``*`` commands, messages they matched x the mean delay.
    """

    setting: str
    setting_index: int
    rule: str
    value: str
    value_s: float | None
    run: int
    seed: int
    proxy: bool
    status: str
    error: str = ""
    exit_code: int | None = None
    realize_s: float | None = None
    reset_s: float | None = None
    total_s: float | None = None
    session_s: float | None = None
    messages: int | None = None
    injected: int = 0
    actions: dict[str, int] = attrs.field(factory=dict)
    injected_delay_s: float = 0.0
    expected_delay_s: float | None = None
    expected_turns_delay_s: float | None = None
    latency: dict[str, CommandLatency] = attrs.field(factory=dict)
    trace: str | None = None
    stderr: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class SummaryRow:
    """One setting over its runs (medians; ``added_s`` against the first proxied setting).

    ``expected_added_s`` is the expected delay against that setting's;
    ``ratio`` measured / expected added time (None when nothing is expected);
    ``expected_turns_added_s`` and ``turns_ratio`` the same counting only
    the delayed messages that begin a turn (their sender waited for them).
    """

    setting: str
    rule: str
    runs: int
    ok: int
    statuses: dict[str, int]
    realize_s: float | None
    total_s: float | None
    session_s: float | None
    total_min_s: float | None
    total_max_s: float | None
    added_s: float | None
    expected_added_s: float | None
    ratio: float | None
    expected_turns_added_s: float | None
    turns_ratio: float | None
    messages: float | None
    error: str

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


def _median(values: Sequence[float | int | None]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(settings: Sequence[Setting], rows: Sequence[ResultRow]) -> tuple[SummaryRow, ...]:
    """One :class:`SummaryRow` per setting, in setting order."""
    by_setting = {s.index: [r for r in rows if r.setting_index == s.index] for s in settings}
    base = next((s for s in settings if s.proxy), None)

    def medians(index: int) -> tuple[float | None, ...]:
        runs = by_setting.get(index, [])
        return (
            _median([r.total_s for r in runs]),
            _median([r.session_s for r in runs]),
            _median([r.expected_delay_s for r in runs]),
            _median([r.expected_turns_delay_s for r in runs]),
        )

    def against_base(value: float | None, base_value: float | None) -> float | None:
        return None if value is None or base_value is None else value - base_value

    def ratio_of(added: float | None, expected: float | None) -> float | None:
        if added is None or expected is None or expected <= 0:
            return None
        return added / expected

    base_total, base_session, base_expected, base_turns = (
        medians(base.index) if base is not None else (None, None, None, None)
    )
    summary = []
    for setting in settings:
        runs = by_setting[setting.index]
        total, session, expected, turns = medians(setting.index)
        totals = [r.total_s for r in runs if r.total_s is not None]
        # the session's span at the proxy leaves out what a client does before it
        # connects and after it leaves (a QEMU process starting and exiting)
        if setting.proxy and session is not None and base_session is not None:
            added: float | None = session - base_session
        else:
            added = None if total is None or base_total is None else total - base_total
        expected_added = against_base(expected, base_expected)
        turns_added = against_base(turns, base_turns)
        errors = [r.error for r in runs if r.error]
        summary.append(
            SummaryRow(
                setting=setting.label,
                rule=setting.rule or "; ".join(r.text for r in setting.rules),
                runs=len(runs),
                ok=sum(r.ok for r in runs),
                statuses=dict(Counter(r.status for r in runs)),
                realize_s=_median([r.realize_s for r in runs]),
                total_s=total,
                session_s=session,
                total_min_s=min(totals) if totals else None,
                total_max_s=max(totals) if totals else None,
                added_s=added,
                expected_added_s=expected_added,
                ratio=ratio_of(added, expected_added),
                expected_turns_added_s=turns_added,
                turns_ratio=ratio_of(added, turns_added),
                messages=_median([r.messages for r in runs]),
                error=errors[0] if errors else "",
            )
        )
    return tuple(summary)


_CSV_FIELDS = [
    "setting", "setting_index", "rule", "value", "value_s", "run", "seed", "proxy",
    "status", "exit_code", "error", "realize_s", "reset_s", "total_s", "session_s", "messages",
    "injected", "actions", "injected_delay_s", "expected_delay_s", "expected_turns_delay_s",
    "trace", "stderr",
]


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.9g}" if math.isfinite(value) else str(value)
    return value


@attrs.frozen
class ExperimentResults:
    """What an experiment produced: settings, rows (by setting, then run), summary, files."""

    config: ExperimentConfig
    settings: tuple[Setting, ...]
    rows: tuple[ResultRow, ...]
    summary: tuple[SummaryRow, ...]
    csv_path: Path
    json_path: Path
    plots: tuple[Path, ...] = ()

    def commands(self) -> list[str]:
        """Every command with a latency in some row, sorted."""
        return sorted({name for row in self.rows for name in row.latency})

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config.to_json(),
            "settings": [
                {
                    "index": s.index,
                    "label": s.label,
                    "rule": s.rule,
                    "value": s.value,
                    "value_s": s.value_s,
                    "proxy": s.proxy,
                    "rules": [r.to_text() for r in s.rules],
                }
                for s in self.settings
            ],
            "rows": [row.to_json() for row in self.rows],
            "summary": [row.to_json() for row in self.summary],
        }


def write_csv(path: Path, rows: Sequence[ResultRow], commands: Sequence[str]) -> None:
    """One line per run; per command ``<COMMAND>_p50_s`` and ``<COMMAND>_p99_s``."""
    latency_fields = [f"{c}_{p}_s" for c in commands for p in ("p50", "p99")]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*_CSV_FIELDS, *latency_fields])
        for row in rows:
            data = row.to_json()
            data["actions"] = ";".join(f"{k}:{n}" for k, n in sorted(row.actions.items()))
            cells = [_cell(data[name]) for name in _CSV_FIELDS]
            for command in commands:
                lat = row.latency.get(command)
                cells += ["", ""] if lat is None else [_cell(lat.p50_s), _cell(lat.p99_s)]
            writer.writerow(cells)
    os.replace(tmp, path)


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_finite(data), indent=2, allow_nan=False, default=str) + "\n")
    os.replace(tmp, path)


def _finite(value: Any) -> Any:
    """JSON has no inf/nan: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
