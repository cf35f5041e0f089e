"""Fault injection on the session threads (the default), against the real clock.

Times are only checked from below (a delay is never cut short) or against
generous bounds far from the figures: the exact timing is what the MockClock
tests of test_proxy_inject.py check on the trio path, with the same engine.
"""

import errno

import pytest
import trio

from recorder.reader import TraceReader
from recorder.records import EventRecord, MessageRecord
from recorder.sink import TraceSink
from tests.conftest import FD_HYGIENE
from tests.test_proxy_inject import RawServer, encode, read_cmd, roundtrip
from vfioproxy.errors import ConnectionClosedError
from vfioproxy.inject import Injector
from vfioproxy.io.fds import make_memfd
from vfioproxy.io.transport import open_unix_fd_stream
from vfioproxy.protocol.bodies import DmaMapBody, RegionAccessBody
from vfioproxy.protocol.codec import build_command, decode
from vfioproxy.protocol.header import Command, Header
from vfioproxy.proxy import open_proxy
from vfioproxy.side import Direction

pytestmark = FD_HYGIENE


async def connect(tmp_path):
    return await open_unix_fd_stream(tmp_path / "p.sock")


def records(path):
    with TraceReader(path) as reader:
        return list(reader)


async def test_a_delay_is_never_cut_short(raw_server, tmp_path):
    injector = Injector(["c2s REGION_READ delay 3ms", "s2c REGION_READ delay 200us"])
    async with open_proxy(tmp_path / "p.sock", raw_server.path, injector=injector) as proxy:
        client = await connect(tmp_path)
        async with client:
            for msg_id in range(5):
                start = trio.current_time()
                header, _ = await roundtrip(client, read_cmd(msg_id))
                assert not header.is_error
                assert trio.current_time() - start >= 0.0032
            # a command no rule names is not held back (far below 3 ms here)
            start = trio.current_time()
            await roundtrip(client, encode(build_command(Command.DEVICE_GET_INFO, 9)))
            assert trio.current_time() - start < 0.5
        assert proxy.statistics().c2s.messages == 6


async def test_delays_never_reorder_a_direction(raw_server, tmp_path):
    injector = Injector(["c2s * index=0 delay 50ms", "c2s * index=1.. delay 1ms"])
    async with open_proxy(tmp_path / "p.sock", raw_server.path, injector=injector):
        client = await connect(tmp_path)
        async with client:
            start = trio.current_time()
            await client.send_message(encode(build_command(Command.DMA_UNMAP, 1, no_reply=True)))
            await client.send_message(read_cmd(2))
            await client.receive_message()
            first, second = (t - start for t, _, _ in raw_server.received)
            assert [h.msg_id for _, h, _ in raw_server.received] == [1, 2]
            assert 0.05 <= first <= second


async def test_a_delayed_direction_does_not_hold_the_other(tmp_path, nursery):
    server = RawServer(tmp_path / "server.sock")
    await nursery.start(server.serve)
    injector = Injector(["s2c * delay 300ms"])
    async with open_proxy(tmp_path / "p.sock", server.path, injector=injector):
        client = await connect(tmp_path)
        async with client:
            start = trio.current_time()
            for msg_id in range(3):
                await client.send_message(read_cmd(msg_id))
            with trio.fail_after(5):
                while len(server.received) < 3:
                    await trio.sleep(0.001)
            reached = trio.current_time() - start
            for _ in range(3):
                await client.receive_message()
            assert reached < 0.3 <= trio.current_time() - start


async def test_error_drop_and_the_trace(raw_server, tmp_path):
    trace = tmp_path / "t.trace"
    sink = TraceSink(trace)
    injector = Injector(["c2s REGION_READ region=7 error EIO", "c2s DEVICE_GET_INFO drop"])
    async with open_proxy(tmp_path / "p.sock", raw_server.path, sink=sink, injector=injector):
        client = await connect(tmp_path)
        async with client:
            header, raw = await roundtrip(client, read_cmd(5))
            assert header.is_error and header.error == errno.EIO and len(raw) == 16
            await client.send_message(encode(build_command(Command.DEVICE_GET_INFO, 6)))
            with trio.move_on_after(0.2) as waited:
                await client.receive_message()
            assert waited.cancelled_caught
            header, _ = await roundtrip(client, read_cmd(7, region=2))
            assert not header.is_error and header.msg_id == 7
    sink.close()
    assert [h.msg_id for _, h, _ in raw_server.received] == [7]
    recs = records(trace)
    messages = [(r.direction, Header.parse(r.data).msg_id) for r in recs
                if isinstance(r, MessageRecord)]
    assert messages == [(Direction.C2S, 5), (Direction.C2S, 6), (Direction.C2S, 7),
                        (Direction.S2C, 7)]
    injected = [r.data["applied"][0]["action"] for r in recs
                if isinstance(r, EventRecord) and r.kind == "inject"]
    assert injected == ["error", "drop"]


@pytest.mark.parametrize("when", ["before", "after"])
async def test_close_around_the_matched_message(raw_server, tmp_path, when):
    injector = Injector([f"c2s DEVICE_GET_INFO close {when}"])
    async with open_proxy(tmp_path / "p.sock", raw_server.path, injector=injector) as proxy:
        client = await connect(tmp_path)
        async with client:
            await roundtrip(client, read_cmd(1))
            await client.send_message(encode(build_command(Command.DEVICE_GET_INFO, 2)))
            with pytest.raises(ConnectionClosedError), trio.fail_after(5):
                await client.receive_message()
        with trio.fail_after(5):
            await proxy.wait_sessions()
    expected = [Command.REGION_READ] + ([Command.DEVICE_GET_INFO] if when == "after" else [])
    assert raw_server.commands() == expected


async def test_corrupt_stall_and_bandwidth(raw_server, tmp_path):
    injector = Injector(["c2s REGION_READ corrupt offset mask=0xff",
                         "c2s DEVICE_GET_INFO stall 20ms",
                         "s2c REGION_READ bandwidth 100KiB/s"])
    async with open_proxy(tmp_path / "p.sock", raw_server.path, injector=injector):
        client = await connect(tmp_path)
        async with client:
            start = trio.current_time()
            _, raw = await roundtrip(client, read_cmd(1, offset=0x10, count=1000))
            assert trio.current_time() - start >= len(raw) / (100 * 1024)
            request = build_command(Command.REGION_READ, 1, RegionAccessBody(0x10, 7, 1000))
            assert decode(raw, request=request).body.offset == 0x10 ^ 0xFF
            start = trio.current_time()
            await client.send_message(encode(build_command(Command.DEVICE_GET_INFO, 2)))
            await client.send_message(read_cmd(3))
            await client.receive_message()
            await client.receive_message()
            assert all(t - start >= 0.020 for t, _, _ in raw_server.received[1:])


async def test_held_messages_lose_their_fds_when_the_session_ends(raw_server, tmp_path):
    trace = tmp_path / "t.trace"
    sink = TraceSink(trace)
    injector = Injector(["c2s DMA_MAP delay 10s"])
    async with open_proxy(tmp_path / "p.sock", raw_server.path, injector=injector,
                          sink=sink) as proxy:
        client = await connect(tmp_path)
        async with client:
            memfd = make_memfd("guest", 4096)
            with memfd:
                dma = encode(build_command(Command.DMA_MAP, 1, DmaMapBody(32, 3, 0, 0, 4096),
                                           fds=[memfd]))
                await client.send_message(dma, [memfd])
            with trio.fail_after(5):
                while proxy.statistics().sessions_active != 1 or not injector.statistics() \
                        .rules[0].applied:
                    await trio.sleep(0.001)
        # the client left, the map is still held: the proxy shuts down before it is due
    sink.close()
    assert raw_server.received == []
    recs = records(trace)
    (dma_record,) = [r for r in recs if isinstance(r, MessageRecord)]
    (undelivered,) = [r for r in recs if isinstance(r, EventRecord) and r.kind == "undelivered"]
    assert undelivered.data["seq"] == dma_record.seq and undelivered.data["delivered"] == 0
    assert undelivered.data["reason"] == "proxy shut down"
    close = [r for r in recs if isinstance(r, EventRecord) and r.kind == "session_close"]
    assert close[0].data["closed_by"] == "client"  # who closed first


async def test_rules_change_while_the_session_runs(raw_server, tmp_path):
    injector = Injector()
    async with open_proxy(tmp_path / "p.sock", raw_server.path, injector=injector):
        client = await connect(tmp_path)
        async with client:
            await roundtrip(client, read_cmd(1))
            rule = injector.add("c2s * delay 20ms")
            start = trio.current_time()
            await roundtrip(client, read_cmd(2))
            assert trio.current_time() - start >= 0.020
            injector.remove(rule.id)
            await roundtrip(client, read_cmd(3))
    assert len(raw_server.received) == 3
