"""``vfioproxy experiment``: sweeps of injected faults, run and measured through the proxy.

:func:`run_experiment` runs a client (the built-in realize client or an
external command) ``runs`` times per setting of a sweep through a recording
proxy that injects the setting's rules, and returns an
:class:`ExperimentResults` (also written as CSV, JSON and plots).
"""

from vfioproxy.experiment.analysis import TraceFacts, analyse_trace, expected_delay
from vfioproxy.experiment.errors import ExperimentError, SweepError
from vfioproxy.experiment.model import (
    CommandLatency,
    ExperimentConfig,
    ExperimentResults,
    ResultRow,
    SummaryRow,
)
from vfioproxy.experiment.plot import write_plots
from vfioproxy.experiment.runner import Progress, run_experiment
from vfioproxy.experiment.sweep import Setting, expand_sweep, make_settings, parse_rules

__all__ = [
    "CommandLatency",
    "ExperimentConfig",
    "ExperimentError",
    "ExperimentResults",
    "Progress",
    "ResultRow",
    "Setting",
    "SummaryRow",
    "SweepError",
    "TraceFacts",
    "analyse_trace",
    "expand_sweep",
    "expected_delay",
    "make_settings",
    "parse_rules",
    "run_experiment",
    "write_plots",
]
