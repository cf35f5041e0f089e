"""The ``vfioproxy`` command line: argument parsing and output only."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import resource
import signal
import stat
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import trio

import vfioproxy
from recorder.errors import TraceError
from recorder.reader import TraceReader
from recorder.sink import TraceSink
from vfioproxy.control import control_request, serve_control
from vfioproxy.demo import run_demo
from vfioproxy.errors import VfioProxyError
from vfioproxy.experiment.cli import add_experiment_command
from vfioproxy.inject import Injector, Rule, load_rules, parse_rule
from vfioproxy.io.unix import open_unix_listener
from vfioproxy.live import MessageLog, run_status_line
from vfioproxy.peers.client import RealizeError, RealizeOptions, realize
from vfioproxy.peers.server import DeviceOptions, serve_device
from vfioproxy.protocol.bodies import DmaLayout
from vfioproxy.protocol.codec import Dialects
from vfioproxy.proxy import (
    DEFAULT_GRACE,
    DEFAULT_MAX_MESSAGE_BUFFER,
    DEFAULT_MAX_QUEUE,
    Proxy,
    ProxyOptions,
    fastpath,
)
from vfioproxy.proxy.model import DEFAULT_CONNECT_TIMEOUT, MAX_MESSAGE_BUFFER
from vfioproxy.proxy.tuning import tune_allocator
from vfioproxy.replay.cli import add_replay_commands
from vfioproxy.trace import show, stats
from vfioproxy.trace.decoded import decoded_records
from vfioproxy.trace.rawcap import import_rawcap

LAYOUTS = [layout.value for layout in DmaLayout]


def _dialects(args: argparse.Namespace) -> Dialects | None:
    if args.client_dma is None and args.server_dma is None:
        return None
    return Dialects(
        client=DmaLayout(args.client_dma or DmaLayout.SPEC.value),
        server=DmaLayout(args.server_dma or DmaLayout.SPEC.value),
    )


def _warn_truncated(reader: TraceReader) -> None:
    if reader.truncation is not None:
        print(f"vfioproxy: warning: {reader.path}: {reader.truncation}", file=sys.stderr)


def cmd_trace_show(args: argparse.Namespace) -> int:
    with TraceReader(args.file) as reader:
        items = decoded_records(reader, dialects=_dialects(args), session=args.session)
        if args.json:
            show.write_lines(show.json_lines(items), sys.stdout)
        else:
            show.write_lines(show.header_lines(reader.header), sys.stdout)
            show.write_lines(show.text_lines(items, verbose=args.verbose), sys.stdout)
        _warn_truncated(reader)
    return 0


def cmd_trace_stats(args: argparse.Namespace) -> int:
    with TraceReader(args.file) as reader:
        result = stats.collect(
            decoded_records(reader, dialects=_dialects(args), session=args.session)
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


def _injector(args: argparse.Namespace) -> Injector | None:
    """The rules of ``--rules`` files then ``--rule``s; None when injection is off."""
    rules: list[Rule] = []
    for path in args.rules:
        rules.extend(load_rules(path))
    rules.extend(parse_rule(text) for text in args.rule)
    if not rules and args.control is None and args.seed is None:
        return None
    return Injector(rules, seed=args.seed or 0)


async def _serve_proxy(args: argparse.Namespace, sink: TraceSink | None) -> Proxy:
    tune_allocator()
    raise_fd_limit()
    injector = _injector(args)
    options = ProxyOptions(
        strict=args.strict,
        capture_fd_contents=getattr(args, "capture_fd_contents", 0),
        dialects=_dialects(args),
        decode=not args.no_decode,
        mode=int(args.mode, 8),
        threads=args.forwarding == "threads",
        check_live=args.check_live,
        max_sessions=args.max_sessions,
        max_message_buffer=args.max_message_buffer,
        max_queue=args.max_queue,
        connect_timeout=args.connect_timeout,
    )
    if args.no_decode and args.verbose:
        print("vfioproxy: --no-decode: nothing is decoded on the path, so -v prints no "
              "message lines", file=sys.stderr)
    proxy = Proxy(args.server, sink=sink, options=options,
                  observer=MessageLog() if args.verbose and not args.no_decode else None,
                  injector=injector)
    listener = await open_unix_listener(args.listen, mode=options.mode)
    print(f"vfioproxy: listening on {args.listen}, forwarding to {args.server}"
          + (f", recording to {args.output}" if sink is not None else ""), file=sys.stderr)
    if options.threads and fastpath.without is not None:
        print(f"vfioproxy: no C lane: {fastpath.without}: every message takes the Python path "
              "(the same behaviour, more CPU per message)", file=sys.stderr)
    if injector is not None:
        for rule in injector.rules:
            print(f"vfioproxy: rule {rule.id}: {rule.text}", file=sys.stderr)
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(proxy.serve, listener)
                if args.control is not None:
                    assert injector is not None
                    await nursery.start(functools.partial(
                        serve_control, args.control, proxy, injector, mode=options.mode))
                    print(f"vfioproxy: control socket {args.control}", file=sys.stderr)
                if sys.stderr.isatty() and not args.verbose:
                    nursery.start_soon(run_status_line, proxy)
                async for signum in signals:
                    print(f"\nvfioproxy: {signal.Signals(signum).name}: stopping "
                          f"(grace {args.grace} s)", file=sys.stderr)
                    break
                await proxy.shutdown(args.grace)
                nursery.cancel_scope.cancel()
    finally:
        _remove_socket(args.listen)
    stats = proxy.statistics()
    print(f"vfioproxy: {stats.sessions_total} session(s), "
          f"{stats.c2s.messages} c2s and {stats.s2c.messages} s2c messages"
          + (f", {stats.violations} violation(s)" if proxy.checks_live else ""),
          file=sys.stderr)
    return proxy


def _remove_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def cmd_proxy(args: argparse.Namespace) -> int:
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


def cmd_record(args: argparse.Namespace) -> int:
    info = {
        "listen_path": os.path.abspath(args.listen),
        "server_path": os.path.abspath(args.server),
        "client": args.client_desc,
        "server": args.server_desc,
        "options": {"strict": args.strict, "capture_fd_contents": args.capture_fd_contents},
    }
    with TraceSink(args.output, info=info, fsync=args.fsync, overwrite=args.force) as sink:
        trio.run(_serve_proxy, args, sink)
        files = sink.files()
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
        for rule in answer["rules"]:
            print(f"{rule['id']:>4}  {rule['text']}")
    elif args.op in ("add", "remove"):
        verb = "added" if args.op == "add" else "removed"
        print(f"{verb} rule {answer['rule']['id']}: {answer['rule']['text']}")
    else:
        proxy, inject = answer["proxy"], answer["inject"]
        print(f"sessions {proxy['sessions_active']} active / {proxy['sessions_total']} total, "
              f"c2s {proxy['c2s']['messages']} s2c {proxy['s2c']['messages']} messages, "
              f"{proxy['violations']} violation(s)")
        for rule in inject["rules"]:
            print(f"{rule['rule_id']:>4}  matched {rule['matched']:>7}  applied "
                  f"{rule['applied']:>7}  delay {rule['injected_delay']:.6f} s  {rule['text']}")
    return 0


def cmd_realize(args: argparse.Namespace) -> int:
    options = RealizeOptions(
        workload=args.workload,
        irq=args.irq,
        reset=not args.no_reset,
        ram_fd=not args.no_ram_fd,
        rombar=not args.no_rombar,
        reply_timeout=args.timeout,
        dma_layout=DmaLayout(args.dma_layout),
        posted_writes=not args.no_posted_writes,
    )
    try:
        result = trio.run(realize, args.socket, options)
    except RealizeError as exc:
        print(f"vfioproxy: realize failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(result.summary())
    return 0


def cmd_serve_device(args: argparse.Namespace) -> int:
    options = DeviceOptions(
        vendor_id=int(args.vendor_id, 0),
        device_id=int(args.device_id, 0),
        write_multiple=args.write_multiple,
        client_dma_layout=None if args.dma_layout == "auto" else DmaLayout(args.dma_layout),
    )

    async def serve() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(functools.partial(serve_device, args.socket, options=options))
                print(f"vfioproxy: serving the reference device {options.vendor_id:04x}:"
                      f"{options.device_id:04x} on {args.socket}", file=sys.stderr)
                async for _ in signals:
                    break
                nursery.cancel_scope.cancel()

    trio.run(serve)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    result = trio.run(functools.partial(
        run_demo, args.output, workload=args.workload, irq=args.irq,
        capture_fd_contents=args.capture_fd_contents,
    ))
    print(result.realize.summary())
    print()
    print(f"recorded {result.proxy.c2s.messages + result.proxy.s2c.messages} messages "
          f"to {result.trace}; `vfioproxy trace show {result.trace}` lists them")
    print()
    with TraceReader(result.trace) as reader:
        show.write_lines(stats.text_report(stats.collect(decoded_records(reader))), sys.stdout)
    return 0


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)


def _size_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a size (``_size``) from ``low`` up to ``high`` bytes."""
    def parse(text: str) -> int:
        try:
            value = _size(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a size such as 16M, got {text!r}") from None
        if value < low or (high is not None and value > high):
            wanted = f"at least {low} bytes" if high is None else f"{low} bytes .. {high >> 20}M"
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text}")
        return value

    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def raise_fd_limit() -> None:
    """Let the proxy use as many fds as it may (the soft RLIMIT_NOFILE up to the
    hard one, at most 65536): each session holds two sockets and the fds in flight."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vfioproxy",
        description="Man-in-the-middle proxy, recorder and replay engine for vfio-user.",
    )
    parser.add_argument("--version", action="version", version=f"vfioproxy {vfioproxy.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add_proxy_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--listen", required=True, metavar="CLIENT_SOCK",
                       help="UNIX socket the client (QEMU) connects to")
        p.add_argument("--server", required=True, metavar="SERVER_SOCK",
                       help="UNIX socket of the device server")
        p.add_argument("--mode", default="0600", help="permissions of CLIENT_SOCK (octal)")
        p.add_argument("--strict", action="store_true",
                       help="close a session at its first protocol violation")
        p.add_argument("-v", "--verbose", action="store_true",
                       help="one decoded line per forwarded message")
        p.add_argument("--grace", type=float, default=DEFAULT_GRACE,
                       help="seconds in-flight sessions get after SIGINT/SIGTERM")
        p.add_argument("--no-decode", action="store_true",
                       help="a pure relay: nothing decoded on the path even for -v/--strict")
        p.add_argument("--check-live", action="store_true",
                       help="decode and check every message as it passes: violations are "
                       "logged (rate-limited) and recorded as they happen (by default they "
                       "are derived from the trace when it is read)")
        limits = p.add_argument_group(
            "limits", "what one session or peer may make the proxy hold (see README)")
        limits.add_argument("--max-sessions", type=_positive_int, metavar="N",
                            help="sessions at once; more clients wait in the listen queue "
                            "(default: what the fd limit allows, at most 4096)")
        limits.add_argument("--max-message-buffer", type=_size_in(16, MAX_MESSAGE_BUFFER),
                            metavar="SIZE",
                            default=DEFAULT_MAX_MESSAGE_BUFFER,
                            help="largest message buffered and recorded whole; larger ones "
                            "are handed on as they arrive and recorded truncated "
                            "(default 16M)")
        limits.add_argument("--max-queue", type=_size_in(1), metavar="SIZE",
                            default=DEFAULT_MAX_QUEUE,
                            help="bytes queued for a peer that does not read before the proxy "
                            "stops reading its sender (default 4M, per direction)")
        limits.add_argument("--connect-timeout", type=float, metavar="SECONDS",
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
        inject.add_argument("--seed", type=int, help="seed of every random draw (default 0)")
        inject.add_argument("--control", metavar="CTL_SOCK",
                            help="control socket: change rules while running (vfioproxy ctl)")

    p_proxy = commands.add_parser("proxy", help="relay vfio-user sessions without recording")
    add_proxy_options(p_proxy)
    p_proxy.set_defaults(func=cmd_proxy)

    p_record = commands.add_parser("record", help="relay and record vfio-user sessions")
    add_proxy_options(p_record)
    p_record.add_argument("-o", "--output", required=True, metavar="TRACE",
                          help="trace file, or DIR/ for one file per session")
    p_record.add_argument("--capture-fd-contents", type=_size, default=0, metavar="SIZE",
                          help="record the contents of memfds up to SIZE bytes (e.g. 64k)")
    p_record.add_argument("--fsync", action="store_true", help="fsync every record")
    p_record.add_argument("--force", action="store_true", help="replace an existing trace")
    p_record.add_argument("--client-desc", default="", help="what the client is, for the trace")
    p_record.add_argument("--server-desc", default="", help="what the server is, for the trace")
    p_record.set_defaults(func=cmd_record)

    add_experiment_command(commands)

    p_ctl = commands.add_parser("ctl", help="talk to a running proxy's control socket")
    p_ctl.add_argument("--control", required=True, metavar="CTL_SOCK")
    p_ctl.add_argument("--json", action="store_true", help="print the raw JSON reply")
    ctl = p_ctl.add_subparsers(dest="op", metavar="OP", required=True)
    ctl.add_parser("list", help="the rules in force")
    ctl_add = ctl.add_parser("add", help="add a rule")
    ctl_add.add_argument("rule", help="rule text, e.g. 'c2s * delay 100us'")
    ctl_remove = ctl.add_parser("remove", help="remove a rule")
    ctl_remove.add_argument("id", type=int, help="rule id (see list)")
    ctl.add_parser("stats", help="proxy and per-rule counters")
    p_ctl.set_defaults(func=cmd_ctl)

    p_demo = commands.add_parser(
        "demo", help="reference device <-> recording proxy <-> realize client, then trace stats"
    )
    p_demo.add_argument("-o", "--output", default="demo.trace", help="trace to write")
    p_demo.add_argument("--workload", type=int, default=8, metavar="N", help="doorbells to ring")
    p_demo.add_argument("--irq", choices=["intx", "msix"], default="intx")
    p_demo.add_argument("--capture-fd-contents", type=_size, default=0, metavar="SIZE")
    p_demo.set_defaults(func=cmd_demo)

    p_serve = commands.add_parser("serve-device", help="serve the reference PCI device")
    p_serve.add_argument("--socket", required=True, help="UNIX socket to listen on")
    p_serve.add_argument("--vendor-id", default=hex(DeviceOptions().vendor_id))
    p_serve.add_argument("--device-id", default=hex(DeviceOptions().device_id))
    p_serve.add_argument("--write-multiple", action="store_true",
                         help="offer REGION_WRITE_MULTI in the VERSION reply")
    p_serve.add_argument("--dma-layout", choices=["auto", *LAYOUTS], default="auto",
                         help="layout of the client's DMA replies (auto: from its VERSION)")
    p_serve.add_argument("-v", "--verbose", action="store_true", help="log every request")
    p_serve.set_defaults(func=cmd_serve_device)

    p_realize = commands.add_parser(
        "realize", help="realize a device the way QEMU's vfio-user-pci does"
    )
    p_realize.add_argument("--socket", required=True, help="the device server's UNIX socket")
    p_realize.add_argument("--workload", type=int, default=0, metavar="N",
                           help="after realize, ring the reference device's doorbell N times")
    p_realize.add_argument("--irq", choices=["intx", "msix"], default="intx",
                           help="interrupt the workload waits for")
    p_realize.add_argument("--no-reset", action="store_true", help="skip the machine reset")
    p_realize.add_argument("--no-ram-fd", action="store_true",
                           help="map guest RAM without its memfd (device DMA goes by message)")
    p_realize.add_argument("--no-rombar", action="store_true", help="skip the ROM probe")
    p_realize.add_argument("--no-posted-writes", action="store_true",
                           help="never post BAR writes (QEMU's x-no-posted-writes=on)")
    p_realize.add_argument("--timeout", type=float, default=5.0,
                           help="seconds to wait for each reply (QEMU's x-msg-timeout)")
    p_realize.add_argument("--dma-layout", choices=LAYOUTS, default="qemu",
                           help="layout of this client's DMA_READ/DMA_WRITE replies")
    p_realize.add_argument("--json", action="store_true", help="the result as JSON")
    p_realize.set_defaults(func=cmd_realize)

    add_replay_commands(commands)

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
        where = "" if isinstance(exc, TraceError) else f"{type(exc).__name__}: "
        print(f"vfioproxy: error: {where}{exc}", file=sys.stderr)
        return 1
    return code
