"""The C lane (``vfioproxy/proxy/_fastpath.c``): what it records is byte for byte
what msgpack makes, it numbers records in one sequence with every other
writer of the trace, and whatever it hands back to the Python forwarding
comes out as the Python lane alone would give it: what each receiver got,
and what the trace says it got.

The rest of the proxy's suites (test_proxy, test_proxy_hostile) run every
test with the threads both with the lane (``threads``) and without it
(``threads-python``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct

import msgpack
import pytest
import trio

import vfioproxy.proxy.fastpath
from recorder.records import EventRecord, MessageRecord, PlainMessagePacker
from tests.conftest import FD_HYGIENE
from tests.test_proxy_hostile import (
    Peer,
    connect,
    proxied,
    records,
    region_read,
    server,  # noqa: F401 (the fixture)
    settle,
    version,
    version_reply,
)
from vfioproxy.inject import Injector
from vfioproxy.io.fds import close_all, make_eventfd
from vfioproxy.protocol.header import HEADER_STRUCT, Command
from vfioproxy.proxy.ledger import SessionLedger
from vfioproxy.side import Direction

BUILT = vfioproxy.proxy.fastpath.lane is not None
pytestmark = [
    *FD_HYGIENE,
    pytest.mark.skipif(not BUILT and not os.environ.get("CI"),
                       reason="vfioproxy.proxy._fastpath is not built (pip install -e . builds it) "
                              "or VFIOPROXY_PURE_PYTHON=1"),
]


def test_the_lane_is_built():
    """CI installs with a compiler: the lane must be there (else the rest skips)."""
    assert BUILT, "vfioproxy.proxy._fastpath was not built: see the pip install log"


def plain(msg_id: int, n: int, command: int = Command.REGION_WRITE, flags: int = 0) -> bytes:
    """A message of ``n`` body bytes (a pattern that names its id)."""
    body = bytes((msg_id + i) % 251 for i in range(n))
    return HEADER_STRUCT.pack(msg_id & 0xFFFF, command, 16 + n, flags, 0) + body


def reply_to(message: bytes) -> bytes:
    msg_id, command = struct.unpack_from("<HH", message)
    return plain(msg_id, 4, command, flags=1)


@pytest.fixture
def lane_counts(monkeypatch):
    """Messages the C lane forwarded (it reports them in ``SessionLedger.forwarded``)."""
    counted = {Direction.C2S: 0, Direction.S2C: 0}
    real = SessionLedger.forwarded

    def spy(self, direction, messages, nbytes):
        counted[direction] += messages
        real(self, direction, messages, nbytes)

    monkeypatch.setattr(SessionLedger, "forwarded", spy)
    return counted


async def ping_pong(client: Peer, srv: Peer, messages: list[bytes]) -> None:
    for message in messages:
        await client.send(message)
        assert await srv.receive_message() == message
        answer = reply_to(message)
        await srv.send(answer)
        assert await client.receive_message() == answer


def raw_records(path) -> list[tuple[object, bytes]]:
    """Every record of a trace file with its bytes as written."""
    data = path.read_bytes()
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=len(data) + 1)
    unpacker.feed(data)
    out = []
    start = 0
    for obj in unpacker:
        end = unpacker.tell()
        out.append((obj, data[start:end]))
        start = end
    assert start == len(data)
    return out


async def test_the_lane_records_exactly_what_msgpack_makes(tmp_path, server, lane_counts):  # noqa: F811
    # bodies across msgpack's bin8/bin16/bin32 and the lane's inline limit; 300
    # more messages take seq across msgpack's fixint/uint8/uint16 boundaries
    sizes = [0, 1, 200, 239, 240, 4080, 4081, 70000, *([4] * 300)]
    messages = [plain(i + 1, n) for i, n in enumerate(sizes)]
    async with proxied(tmp_path, server.path, "threads") as (proxy, trace):
        client = await connect(tmp_path)
        srv = await server.accept()
        await ping_pong(client, srv, messages)
        client.close()
        await settle(proxy)
    assert lane_counts[Direction.C2S] > 250 and lane_counts[Direction.S2C] > 250
    raw = raw_records(trace)
    for obj, blob in raw:
        assert msgpack.packb(obj, use_bin_type=True) == blob
    got = [(r.direction, r.data) for r in records(trace) if isinstance(r, MessageRecord)]
    want = []
    for message in messages:
        want += [(Direction.C2S, message), (Direction.S2C, reply_to(message))]
    assert got == want
    stats = proxy.statistics()
    assert stats.c2s.messages == len(messages) and stats.s2c.messages == len(messages)
    assert stats.c2s.bytes == sum(map(len, messages))


async def test_sessions_in_the_lane_share_one_sequence(tmp_path, server, lane_counts):  # noqa: F811
    rounds = 400
    async with proxied(tmp_path, server.path, "threads") as (proxy, trace):

        async def session(k: int) -> None:
            client = await connect(tmp_path)
            srv = await server.accept()
            await ping_pong(client, srv, [plain(k * 1000 + i, 8 + k) for i in range(rounds)])
            client.close()

        async with trio.open_nursery() as nursery:
            for k in range(1, 4):
                nursery.start_soon(session, k)
                await trio.sleep(0.01)  # accepted in order: session k talks to server peer k
        await settle(proxy, 3)
    everything = [r for r in records(trace) if isinstance(r, (MessageRecord, EventRecord))]
    seqs = [r.seq for r in everything]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    for k in range(1, 4):
        mine = [r for r in everything if isinstance(r, MessageRecord) and r.session == k]
        assert len(mine) == 2 * rounds
    assert lane_counts[Direction.C2S] > rounds


async def _scripted(tmp_path, server) -> tuple[list[bytes], list[int], list[tuple]]:  # noqa: F811
    """A session that makes the lane hand back every kind of thing: fds, a
    header and a body that come in parts, VERSION, a header alone, a size
    that cannot be framed, a receiver that stops reading, EOF mid-message.
    Returns what the server and the client received, the fds each got, and
    the trace's messages (direction, bytes, fds, length, torn)."""
    blocked = [plain(100 + i, 60000) for i in range(40)]  # 2.4 MB: more than the socket takes
    async with proxied(tmp_path, server.path, "threads") as (proxy, trace):
        client = await connect(tmp_path)
        srv = await server.accept()
        await ping_pong(client, srv, [plain(1, 4), plain(2, 12)])
        await client.send(version(3))
        assert await srv.receive_message() == version(3)
        await srv.send(version_reply(3))
        assert await client.receive_message() == version_reply(3)
        fds = [make_eventfd(), make_eventfd()]
        try:
            await client.send(plain(4, 8, Command.DEVICE_SET_IRQS), fds)
        finally:
            close_all(fds)
        assert await srv.receive_message() == plain(4, 8, Command.DEVICE_SET_IRQS)
        await ping_pong(client, srv, [plain(5, 4)])
        split = plain(6, 64)
        await client.send(split[:16])  # the header, then the body later
        await trio.sleep(0.02)
        await client.send(split[16:])
        assert await srv.receive_message() == split
        half = plain(7, 4)
        await client.send(half[:5])  # the header in two parts
        await trio.sleep(0.02)
        await client.send(half[5:])
        assert await srv.receive_message() == half
        await ping_pong(client, srv, [plain(8, 0)])  # a header alone
        await client.send(HEADER_STRUCT.pack(9, Command.REGION_READ, 8, 0, 0))  # unframable
        assert await srv.receive(16) == HEADER_STRUCT.pack(9, Command.REGION_READ, 8, 0, 0)
        async with trio.open_nursery() as nursery:  # the server reads only once it was sent
            done = trio.Event()

            async def send_all() -> None:
                for message in blocked:
                    await client.send(message)
                done.set()

            nursery.start_soon(send_all)
            await trio.sleep(0.2)
            for message in blocked:
                assert await srv.receive_message() == message
            await done.wait()
        await ping_pong(client, srv, [plain(10, 4), region_read(11)])
        torn = plain(12, 100)
        await client.send(torn[:50])
        client.sock.shutdown(socket.SHUT_WR)
        assert await srv.read_to_eof() == torn[:50]
        srv.close()
        assert await client.read_to_eof() == b""
        client.close()
        await settle(proxy)
        fds_got = [srv.fds_received, client.fds_received]
    messages = [(r.direction, r.data, len(r.fds), r.length, r.torn) for r in records(trace)
                if isinstance(r, MessageRecord)]
    return blocked, fds_got, messages


async def test_what_the_lane_hands_back_comes_out_as_python_gives_it(
        tmp_path, server, lane_counts, monkeypatch):  # noqa: F811
    blocked, fds_lane, with_lane = await _scripted(tmp_path, server)
    assert sum(lane_counts.values()) > 0
    assert fds_lane == [2, 0]
    assert (Direction.C2S, plain(6, 64), 0, None, False) in with_lane
    assert with_lane[-1] == (Direction.C2S, plain(12, 100)[:50], 0, None, True)
    assert [m for d, m, *_ in with_lane if m in blocked] == blocked
    # the same script without the lane: the same trace
    monkeypatch.setattr(vfioproxy.proxy.fastpath, "lane", None)
    before = dict(lane_counts)
    python_dir = tmp_path / "python"
    python_dir.mkdir()
    server.close()
    from tests.test_proxy_hostile import ServerSide

    other = ServerSide(python_dir / "server.sock")
    await other.start()
    try:
        _, fds_python, without = await _scripted(python_dir, other)
    finally:
        other.close()
    assert lane_counts == before  # nothing went through the lane this time
    assert fds_python == fds_lane
    assert without == with_lane


@pytest.fixture(params=["C", "Python"])
def lane(request, monkeypatch):
    if request.param == "Python":
        monkeypatch.setattr(vfioproxy.proxy.fastpath, "lane", None)
    return request.param


async def test_fault_rules_take_their_direction_out_of_the_lane(tmp_path, server, lane,  # noqa: F811
                                                                 lane_counts):
    """A rule on c2s that looks at the header: c2s messages are decided in
    Python, s2c ones stay in the lane. Rules removed and added while the
    session runs apply from the next message, at the message index they name
    (the lane's messages count)."""
    injector = Injector(["c2s REGION_WRITE delay fixed(0us)"])
    async with proxied(tmp_path, server.path, "threads", injector=injector) as (proxy, trace):
        client = await connect(tmp_path)
        srv = await server.accept()
        await ping_pong(client, srv, [plain(i, 4) for i in range(1, 11)])
        await trio.sleep(0.2)  # the lane's counts come back once it is idle
        if lane == "C":
            assert lane_counts == {Direction.C2S: 0, Direction.S2C: 10}
        injector.remove(1)  # both directions in the lane
        await ping_pong(client, srv, [plain(i, 4) for i in range(11, 16)])
        await trio.sleep(0.2)
        if lane == "C":
            assert lane_counts == {Direction.C2S: 5, Direction.S2C: 15}
        # nothing is handed back now: the rule must reach the lane by itself
        injector.add("s2c * index=17..18 drop")
        for i in range(16, 21):
            message = plain(i, 4)
            await client.send(message)
            assert await srv.receive_message() == message
            await srv.send(reply_to(message))
            if i != 18:
                assert await client.receive_message() == reply_to(message)
        client.close()
        await settle(proxy)
    injected = [r for r in records(trace)
                if isinstance(r, EventRecord) and r.kind == "inject"]
    c2s_events = [e.data["index"] for e in injected if e.data["direction"] == "c2s"]
    assert c2s_events == list(range(10))  # decided in Python while the rule was there
    (drop,) = [e for e in injected if e.data["direction"] == "s2c"]
    assert drop.data["index"] == 17
    assert drop.data["applied"][0]["action"] == "drop"
    assert injector.statistics().messages == 40


async def test_a_message_the_lane_sent_is_not_sent_again(tmp_path, server, lane):  # noqa: F811
    """The lane hands back a message it sent but could not record (here: the
    trace's allocated room runs out every MiB); with fault rules on the other
    direction it is recorded, not decided and sent again."""
    injector = Injector(["c2s * delay fixed(0us)"])
    messages = [plain(i, 4) for i in range(1, 801)]
    async with proxied(tmp_path, server.path, "threads", injector=injector) as (proxy, trace):
        client = await connect(tmp_path)
        srv = await server.accept()
        for message in messages:
            await client.send(message)
            assert await srv.receive_message() == message
            await srv.send(plain(message[0] | message[1] << 8, 4000, flags=1))
            assert await client.receive_message() == plain(message[0] | message[1] << 8,
                                                           4000, flags=1)
        client.close()
        assert await srv.read_to_eof() == b""  # nothing more came
        srv.close()
        await settle(proxy)
    got = [r for r in records(trace) if isinstance(r, MessageRecord)]
    assert len(got) == 2 * len(messages)
    assert trace.stat().st_size > 3 << 20
    assert injector.statistics().messages == 2 * len(messages)


async def test_zero_delays_for_every_message_stay_in_the_lane(tmp_path, server, lane,  # noqa: F811
                                                               lane_counts):
    """``c2s * delay fixed(0us)`` changes nothing: its direction stays in the
    lane, which writes each message's inject event (the bytes msgpack makes,
    the indexes and counters the Python lane gives)."""
    injector = Injector(["c2s * delay fixed(0us)", "c2s * delay fixed(0ms)"])
    messages = [plain(i, 4) for i in range(1, 301)]
    async with proxied(tmp_path, server.path, "threads", injector=injector) as (proxy, trace):
        client = await connect(tmp_path)
        srv = await server.accept()
        await ping_pong(client, srv, messages)
        client.close()
        await settle(proxy)
    if lane == "C":
        assert lane_counts[Direction.C2S] > 250
    for obj, blob in raw_records(trace):
        assert msgpack.packb(obj, use_bin_type=True) == blob
    everything = records(trace)
    injected = [r for r in everything if isinstance(r, EventRecord) and r.kind == "inject"]
    assert [e.data["index"] for e in injected] == list(range(300))
    assert all(e.data["direction"] == "c2s" for e in injected)
    assert {len(e.data["applied"]) for e in injected} == {2}
    # each event right after its message, at the message's time
    by_seq = {r.seq: r for r in everything}
    for event in injected:
        message = by_seq[event.seq - 1]
        assert isinstance(message, MessageRecord) and message.t_ns == event.t_ns
        assert message.direction is Direction.C2S
    stats = injector.statistics()
    assert stats.messages == 600
    assert [(r.matched, r.applied) for r in stats.rules] == [(300, 300), (300, 300)]


def test_a_record_the_lane_cannot_write_whole_leaves_the_file_closed_or_cut(tmp_path):
    """A write that fails or falls short is cut off before anyone appends
    again; when even that fails (here: the "trace" is a full pipe) the lane
    closes the file, as the Python writer does, and hands the message back
    unrecorded. The message itself was forwarded."""
    from vfioproxy.proxy import _fastpath

    client, client_proxy = socket.socketpair()
    server_proxy, device = socket.socketpair()
    wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        with contextlib.suppress(BlockingIOError):
            while True:
                os.write(write_end, bytes(65536))
        for sock in (client_proxy, server_proxy):
            sock.setblocking(False)
        appender = _fastpath.Appender()
        appender.fd, appender.fast, appender.inline_max = write_end, 1, 4096
        appender.reserved_end = 1 << 40
        packer = msgpack.Packer(use_bin_type=True)
        parts = [PlainMessagePacker(packer, 1, d).parts() for d in (Direction.C2S,
                                                                     Direction.S2C)]
        message = plain(1, 8)
        client.sendall(message)
        result = _fastpath.relay(client_proxy.fileno(), server_proxy.fileno(), wake, 1 << 20,
                                 1 << 20, appender, parts[0], parts[1], None, None, 0, 0, 0,
                                 64, 10)
        assert result[0] == 2 and result[5] == 0  # the client's message, handed back
        assert result[1:5] == (0, 0, 0, 0)  # not counted as recorded
        assert result[6:] == (message, result[7], len(message), 0)  # sent whole
        assert device.recv(100) == message
        assert appender.fd == -1 and appender.fast == 0 and appender.seq == 0
        with pytest.raises(OSError):
            os.fstat(write_end)  # closed by the lane (nothing was opened since)
        write_end = -1
    finally:
        for fd in (read_end, write_end, wake):
            if fd >= 0:
                os.close(fd)
        for sock in (client, client_proxy, server_proxy, device):
            sock.close()
