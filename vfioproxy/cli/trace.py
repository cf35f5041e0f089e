"""``vfioproxy trace``: show, stats, timeline and import."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from recorder.errors import TraceFormatError
from recorder.reader import TraceReader
from vfioproxy.cli.args import LAYOUTS, dialects
from vfioproxy.errors import UsageError
from vfioproxy.protocol.header import HEADER_SIZE
from vfioproxy.trace import show, stats
from vfioproxy.trace.decoded import MAX_OPEN_SESSIONS, DecodedItem, decoded_records
from vfioproxy.trace.filter import compile_filter, select
from vfioproxy.trace.rawcap import import_rawcap
from vfioproxy.trace.sessions import TraceSessions
from vfioproxy.trace.timeline.build import reader_timelines
from vfioproxy.trace.timeline.compare import compare, comparison_lines
from vfioproxy.trace.timeline.html import write_html
from vfioproxy.trace.timeline.model import SessionTimeline
from vfioproxy.trace.timeline.png import PNG_HINT, have_matplotlib, write_png
from vfioproxy.trace.timeline.table import session_lines
from vfioproxy.usage.output import claim_file, is_directory
from vfioproxy.usage.types import integer

__all__ = ["add_trace_commands"]

SHOW_EXAMPLES = """\
examples:
  vfioproxy trace show traces/reference-realize-001.trace
  vfioproxy trace show --json --session 1 session.trace | jq .command
  vfioproxy trace show -Y 'command == REGION_READ and region == ROM' session.trace
  vfioproxy trace show -Y 'register == "COMMAND"' -c 3 session.trace"""

STATS_EXAMPLES = """\
examples:
  vfioproxy trace stats session.trace
  vfioproxy trace stats --json session.trace
  vfioproxy trace stats --by-step traces/qemu-realize-gpio-001.trace
  vfioproxy trace stats -Y 'dir == c2s and region == config' session.trace
  vfioproxy trace stats -Y 'step matches "^R"' -c 100 session.trace"""

TIMELINE_EXAMPLES = """\
examples:
  vfioproxy trace timeline traces/qemu-realize-qemu-server-e1000e-001.trace
  vfioproxy trace timeline direct.trace proxied.trace      # side by side, by step
  vfioproxy trace timeline --html timeline.html --png timeline.png session.trace
  vfioproxy trace timeline --json --session 1 session.trace | jq '.sessions[0].steps'

Every message of each client session is labelled with the QEMU realize or
reset step (R1..R14, S1..S7) or running-phase event that sent it; several
sessions (of one or more traces) are also shown side by side."""

IMPORT_EXAMPLES = """\
examples:
  vfioproxy trace import capture.jsonl capture.trace
  vfioproxy trace import captures/*.jsonl traces/

DEST/ (or an existing directory) gets one SRC.trace per source; a DEST that
exists is replaced only with --force."""


def add_trace_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``trace show``, ``trace stats``, ``trace timeline`` and ``trace import``."""
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
        p.add_argument("-Y", "--filter", metavar="EXPR",
                       help="only messages this display filter passes, e.g. "
                       "'command == REGION_READ and region == ROM' (README: Display filters)")
        p.add_argument("-c", "--count", metavar="N", type=integer(1),
                       help="stop after N (matching) messages, e.g. -c 10")
        p.add_argument("--max-open-sessions", metavar="N", type=integer(1),
                       default=MAX_OPEN_SESSIONS,
                       help="decode at most N sessions open at once; one more drops the state "
                       "of the one idle the longest, with a notice (default: %(default)s)")

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

    p_timeline = trace_commands.add_parser(
        "timeline", help="every message labelled with its QEMU step; per-step times, "
        "sessions side by side", epilog=TIMELINE_EXAMPLES
    )
    p_timeline.add_argument("files", nargs="+", metavar="TRACE", help="trace files")
    p_timeline.add_argument("--session", type=int, metavar="N",
                            help="only this session of each trace (default: every client session)")
    p_timeline.add_argument("--json", action="store_true",
                            help="JSON output: every session's steps and labelled messages")
    p_timeline.add_argument("--png", metavar="OUT", help="also draw the timeline as a PNG "
                            "(needs matplotlib)")
    p_timeline.add_argument("--html", metavar="OUT", help="also write a self-contained HTML "
                            "page: zoomable timeline, hover for each message, step tables")
    p_timeline.add_argument("--force", action="store_true", help="replace --png/--html outputs "
                            "that exist")
    p_timeline.add_argument(
        "--client-dma", choices=LAYOUTS,
        help="DMA_READ/WRITE layout of the client (default: detected from its VERSION)",
    )
    p_timeline.add_argument(
        "--server-dma", choices=LAYOUTS, help="DMA_READ/WRITE layout of the server (spec)"
    )
    p_timeline.set_defaults(func=cmd_trace_timeline)

    p_import = trace_commands.add_parser(
        "import", help="convert rawcap JSON-lines captures into traces", epilog=IMPORT_EXAMPLES
    )
    p_import.add_argument("sources", nargs="+", metavar="SRC", help="rawcap .jsonl files")
    p_import.add_argument("dest", metavar="DEST",
                          help="trace file, or DIR/ for one trace per source")
    p_import.add_argument("--force", action="store_true", help="replace traces that exist")
    p_import.set_defaults(func=cmd_trace_import)


def _selected(reader: TraceReader, args: argparse.Namespace) -> Iterator[DecodedItem]:
    """The decoded items of ``reader`` that ``--session``, ``-Y`` and ``-c`` keep."""
    items = decoded_records(reader, dialects=dialects(args), session=args.session,
                            max_open_sessions=args.max_open_sessions)
    if args.filter is None and args.count is None:
        return items
    return select(items, args.compiled, args.count, header=reader.header)


#: how many skipped damaged records are named one by one on stderr
DAMAGED_SHOWN = 20


def _warn_truncated(reader: TraceReader) -> int:
    """Say on stderr what the last pass over ``reader`` could not read: a torn
    tail, and each damaged record it skipped (the first :data:`DAMAGED_SHOWN`,
    then how many more) with a count. Returns the exit status it calls for:
    1 when records were skipped, else 0."""
    if reader.truncation is not None:
        print(f"vfioproxy: warning: {reader.path}: {reader.truncation}", file=sys.stderr)
    if not reader.damaged_count:
        return 0
    for damaged in reader.damaged[:DAMAGED_SHOWN]:
        print(f"vfioproxy: damaged record: {damaged}", file=sys.stderr)
    if reader.damaged_count > DAMAGED_SHOWN:
        print(f"vfioproxy: ... and {reader.damaged_count - DAMAGED_SHOWN} more damaged records",
              file=sys.stderr)
    plural = "s" if reader.damaged_count > 1 else ""
    print(f"vfioproxy: {reader.path}: skipped {reader.damaged_count} damaged record{plural}",
          file=sys.stderr)
    return 1


def _open(path: str) -> TraceReader:
    """The trace at ``path``, read past damaged records (:func:`_warn_truncated`
    names them); a rawcap capture given instead is named as one."""
    try:
        return TraceReader(path, skip_damaged=True, min_message_bytes=HEADER_SIZE)
    except TraceFormatError as exc:
        with open(path, "rb") as file:
            if file.read(1) != b"{":
                raise
        raise UsageError(f"{exc}; it looks like a rawcap JSON-lines capture: "
                         f"`vfioproxy trace import {path} TRACE` converts it") from exc


def _check_session(args: argparse.Namespace) -> None:
    if args.session is not None:
        TraceSessions.read(args.file).require(args.session)


def _compile(args: argparse.Namespace) -> None:
    """``args.compiled``: ``-Y``'s expression parsed once, before the trace is read."""
    args.compiled = None if args.filter is None else compile_filter(args.filter)


def cmd_trace_show(args: argparse.Namespace) -> int:
    _compile(args)
    with _open(args.file) as reader:
        _check_session(args)
        items = _selected(reader, args)
        if args.json:
            show.write_json(items, sys.stdout)
        else:
            show.write_lines(show.header_lines(reader.header), sys.stdout)
            show.write_lines(show.text_lines(items, verbose=args.verbose), sys.stdout)
        return _warn_truncated(reader)


def cmd_trace_stats(args: argparse.Namespace) -> int:
    if args.by_step:
        return _trace_stats_by_step(args)
    _compile(args)
    with _open(args.file) as reader:
        _check_session(args)
        result = stats.collect(_selected(reader, args))
        if args.json:
            print(json.dumps(result.to_dict(), indent=2))
        else:
            show.write_lines(stats.text_report(result), sys.stdout)
        return _warn_truncated(reader)


def _trace_stats_by_step(args: argparse.Namespace) -> int:
    if args.filter is not None or args.count is not None:
        raise UsageError("--by-step counts whole steps: it takes no -Y or -c")
    with _open(args.file) as reader:
        _check_session(args)
        timelines = [t for t in reader_timelines(reader, dialects=dialects(args),
                                                 max_open_sessions=args.max_open_sessions)
                     if args.session in (None, t.session)]
        if args.json:
            print(json.dumps(stats.by_step_dict(timelines), indent=2))
        else:
            show.write_lines(stats.by_step_report(timelines), sys.stdout)
        return _warn_truncated(reader)


def _timelines_of(path: str, args: argparse.Namespace) -> tuple[list[SessionTimeline], int]:
    """The client sessions of the trace ``path`` that ``--session`` picks, and
    the exit status its reading calls for (:func:`_warn_truncated`)."""
    with _open(path) as reader:
        if args.session is not None:
            TraceSessions.read(path).require(args.session, messages=True)
        found = [t for t in reader_timelines(reader, dialects=dialects(args))
                 if args.session in (None, t.session)]
        status = _warn_truncated(reader)
    if not found:
        which = "no" if args.session is None else f"session {args.session} is no"
        raise UsageError(f"{path}: {which} client session with messages")
    return found, status


def cmd_trace_timeline(args: argparse.Namespace) -> int:
    outputs = [out for out in (args.png, args.html) if out is not None]
    if args.png is not None and not have_matplotlib():
        raise UsageError(PNG_HINT)
    if len(set(outputs)) < len(outputs):
        raise UsageError(f"--png and --html both name {args.png}")
    for out in outputs:
        claim_file(out, force=args.force)
    timelines: list[SessionTimeline] = []
    status = 0
    for path in args.files:
        found, read_status = _timelines_of(path, args)
        timelines += found
        status = max(status, read_status)
    if args.json:
        result: dict[str, object] = {"sessions": [t.to_dict() for t in timelines]}
        if len(timelines) > 1:
            result["side_by_side"] = compare(timelines).to_dict()
        print(json.dumps(result, indent=2))
    else:
        sections = [session_lines(t) for t in timelines]
        if len(timelines) > 1:
            sections.append(comparison_lines(compare(timelines)))
        for i, section in enumerate(sections):
            show.write_lines([""] * bool(i) + section, sys.stdout)
    if args.png is not None:
        write_png(timelines, args.png)
    if args.html is not None:
        write_html(timelines, args.html)
    return status


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
