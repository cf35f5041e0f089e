import errno
import os
import struct
from contextlib import asynccontextmanager

import attrs
import pytest
import trio
import trio.testing

import vfioproxy.proxy
import vfioproxy.proxy.fastpath
from recorder.reader import TraceReader
from recorder.records import EventRecord, MessageRecord
from recorder.sink import TraceSink
from tests.conftest import FD_HYGIENE
from vfioproxy.errors import ConnectionClosedError
from vfioproxy.io.fds import FdKind, close_all, make_eventfd, make_memfd
from vfioproxy.io.transport import FdStream, open_unix_fd_stream
from vfioproxy.io.unix import open_unix_listener
from vfioproxy.peers.endpoint import Endpoint
from vfioproxy.protocol.bodies import DmaMapBody, IrqSetBody, RegionAccessBody, VersionBody
from vfioproxy.protocol.codec import build_command, build_error_reply, build_reply, encode
from vfioproxy.protocol.header import Command, Header
from vfioproxy.proxy import ProxyOptions, open_proxy
from vfioproxy.side import Direction, Side
from vfioproxy.trace.decoded import DecodedMessage, TornMessage, decoded_records

pytestmark = FD_HYGIENE


async def echo_handler(message):
    for fd in message.fds:
        # a device reads through the fd it got, then keeps nothing
        os.fstat(fd.fileno())
        fd.close()
    if not message.decoded:
        return build_error_reply(message, errno.EINVAL)
    if message.command == Command.VERSION:
        return build_reply(message, VersionBody.build(0, 0, None))
    if message.command == Command.REGION_READ:
        body = message.body
        if body.region == 9:
            return build_error_reply(message, errno.EINVAL)
        return build_reply(message, RegionAccessBody(body.offset, body.region, body.count,
                                                     b"\xab" * body.count))
    return build_reply(message)


class Server:
    """A listening fake device server: every connection gets an echo Endpoint."""

    def __init__(self, path):
        self.path = path
        self.endpoints = []

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED):
        listener = await open_unix_listener(self.path)
        async with listener, trio.open_nursery() as nursery:
            task_status.started()
            while True:
                stream = await listener.accept()
                endpoint = Endpoint(FdStream(stream.socket), Side.SERVER, handler=echo_handler)
                self.endpoints.append(endpoint)
                nursery.start_soon(self._run, endpoint)

    async def _run(self, endpoint):
        try:
            await endpoint.run()
        finally:
            await endpoint.aclose()


@pytest.fixture(autouse=True, params=["threads", "threads-python", "trio"])
def forwarding(request, monkeypatch):
    """Every test here runs with both ways of forwarding (threads: the default),
    the threads with and without the C lane."""
    init = vfioproxy.proxy.Proxy.__init__
    threads = request.param.startswith("threads")
    if request.param == "threads-python":
        monkeypatch.setattr(vfioproxy.proxy.fastpath, "lane", None)

    def patched(self, server_path, *, options=None, **kwargs):
        options = attrs.evolve(options or ProxyOptions(), threads=threads)
        init(self, server_path, options=options, **kwargs)

    monkeypatch.setattr(vfioproxy.proxy.Proxy, "__init__", patched)
    return request.param


@pytest.fixture
async def server(nursery, tmp_path):
    srv = Server(tmp_path / "server.sock")
    await nursery.start(srv.serve)
    return srv


async def settle(proxy, sessions=1):
    """Wait until ``sessions`` clients were accepted and every session has ended."""
    with trio.fail_after(5):
        while proxy.statistics().sessions_total < sessions:
            await trio.sleep(0.001)
        await proxy.wait_sessions()


@asynccontextmanager
async def proxied_client(server, tmp_path, **proxy_kwargs):
    """A proxy to ``server`` and a client Endpoint through it, after VERSION;
    on exit the client leaves and every session has ended."""
    async with open_proxy(tmp_path / "p.sock", server.path, **proxy_kwargs) as proxy:
        stream = await open_unix_fd_stream(tmp_path / "p.sock")
        client = Endpoint(stream, Side.CLIENT)
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            await client.request(Command.VERSION, VersionBody.build(0, 0, None))
            yield proxy, client, stream
            await stream.aclose()
        await settle(proxy)


def records(path):
    with TraceReader(path) as reader:
        return list(reader)


def derived_violations(path):
    """The violations a reader derives from the trace (nothing is checked live)."""
    with TraceReader(path) as reader:
        found = []
        for item in decoded_records(reader):
            if isinstance(item, DecodedMessage):
                found.extend(v.to_dict() for v in item.observation.violations)
            elif isinstance(item, TornMessage):
                found.append(item.violation.to_dict())
        return found


async def test_proxy_forwards_and_records_every_message_byte_exact(server, tmp_path):
    trace = tmp_path / "t.trace"
    sink = TraceSink(trace, info={"test": "forwarding"})
    async with open_proxy(tmp_path / "proxy.sock", server.path, sink=sink) as proxy:
        stream = await open_unix_fd_stream(tmp_path / "proxy.sock")
        client = Endpoint(stream, Side.CLIENT)
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            await client.request(Command.VERSION, VersionBody.build(0, 0, None))
            reply = await client.request(Command.REGION_READ, RegionAccessBody(0, 7, 4))
            assert reply.body.data == b"\xab" * 4
            await stream.aclose()
        await settle(proxy)
        stats = proxy.statistics()
    sink.close()
    assert (stats.sessions_total, stats.sessions_active) == (1, 0)
    assert stats.c2s.messages == 2 and stats.s2c.messages == 2
    recs = records(trace)
    messages = [r for r in recs if isinstance(r, MessageRecord)]
    assert [m.direction for m in messages] == [Direction.C2S, Direction.S2C] * 2
    assert messages[2].data == encode(build_command(
        Command.REGION_READ, 1, RegionAccessBody(0, 7, 4)))[0]
    kinds = [r.kind for r in recs if isinstance(r, EventRecord)]
    assert kinds == ["session_open", "session_close"]
    close = [r for r in recs if isinstance(r, EventRecord)][-1]
    assert close.data == {"closed_by": "client", "reason": "EOF"}


async def test_proxy_forwards_fds_records_their_kind_and_closes_its_copies(server, tmp_path):
    trace = tmp_path / "t.trace"
    sink = TraceSink(trace)
    options = ProxyOptions(capture_fd_contents=4096)
    async with proxied_client(server, tmp_path, sink=sink, options=options) as (_, client, _):
        with make_memfd("ram", data=b"guest memory") as ram, make_eventfd() as irq:
            await client.request(Command.DMA_MAP, DmaMapBody(32, 3, 0, 0, 4096), fds=[ram])
            await client.request(Command.DEVICE_SET_IRQS,
                                 IrqSetBody(20, 0x24, 0, 0, 1), fds=[irq])
    sink.close()
    messages = [r for r in records(trace) if isinstance(r, MessageRecord)]
    (ram_fd,) = messages[2].fds
    (irq_fd,) = messages[4].fds
    assert ram_fd.kind is FdKind.MEMFD and ram_fd.size == 12
    assert ram_fd.contents == b"guest memory" and ram_fd.sha256 is not None
    assert irq_fd.kind is FdKind.EVENTFD


async def test_a_header_with_an_unframable_size_travels_alone_and_is_a_violation(server, tmp_path):
    trace = tmp_path / "t.trace"
    sink = TraceSink(trace)
    async with open_proxy(tmp_path / "p.sock", server.path, sink=sink) as proxy:
        stream = await open_unix_fd_stream(tmp_path / "p.sock")
        bad = Header(5, Command.REGION_READ, 8, 0, 0).pack()
        await stream.send_message(bad)
        good = encode(build_command(Command.VERSION, 6, VersionBody.build(0, 0, None)))[0]
        await stream.send_message(good)
        with trio.fail_after(5):
            # the server reads the bad header alone and answers it, then the VERSION
            first, _ = await stream.receive_message()
            second, _ = await stream.receive_message()
        assert Header.parse(first).msg_id == 5 and Header.parse(first).is_error
        assert Header.parse(second).msg_id == 6
        await stream.aclose()
        await settle(proxy)
    sink.close()
    recs = records(trace)
    messages = [r for r in recs if isinstance(r, MessageRecord)]
    assert messages[0].data == bad
    assert not any(isinstance(r, EventRecord) and r.kind == "violation" for r in recs)
    violations = derived_violations(trace)
    assert {"size_too_small", "version_not_first"} <= {v["kind"] for v in violations}


async def test_eof_in_the_middle_of_a_message_ends_the_session_as_framing_lost(server, tmp_path):
    trace = tmp_path / "t.trace"
    sink = TraceSink(trace)
    async with open_proxy(tmp_path / "p.sock", server.path, sink=sink) as proxy:
        stream = await open_unix_fd_stream(tmp_path / "p.sock")
        data = encode(build_command(Command.VERSION, 0, VersionBody.build(0, 0, None)))[0]
        await stream.send_message(data[:20])
        await stream.aclose()
        await settle(proxy)
    sink.close()
    events = [r for r in records(trace) if isinstance(r, EventRecord)]
    assert events[-1].kind == "session_close"
    assert events[-1].data["closed_by"] == "client", events[-1].data
    assert "EOF mid-message" in events[-1].data["reason"]
    assert any(e.kind == "error" and "framing lost" in e.data["text"] for e in events)


async def test_strict_mode_closes_a_session_at_its_first_violation(server, tmp_path):
    async with open_proxy(tmp_path / "p.sock", server.path,
                          options=ProxyOptions(strict=True)) as proxy:
        stream = await open_unix_fd_stream(tmp_path / "p.sock")
        client = Endpoint(stream, Side.CLIENT)
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            await client.request(Command.VERSION, VersionBody.build(0, 0, None))
            with make_memfd("x", 16) as fd:
                # fds on a command that carries none: forwarded, then the session is closed
                await client.send_command(Command.REGION_READ, RegionAccessBody(0, 7, 4),
                                          fds=[fd])
            await settle(proxy)
            await stream.aclose()
    assert proxy.statistics().violations == 1


async def test_an_unreachable_server_closes_the_client_and_says_why(tmp_path):
    trace = tmp_path / "t.trace"
    sink = TraceSink(trace)
    async with open_proxy(tmp_path / "p.sock", tmp_path / "nobody.sock", sink=sink) as proxy:
        stream = await open_unix_fd_stream(tmp_path / "p.sock")
        with trio.fail_after(5):
            with pytest.raises(ConnectionClosedError):
                await stream.receive_message()
            await stream.aclose()
            await proxy.wait_sessions()
    sink.close()
    events = [r for r in records(trace) if isinstance(r, EventRecord)]
    assert [e.kind for e in events] == ["session_open", "error", "session_close"]
    assert "nobody.sock" in events[1].data["text"]


async def test_sessions_run_concurrently_and_per_session_files_are_written(server, tmp_path):
    out = tmp_path / "traces"
    sink = TraceSink(str(out) + "/")
    async with open_proxy(tmp_path / "p.sock", server.path, sink=sink) as proxy:
        streams = [await open_unix_fd_stream(tmp_path / "p.sock") for _ in range(3)]
        clients = [Endpoint(s, Side.CLIENT) for s in streams]
        async with trio.open_nursery() as nursery:
            for c in clients:
                await nursery.start(c.run)
            for i, c in enumerate(clients):
                await c.request(Command.VERSION, VersionBody.build(0, 0, None))
                await c.request(Command.REGION_READ, RegionAccessBody(i, 7, 1))
            assert proxy.statistics().sessions_active == 3
            for s in streams:
                await s.aclose()
        await settle(proxy)
    sink.close()
    files = sink.files()
    assert len(files) == 3
    for f in files:
        assert sum(isinstance(r, MessageRecord) for r in records(f)) == 4


async def test_a_server_that_leaves_closes_the_client(server, tmp_path):
    async with open_proxy(tmp_path / "p.sock", server.path) as proxy:
        stream = await open_unix_fd_stream(tmp_path / "p.sock")
        client = Endpoint(stream, Side.CLIENT)
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            await client.request(Command.VERSION, VersionBody.build(0, 0, None))
            await trio.testing.wait_all_tasks_blocked()
            await server.endpoints[0].aclose()
            await settle(proxy)
        assert client.closed is not None
        await stream.aclose()


def test_struct_sizes_used_here_are_what_the_protocol_says():
    assert struct.calcsize("<HHIII") == 16


async def test_a_twin_socket_is_replaced_by_a_proxy_owned_one_and_relayed(tmp_path):
    """The server offers twin_socket: its DMA_READ on the twin channel and the
    client's reply cross the proxy and are recorded as a session of their own."""
    import socket as pysocket

    from vfioproxy.io.fds import OwnedFd
    from vfioproxy.protocol.bodies import DmaAccessBody
    from vfioproxy.protocol.capabilities import Capabilities, TwinSocketCapability
    from vfioproxy.protocol.codec import decode

    server_path = tmp_path / "server.sock"
    trace = tmp_path / "t.trace"
    got_reply = trio.Event()

    async def server_side(*, task_status=trio.TASK_STATUS_IGNORED):
        listener = await open_unix_listener(server_path)
        async with listener:
            task_status.started()
            conn = FdStream((await listener.accept()).socket)
            async with conn:
                data, _ = await conn.receive_message()
                mine, theirs = pysocket.socketpair(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
                caps = Capabilities(twin_socket=TwinSocketCapability(True, 0))
                reply = build_reply(decode(data), VersionBody.build(0, 0, caps))
                with OwnedFd(theirs.detach()) as fd:
                    await conn.send_message(encode(reply)[0], [fd])
                twin = FdStream(trio.socket.from_stdlib_socket(mine))
                async with twin:
                    dma = build_command(Command.DMA_READ, 1, DmaAccessBody(0x1000, 4))
                    await twin.send_message(encode(dma)[0])
                    answer, _ = await twin.receive_message()
                    assert decode(answer).body.data == b"data"
                    got_reply.set()
                    with pytest.raises(ConnectionClosedError):
                        await conn.receive_message()  # until the client leaves

    sink = TraceSink(trace)
    async with trio.open_nursery() as nursery:
        await nursery.start(server_side)
        async with open_proxy(tmp_path / "p.sock", server_path, sink=sink) as proxy:
            stream = await open_unix_fd_stream(tmp_path / "p.sock")
            caps = Capabilities(twin_socket=TwinSocketCapability(supported=True))
            await stream.send_message(
                encode(build_command(Command.VERSION, 0, VersionBody.build(0, 0, caps)))[0]
            )
            data, fds = await stream.receive_message()
            assert decode(data).body.capabilities.twin_socket.fd_index == 0
            (fd,) = fds
            twin = FdStream(trio.socket.from_stdlib_socket(pysocket.socket(fileno=fd.detach())))
            async with twin:
                with trio.fail_after(5):
                    cmd, _ = await twin.receive_message()
                    request = decode(cmd)
                    await twin.send_message(encode(build_reply(
                        request, DmaAccessBody(0x1000, 4, b"data")))[0])
                    await got_reply.wait()
            await stream.aclose()
            await settle(proxy)
    sink.close()
    recs = records(trace)
    opens = [r for r in recs if isinstance(r, EventRecord) and r.kind == "session_open"]
    assert [o.data.get("twin_of") for o in opens] == [None, 1]
    twin_messages = [r for r in recs if isinstance(r, MessageRecord) and r.session == 2]
    assert [m.direction for m in twin_messages] == [Direction.S2C, Direction.C2S]


async def test_a_body_cut_short_by_eof_is_recorded_and_forwarded_as_it_arrived(server, tmp_path):
    trace = tmp_path / "t.trace"
    sink = TraceSink(trace)
    async with open_proxy(tmp_path / "p.sock", server.path, sink=sink) as proxy:
        stream = await open_unix_fd_stream(tmp_path / "p.sock")
        version = encode(build_command(Command.VERSION, 0, VersionBody.build(0, 0, None)))[0]
        await stream.send_message(version)
        await stream.receive_message()
        torn = encode(build_command(Command.REGION_WRITE, 1,
                                    RegionAccessBody(0, 0, 64, bytes(range(64)))))[0][:50]
        await stream.send_message(torn)
        await stream.aclose()
        await settle(proxy)
    sink.close()
    recs = records(trace)
    errors = [r for r in recs if isinstance(r, EventRecord) and r.kind == "error"]
    (error,) = errors
    (record,) = [r for r in recs if isinstance(r, MessageRecord) and r.torn]
    assert record.data == torn and error.data["received"] == 50
    assert error.data["side"] == "client" and error.data["seq"] == record.seq
    assert [v["kind"] for v in derived_violations(trace)] == ["torn_message"]


async def test_a_size_above_the_maximum_is_forwarded_as_a_header_alone(server, tmp_path):
    trace = tmp_path / "t.trace"
    sink = TraceSink(trace)
    huge = Header(9, Command.REGION_WRITE, 64 << 20, 0, 0).pack()
    async with proxied_client(server, tmp_path, sink=sink) as (_, client, stream):
        await stream.send_message(huge)
        # the server reads it as a header alone and goes on with the next message
        reply = await client.request(Command.REGION_READ, RegionAccessBody(0, 7, 2))
        assert reply.body.data == b"\xab\xab"
    sink.close()
    recs = records(trace)
    assert any(isinstance(r, MessageRecord) and r.data == huge for r in recs)
    assert "size_too_large" in [v["kind"] for v in derived_violations(trace)]


async def test_more_fds_than_the_server_allows_are_forwarded_and_recorded(server, tmp_path):
    trace = tmp_path / "t.trace"
    sink = TraceSink(trace)
    async with proxied_client(server, tmp_path, sink=sink) as (_, client, _):
        fds = [make_memfd(f"m{i}", 4096) for i in range(3)]
        await client.request(Command.DMA_MAP, DmaMapBody(32, 3, 0, 0, 4096), fds=fds)
        close_all(fds)
    sink.close()
    recs = records(trace)
    dma_map = next(r for r in recs if isinstance(r, MessageRecord) and r.data[2] == 2)
    assert len(dma_map.fds) == 3
    violations = derived_violations(trace)
    assert [v["kind"] for v in violations] == ["too_many_fds"]
    assert violations[0]["side"] == "client"


async def test_garbage_from_one_client_ends_only_its_session(server, tmp_path):
    trace = tmp_path / "t.trace"
    sink = TraceSink(trace)
    garbage = bytes((i * 37 + 11) % 256 for i in range(300))
    async with open_proxy(tmp_path / "p.sock", server.path, sink=sink) as proxy:
        good_stream = await open_unix_fd_stream(tmp_path / "p.sock")
        good = Endpoint(good_stream, Side.CLIENT)
        async with trio.open_nursery() as nursery:
            await nursery.start(good.run)
            await good.request(Command.VERSION, VersionBody.build(0, 0, None))
            bad = await open_unix_fd_stream(tmp_path / "p.sock")
            await bad.send_message(garbage)
            await bad.aclose()
            with trio.fail_after(5):
                while proxy.statistics().sessions_active != 1 or \
                        proxy.statistics().sessions_total != 2:
                    await trio.sleep(0.001)
            reply = await good.request(Command.REGION_READ, RegionAccessBody(0, 7, 1))
            assert reply.body.data == b"\xab"
            await good_stream.aclose()
        await settle(proxy, 2)
    sink.close()
    recs = records(trace)
    bad_bytes = b"".join(r.data for r in recs if isinstance(r, MessageRecord) and r.session == 2
                         and r.direction is Direction.C2S)
    assert bad_bytes == garbage  # every byte that arrived is in the trace, the torn end too


async def test_hundreds_of_sessions_leave_no_fd_behind(server, tmp_path):
    async with open_proxy(tmp_path / "p.sock", server.path) as proxy:
        for _ in range(200):
            stream = await open_unix_fd_stream(tmp_path / "p.sock")
            await stream.send_message(
                encode(build_command(Command.VERSION, 0, VersionBody.build(0, 0, None)))[0]
            )
            await stream.receive_message()
            await stream.aclose()
        await settle(proxy, 200)
        assert proxy.statistics().sessions_total == 200


async def test_serve_proxy_reports_its_proxy_through_task_status(server, tmp_path, nursery):
    from vfioproxy.proxy import serve_proxy

    proxy = await nursery.start(serve_proxy, tmp_path / "p.sock", server.path)
    stream = await open_unix_fd_stream(tmp_path / "p.sock")
    await stream.send_message(
        encode(build_command(Command.VERSION, 0, VersionBody.build(0, 0, None)))[0]
    )
    await stream.receive_message()
    assert proxy.statistics().c2s.messages == 1
    await stream.aclose()
    await settle(proxy)
    nursery.cancel_scope.cancel()


async def test_a_burst_that_never_lets_the_proxy_idle_is_recorded_whole_and_in_order(
        server, tmp_path):
    # 1000 posted writes back to back: the forwarding never waits, so the
    # digest runs at the backlog limit, a message per forwarded message
    trace = tmp_path / "t.trace"
    sink = TraceSink(trace)
    async with proxied_client(server, tmp_path, sink=sink) as (proxy, _, stream):
        for msg_id in range(1000):
            data, _ = encode(build_command(
                Command.REGION_WRITE, msg_id, RegionAccessBody(0, 7, 4, b"abcd"), no_reply=True))
            await stream.send_message(data)
        with trio.fail_after(10):
            while proxy.statistics().c2s.messages < 1001:
                await trio.sleep(0.001)
    sink.close()
    writes = [Header.parse(r.data).msg_id for r in records(trace)
              if isinstance(r, MessageRecord) and r.data[2] == Command.REGION_WRITE]
    assert writes == list(range(1000))


async def test_a_larger_negotiated_transfer_size_frames_the_next_messages(tmp_path, nursery):
    # both sides offer 4 MiB: a 2 MiB write right after VERSION must travel whole
    # (with the default 1 MiB limit it would be framed as a header alone)
    from vfioproxy.protocol.capabilities import Capabilities

    caps = Capabilities(max_data_xfer_size=4 << 20)
    received = []

    async def handler(message):
        received.append(message)
        if message.command == Command.VERSION:
            return build_reply(message, VersionBody.build(0, 0, caps))
        return build_reply(message)

    listener = await open_unix_listener(tmp_path / "server.sock")

    async def serve(*, task_status=trio.TASK_STATUS_IGNORED):
        async with listener:
            task_status.started()
            stream = await listener.accept()
            endpoint = Endpoint(FdStream(stream.socket), Side.SERVER, handler=handler,
                                max_message_size=8 << 20)
            try:
                await endpoint.run()
            finally:
                await endpoint.aclose()

    await nursery.start(serve)
    async with open_proxy(tmp_path / "p.sock", tmp_path / "server.sock") as proxy:
        stream = await open_unix_fd_stream(tmp_path / "p.sock")
        async with stream:
            version, _ = encode(build_command(Command.VERSION, 0, VersionBody.build(0, 0, caps)))
            await stream.send_message(version)
            await stream.receive_message()
            write, _ = encode(build_command(
                Command.REGION_WRITE, 1, RegionAccessBody(0, 2, 2 << 20, bytes(2 << 20))))
            await stream.send_message(write)
            with trio.fail_after(10):
                reply, _ = await stream.receive_message(8 << 20)
            assert Header.parse(reply).command == Command.REGION_WRITE
            assert not Header.parse(reply).is_error
        await settle(proxy)
    assert received[1].command == Command.REGION_WRITE
    assert len(received[1].body.data) == 2 << 20
    assert proxy.statistics().violations == 0
