"""Property tests of the codec: every body class and whole messages round-trip,
and no byte string is ever lost or makes ``decode`` raise the wrong exception.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vfioproxy.protocol.bodies as bodies_module
from vfioproxy.errors import LocalProtocolError, RemoteProtocolError
from vfioproxy.protocol.bodies import (
    Body,
    DeviceFeatureBody,
    DeviceInfoBody,
    DeviceStateData,
    DirtyBitmap,
    DmaAccessBody,
    DmaLayout,
    DmaLoggingReportData,
    DmaLoggingStartData,
    DmaMapBody,
    DmaRange,
    DmaUnmapBody,
    EmptyBody,
    ErrorBody,
    IoFdEntry,
    IrqInfoBody,
    IrqSetBody,
    MigDataBody,
    MigrationFeatureData,
    MsixMappableCap,
    MultiWrite,
    RawBody,
    RegionAccessBody,
    RegionInfoBody,
    RegionIoFdsBody,
    RegionWriteMultiBody,
    SparseMmapArea,
    SparseMmapCap,
    TypeCap,
    UnknownRegionCap,
    VersionBody,
    WriteMultiReplyBody,
    serialize_feature_data,
)
from vfioproxy.protocol.capabilities import (
    Capabilities,
    MigrationCapability,
    TwinSocketCapability,
    parse_version_json,
)
from vfioproxy.protocol.codec import (
    DEFAULT_DIALECTS,
    Dialects,
    Message,
    build_command,
    build_error_reply,
    build_reply,
    decode,
    encode,
)
from vfioproxy.protocol.constants import DmaUnmapFlags, Feature, FeatureOp, IrqSetFlags
from vfioproxy.protocol.header import (
    HEADER_SIZE,
    SERVER_COMMANDS,
    Command,
    Header,
    MessageType,
)
from vfioproxy.side import Side

PROPERTY = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, 0xFFFF_FFFF_FFFF_FFFF)
blobs = st.binary(max_size=48)
fd_tuples = st.lists(st.integers(0, 1023), max_size=3).map(tuple)


# --------------------------------------------------------------------- bodies


def data_with_count(draw: st.DrawFn, count_max: int) -> tuple[int, bytes, bytes]:
    """``(count, data, trailing)`` as a parser returns them: ``data`` is ``count``
    bytes followed by any trailing bytes, or fewer (a short message) with none."""
    data = draw(st.binary(max_size=64))
    if draw(st.booleans()):
        return len(data), data, draw(blobs)
    return draw(st.integers(len(data) + 1, count_max)), data, b""


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def json_extra(reserved: set[str]) -> st.SearchStrategy[dict[str, Any]]:
    keys = st.text(max_size=12).filter(lambda k: k not in reserved)
    return st.dictionaries(keys, json_values, max_size=3)


maybe_uint = st.none() | st.integers(0, 2**64)
capabilities = st.builds(
    Capabilities,
    max_msg_fds=maybe_uint,
    max_data_xfer_size=maybe_uint,
    pgsizes=maybe_uint,
    max_dma_maps=maybe_uint,
    migration=st.none()
    | st.builds(
        MigrationCapability,
        pgsize=maybe_uint,
        max_bitmap_size=maybe_uint,
        extra=json_extra({"pgsize", "max_bitmap_size"}),
    ),
    write_multiple=st.none() | st.booleans(),
    twin_socket=st.none()
    | st.builds(
        TwinSocketCapability,
        supported=st.none() | st.booleans(),
        fd_index=maybe_uint,
        extra=json_extra({"supported", "fd_index"}),
    ),
    extra=json_extra(
        {
            "max_msg_fds",
            "max_data_xfer_size",
            "pgsizes",
            "max_dma_maps",
            "migration",
            "write_multiple",
            "twin_socket",
        }
    ),
)


@st.composite
def version_bodies(draw: st.DrawFn) -> VersionBody:
    major, minor = draw(u16), draw(u16)
    if draw(st.booleans()):
        caps = draw(st.none() | capabilities)
        style = draw(st.sampled_from(["compact", "qemu", "json-c"]))
        return VersionBody.build(major, minor, caps, style=style)
    # hand-made: any JSON object text, a NUL or not, bytes after the NUL
    text = draw(st.sampled_from([b"", b"{}", b'{"capabilities":{"max_msg_fds":1}}', b'{"x": [1]}']))
    terminated = draw(st.booleans())
    trailing = draw(blobs) if terminated else b""
    document = parse_version_json(text) if text else None
    return VersionBody(major, minor, text, terminated, trailing, document)


@st.composite
def dma_unmap_bodies(draw: st.DrawFn) -> DmaUnmapBody:
    flags = draw(u32)
    argsz, iova, size = draw(u32), draw(u64), draw(u64)
    if not flags & DmaUnmapFlags.GET_DIRTY_BITMAP:
        return DmaUnmapBody(argsz, flags, iova, size, None, draw(blobs))
    if draw(st.booleans()):  # bitmap header cut off: the bytes stay trailing
        return DmaUnmapBody(argsz, flags, iova, size, None, draw(st.binary(max_size=15)))
    bsize, data, trailing = data_with_count(draw, 2**64 - 1)
    return DmaUnmapBody(argsz, flags, iova, size, DirtyBitmap(draw(u64), bsize, data), trailing)


region_caps = st.one_of(
    st.builds(
        SparseMmapCap,
        areas=st.lists(st.builds(SparseMmapArea, u64, u64), max_size=3).map(tuple),
        reserved=u32,
        version=u16,
    ),
    st.builds(TypeCap, u32, u32, version=u16),
    st.builds(MsixMappableCap, version=u16),
    st.builds(
        UnknownRegionCap,
        cap_id=u16.filter(lambda i: i not in (1, 2, 3)),
        version=u16,
        data=st.binary(max_size=24),
    ),
)


@st.composite
def region_info_bodies(draw: st.DrawFn) -> RegionInfoBody:
    if draw(st.booleans()):  # a command: argsz and index, maybe padded to argsz
        return RegionInfoBody(draw(u32), 0, draw(u32), extra=draw(blobs))
    return RegionInfoBody.build(
        index=draw(u32),
        flags=draw(u32),
        size=draw(u64),
        offset=draw(u64),
        caps=tuple(draw(st.lists(region_caps, max_size=3))),
        argsz=draw(st.none() | u32),
    )


@st.composite
def region_io_fds_bodies(draw: st.DrawFn) -> RegionIoFdsBody:
    if draw(st.booleans()):
        return RegionIoFdsBody(draw(u32), draw(u32), draw(u32), draw(u32))
    entry_size = draw(st.sampled_from([40, 48]))
    shadow = (u32, u64) if entry_size == 48 else (st.just(0), st.just(0))
    entry = st.builds(IoFdEntry, u64, u64, u32, u32, u32, *shadow, u64)
    return RegionIoFdsBody.build(
        index=draw(u32),
        entries=tuple(draw(st.lists(entry, max_size=3))),
        entry_size=entry_size,
        argsz=draw(st.none() | u32),
    )


@st.composite
def irq_set_bodies(draw: st.DrawFn) -> IrqSetBody:
    flags = draw(u32)
    argsz, index, start = draw(u32), draw(u32), draw(u32)
    if flags & IrqSetFlags.DATA_BOOL:
        count, data, trailing = data_with_count(draw, 2**32 - 1)
        return IrqSetBody(argsz, flags, index, start, count, data, trailing)
    return IrqSetBody(argsz, flags, index, start, draw(u32), b"", draw(blobs))


@st.composite
def dma_access_bodies(draw: st.DrawFn, layout: DmaLayout) -> DmaAccessBody:
    count_max = 2**64 - 1 if layout is DmaLayout.SPEC else 2**32 - 1
    count, data, trailing = data_with_count(draw, count_max)
    return DmaAccessBody(draw(u64), count, data, trailing, layout)


@st.composite
def write_multi_bodies(draw: st.DrawFn) -> RegionWriteMultiBody:
    writes = tuple(
        draw(
            st.lists(
                st.builds(MultiWrite, u64, u32, u32, st.binary(min_size=8, max_size=8)), max_size=4
            )
        )
    )
    if draw(st.booleans()):
        return RegionWriteMultiBody(len(writes), writes, draw(blobs))
    # wr_cnt promises more writes than arrived: what is left is too short for one
    promised = draw(st.integers(len(writes) + 1, 2**64 - 1))
    return RegionWriteMultiBody(promised, writes, draw(st.binary(max_size=23)))


feature_data_for = {
    Feature.MIGRATION: st.builds(MigrationFeatureData, u64),
    Feature.MIG_DEVICE_STATE: st.builds(DeviceStateData, u32, u32),
    Feature.DMA_LOGGING_START: st.lists(st.builds(DmaRange, u64, u64), max_size=3).flatmap(
        lambda ranges: st.builds(
            DmaLoggingStartData,
            u64,
            st.integers(len(ranges), 2**32 - 1),
            u32,
            st.just(tuple(ranges)),
        )
    ),
    Feature.DMA_LOGGING_REPORT: st.builds(DmaLoggingReportData, u64, u64, u64, blobs),
}
feature_ops = st.sampled_from(
    [FeatureOp.GET, FeatureOp.SET, FeatureOp.PROBE, FeatureOp.GET | FeatureOp.PROBE, 0]
)


@st.composite
def device_feature_bodies(draw: st.DrawFn) -> DeviceFeatureBody:
    ops = draw(feature_ops)
    argsz = draw(st.none() | u32)
    if draw(st.booleans()):
        feature = draw(st.sampled_from(sorted(feature_data_for)))
        return DeviceFeatureBody.build(feature, ops, draw(feature_data_for[feature]), argsz=argsz)
    return DeviceFeatureBody.build(draw(st.integers(1, 0xFFFF)), ops, draw(blobs), argsz=argsz)


@st.composite
def mig_data_bodies(draw: st.DrawFn) -> MigDataBody:
    size, data, trailing = data_with_count(draw, 2**32 - 1)
    return MigDataBody(draw(u32), size, data, trailing)


BODIES: dict[type, st.SearchStrategy[Any]] = {
    EmptyBody: st.builds(EmptyBody, blobs),
    ErrorBody: st.builds(ErrorBody, blobs),
    VersionBody: version_bodies(),
    DmaMapBody: st.builds(DmaMapBody, u32, u32, u64, u64, u64, blobs),
    DmaUnmapBody: dma_unmap_bodies(),
    DeviceInfoBody: st.builds(DeviceInfoBody, u32, u32, u32, u32, blobs),
    RegionInfoBody: region_info_bodies(),
    RegionIoFdsBody: region_io_fds_bodies(),
    IrqInfoBody: st.builds(IrqInfoBody, u32, u32, u32, u32, blobs),
    IrqSetBody: irq_set_bodies(),
    RegionAccessBody: st.builds(RegionAccessBody, u64, u32, u32, st.binary(max_size=64)),
    RegionWriteMultiBody: write_multi_bodies(),
    WriteMultiReplyBody: st.builds(WriteMultiReplyBody, u64, blobs),
    DeviceFeatureBody: device_feature_bodies(),
    MigDataBody: mig_data_bodies(),
}

#: (command, is_reply) pairs each body class is the decoded form of
CARRIERS: dict[type, list[tuple[Command, bool]]] = {
    EmptyBody: [
        (Command.DEVICE_RESET, False),
        (Command.DEVICE_RESET, True),
        (Command.DMA_MAP, True),
        (Command.DEVICE_SET_IRQS, True),
        (Command.MIG_DATA_WRITE, True),
    ],
    VersionBody: [(Command.VERSION, False), (Command.VERSION, True)],
    DmaMapBody: [(Command.DMA_MAP, False)],
    DmaUnmapBody: [(Command.DMA_UNMAP, False), (Command.DMA_UNMAP, True)],
    DeviceInfoBody: [(Command.DEVICE_GET_INFO, False), (Command.DEVICE_GET_INFO, True)],
    RegionInfoBody: [
        (Command.DEVICE_GET_REGION_INFO, False),
        (Command.DEVICE_GET_REGION_INFO, True),
    ],
    RegionIoFdsBody: [
        (Command.DEVICE_GET_REGION_IO_FDS, False),
        (Command.DEVICE_GET_REGION_IO_FDS, True),
    ],
    IrqInfoBody: [(Command.DEVICE_GET_IRQ_INFO, False), (Command.DEVICE_GET_IRQ_INFO, True)],
    IrqSetBody: [(Command.DEVICE_SET_IRQS, False)],
    RegionAccessBody: [
        (Command.REGION_READ, False),
        (Command.REGION_READ, True),
        (Command.REGION_WRITE, False),
        (Command.REGION_WRITE, True),
    ],
    RegionWriteMultiBody: [(Command.REGION_WRITE_MULTI, False)],
    WriteMultiReplyBody: [(Command.REGION_WRITE_MULTI, True)],
    DeviceFeatureBody: [(Command.DEVICE_FEATURE, False), (Command.DEVICE_FEATURE, True)],
    MigDataBody: [
        (Command.MIG_DATA_READ, False),
        (Command.MIG_DATA_READ, True),
        (Command.MIG_DATA_WRITE, False),
    ],
}


def sender_of(command: int, is_reply: bool) -> Side:
    server_sent_command = command in SERVER_COMMANDS
    return Side.SERVER if server_sent_command != is_reply else Side.CLIENT


def make_message(
    command: int, is_reply: bool, body: Body, msg_id: int, fds: tuple[int, ...], no_reply: bool
) -> Message:
    if is_reply:
        return build_reply(Header(msg_id, command, HEADER_SIZE), body, fds=fds)
    return build_command(command, msg_id, body, fds=fds, no_reply=no_reply)


def assert_round_trips(message: Message, *, dialects: Dialects = DEFAULT_DIALECTS) -> Message:
    """encode -> decode (strict) gives the same message, which re-encodes to the same bytes."""
    raw, fds = encode(message)
    assert len(raw) == message.header.size
    assert fds == message.fds
    sender = sender_of(message.command, message.is_reply)
    decoded = decode(raw, fds, sender=sender, dialects=dialects, strict=True)
    assert decoded == message
    assert type(decoded.body) is type(message.body)
    assert encode(decoded) == (raw, fds)
    return decoded


def decoded_views(body: Any) -> Any:
    """The parts of a body that equality ignores because they derive from its bytes."""
    if isinstance(body, VersionBody):
        return body.capabilities
    if isinstance(body, RegionInfoBody):
        return body.caps
    if isinstance(body, RegionIoFdsBody):
        return body.entries, body.entry_size if body.entries else 0
    if isinstance(body, DeviceFeatureBody):
        return body.feature_data
    return None


# --------------------------------------------------------------------- round trips


def test_every_body_class_has_a_strategy() -> None:
    body_classes = {
        obj
        for obj in vars(bodies_module).values()
        if isinstance(obj, type)
        and obj.__module__ == "vfioproxy.protocol.bodies"
        and hasattr(obj, "serialize")
        and obj.__name__.endswith("Body")
    }
    assert body_classes - {Body, RawBody, DmaAccessBody} == set(BODIES)


@pytest.mark.parametrize(
    "body_class", [c for c in BODIES if c is not ErrorBody], ids=lambda c: c.__name__
)
@PROPERTY
@given(data=st.data(), msg_id=u16, fds=fd_tuples, no_reply=st.booleans())
def test_body_in_a_message_round_trips_through_encode_and_decode(
    body_class: type, data: st.DataObject, msg_id: int, fds: tuple[int, ...], no_reply: bool
) -> None:
    body = data.draw(BODIES[body_class])
    command, is_reply = data.draw(st.sampled_from(CARRIERS[body_class]))
    message = make_message(command, is_reply, body, msg_id, fds, no_reply)
    decoded = assert_round_trips(message)
    assert decoded_views(decoded.body) == decoded_views(body)


@pytest.mark.parametrize("layout", list(DmaLayout), ids=lambda layout: layout.value)
@PROPERTY
@given(
    data=st.data(),
    command=st.sampled_from([Command.DMA_READ, Command.DMA_WRITE]),
    is_reply=st.booleans(),
    msg_id=u16,
)
def test_dma_access_body_round_trips_in_the_sender_layout(
    layout: DmaLayout, data: st.DataObject, command: Command, is_reply: bool, msg_id: int
) -> None:
    body = data.draw(dma_access_bodies(layout))
    message = make_message(command, is_reply, body, msg_id, (), False)
    other = DmaLayout.SPEC if layout is DmaLayout.QEMU else DmaLayout.QEMU
    # only the sender's dialect may matter
    if sender_of(command, is_reply) is Side.CLIENT:
        dialects = Dialects(client=layout, server=other)
    else:
        dialects = Dialects(client=other, server=layout)
    decoded = assert_round_trips(message, dialects=dialects)
    assert isinstance(decoded.body, DmaAccessBody) and decoded.body.layout is layout


@PROPERTY
@given(command=st.integers(0, 0xFFFF), msg_id=u16, errno=u32, body=BODIES[ErrorBody])
def test_error_reply_round_trips_with_any_errno_and_payload(
    command: int, msg_id: int, errno: int, body: ErrorBody
) -> None:
    message = build_error_reply(Header(msg_id, command, HEADER_SIZE), errno, body.payload)
    assert message.header.flags == 0x21 and message.header.error == errno
    assert message.body == body
    raw, _ = encode(message)
    assert raw == message.header.pack() + body.payload
    for sender in Side:
        decoded = decode(raw, sender=sender, strict=True)
        assert decoded == message
        assert encode(decoded)[0] == raw


@PROPERTY
@given(command=st.sampled_from([0, 14, 19, 20, 99, 0xFFFF]), is_reply=st.booleans(), data=blobs)
def test_raw_body_of_an_unknown_command_keeps_its_bytes(
    command: int, is_reply: bool, data: bytes
) -> None:
    body = RawBody(data)
    message = make_message(command, is_reply, body, 1, (), False)
    raw, _ = encode(message)
    assert raw == message.header.pack() + data
    decoded = decode(raw)
    assert decoded.header == message.header
    assert isinstance(decoded.body, RawBody) and decoded.body.data == data
    assert encode(decoded)[0] == raw


@PROPERTY
@given(body=device_feature_bodies(), msg_id=u16)
def test_device_feature_reply_without_an_index_takes_its_feature_from_the_request(
    body: DeviceFeatureBody, msg_id: int
) -> None:
    request = build_command(Command.DEVICE_FEATURE, msg_id, body)
    reply = build_reply(request, DeviceFeatureBody(body.argsz, body.ops, body.data))
    raw, _ = encode(reply)
    decoded = decode(raw, sender=Side.SERVER, request=request, strict=True)
    assert isinstance(decoded.body, DeviceFeatureBody)
    assert decoded.body.feature_data == body.feature_data


@PROPERTY
@given(caps=st.none() | capabilities, style=st.sampled_from(["compact", "qemu", "json-c"]))
def test_version_body_build_serializes_json_that_parses_back_to_the_same_capabilities(
    caps: Capabilities | None, style: str
) -> None:
    body = VersionBody.build(0, 0, caps, style=style)
    parsed = VersionBody.parse(body.serialize())
    assert parsed == body
    assert parsed.capabilities == caps
    assert parsed.document == body.document


# --------------------------------------------------------------------- never lose data


def valid_payloads(command: int) -> st.SearchStrategy[bytes]:
    """Serialized bodies that fit ``command`` (as command or reply), to mutate."""
    classes = [c for c, carriers in CARRIERS.items() if any(cmd == command for cmd, _ in carriers)]
    strategies = [BODIES[c] for c in classes]
    if command in (Command.DMA_READ, Command.DMA_WRITE):
        strategies += [dma_access_bodies(layout) for layout in DmaLayout]
    if not strategies:
        return st.binary(max_size=64)
    return st.one_of(strategies).map(lambda body: body.serialize())


@st.composite
def payloads(draw: st.DrawFn, command: int) -> bytes:
    """Arbitrary bytes, or a valid body cut short, extended or with bytes overwritten."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=160))
    payload = bytearray(draw(valid_payloads(command)))
    action = draw(st.sampled_from(["truncate", "extend", "overwrite"]))
    if action == "truncate":
        del payload[draw(st.integers(0, len(payload))) :]
    elif action == "extend":
        payload += draw(st.binary(min_size=1, max_size=32))
    elif payload:
        for _ in range(draw(st.integers(1, 4))):
            payload[draw(st.integers(0, len(payload) - 1))] = draw(u8)
    return bytes(payload)


#: flag bits on top of the type nibble: none, no_reply, error, both, or anything
extra_flag_bits = st.sampled_from([0x0, 0x10, 0x20, 0x30]) | u32.map(lambda f: f & ~0xF)
#: any flag word, invalid type nibbles included
flag_words = st.sampled_from([0x0, 0x1, 0x10, 0x21, 0x2, 0xF]) | u32


def raw_message(command: int, flags: int, msg_id: int, error: int, payload: bytes) -> bytes:
    return Header(msg_id, command, HEADER_SIZE + len(payload), flags, error).pack() + payload


def decode_args(draw: Callable[[st.SearchStrategy[Any]], Any]) -> dict[str, Any]:
    return {
        "sender": draw(st.none() | st.sampled_from(list(Side))),
        "dialects": Dialects(
            client=draw(st.sampled_from(list(DmaLayout))),
            server=draw(st.sampled_from(list(DmaLayout))),
        ),
    }


@pytest.mark.parametrize("kind", [MessageType.COMMAND, MessageType.REPLY], ids=["cmd", "reply"])
@pytest.mark.parametrize("command", range(21))
@PROPERTY
@given(data=st.data(), bits=extra_flag_bits, msg_id=u16, error=u32)
def test_decode_never_loses_a_byte_and_strict_decode_raises_only_remote_protocol_error(
    command: int, kind: MessageType, data: st.DataObject, bits: int, msg_id: int, error: int
) -> None:
    raw = raw_message(command, kind | bits, msg_id, error, data.draw(payloads(command)))
    args = decode_args(data.draw)
    message = decode(raw, **args)
    assert message.header == Header.parse(raw)
    assert encode(message)[0] == raw
    assert isinstance(message.describe(), str)
    assert_strict_decode_agrees_with_loose_decode(raw, args)


@PROPERTY
@given(data=st.data(), command=st.integers(0, 20), flags=flag_words, msg_id=u16, error=u32)
def test_any_flag_word_is_decoded_or_rejected_without_losing_a_byte(
    data: st.DataObject, command: int, flags: int, msg_id: int, error: int
) -> None:
    raw = raw_message(command, flags, msg_id, error, data.draw(payloads(command)))
    args = decode_args(data.draw)
    assert encode(decode(raw, **args))[0] == raw
    assert_strict_decode_agrees_with_loose_decode(raw, args)


def assert_strict_decode_agrees_with_loose_decode(raw: bytes, args: dict[str, Any]) -> None:
    try:
        message = decode(raw, strict=True, **args)
    except RemoteProtocolError as exc:
        loose = decode(raw, **args)
        assert not loose.decoded
        assert isinstance(loose.body, RawBody) and loose.body.data == raw[HEADER_SIZE:]
        assert exc.field is not None
        return
    assert message.decoded
    assert encode(message)[0] == raw
    assert decode(raw, **args) == message


@PROPERTY
@given(data=st.data(), command=st.integers(0, 20), extra=st.integers(-HEADER_SIZE, 64))
def test_a_header_size_that_disagrees_with_the_length_never_loses_a_byte(
    data: st.DataObject, command: int, extra: int
) -> None:
    payload = data.draw(payloads(command))
    raw = raw_message(command, data.draw(flag_words), 1, 0, payload)
    size = max(0, len(raw) + extra)
    raw = attrs.evolve(Header.parse(raw), size=size).pack() + payload
    message = decode(raw)
    assert encode(message)[0] == raw
    if size != len(raw):
        assert not message.decoded
        with pytest.raises(RemoteProtocolError):
            decode(raw, strict=True)


def test_serialize_feature_data_and_build_agree_on_the_bytes() -> None:
    data = DmaLoggingStartData(0x1000, 1, 0, (DmaRange(0x2000, 0x3000),))
    body = DeviceFeatureBody.build(Feature.DMA_LOGGING_START, FeatureOp.SET, data)
    assert body.data == serialize_feature_data(data)
    assert body.argsz == 8 + len(body.data) == 40
    assert body.feature_data == data


# --------------------------------------------------------------------- building


@PROPERTY
@given(flags=u32, caps=st.lists(region_caps, min_size=1, max_size=2), index=u32)
def test_region_info_build_cut_short_by_argsz_clears_only_the_caps_flag(
    flags: int, caps: list[Any], index: int
) -> None:
    body = RegionInfoBody.build(index=index, flags=flags, size=0x1000, caps=tuple(caps), argsz=32)
    assert body.extra == b"" and body.cap_offset == 0 and body.caps == ()
    assert body.argsz == 32 + len(
        RegionInfoBody.build(index=index, flags=flags, size=0x1000, caps=tuple(caps)).extra
    )
    assert body.flags == flags & ~0x8


@PROPERTY
@given(data=st.binary(min_size=9, max_size=16))
def test_multi_write_with_more_than_8_data_bytes_is_refused_rather_than_cut(data: bytes) -> None:
    body = RegionWriteMultiBody(1, (MultiWrite(0x10, 0, 8, data),))
    try:
        message = build_command(Command.REGION_WRITE_MULTI, 1, body, no_reply=True)
        raw, _ = encode(message)
    except LocalProtocolError:
        return
    decoded = decode(raw, strict=True)
    assert decoded.body == body, "data bytes were dropped without an error"


@pytest.mark.parametrize(
    ("command", "body"),
    [
        (Command.DMA_MAP, DmaMapBody(2**32, 0, 0, 0, 0)),
        (Command.DMA_MAP, DmaMapBody(32, 0, -1, 0, 0)),
        (Command.REGION_READ, RegionAccessBody(2**64, 0, 0)),
        (Command.DEVICE_FEATURE, DeviceFeatureBody(8, 2**32)),
        (Command.MIG_DATA_WRITE, MigDataBody(8, -1)),
    ],
    ids=["argsz-2**32", "negative-offset", "offset-2**64", "flags-2**32", "negative-size"],
)
def test_building_a_body_with_a_field_out_of_range_is_a_local_protocol_error(
    command: Command, body: Body
) -> None:
    with pytest.raises(LocalProtocolError):
        encode(build_command(command, 1, body))
