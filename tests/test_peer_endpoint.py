import errno

import pytest
import trio
import trio.testing

from tests.conftest import FD_HYGIENE
from vfioproxy.errors import ConnectionClosedError
from vfioproxy.io.fds import close_all, make_memfd
from vfioproxy.io.transport import fd_stream_pair
from vfioproxy.peers.endpoint import Endpoint, ErrorReplyError, MessageIds, ReplyTimeoutError
from vfioproxy.protocol.bodies import DmaAccessBody, DmaMapBody, RegionAccessBody
from vfioproxy.protocol.codec import build_command, build_error_reply, build_reply, decode, encode
from vfioproxy.protocol.header import Command
from vfioproxy.side import Side

pytestmark = FD_HYGIENE


async def echo_handler(message):
    body = message.body
    close_all(message.fds)
    if message.command == Command.REGION_READ:
        if body.region == 9:
            return build_error_reply(message, errno.EINVAL)
        return build_reply(message, RegionAccessBody(body.offset, body.region, body.count,
                                                     bytes(range(body.count))))
    return build_reply(message)


@pytest.fixture
async def pair(nursery):
    a, b = fd_stream_pair()
    client = Endpoint(a, Side.CLIENT)
    server = Endpoint(b, Side.SERVER, handler=echo_handler)
    await nursery.start(client.run)
    await nursery.start(server.run)
    yield client, server
    await a.aclose()
    await b.aclose()


async def test_request_returns_the_decoded_reply(pair):
    client, _ = pair
    reply = await client.request(Command.REGION_READ, RegionAccessBody(0x10, 7, 4))
    assert reply.body == RegionAccessBody(0x10, 7, 4, b"\0\1\2\3")
    assert client.sent["REGION_READ cmd"] == 1 and client.received["REGION_READ reply"] == 1


async def test_ids_count_up_from_zero_and_wrap_at_16_bits(pair):
    client, _ = pair
    client.next_id = 0xFFFF
    first = await client.send_command(Command.DEVICE_RESET)
    second = await client.send_command(Command.DEVICE_RESET)
    assert (first.request.msg_id, second.request.msg_id) == (0xFFFF, 0)
    await first.wait()
    await second.wait()


async def test_endpoints_sharing_message_ids_number_from_one_counter_with_gaps(nursery):
    ids = MessageIds(0xFFFE)
    ends = [fd_stream_pair() for _ in range(2)]
    clients = [Endpoint(a, Side.CLIENT, ids=ids) for a, _ in ends]
    for client, (_, b) in zip(clients, ends, strict=True):
        await nursery.start(client.run)
        await nursery.start(Endpoint(b, Side.SERVER, handler=echo_handler).run)
    sent = [await clients[i].send_command(Command.DEVICE_RESET) for i in (0, 1, 1, 0)]
    assert [p.request.msg_id for p in sent] == [0xFFFE, 0xFFFF, 0, 1]
    for pending in sent:
        await pending.wait()
    assert clients[0].next_id == clients[1].next_id == 2
    for a, b in ends:
        await a.aclose()
        await b.aclose()


async def test_an_error_reply_raises_with_its_errno(pair):
    client, _ = pair
    with pytest.raises(ErrorReplyError) as info:
        await client.request(Command.REGION_READ, RegionAccessBody(0, 9, 4))
    assert info.value.errno == errno.EINVAL


async def test_pipelined_commands_get_their_own_replies(pair):
    client, server = pair
    waits = [
        await client.send_command(Command.DMA_MAP, DmaMapBody(32, 3, 0, i << 12, 4096))
        for i in range(5)
    ]
    replies = [await w.wait() for w in waits]
    assert [r.msg_id for r in replies] == [w.request.msg_id for w in waits]
    assert server.received["DMA_MAP cmd"] == 5


async def test_fds_travel_with_commands(pair):
    client, _ = pair
    with make_memfd("ram", 4096) as ram:
        await client.request(Command.DMA_MAP, DmaMapBody(32, 3, 0, 0, 4096), fds=[ram])


async def test_a_handler_may_send_its_own_command_and_wait_for_the_reply():
    a, b = fd_stream_pair()
    server: Endpoint

    async def client_handler(message):
        return build_reply(message, DmaAccessBody(message.body.address, message.body.count))

    async def server_handler(message):
        # a device doing DMA while it serves a register write
        await server.request(Command.DMA_WRITE, DmaAccessBody(0x1000, 4, b"abcd"))
        return build_reply(message, RegionAccessBody(0, 0, 4))

    client = Endpoint(a, Side.CLIENT, handler=client_handler)
    server = Endpoint(b, Side.SERVER, handler=server_handler)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        await nursery.start(server.run)
        with trio.fail_after(5):
            await client.request(Command.REGION_WRITE, RegionAccessBody(0, 0, 4, b"ring"))
        assert client.received["DMA_WRITE cmd"] == 1
        await a.aclose()
        await b.aclose()


async def test_a_missing_reply_times_out_and_a_late_reply_is_dropped(mock_clock):
    mock_clock.autojump_threshold = 0
    a, b = fd_stream_pair()
    client = Endpoint(a, Side.CLIENT, reply_timeout=5.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        start = trio.current_time()
        with pytest.raises(ReplyTimeoutError, match=r"within 5\.0 s"):
            await client.request(Command.DEVICE_RESET)
        assert trio.current_time() - start == pytest.approx(5.0)
        # the server finally answers: nobody waits any more
        data, _ = await b.receive_message()
        await b.send_message(encode(build_reply(decode(data)))[0])
        await trio.testing.wait_all_tasks_blocked()
        assert client.unexpected_replies == 1
        await a.aclose()
        await b.aclose()


async def test_waiting_commands_fail_when_the_peer_goes_away():
    a, b = fd_stream_pair()
    client = Endpoint(a, Side.CLIENT)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        pending = await client.send_command(Command.DEVICE_RESET)
        await b.aclose()
        with pytest.raises(ConnectionClosedError):
            await pending.wait()
        await a.aclose()


async def test_a_command_sent_after_the_peer_left_fails_at_once(mock_clock):
    mock_clock.autojump_threshold = 0
    a, b = fd_stream_pair()
    client = Endpoint(a, Side.CLIENT, reply_timeout=5.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        b.send_eof()  # the peer (a proxy refusing the client) stops sending, still reads
        while client.closed is None:
            await trio.sleep(0.001)
        start = trio.current_time()
        with pytest.raises(ConnectionClosedError):
            await client.request(Command.VERSION)  # not a 5 s timeout
        assert trio.current_time() == start
        await a.aclose()
        await b.aclose()


async def test_fds_of_commands_nobody_handles_are_closed():
    a, b = fd_stream_pair()
    server = Endpoint(b, Side.SERVER)  # no handler
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        with make_memfd("ram", 4096) as ram:
            data, _ = encode(build_command(Command.DMA_MAP, 1, DmaMapBody(32, 3, 0, 0, 4096)))
            await a.send_message(data, [ram])
        await a.aclose()
    await b.aclose()
    assert server.received["DMA_MAP cmd"] == 1
