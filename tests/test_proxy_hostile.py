"""Hostile peers against the proxy: nothing a peer sends ends another session
or the proxy, the two directions are independent, and nothing that passed is
lost from the trace.

Peers here are raw sockets that misbehave on purpose (split headers, fds on
every byte, messages torn, stalled or never read); every test runs with both
forwarders (a thread per session, and trio tasks). The checks compare what
each receiver actually got with what the trace says it got.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
import tempfile
import threading
from array import array
from contextlib import asynccontextmanager

import hypothesis.strategies as st
import pytest
import trio
from hypothesis import HealthCheck, given, settings

import vfioproxy.proxy.fastpath
from recorder.reader import TraceReader
from recorder.records import EventRecord, MessageRecord
from recorder.sink import TraceSink
from tests.conftest import FD_HYGIENE
from tests.realdata import TRACES, capture_messages
from vfioproxy.io.fds import FdKind, OwnedFd, close_all, make_eventfd, make_memfd
from vfioproxy.protocol.bodies import RegionAccessBody, VersionBody
from vfioproxy.protocol.capabilities import Capabilities, parse_capabilities
from vfioproxy.protocol.codec import build_command, build_reply, encode
from vfioproxy.protocol.header import HEADER_STRUCT, Command
from vfioproxy.proxy import ProxyOptions, open_proxy
from vfioproxy.proxy.ledger import SessionLedger
from vfioproxy.side import Direction
from vfioproxy.trace.decoded import DecodedMessage, TornMessage, decoded_records

pytestmark = FD_HYGIENE

_SCM = (socket.SOL_SOCKET, socket.SCM_RIGHTS)


@pytest.fixture(params=["threads", "threads-python", "trio"])
def mode(request, monkeypatch):
    """The threads (with and without the C lane) or trio tasks."""
    if request.param == "threads-python":
        monkeypatch.setattr(vfioproxy.proxy.fastpath, "lane", None)
    return request.param


def version(msg_id=0, caps=None):
    return encode(build_command(Command.VERSION, msg_id, VersionBody.build(0, 0, caps)))[0]


def version_reply(msg_id=0, caps=None):
    return encode(build_reply(build_command(Command.VERSION, msg_id), VersionBody.build(0, 0,
                                                                                       caps)))[0]


def region_write(msg_id, size, *, no_reply=False):
    body = RegionAccessBody(0, 2, size, bytes(i % 251 for i in range(size)))
    return encode(build_command(Command.REGION_WRITE, msg_id, body, no_reply=no_reply))[0]


def region_read(msg_id, count=4):
    return encode(build_command(Command.REGION_READ, msg_id, RegionAccessBody(0, 7, count)))[0]


class Peer:
    """A raw end of a connection that does exactly what a test tells it to."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.fds_received = 0

    async def send(self, data: bytes, fds=()) -> None:
        """One sendmsg (the rest, if the kernel takes less, in more sends)."""
        anc = [(*_SCM, array("i", [f.fileno() for f in fds]))] if fds else []
        sent = await self.sock.sendmsg([data], anc)
        while sent < len(data):
            sent += await self.sock.send(data[sent:])

    async def receive(self, n: int) -> bytes:
        """Exactly ``n`` bytes (fds that come with them are counted and closed)."""
        got = bytearray()
        while len(got) < n:
            chunk = await self._recv(n - len(got))
            if not chunk:
                raise EOFError(f"EOF after {len(got)} of {n} bytes")
            got += chunk
        return bytes(got)

    async def receive_message(self) -> bytes:
        header = await self.receive(16)
        size = struct.unpack_from("<I", header, 4)[0]
        return header + (await self.receive(size - 16) if size > 16 else b"")

    async def read_to_eof(self) -> bytes:
        got = bytearray()
        while chunk := await self._recv(1 << 16):
            got += chunk
        return bytes(got)

    async def _recv(self, n: int) -> bytes:
        try:
            data, anc, _, _ = await self.sock.recvmsg(n, socket.CMSG_LEN(253 * 4))
        except ConnectionResetError:
            return b""
        for level, kind, blob in anc:
            if (level, kind) == _SCM:
                numbers = array("i")
                numbers.frombytes(blob[: len(blob) - len(blob) % 4])
                for fd in numbers:
                    os.close(fd)
                    self.fds_received += 1
        return data

    def close(self) -> None:
        self.sock.close()


class ServerSide:
    """The device server's socket: each connection the proxy makes is a Peer."""

    def __init__(self, path, backlog: int = 16) -> None:
        self.path = str(path)
        self.listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.backlog = backlog
        self.peers: list[Peer] = []

    async def start(self) -> None:
        await self.listener.bind(self.path)
        self.listener.listen(self.backlog)

    async def accept(self) -> Peer:
        with trio.fail_after(5):
            sock, _ = await self.listener.accept()
        peer = Peer(sock)
        self.peers.append(peer)
        return peer

    def close(self) -> None:
        for peer in self.peers:
            peer.close()
        self.listener.close()


@pytest.fixture
async def server(tmp_path):
    side = ServerSide(tmp_path / "server.sock")
    await side.start()
    yield side
    side.close()


@asynccontextmanager
async def proxied(tmp_path, server_path, mode, *, injector=None, **options):
    """A recording proxy (both forwarders; ``injector``: its fault rules) and the
    path of its trace; on exit the proxy is gone and the trace closed."""
    trace = tmp_path / "t.trace"
    sink = TraceSink(trace)
    opts = ProxyOptions(threads=mode.startswith("threads"), **options)
    try:
        async with open_proxy(tmp_path / "p.sock", server_path, sink=sink, options=opts,
                              injector=injector) as p:
            yield p, trace
    finally:
        sink.close()


async def connect(tmp_path) -> Peer:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(str(tmp_path / "p.sock"))
    return Peer(sock)


async def settle(proxy, sessions=1):
    with trio.fail_after(10):
        while proxy.statistics().sessions_total < sessions:
            await trio.sleep(0.001)
        await proxy.wait_sessions()


def records(path):
    with TraceReader(path) as reader:
        return list(reader)


def events(path, kind=None):
    return [r for r in records(path) if isinstance(r, EventRecord)
            and (kind is None or r.kind == kind)]


def recorded(path, direction, session=1):
    """The bytes the trace says crossed in ``direction``, in order."""
    return b"".join(r.data for r in records(path) if isinstance(r, MessageRecord)
                    and r.direction is direction and r.session == session)


def derived(path):
    with TraceReader(path) as reader:
        out = []
        for item in decoded_records(reader):
            if isinstance(item, DecodedMessage):
                out.extend(v.kind for v in item.observation.violations)
            elif isinstance(item, TornMessage):
                out.append(item.violation.kind)
        return out


# --------------------------------------------------------------------- isolation


async def test_more_fds_than_one_sendmsg_carries_are_capped_and_recorded(tmp_path, server,
                                                                        mode):
    async with proxied(tmp_path, server.path, mode) as (proxy, trace):
        client = await connect(tmp_path)
        srv = await server.accept()
        header = HEADER_STRUCT.pack(1, Command.DEVICE_SET_IRQS, 16, 0, 0)
        fds = [make_eventfd() for _ in range(300)]
        try:
            for i in range(15):  # the header a byte at a time, 20 fds with each byte
                await client.send(header[i:i + 1], fds[20 * i:20 * (i + 1)])
            await client.send(header[15:])
        finally:
            close_all(fds)
        assert await srv.receive(16) == header
        assert srv.fds_received == 253
        # the session goes on
        await client.send(region_read(2))
        assert await srv.receive_message() == region_read(2)
        client.close()
        await settle(proxy)
    (dropped,) = events(trace, "fds_dropped")
    assert dropped.data["dropped"] == 300 - 253
    (first,) = [r for r in records(trace) if isinstance(r, MessageRecord)][:1]
    assert len(first.fds) == 253 and dropped.data["seq"] == first.seq


async def test_a_client_closing_one_byte_short_of_a_1_mib_message_is_recorded_whole(
        tmp_path, server, mode):
    async with proxied(tmp_path, server.path, mode) as (proxy, trace):
        client = await connect(tmp_path)
        srv = await server.accept()
        message = region_write(1, 1 << 20)
        await client.send(message[:-1])
        client.close()
        got = await srv.read_to_eof()
        await settle(proxy)
    assert got == message[:-1]  # the receiver got the torn stream, then EOF
    (record,) = [r for r in records(trace) if isinstance(r, MessageRecord)]
    assert record.torn and record.data == message[:-1]
    assert derived(trace) == ["torn_message"]
    close = events(trace, "session_close")[0].data
    assert close["closed_by"] == "client" and "mid-message" in close["reason"]


async def test_a_huge_negotiated_message_is_handed_on_in_pieces_and_recorded_truncated(
        tmp_path, server, mode):
    big = Capabilities(max_data_xfer_size=1 << 30)
    limit = 1 << 20
    async with proxied(tmp_path, server.path, mode, max_message_buffer=limit) as (proxy, trace):
        client = await connect(tmp_path)
        srv = await server.accept()
        await client.send(version(0, big))
        await srv.receive_message()
        await srv.send(version_reply(0, big))
        await client.receive_message()
        size = 81 << 20
        head = HEADER_STRUCT.pack(1, Command.REGION_WRITE, size, 0, 0)
        body = struct.pack("<QII", 0, 2, size - 32) + bytes(size - 32)

        async def send_it():
            await client.send(head + body)
            client.close()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_it)
            got = await srv.read_to_eof()
        await settle(proxy)
    assert len(got) == size and got[:16] == head  # forwarded whole, byte-exact
    big_record = [r for r in records(trace) if isinstance(r, MessageRecord)][-1]
    assert big_record.length == size and len(big_record.data) == limit
    assert big_record.data == (head + body)[:limit]
    assert "truncated_record" in derived(trace)


async def test_a_twin_socket_that_is_not_a_stream_socket_is_forwarded_as_it_is(
        tmp_path, server, mode):
    twin = parse_capabilities({"twin_socket": {"supported": True, "fd_index": 0}})
    async with proxied(tmp_path, server.path, mode) as (proxy, trace):
        client = await connect(tmp_path)
        srv = await server.accept()
        await client.send(version(0, twin))
        await srv.receive_message()
        dgram_a, dgram_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            await srv.send(version_reply(0, twin), [dgram_a])
        finally:
            dgram_a.close()
            dgram_b.close()
        reply = await client.receive_message()
        assert reply == version_reply(0, twin) and client.fds_received == 1
        await client.send(region_read(1))  # the session goes on
        assert await srv.receive_message() == region_read(1)
        client.close()
        await settle(proxy)
    notes = [e.data["text"] for e in events(trace, "note")]
    assert any("not an AF_UNIX stream socket" in text for text in notes)


async def test_an_internal_error_in_one_session_ends_that_session_only(
        tmp_path, server, mode, monkeypatch):
    real = SessionLedger.record

    def faulty(self, direction, t_ns, data, *args, **kwargs):
        if self.id == 2 and data[2] == Command.REGION_READ:
            raise RuntimeError("a bug on the path of session 2")
        return real(self, direction, t_ns, data, *args, **kwargs)

    real_forwarded = SessionLedger.forwarded

    def faulty_count(self, direction, messages, nbytes):  # the C lane's messages
        if self.id == 2:
            raise RuntimeError("a bug on the path of session 2")
        return real_forwarded(self, direction, messages, nbytes)

    monkeypatch.setattr(SessionLedger, "record", faulty)
    monkeypatch.setattr(SessionLedger, "forwarded", faulty_count)
    async with proxied(tmp_path, server.path, mode) as (proxy, trace):
        first = await connect(tmp_path)
        srv1 = await server.accept()
        second = await connect(tmp_path)
        srv2 = await server.accept()
        await second.send(region_read(1))
        with trio.fail_after(5):
            while proxy.statistics().sessions_active != 1:
                await trio.sleep(0.001)
        await first.send(region_read(1))  # the other session is untouched
        assert await srv1.receive_message() == region_read(1)
        third = await connect(tmp_path)  # and the proxy still accepts
        srv3 = await server.accept()
        await third.send(region_read(3))
        assert await srv3.receive_message() == region_read(3)
        for peer in (first, second, third, srv2):
            peer.close()
        await settle(proxy, 3)
    closes = {e.session: e.data for e in events(trace, "session_close")}
    assert closes[2]["closed_by"] == "proxy"
    assert "internal error" in closes[2]["reason"] and "session 2" in closes[2]["reason"]
    assert closes[1]["closed_by"] == "client" and closes[3]["closed_by"] == "client"


async def test_clients_beyond_max_sessions_wait_in_the_listen_queue(tmp_path, server, mode):
    threads = threading.active_count()
    async with proxied(tmp_path, server.path, mode, max_sessions=2) as (proxy, _):
        clients = [await connect(tmp_path) for _ in range(4)]
        servers = [await server.accept() for _ in range(2)]
        await trio.sleep(0.05)
        assert proxy.statistics().sessions_total == 2  # the others wait, unaccepted
        assert threading.active_count() <= threads + 2
        clients[0].close()
        servers.append(await server.accept())  # a slot freed: the third is served
        await clients[2].send(region_read(1))
        assert await servers[2].receive_message() == region_read(1)
        for peer in clients[1:] + servers:
            peer.close()
        servers.append(await server.accept())
        servers[-1].close()
        await settle(proxy, 4)
    assert proxy.statistics().sessions_total == 4


# --------------------------------------------------------------------- directions


async def test_a_server_stalled_mid_message_does_not_hold_the_client_back(
        tmp_path, server, mode):
    async with proxied(tmp_path, server.path, mode) as (proxy, trace):
        client = await connect(tmp_path)
        srv = await server.accept()
        reply = encode(build_reply(build_command(Command.REGION_READ, 1),
                                   RegionAccessBody(0, 7, 4, b"abcd")))[0]
        await srv.send(reply[:20])  # the server stops part-way through a message
        await client.send(region_read(2))
        assert await srv.receive_message() == region_read(2)  # forwarded meanwhile
        await srv.send(reply[20:])
        assert await client.receive_message() == reply
        client.close()
        srv.close()
        await settle(proxy)
    assert recorded(trace, Direction.C2S) == region_read(2)
    assert recorded(trace, Direction.S2C) == reply


async def test_a_peer_that_stops_reading_fills_only_its_own_queue(tmp_path, server, mode):
    limit = 64 * 1024
    async with proxied(tmp_path, server.path, mode, max_queue=limit) as (proxy, trace):
        client = await connect(tmp_path)
        srv = await server.accept()
        sent = []

        async def flood():  # the server never reads: this ends blocked in send
            for msg_id in range(10_000):
                message = region_write(msg_id % 65536, 4096, no_reply=True)
                await client.send(message)
                sent.append(message)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            with trio.fail_after(5):
                while not any(e.kind == "queue_full" for e in events(trace)):
                    await trio.sleep(0.01)
            # meanwhile the other direction flows
            for msg_id in range(50):
                command = encode(build_command(Command.DMA_READ, msg_id, RegionAccessBody(
                    0, 0, 8)))[0]
                await srv.send(command)
                assert await client.receive_message() == command
            nursery.cancel_scope.cancel()
        # the proxy stopped reading the client: it holds at most the limit and a message
        held = len(b"".join(sent)) - len(recorded(trace, Direction.C2S))
        assert held >= 0
        got = await _drain(srv, len(recorded(trace, Direction.C2S)))
        client.close()
        rest = await srv.read_to_eof()
        await settle(proxy)
    assert got + rest == recorded(trace, Direction.C2S)  # the server got what the trace says
    assert recorded(trace, Direction.C2S) == b"".join(sent)[: len(got + rest)]
    full = events(trace, "queue_full")[0]
    assert full.data["direction"] == "c2s" and full.data["bytes"] >= limit


async def _drain(peer: Peer, n: int) -> bytes:
    return await peer.receive(n) if n else b""


async def test_the_session_ends_when_the_client_leaves_even_if_the_server_stays(
        tmp_path, server, mode):
    async with proxied(tmp_path, server.path, mode) as (proxy, trace):
        client = await connect(tmp_path)
        srv = await server.accept()
        await client.send(region_read(1))
        assert await srv.receive_message() == region_read(1)
        client.close()
        await settle(proxy)  # without the server doing anything
        assert await srv.read_to_eof() == b""  # the server sees EOF ...
        with pytest.raises(OSError) as info:  # ... and its writes fail, as directly
            await srv.send(region_read(2))
        assert info.value.errno == errno.EPIPE
    close = events(trace, "session_close")[0].data
    assert close["closed_by"] == "client"


async def test_a_client_half_closed_mid_message_still_gets_its_replies(tmp_path, server, mode):
    async with proxied(tmp_path, server.path, mode) as (proxy, trace):
        client = await connect(tmp_path)
        srv = await server.accept()
        torn = region_read(2)[:10]
        await client.send(region_read(1) + torn)
        client.sock.shutdown(socket.SHUT_WR)  # sends nothing more, still reads
        assert await srv.receive_message() == region_read(1)
        assert await srv.read_to_eof() == torn  # the torn bytes, then EOF
        reply = encode(build_reply(build_command(Command.REGION_READ, 1),
                                   RegionAccessBody(0, 7, 4, b"wxyz")))[0]
        await srv.send(reply)
        assert await client.receive_message() == reply  # the other direction still works
        srv.close()
        assert await client.read_to_eof() == b""
        client.close()
        await settle(proxy)
    assert recorded(trace, Direction.C2S) == region_read(1) + torn
    assert recorded(trace, Direction.S2C) == reply
    assert not events(trace, "undelivered")


async def test_peers_that_write_before_they_read_do_not_deadlock_through_the_proxy(
        tmp_path, server, mode):
    # each side writes ~150 KiB before reading: directly, the socket buffers hold it
    messages = [region_write(i, 4000, no_reply=True) for i in range(36)]
    burst = b"".join(messages)
    async with proxied(tmp_path, server.path, mode) as (proxy, _):
        client = await connect(tmp_path)
        srv = await server.accept()
        results = {}

        async def side(name, peer):
            for message in messages:
                await peer.send(message)
            results[name] = await peer.receive(len(burst))

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(side, "client", client)
                nursery.start_soon(side, "server", srv)
        client.close()
        srv.close()
        await settle(proxy)
    assert results == {"client": burst, "server": burst}


def fill_listen_queue(path) -> list[socket.socket]:
    """Connections that fill the listen queue of a server listening with backlog 0."""
    queued = []
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(str(path))
        except BlockingIOError:
            sock.close()
            return queued
        queued.append(sock)


@pytest.fixture
async def full_server(tmp_path):
    """A server listening with backlog 0 whose listen queue is full (it accepts
    nothing until the test says so); the connections that fill it."""
    server = ServerSide(tmp_path / "server.sock", backlog=0)
    await server.start()
    filler = fill_listen_queue(server.path)
    yield server, filler
    for sock in filler:
        sock.close()
    server.close()


async def test_a_server_with_a_full_listen_queue_is_retried(tmp_path, mode, full_server):
    server, filler = full_server
    async with proxied(tmp_path, server.path, mode) as (proxy, trace):
        client = await connect(tmp_path)
        await trio.sleep(0.1)  # the proxy's connect meets EAGAIN and retries
        for _ in filler:
            (await server.accept()).close()
        srv = await server.accept()  # the proxy got in once there was room
        await client.send(region_read(1))
        assert await srv.receive_message() == region_read(1)
        client.close()
        await settle(proxy)
    assert recorded(trace, Direction.C2S) == region_read(1)


async def test_a_server_whose_queue_stays_full_fails_that_session_clearly(tmp_path, mode,
                                                                          full_server):
    server, _ = full_server
    async with proxied(tmp_path, server.path, mode, connect_timeout=0.2) as (proxy, trace):
        client = await connect(tmp_path)
        assert await client.read_to_eof() == b""
        client.close()
        await settle(proxy)
    (error,) = events(trace, "error")
    assert "listen queue stayed full" in error.data["text"]


# --------------------------------------------------------------------- nothing lost


async def test_a_server_that_leaves_loses_none_of_the_clients_bytes_unrecorded(
        tmp_path, server, mode):
    async with proxied(tmp_path, server.path, mode, max_queue=256 * 1024) as (proxy, trace):
        client = await connect(tmp_path)
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        srv = await server.accept()
        await client.send(region_read(1))
        assert await srv.receive_message() == region_read(1)
        sent = [region_read(1)]

        async def burst():  # the server reads no more: this fills every buffer on the way
            for msg_id in range(2, 6000):
                message = region_write(msg_id, 2000, no_reply=True)
                await client.send(message)
                sent.append(message)

        with trio.move_on_after(1):
            await burst()
        assert len(sent) > 500  # megabytes wait in the proxy's queue and socket buffers
        srv.close()  # then the server leaves
        with trio.fail_after(10):
            await settle(proxy)
        client.close()
    # every byte the client managed to send is in the trace, in order ...
    assert recorded(trace, Direction.C2S) == b"".join(sent)
    # ... and each message the server never got says so
    c2s = [r for r in records(trace) if isinstance(r, MessageRecord)
           and r.direction is Direction.C2S]
    undelivered = {e.data["seq"]: e.data for e in events(trace, "undelivered")}
    delivered = [r for r in c2s if r.seq not in undelivered]
    assert delivered == c2s[: len(delivered)] and len(undelivered) > 100
    # only the message the server was part-way through can have been partly sent
    assert all(u["delivered"] == 0 for u in list(undelivered.values())[1:])
    assert events(trace, "session_close")[0].data["closed_by"] == "server"


async def test_trace_files_are_private_and_never_written_through_a_symlink(tmp_path):
    sink = TraceSink(tmp_path / "t.trace")
    sink.close()
    assert stat.S_IMODE(os.stat(tmp_path / "t.trace").st_mode) == 0o600
    per = TraceSink(str(tmp_path / "dir") + "/")
    per.writer_for(1)
    per.close()
    assert stat.S_IMODE(os.stat(tmp_path / "dir").st_mode) == 0o700
    (written,) = (tmp_path / "dir").iterdir()
    assert stat.S_IMODE(os.stat(written).st_mode) == 0o600
    target = tmp_path / "elsewhere"
    target.write_text("precious")
    os.symlink(target, tmp_path / "link.trace")
    with pytest.raises(Exception, match="symlink"):
        TraceSink(tmp_path / "link.trace", overwrite=True)
    assert target.read_text() == "precious"


# --------------------------------------------------------------------- live == derived


async def test_live_checks_record_exactly_the_violations_a_reader_derives(tmp_path, server,
                                                                          mode):
    garbage = [
        HEADER_STRUCT.pack(5, Command.REGION_READ, 8, 0, 0),  # size below 16
        HEADER_STRUCT.pack(6, Command.DMA_READ, 16, 0, 0),  # a server command from the client
        HEADER_STRUCT.pack(7, 99, 16, 0x40, 0),  # unknown command, unknown flag
        region_read(8),
        region_read(8),  # duplicate outstanding id
    ]
    async with proxied(tmp_path, server.path, mode, check_live=True) as (proxy, trace):
        client = await connect(tmp_path)
        srv = await server.accept()
        for message in garbage:
            await client.send(message)
        await srv.receive(sum(len(m) for m in garbage))
        stray = encode(build_reply(build_command(Command.REGION_READ, 42)))[0]
        await srv.send(stray)  # a reply nobody asked for
        await client.receive_message()
        client.close()
        srv.close()
        await settle(proxy)
    live = [(e.data["kind"], e.data["index"]) for e in events(trace, "violation")]
    with TraceReader(trace) as reader:
        found = [(v.kind, v.index) for item in decoded_records(reader)
                 if isinstance(item, DecodedMessage) for v in item.observation.violations]
    assert live == found and len(found) >= 6
    assert proxy.statistics().violations == len(found)


async def test_repeated_live_violations_are_recorded_compactly(tmp_path, server, mode):
    async with proxied(tmp_path, server.path, mode, check_live=True) as (proxy, trace):
        client = await connect(tmp_path)
        srv = await server.accept()
        bad = HEADER_STRUCT.pack(1, Command.REGION_READ, 8, 0, 0) * 2000
        await client.send(bad)
        assert await srv.receive(len(bad)) == bad
        client.close()
        srv.close()
        await settle(proxy)
    recorded_whole = events(trace, "violation")
    repeats = events(trace, "violations_repeated")
    counted = sum(e.data["count"] for e in repeats)
    assert counted + len(recorded_whole) == len(derived(trace)) > 2000
    assert len(recorded_whole) <= 10 and len(repeats) <= 10
    # each header is one small message record; the violations add next to nothing
    assert os.path.getsize(trace) < len(bad) * 5


# --------------------------------------------------------------------- fuzzed


_frames = st.lists(
    st.tuples(
        st.integers(0, 0xFFFF),  # msg_id
        st.sampled_from([*map(int, Command), 0, 14, 19, 0xFFFF]),
        st.sampled_from([0, 1, 0x10, 0x21, 0x40]),  # flags
        st.one_of(st.just(None), st.sampled_from([0, 8, 15, 0xFFFFFFFF])),  # size override
        st.binary(max_size=48),
    ),
    max_size=25,
)
_writes = st.tuples(_frames, st.lists(st.integers(1, 64), min_size=1, max_size=8),
                    st.lists(st.integers(0, 3), min_size=1, max_size=8))


def _stream(frames, cuts, fd_counts):
    """The frames as bytes, cut into writes with some fds on some writes."""
    data = b"".join(HEADER_STRUCT.pack(i, c, 16 + len(b) if s is None else s, f, 0) + b
                    for i, c, f, s, b in frames)
    writes, at, k = [], 0, 0
    while at < len(data):
        cut = cuts[k % len(cuts)]
        writes.append((data[at:at + cut], fd_counts[k % len(fd_counts)]))
        at += cut
        k += 1
    return data, writes


async def _send_all(peer: Peer, writes) -> None:
    for chunk, nfds in writes:
        fds = [make_eventfd() for _ in range(nfds)]
        try:
            await peer.send(chunk, fds)
        finally:
            close_all(fds)
    peer.sock.shutdown(socket.SHUT_WR)


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(c2s=_writes, s2c=_writes)
async def test_any_byte_streams_both_ways_pass_whole_and_are_recorded_in_order(
        tmp_path_factory, mode, c2s, s2c):
    tmp_path = tmp_path_factory.mktemp("fuzz")
    server = ServerSide(tmp_path / "server.sock")
    await server.start()
    try:
        c2s_data, c2s_writes = _stream(*c2s)
        s2c_data, s2c_writes = _stream(*s2c)
        async with proxied(tmp_path, server.path, mode, check_live=True) as (proxy, trace):
            client = await connect(tmp_path)
            srv = await server.accept()
            got = {}

            async def reader(name, peer):
                got[name] = await peer.read_to_eof()

            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_send_all, client, c2s_writes)
                    nursery.start_soon(_send_all, srv, s2c_writes)
                    nursery.start_soon(reader, "server", srv)
                    nursery.start_soon(reader, "client", client)
                client.close()
                srv.close()
                await settle(proxy)
    finally:
        server.close()
    # every byte each side sent is in the trace, in order, and each receiver got it
    assert recorded(trace, Direction.C2S) == c2s_data == got["server"]
    assert recorded(trace, Direction.S2C) == s2c_data == got["client"]
    assert not events(trace, "undelivered")
    # the violations checked on the path are the ones a reader derives
    live = [(e.data["kind"], e.data["index"]) for e in events(trace, "violation")]
    counted = sum(e.data["count"] for e in events(trace, "violations_repeated"))
    with TraceReader(trace) as reader:
        found = []
        for item in decoded_records(reader):
            if isinstance(item, DecodedMessage):
                found.extend((v.kind, v.index) for v in item.observation.violations)
            elif isinstance(item, TornMessage):
                found.append((item.violation.kind, item.violation.index))
    assert len(live) + counted == len(found)
    assert set(live) <= set(found)


# --------------------------------------------------------------------- real sessions


def _fds_like(record: MessageRecord) -> list:
    """Fresh fds of the kinds a recorded message carried."""
    fds = []
    for fd in record.fds:
        if fd.kind is FdKind.EVENTFD or fd.kind is FdKind.OTHER:
            fds.append(make_eventfd())
        elif fd.kind is FdKind.SOCKET:
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            theirs.close()
            fds.append(OwnedFd(mine.detach()))
        elif fd.kind is FdKind.FILE:
            with tempfile.TemporaryFile() as file:  # an unlinked regular file
                os.ftruncate(file.fileno(), fd.size or 4096)
                fds.append(OwnedFd(os.dup(file.fileno())))
        else:
            fds.append(make_memfd("ram", fd.size or 4096))
    return fds


@pytest.mark.parametrize("path", sorted(TRACES.glob("*.trace")), ids=lambda p: p.stem)
async def test_every_bundled_session_passes_byte_exact_and_its_violations_derive_the_same(
        tmp_path, server, mode, path):
    recorded_before = list(capture_messages(path))
    async with proxied(tmp_path, server.path, mode, check_live=True) as (proxy, trace):
        client = await connect(tmp_path)
        srv = await server.accept()
        for record in recorded_before:  # each side sends its messages in recorded order
            sender, receiver = (client, srv) if record.direction is Direction.C2S else (srv,
                                                                                         client)
            fds = _fds_like(record)
            try:
                await sender.send(record.data, fds)
            finally:
                close_all(fds)
            with trio.fail_after(5):
                assert await receiver.receive(len(record.data)) == record.data
        client.close()
        srv.close()
        await settle(proxy)
    assert (client.fds_received, srv.fds_received) == (
        sum(len(r.fds) for r in recorded_before if r.direction is Direction.S2C),
        sum(len(r.fds) for r in recorded_before if r.direction is Direction.C2S))
    again = [r for r in records(trace) if isinstance(r, MessageRecord)]
    assert [(r.direction, r.data, [fd.kind for fd in r.fds]) for r in again] == [
        (r.direction, r.data, [fd.kind if fd.kind is not FdKind.OTHER else FdKind.EVENTFD
                               for fd in r.fds]) for r in recorded_before]
    live = [(e.data["kind"], e.data["index"]) for e in events(trace, "violation")]
    counted = sum(e.data["count"] for e in events(trace, "violations_repeated"))
    with TraceReader(trace) as reader:
        found = [(v.kind, v.index) for item in decoded_records(reader)
                 if isinstance(item, DecodedMessage) for v in item.observation.violations]
    assert live == found[: len(live)] and len(live) + counted == len(found)
