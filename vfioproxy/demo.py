"""``vfioproxy demo``: device server, recording proxy and realize client in one nursery."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import attrs
import trio

from recorder.sink import TraceSink
from vfioproxy.peers.client import IrqMode, RealizeOptions, RealizeResult, realize
from vfioproxy.peers.server import DeviceOptions, serve_device
from vfioproxy.proxy import Proxy, ProxyOptions, ProxyStatistics, open_proxy

#: where ``vfioproxy demo`` records when not told (replaced by the next demo)
DEFAULT_TRACE = "demo.trace"


@attrs.frozen
class DemoResult:
    trace: Path
    realize: RealizeResult
    proxy: ProxyStatistics


async def run_demo(
    trace: str | os.PathLike[str],
    *,
    workload: int = 8,
    irq: IrqMode = "intx",
    capture_fd_contents: int = 0,
    overwrite: bool = False,
) -> DemoResult:
    """Record one realize (+ reset + ``workload`` doorbells) of the reference
    device through the proxy into the file ``trace`` (an existing one is
    replaced only with ``overwrite``)."""
    target = Path(trace)
    with tempfile.TemporaryDirectory(prefix="vfioproxy-demo-") as tmp:
        device_sock = Path(tmp) / "device.sock"
        proxy_sock = Path(tmp) / "proxy.sock"
        info = {
            "client": "vfioproxy realize (QEMU 10.2 vfio-user-pci realize sequence)",
            "server": "vfioproxy serve-device (reference device)",
            "listen_path": str(proxy_sock),
            "server_path": str(device_sock),
            "options": {"capture_fd_contents": capture_fd_contents, "demo": True},
        }
        with TraceSink(target, info=info, overwrite=overwrite) as sink:
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_device, device_sock)
                proxy: Proxy
                # the peers run in this process: trio tasks beside them, not a
                # forwarding thread trading the GIL with them at every message
                options = ProxyOptions(capture_fd_contents=capture_fd_contents, threads=False)
                async with open_proxy(proxy_sock, device_sock, sink=sink,
                                      options=options) as proxy:
                    result = await realize(
                        proxy_sock, RealizeOptions(workload=workload, irq=irq)
                    )
                    with trio.fail_after(5):
                        await proxy.wait_sessions()
                    stats = proxy.statistics()
                nursery.cancel_scope.cancel()
    return DemoResult(target, result, stats)


__all__ = ["DEFAULT_TRACE", "DemoResult", "DeviceOptions", "run_demo"]
