"""Traces of realize client sessions for the timeline labeller, made at test time.

:func:`record_qemu_process` plays one "QEMU process" with one or more
vfio-user-pci devices against the reference device server
(``vfioproxy serve-device``), through a real recording proxy: every device is
a realize client session of its own, in QEMU's order (each device realized in
turn, then the machine reset of each, then the guest BIOS's ROM load of each
asked for it, then the guest's workload (and what else it does), then, for
the devices asked for it, a guest-triggered second reset and the workload
again). All clients number their commands from one msg_id counter, as QEMU
does for every device of a process, so with two devices the ids of each
session have gaps. The result holds each client's own labels
(:attr:`RealizeResult.steps`), which is what the labeller must find.

Use::

    run = await record_qemu_process(tmp_path / "two.trace", [Device(), Device(guest_reset=True)])
    run.sessions[1]          # the trace session of the second device
    run.results[1].steps     # (msg_id, command, step) of each of its commands
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path

import attrs
import trio

from recorder.reader import TraceReader
from recorder.records import MessageRecord
from recorder.sink import TraceSink
from vfioproxy.peers.client import RealizeClient, RealizeOptions, RealizeResult, open_realize_client
from vfioproxy.peers.endpoint import MessageIds
from vfioproxy.peers.server import DeviceOptions, serve_device
from vfioproxy.proxy import ProxyOptions, open_proxy

__all__ = ["Device", "QemuRun", "record_qemu_process", "trace_sessions"]


@attrs.frozen
class Device:
    """One vfio-user-pci device of the process: its realize client's options
    (``options.reset``: the machine reset; ``options.rom_load``: the BIOS's ROM
    load; ``options.workload``: doorbells the guest rings), what else the
    guest does with it after the workload (``guest``, given the client: e.g.
    ``client.bar_read(...)``), and whether the guest then resets it again
    (``guest_reset``; the workload runs once more after it)."""

    options: RealizeOptions = attrs.field(factory=RealizeOptions)
    guest: Callable[[RealizeClient], Awaitable[object]] | None = None
    guest_reset: bool = False


@attrs.frozen
class QemuRun:
    """What :func:`record_qemu_process` recorded: the trace, each device's
    realize result (in device order) and its session number in the trace."""

    trace: Path
    results: tuple[RealizeResult, ...]
    sessions: tuple[int, ...]


def trace_sessions(trace: Path) -> list[int]:
    """The sessions of ``trace`` in the order their first message was recorded."""
    order: list[int] = []
    with TraceReader(trace) as reader:
        for record in reader:
            if isinstance(record, MessageRecord) and record.session not in order:
                order.append(record.session)
    return order


async def record_qemu_process(
    trace: str | os.PathLike[str],
    devices: Sequence[Device],
    *,
    device_options: DeviceOptions | None = None,
    first_id: int = 0,
) -> QemuRun:
    """Record ``devices`` of one QEMU process, in QEMU's order, into ``trace``.

    Each device gets its own client session through one recording proxy to
    one reference device server (a device instance per session, made with
    ``device_options``); the clients
    share one msg_id counter starting at ``first_id``. Order: realize device
    1, 2, ...; the machine reset of each (those with ``options.reset``); the
    ROM load of each (``options.rom_load``, once per device as in QEMU); the
    workload of each; then each device with ``guest_reset`` is reset again and
    runs its workload again. Raises :class:`~vfioproxy.peers.client.RealizeError`
    if a client step fails.
    """
    target = Path(trace)
    ids = MessageIds(first_id)
    with tempfile.TemporaryDirectory(prefix="vfioproxy-timeline-") as tmp:
        device_sock = Path(tmp) / "device.sock"
        proxy_sock = Path(tmp) / "proxy.sock"
        info = {"client": "vfioproxy realize (one process, shared msg_id counter)",
                "server": "vfioproxy serve-device (reference device)"}
        with TraceSink(target, info=info) as sink:
            async with trio.open_nursery() as nursery:
                await nursery.start(functools.partial(
                    serve_device, device_sock, options=device_options or DeviceOptions()))
                options = ProxyOptions(threads=False)
                async with open_proxy(proxy_sock, device_sock, sink=sink, options=options) as proxy:
                    results = await _run_process(proxy_sock, devices, ids)
                    with trio.fail_after(5):
                        await proxy.wait_sessions()
                nursery.cancel_scope.cancel()
    sessions = trace_sessions(target)
    assert len(sessions) == len(devices), f"{len(devices)} devices, sessions {sessions}"
    return QemuRun(target, results, tuple(sessions))


async def _run_process(
    socket: Path, devices: Sequence[Device], ids: MessageIds
) -> tuple[RealizeResult, ...]:
    async with AsyncExitStack() as stack:
        clients: list[RealizeClient] = []
        for device in devices:
            client = await stack.enter_async_context(
                open_realize_client(socket, device.options, ids=ids)
            )
            await client.realize()
            clients.append(client)
        for client in clients:
            if client.options.reset:
                await client.reset()
        for client in clients:
            if client.options.rom_load:
                await client.load_rom()
        for device, client in zip(devices, clients, strict=True):
            await client.run_workload(client.options.workload)
            if device.guest is not None:
                await device.guest(client)
        for device, client in zip(devices, clients, strict=True):
            if device.guest_reset:
                await client.reset()
                await client.run_workload(client.options.workload)
        return tuple(client.result() for client in clients)
