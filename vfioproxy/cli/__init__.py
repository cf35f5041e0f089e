"""The ``vfioproxy`` command line: argument parsing and output only.

Each command group registers itself: :mod:`~vfioproxy.cli.proxy` (``proxy``,
``record``, ``ctl``), :mod:`~vfioproxy.cli.peers` (``demo``,
``serve-device``, ``realize``), :mod:`~vfioproxy.cli.trace` (``trace``),
``replay`` and ``experiment`` from their packages; :func:`main` runs one and
turns an error into one line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import vfioproxy
from recorder.errors import TraceError
from vfioproxy.cli.peers import add_peer_commands
from vfioproxy.cli.proxy import add_ctl_command, add_proxy_commands
from vfioproxy.cli.trace import add_trace_commands
from vfioproxy.errors import UsageError, VfioProxyError
from vfioproxy.experiment.cli import add_experiment_command
from vfioproxy.replay.cli import add_replay_commands

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command, in the order ``--help`` lists them."""
    parser = argparse.ArgumentParser(
        prog="vfioproxy",
        description="Man-in-the-middle proxy, recorder and replay engine for vfio-user.",
    )
    parser.add_argument("--version", action="version", version=f"vfioproxy {vfioproxy.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_proxy_commands(commands)
    add_experiment_command(commands)
    add_ctl_command(commands)
    add_peer_commands(commands)
    add_replay_commands(commands)
    add_trace_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="vfioproxy: %(message)s",
    )
    try:
        code: int = args.func(args)
    except (VfioProxyError, OSError) as exc:
        if isinstance(exc, BrokenPipeError):
            return 0
        where = "" if isinstance(exc, TraceError | UsageError) else f"{type(exc).__name__}: "
        print(f"vfioproxy: error: {where}{exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    return code
