"""A trace recorded with ``--interpose-irqs`` replayed as server raises the
recorded interrupts on the live client's eventfds, so a driver workload that
waits for them runs against the replay as it ran live (device DMA by message:
a replay writes no guest RAM)."""

from __future__ import annotations

import pytest
import trio

from recorder.records import EventRecord, MessageRecord
from recorder.sink import TraceSink
from tests.conftest import FD_HYGIENE
from vfioproxy.interpose import InterposeOptions
from vfioproxy.peers.client import RealizeError, RealizeOptions, realize
from vfioproxy.peers.server import open_device_server
from vfioproxy.proxy import ProxyOptions, open_proxy
from vfioproxy.replay.script import IrqMark, script_from_records
from vfioproxy.replay.server import ServerReplayOptions, serve_replay
from vfioproxy.side import Direction

pytestmark = FD_HYGIENE


async def record(tmp_path, irq: str, interpose: bool):
    trace = tmp_path / "t.trace"
    sink = TraceSink(trace)
    options = ProxyOptions(interpose=InterposeOptions(interpose_irqs=interpose))
    async with (
        open_device_server(tmp_path / "dev.sock"),
        open_proxy(tmp_path / "p.sock", tmp_path / "dev.sock", sink=sink, options=options),
    ):
        await realize(tmp_path / "p.sock", RealizeOptions(workload=3, irq=irq, ram_fd=False))
    sink.close()
    return trace


async def replay(tmp_path, trace, irq: str):
    listen = tmp_path / "replay.sock"
    async with trio.open_nursery() as nursery:
        got: dict[str, object] = {}

        async def serve(task_status=trio.TASK_STATUS_IGNORED):
            got["report"] = await serve_replay(trace, listen, ServerReplayOptions(timeout=2),
                                               task_status=task_status)

        await nursery.start(serve)
        try:
            got["result"] = await realize(listen, RealizeOptions(
                workload=3, irq=irq, ram_fd=False, reply_timeout=0.5))
        except RealizeError as exc:
            got["result"] = exc
    return got["result"], got["report"]


@pytest.mark.parametrize("irq", ["msix", "intx"])
async def test_the_replayed_server_raises_the_recorded_interrupts(tmp_path, irq):
    trace = await record(tmp_path, irq, interpose=True)
    result, report = await replay(tmp_path, trace, irq)
    assert not isinstance(result, RealizeError), result
    assert result.workload is not None and result.workload.doorbells == 3
    assert report.ok, report.text()


async def test_without_recorded_interrupts_the_workload_waits_in_vain(tmp_path):
    trace = await record(tmp_path, "msix", interpose=False)
    result, report = await replay(tmp_path, trace, "msix")
    assert isinstance(result, RealizeError) and "no interrupt" in str(result)
    assert not report.ok


def test_an_irq_event_is_placed_after_the_last_message_before_it_in_time() -> None:
    version = b"\x01\x00\x01\x00\x10\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    records = [
        MessageRecord(1, 1, Direction.C2S, 100, version),
        MessageRecord(2, 1, Direction.S2C, 300, version[:8] + b"\x01" + version[9:]),
        # written after the reply, but read (t) before it
        EventRecord(3, 1, 200, "irq", {"index": 2, "vector": 1, "count": 2,
                                       "fate": "signalled"}),
        EventRecord(4, 1, 50, "irq", {"index": 0, "vector": 0, "count": 1, "fate": "dropped"}),
        EventRecord(5, 1, 400, "irq", {"index": "bad"}),
    ]
    script = script_from_records(records)
    assert script.irqs == (IrqMark(-1, 0, 0, 1, "dropped"), IrqMark(0, 2, 1, 2, "signalled"))
