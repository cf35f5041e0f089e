"""BlockingFdSocket: the forwarding threads' framing, with real sockets and fds."""

import os
import socket
import struct
import threading

import pytest

from tests.conftest import FD_HYGIENE
from vfioproxy.errors import ConnectionClosedError, FdsTruncatedError
from vfioproxy.io.blocking_transport import BlockingFdSocket
from vfioproxy.io.fds import close_all, make_eventfd, make_memfd

pytestmark = FD_HYGIENE


def header(size, msg_id=1, command=9, flags=0):
    return struct.pack("<HHIII", msg_id, command, size, flags, 0)


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    left, right = BlockingFdSocket(a), BlockingFdSocket(b)
    yield left, right
    left.close()
    right.close()


def test_a_message_and_its_fds_cross_in_one_piece(pair):
    left, right = pair
    message = header(16 + 5) + b"hello"
    memfd, eventfd = make_memfd("m", 4096), make_eventfd()
    with memfd, eventfd:
        left.send_message(message, [memfd, eventfd])
    data, fds = right.receive_message()
    assert data == message and len(fds) == 2
    assert os.fstat(fds[0].fileno()).st_size == 4096
    close_all(fds)


def test_messages_are_framed_by_their_size_field_however_they_arrive(pair):
    left, right = pair
    stream = header(20) + b"abcd" + header(16) + header(16 + 3000) + bytes(3000)

    def trickle():
        for i in range(0, len(stream), 7):
            left.socket.sendall(stream[i:i + 7])

    thread = threading.Thread(target=trickle)
    thread.start()
    sizes = [len(right.receive_message()[0]) for _ in range(3)]
    thread.join()
    assert sizes == [20, 16, 3016]


@pytest.mark.parametrize("size", [0, 15, 0xFFFFFFFF])
def test_a_size_that_cannot_be_framed_is_a_header_alone(pair, size):
    left, right = pair
    left.socket.sendall(header(size) + header(16))
    assert right.receive_message(max_size=1 << 20)[0] == header(size)
    assert right.receive_message()[0] == header(16)


def test_eof_between_messages_is_not_mid_message(pair):
    left, right = pair
    left.socket.shutdown(socket.SHUT_WR)
    with pytest.raises(ConnectionClosedError) as info:
        right.receive_message()
    assert not info.value.mid_message


def test_eof_inside_a_header_keeps_the_bytes(pair):
    left, right = pair
    left.socket.sendall(b"\x01\x02\x03")
    left.socket.shutdown(socket.SHUT_WR)
    with pytest.raises(ConnectionClosedError) as info:
        right.receive_message()
    assert info.value.mid_message and info.value.partial == b"\x01\x02\x03"


def test_eof_inside_a_body_keeps_the_bytes_and_closes_the_fds(pair):
    left, right = pair
    eventfd = make_eventfd()
    with eventfd:
        left.send_message(header(16 + 100) + b"x" * 10, [eventfd])
    left.socket.shutdown(socket.SHUT_WR)
    with pytest.raises(ConnectionClosedError) as info:
        right.receive_message()
    assert info.value.received == 26 and info.value.partial == header(116) + b"x" * 10


@pytest.mark.parametrize(("sent", "text"), [
    (header(16 + 32)[:10], "reset the connection after 10 of 16 header bytes"),
    # a blocking recv that copied bytes before the error takes the error with
    # it (the next one sees EOF): a header alone makes the body's recv fail
    (header(16 + 32), "reset the connection after 16 of 48 message bytes"),
])
def test_a_reset_mid_message_keeps_the_bytes_received(sent, text):
    peer, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    peer.sendall(sent)
    ours.sendall(b"never read")  # closing with unread data resets the connection
    peer.close()
    stream = BlockingFdSocket(ours)
    try:
        with pytest.raises(ConnectionClosedError, match=text) as info:
            stream.receive_message()
    finally:
        stream.close()
    assert info.value.mid_message and info.value.received == len(sent)
    assert info.value.partial == sent


def test_more_fds_than_allowed_is_an_error_and_the_arrivals_are_closed():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    left, right = BlockingFdSocket(a), BlockingFdSocket(b, max_fds=1)
    try:
        fds = [make_eventfd() for _ in range(3)]
        left.send_message(header(16), fds)
        close_all(fds)
        with pytest.raises(FdsTruncatedError):
            right.receive_message()
    finally:
        left.close()
        right.close()


def test_shutdown_wakes_a_thread_blocked_in_receive(pair):
    _, right = pair
    errors = []

    def blocked():
        try:
            right.receive_message()
        except ConnectionClosedError as exc:
            errors.append(exc)

    thread = threading.Thread(target=blocked)
    thread.start()
    right.shutdown()
    thread.join(timeout=5)
    assert not thread.is_alive() and len(errors) == 1


def test_sending_to_a_closed_peer_is_connection_closed(pair):
    left, right = pair
    right.close()
    with pytest.raises(ConnectionClosedError):
        left.send_message(header(16))
