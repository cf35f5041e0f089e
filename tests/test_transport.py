"""FdStream over real socketpairs, with real memfds and eventfds."""

from __future__ import annotations

import array
import fcntl
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.conftest import FD_HYGIENE
from vfioproxy.errors import ConnectionClosedError, FdsTruncatedError, TransportError
from vfioproxy.io.fds import (
    FdKind,
    OwnedFd,
    close_all,
    count_open_fds,
    inspect_fd,
    make_eventfd,
    make_memfd,
    read_fd_contents,
)
from vfioproxy.io.transport import FdStream, fd_stream_pair, open_unix_fd_stream
from vfioproxy.protocol.header import HEADER_SIZE, Header

pytestmark = FD_HYGIENE


@pytest.fixture
async def pair() -> AsyncIterator[tuple[FdStream, FdStream]]:
    a, b = fd_stream_pair()
    async with a, b:
        yield a, b


def message(body: bytes = b"", *, msg_id: int = 1, command: int = 9) -> bytes:
    return Header(msg_id, command, HEADER_SIZE + len(body)).pack() + body


def header_announcing(size: int, *, msg_id: int = 1) -> bytes:
    return Header(msg_id, 9, size).pack()


async def raw_send(stream: FdStream, data: bytes, fds: list[int] | None = None) -> None:
    """Send bytes with plain socket calls, bypassing FdStream's framing."""
    ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sent = await stream.socket.sendmsg([data], ancdata)
    assert sent == len(data)


async def fill_send_buffer(stream: FdStream) -> int:
    """Write filler bytes until the kernel would block; returns how many."""
    filled = 0
    while True:
        with trio.move_on_after(1) as scope:
            filled += await stream.socket.send(b"\0" * 4096)
        if scope.cancelled_caught:
            return filled


# -- messages and their fds -------------------------------------------------


async def test_a_message_without_fds_round_trips(pair: tuple[FdStream, FdStream]) -> None:
    a, b = pair
    sent = message(b"payload bytes")
    await a.send_message(sent)
    assert await b.receive_message() == (sent, [])


async def test_send_message_accepts_bytearray_and_memoryview(
    pair: tuple[FdStream, FdStream],
) -> None:
    a, b = pair
    sent = message(b"\x01\x02\x03\x04")
    await a.send_message(bytearray(sent))
    await a.send_message(memoryview(sent))
    assert (await b.receive_message())[0] == sent
    assert (await b.receive_message())[0] == sent


async def test_memfd_contents_are_readable_through_the_received_fd(
    pair: tuple[FdStream, FdStream],
) -> None:
    a, b = pair
    with make_memfd("guest-ram", 4096, b"guest memory") as memfd:
        await a.send_message(message(bytes(32)), [memfd])
        _, [received] = await b.receive_message()
        with received:
            assert received.fileno() != memfd.fileno()
            assert read_fd_contents(received, limit=4096) == b"guest memory" + bytes(4084)
            os.pwrite(received.fileno(), b"written by the receiver", 100)
            assert os.pread(memfd.fileno(), 23, 100) == b"written by the receiver"


async def test_an_eventfd_signalled_through_the_received_fd_is_seen_on_the_original(
    pair: tuple[FdStream, FdStream],
) -> None:
    a, b = pair
    with make_eventfd() as irq:
        await a.send_message(message(bytes(20)), [irq.fileno()])
        _, [received] = await b.receive_message()
        with received:
            os.eventfd_write(received.fileno(), 7)
        assert os.eventfd_read(irq.fileno()) == 7


async def test_one_message_carries_several_fds_in_order(
    pair: tuple[FdStream, FdStream],
) -> None:
    a, b = pair
    s1, s2 = socket.socketpair()
    with make_memfd("ram", 8192) as memfd, make_eventfd() as efd, s1, s2:
        await a.send_message(message(bytes(8)), [memfd, efd, s1.fileno()])
        _, fds = await b.receive_message()
        try:
            assert [inspect_fd(fd).kind for fd in fds] == [
                FdKind.MEMFD,
                FdKind.EVENTFD,
                FdKind.SOCKET,
            ]
            assert [inspect_fd(fd).inode for fd in fds] == [
                inspect_fd(memfd).inode,
                inspect_fd(efd).inode,
                inspect_fd(s1.fileno()).inode,
            ]
        finally:
            close_all(fds)


async def test_fds_bind_to_the_message_whose_header_they_came_with(
    pair: tuple[FdStream, FdStream],
) -> None:
    a, b = pair
    first, second = message(bytes(16), msg_id=1), message(bytes(24), msg_id=2)
    with make_eventfd() as efd:
        await a.send_message(first)
        await a.send_message(second, [efd])
        assert await b.receive_message() == (first, [])
        data, fds = await b.receive_message()
        assert data == second
        assert [inspect_fd(fd).inode for fd in fds] == [inspect_fd(efd).inode]
        close_all(fds)


async def test_back_to_back_messages_each_keep_their_own_fds(
    pair: tuple[FdStream, FdStream],
) -> None:
    a, b = pair
    with make_eventfd() as x, make_memfd("y") as y:
        await a.send_message(message(b"first"), [x])
        await a.send_message(message(b"second"), [y])
        _, fds_1 = await b.receive_message()
        _, fds_2 = await b.receive_message()
        assert [inspect_fd(fd).inode for fd in fds_1] == [inspect_fd(x).inode]
        assert [inspect_fd(fd).inode for fd in fds_2] == [inspect_fd(y).inode]
        close_all(fds_1 + fds_2)


async def test_the_sender_keeps_its_fds_open_after_sending(
    pair: tuple[FdStream, FdStream],
) -> None:
    a, b = pair
    with make_eventfd() as efd:
        await a.send_message(message(), [efd])
        assert not efd.closed
        os.fstat(efd.fileno())
        _, fds = await b.receive_message()
        close_all(fds)


async def test_received_fds_are_close_on_exec(pair: tuple[FdStream, FdStream]) -> None:
    a, b = pair
    efd = OwnedFd(os.eventfd(0))  # inheritable on purpose
    with efd:
        os.set_inheritable(efd.fileno(), True)
        await a.send_message(message(), [efd])
        _, [received] = await b.receive_message()
        with received:
            assert fcntl.fcntl(received.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC


async def test_fds_sent_with_a_later_part_of_a_message_are_dropped_by_the_kernel(
    pair: tuple[FdStream, FdStream],
) -> None:
    a, b = pair
    with make_eventfd() as efd:
        await raw_send(a, header_announcing(HEADER_SIZE + 4))
        await raw_send(a, b"body", [efd.fileno()])
        before = count_open_fds()
        assert await b.receive_message() == (header_announcing(HEADER_SIZE + 4) + b"body", [])
        assert count_open_fds() == before


async def test_send_message_refuses_fds_without_data(pair: tuple[FdStream, FdStream]) -> None:
    a, _ = pair
    with make_eventfd() as efd, pytest.raises(ValueError, match="at least one byte"):
        await a.send_message(b"", [efd])


async def test_more_fds_than_max_fds_raise_fds_truncated_and_leak_nothing() -> None:
    a, b = fd_stream_pair(max_fds=1)
    async with a, b:
        fds = [make_eventfd() for _ in range(3)]
        try:
            await a.send_message(message(b"irqs"), fds)
            before = count_open_fds()
            with pytest.raises(FdsTruncatedError, match="max_fds=1") as caught:
                await b.receive_message()
            del caught
            assert count_open_fds() == before
            with pytest.raises(TransportError, match="stream broken"):
                await b.receive_message()
        finally:
            close_all(fds)


async def test_max_fds_is_exact_even_when_odd() -> None:
    # CMSG_SPACE(4) has room for two fds; the receiver must still refuse two
    a, b = fd_stream_pair(max_fds=1)
    async with a, b:
        with make_eventfd() as x, make_eventfd() as y:
            await a.send_message(message(), [x])
            _, fds = await b.receive_message()
            assert len(fds) == 1
            close_all(fds)
            await a.send_message(message(), [x, y])
            with pytest.raises(FdsTruncatedError):
                await b.receive_message()


async def test_a_receiver_with_max_fds_zero_refuses_any_fd() -> None:
    a, b = fd_stream_pair(max_fds=0)
    async with a, b:
        with make_eventfd() as efd:
            await a.send_message(message(), [efd])
            with pytest.raises(FdsTruncatedError):
                await b.receive_message()


# -- framing ----------------------------------------------------------------


async def test_several_buffered_messages_are_framed_one_by_one(
    pair: tuple[FdStream, FdStream],
) -> None:
    a, b = pair
    sent = [message(bytes([i]) * i, msg_id=i) for i in range(10)]
    await raw_send(a, b"".join(sent))
    for expected in sent:
        assert await b.receive_message() == (expected, [])


async def test_a_body_split_across_many_small_sends_arrives_whole(
    pair: tuple[FdStream, FdStream],
) -> None:
    a, b = pair
    sent = message(os.urandom(500))
    received: list[tuple[bytes, list[OwnedFd]]] = []

    async def receiver() -> None:
        received.append(await b.receive_message())

    with make_memfd("ram", 4096) as memfd:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            await raw_send(a, sent[:HEADER_SIZE], [memfd.fileno()])
            for offset in range(HEADER_SIZE, len(sent), 7):
                await trio.testing.wait_all_tasks_blocked()
                await raw_send(a, sent[offset : offset + 7])
        [(data, fds)] = received
        assert data == sent
        assert [inspect_fd(fd).inode for fd in fds] == [inspect_fd(memfd).inode]
        close_all(fds)


async def test_a_header_split_in_two_sends_is_reassembled_with_its_fds(
    pair: tuple[FdStream, FdStream],
) -> None:
    a, b = pair
    sent = message(b"body")
    received: list[tuple[bytes, list[OwnedFd]]] = []

    async def receiver() -> None:
        received.append(await b.receive_message())

    with make_eventfd() as efd:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            await raw_send(a, sent[:5], [efd.fileno()])
            await trio.testing.wait_all_tasks_blocked()
            await raw_send(a, sent[5:])
        [(data, fds)] = received
        assert data == sent
        assert len(fds) == 1
        close_all(fds)


async def test_a_300_kib_message_larger_than_the_socket_buffer_arrives_whole(
    pair: tuple[FdStream, FdStream],
) -> None:
    a, b = pair
    assert a.socket.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < 300 * 1024
    sent = message(os.urandom(300 * 1024))
    received: list[tuple[bytes, list[OwnedFd]]] = []

    async def receiver() -> None:
        received.append(await b.receive_message())

    with make_eventfd() as efd:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            await a.send_message(sent, [efd])
        [(data, fds)] = received
        assert data == sent
        assert len(fds) == 1
        close_all(fds)


@pytest.mark.parametrize("size", [0, 8, 15, 64 + 1, 0xFFFFFFFF])
async def test_a_size_that_cannot_be_framed_returns_the_header_alone(
    pair: tuple[FdStream, FdStream], size: int
) -> None:
    a, b = pair
    following = message(b"next message", msg_id=2)
    await a.send_message(header_announcing(size) + following)
    assert await b.receive_message(max_size=64) == (header_announcing(size), [])
    assert await b.receive_message(max_size=64) == (following, [])


async def test_a_message_of_exactly_max_size_is_framed(pair: tuple[FdStream, FdStream]) -> None:
    a, b = pair
    sent = message(bytes(48))
    await a.send_message(sent)
    assert await b.receive_message(max_size=64) == (sent, [])


async def test_receive_header_then_receive_exactly_reads_one_message(
    pair: tuple[FdStream, FdStream],
) -> None:
    a, b = pair
    with make_eventfd() as efd:
        await a.send_message(message(b"0123456789"), [efd])
        header, fds = await b.receive_header()
        assert Header.parse(header).size == HEADER_SIZE + 10
        assert len(fds) == 1
        close_all(fds)
        assert await b.receive_exactly(10) == b"0123456789"
        assert await b.receive_exactly(0) == b""


# -- end of stream ----------------------------------------------------------


async def test_eof_at_a_message_boundary_is_a_clean_close(
    pair: tuple[FdStream, FdStream],
) -> None:
    a, b = pair
    await a.send_message(message(b"last"))
    a.send_eof()
    await b.receive_message()
    for _ in range(2):  # still framed: asking again gives the same answer
        with pytest.raises(ConnectionClosedError) as caught:
            await b.receive_message()
        assert caught.value.mid_message is False
        assert caught.value.received == 0


async def test_eof_mid_header_reports_the_bytes_received(
    pair: tuple[FdStream, FdStream],
) -> None:
    a, b = pair
    await raw_send(a, message()[:7])
    a.send_eof()
    with pytest.raises(ConnectionClosedError, match="7 of 16 header bytes") as caught:
        await b.receive_message()
    assert (caught.value.mid_message, caught.value.received) == (True, 7)
    with pytest.raises(TransportError, match="stream broken"):
        await b.receive_message()


def reset_after(sent: bytes) -> socket.socket:
    """Our end of a connection whose peer sent ``sent`` and then closed with
    unread data in its queue, so that our next read fails with ECONNRESET."""
    peer, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    peer.sendall(sent)
    ours.sendall(b"never read")
    peer.close()
    return ours


@pytest.mark.parametrize(("sent", "text"), [
    (message()[:10], "reset the connection after 10 of 16 header bytes"),
    (message(b"body" * 8)[:20], "reset the connection after 20 of 48 message bytes"),
])
async def test_a_reset_mid_message_keeps_the_bytes_received(sent: bytes, text: str) -> None:
    stream = FdStream(trio.socket.from_stdlib_socket(reset_after(sent)))
    try:
        with pytest.raises(ConnectionClosedError, match=text) as caught:
            await stream.receive_message()
    finally:
        await stream.aclose()
    assert caught.value.mid_message and caught.value.received == len(sent)
    assert caught.value.partial == sent


async def test_eof_mid_body_reports_the_bytes_received(pair: tuple[FdStream, FdStream]) -> None:
    a, b = pair
    with make_eventfd() as efd:
        await raw_send(a, message(bytes(100))[:36], [efd.fileno()])
    a.send_eof()
    before = count_open_fds()
    with pytest.raises(ConnectionClosedError, match="36 of 116 message bytes") as caught:
        await b.receive_message()
    assert (caught.value.mid_message, caught.value.received) == (True, 36)
    assert count_open_fds() == before, "the fd that came with the lost message must be closed"


async def test_eof_in_receive_exactly_counts_the_bytes_of_that_call(
    pair: tuple[FdStream, FdStream],
) -> None:
    a, b = pair
    await raw_send(a, b"abc")
    a.send_eof()
    with pytest.raises(ConnectionClosedError) as caught:
        await b.receive_exactly(10)
    assert (caught.value.mid_message, caught.value.received) == (True, 3)


async def test_a_peer_that_closes_with_our_message_unread_is_a_clean_close(
    pair: tuple[FdStream, FdStream],
) -> None:
    a, b = pair
    await a.send_message(message())
    await b.aclose()  # with a's message unread: the kernel reports ECONNRESET to a
    with pytest.raises(ConnectionClosedError) as caught:
        await a.receive_message()
    assert caught.value.mid_message is False


async def test_sending_to_a_closed_peer_raises_connection_closed(
    pair: tuple[FdStream, FdStream],
) -> None:
    a, b = pair
    await b.aclose()
    with pytest.raises(ConnectionClosedError, match="sent 0 of 16") as caught:
        await a.send_message(message())
    assert caught.value.mid_message is False


# -- cancellation -----------------------------------------------------------


async def test_a_receive_cancelled_before_any_byte_leaves_the_stream_intact(
    pair: tuple[FdStream, FdStream], autojump_clock: trio.testing.MockClock
) -> None:
    a, b = pair
    with trio.move_on_after(1) as scope:
        await b.receive_message()
    assert scope.cancelled_caught
    await a.send_message(message(b"after"))
    assert await b.receive_message() == (message(b"after"), [])


async def test_a_receive_cancelled_mid_header_marks_the_stream_broken(
    pair: tuple[FdStream, FdStream], autojump_clock: trio.testing.MockClock
) -> None:
    a, b = pair
    await raw_send(a, message()[:5])
    with trio.move_on_after(1) as scope:
        await b.receive_message()
    assert scope.cancelled_caught
    with pytest.raises(TransportError, match=r"stream broken: .* after 5 of 16 bytes"):
        await b.receive_message()
    with pytest.raises(TransportError, match="stream broken"):
        await b.send_message(message())
    assert "broken" in repr(b)


async def test_a_receive_cancelled_mid_body_marks_the_stream_broken_and_closes_its_fds(
    pair: tuple[FdStream, FdStream], autojump_clock: trio.testing.MockClock
) -> None:
    a, b = pair
    with make_eventfd() as efd:
        await raw_send(a, message(bytes(50))[:20], [efd.fileno()])
    before = count_open_fds()
    with trio.move_on_after(1) as scope:
        await b.receive_message()
    assert scope.cancelled_caught
    assert count_open_fds() == before, "the fd that came with the lost message must be closed"
    with pytest.raises(TransportError, match=r"stream broken: .* after 20 of 66 bytes"):
        await b.receive_header()


async def test_a_send_cancelled_mid_message_marks_the_stream_broken(
    pair: tuple[FdStream, FdStream], autojump_clock: trio.testing.MockClock
) -> None:
    a, _ = pair
    with trio.move_on_after(1) as scope:
        await a.send_message(message(bytes(1024 * 1024)))
    assert scope.cancelled_caught
    with pytest.raises(TransportError, match="stream broken: interrupted sending a message"):
        await a.send_message(message())


async def test_a_send_cancelled_before_any_byte_leaves_the_stream_intact(
    pair: tuple[FdStream, FdStream], autojump_clock: trio.testing.MockClock
) -> None:
    a, b = pair
    filled = await fill_send_buffer(a)
    with make_eventfd() as efd:
        with trio.move_on_after(1) as scope:
            await a.send_message(message(b"blocked"), [efd])
        assert scope.cancelled_caught
        assert await b.receive_exactly(filled) == bytes(filled)
        await a.send_message(message(b"retried"), [efd])
        data, fds = await b.receive_message()
        assert data == message(b"retried")
        assert len(fds) == 1
        close_all(fds)


# -- resource handling ------------------------------------------------------


async def test_two_tasks_receiving_at_once_are_refused(pair: tuple[FdStream, FdStream]) -> None:
    a, b = pair
    async with trio.open_nursery() as nursery:
        nursery.start_soon(b.receive_message)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await b.receive_message()
        await a.send_message(message())


async def test_aclose_is_idempotent_and_later_calls_raise_closed_resource_error() -> None:
    a, b = fd_stream_pair()
    await b.aclose()
    await a.aclose()
    await a.aclose()
    assert a.fileno() == -1
    with pytest.raises(trio.ClosedResourceError):
        await a.send_message(message())
    with pytest.raises(trio.ClosedResourceError):
        await a.receive_message()
    with pytest.raises(trio.ClosedResourceError):
        a.send_eof()


async def test_aclose_wakes_a_blocked_receiver(pair: tuple[FdStream, FdStream]) -> None:
    _, b = pair

    async def receiver() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await b.receive_message()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receiver)
        await trio.testing.wait_all_tasks_blocked()
        await b.aclose()


async def test_fd_stream_refuses_a_socket_that_is_not_unix_stream() -> None:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with sock, pytest.raises(ValueError, match="AF_UNIX SOCK_STREAM"):
        FdStream(sock)


def test_fd_stream_pair_refuses_max_fds_above_the_kernel_limit() -> None:
    with pytest.raises(ValueError, match="max_fds"):
        fd_stream_pair(max_fds=254)


async def test_open_unix_fd_stream_connects_to_a_listening_socket(tmp_path: Path) -> None:
    path = tmp_path / "vfio-user.sock"
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        await listener.bind(str(path))
        listener.listen(1)
        client = await open_unix_fd_stream(path, max_fds=16)
        accepted, _ = await listener.accept()
        async with client, FdStream(accepted) as server:
            assert client.max_fds == 16
            with make_memfd("ram", 4096) as memfd:
                await client.send_message(message(bytes(32)), [memfd])
                data, fds = await server.receive_message()
            assert data == message(bytes(32))
            assert [inspect_fd(fd).kind for fd in fds] == [FdKind.MEMFD]
            close_all(fds)


async def test_open_unix_fd_stream_to_a_missing_path_raises_and_leaks_nothing(
    tmp_path: Path,
) -> None:
    with pytest.raises(FileNotFoundError):
        await open_unix_fd_stream(tmp_path / "nobody-listens")
