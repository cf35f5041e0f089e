"""``vfioproxy experiment``: the command line over :func:`run_experiment`."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

import trio

from vfioproxy.experiment.errors import ExperimentError
from vfioproxy.experiment.model import OUTPUT_NAMES, TRACES_DIR, ExperimentConfig
from vfioproxy.experiment.plot import PLOT_HINT
from vfioproxy.experiment.report import print_summary, progress_display
from vfioproxy.experiment.runner import run_experiment
from vfioproxy.peers.client import RealizeOptions
from vfioproxy.usage.output import claim_directory
from vfioproxy.usage.types import integer, seconds

__all__ = ["add_experiment_command", "cmd_experiment", "config_from_args"]

EPILOG = """\
examples:
  vfioproxy experiment --sweep 'c2s * delay fixed({0,50,100,200,500}us)' --runs 5 -o results/
  vfioproxy experiment --sweep 'c2s {DEVICE_GET_REGION_INFO,DEVICE_GET_IRQ_INFO} error EINVAL' \\
      --runs 1 -o faults/
  vfioproxy experiment --rule 's2c DEVICE_SET_IRQS drop' --timeout 0.5 -o drop/
  vfioproxy experiment --sweep 's2c * delay fixed({0,1}ms)' --server /tmp/device.sock \\
      --command 'qemu-system-x86_64 ... "path":"{socket}" ...' --timeout 30 -o qemu/

Each run goes through a recording proxy that injects the setting's rules
(the swept rule, then every --rule); traces go to DIR/traces/, the results
to DIR/results.csv and DIR/results.json, plots to DIR/*.png. A DIR that
holds an earlier run's results is refused; --force removes them (and
nothing else in DIR) first.
"""


def add_experiment_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``experiment`` to a ``vfioproxy`` sub-command set (``add_subparsers()``)."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "experiment",
        help="run a client N times per setting of an injection sweep; tables and plots",
        description="Run a client N times through the injecting, recording proxy for "
        "every setting of a sweep, and report times, statuses and per-command latency.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--sweep", metavar="RULE",
                   help="a rule with one {a,b,...} group: one setting per value")
    p.add_argument("--rule", action="append", default=[], metavar="RULE", dest="rules",
                   help="a rule applied in every setting (repeatable)")
    p.add_argument("--runs", type=integer(1), default=3, metavar="N",
                   help="runs per setting (3)")
    p.add_argument("--seed", type=integer(), default=0, metavar="N",
                   help="seed of run 1 (run r uses SEED+r-1 in every setting)")
    p.add_argument("--direct", action="store_true",
                   help="add a baseline setting without the proxy")
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="output directory (created if missing)")
    p.add_argument("--force", action="store_true",
                   help="replace the results of an earlier run in DIR")
    p.add_argument("--server", metavar="SOCK",
                   help="an existing device server (default: the reference device, in-process)")
    p.add_argument("--command", metavar="TEMPLATE",
                   help="an external client per run (split like a shell would, not run by one); "
                   "{socket} becomes the socket to connect to")
    p.add_argument("--timeout", type=seconds(), metavar="SECONDS",
                   help="built-in client: seconds per reply (5); --command: per run (60)")
    p.add_argument("--workload", type=integer(0), default=0, metavar="N",
                   help="built-in client: doorbells to ring after realize")
    p.add_argument("--irq", choices=["intx", "msix"], default="intx",
                   help="built-in client: the workload's interrupt")
    p.add_argument("--no-reset", action="store_true", help="built-in client: skip the reset")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    p.set_defaults(func=cmd_experiment)
    return p


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """The :class:`ExperimentConfig` the options describe."""
    command = None
    if args.command is not None:
        try:
            command = tuple(shlex.split(args.command))
        except ValueError as exc:
            raise ExperimentError(f"--command {args.command!r}: {exc}") from exc
    return ExperimentConfig(
        output=args.output,
        sweep=args.sweep,
        rules=args.rules,
        runs=args.runs,
        seed=args.seed,
        direct=args.direct,
        server=args.server,
        command=command,
        timeout=args.timeout,
        realize=RealizeOptions(workload=args.workload, irq=args.irq, reset=not args.no_reset),
        plot=not args.no_plot,
    )


def cmd_experiment(args: argparse.Namespace) -> int:
    """Run the experiment, print the summary and where the files are.

    0 when every run's client succeeded, 1 when one failed (after all runs,
    with every file written)."""
    config = config_from_args(args)
    settings = config.settings()  # a bad sweep fails here, before anything starts
    claim_directory(config.output, OUTPUT_NAMES, force=args.force)
    print(f"vfioproxy: {len(settings)} setting(s) x {config.runs} run(s)", file=sys.stderr)
    with progress_display() as progress:
        results = trio.run(lambda: run_experiment(config, progress=progress))
    print_summary(results)
    files = [results.csv_path, results.json_path, *results.plots]
    stderrs = sum(r.stderr is not None for r in results.rows)
    print(f"\nwrote {', '.join(str(f) for f in files)} and "
          f"{sum(r.trace is not None for r in results.rows)} trace(s)"
          f"{f' and {stderrs} client stderr file(s)' if stderrs else ''} in "
          f"{config.output / TRACES_DIR}")
    if config.plot and not results.plots:
        print(f"note: {PLOT_HINT}")
    failed = sum(not row.ok for row in results.rows)
    if failed:
        print(f"vfioproxy: {failed} of {len(results.rows)} run(s) failed "
              "(their errors are under the table)", file=sys.stderr)
        return 1
    return 0
