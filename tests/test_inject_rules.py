"""Matching filters, corrupt field locations and rule validation."""

from __future__ import annotations

import attrs
import pytest

from tests.test_inject_engine import raw, read
from vfioproxy.inject import (
    Corrupt,
    Delay,
    Drop,
    Error,
    Fixed,
    IntRange,
    Kind,
    Match,
    Rule,
    RuleSyntaxError,
)
from vfioproxy.inject.view import inspect
from vfioproxy.protocol.bodies import (
    DmaAccessBody,
    DmaMapBody,
    IrqSetBody,
    RegionAccessBody,
    RegionInfoBody,
)
from vfioproxy.protocol.codec import build_command, build_error_reply, build_reply
from vfioproxy.protocol.header import HEADER_SIZE, Command, Header
from vfioproxy.protocol.offsets import (
    ACCESS,
    ACCESS_COUNT,
    ACCESS_OFFSET,
    ACCESS_REGION,
    HEADER,
    MSG_ID,
    SIZE,
    layout,
)
from vfioproxy.side import Direction

C2S, S2C = Direction.C2S, Direction.S2C


def matches(match, data, *, session=0, direction=C2S, index=0):
    return match.matches(inspect(data), session, direction, index)


# --------------------------------------------------------------------- Match fields


def test_match_converts_names_numbers_and_strings():
    match = Match("c2s", "region_read", "reply", index="5..10", region="config", offset=0x40)
    assert match.direction is C2S
    assert match.command == frozenset({Command.REGION_READ})
    assert match.kind is Kind.REPLY
    assert match.index == IntRange(5, 10)
    assert match.region == 7
    assert match.offset == IntRange(0x40, 0x41)
    assert Match(command=[9, "REGION_WRITE", 99]).command == frozenset({9, 10, 99})
    assert Match(direction="*").direction is None


@pytest.mark.parametrize(
    "kwargs",
    [{"command": "NOPE"}, {"command": 1 << 16}, {"command": [True]}, {"command": ()},
     {"direction": "sideways"}, {"kind": "event"}, {"session": -1}, {"region": -3},
     {"probability": 1.5}, {"index": "4..2"}],
)
def test_match_rejects_bad_values(kwargs):
    with pytest.raises(RuleSyntaxError):
        Match(**kwargs)


def test_direction_filter():
    data = raw(read())
    assert matches(Match(C2S), data, direction=C2S)
    assert not matches(Match(C2S), data, direction=S2C)
    assert matches(Match(), data, direction=S2C)


def test_command_filter_takes_one_command_or_a_set():
    assert matches(Match(command=Command.REGION_READ), raw(read()))
    assert not matches(Match(command=Command.REGION_WRITE), raw(read()))
    assert matches(Match(command={Command.REGION_WRITE, Command.REGION_READ}), raw(read()))


def test_kind_filter_tells_requests_from_replies():
    request = read()
    reply = build_reply(request, RegionAccessBody(0x40, 7, 4, b"abcd"))
    assert matches(Match(kind="request"), raw(request))
    assert not matches(Match(kind="request"), raw(reply))
    assert matches(Match(kind="reply"), raw(reply))
    assert matches(Match(kind="reply"), raw(build_error_reply(request, 22)))
    invalid_type = bytearray(raw(request))
    invalid_type[8] = 0x02
    assert not matches(Match(kind="request"), bytes(invalid_type))
    assert not matches(Match(kind="reply"), bytes(invalid_type))
    assert matches(Match(), bytes(invalid_type))


def test_session_and_index_filters():
    data = raw(read())
    assert matches(Match(session=2), data, session=2)
    assert not matches(Match(session=2), data, session=3)
    window = Match(index=IntRange(5, 10))
    assert [i for i in range(12) if matches(window, data, index=i)] == [5, 6, 7, 8, 9]
    assert matches(Match(index=IntRange(10)), data, index=10**6)


def test_region_and_offset_filters_read_region_accesses():
    config_msix = Match(region=7, offset=IntRange(0x40, 0x50))
    assert matches(config_msix, raw(read(0x40)))
    assert matches(config_msix, raw(read(0x4C)))
    assert not matches(config_msix, raw(read(0x50)))
    assert not matches(config_msix, raw(read(0x3C, count=8)))  # the offset alone counts
    assert not matches(config_msix, raw(read(0x40, region=0)))
    write = build_command(Command.REGION_WRITE, 2, RegionAccessBody(0x44, 7, 2, b"\1\2"))
    assert matches(config_msix, raw(write))
    dma = build_command(Command.DMA_READ, 3, DmaAccessBody(0x44, 7))
    assert not matches(Match(region=7), raw(dma))
    assert not matches(Match(offset=IntRange(0)), raw(dma))


def test_short_messages_only_match_rules_without_header_filters():
    short = b"\x01\x00\x09"
    assert matches(Match(), short)
    assert matches(Match(C2S, session=0, index=IntRange(0, 1)), short)
    for match in [Match(command=9), Match(kind="request"), Match(region=7),
                  Match(offset=IntRange(0))]:
        assert not matches(match, short)
    truncated_access = raw(read())[:24]
    assert matches(Match(command=Command.REGION_READ), truncated_access)
    assert not matches(Match(region=7), truncated_access)


def test_region_filters_need_region_access_commands():
    with pytest.raises(RuleSyntaxError, match="only match REGION_READ"):
        Match(command=Command.DMA_MAP, region=1)
    assert Match(command={Command.DMA_MAP, Command.REGION_READ}, region=1).region == 1


def test_match_to_dict_lists_only_set_filters():
    assert Match().to_dict() == {}
    match = Match(S2C, [99, 9], "reply", 1, 2, 7, IntRange(0x40, 0x50), 0.5)
    assert match.to_dict() == {
        "direction": "s2c", "command": ["REGION_READ", 99], "kind": "reply", "session": 1,
        "index": "2", "region": 7, "offset": "0x40..0x50", "probability": 0.5,
    }


# --------------------------------------------------------------------- corrupt fields


@pytest.mark.parametrize(
    ("field", "offset", "width"),
    [("msg_id", 0, 2), ("command", 2, 2), ("size", 4, 4), ("flags", 8, 4), ("error", 12, 4)],
)
def test_header_fields_sit_where_protocol_md_puts_them(field, offset, width):
    assert Corrupt(field).locate(None) == (offset, width)
    assert Corrupt(field).locate(Command.REGION_READ) == (offset, width)


@pytest.mark.parametrize(
    ("field", "command", "where"),
    [
        ("offset", Command.REGION_READ, (16, 8)),
        ("region", Command.REGION_WRITE, (24, 4)),
        ("count", Command.REGION_READ, (28, 4)),
        ("count", Command.DMA_READ, (24, 8)),
        ("count", Command.DEVICE_SET_IRQS, (32, 4)),
        ("address", Command.DMA_WRITE, (16, 8)),
        ("offset", Command.DMA_MAP, (24, 8)),
        ("iova", Command.DMA_MAP, (32, 8)),
        ("iova", Command.DMA_UNMAP, (24, 8)),
        ("index", Command.DEVICE_GET_REGION_INFO, (24, 4)),
        ("start", Command.DEVICE_SET_IRQS, (28, 4)),
        ("argsz", Command.DEVICE_GET_INFO, (16, 4)),
        ("major", Command.VERSION, (16, 2)),
        ("minor", Command.VERSION, (18, 2)),
    ],
)
def test_named_body_fields_sit_where_protocol_md_puts_them(field, command, where):
    assert Corrupt(field).locate(command) == where


def test_named_body_fields_match_the_codec_layout():
    write = raw(build_command(Command.REGION_WRITE, 1, RegionAccessBody(0x1122, 0x33, 1, b"x")))
    for field, value in [("offset", 0x1122), ("region", 0x33), ("count", 1)]:
        offset, width = Corrupt(field).locate(Command.REGION_WRITE)
        assert int.from_bytes(write[offset : offset + width], "little") == value
    dma_map = raw(build_command(Command.DMA_MAP, 1, DmaMapBody(32, 3, 0x5000, 0x7000, 0x1000)))
    for field, value in [("offset", 0x5000), ("iova", 0x7000), ("argsz", 32)]:
        offset, width = Corrupt(field).locate(Command.DMA_MAP)
        assert int.from_bytes(dma_map[offset : offset + width], "little") == value
    irqs = raw(build_command(Command.DEVICE_SET_IRQS, 1, IrqSetBody(20, 0x24, 2, 3, 4)))
    for field, value in [("index", 2), ("start", 3), ("count", 4)]:
        offset, width = Corrupt(field).locate(Command.DEVICE_SET_IRQS)
        assert int.from_bytes(irqs[offset : offset + width], "little") == value
    info = raw(build_reply(build_command(Command.DEVICE_GET_REGION_INFO, 1),
                           RegionInfoBody(32, 3, 2, 0, 0x4000, 0x9000)))
    offset, width = Corrupt("offset").locate(Command.DEVICE_GET_REGION_INFO)
    assert int.from_bytes(info[offset : offset + width], "little") == 0x9000


def test_the_offset_table_reads_what_the_codec_wrote():
    data = raw(build_command(Command.REGION_READ, 0x1234, RegionAccessBody(0x1122, 7, 4)))
    assert HEADER.unpack_from(data) == attrs.astuple(Header.parse(data))
    assert ACCESS.unpack_from(data, HEADER_SIZE) == (0x1122, 7)
    assert layout(ACCESS_OFFSET, ACCESS_REGION, ACCESS_COUNT).unpack_from(data, HEADER_SIZE) == (
        0x1122, 7, 4,
    )
    with pytest.raises(ValueError, match="not adjacent"):
        layout(MSG_ID, SIZE)


def test_a_match_without_message_filters_needs_no_predicate():
    assert Match(C2S, session=3, probability=0.5).predicate() is None
    assert Match(index=2).predicate() is not None
    assert Match().predicate(requests_only=True) is not None


def test_body_offsets_span_the_bytes_of_the_mask():
    assert Corrupt("body+0").locate(None) == (16, 1)
    assert Corrupt("body+4", 0x1FF).locate(Command.DMA_MAP) == (20, 2)


def test_corrupt_flips_bits_in_place_or_says_why_not():
    data = bytearray(raw(read(0x40)))
    assert Corrupt("offset", 0xFF).apply(data, Command.REGION_READ) == (16, "")
    assert int.from_bytes(data[16:24], "little") == 0xBF
    offset, note = Corrupt("iova").apply(data, Command.REGION_READ)
    assert offset is None and "REGION_READ has no field iova" in note
    offset, note = Corrupt("body+100").apply(data, Command.REGION_READ)
    assert offset is None and "outside the 32-byte message" in note
    assert Corrupt("region").apply(bytearray(b"short"), None)[0] is None


def test_corrupt_rejects_unknown_fields_and_masks_wider_than_the_field():
    with pytest.raises(RuleSyntaxError):
        Corrupt("payload")
    with pytest.raises(RuleSyntaxError, match="wider"):
        Corrupt("count", 1 << 32)  # REGION_* count is u32
    assert Corrupt("offset", (1 << 64) - 1).mask == (1 << 64) - 1
    assert Corrupt("body+7", 1 << 100).locate(None) == (23, 13)


# --------------------------------------------------------------------- rules


def test_rules_reject_errors_that_can_only_match_replies():
    with pytest.raises(RuleSyntaxError, match="only matches replies"):
        Rule(Match(kind="reply"), Error(5))
    assert Rule(Match(), Error(5)).action == Error(5)


def test_rules_reject_corrupting_a_field_none_of_their_commands_has():
    with pytest.raises(RuleSyntaxError, match="has a field iova"):
        Rule(Match(command=Command.REGION_READ), Corrupt("iova"))
    Rule(Match(command={Command.REGION_READ, Command.DMA_MAP}), Corrupt("iova"))


def test_rule_ids_and_actions_are_validated():
    with pytest.raises(RuleSyntaxError):
        Rule(Match(), Drop(), -1)
    with pytest.raises(RuleSyntaxError, match="not an action"):
        Rule(Match(), "drop")  # type: ignore[arg-type]


def test_rule_to_dict_is_flat_and_json_ready():
    rule = Rule(Match(C2S, Command.REGION_READ), Delay(Fixed(1e-3)), 4)
    assert rule.to_dict() == {
        "id": 4, "direction": "c2s", "command": ["REGION_READ"], "action": "delay",
        "distribution": "fixed(1ms)",
    }
