"""The ``vfioproxy`` command line: argument parsing and output only.

Each command group registers itself: :mod:`~vfioproxy.cli.proxy` (``proxy``,
``record``, ``ctl``), :mod:`~vfioproxy.cli.peers` (``demo``,
``serve-device``, ``realize``), :mod:`~vfioproxy.cli.trace` (``trace``),
``replay`` and ``experiment`` from their packages, :mod:`~vfioproxy.cli.wireshark`
(``wireshark``). :func:`build_parser`
gives every command's ``--help`` the exit codes; :func:`main` runs one
command through the error boundary (:mod:`~vfioproxy.cli.boundary`).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator, Sequence

import vfioproxy
from vfioproxy.cli.boundary import run_command
from vfioproxy.cli.peers import add_peer_commands
from vfioproxy.cli.proxy import add_ctl_command, add_proxy_commands
from vfioproxy.cli.trace import add_trace_commands
from vfioproxy.cli.wireshark import add_wireshark_command
from vfioproxy.experiment.cli import add_experiment_command
from vfioproxy.replay.cli import add_replay_commands
from vfioproxy.usage.exits import EXIT_STATUS_HELP

__all__ = ["build_parser", "commands", "main"]


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps a one-paragraph text (a description) to the terminal and keeps a
    text of several lines (an epilog with examples) as it is written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" not in text:
            return super()._fill_text(text, width, indent)
        return "".join(indent + line for line in text.splitlines(keepends=True))


def commands(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and every (sub)command parser under it, depth first."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield from commands(sub)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command, in the order ``--help`` lists them."""
    parser = argparse.ArgumentParser(
        prog="vfioproxy",
        description="Man-in-the-middle proxy, recorder and replay engine for vfio-user.",
        epilog="examples:\n  vfioproxy demo\n  vfioproxy record --listen /tmp/proxy.sock "
        "--server /tmp/device.sock -o session.trace\n\n"
        "`vfioproxy COMMAND --help` describes each command.",
    )
    parser.add_argument("--version", action="version", version=f"vfioproxy {vfioproxy.__version__}")
    verbs = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_proxy_commands(verbs)
    add_experiment_command(verbs)
    add_ctl_command(verbs)
    add_peer_commands(verbs)
    add_replay_commands(verbs)
    add_trace_commands(verbs)
    add_wireshark_command(verbs)
    for command in commands(parser):
        command.formatter_class = _HelpFormatter
        command.epilog = "\n\n".join(filter(None, [command.epilog, EXIT_STATUS_HELP]))
        command.set_defaults(verb=command.prog)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command ``argv`` names (default: ``sys.argv[1:]``) and return its
    exit code: 0 ok, 1 the thing checked failed, 2 usage or input error
    (argparse exits 2 itself), 130 interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="vfioproxy: %(message)s",
    )
    return run_command(args.verb, args.func, args)
