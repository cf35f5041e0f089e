import struct

import pytest

from tests.realdata import capture_files, wire_messages
from vfioproxy.errors import RemoteProtocolError
from vfioproxy.protocol.bodies import (
    DeviceFeatureBody,
    DmaAccessBody,
    DmaLayout,
    DmaMapBody,
    RegionAccessBody,
    VersionBody,
)
from vfioproxy.protocol.capabilities import Capabilities
from vfioproxy.protocol.codec import Dialects, build_command, build_error_reply, build_reply, encode
from vfioproxy.protocol.constants import Feature, FeatureOp
from vfioproxy.protocol.header import Command
from vfioproxy.protocol.session import SessionState
from vfioproxy.side import Direction, Side

C2S, S2C = Direction.C2S, Direction.S2C


def wire(message):
    return encode(message)[0]


def handshake(state, client_caps=None, server_caps=None):
    cmd = build_command(Command.VERSION, 0, VersionBody.build(0, 0, client_caps))
    state.observe(C2S, wire(cmd))
    state.observe(S2C, wire(build_reply(cmd, VersionBody.build(0, 0, server_caps))))


def region_read(msg_id, count=4, region=7):
    return build_command(Command.REGION_READ, msg_id, RegionAccessBody(0, region, count))


@pytest.mark.parametrize("path", capture_files(), ids=lambda p: p.name)
def test_real_sessions_have_no_violations_and_leave_nothing_outstanding(path):
    state = SessionState()
    for direction, data, nfds in wire_messages(path):
        obs = state.observe(direction, data, ["fd"] * nfds)
        assert obs.violations == ()
        assert obs.message.decoded
        if obs.message.is_reply:
            assert obs.request is not None
            assert obs.request.command == obs.message.command
    assert state.outstanding(C2S) == [] and state.outstanding(S2C) == []


def test_replies_pair_by_direction_and_id_when_both_sides_use_the_same_id():
    state = SessionState()
    handshake(state)
    read = region_read(1)
    dma = build_command(Command.DMA_WRITE, 1, DmaAccessBody(0x1000, 4, b"abcd"))
    state.observe(C2S, wire(read))
    state.observe(S2C, wire(dma))
    client_reply = state.observe(C2S, wire(build_reply(dma, DmaAccessBody(0x1000, 4))))
    server_reply = state.observe(
        S2C, wire(build_reply(read, RegionAccessBody(0, 7, 4, b"\xad\xde\xef\xbe")))
    )
    assert client_reply.request == dma and client_reply.violations == ()
    assert server_reply.request == read and server_reply.violations == ()


def test_pipelined_commands_are_outstanding_until_answered_in_order():
    state = SessionState()
    handshake(state)
    maps = [
        build_command(Command.DMA_MAP, i, DmaMapBody(32, 3, 0, i << 20, 1 << 20))
        for i in range(2, 7)
    ]
    for m in maps:
        state.observe(C2S, wire(m))
    assert state.outstanding(C2S) == maps
    for m in maps:
        assert state.observe(S2C, wire(build_reply(m))).request == m
    assert state.outstanding(C2S) == []


def test_a_reply_to_an_unknown_id_is_a_violation_naming_side_index_and_field():
    state = SessionState()
    handshake(state)
    obs = state.observe(S2C, wire(build_reply(region_read(42))))
    (v,) = obs.violations
    assert (v.kind, v.side, v.index, v.field, v.offset, v.got) == (
        "unknown_reply_id", Side.SERVER, 1, "msg_id", 0, 42
    )
    assert "server message s2c[1] (REGION_READ reply id=42)" in str(v) and "msg_id" in str(v)


def test_a_duplicate_outstanding_id_is_a_violation_but_both_are_answered_fifo():
    state = SessionState()
    handshake(state)
    first, second = region_read(5), region_read(5, count=2)
    state.observe(C2S, wire(first))
    obs = state.observe(C2S, wire(second))
    assert [v.kind for v in obs.violations] == ["duplicate_outstanding_id"]
    assert state.observe(S2C, wire(build_reply(first))).request == first
    assert state.observe(S2C, wire(build_reply(second))).request == second


def test_reusing_an_id_after_its_reply_is_fine():
    state = SessionState()
    handshake(state)
    for _ in range(3):
        cmd = region_read(0xABCD)
        assert state.observe(C2S, wire(cmd)).violations == ()
        assert state.observe(S2C, wire(build_reply(cmd))).violations == ()


@pytest.mark.parametrize("size", [0, 15])
def test_a_size_below_16_is_a_violation(size):
    state = SessionState()
    handshake(state)
    data = struct.pack("<HHIII", 3, Command.REGION_READ, size, 0, 0)
    (v, *_) = state.observe(C2S, data).violations
    assert (v.kind, v.field, v.offset, v.got) == ("size_too_small", "size", 4, size)


def test_a_size_above_the_negotiated_maximum_is_a_violation():
    state = SessionState()
    handshake(state, Capabilities(max_data_xfer_size=4096), Capabilities(max_data_xfer_size=8192))
    assert state.max_message_size() == 32 + 1024 * 1024
    huge = 64 * 1024 * 1024
    data = struct.pack("<HHIII", 3, Command.REGION_WRITE, huge, 0, 0)
    (v, *_) = state.observe(C2S, data).violations
    assert v.kind == "size_too_large" and v.got == huge


def test_the_framing_limit_follows_the_larger_offer_of_the_negotiation():
    state = SessionState()
    assert state.max_message_size() == 32 + 1024 * 1024  # before VERSION: the spec's size
    handshake(state, Capabilities(max_data_xfer_size=4 << 20), Capabilities())
    assert state.max_message_size() == 32 + (4 << 20)
    write = build_command(Command.REGION_WRITE, 1, RegionAccessBody(0, 0, 2 << 20, bytes(2 << 20)))
    # framed whole (no size violation); only the count breaks the server's 1 MiB
    assert [v.kind for v in state.observe(C2S, wire(write)).violations] == ["count_too_large"]
    again = SessionState()
    handshake(again, Capabilities(), Capabilities(max_data_xfer_size=8 << 20))
    assert again.max_message_size() == 32 + (8 << 20)


def test_a_count_above_the_receivers_max_data_xfer_size_is_a_violation():
    state = SessionState()
    handshake(state, Capabilities(max_data_xfer_size=1024), Capabilities())
    big = build_command(Command.DMA_WRITE, 1, DmaAccessBody(0, 2048, bytes(2048)))
    (v,) = state.observe(S2C, wire(big)).violations
    assert (v.kind, v.side, v.field, v.got) == ("count_too_large", Side.SERVER, "count", 2048)


def test_fds_on_a_command_that_carries_none_are_a_violation():
    state = SessionState()
    handshake(state)
    (v,) = state.observe(C2S, wire(region_read(1)), fds=["fd"]).violations
    assert (v.kind, v.field, v.expected, v.got) == ("fds_not_allowed", "fds", 0, 1)


def test_more_fds_than_the_receiver_negotiated_is_a_violation():
    state = SessionState()
    handshake(state, Capabilities(max_msg_fds=16), Capabilities(max_msg_fds=2))
    dma_map = build_command(Command.DMA_MAP, 1, DmaMapBody(32, 3, 0, 0, 4096))
    (v,) = state.observe(C2S, wire(dma_map), fds=[1, 2, 3]).violations
    assert (v.kind, v.got) == ("too_many_fds", 3)


def test_absent_max_msg_fds_means_one_fd():
    state = SessionState()
    handshake(state, Capabilities(), Capabilities())
    dma_map = build_command(Command.DMA_MAP, 1, DmaMapBody(32, 3, 0, 0, 4096))
    assert state.observe(C2S, wire(dma_map), fds=[1]).violations == ()


def test_a_server_command_sent_by_the_client_is_a_violation():
    state = SessionState()
    handshake(state)
    dma = build_command(Command.DMA_READ, 3, DmaAccessBody(0, 4))
    (v,) = state.observe(C2S, wire(dma)).violations
    assert v.kind == "wrong_direction"


def test_the_first_client_message_must_be_version():
    state = SessionState()
    (v,) = state.observe(C2S, wire(region_read(1))).violations
    assert v.kind == "version_not_first"


def test_a_body_that_does_not_decode_is_a_violation_and_keeps_its_bytes():
    state = SessionState()
    handshake(state)
    data = struct.pack("<HHIII", 1, Command.DMA_MAP, 20, 0, 0) + b"\1\2\3\4"
    obs = state.observe(C2S, data)
    assert [v.kind for v in obs.violations] == ["decode_error"]
    assert wire(obs.message) == data


def test_strict_mode_raises_the_first_violation():
    state = SessionState(strict=True)
    handshake(state)
    with pytest.raises(RemoteProtocolError, match="msg_id") as info:
        state.observe(S2C, wire(build_reply(region_read(9))))
    assert info.value.side is Side.SERVER


def test_an_error_reply_to_a_no_reply_command_pairs_with_it():
    state = SessionState()
    handshake(state)
    posted = build_command(
        Command.REGION_WRITE, 7, RegionAccessBody(0x1000, 0, 4, b"abcd"), no_reply=True
    )
    state.observe(C2S, wire(posted))
    assert state.outstanding(C2S) == []
    obs = state.observe(S2C, wire(build_error_reply(posted, 22)))
    assert obs.violations == () and obs.request == posted


def test_the_client_dma_layout_is_detected_from_a_qemu_version():
    qemu_caps = VersionBody.parse(
        b"\0\0\0\0"
        + b'{"capabilities": {"pgsizes": 4096, "max_msg_fds": 16, "max_dma_maps": 65535, '
        b'"max_data_xfer_size": 1048576, "migration": {"max_bitmap_size": 268435456, '
        b'"pgsize": 4096}, "write_multiple": true}}\0'
    )
    state = SessionState()
    state.observe(C2S, wire(build_command(Command.VERSION, 0, qemu_caps)))
    assert state.dialects == Dialects(client=DmaLayout.QEMU, server=DmaLayout.SPEC)
    dma = build_command(Command.DMA_READ, 1, DmaAccessBody(0x1000, 4))
    state.observe(S2C, wire(dma))
    reply = build_reply(dma, DmaAccessBody(0x1000, 4, b"wxyz", bytes(4), DmaLayout.QEMU))
    obs = state.observe(C2S, wire(reply))
    assert obs.message.body == reply.body


def test_an_explicit_dialect_is_not_overridden_by_detection():
    fixed = Dialects(client=DmaLayout.SPEC, server=DmaLayout.QEMU)
    state = SessionState(dialects=fixed)
    handshake(state, Capabilities(max_msg_fds=16))
    assert state.dialects == fixed


def test_a_feature_reply_decodes_with_the_feature_of_its_request():
    state = SessionState()
    handshake(state)
    get = build_command(
        Command.DEVICE_FEATURE, 1, DeviceFeatureBody.build(Feature.MIGRATION, FeatureOp.GET)
    )
    state.observe(C2S, wire(get))
    reply_body = DeviceFeatureBody(16, 0, (5).to_bytes(8, "little"))
    obs = state.observe(S2C, wire(build_reply(get, reply_body)))
    assert obs.message.body.feature_data is not None
    assert obs.message.body.feature_data.flags == 5
