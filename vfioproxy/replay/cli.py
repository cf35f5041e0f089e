"""``vfioproxy replay client`` and ``vfioproxy replay server``: arguments and output only.

:func:`add_replay_commands` adds the ``replay`` command to the main parser's
subcommands; each handler returns the exit status: 0 when nothing diverged,
1 when something did. When the replay cannot run (unreadable trace, no such
session, server not reachable) it raises, and the command line's error
boundary prints the error and exits 2 (130 when interrupted).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Awaitable, Callable

import trio

from vfioproxy.errors import UsageError
from vfioproxy.replay.client import ClientReplayOptions, replay_client
from vfioproxy.replay.match import DEFAULT_IGNORES, DEFAULT_MATCH_ON, IgnoreRule, Matcher
from vfioproxy.replay.report import DEFAULT_MAX_DIVERGENCES, ReplayReport
from vfioproxy.replay.script import DEFAULT_WINDOW
from vfioproxy.replay.server import ServerReplayOptions, serve_replay
from vfioproxy.usage.types import integer, real, seconds

__all__ = ["add_ignore_options", "add_replay_commands", "ignore_rules"]

CLIENT_EXAMPLES = """\
examples:
  vfioproxy replay client session.trace --server /tmp/device.sock
  vfioproxy replay client session.trace --server /tmp/device.sock \\
      --ignore 'REGION_READ:data[0x140:0x148]' --json"""

SERVER_EXAMPLES = """\
examples:
  vfioproxy replay server session.trace --listen /tmp/replay.sock
  vfioproxy replay server session.trace --listen /tmp/replay.sock \\
      --on-mismatch passthrough --passthrough-server /tmp/device.sock"""


def _rule(text: str) -> IgnoreRule:
    try:
        return IgnoreRule.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _matcher(text: str) -> Matcher:
    try:
        return Matcher.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_ignore_options(p: argparse.ArgumentParser) -> None:
    """``--ignore RULE`` (repeatable) and ``--no-default-ignores``: what may differ,
    for the replays and ``trace diff`` alike (read back by :func:`ignore_rules`)."""
    p.add_argument("--ignore", type=_rule, action="append", default=[], metavar="RULE",
                   help="[COMMAND:]FIELD that may differ, e.g. 'REGION_READ:data[0x140:0x148]' "
                        "or 'json.capabilities' (repeatable)")
    p.add_argument("--no-default-ignores", action="store_true",
                   help=f"also compare {', '.join(map(str, DEFAULT_IGNORES))}")


def ignore_rules(args: argparse.Namespace) -> tuple[IgnoreRule, ...]:
    """The rules :func:`add_ignore_options`' options asked for, defaults first."""
    defaults = () if args.no_default_ignores else DEFAULT_IGNORES
    return (*defaults, *args.ignore)


def _run(args: argparse.Namespace, replay: Callable[[], Awaitable[ReplayReport]]) -> int:
    report = trio.run(replay)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(report.text())
    return report.exit_status


def cmd_replay_client(args: argparse.Namespace) -> int:
    options = ClientReplayOptions(
        session=args.session, timing=args.timing, speed=args.speed, timeout=args.timeout,
        ignore=ignore_rules(args), window=args.window, max_divergences=args.max_divergences,
    )
    return _run(args, functools.partial(replay_client, args.trace, args.server, options))


def cmd_replay_server(args: argparse.Namespace) -> int:
    if args.on_mismatch == "passthrough" and not args.passthrough_server:
        raise UsageError("--on-mismatch passthrough needs --passthrough-server SOCK")
    options = ServerReplayOptions(
        session=args.session, match_on=args.match_on, ignore=ignore_rules(args),
        on_mismatch=args.on_mismatch, passthrough=args.passthrough_server, timeout=args.timeout,
        window=args.window, max_divergences=args.max_divergences,
    )

    async def serve() -> ReplayReport:
        async with trio.open_nursery() as nursery:
            report: list[ReplayReport] = []

            async def run(task_status: trio.TaskStatus[None]) -> None:
                report.append(await serve_replay(args.trace, args.listen, options,
                                                 task_status=task_status))

            await nursery.start(run)
            print(f"vfioproxy: replaying the server of {args.trace} on {args.listen}",
                  file=sys.stderr)
        return report[0]

    return _run(args, serve)


def add_replay_commands(subcommands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``replay client`` and ``replay server`` to the main parser's subcommands."""
    replay = subcommands.add_parser(
        "replay", help="replay a recorded session as client or as server, report divergences",
        epilog=f"{CLIENT_EXAMPLES}\n  vfioproxy replay server session.trace --listen "
        "/tmp/replay.sock",
    )
    actions = replay.add_subparsers(dest="replay_command", metavar="SIDE", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("trace", metavar="TRACE", help="the recorded trace")
        p.add_argument("--session", type=int, metavar="N",
                       help="session to replay (default: the first)")
        p.add_argument("--timeout", type=seconds(), default=5.0, metavar="SECONDS",
                       help="seconds to wait for each live message (default 5)")
        add_ignore_options(p)
        p.add_argument("--max-divergences", type=integer(1),
                       default=DEFAULT_MAX_DIVERGENCES, metavar="N",
                       help="divergences the report keeps; the rest are counted "
                            f"(default {DEFAULT_MAX_DIVERGENCES})")
        p.add_argument("--json", action="store_true", help="the report as JSON")

    client = actions.add_parser(
        "client", help="play the recorded client against a live device server",
        epilog=CLIENT_EXAMPLES,
    )
    common(client)
    client.add_argument("--server", required=True, metavar="SOCK",
                        help="UNIX socket of the live device server")
    client.add_argument("--timing", choices=["asap", "recorded"], default="asap",
                        help="asap: causal order only; recorded: keep the recorded gaps")
    client.add_argument("--speed", type=real("a speed factor"), default=1.0, metavar="X",
                        help="with --timing recorded: play X times faster")
    client.add_argument("--window", type=integer(1), default=DEFAULT_WINDOW,
                        metavar="N",
                        help="sent commands that may await their reply at once; beyond, "
                             "the replay waits for replies (default "
                             f"{DEFAULT_WINDOW})")
    client.set_defaults(func=cmd_replay_client)

    server = actions.add_parser(
        "server", help="play the recorded server towards a live client (e.g. QEMU)",
        epilog=SERVER_EXAMPLES,
    )
    common(server)
    server.add_argument("--listen", required=True, metavar="SOCK",
                        help="UNIX socket the client connects to")
    server.add_argument("--match-on", type=_matcher, default=Matcher(), metavar="KEYS",
                        help="what a live request must share with a recorded one: comma-"
                             f"separated {', '.join(DEFAULT_MATCH_ON)}, header or field "
                             f"names (default {','.join(DEFAULT_MATCH_ON)})")
    server.add_argument("--on-mismatch", choices=["error", "close", "passthrough"],
                        default="error",
                        help="an unmatched request gets EINVAL, closes the connection, or "
                             "goes to --passthrough-server")
    server.add_argument("--passthrough-server", metavar="SOCK",
                        help="live server for --on-mismatch passthrough")
    server.add_argument("--window", type=integer(1), default=DEFAULT_WINDOW,
                        metavar="N",
                        help="a live request is matched against the first N unused "
                             f"recorded requests (default {DEFAULT_WINDOW})")
    server.set_defaults(func=cmd_replay_server)
