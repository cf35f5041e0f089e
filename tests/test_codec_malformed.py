"""Malformed messages: strict decoding names the field and offset at fault,
non-strict decoding keeps every byte in a RawBody, and errors read as one line.
"""

from __future__ import annotations

import struct

import attrs
import pytest

from vfioproxy.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from vfioproxy.protocol.bodies import DmaMapBody, RawBody, RegionAccessBody
from vfioproxy.protocol.codec import Message, build_command, decode, encode
from vfioproxy.protocol.header import HEADER_SIZE, Command, Header

REGION_INFO_FIXED = struct.Struct("<IIIIQQ")
CAP_HEADER = struct.Struct("<HHI")
SPARSE_HEAD = struct.Struct("<II")
AREA = struct.Struct("<QQ")


def message(command: int, payload: bytes, *, flags: int = 0, msg_id: int = 7) -> bytes:
    return Header(msg_id, command, HEADER_SIZE + len(payload), flags, 0).pack() + payload


def version(json_text: bytes) -> bytes:
    return message(Command.VERSION, struct.pack("<HH", 0, 0) + json_text + b"\0")


def region_info_reply(cap_offset: int, caps: bytes, *, flags: int = 0xF) -> bytes:
    fixed = REGION_INFO_FIXED.pack(32 + len(caps), flags, 1, cap_offset, 0x4000, 0)
    return message(Command.DEVICE_GET_REGION_INFO, fixed + caps, flags=1)


@attrs.frozen
class Case:
    """A malformed message and the error strict decoding must report."""

    raw: bytes
    field: str
    offset: int
    words: tuple[str, ...]


#: the `next` of the second cap (payload offset 40) leads back to the first (32)
LOOPING_CHAIN = region_info_reply(32, CAP_HEADER.pack(3, 1, 40) + CAP_HEADER.pack(3, 1, 32))
#: one MSIX_MAPPABLE cap whose `next` names itself
SELF_LOOP = region_info_reply(32, CAP_HEADER.pack(3, 1, 32))
#: a sparse-mmap cap that claims 3 areas but carries 2
TOO_MANY_AREAS = region_info_reply(
    32,
    CAP_HEADER.pack(1, 1, 0)
    + SPARSE_HEAD.pack(3, 0)
    + AREA.pack(0, 0x1000)
    + AREA.pack(0x2000, 0x1000),
)

CASES = {
    "dma-map-body-too-short": Case(
        message(Command.DMA_MAP, bytes(20)), "size", 4, ("too short", "DMA_MAP")
    ),
    "version-json-does-not-parse": Case(
        version(b'{"capabilities": {'), "json", 20, ("does not parse",)
    ),
    "version-json-is-not-an-object": Case(
        version(b'["capabilities"]'), "json", 20, ("not an object",)
    ),
    "version-json-nested-too-deep": Case(version(b"[" * 5000), "json", 20, ()),
    "version-json-integer-too-long": Case(
        version(b'{"capabilities": {"max_msg_fds": 1' + b"0" * 5000 + b"}}"), "json", 20, ()
    ),
    "cap-offset-inside-the-fixed-struct": Case(
        region_info_reply(16, CAP_HEADER.pack(3, 1, 0)), "cap_offset", 28, (">= 32",)
    ),
    "looping-capability-chain": Case(LOOPING_CHAIN, "cap.next", HEADER_SIZE + 40 + 4, ("loops",)),
    "capability-naming-itself-as-next": Case(
        SELF_LOOP, "cap.next", HEADER_SIZE + 32 + 4, ("loops",)
    ),
    "sparse-mmap-claims-more-areas-than-fit": Case(
        TOO_MANY_AREAS, "cap.nr_areas", 56, ("sparse-mmap", "3 areas")
    ),
    "unknown-command-99": Case(message(99, b"\x01\x02\x03"), "command", 2, ("unknown",)),
    "retired-command-14": Case(message(14, bytes(8)), "command", 2, ("unknown",)),
    "type-nibble-2": Case(message(Command.DMA_MAP, bytes(32), flags=0x2), "flags", 8, ("type",)),
    "type-nibble-15-with-error-bit": Case(
        message(Command.DEVICE_RESET, b"", flags=0x2F), "flags", 8, ("type",)
    ),
}

#: VERSION capabilities of the wrong type: the offset is that of the JSON text (or inside it)
CAPABILITY_CASES = {
    "max-msg-fds-is-a-string": (
        version(b'{"capabilities": {"max_msg_fds": "16"}}'),
        "capabilities.max_msg_fds",
    ),
    "max-data-xfer-size-is-negative": (
        version(b'{"capabilities": {"max_data_xfer_size": -1}}'),
        "capabilities.max_data_xfer_size",
    ),
    "write-multiple-is-an-integer": (
        version(b'{"capabilities": {"write_multiple": 1}}'),
        "capabilities.write_multiple",
    ),
    "pgsize-is-a-bool": (
        version(b'{"capabilities": {"migration": {"pgsize": true}}}'),
        "capabilities.migration.pgsize",
    ),
    "capabilities-is-not-an-object": (version(b'{"capabilities": 3}'), "capabilities"),
    "migration-is-not-an-object": (
        version(b'{"capabilities": {"migration": []}}'),
        "capabilities.migration",
    ),
}


def strict_error(raw: bytes) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        decode(raw, strict=True)
    return info.value


def assert_one_readable_line(error: ProtocolError) -> None:
    text = str(error)
    assert "\n" not in text
    assert f"field {error.field}" in text
    if error.offset is not None:
        assert f"at offset {error.offset}" in text
    assert error.msg in text


def assert_kept_raw(raw: bytes, field: str) -> None:
    """Non-strict decoding keeps every byte in a RawBody whose reason names ``field``."""
    loose = decode(raw)
    assert not loose.decoded
    assert isinstance(loose.body, RawBody)
    assert loose.body.data == raw[HEADER_SIZE:]
    assert loose.header == Header.parse(raw)
    assert field in loose.body.reason
    assert encode(loose)[0] == raw


# --------------------------------------------------------------------- header


@pytest.mark.parametrize("length", range(HEADER_SIZE))
def test_header_parse_of_fewer_than_16_bytes_reports_a_truncated_header(length: int) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        Header.parse(bytes(range(length)))
    error = info.value
    assert (error.field, error.offset) == ("header", 0)
    assert (error.expected, error.got) == (HEADER_SIZE, length)
    assert "truncated header" in str(error)
    assert_one_readable_line(error)


@pytest.mark.parametrize("strict", [False, True])
def test_decode_of_a_truncated_header_raises_even_when_not_strict(strict: bool) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode(b"\x01\x00\x02\x00\x30\x00", strict=strict)
    assert info.value.field == "header"


@pytest.mark.parametrize("delta", [-16, -1, 1, 100])
def test_header_size_that_disagrees_with_the_data_length_is_reported(delta: int) -> None:
    good = message(Command.DMA_MAP, DmaMapBody(32, 3, 0, 0x1000, 0x1000).serialize())
    size = len(good) + delta
    raw = good[:4] + struct.pack("<I", size) + good[8:]
    error = strict_error(raw)
    assert (error.field, error.offset) == ("size", 4)
    assert (error.expected, error.got) == (len(raw), size)
    assert_one_readable_line(error)
    assert_kept_raw(raw, error.field)


# --------------------------------------------------------------------- bodies


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_malformed_message_names_field_and_offset_in_strict_mode(case: Case) -> None:
    error = strict_error(case.raw)
    assert (error.field, error.offset) == (case.field, case.offset)
    for word in case.words:
        assert word in str(error)
    assert_one_readable_line(error)


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_malformed_message_keeps_its_bytes_in_a_raw_body_when_not_strict(case: Case) -> None:
    assert_kept_raw(case.raw, case.field)


@pytest.mark.parametrize(
    ("raw", "field"), list(CAPABILITY_CASES.values()), ids=list(CAPABILITY_CASES)
)
def test_capability_of_the_wrong_type_names_the_key_and_keeps_the_bytes(
    raw: bytes, field: str
) -> None:
    error = strict_error(raw)
    assert error.field == field
    assert_one_readable_line(error)
    assert_kept_raw(raw, error.field)


@pytest.mark.parametrize(
    ("raw", "field"), list(CAPABILITY_CASES.values()), ids=list(CAPABILITY_CASES)
)
def test_capability_of_the_wrong_type_gives_an_offset_inside_the_version_json(
    raw: bytes, field: str
) -> None:
    error = strict_error(raw)
    assert error.offset is not None, f"no offset in: {error}"
    assert HEADER_SIZE + 4 <= error.offset < len(raw)


ALL_ERRORS = {
    **{name: case.raw for name, case in CASES.items()},
    **{name: raw for name, (raw, _) in CAPABILITY_CASES.items()},
}


@pytest.mark.parametrize("raw", list(ALL_ERRORS.values()), ids=list(ALL_ERRORS))
def test_error_text_does_not_claim_that_none_was_expected(raw: bytes) -> None:
    text = str(strict_error(raw))
    assert "expected None" not in text, text


@pytest.mark.parametrize(
    ("command", "fixed"),
    [
        (Command.VERSION, 4),
        (Command.DMA_MAP, 32),
        (Command.DMA_UNMAP, 24),
        (Command.DEVICE_GET_INFO, 16),
        (Command.DEVICE_GET_REGION_INFO, 32),
        (Command.DEVICE_GET_REGION_IO_FDS, 16),
        (Command.DEVICE_GET_IRQ_INFO, 16),
        (Command.DEVICE_SET_IRQS, 20),
        (Command.REGION_READ, 16),
        (Command.REGION_WRITE, 16),
        (Command.DMA_READ, 16),
        (Command.DMA_WRITE, 16),
        (Command.REGION_WRITE_MULTI, 8),
        (Command.DEVICE_FEATURE, 8),
        (Command.MIG_DATA_READ, 8),
        (Command.MIG_DATA_WRITE, 8),
    ],
    ids=lambda v: v.name if isinstance(v, Command) else str(v),
)
def test_command_one_byte_short_of_its_fixed_struct_is_too_short(
    command: Command, fixed: int
) -> None:
    raw = message(command, bytes(fixed - 1))
    error = strict_error(raw)
    assert (error.field, error.offset) == ("size", 4)
    assert error.got == len(raw)
    assert str(HEADER_SIZE + fixed) in str(error.expected)
    assert_one_readable_line(error)
    assert_kept_raw(raw, error.field)


def test_unknown_and_retired_commands_keep_the_number_in_the_raw_reason() -> None:
    for number in (0, 14, 19, 99, 0xFFFF):
        loose = decode(message(number, b"xyz"))
        assert isinstance(loose.body, RawBody)
        assert str(number) in loose.body.reason
        assert strict_error(message(number, b"xyz")).got == number
    assert Header.parse(message(14, b"")).command_name == "DIRTY_PAGES(retired)"


def test_error_reply_to_an_unknown_command_still_decodes_its_payload_as_error_body() -> None:
    raw = message(99, b"\xaa\xbb", flags=0x21)
    decoded = decode(raw, strict=True)
    assert decoded.is_error and decoded.body.serialize() == b"\xaa\xbb"


# --------------------------------------------------------------------- encode


def test_encode_refuses_a_header_size_that_disagrees_with_the_body() -> None:
    good = build_command(Command.REGION_WRITE, 3, RegionAccessBody(0x10, 7, 4, b"\0\0\0\0"))
    assert good.header.size == HEADER_SIZE + 20
    for size in (HEADER_SIZE, HEADER_SIZE + 19, HEADER_SIZE + 21, 0xFFFFFFFF):
        bad = attrs.evolve(good, header=attrs.evolve(good.header, size=size))
        with pytest.raises(LocalProtocolError) as info:
            encode(bad)
        error = info.value
        assert error.field == "size"
        assert (error.expected, error.got) == (HEADER_SIZE + 20, size)
        assert_one_readable_line(error)


def test_encode_writes_a_raw_body_as_it_is_even_with_a_mismatched_size() -> None:
    raw = message(Command.DMA_MAP, bytes(32))
    raw = raw[:4] + struct.pack("<I", 99) + raw[8:]
    kept = decode(raw)
    assert encode(kept)[0] == raw
    made = Message(Header(1, 99, 100), RawBody(b"abc"))
    assert encode(made)[0] == made.header.pack() + b"abc"


def test_encode_of_a_header_field_out_of_range_is_a_local_error() -> None:
    bad = Message(Header(0x10000, Command.DEVICE_RESET, HEADER_SIZE), RawBody(b""))
    with pytest.raises(LocalProtocolError):
        encode(bad)
