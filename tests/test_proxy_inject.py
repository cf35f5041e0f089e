"""Fault injection on trio tasks (``threads=False``): real sockets and fds,
trio's MockClock for time, so every delay is exact. The same on the session
threads, against the real clock: test_proxy_inject_threads.py."""

import errno

import attrs
import pytest
import trio
import trio.testing

from recorder.reader import TraceReader
from recorder.records import EventRecord, MessageRecord
from recorder.sink import TraceSink
from tests.conftest import FD_HYGIENE
from vfioproxy.errors import ConnectionClosedError
from vfioproxy.inject import Injector
from vfioproxy.io.fds import close_all, make_memfd
from vfioproxy.io.transport import FdStream, open_unix_fd_stream
from vfioproxy.io.unix import open_unix_listener
from vfioproxy.protocol.bodies import DmaMapBody, RegionAccessBody, VersionBody
from vfioproxy.protocol.codec import build_command, build_reply, decode
from vfioproxy.protocol.codec import encode as encode_with_fds
from vfioproxy.protocol.header import Command, Header
from vfioproxy.proxy import ProxyOptions
from vfioproxy.proxy import open_proxy as _open_proxy
from vfioproxy.side import Direction

pytestmark = FD_HYGIENE


class RawServer:
    """A device server that notes when (trio time) and what it receives, and
    answers every command after ``think`` seconds (REGION_READ with data)."""

    def __init__(self, path, think=0.0):
        self.path = path
        self.think = think
        self.received = []  # (time, Header, fd count)
        self.streams = []

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED):
        listener = await open_unix_listener(self.path)
        async with listener, trio.open_nursery() as nursery:
            task_status.started()
            while True:
                stream = FdStream((await listener.accept()).socket)
                self.streams.append(stream)
                nursery.start_soon(self._run, stream)

    async def _run(self, stream):
        async with stream:
            while True:
                try:
                    data, fds = await stream.receive_message()
                except ConnectionClosedError:
                    return
                header = Header.parse(data)
                self.received.append((trio.current_time(), header, len(fds)))
                close_all(fds)
                if header.is_reply or header.no_reply:
                    continue
                message = decode(data)
                if self.think:
                    await trio.sleep(self.think)
                if header.command == Command.REGION_READ:
                    body = message.body
                    reply = build_reply(message, RegionAccessBody(
                        body.offset, body.region, body.count, b"\xab" * body.count))
                elif header.command == Command.VERSION:
                    reply = build_reply(message, VersionBody.build(0, 0, None))
                else:
                    reply = build_reply(message)
                try:
                    await stream.send_message(encode(reply))
                except (ConnectionClosedError, trio.ClosedResourceError):
                    return

    def commands(self):
        return [h.command for _, h, _ in self.received]


def open_proxy(*args, options=None, **kwargs):
    """An injecting proxy that forwards on trio tasks (and so follows the MockClock)."""
    options = attrs.evolve(options or ProxyOptions(), threads=False)
    return _open_proxy(*args, options=options, **kwargs)


def encode(message):
    return encode_with_fds(message)[0]


def read_cmd(msg_id, offset=0, region=7, count=4, **kw):
    return encode(build_command(Command.REGION_READ, msg_id,
                                RegionAccessBody(offset, region, count), **kw))


async def connect(tmp_path):
    return await open_unix_fd_stream(tmp_path / "p.sock")


async def roundtrip(stream, data, fds=()):
    await stream.send_message(data, fds)
    reply, got = await stream.receive_message()
    close_all(got)
    return Header.parse(reply), reply


def records(path):
    with TraceReader(path) as reader:
        return list(reader)


async def test_a_delay_holds_the_request_exactly_that_long(raw_server, tmp_path, autojump_clock):
    injector = Injector(["c2s REGION_READ delay fixed(10ms)"])
    async with open_proxy(tmp_path / "p.sock", raw_server.path, injector=injector):
        client = await connect(tmp_path)
        async with client:
            start = trio.current_time()
            header, _ = await roundtrip(client, read_cmd(1))
            assert header.is_reply and not header.is_error
            assert trio.current_time() - start == pytest.approx(0.010, abs=1e-9)
            (arrived, _, _), = raw_server.received
            assert arrived - start == pytest.approx(0.010, abs=1e-9)
            # a command the rule does not name passes at once
            start = trio.current_time()
            await roundtrip(client, encode(build_command(Command.DEVICE_GET_INFO, 2)))
            assert trio.current_time() - start == pytest.approx(0, abs=1e-9)


async def test_delays_never_reorder_a_direction(raw_server, tmp_path, autojump_clock):
    # the first message is held 30 ms, the second 1 ms: the second still
    # arrives after the first, 1 ms after it was sent (not 31 ms)
    injector = Injector(["c2s * index=0 delay fixed(30ms)", "c2s * index=1.. delay 1ms"])
    async with open_proxy(tmp_path / "p.sock", raw_server.path, injector=injector):
        client = await connect(tmp_path)
        async with client:
            start = trio.current_time()
            first = encode(build_command(Command.DMA_UNMAP, 1, no_reply=True))
            await client.send_message(first)
            await trio.sleep(0.005)
            await client.send_message(read_cmd(2))
            await client.receive_message()
            times = [t - start for t, _, _ in raw_server.received]
            assert times == [pytest.approx(0.030), pytest.approx(0.030)]
            await trio.sleep(0.1)
            sent = trio.current_time()
            await roundtrip(client, read_cmd(3))
            assert raw_server.received[-1][0] - sent == pytest.approx(0.001)


async def test_delaying_replies_leaves_the_other_direction_alone(tmp_path, nursery,
                                                                 autojump_clock):
    server = RawServer(tmp_path / "server.sock", think=0.0)
    await nursery.start(server.serve)
    injector = Injector(["s2c * delay 50ms"])
    async with open_proxy(tmp_path / "p.sock", server.path, injector=injector):
        client = await connect(tmp_path)
        async with client:
            start = trio.current_time()
            for msg_id in range(3):  # pipelined: all three reach the server at once
                await client.send_message(read_cmd(msg_id))
            for _ in range(3):
                await client.receive_message()
            assert [t - start for t, _, _ in server.received] == [0, 0, 0]
            assert trio.current_time() - start == pytest.approx(0.050)


async def test_an_error_rule_answers_in_place_of_the_server(raw_server, tmp_path,
                                                           autojump_clock):
    trace = tmp_path / "t.trace"
    sink = TraceSink(trace)
    injector = Injector(["c2s REGION_READ region=7 error EIO"])
    async with open_proxy(tmp_path / "p.sock", raw_server.path, sink=sink, injector=injector):
        client = await connect(tmp_path)
        async with client:
            header, raw = await roundtrip(client, read_cmd(5))
            assert header.is_error and header.error == errno.EIO and header.msg_id == 5
            assert header.command == Command.REGION_READ and len(raw) == 16
            # another region is not matched: it reaches the server
            header, _ = await roundtrip(client, read_cmd(6, region=2))
            assert not header.is_error
    sink.close()
    assert raw_server.commands() == [Command.REGION_READ]
    recs = records(trace)
    messages = [r for r in recs if isinstance(r, MessageRecord)]
    # the client's request is recorded; the made-up reply is an event, not a server message
    assert [(m.direction, Header.parse(m.data).msg_id) for m in messages] == [
        (Direction.C2S, 5), (Direction.C2S, 6), (Direction.S2C, 6)]
    injected = [r.data for r in recs if isinstance(r, EventRecord) and r.kind == "inject"]
    assert injected == [{"direction": "c2s", "index": 0, "applied": [
        {"rule": 1, "action": "error", "text": "error EIO", "value": errno.EIO}]}]
    opened = next(r for r in recs if isinstance(r, EventRecord) and r.kind == "session_open")
    assert opened.data["inject"]["seed"] == 0
    assert [rule["action"] for rule in opened.data["inject"]["rules"]] == ["error"]


async def test_a_dropped_request_times_the_client_out(raw_server, tmp_path, autojump_clock):
    injector = Injector(["c2s DEVICE_GET_INFO drop"])
    async with open_proxy(tmp_path / "p.sock", raw_server.path, injector=injector) as proxy:
        client = await connect(tmp_path)
        async with client:
            await client.send_message(encode(build_command(Command.DEVICE_GET_INFO, 1)))
            with trio.move_on_after(5) as waited:
                await client.receive_message()
            assert waited.cancelled_caught
            assert raw_server.received == []
            assert proxy.statistics().c2s.messages == 0


@pytest.mark.parametrize("when", ["before", "after"])
async def test_close_ends_the_session_around_the_matched_message(raw_server, tmp_path, when,
                                                                autojump_clock):
    trace = tmp_path / "t.trace"
    sink = TraceSink(trace)
    injector = Injector([f"c2s DEVICE_GET_INFO close {when}"])
    async with open_proxy(tmp_path / "p.sock", raw_server.path, sink=sink, injector=injector) \
            as proxy:
        client = await connect(tmp_path)
        async with client:
            await roundtrip(client, read_cmd(1))
            await client.send_message(encode(build_command(Command.DEVICE_GET_INFO, 2)))
            with pytest.raises(ConnectionClosedError):
                await client.receive_message()
        with trio.fail_after(5):
            await proxy.wait_sessions()
    sink.close()
    expected = [Command.REGION_READ] + ([Command.DEVICE_GET_INFO] if when == "after" else [])
    assert raw_server.commands() == expected
    close = [r.data for r in records(trace) if isinstance(r, EventRecord)
             and r.kind == "session_close"]
    assert [{k: c[k] for k in ("closed_by", "reason")} for c in close] == [
        {"closed_by": "proxy", "reason": f"injected close {when} client message c2s[1]"}]
    # what the proxy left unread is said, not lost (the reply to DEVICE_GET_INFO, if it came)
    assert set(close[0].get("unread", {})) <= {"s2c"}


async def test_corrupt_flips_the_named_field_on_the_way(raw_server, tmp_path, autojump_clock):
    injector = Injector(["c2s REGION_READ corrupt offset mask=0xff"])
    async with open_proxy(tmp_path / "p.sock", raw_server.path, injector=injector):
        client = await connect(tmp_path)
        async with client:
            _, raw = await roundtrip(client, read_cmd(1, offset=0x10))
    # the server answered the offset it saw
    assert decode(raw, request=build_command(Command.REGION_READ, 1, RegionAccessBody(
        0x10, 7, 4))).body.offset == 0x10 ^ 0xFF


async def test_stall_holds_the_whole_direction(raw_server, tmp_path, autojump_clock):
    injector = Injector(["c2s DEVICE_GET_INFO stall 20ms"])
    async with open_proxy(tmp_path / "p.sock", raw_server.path, injector=injector):
        client = await connect(tmp_path)
        async with client:
            start = trio.current_time()
            await client.send_message(encode(build_command(Command.DEVICE_GET_INFO, 1)))
            await client.send_message(read_cmd(2))
            await client.receive_message()
            await client.receive_message()
            assert [t - start for t, _, _ in raw_server.received] == [
                pytest.approx(0.020), pytest.approx(0.020)]


async def test_bandwidth_charges_each_message_its_size(raw_server, tmp_path, autojump_clock):
    injector = Injector(["s2c REGION_READ bandwidth 1KiB/s"])
    async with open_proxy(tmp_path / "p.sock", raw_server.path, injector=injector):
        client = await connect(tmp_path)
        async with client:
            start = trio.current_time()
            _, raw = await roundtrip(client, read_cmd(1, count=1000))
            assert trio.current_time() - start == pytest.approx(len(raw) / 1024)


async def test_held_messages_keep_their_fds_until_sent_and_lose_them_at_the_end(
        raw_server, tmp_path, autojump_clock):
    injector = Injector(["c2s DMA_MAP delay 1s"])
    async with open_proxy(tmp_path / "p.sock", raw_server.path, injector=injector) as proxy:
        client = await connect(tmp_path)
        async with client:
            memfd = make_memfd("guest", 4096)
            with memfd:
                dma = encode(build_command(Command.DMA_MAP, 1, DmaMapBody(32, 3, 0, 0, 4096),
                                           fds=[memfd]))
                await client.send_message(dma, [memfd])
                await client.send_message(dma, [memfd])
            await client.receive_message()  # the first arrives with its fd after 1 s
            assert raw_server.received[0][2] == 1
        # the client left with the second map still held: as on a slow wire, it is
        # delivered when due (its fd passed on, then closed), then the server reads EOF
        with trio.fail_after(5):
            await proxy.wait_sessions()
        assert [fds for _, _, fds in raw_server.received] == [1, 1]


async def test_the_same_seed_draws_the_same_delays(raw_server, tmp_path, autojump_clock):
    async def run(seed):
        injector = Injector(["c2s * delay normal(5ms,2ms)"], seed=seed)
        async with open_proxy(tmp_path / "p.sock", raw_server.path, injector=injector,
                              options=ProxyOptions()):
            client = await connect(tmp_path)
            async with client:
                times = []
                for msg_id in range(5):
                    start = trio.current_time()
                    await roundtrip(client, read_cmd(msg_id))
                    times.append(trio.current_time() - start)
        return times

    first, again, other = await run(7), await run(7), await run(8)
    assert first == pytest.approx(again, rel=1e-9)
    assert first != pytest.approx(other, rel=1e-3)
    assert all(t >= 0 for t in first) and len(set(first)) == 5


async def test_rules_can_change_while_sessions_run(raw_server, tmp_path, autojump_clock):
    injector = Injector()
    async with open_proxy(tmp_path / "p.sock", raw_server.path, injector=injector):
        client = await connect(tmp_path)
        async with client:
            start = trio.current_time()
            await roundtrip(client, read_cmd(1))
            assert trio.current_time() == start
            rule = injector.add("c2s * delay 3ms")
            start = trio.current_time()
            await roundtrip(client, read_cmd(2))
            assert trio.current_time() - start == pytest.approx(0.003)
            injector.remove(rule.id)
            start = trio.current_time()
            await roundtrip(client, read_cmd(3))
            assert trio.current_time() == start
