"""``vfioproxy trace``: show, stats and import."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from recorder.errors import TraceFormatError
from recorder.reader import TraceReader
from vfioproxy.cli.args import LAYOUTS, dialects
from vfioproxy.errors import UsageError
from vfioproxy.trace import show, stats
from vfioproxy.trace.decoded import decoded_records
from vfioproxy.trace.rawcap import import_rawcap
from vfioproxy.trace.sessions import TraceSessions
from vfioproxy.trace.timeline.build import reader_timelines
from vfioproxy.usage.output import claim_file, is_directory

__all__ = ["add_trace_commands"]

SHOW_EXAMPLES = """\
examples:
  vfioproxy trace show traces/reference-realize-001.trace
  vfioproxy trace show --json --session 1 session.trace | jq .command"""

STATS_EXAMPLES = """\
examples:
  vfioproxy trace stats session.trace
  vfioproxy trace stats --json session.trace
  vfioproxy trace stats --by-step traces/qemu-realize-gpio-001.trace"""

IMPORT_EXAMPLES = """\
examples:
  vfioproxy trace import capture.jsonl capture.trace
  vfioproxy trace import captures/*.jsonl traces/

DEST/ (or an existing directory) gets one SRC.trace per source; a DEST that
exists is replaced only with --force."""


def add_trace_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``trace show``, ``trace stats`` and ``trace import``."""
    trace = commands.add_parser("trace", help="inspect and convert trace files",
                                epilog=f"{SHOW_EXAMPLES}\n  vfioproxy trace import capture.jsonl "
                                "capture.trace")
    trace_commands = trace.add_subparsers(dest="trace_command", metavar="ACTION", required=True)

    def add_decode_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("file", metavar="TRACE", help="trace file")
        p.add_argument("--session", type=int, metavar="N", help="only this session")
        p.add_argument("--json", action="store_true", help="JSON output")
        p.add_argument(
            "--client-dma", choices=LAYOUTS,
            help="DMA_READ/WRITE layout of the client (default: detected from its VERSION)",
        )
        p.add_argument(
            "--server-dma", choices=LAYOUTS, help="DMA_READ/WRITE layout of the server (spec)"
        )

    p_show = trace_commands.add_parser(
        "show", help="one line per message, decoded and PCI-aware", epilog=SHOW_EXAMPLES
    )
    add_decode_options(p_show)
    p_show.add_argument("-v", "--verbose", action="store_true", help="every field")
    p_show.set_defaults(func=cmd_trace_show)

    p_stats = trace_commands.add_parser(
        "stats", help="messages, bytes, latencies and fds per command", epilog=STATS_EXAMPLES
    )
    add_decode_options(p_stats)
    p_stats.add_argument("--by-step", action="store_true",
                         help="per QEMU realize/reset/running step of each client session")
    p_stats.set_defaults(func=cmd_trace_stats)

    p_import = trace_commands.add_parser(
        "import", help="convert rawcap JSON-lines captures into traces", epilog=IMPORT_EXAMPLES
    )
    p_import.add_argument("sources", nargs="+", metavar="SRC", help="rawcap .jsonl files")
    p_import.add_argument("dest", metavar="DEST",
                          help="trace file, or DIR/ for one trace per source")
    p_import.add_argument("--force", action="store_true", help="replace traces that exist")
    p_import.set_defaults(func=cmd_trace_import)


def _warn_truncated(reader: TraceReader) -> None:
    if reader.truncation is not None:
        print(f"vfioproxy: warning: {reader.path}: {reader.truncation}", file=sys.stderr)


def _open(path: str) -> TraceReader:
    """The trace at ``path``; a rawcap capture given instead is named as one."""
    try:
        return TraceReader(path)
    except TraceFormatError as exc:
        with open(path, "rb") as file:
            if file.read(1) != b"{":
                raise
        raise UsageError(f"{exc}; it looks like a rawcap JSON-lines capture: "
                         f"`vfioproxy trace import {path} TRACE` converts it") from exc


def _check_session(args: argparse.Namespace) -> None:
    if args.session is not None:
        TraceSessions.read(args.file).require(args.session)


def cmd_trace_show(args: argparse.Namespace) -> int:
    with _open(args.file) as reader:
        _check_session(args)
        items = decoded_records(reader, dialects=dialects(args), session=args.session)
        if args.json:
            show.write_lines(show.json_lines(items), sys.stdout)
        else:
            show.write_lines(show.header_lines(reader.header), sys.stdout)
            show.write_lines(show.text_lines(items, verbose=args.verbose), sys.stdout)
        _warn_truncated(reader)
    return 0


def cmd_trace_stats(args: argparse.Namespace) -> int:
    if args.by_step:
        return _trace_stats_by_step(args)
    with _open(args.file) as reader:
        _check_session(args)
        result = stats.collect(
            decoded_records(reader, dialects=dialects(args), session=args.session)
        )
        if args.json:
            print(json.dumps(result.to_dict(), indent=2))
        else:
            show.write_lines(stats.text_report(result), sys.stdout)
        _warn_truncated(reader)
    return 0


def _trace_stats_by_step(args: argparse.Namespace) -> int:
    with _open(args.file) as reader:
        _check_session(args)
        timelines = [t for t in reader_timelines(reader, dialects=dialects(args))
                     if args.session in (None, t.session)]
        if args.json:
            print(json.dumps(stats.by_step_dict(timelines), indent=2))
        else:
            show.write_lines(stats.by_step_report(timelines), sys.stdout)
        _warn_truncated(reader)
    return 0


def cmd_trace_import(args: argparse.Namespace) -> int:
    sources = [Path(s) for s in args.sources]
    into_directory = is_directory(args.dest)
    if len(sources) > 1 and not into_directory:
        raise UsageError(f"{args.dest} is a file: several sources need a directory, DEST/")
    dest = Path(args.dest)
    targets = [dest / (src.stem + ".trace") if into_directory else dest for src in sources]
    for target in targets:
        claim_file(target, force=args.force)
    if into_directory:
        dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    for src, target in zip(sources, targets, strict=True):
        result = import_rawcap(src, target, overwrite=args.force)
        print(f"{src} -> {target}: {result.messages} messages, {result.fds} fds")
    return 0
