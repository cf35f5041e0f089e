"""``vfioproxy trace``: show, stats, export, timeline, diff, import, slice and merge."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, BinaryIO, TextIO, cast

from recorder.errors import TraceFormatError
from recorder.reader import Paused, TraceReader
from recorder.records import Record
from vfioproxy.cli.args import LAYOUTS, dialects
from vfioproxy.errors import UsageError
from vfioproxy.replay.cli import add_ignore_options, ignore_rules
from vfioproxy.replay.diff import (
    DEFAULT_MAX_MESSAGES,
    diff_scripts,
    filtered_seqs,
    load_session,
    parse_operand,
)
from vfioproxy.trace import export, parquet, pcapng, query, show, stats, tables
from vfioproxy.trace.decoded import MAX_OPEN_SESSIONS, DecodedItem, decoded_records
from vfioproxy.trace.filter import Facts, Filter, compile_filter, select, select_facts
from vfioproxy.trace.merge import merge_traces
from vfioproxy.trace.rawcap import import_rawcap
from vfioproxy.trace.reading import damage_lines, open_trace
from vfioproxy.trace.sessions import TraceSessions
from vfioproxy.trace.slice import SliceSpec, slice_trace
from vfioproxy.trace.timeline.build import reader_timelines
from vfioproxy.trace.timeline.compare import compare, comparison_lines
from vfioproxy.trace.timeline.html import write_html
from vfioproxy.trace.timeline.model import SessionTimeline
from vfioproxy.trace.timeline.png import PNG_HINT, have_matplotlib, write_png
from vfioproxy.trace.timeline.table import session_lines
from vfioproxy.usage.output import check_reader, claim_file, is_directory
from vfioproxy.usage.types import integer, span

__all__ = ["add_trace_commands"]

SHOW_EXAMPLES = """\
examples:
  vfioproxy trace show traces/reference-realize-001.trace
  vfioproxy trace show --json --session 1 session.trace | jq .command
  vfioproxy trace show -Y 'command == REGION_READ and region == ROM' session.trace
  vfioproxy trace show -Y 'register == "COMMAND"' -c 3 session.trace
  vfioproxy trace show -v -x -Y 'command == VERSION' session.trace"""

STATS_EXAMPLES = """\
examples:
  vfioproxy trace stats session.trace
  vfioproxy trace stats --json session.trace
  vfioproxy trace stats --by-step traces/qemu-realize-gpio-001.trace
  vfioproxy trace stats -Y 'dir == c2s and region == config' session.trace
  vfioproxy trace stats -Y 'step matches "^R"' -c 100 session.trace"""

QUERY_EXAMPLES = """\
examples:
  vfioproxy trace query "SELECT command, count(*) AS n FROM messages GROUP BY ALL \\
      ORDER BY n DESC" traces/*.trace
  vfioproxy trace query --csv "SELECT * FROM events WHERE kind = 'violation'" pq/
  vfioproxy trace query --json "SELECT trace, max(latency) FROM messages GROUP BY ALL" a.trace

messages: a row per message, a column per display filter field (fd.kind as
fd_kinds, data left out) after host, trace and t_ns; events: a row per event
record. The columns are trace export --format parquet's (README: SQL over
traces); a directory exported with --partition-by gets host and date from
its paths."""

TIMELINE_EXAMPLES = """\
examples:
  vfioproxy trace timeline traces/qemu-realize-qemu-server-e1000e-001.trace
  vfioproxy trace timeline direct.trace proxied.trace      # side by side, by step
  vfioproxy trace timeline --html timeline.html --png timeline.png session.trace
  vfioproxy trace timeline --json --session 1 session.trace | jq '.sessions[0].steps'

Every message of each client session is labelled with the QEMU realize or
reset step (R1..R14, S1..S7) or running-phase event that sent it; several
sessions (of one or more traces) are also shown side by side."""

EXPORT_EXAMPLES = """\
examples:
  vfioproxy trace export session.trace | jq -c .fields
  vfioproxy trace export --format pairs -Y 'command == REGION_READ' session.trace \\
      | jq 'select(.latency > 100)'
  vfioproxy trace export --format csv -o session.csv session.trace
  vfioproxy trace export --format csv --session 2 -c 100 -o - session.trace
  vfioproxy trace export --format parquet -o pq session.trace   # pq/messages, pq/events
  vfioproxy trace export --format parquet --partition-by host,date -o pq session.trace
  vfioproxy trace export --format pcapng -o session.pcapng session.trace
  vfioproxy trace export --format pcapng --follow session.trace - | wireshark -k -i -

jsonl: `trace show --json`'s object per record, each message's with "fields";
pairs: one object per request with its reply; csv: one row per message;
parquet: OUTDIR/messages/NAME.parquet and OUTDIR/events/NAME.parquet
(--partition-by host,date: OUTDIR/messages/host=H/date=YYYY-MM-DD/NAME.parquet,
Hive-style, as Spark and DuckDB read it); pcapng: a packet per record for
Wireshark and tshark (docs/pcapng.md). The field names are the display
filter's (README: Exporting)."""
DIFF_EXAMPLES = """\
examples:
  vfioproxy trace diff traces/qemu-realize-gpio-001.trace traces/qemu-realize-gpio-002.trace
  vfioproxy trace diff direct.trace proxied.trace:2 --ignore 'REGION_READ:data[0x140:0x148]'
  vfioproxy trace diff --json a.trace b.trace | jq .first_divergence
  vfioproxy trace diff -Y 'region == config' e1000e.trace nvme.trace

A and B are FILE or FILE:SESSION (default: the file's only session with
messages). Exchanges (a command and its reply) are paired per direction in
order, as replay server pairs requests; paired messages are compared field by
field, ignore rules applied; timing never counts. Exit 0: equal, 1: they differ."""

IMPORT_EXAMPLES = """\
examples:
  vfioproxy trace import capture.jsonl capture.trace
  vfioproxy trace import captures/*.jsonl traces/

DEST/ (or an existing directory) gets one SRC.trace per source; a DEST that
exists is replaced only with --force."""


SLICE_EXAMPLES = """\
examples:
  vfioproxy trace slice session.trace part.trace --seq 100:200
  vfioproxy trace slice session.trace rom.trace -Y 'region == ROM'
  vfioproxy trace slice session.trace late.trace --time 2.5: --session 2
  vfioproxy trace slice session.trace part.trace --seq 100:200 && \\
      vfioproxy replay client part.trace --server dev.sock

OUT keeps IN's header and sequence numbers (#58 is the same message in
both); its header's info.sliced_from names IN, its SHA-256 and the
selection. A kept command keeps its reply and a kept reply its command
(--no-pair: not), and each kept session keeps its open and close and the
VERSION and DMA_MAP/DMA_UNMAP exchanges before its first selected message
(--no-setup: not), so that the slice replays."""

MERGE_EXAMPLES = """\
examples:
  vfioproxy trace merge both.trace host-a.trace host-b.trace
  vfioproxy trace merge runs.trace run-1.trace run-2.trace run-3.trace

Records are ordered by wall-clock time (each trace's header anchors its
clock), sessions renumbered in the order they started; the header's
info.merged_from lists the traces (path, SHA-256, host, source) and each
session's merged_from event names the trace and session it came from."""


def add_trace_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``trace show``, ``stats``, ``export``, ``timeline``, ``diff``, ``import``,
    ``slice`` and ``merge``."""
    trace = commands.add_parser("trace", help="inspect and convert trace files",
                                epilog=f"{SHOW_EXAMPLES}\n  vfioproxy trace import capture.jsonl "
                                "capture.trace")
    trace_commands = trace.add_subparsers(dest="trace_command", metavar="ACTION", required=True)

    def add_decode_options(p: argparse.ArgumentParser, *, json: bool = True) -> None:
        p.add_argument("file", metavar="TRACE", help="trace file")
        p.add_argument("--session", type=int, metavar="N", help="only this session")
        if json:
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
    p_show.add_argument("-x", "--hex", action="store_true",
                        help="after each message, the hexdump of all its bytes, header "
                        "included (as tshark -x)")
    p_show.set_defaults(func=cmd_trace_show)

    p_stats = trace_commands.add_parser(
        "stats", help="messages, bytes, latencies and fds per command", epilog=STATS_EXAMPLES
    )
    add_decode_options(p_stats)
    p_stats.add_argument("--by-step", action="store_true",
                         help="per QEMU realize/reset/running step of each client session")
    p_stats.set_defaults(func=cmd_trace_stats)

    p_export = trace_commands.add_parser(
        "export", help="messages as data: JSON lines, request/reply pairs or CSV",
        epilog=EXPORT_EXAMPLES
    )
    add_decode_options(p_export, json=False)
    p_export.add_argument("--format", choices=export.FORMATS, default="jsonl",
                          help="jsonl (default): one object per record; pairs: one per "
                          "request with its reply; csv: one row per message; parquet: "
                          "typed messages and events tables in -o OUTDIR (needs "
                          "vfioproxy[sql]); pcapng: a packet per record, for Wireshark "
                          "(docs/pcapng.md)")
    p_export.add_argument("out", metavar="OUT", nargs="?",
                          help="output file, as -o OUT (- for stdout)")
    p_export.add_argument("-o", "--output", metavar="OUT",
                          help="output file (default: - for stdout); with --format "
                          "parquet the directory written")
    p_export.add_argument("--force", action="store_true",
                          help="replace an OUT (parquet: its NAME.parquet files) that exists")
    p_export.add_argument("--partition-by", metavar="KEYS",
                          help="parquet: Hive-partition the tables by host, date (UTC) or "
                          "host,date: OUTDIR/TABLE/host=H/date=YYYY-MM-DD/NAME.parquet")
    p_export.add_argument("--steps", action="store_true",
                          help="fill the step field: label each message with its QEMU realize "
                          "step (holds each session's messages until it ends; -Y 'step ...' "
                          "implies it)")
    p_export.add_argument("--follow", action="store_true",
                          help="keep reading a trace that is still being recorded, writing "
                          "(and flushing) its records as they come, until the trace is "
                          "removed, the output pipe closes or Ctrl-C, each exit 0 (not with "
                          "parquet)")
    p_export.set_defaults(func=cmd_trace_export)

    p_query = trace_commands.add_parser(
        "query", help="SQL over traces (DuckDB): tables messages and events",
        epilog=QUERY_EXAMPLES
    )
    p_query.add_argument("sql", metavar="SQL", help="the query, over the views messages and events")
    p_query.add_argument("sources", metavar="TRACE_OR_DIR", nargs="+",
                         help="a trace, or a directory trace export --format parquet wrote")
    query_output = p_query.add_mutually_exclusive_group()
    query_output.add_argument("--csv", action="store_true", help="CSV output")
    query_output.add_argument("--json", action="store_true", help="JSON output, an object a row")
    p_query.add_argument("--max-open-sessions", metavar="N", type=integer(1),
                         default=MAX_OPEN_SESSIONS,
                         help="decode at most N sessions of a trace open at once "
                         "(default: %(default)s)")
    p_query.add_argument("--steps", action="store_true",
                         help="fill the step column of traces given (each message's QEMU realize "
                         "step; holds each session's messages until it ends)")
    p_query.set_defaults(func=cmd_trace_query)

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

    p_diff = trace_commands.add_parser(
        "diff", help="two sessions side by side, field by field; exit 1 when they differ",
        epilog=DIFF_EXAMPLES)
    p_diff.add_argument("a", metavar="A", help="first session: FILE or FILE:SESSION")
    p_diff.add_argument("b", metavar="B", help="second session: FILE or FILE:SESSION")
    add_ignore_options(p_diff)
    p_diff.add_argument("--json", action="store_true",
                        help="JSON output: both sides, counts and every divergence")
    p_diff.add_argument("--context", type=integer(0), default=2, metavar="N",
                        help="equal exchanges shown around each divergent one (default 2)")
    p_diff.add_argument("--all", action="store_true",
                        help="list every divergent exchange (default: the first 10)")
    p_diff.add_argument("-Y", "--filter", metavar="EXPR",
                        help="compare only the exchanges (command and reply) with a message "
                        "this display filter passes, e.g. 'region == config'")
    p_diff.add_argument("--max-messages", type=integer(1), default=DEFAULT_MAX_MESSAGES,
                        metavar="N", help="refuse a session of more messages (both are held "
                        f"in memory; default {DEFAULT_MAX_MESSAGES})")
    p_diff.set_defaults(func=cmd_trace_diff)

    p_import = trace_commands.add_parser(
        "import", help="convert rawcap JSON-lines captures into traces", epilog=IMPORT_EXAMPLES
    )
    p_import.add_argument("sources", nargs="+", metavar="SRC", help="rawcap .jsonl files")
    p_import.add_argument("dest", metavar="DEST",
                          help="trace file, or DIR/ for one trace per source")
    p_import.add_argument("--force", action="store_true", help="replace traces that exist")
    p_import.set_defaults(func=cmd_trace_import)

    p_slice = trace_commands.add_parser(
        "slice", help="a part of a trace as a trace that still replays", epilog=SLICE_EXAMPLES
    )
    p_slice.add_argument("file", metavar="IN", help="trace file to slice")
    p_slice.add_argument("out", metavar="OUT", help="trace file to write")
    p_slice.add_argument("-Y", "--filter", metavar="EXPR",
                         help="only messages this display filter passes (README: Display "
                         "filters), e.g. 'command == REGION_READ'")
    p_slice.add_argument("--seq", metavar="A:B", type=span(int, "sequence numbers", "100:200"),
                         help="only records with sequence numbers A to B (A: or :B open)")
    p_slice.add_argument("--time", metavar="A:B", type=span(float, "seconds", "2.5:4"),
                         help="only records A to B seconds after the trace's first record")
    p_slice.add_argument("--session", type=int, metavar="N", help="only this session")
    p_slice.add_argument("--no-pair", action="store_true",
                         help="do not add the reply of a kept command nor the command of a "
                         "kept reply")
    p_slice.add_argument("--no-setup", action="store_true",
                         help="do not add each kept session's VERSION and DMA_MAP/DMA_UNMAP "
                         "exchanges from before its first selected message")
    p_slice.add_argument("--max-open-sessions", metavar="N", type=integer(1),
                         default=MAX_OPEN_SESSIONS,
                         help="follow (pair, decode) at most N sessions open at once; one more "
                         "drops the one idle the longest (default: %(default)s)")
    p_slice.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p_slice.set_defaults(func=cmd_trace_slice)

    p_merge = trace_commands.add_parser(
        "merge", help="several traces (hosts, runs) as one, in wall-clock order",
        epilog=MERGE_EXAMPLES
    )
    p_merge.add_argument("out", metavar="OUT", help="trace file to write")
    p_merge.add_argument("files", nargs="+", metavar="IN", help="trace files to merge (two or "
                         "more)")
    p_merge.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p_merge.set_defaults(func=cmd_trace_merge)


def _selected(reader: TraceReader, args: argparse.Namespace) -> Iterator[DecodedItem]:
    """The decoded items of ``reader`` that ``--session``, ``-Y`` and ``-c`` keep."""
    items = decoded_records(reader, dialects=dialects(args), session=args.session,
                            max_open_sessions=args.max_open_sessions)
    if args.filter is None and args.count is None:
        return items
    return select(items, args.compiled, args.count, header=reader.header)


def _selected_facts(reader: TraceReader, args: argparse.Namespace, flt: Filter | None,
                    limit: int | None, records: Iterable[Record | Paused] | None = None,
                    ) -> Iterator[tuple[DecodedItem, Facts | None]]:
    """The items ``--session`` and ``flt`` keep (at most ``limit`` messages),
    each message's with its filter fields; step labels only with ``--steps``
    (or a filter on ``step``), which holds each session's messages until it
    ends; the rest streams. ``records``: the reader's, followed (default:
    read once)."""
    items = decoded_records(reader if records is None else records, dialects=dialects(args),
                            session=args.session, max_open_sessions=args.max_open_sessions)
    steps = getattr(args, "steps", False) or (
        args.compiled is not None and "step" in args.compiled.fields)
    return select_facts(items, flt, limit, reader.header, steps=steps)


def _warn_truncated(reader: TraceReader) -> int:
    """Say on stderr what the last pass over ``reader`` could not read: a torn
    tail, and the damaged records it skipped (:func:`damage_lines`). Returns
    the exit status it calls for: 1 when records were skipped, else 0."""
    if reader.truncation is not None:
        print(f"vfioproxy: warning: {reader.path}: {reader.truncation}", file=sys.stderr)
    lines = damage_lines(reader)
    for line in lines:
        print(f"vfioproxy: {line}", file=sys.stderr)
    return 1 if lines else 0


def _open(path: str) -> TraceReader:
    """The trace at ``path``, read past damaged records (:func:`_warn_truncated`
    names them); a rawcap capture given instead is named as one."""
    try:
        return open_trace(path)
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
        if args.json and args.hex:
            raise UsageError("-x is for the text listing: --json lines carry every "
                             "message's bytes as \"hex\"")
        if args.json:  # the same lines as trace export --format jsonl
            kept = _selected_facts(reader, args, args.compiled, args.count)
            export.write_jsonl(kept, sys.stdout)
        else:
            items = _selected(reader, args)
            show.write_lines(show.header_lines(reader.header), sys.stdout)
            show.write_lines(show.text_lines(items, verbose=args.verbose, raw=args.hex), sys.stdout)
        return _warn_truncated(reader)


def cmd_trace_export(args: argparse.Namespace) -> int:
    _compile(args)
    if args.out is not None and args.output is not None and args.out != args.output:
        raise UsageError(f"two outputs: -o {args.output} and {args.out}")
    args.output = args.out or args.output or "-"
    if args.format == "parquet":
        if args.follow:
            raise UsageError("--follow streams records as they come: --format parquet writes "
                             "whole tables (export once the recording ends)")
        return _export_parquet(args)
    if args.partition_by is not None:
        raise UsageError("--partition-by is for --format parquet")
    binary = args.format == "pcapng"
    to_stdout = args.output == "-"
    if binary and to_stdout and sys.stdout.isatty():
        raise UsageError("pcapng is binary: not writing it to a terminal (-o FILE, or pipe "
                         "it: | wireshark -k -i -)")
    if not to_stdout:
        if is_directory(args.output):
            raise UsageError(f"{args.output} is a directory: -o names the one file written")
        claim_file(args.output, force=args.force)
    with _open(args.file) as reader:
        if not args.follow:  # a followed trace may hold the session later
            _check_session(args)
        with contextlib.ExitStack() as stack:
            out: IO[Any]
            if binary:  # buffered even when Python's own stdout is not (-u)
                out = stack.enter_context(open(sys.stdout.fileno() if to_stdout else args.output,
                                               "wb", closefd=not to_stdout))
            else:
                out = sys.stdout if to_stdout else stack.enter_context(
                    open(args.output, "w", encoding="utf-8", newline=""))
            records = reader.follow(idle=_flusher(out)) if args.follow else None
            try:
                _export_to(reader, args, out, records)
            except KeyboardInterrupt:
                if not args.follow:
                    raise
                return 0  # Ctrl-C is how a follower ends
        return _warn_truncated(reader)


def _flusher(out: IO[Any]) -> Callable[[], None]:
    """What a follower calls at each look at the trace: flush ``out`` (show
    what came), and raise BrokenPipeError when no one reads it any more."""
    try:
        fd: int | None = out.fileno()
    except (OSError, ValueError):  # a stream of no file (a test's)
        fd = None

    def idle() -> None:
        out.flush()
        if fd is not None:
            check_reader(fd)
    return idle


def _export_to(reader: TraceReader, args: argparse.Namespace, out: IO[Any],
               records: Iterable[Record | Paused] | None) -> None:
    """Write the records of ``reader`` (``records``: followed) in ``--format``,
    streaming, to ``out``."""
    text = cast(TextIO, out)  # binary for pcapng only
    if args.format == "pairs":  # pairing reads every message; the filter picks pairs
        every = _selected_facts(reader, args, None, None, records)
        export.write_pairs(every, text, args.compiled, args.count)
    else:
        kept = _selected_facts(reader, args, args.compiled, args.count, records)
        if args.format == "pcapng":
            pcapng.write_pcapng(kept, reader.header, cast(BinaryIO, out))
        elif args.format == "jsonl":
            export.write_jsonl(kept, text)
        else:
            export.write_csv(kept, text)
    out.flush()


def _partition_keys(text: str | None) -> tuple[str, ...]:
    """``--partition-by``'s keys: ``host``, ``date`` or ``host,date`` (none without it)."""
    if text is None:
        return ()
    keys = tuple(k.strip() for k in text.split(","))
    if keys not in (("host",), ("date",), parquet.PARTITION_KEYS):
        raise UsageError(f"--partition-by {text!r}: give host, date or host,date")
    return keys


def _export_parquet(args: argparse.Namespace) -> int:
    """``trace export --format parquet -o OUTDIR``: the messages and events tables."""
    if args.output == "-":
        raise UsageError("--format parquet writes a directory: name it with -o OUTDIR")
    if os.path.exists(args.output) and not is_directory(args.output):
        raise UsageError(f"{args.output} is not a directory: -o names the directory "
                         "--format parquet writes")
    partition_by = _partition_keys(args.partition_by)
    parquet.require_pyarrow()
    name = os.path.basename(args.file)
    with _open(args.file) as reader:
        _check_session(args)
        existing = parquet.existing_outputs(args.output, name, reader.header.host, partition_by)
        for path in existing:
            claim_file(path, force=args.force)
        for path in existing if partition_by else ():  # days this export may not write
            os.remove(path)
        kept = _selected_facts(reader, args, args.compiled, args.count)
        parquet.write_parquet(kept, reader.header, name, args.output, partition_by)
        return _warn_truncated(reader)


def cmd_trace_query(args: argparse.Namespace) -> int:
    """``trace query SQL TRACE_OR_DIR...``: traces exported to a temporary
    directory, export directories read as they are, the result printed."""
    for source in args.sources:
        if os.path.isdir(source) and not query.is_export_directory(source):
            raise UsageError(f"{source} is a directory without messages/: give a trace or "
                             "a directory trace export --format parquet wrote")
    status = 0
    with tempfile.TemporaryDirectory(prefix="vfioproxy-query-") as scratch:
        directories = []
        for index, source in enumerate(args.sources):
            if os.path.isdir(source):
                directories.append(source)
                continue
            parquet.require_pyarrow()
            outdir = os.path.join(scratch, str(index))
            with _open(source) as reader:
                parquet.export_trace(reader, outdir, max_open_sessions=args.max_open_sessions,
                                     steps=args.steps)
                status = max(status, _warn_truncated(reader))
            directories.append(outdir)
        result = query.run_query(args.sql, directories)
    if args.csv:
        query.write_csv(result, sys.stdout)
    elif args.json:
        query.write_json(result, sys.stdout)
    else:
        rows = [[query.cell(v) for v in row] for row in result.rows]
        shown = tables.table(None, result.columns, rows, left=len(result.columns))
        show.write_lines(tables.table_lines([shown]), sys.stdout)
    return status


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


def cmd_trace_diff(args: argparse.Namespace) -> int:
    _compile(args)
    scripts = []
    selected: list[frozenset[int] | None] = []
    status = 0
    for operand in (args.a, args.b):
        path, session = parse_operand(operand)
        with _open(path) as reader:
            script = load_session(reader, session, max_messages=args.max_messages)
            scripts.append(script)
            status = max(status, _warn_truncated(reader))
            selected.append(None if args.compiled is None
                            else filtered_seqs(reader, script.session, args.compiled))
    report = diff_scripts(scripts[0], scripts[1], ignore=ignore_rules(args),
                          selected=(selected[0], selected[1]), filter_text=args.filter)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(report.text(context=args.context, all_rows=args.all))
    return max(report.exit_status, status)


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


def cmd_trace_slice(args: argparse.Namespace) -> int:
    _compile(args)
    claim_file(args.out, force=args.force)
    spec = SliceSpec(filter=args.compiled, seq=args.seq, time=args.time, session=args.session,
                     pair=not args.no_pair, setup=not args.no_setup,
                     max_open_sessions=args.max_open_sessions)
    with _open(args.file) as reader:
        _check_session(args)
        result = slice_trace(reader, args.out, spec, overwrite=args.force)
        status = _warn_truncated(reader)
    added = f" ({result.added} added for pairing and setup)" if result.added else ""
    print(f"{args.file} -> {args.out}: {result.messages} messages{added}, "
          f"{result.records} records, sessions {', '.join(map(str, result.sessions)) or 'none'}")
    return status


def cmd_trace_merge(args: argparse.Namespace) -> int:
    if len(args.files) < 2:
        raise UsageError("merging needs at least two traces")
    claim_file(args.out, force=args.force)
    with contextlib.ExitStack() as stack:
        readers = [stack.enter_context(_open(path)) for path in args.files]
        result = merge_traces(readers, args.out, overwrite=args.force)
        status = max(_warn_truncated(reader) for reader in readers)
    for path, sessions in zip(args.files, result.sessions, strict=True):
        renumbered = ", ".join(f"{old} -> {new}" for old, new in sorted(sessions.items()))
        print(f"{path}: sessions {renumbered or 'none'}")
    print(f"-> {args.out}: {result.messages} messages, {result.records} records")
    return status
