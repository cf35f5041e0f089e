import random
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vfioproxy.errors import RemoteProtocolError
from vfioproxy.protocol.framing import Frame, MessageFramer
from vfioproxy.protocol.header import HEADER_SIZE


def message(msg_id: int, body: bytes, command: int = 9) -> bytes:
    return struct.pack("<HHIII", msg_id, command, HEADER_SIZE + len(body), 0, 0) + body


def drain(framer: MessageFramer) -> list[Frame]:
    out = []
    while (frame := framer.next_frame()) is not None:
        out.append(frame)
    return out


STREAM = [message(1, b"a" * 16), message(2, b""), message(3, bytes(range(200))), message(4, b"x")]


def test_framer_needs_a_whole_header_before_it_frames():
    framer = MessageFramer()
    framer.receive_data(STREAM[0][:15])
    assert framer.next_frame() is None
    framer.receive_data(STREAM[0][15:])
    assert drain(framer) == [Frame(STREAM[0])]


def test_framer_frames_a_stream_fed_one_byte_at_a_time():
    framer = MessageFramer()
    frames = []
    for byte in b"".join(STREAM):
        framer.receive_data(bytes([byte]))
        frames += drain(framer)
    assert [f.data for f in frames] == STREAM
    assert framer.buffered == 0


@given(st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_framer_frames_any_split_of_the_stream(cuts):
    stream = b"".join(STREAM)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    framer = MessageFramer()
    frames = []
    last = 0
    for point in [*points, len(stream)]:
        framer.receive_data(stream[last:point])
        last = point
        frames += drain(framer)
    assert [f.data for f in frames] == STREAM


def test_fds_bind_to_the_message_whose_first_byte_they_came_with():
    framer = MessageFramer()
    stream = b"".join(STREAM)
    second = len(STREAM[0])
    framer.receive_data(stream[:10])
    framer.receive_data(stream[10:second + 5], fds=["fd-A"])  # contains message 2's first byte
    framer.receive_data(stream[second + 5:], fds=[])
    frames = drain(framer)
    assert frames[0].fds == () and frames[0].late_fds == ()
    assert frames[1].fds == ("fd-A",)


def test_fds_of_a_chunk_in_which_no_message_starts_are_late():
    framer = MessageFramer()
    msg = STREAM[2]
    framer.receive_data(msg[:20], fds=["first"])
    framer.receive_data(msg[20:100], fds=["late"])
    framer.receive_data(msg[100:])
    (frame,) = drain(framer)
    assert frame.fds == ("first",)
    assert frame.late_fds == ("late",)


def test_fds_sent_with_several_glued_messages_bind_to_the_first():
    framer = MessageFramer()
    framer.receive_data(STREAM[0] + STREAM[1], fds=[7, 8])
    frames = drain(framer)
    assert frames[0].fds == (7, 8)
    assert frames[1].fds == ()


@pytest.mark.parametrize("size", [0, 8, 15])
def test_a_size_below_16_is_framed_as_a_header_alone(size):
    bad = struct.pack("<HHIII", 9, 9, size, 0, 0)
    framer = MessageFramer()
    framer.receive_data(bad + STREAM[1])
    frames = drain(framer)
    assert frames[0] == Frame(bad, unframable=True)
    assert frames[1].data == STREAM[1]


def test_a_size_above_the_limit_is_framed_as_a_header_alone():
    bad = struct.pack("<HHIII", 9, 10, 10_000, 0, 0)
    framer = MessageFramer(max_size=4096)
    framer.receive_data(bad + STREAM[0])
    frames = drain(framer)
    assert frames[0].unframable and frames[0].data == bad
    assert frames[1].data == STREAM[0]


def test_eof_at_a_message_boundary_is_clean():
    framer = MessageFramer()
    framer.receive_data(STREAM[0])
    framer.receive_eof()
    assert [f.data for f in drain(framer)] == [STREAM[0]]
    assert framer.next_frame() is None


@pytest.mark.parametrize("cut", [5, 16, 30])
def test_eof_in_the_middle_of_a_message_reports_lost_framing(cut):
    framer = MessageFramer()
    framer.receive_data(STREAM[2][:cut])
    framer.receive_eof()
    with pytest.raises(RemoteProtocolError, match="framing lost") as info:
        framer.next_frame()
    assert info.value.got == cut


def test_data_after_eof_is_refused():
    framer = MessageFramer()
    framer.receive_eof()
    with pytest.raises(RemoteProtocolError):
        framer.receive_data(b"x")


def test_framer_handles_a_large_stream_in_random_pieces():
    rnd = random.Random(7)
    msgs = [message(i, rnd.randbytes(rnd.randrange(0, 5000))) for i in range(200)]
    stream = b"".join(msgs)
    framer = MessageFramer()
    frames = []
    pos = 0
    while pos < len(stream):
        step = rnd.randrange(1, 9000)
        framer.receive_data(stream[pos:pos + step])
        pos += step
        frames += drain(framer)
    assert [f.data for f in frames] == msgs
