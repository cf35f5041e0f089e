"""``vfioproxy demo``, ``serve-device`` and ``realize``: the reference peers."""

from __future__ import annotations

import argparse
import functools
import json
import signal
import sys

import trio

from recorder.reader import TraceReader
from vfioproxy.cli.args import LAYOUTS
from vfioproxy.demo import DEFAULT_TRACE, run_demo
from vfioproxy.peers.client import RealizeOptions, realize
from vfioproxy.peers.endpoint import DEFAULT_REPLY_TIMEOUT
from vfioproxy.peers.server import DeviceOptions, serve_device
from vfioproxy.protocol.bodies import DmaLayout
from vfioproxy.trace import show, stats
from vfioproxy.trace.decoded import decoded_records
from vfioproxy.usage.output import claim_file, fresh_file, is_directory
from vfioproxy.usage.types import integer, pci_id, seconds, size_in

__all__ = ["add_peer_commands"]

DEMO_EXAMPLES = f"""\
examples:
  vfioproxy demo
  vfioproxy demo --irq msix --workload 100 -o run.trace

Without -o the demo writes {DEFAULT_TRACE}, replacing the previous demo's; an
-o TRACE that exists is replaced only with --force; -o DIR/ (or an existing
directory) gets a new file there (demo.trace, demo-2.trace, ...)."""

SERVE_EXAMPLES = """\
examples:
  vfioproxy serve-device --socket /tmp/device.sock
  vfioproxy serve-device --socket /tmp/device.sock --vendor-id 0xdead --device-id 0xbeef -v

SIGINT/SIGTERM stop it (exit 0)."""

REALIZE_EXAMPLES = """\
examples:
  vfioproxy realize --socket /tmp/device.sock
  vfioproxy realize --socket /tmp/proxy.sock --workload 8 --irq msix --json
  vfioproxy realize --socket /tmp/device.sock --workload 2 -v"""


def add_peer_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``demo``, ``serve-device`` and ``realize``."""
    p_demo = commands.add_parser(
        "demo", help="reference device <-> recording proxy <-> realize client, then trace stats",
        epilog=DEMO_EXAMPLES,
    )
    p_demo.add_argument("-o", "--output", metavar="TRACE",
                        help=f"trace file, or DIR/ for a new file in DIR (default {DEFAULT_TRACE})")
    p_demo.add_argument("--force", action="store_true",
                        help="replace an existing trace file given as -o TRACE")
    p_demo.add_argument("--workload", type=integer(0), default=8, metavar="N",
                        help="doorbells to ring after realize (default 8)")
    p_demo.add_argument("--irq", choices=["intx", "msix"], default="intx",
                        help="interrupt the workload waits for (default intx)")
    p_demo.add_argument("--capture-fd-contents", type=size_in(0), default=0, metavar="SIZE",
                        help="record the contents of memfds up to SIZE bytes (e.g. 64k)")
    p_demo.set_defaults(func=cmd_demo)

    p_serve = commands.add_parser("serve-device", help="serve the reference PCI device",
                                  epilog=SERVE_EXAMPLES)
    p_serve.add_argument("--socket", required=True, metavar="SOCK",
                         help="UNIX socket to listen on")
    device = DeviceOptions()
    p_serve.add_argument("--vendor-id", type=pci_id, default=device.vendor_id, metavar="ID",
                         help=f"PCI vendor id, 0x0000..0xffff (default {device.vendor_id:#06x})")
    p_serve.add_argument("--device-id", type=pci_id, default=device.device_id, metavar="ID",
                         help=f"PCI device id, 0x0000..0xffff (default {device.device_id:#06x})")
    p_serve.add_argument("--no-rom", action="store_true",
                         help="a device without expansion ROM (region 6 of size 0, ROM BAR 0)")
    p_serve.add_argument("--write-multiple", action="store_true",
                         help="offer REGION_WRITE_MULTI in the VERSION reply")
    p_serve.add_argument("--dma-layout", choices=["auto", *LAYOUTS], default="auto",
                         help="layout of the client's DMA replies (auto: from its VERSION)")
    p_serve.add_argument("-v", "--verbose", action="store_true", help="log every request")
    p_serve.set_defaults(func=cmd_serve_device)

    p_realize = commands.add_parser(
        "realize", help="realize a device the way QEMU's vfio-user-pci does",
        epilog=REALIZE_EXAMPLES,
    )
    p_realize.add_argument("--socket", required=True, metavar="SOCK",
                           help="the device server's UNIX socket")
    p_realize.add_argument("--workload", type=integer(0), default=0, metavar="N",
                           help="after realize, ring the reference device's doorbell N times")
    p_realize.add_argument("--irq", choices=["intx", "msix"], default="intx",
                           help="interrupt the workload waits for")
    p_realize.add_argument("--no-reset", action="store_true", help="skip the machine reset")
    p_realize.add_argument("--no-ram-fd", action="store_true",
                           help="map guest RAM without its memfd (device DMA goes by message)")
    p_realize.add_argument("--no-rombar", action="store_true", help="skip the ROM probe")
    p_realize.add_argument("--rom-load", action="store_true",
                           help="after the reset, read the ROM as a guest's BIOS makes QEMU do "
                           "(GET_REGION_INFO and REGION_READ of region 6)")
    p_realize.add_argument("--no-posted-writes", action="store_true",
                           help="never post BAR writes (QEMU's x-no-posted-writes=on)")
    p_realize.add_argument("--timeout", type=seconds(), default=DEFAULT_REPLY_TIMEOUT,
                           metavar="SECONDS",
                           help="seconds to wait for each reply (QEMU's x-msg-timeout, "
                           f"default {DEFAULT_REPLY_TIMEOUT:g})")
    p_realize.add_argument("--dma-layout", choices=LAYOUTS, default="qemu",
                           help="layout of this client's DMA_READ/DMA_WRITE replies")
    p_realize.add_argument("--json", action="store_true", help="the result as JSON")
    p_realize.add_argument("-v", "--verbose", action="store_true",
                           help="also list every command sent with its step (R1..R14, S1..S7, "
                           "guest-reset, bar-mmio, intx-eoi, ...)")
    p_realize.set_defaults(func=cmd_realize)


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
        rom_load=args.rom_load,
    )
    result = trio.run(realize, args.socket, options)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(result.summary())
        if args.verbose:
            print("\n".join(step.text() for step in result.steps))
    return 0


def cmd_serve_device(args: argparse.Namespace) -> int:
    options = DeviceOptions(
        vendor_id=args.vendor_id,
        device_id=args.device_id,
        write_multiple=args.write_multiple,
        rom=not args.no_rom,
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
    output = DEFAULT_TRACE if args.output is None else args.output
    replace = args.output is None or args.force  # the default output is the demo's own
    if is_directory(output):
        output = str(fresh_file(output, DEFAULT_TRACE))
    else:
        claim_file(output, force=replace)
    result = trio.run(functools.partial(
        run_demo, output, workload=args.workload, irq=args.irq,
        capture_fd_contents=args.capture_fd_contents, overwrite=replace,
    ))
    print(result.realize.summary())
    print()
    print(f"recorded {result.proxy.c2s.messages + result.proxy.s2c.messages} messages "
          f"to {result.trace}; `vfioproxy trace show {result.trace}` lists them")
    print()
    with TraceReader(result.trace) as reader:
        show.write_lines(stats.text_report(stats.collect(decoded_records(reader))), sys.stdout)
    return 0
