"""``vfioproxy demo``, ``serve-device`` and ``realize``: the reference peers."""

from __future__ import annotations

import argparse
import functools
import json
import signal
import sys

import trio

from recorder.reader import TraceReader
from vfioproxy.cli.args import LAYOUTS, size
from vfioproxy.demo import run_demo
from vfioproxy.peers.client import RealizeError, RealizeOptions, realize
from vfioproxy.peers.server import DeviceOptions, serve_device
from vfioproxy.protocol.bodies import DmaLayout
from vfioproxy.trace import show, stats
from vfioproxy.trace.decoded import decoded_records

__all__ = ["add_peer_commands"]


def add_peer_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``demo``, ``serve-device`` and ``realize``."""
    p_demo = commands.add_parser(
        "demo", help="reference device <-> recording proxy <-> realize client, then trace stats"
    )
    p_demo.add_argument("-o", "--output", default="demo.trace", help="trace to write")
    p_demo.add_argument("--workload", type=int, default=8, metavar="N", help="doorbells to ring")
    p_demo.add_argument("--irq", choices=["intx", "msix"], default="intx")
    p_demo.add_argument("--capture-fd-contents", type=size, default=0, metavar="SIZE")
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
