"""``vfioproxy proxy``, ``record`` and ``ctl``: the proxy and its control socket."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import resource
import signal
import stat
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from recorder.errors import TraceError
from recorder.reader import TraceReader
from recorder.records import TraceHeader
from recorder.sink import TraceSink
from vfioproxy.cli.args import LAYOUTS, dialects
from vfioproxy.errors import UsageError
from vfioproxy.inject import Injector, Rule, load_rules_file, parse_rule
from vfioproxy.interpose import InterposeOptions, IovaRange
from vfioproxy.proxy import (
    DEFAULT_GRACE,
    DEFAULT_MAX_MESSAGE_BUFFER,
    DEFAULT_MAX_QUEUE,
    Proxy,
    ProxyOptions,
    fastpath,
)
from vfioproxy.proxy.control import control_request, serve_control
from vfioproxy.proxy.core import open_proxy_listener
from vfioproxy.proxy.live import MessageLog, StatusLine, run_status_line
from vfioproxy.proxy.model import DEFAULT_CONNECT_TIMEOUT, MAX_MESSAGE_BUFFER
from vfioproxy.proxy.refusal import check_not_itself
from vfioproxy.proxy.tuning import tune_allocator
from vfioproxy.trace import stats
from vfioproxy.trace.decoded import decoded_records
from vfioproxy.trace.filter import compile_filter
from vfioproxy.trace.tables import table, table_lines
from vfioproxy.usage.output import claim_file, is_directory
from vfioproxy.usage.types import integer, octal_mode, seconds, size_in

__all__ = ["add_ctl_command", "add_proxy_commands", "raise_fd_limit"]

PROXY_EXAMPLES = """\
examples:
  vfioproxy proxy --listen /tmp/proxy.sock --server /tmp/device.sock -v
  vfioproxy proxy --listen /tmp/proxy.sock --server /tmp/device.sock \\
      -Y 'region == CONFIG and dir == c2s'
  vfioproxy proxy --listen /tmp/proxy.sock --server /tmp/device.sock \\
      --rule 'c2s REGION_READ delay 200us' --control /tmp/ctl.sock"""

RECORD_EXAMPLES = """\
examples:
  vfioproxy record --listen /tmp/proxy.sock --server /tmp/device.sock -o session.trace
  vfioproxy record --listen /tmp/proxy.sock --server /tmp/device.sock -o traces/ \\
      --capture-fd-contents 64k
  vfioproxy record --listen /tmp/proxy.sock --server /tmp/device.sock -o session.trace \\
      -Y 'kind == error or violation or latency > 1000'
  vfioproxy record --listen /tmp/proxy.sock --server /tmp/device.sock -o session.trace \\
      --trap-dma 0x0-0xc0000 --trap-dma 0x100000+0x1ff00000

-o TRACE writes every session into one file (an existing one only with --force);
-o DIR/ (or an existing directory) writes one new file per session.
SIGINT/SIGTERM stop it (exit 0)."""

CTL_EXAMPLES = """\
examples:
  vfioproxy ctl --control /tmp/ctl.sock list
  vfioproxy ctl --control /tmp/ctl.sock add 'c2s DEVICE_RESET error EIO'"""


def add_proxy_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``proxy`` and ``record``."""
    def add_proxy_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--listen", required=True, metavar="CLIENT_SOCK",
                       help="UNIX socket the client (QEMU) connects to")
        p.add_argument("--server", required=True, metavar="SERVER_SOCK",
                       help="UNIX socket of the device server")
        p.add_argument("--mode", type=octal_mode, default=0o600, metavar="MODE",
                       help="permissions of CLIENT_SOCK and CTL_SOCK, octal (default 0600)")
        p.add_argument("--strict", action="store_true",
                       help="close a session at its first protocol violation")
        p.add_argument("-v", "--verbose", action="store_true",
                       help="one line per forwarded message, as `trace show` prints it "
                       "(on a terminal, above the status line)")
        p.add_argument("-Y", "--filter", metavar="EXPR",
                       help="print only the messages this display filter passes (implies -v), "
                       "e.g. 'command == REGION_READ and region == ROM'; not step, inject or "
                       "fd.kind (README: Display filters)")
        p.add_argument("--grace", type=seconds(zero=True), default=DEFAULT_GRACE,
                       metavar="SECONDS",
                       help=f"seconds in-flight sessions get after SIGINT/SIGTERM "
                       f"(default {DEFAULT_GRACE:g})")
        p.add_argument("--no-decode", action="store_true",
                       help="a pure relay: nothing decoded on the path even for -v/--strict")
        p.add_argument("--check-live", action="store_true",
                       help="decode and check every message as it passes: violations are "
                       "logged (rate-limited) and recorded as they happen (by default they "
                       "are derived from the trace when it is read)")
        limits = p.add_argument_group(
            "limits", "what one session or peer may make the proxy hold (see README)")
        limits.add_argument("--max-sessions", type=integer(1), metavar="N",
                            help="sessions at once; more clients wait in the listen queue "
                            "(default: what the fd limit allows, at most 4096)")
        limits.add_argument("--max-message-buffer", type=size_in(16, MAX_MESSAGE_BUFFER),
                            metavar="SIZE",
                            default=DEFAULT_MAX_MESSAGE_BUFFER,
                            help="largest message buffered and recorded whole; larger ones "
                            "are handed on as they arrive and recorded truncated "
                            "(default 16M)")
        limits.add_argument("--max-queue", type=size_in(1), metavar="SIZE",
                            default=DEFAULT_MAX_QUEUE,
                            help="bytes queued for a peer that does not read before the proxy "
                            "stops reading its sender (default 4M, per direction)")
        limits.add_argument("--connect-timeout", type=seconds(), metavar="SECONDS",
                            default=DEFAULT_CONNECT_TIMEOUT,
                            help="how long to retry a server whose listen queue is full "
                            "(default 5)")
        p.add_argument("--forwarding", choices=("threads", "trio"), default="threads",
                       help="forward on a blocking thread per direction (default, fastest) "
                       "or on trio tasks (always so with fault injection)")
        p.add_argument("--client-dma", choices=LAYOUTS, help="client DMA layout (else detected)")
        p.add_argument("--server-dma", choices=LAYOUTS, help="server DMA layout (spec)")
        inject = p.add_argument_group(
            "fault injection", "rules: DIRECTION COMMANDS [FILTERS] ACTION, e.g. "
            "'c2s REGION_READ delay normal(200us,50us)' (see README)")
        inject.add_argument("--rule", action="append", default=[], metavar="RULE",
                            help="an injection rule (repeatable)")
        inject.add_argument("--rules", action="append", default=[], metavar="FILE.toml",
                            help="injection rules from a TOML file (repeatable)")
        inject.add_argument("--seed", type=integer(), metavar="N",
                            help="seed of every random draw (default 0)")
        interpose = p.add_argument_group(
            "interposition", "rewrite the session so that what does not cross the socket "
            "does (also an [interpose] table in a --rules file)")
        interpose.add_argument("--trap-mmap", action="store_true",
                               help="map no region: every BAR access becomes a REGION_READ/"
                               "REGION_WRITE message (REGION_INFO replies lose MMAP and "
                               "sparse-mmap, their fds are withheld)")
        interpose.add_argument("--trap-dma", nargs="?", action="append", type=_iova_range,
                               metavar="IOVA-RANGE",
                               help="DMA_MAP windows lose their fd, so the server reaches "
                               "guest memory with DMA_READ/DMA_WRITE messages: every window, "
                               "or those overlapping IOVA-RANGE (START-END or START+SIZE, "
                               "repeatable; a window is trapped whole)")
        interpose.add_argument("--interpose-irqs", action="store_true",
                               help="stand in for every SET_IRQS eventfd: each interrupt is "
                               "recorded as an irq event, then passed on to the client "
                               "(irq rules can delay or drop it)")
        inject.add_argument("--control", metavar="CTL_SOCK",
                            help="control socket: change rules while running (vfioproxy ctl)")

    p_proxy = commands.add_parser("proxy", help="relay vfio-user sessions without recording",
                                  epilog=PROXY_EXAMPLES)
    add_proxy_options(p_proxy)
    p_proxy.set_defaults(func=cmd_proxy)

    p_record = commands.add_parser("record", help="relay and record vfio-user sessions",
                                   epilog=RECORD_EXAMPLES)
    add_proxy_options(p_record)
    p_record.add_argument("-o", "--output", required=True, metavar="TRACE",
                          help="trace file, or DIR/ for one file per session")
    p_record.add_argument("--capture-fd-contents", type=size_in(0), default=0, metavar="SIZE",
                          help="record the contents of memfds up to SIZE bytes (e.g. 64k)")
    p_record.add_argument("--fsync", action="store_true", help="fsync every record")
    p_record.add_argument("--force", action="store_true",
                          help="replace an existing trace file given as -o TRACE")
    p_record.add_argument("--client-desc", default="", metavar="TEXT",
                          help="what the client is, for the trace header")
    p_record.add_argument("--server-desc", default="", metavar="TEXT",
                          help="what the server is, for the trace header")
    p_record.set_defaults(func=cmd_record)


def add_ctl_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``ctl``."""
    p_ctl = commands.add_parser("ctl", help="talk to a running proxy's control socket",
                                epilog=CTL_EXAMPLES)
    p_ctl.add_argument("--control", required=True, metavar="CTL_SOCK",
                       help="the control socket of a proxy started with --control CTL_SOCK")
    p_ctl.add_argument("--json", action="store_true", help="print the raw JSON reply")
    ctl = p_ctl.add_subparsers(dest="op", metavar="OP", required=True)

    def example(op: str) -> str:
        return f"example:\n  vfioproxy ctl --control /tmp/ctl.sock {op}"

    ctl.add_parser("list", help="the rules in force", epilog=example("list"))
    ctl_add = ctl.add_parser("add", help="add a rule",
                             epilog=example("add 'c2s DEVICE_RESET error EIO'"))
    ctl_add.add_argument("rule", metavar="RULE", help="rule text, e.g. 'c2s * delay 100us'")
    ctl_remove = ctl.add_parser("remove", help="remove a rule", epilog=example("remove 2"))
    ctl_remove.add_argument("id", type=integer(1), metavar="ID", help="rule id (see list)")
    ctl.add_parser("stats", help="proxy and per-rule counters", epilog=example("stats"))
    p_ctl.set_defaults(func=cmd_ctl)


def _injector(args: argparse.Namespace) -> tuple[Injector | None, InterposeOptions]:
    """The rules of ``--rules`` files then ``--rule``s (None when injection is
    off), and the interposition modes the flags and the files' ``[interpose]``
    tables turn on (a mode on in any of them is on)."""
    rules: list[Rule] = []
    tables: dict[str, Any] = {}
    for path in args.rules:
        file_rules, table = load_rules_file(path)
        rules.extend(file_rules)
        merged = InterposeOptions.from_dict(table, f"{path}: [interpose]")
        tables = _merge_interpose(tables, merged.to_dict())
    flags = InterposeOptions(
        trap_mmap=args.trap_mmap,
        trap_dma=_trap_dma(args.trap_dma),
        interpose_irqs=args.interpose_irqs,
    )
    interpose = InterposeOptions.from_dict(_merge_interpose(tables, flags.to_dict()))
    rules.extend(parse_rule(text) for text in args.rule)
    if not rules and args.control is None and args.seed is None:
        return None, interpose
    return Injector(rules, seed=args.seed or 0), interpose


def _iova_range(text: str) -> IovaRange:
    """An argparse type: an IOVA range (:meth:`IovaRange.parse`)."""
    try:
        return IovaRange.parse(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _trap_dma(given: list[IovaRange | None] | None) -> tuple[IovaRange, ...] | None:
    """``--trap-dma`` as :attr:`InterposeOptions.trap_dma`: None when absent,
    every window (``()``) when one of them names no range."""
    if given is None:
        return None
    if any(r is None for r in given):
        return ()
    return tuple(r for r in given if r is not None)


def _merge_interpose(one: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Two ``[interpose]`` maps as one: a mode on in either is on; IOVA ranges
    add up (every window when either traps every window)."""
    out = dict(one)
    for key, value in other.items():
        if key == "trap-dma" and key in out:
            out[key] = [] if not (out[key] and value) else out[key] + value
        else:
            out[key] = value
    return out


async def _serve_proxy(
    args: argparse.Namespace, open_sink: Callable[[], TraceSink] | None
) -> list[Path]:
    """Listen, then open the trace (``open_sink``: none for ``proxy``), serve
    until SIGINT/SIGTERM; the trace files written. The trace is opened only
    once the socket listens: a start that fails replaces no earlier trace."""
    tune_allocator()
    raise_fd_limit()
    injector, interpose = _injector(args)
    options = ProxyOptions(
        strict=args.strict,
        capture_fd_contents=getattr(args, "capture_fd_contents", 0),
        dialects=dialects(args),
        decode=not args.no_decode,
        mode=args.mode,
        threads=args.forwarding == "threads",
        check_live=args.check_live,
        max_sessions=args.max_sessions,
        max_message_buffer=args.max_message_buffer,
        max_queue=args.max_queue,
        connect_timeout=args.connect_timeout,
        interpose=interpose,
    )
    if args.no_decode and args.verbose and args.filter is None:
        print("vfioproxy: --no-decode: nothing is decoded on the path, so -v prints no "
              "message lines", file=sys.stderr)
    # on a terminal the status line stays below the -v lines
    status = StatusLine(sys.stderr) if sys.stderr.isatty() else None
    observer = None
    if args.verbose and not args.no_decode:
        observer = MessageLog(sys.stdout, status if sys.stdout.isatty() else None,
                              accept=args.accept)
    listener = await open_proxy_listener(args.listen, args.server, mode=options.mode)
    try:
        async with listener:
            with open_sink() if open_sink is not None else contextlib.nullcontext() as sink:
                proxy = Proxy(args.server, sink=sink, options=options, observer=observer,
                              injector=injector)
                await _run_proxy(args, proxy, listener, status)
                files = sink.files() if sink is not None else []
    finally:
        _remove_socket(args.listen)
    stats = proxy.statistics()
    print(f"vfioproxy: {stats.sessions_total} session(s), "
          f"{stats.c2s.messages} c2s and {stats.s2c.messages} s2c messages"
          + (f", {stats.violations} violation(s)" if proxy.checks_live else ""),
          file=sys.stderr)
    return files


async def _run_proxy(args: argparse.Namespace, proxy: Proxy, listener: trio.SocketListener,
                     status: StatusLine | None) -> None:
    injector = proxy.injector
    sink = proxy.sink
    print(f"vfioproxy: listening on {args.listen}, forwarding to {args.server}"
          + (f", recording to {args.output}" if sink is not None else ""), file=sys.stderr)
    if proxy.options.threads and fastpath.without is not None:
        print(f"vfioproxy: no C lane: {fastpath.without}: every message takes the Python path "
              "(the same behaviour, more CPU per message)", file=sys.stderr)
    if injector is not None:
        for rule in injector.rules:
            print(f"vfioproxy: rule {rule.id}: {rule.text}", file=sys.stderr)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.serve, listener)
            if args.control is not None:
                assert injector is not None
                await nursery.start(functools.partial(
                    serve_control, args.control, proxy, injector, mode=proxy.options.mode))
                print(f"vfioproxy: control socket {args.control}", file=sys.stderr)
            if status is not None:
                nursery.start_soon(run_status_line, proxy, status)
            async for signum in signals:
                print(f"\nvfioproxy: {signal.Signals(signum).name}: stopping "
                      f"(grace {args.grace} s)", file=sys.stderr)
                break
            await proxy.shutdown(args.grace)
            nursery.cancel_scope.cancel()


def _remove_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def _live_filter(args: argparse.Namespace) -> None:
    """``args.accept``: ``-Y``'s filter, compiled once for the live view
    (``-Y`` implies ``-v``), before anything starts; None without ``-Y``."""
    args.accept = None
    if args.filter is None:
        return
    if args.no_decode:
        raise UsageError("-Y filters the decoded -v lines: --no-decode decodes nothing")
    flt = compile_filter(args.filter, live=True)
    args.verbose = True
    # the wall clock of the live view's times, anchored now as a trace header anchors its own
    args.accept = flt.on_observations(TraceHeader.now("live view").wall_time)


def cmd_proxy(args: argparse.Namespace) -> int:
    _live_filter(args)
    trio.run(_serve_proxy, args, None)
    return 0


def _report_violations(files: list[Path]) -> None:
    """Derive each recorded session's violations from the trace, off the
    forwarding path, and print a line per session that had any."""
    try:
        for path in files:
            with TraceReader(path) as reader:
                found = stats.violations_by_session(decoded_records(reader))
            for session, kinds in sorted(found.items()):
                listed = ", ".join(f"{kind} x{n}" for kind, n in sorted(kinds.items()))
                print(f"vfioproxy: {path} session {session}: {sum(kinds.values())} "
                      f"violation(s): {listed} (`vfioproxy trace show` lists them)",
                      file=sys.stderr)
            if not found:
                print(f"vfioproxy: {path}: no protocol violations", file=sys.stderr)
    except KeyboardInterrupt:
        print("vfioproxy: violation check skipped", file=sys.stderr)


def _discard_if_empty(path: Path) -> None:
    """Remove the trace a ``record`` that failed to start created, when it holds
    nothing but its header (a failed start leaves no file in the way of the next)."""
    try:
        with TraceReader(path) as reader:
            empty = next(iter(reader), None) is None
    except (OSError, TraceError):
        return
    if empty:
        path.unlink(missing_ok=True)


def cmd_record(args: argparse.Namespace) -> int:
    _live_filter(args)
    if not is_directory(args.output):
        claim_file(args.output, force=args.force)
    info = {
        "listen_path": os.path.abspath(args.listen),
        "server_path": os.path.abspath(args.server),
        "client": args.client_desc,
        "server": args.server_desc,
        "options": {"strict": args.strict, "capture_fd_contents": args.capture_fd_contents},
    }
    check_not_itself(args.listen, args.server)  # before the trace is created
    fresh = not is_directory(args.output) and not os.path.lexists(args.output)
    def open_sink() -> TraceSink:
        return TraceSink(args.output, info=info, fsync=args.fsync, overwrite=args.force)

    try:
        files = trio.run(_serve_proxy, args, open_sink)
    except BaseException:
        if fresh:
            _discard_if_empty(Path(args.output))
        raise
    for path in files:
        print(f"vfioproxy: wrote {path}", file=sys.stderr)
    _report_violations(files)
    return 0


def cmd_ctl(args: argparse.Namespace) -> int:
    request: dict[str, object] = {"op": args.op}
    if args.op == "add":
        request["rule"] = args.rule
    elif args.op == "remove":
        request["id"] = args.id
    answer = control_request(args.control, request)
    if args.json:
        print(json.dumps(answer, indent=2))
    elif args.op == "list":
        print(f"seed {answer['seed']}")
        _print_table(("id", "rule"), [(rule["id"], rule["text"]) for rule in answer["rules"]],
                     left=0)
    elif args.op in ("add", "remove"):
        verb = "added" if args.op == "add" else "removed"
        print(f"{verb} rule {answer['rule']['id']}: {answer['rule']['text']}")
    else:
        proxy, inject = answer["proxy"], answer["inject"]
        print(f"sessions {proxy['sessions_active']} active / {proxy['sessions_total']} total, "
              f"c2s {proxy['c2s']['messages']} s2c {proxy['s2c']['messages']} messages, "
              f"{proxy['violations']} violation(s)")
        _print_table(("id", "matched", "applied", "delay s", "rule"),
                     [(rule["rule_id"], rule["matched"], rule["applied"],
                       f"{rule['injected_delay']:.6f}", rule["text"])
                      for rule in inject["rules"]], left=0)
    return 0


def _print_table(columns: Sequence[str], rows: Sequence[Sequence[object]], *,
                 left: int) -> None:
    """A table of ``rows`` laid out as ``trace stats`` lays its tables out (its
    last column, the rule text, left-aligned); nothing when there are no rows."""
    if rows:
        layout = table(None, columns, rows, left=left, text_last=True)
        print("\n".join(table_lines([layout])))


def raise_fd_limit() -> None:
    """Let the proxy use as many fds as it may (the soft RLIMIT_NOFILE up to the
    hard one, at most 65536): each session holds two sockets and the fds in flight."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
