"""The proxy's interposition: what a mode makes of a message reaches the
receiver (bytes and fds: forwarded, withheld, interposed), each fd the proxy
received is forwarded or closed exactly once (fds counted in /proc/self/fd),
and the trace holds what the receiver got with an ``interpose`` event saying
what arrived. Real sockets, both forwarders (threads with the C lane, trio)."""

from __future__ import annotations

import os
import socket
from typing import ClassVar

import pytest
import trio

from recorder.reader import TraceReader
from recorder.records import EventRecord, MessageRecord
from recorder.sink import TraceSink
from tests.conftest import FD_HYGIENE
from tests.test_proxy_inject import encode
from vfioproxy.errors import ConnectionClosedError
from vfioproxy.interpose import (
    FORWARD,
    FdFate,
    FdPlan,
    Interposed,
    InterposeOptions,
    SessionInterposer,
)
from vfioproxy.io.fds import close_all, inspect_fd, make_memfd
from vfioproxy.io.transport import FdStream, open_unix_fd_stream
from vfioproxy.io.unix import open_unix_listener
from vfioproxy.protocol.bodies import (
    DmaMapBody,
    RegionAccessBody,
    RegionInfoBody,
    SparseMmapArea,
    SparseMmapCap,
    TypeCap,
)
from vfioproxy.protocol.codec import build_command, build_reply, decode
from vfioproxy.protocol.constants import RegionFlags
from vfioproxy.protocol.header import Command, Header
from vfioproxy.proxy import ProxyOptions, open_proxy
from vfioproxy.proxy import core as proxy_core
from vfioproxy.proxy.relay import ALL_COMMANDS, command_mask
from vfioproxy.side import Direction
from vfioproxy.trace.decoded import DecodedMessage, decoded_records
from vfioproxy.trace.filter import compile_filter, facts_of
from vfioproxy.trace.show import text_lines

pytestmark = FD_HYGIENE

RW = RegionFlags.READ | RegionFlags.WRITE
BAR_SIZE = 0x4000
SPARSE = SparseMmapCap((SparseMmapArea(0, 0x1000), SparseMmapArea(0x3000, 0x1000)))


class RegionServer:
    """A device server whose region 1 is mmap'able (sparse-mmap and type caps,
    a memfd with each full reply; a short reply when the client's argsz is too
    small); it answers REGION_READ with 0xab bytes and notes every command and
    the fds that came with it."""

    def __init__(self, path):
        self.path = path
        self.received = []  # (Header, fd count)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED):
        listener = await open_unix_listener(self.path)
        async with listener, trio.open_nursery() as nursery:
            task_status.started()
            while True:
                stream = FdStream((await listener.accept()).socket)
                nursery.start_soon(self._run, stream)

    async def _run(self, stream):
        async with stream:
            while True:
                try:
                    data, fds = await stream.receive_message()
                except ConnectionClosedError:
                    return
                header = Header.parse(data)
                self.received.append((header, len(fds)))
                close_all(fds)
                if header.is_reply or header.no_reply:
                    continue
                message = decode(data)
                body = message.body
                fds = []
                if header.command == Command.DEVICE_GET_REGION_INFO:
                    reply_body = RegionInfoBody.build(
                        index=body.index, flags=RW | RegionFlags.MMAP, size=BAR_SIZE,
                        offset=0, caps=(SPARSE, TypeCap(1, 2)), argsz=body.argsz)
                    if reply_body.extra:  # a full reply: the region's fd
                        fds = [make_memfd("bar", BAR_SIZE)]
                    reply = build_reply(message, reply_body)
                elif header.command == Command.REGION_READ:
                    reply = build_reply(message, RegionAccessBody(
                        body.offset, body.region, body.count, b"\xab" * body.count))
                else:
                    reply = build_reply(message)
                try:
                    await stream.send_message(encode(reply), fds)
                except (ConnectionClosedError, trio.ClosedResourceError):
                    return
                finally:
                    close_all(fds)


@pytest.fixture
async def region_server(nursery, tmp_path):
    server = RegionServer(tmp_path / "server.sock")
    await nursery.start(server.serve)
    return server


def records(path):
    with TraceReader(path) as reader:
        return list(reader)


async def ask(client, msg_id, command, body):
    await client.send_message(encode(build_command(command, msg_id, body)))
    with trio.fail_after(5):
        return await client.receive_message()


@pytest.mark.parametrize("threads", [True, False], ids=["threads", "trio"])
async def test_trap_mmap_region_info_maps_nothing(region_server, tmp_path, threads):
    trace = tmp_path / "t.trace"
    sink = TraceSink(trace)
    options = ProxyOptions(threads=threads, interpose=InterposeOptions(trap_mmap=True))
    async with open_proxy(tmp_path / "p.sock", region_server.path, sink=sink, options=options):
        client = await open_unix_fd_stream(tmp_path / "p.sock")
        async with client:
            # plain messages first: the C lane runs, and must hand the reply back
            for i in range(20):
                data, fds = await ask(client, i, Command.REGION_READ,
                                      RegionAccessBody(0, 1, 4))
                assert not fds and decode(data).body.data == b"\xab" * 4
            short, short_fds = await ask(client, 100, Command.DEVICE_GET_REGION_INFO,
                                         RegionInfoBody.request(1, 32))
            full, full_fds = await ask(client, 101, Command.DEVICE_GET_REGION_INFO,
                                       RegionInfoBody.request(1, 200))
    sink.close()
    assert short_fds == [] and full_fds == []
    got_short = decode(short).body
    assert not got_short.flags & RegionFlags.MMAP  # argsz kept: the client asks again
    assert got_short.argsz == RegionInfoBody.build(
        index=1, flags=0, size=0, caps=(SPARSE, TypeCap(1, 2))).argsz
    got = decode(full).body
    assert got.flags == RW | RegionFlags.CAPS
    assert got.caps == (TypeCap(1, 2),)
    assert got.argsz == 32 + 16 == len(full) - 16 and got.cap_offset == 32
    assert got.argsz <= got_short.argsz  # never bigger than what the client sent: no loop

    recs = records(trace)
    opened = [r for r in recs if isinstance(r, EventRecord) and r.kind == "session_open"]
    assert opened[0].data["interpose"] == {"trap-mmap": True}
    events = [r for r in recs if isinstance(r, EventRecord) and r.kind == "interpose"]
    assert len(events) == 2
    full_event = events[1]
    assert full_event.data["mode"] == "trap-mmap"
    assert full_event.data["direction"] == "s2c"
    assert full_event.data["note"]["region"] == 1
    assert full_event.data["note"]["dropped"] == [SPARSE.describe()]
    (withheld,) = full_event.data["withheld"]
    assert withheld["k"] == "memfd" and withheld["z"] == BAR_SIZE
    # the record holds what the client got; the reader gives back what arrived
    decoded = [i for i in decoded_records(recs) if isinstance(i, DecodedMessage)]
    replies = [d for d in decoded if d.interposition is not None]
    assert [d.record.data for d in replies] == [short, full]
    assert replies[1].record.fds == ()
    original = decode(replies[1].arrived).body
    assert original.flags & RegionFlags.MMAP and original.caps == (SPARSE, TypeCap(1, 2))
    assert all(d.arrived is None for d in decoded if d.interposition is None)
    wanted = compile_filter("interpose and dir == s2c")
    assert [d.record.seq for d in decoded if wanted.test(facts_of(d))] == [
        d.record.seq for d in replies]
    shown = "\n".join(text_lines(decoded_records(recs)))
    assert "interposed by the proxy (trap-mmap)" in shown
    assert "withheld fd[0] memfd" in shown


async def test_without_trap_mmap_the_reply_passes_unchanged(region_server, tmp_path):
    async with open_proxy(tmp_path / "p.sock", region_server.path):
        client = await open_unix_fd_stream(tmp_path / "p.sock")
        async with client:
            data, fds = await ask(client, 1, Command.DEVICE_GET_REGION_INFO,
                                  RegionInfoBody.request(1, 200))
            with fds[0]:
                assert len(fds) == 1 and inspect_fd(fds[0]).size == BAR_SIZE
    body = decode(data).body
    assert body.flags & RegionFlags.MMAP and SPARSE in body.caps


class ThreeFates:
    """A mode for the test: a DMA_MAP with three fds gets them forwarded,
    withheld and interposed (IRQ 4, vector 2), a byte of it rewritten."""

    name: ClassVar[str] = "three-fates"
    directions: ClassVar[frozenset[Direction]] = frozenset({Direction.C2S})

    def message(self, direction, data, nfds):
        if Header.parse(data).command != Command.DMA_MAP:
            return None
        return Interposed(data[:-1] + b"\x7f",
                          (FORWARD, FdPlan(FdFate.WITHHOLD), FdPlan(FdFate.INTERPOSE, (4, 2))),
                          self.name, {"what": "test"}, release=((4, 1),))


class KeptFds:
    """Substitutes for the test: a memfd of 123 bytes stands for each fd kept."""

    def __init__(self):
        self.kept = []
        self.released = []
        self.closed = 0

    def interpose(self, fd, plan):
        self.kept.append((fd, plan))
        return make_memfd("substitute", 123)

    def release(self, irqs):
        self.released.extend(irqs)

    def close(self):
        self.closed += 1
        close_all([fd for fd, _ in self.kept])


@pytest.mark.parametrize("threads", [True, False], ids=["threads", "trio"])
async def test_forward_withhold_interpose_fds(region_server, tmp_path, monkeypatch, threads):
    trace = tmp_path / "t.trace"
    sink = TraceSink(trace)
    monkeypatch.setattr(proxy_core, "session_interposer",
                        lambda options: SessionInterposer([ThreeFates()]))
    kept = []

    def substitutes(ledger):
        kept.append(KeptFds())
        return kept[-1]

    async with open_proxy(tmp_path / "p.sock", region_server.path, sink=sink,
                          options=ProxyOptions(threads=threads), substitutes=substitutes):
        client = await open_unix_fd_stream(tmp_path / "p.sock")
        async with client:
            fds = [make_memfd(f"m{size}", size) for size in (4096, 8192, 16384)]
            try:
                message = build_command(Command.DMA_MAP, 1, DmaMapBody(32, 3, 0, 0, 4096),
                                        fds=fds[:1])
                await client.send_message(encode(message), fds)
            finally:
                close_all(fds)
            with trio.fail_after(5):
                await client.receive_message()
    sink.close()
    (keeper,) = kept
    assert keeper.closed == 1 and keeper.released == [(4, 1)]
    ((fd, plan),) = keeper.kept
    assert plan.irq == (4, 2)
    with pytest.raises(ValueError):
        fd.fileno()  # closed with the session
    (dma_header, nfds) = region_server.received[0]
    assert dma_header.command == Command.DMA_MAP and nfds == 2
    recs = records(trace)
    (dma,) = [r for r in recs if isinstance(r, MessageRecord) and r.direction is Direction.C2S]
    assert dma.data.endswith(b"\x7f")
    assert [(fd.position, fd.size) for fd in dma.fds] == [(0, 4096), (1, 123)]
    (event,) = [r for r in recs if isinstance(r, EventRecord) and r.kind == "interpose"]
    assert event.seq == dma.seq + 1
    assert [(e["i"], e["z"]) for e in event.data["withheld"]] == [(1, 8192)]
    assert [(e["i"], e["z"], e["irq"]) for e in event.data["interposed"]] == [(2, 16384, [4, 2])]
    assert event.data["released"] == [[4, 1]]
    (decoded,) = [i for i in decoded_records(recs)
                  if isinstance(i, DecodedMessage) and i.interposition is not None]
    assert decoded.arrived == encode(build_command(Command.DMA_MAP, 1,
                                                   DmaMapBody(32, 3, 0, 0, 4096), fds=fds[:1]))


async def test_a_plan_that_does_not_fit_the_fds_changes_nothing(region_server, tmp_path,
                                                                monkeypatch):
    monkeypatch.setattr(proxy_core, "session_interposer",
                        lambda options: SessionInterposer([ThreeFates()]))
    async with open_proxy(tmp_path / "p.sock", region_server.path):
        client = await open_unix_fd_stream(tmp_path / "p.sock")
        async with client:
            with make_memfd("one", 4096) as fd:
                message = build_command(Command.DMA_MAP, 1, DmaMapBody(32, 3, 0, 0, 4096),
                                        fds=[fd])
                await client.send_message(encode(message), [fd])
            with trio.fail_after(5):
                await client.receive_message()
    assert region_server.received[0][1] == 1



def test_the_c_lane_hands_back_only_the_commands_a_mode_acts_on():
    """With trap-mmap on, the server's REGION_READ replies stay in the C lane;
    only DEVICE_GET_REGION_INFO (and VERSION, as always) come back."""
    _fastpath = pytest.importorskip("vfioproxy.proxy._fastpath")
    mask = command_mask(frozenset({Command.DEVICE_GET_REGION_INFO}))
    assert mask == 1 << 5 and command_mask(None) == ALL_COMMANDS
    assert command_mask(frozenset({70})) == 1 << 63
    client, client_proxy = socket.socketpair()
    server_proxy, device = socket.socketpair()
    wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        for sock in (client_proxy, server_proxy):
            sock.setblocking(False)
        read_reply = encode(build_reply(build_command(Command.REGION_READ, 1,
                                                      RegionAccessBody(0, 1, 4)),
                                        RegionAccessBody(0, 1, 4, b"\xab" * 4)))
        info_reply = encode(build_reply(
            build_command(Command.DEVICE_GET_REGION_INFO, 2, RegionInfoBody.request(1)),
            RegionInfoBody.build(index=1, flags=RW | RegionFlags.MMAP, size=BAR_SIZE)))
        device.sendall(read_reply + info_reply)
        result = _fastpath.relay(client_proxy.fileno(), server_proxy.fileno(), wake, 1 << 20,
                                 1 << 20, None, None, None, None, None, 0, 0, 2, 64, 10,
                                 ALL_COMMANDS, mask)
        assert result[0] == 1 and result[5] == 1  # the server's REGION_INFO header, back
        assert result[3:5] == (1, len(read_reply))  # the REGION_READ reply went in C
        assert client.recv(100) == read_reply
        assert result[6] == info_reply[:16]
    finally:
        os.close(wake)
        for sock in (client, client_proxy, server_proxy, device):
            sock.close()
