"""``vfioproxy trace``: show, stats and import."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from recorder.reader import TraceReader
from vfioproxy.cli.args import LAYOUTS, dialects
from vfioproxy.trace import show, stats
from vfioproxy.trace.decoded import decoded_records
from vfioproxy.trace.rawcap import import_rawcap
from vfioproxy.trace.sessions import TraceSessions

__all__ = ["add_trace_commands"]


def add_trace_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``trace show``, ``trace stats`` and ``trace import``."""
    trace = commands.add_parser("trace", help="inspect and convert trace files")
    trace_commands = trace.add_subparsers(dest="trace_command", metavar="ACTION", required=True)

    def add_decode_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("file", help="trace file")
        p.add_argument("--session", type=int, help="only this session")
        p.add_argument("--json", action="store_true", help="JSON output")
        p.add_argument(
            "--client-dma", choices=LAYOUTS,
            help="DMA_READ/WRITE layout of the client (default: detected from its VERSION)",
        )
        p.add_argument(
            "--server-dma", choices=LAYOUTS, help="DMA_READ/WRITE layout of the server (spec)"
        )

    p_show = trace_commands.add_parser(
        "show", help="one line per message, decoded and PCI-aware"
    )
    add_decode_options(p_show)
    p_show.add_argument("-v", "--verbose", action="store_true", help="every field")
    p_show.set_defaults(func=cmd_trace_show)

    p_stats = trace_commands.add_parser(
        "stats", help="messages, bytes, latencies and fds per command"
    )
    add_decode_options(p_stats)
    p_stats.set_defaults(func=cmd_trace_stats)

    p_import = trace_commands.add_parser(
        "import", help="convert rawcap JSON-lines captures into traces"
    )
    p_import.add_argument("sources", nargs="+", help="rawcap .jsonl files")
    p_import.add_argument("dest", help="trace file, or a directory for several")
    p_import.set_defaults(func=cmd_trace_import)


def _warn_truncated(reader: TraceReader) -> None:
    if reader.truncation is not None:
        print(f"vfioproxy: warning: {reader.path}: {reader.truncation}", file=sys.stderr)


def _check_session(args: argparse.Namespace) -> None:
    if args.session is not None:
        TraceSessions.read(args.file).require(args.session)


def cmd_trace_show(args: argparse.Namespace) -> int:
    _check_session(args)
    with TraceReader(args.file) as reader:
        items = decoded_records(reader, dialects=dialects(args), session=args.session)
        if args.json:
            show.write_lines(show.json_lines(items), sys.stdout)
        else:
            show.write_lines(show.header_lines(reader.header), sys.stdout)
            show.write_lines(show.text_lines(items, verbose=args.verbose), sys.stdout)
        _warn_truncated(reader)
    return 0


def cmd_trace_stats(args: argparse.Namespace) -> int:
    _check_session(args)
    with TraceReader(args.file) as reader:
        result = stats.collect(
            decoded_records(reader, dialects=dialects(args), session=args.session)
        )
        if args.json:
            print(json.dumps(result.to_dict(), indent=2))
        else:
            show.write_lines(stats.text_report(result), sys.stdout)
        _warn_truncated(reader)
    return 0


def cmd_trace_import(args: argparse.Namespace) -> int:
    sources = [Path(s) for s in args.sources]
    dest = Path(args.dest)
    if len(sources) > 1 and not dest.is_dir():
        raise SystemExit(f"vfioproxy: error: {dest} must be a directory for several sources")
    for src in sources:
        target = dest / (src.stem + ".trace") if dest.is_dir() else dest
        result = import_rawcap(src, target)
        print(f"{src} -> {target}: {result.messages} messages, {result.fds} fds")
    return 0
