"""(1) `vfioproxy realize` against libvfio-user's real device servers, through `vfioproxy record`.

The servers are ``samples/server`` (0xdead:0xbeef, an 8-byte BAR0 and a
16 KiB BAR1 with two sparse-mmap areas backed by a file that travels with the
region-info reply) and ``samples/gpio-pci-idio-16`` (0x494f:0x0dc8, a
256-byte BAR2). QEMU 10.2 was captured realizing both
(``traces/qemu-realize-*.trace``): what those servers answered QEMU is what
they offer, and the realize client's view must match it.

Found: run through ``vfioproxy record``, the realize client's c2s stream is
byte-identical to what QEMU sent, message for message and fd for fd, and the
servers' s2c stream is byte-identical to what they sent QEMU: nothing
legitimately differs. The view is the same direct and through the proxy.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.interop.conftest import SUMMARY, LvuBuild
from tests.interop.peers import VFIOPROXY, Peers
from tests.interop.tracecheck import Recording, read_recording
from tests.realdata import TRACES
from vfioproxy.protocol.bodies import (
    DeviceInfoBody,
    IrqInfoBody,
    RegionAccessBody,
    RegionInfoBody,
    SparseMmapCap,
)
from vfioproxy.protocol.header import Command
from vfioproxy.side import Direction

ERR_IRQ = 3
CONFIG_REGION = 7


@attrs.frozen
class Served:
    name: str
    binary: Callable[[LvuBuild], Path]
    capture: str
    vendor_device: tuple[int, int]
    bars: dict[int, int]  # BAR index -> size
    exits_after_client: bool  # samples/server serves one client; gpio re-attaches


SERVERS = [
    Served("samples-server", lambda b: b.server, "qemu-realize-libvfio-user-server-001.trace",
           (0xDEAD, 0xBEEF), {0: 8, 1: 0x4000}, exits_after_client=True),
    Served("gpio-pci-idio-16", lambda b: b.gpio, "qemu-realize-gpio-001.trace",
           (0x494F, 0x0DC8), {2: 0x100}, exits_after_client=False),
]


@attrs.frozen
class Offered:
    """What a server answered QEMU in a capture: the device it offers."""

    device: DeviceInfoBody
    regions: dict[int, RegionInfoBody]
    region_fds: dict[int, int]
    config: bytes
    err_irq: IrqInfoBody


def offered_in(capture: Recording) -> Offered:
    regions: dict[int, RegionInfoBody] = {}
    region_fds: dict[int, int] = {}
    device = config = err_irq = None
    for item in capture.messages:
        message = item.observation.message
        if item.record.direction is not Direction.S2C or not message.is_reply:
            continue
        body = message.body
        if isinstance(body, DeviceInfoBody):
            device = body
        elif isinstance(body, RegionInfoBody):
            regions[body.index] = body  # the last answer (after "ask again with argsz")
            region_fds[body.index] = len(item.record.fds)
        elif isinstance(body, IrqInfoBody) and body.index == ERR_IRQ:
            err_irq = body
        elif (isinstance(body, RegionAccessBody) and message.command == Command.REGION_READ
              and body.region == CONFIG_REGION and body.offset == 0 and body.count == 256):
            config = body.data
    assert device is not None and config is not None and err_irq is not None
    return Offered(device, regions, region_fds, config, err_irq)


def realize_json(socket: Path) -> dict[str, Any]:
    result = subprocess.run([*VFIOPROXY, "realize", "--socket", str(socket), "--json"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def start_server(peers: Peers, served: Served, lvu: LvuBuild, path: Path, name: str) -> Any:
    server = peers.start(name, [served.binary(lvu), "-v", path])
    peers.wait_for_socket(path, server)
    return server


def check_view(view: dict[str, Any], served: Served, offer: Offered) -> None:
    """The realize client's view of the device is what the server offers."""
    assert (view["vendor_id"], view["device_id"]) == served.vendor_device
    assert view["vendor_id"] == int.from_bytes(offer.config[0:2], "little")
    assert view["device_id"] == int.from_bytes(offer.config[2:4], "little")
    assert view["revision"] == offer.config[8]
    assert view["class_code"] == int.from_bytes(offer.config[9:12], "little")
    assert view["device_flags"] == offer.device.flags == 3  # RESET | PCI
    assert view["num_regions"] == offer.device.num_regions == 9
    assert view["num_irqs"] == offer.device.num_irqs == 5
    regions = {r["index"]: r for r in view["regions"]}
    assert set(regions) == set(offer.regions)
    for index, info in offer.regions.items():
        mine = regions[index]
        assert (mine["size"], mine["flags"], mine["argsz"]) == (info.size, info.flags, info.argsz)
        sparse = [cap for cap in info.caps if isinstance(cap, SparseMmapCap)]
        areas = [[a.offset, a.size] for cap in sparse for a in cap.areas]
        assert mine["sparse_areas"] == areas
        assert mine["fd"] == (offer.region_fds[index] == 1)
        if mine["fd"]:
            assert mine["mmapped"] == areas  # the client mapped every sparse area of the fd
    assert {b["index"]: b["size"] for b in view["bars"]} == served.bars
    for bar in view["bars"]:
        assert bar["size"] == offer.regions[bar["index"]].size
    # no PCI capabilities: the status register's capability-list bit is clear
    assert not offer.config[6] & 0x10
    assert view["capabilities"] == [] and view["msix"] is None and view["msi_control"] is None
    assert view["rom_size"] == 0
    assert view["interrupt_pin"] == offer.config[0x3D] == 1
    assert view["interrupt"] == "intx"
    assert view["err_irq_count"] == offer.err_irq.count == 1
    assert view["unexpected_replies"] == 0 and view["warnings"] == []


def fd_shapes(recording: Recording, direction: Direction) -> list[list[tuple[Any, ...]]]:
    # (the captures were taken by rawcap, which recorded kind, size and flags only)
    return [[(fd.kind.value, fd.size, fd.flags) for fd in r.fds]
            for r in recording.records(direction)]


@pytest.mark.parametrize("served", SERVERS, ids=[s.name for s in SERVERS])
def test_realize_through_record_is_what_qemu_does(
    lvu: LvuBuild, peers: Peers, sockdir: Path, served: Served
) -> None:
    dev, prox, trace = sockdir / "dev.sock", sockdir / "p.sock", sockdir / "realize.trace"
    server = start_server(peers, served, lvu, dev, "server")
    recorder = peers.vfioproxy("record", "record", "--listen", prox, "--server", dev,
                               "-o", trace, "--client-desc", "vfioproxy realize",
                               "--server-desc", f"libvfio-user {served.name}")
    peers.wait_for_socket(prox, recorder)

    view = realize_json(prox)

    assert recorder.stop(signal.SIGINT) == 0, recorder.describe()
    if served.exits_after_client:
        assert server.wait(timeout=10) == 0, server.describe()
    else:
        assert server.poll() is None, "gpio-pci-idio-16 re-attaches: it waits for the next client"

    capture = read_recording(TRACES / served.capture)
    check_view(view, served, offered_in(capture))

    recorded = read_recording(trace)
    assert recorded.truncation is None
    assert recorded.sessions == [1]
    assert recorded.undecoded() == [] and recorded.violations() == []
    for direction in Direction:
        # the same messages in the same order, byte for byte, with the same fds
        mine = [r.data for r in recorded.records(direction)]
        qemu = [r.data for r in capture.records(direction)]
        assert len(mine) == len(qemu)
        for i, (a, b) in enumerate(zip(mine, qemu, strict=True)):
            assert a == b, f"{direction.value} message {i}: {a.hex()} != QEMU's {b.hex()}"
        assert fd_shapes(recorded, direction) == fd_shapes(capture, direction)

    # and the view is the same without the proxy, from a fresh server
    direct_dev = sockdir / "direct.sock"
    start_server(peers, served, lvu, direct_dev, "server-direct")
    direct = realize_json(direct_dev)
    assert {k: v for k, v in direct.items() if k != "timings"} == {
        k: v for k, v in view.items() if k != "timings"
    }
    SUMMARY.append(
        f"realize vs {served.name}: {len(recorded.messages)} messages, c2s and s2c byte-identical "
        f"to QEMU's capture {served.capture}; realize+reset "
        f"{1e3 * (view['timings']['realize'] + view['timings']['reset']):.1f} ms proxied, "
        f"{1e3 * (direct['timings']['realize'] + direct['timings']['reset']):.1f} ms direct"
    )
