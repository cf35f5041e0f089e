"""The codec against real vfio-user traffic (the captures bundled in ``traces/``).

Every captured message must decode without a raw fallback and re-encode to
the very bytes that crossed the wire; the facts the captures' README states
about particular messages are checked on the decoded fields.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import pytest

from tests.realdata import TRACES, capture_files, capture_records
from vfioproxy.protocol.bodies import (
    DeviceFeatureBody,
    DeviceStateData,
    DmaAccessBody,
    DmaLayout,
    DmaLoggingReportData,
    DmaUnmapBody,
    EmptyBody,
    ErrorBody,
    IrqSetBody,
    MigDataBody,
    RegionAccessBody,
    RegionInfoBody,
    SparseMmapArea,
    SparseMmapCap,
    VersionBody,
)
from vfioproxy.protocol.codec import Dialects, Message, decode, detect_client_dma_layout, encode
from vfioproxy.protocol.constants import (
    DmaUnmapFlags,
    Feature,
    FeatureOp,
    IrqIndex,
    IrqSetFlags,
    MigrationState,
    RegionFlags,
)
from vfioproxy.protocol.header import Command
from vfioproxy.side import Side

CAPTURES = capture_files()
QEMU_CAPTURES = [p for p in CAPTURES if p.name.startswith("qemu-")]
QEMU_REALIZE_CAPTURES = [p for p in CAPTURES if p.name.startswith("qemu-realize-")]
QEMU_SERVER_CAPTURES = [p for p in QEMU_CAPTURES if "-qemu-server-" in p.name]
LIBVFIO_USER_CAPTURES = [p for p in CAPTURES if p.name.startswith("libvfio-user-client-server-")]
SOURCE_CAPTURES = [p for p in LIBVFIO_USER_CAPTURES if "-migrated-" not in p.name]
MIGRATED_CAPTURES = [p for p in LIBVFIO_USER_CAPTURES if "-migrated-" in p.name]
#: QEMU realize sessions whose server is a libvfio-user sample (samples/server, gpio)
QEMU_LIBVFIO_USER_SERVER_CAPTURES = [
    p for p in QEMU_REALIZE_CAPTURES if p not in QEMU_SERVER_CAPTURES
]
#: sessions whose samples/server has the sparse-mmapped BAR1
BAR1_CAPTURES = [
    *SOURCE_CAPTURES,
    *(p for p in QEMU_REALIZE_CAPTURES if "libvfio-user-server" in p.name),
]

QEMU_VERSION_JSON = (
    b'{"capabilities": {"pgsizes": 4096, "max_msg_fds": 16, "max_dma_maps": 65535, '
    b'"max_data_xfer_size": 1048576, "migration": {"max_bitmap_size": 268435456, '
    b'"pgsize": 4096}, "write_multiple": true}}'
)
LIBVFIO_USER_VERSION_JSON = (
    b'{ "capabilities": { "max_msg_fds": 8, "max_data_xfer_size": 1048576, '
    b'"migration": { "pgsize": 4096 } } }'
)
SAMPLE_CLIENT_VERSION_JSON = b'{"capabilities":{"max_msg_fds":32,"max_data_xfer_size":1024}}'
QEMU_SERVER_VERSION_JSON = b'{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576}}'


def names(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


@dataclasses.dataclass(frozen=True)
class Record:
    """One captured message: where it sat in the file, its bytes, fds and decoding."""

    position: int
    direction: str
    raw: bytes
    fds: tuple[dict[str, Any], ...]
    message: Message


def read_records(path: Path) -> list[dict[str, Any]]:
    return capture_records(path)


def sender_of(direction: str) -> Side:
    return Side.CLIENT if direction == "c2s" else Side.SERVER


def dialects_of(records: list[dict[str, Any]]) -> Dialects:
    first = records[0]
    assert first["dir"] == "c2s"
    version = decode(bytes.fromhex(first["hex"]), sender=Side.CLIENT, strict=True)
    assert isinstance(version.body, VersionBody)
    return Dialects(client=detect_client_dma_layout(version.body))


@functools.cache
def capture(path: Path) -> tuple[Record, ...]:
    """Every message of a capture, decoded (non-strict) with the detected dialects."""
    records = read_records(path)
    dialects = dialects_of(records)
    out = []
    for position, rec in enumerate(records):
        raw = bytes.fromhex(rec["hex"])
        fds = tuple(rec["fds"])
        message = decode(raw, fds, sender=sender_of(rec["dir"]), dialects=dialects)
        out.append(Record(position, rec["dir"], raw, fds, message))
    return tuple(out)


def select(path: Path, command: Command, *, reply: bool) -> list[Record]:
    return [
        r for r in capture(path) if r.message.command == command and r.message.is_reply == reply
    ]


def reply_to(path: Path, command: Record) -> Record:
    """The first reply after ``command`` with its id and command, travelling the other way."""
    for r in capture(path)[command.position + 1 :]:
        m = r.message
        if (
            m.is_reply
            and m.msg_id == command.message.msg_id
            and m.command == command.message.command
            and r.direction != command.direction
        ):
            return r
    raise AssertionError(f"no reply to {command.message.describe()}")


def by_name(stem: str) -> Path:
    path = TRACES / f"{stem}.trace"
    assert path.exists(), path
    return path


# --------------------------------------------------------------------- every message


def test_the_capture_directory_holds_qemu_and_libvfio_user_sessions_only() -> None:
    assert len(SOURCE_CAPTURES) == len(MIGRATED_CAPTURES) >= 1
    assert QEMU_REALIZE_CAPTURES and QEMU_SERVER_CAPTURES
    assert sorted(QEMU_CAPTURES + LIBVFIO_USER_CAPTURES) == CAPTURES


@pytest.mark.parametrize("path", CAPTURES, ids=names(CAPTURES))
def test_every_captured_message_decodes_without_raw_fallback(path: Path) -> None:
    undecoded = [
        f"#{r.position} {r.direction} {r.message.describe()}"
        for r in capture(path)
        if not r.message.decoded
    ]
    assert undecoded == []


@pytest.mark.parametrize("path", CAPTURES, ids=names(CAPTURES))
def test_every_captured_message_re_encodes_byte_for_byte_with_its_fds(path: Path) -> None:
    for r in capture(path):
        data, fds = encode(r.message)
        assert data == r.raw, f"#{r.position} {r.message.describe()}"
        assert fds == r.fds


@pytest.mark.parametrize("path", CAPTURES, ids=names(CAPTURES))
def test_every_captured_message_also_decodes_in_strict_mode(path: Path) -> None:
    records = read_records(path)
    dialects = dialects_of(records)
    for rec in records:
        raw = bytes.fromhex(rec["hex"])
        message = decode(raw, sender=sender_of(rec["dir"]), dialects=dialects, strict=True)
        assert message.header.size == len(raw)


@pytest.mark.parametrize("path", CAPTURES, ids=names(CAPTURES))
def test_client_dma_layout_is_detected_from_the_first_version_command(path: Path) -> None:
    records = read_records(path)
    first = decode(bytes.fromhex(records[0]["hex"]), sender=Side.CLIENT, strict=True)
    assert first.command == Command.VERSION and not first.is_reply
    assert isinstance(first.body, VersionBody)
    expected = DmaLayout.QEMU if path in QEMU_CAPTURES else DmaLayout.SPEC
    assert path in QEMU_CAPTURES or path in LIBVFIO_USER_CAPTURES
    assert detect_client_dma_layout(first.body) is expected


# --------------------------------------------------------------------- VERSION


@pytest.mark.parametrize("path", QEMU_CAPTURES, ids=names(QEMU_CAPTURES))
def test_qemu_version_command_offers_its_capability_set(path: Path) -> None:
    (version,) = select(path, Command.VERSION, reply=False)
    body = version.message.body
    assert isinstance(body, VersionBody)
    assert len(version.raw) == 214
    assert version.message.header.flags == 0 and version.message.msg_id == 0
    assert (body.major, body.minor) == (0, 0)
    assert body.json_text == QEMU_VERSION_JSON
    assert body.nul_terminated and body.trailing == b""
    caps = body.capabilities
    assert caps is not None
    assert caps.max_msg_fds == 16
    assert caps.pgsizes == 4096
    assert caps.max_dma_maps == 65535
    assert caps.max_data_xfer_size == 1048576
    assert caps.migration is not None
    assert caps.migration.pgsize == 4096
    assert caps.migration.max_bitmap_size == 268435456
    assert caps.migration.extra == {}
    assert caps.write_multiple is True
    assert caps.twin_socket is None
    assert caps.extra == {}


@pytest.mark.parametrize(
    "path", QEMU_LIBVFIO_USER_SERVER_CAPTURES, ids=names(QEMU_LIBVFIO_USER_SERVER_CAPTURES)
)
def test_libvfio_user_version_reply_to_qemu_keeps_0_0_and_lists_its_own_capabilities(
    path: Path,
) -> None:
    (version,) = select(path, Command.VERSION, reply=True)
    body = version.message.body
    assert isinstance(body, VersionBody)
    assert len(version.raw) == 125
    assert (body.major, body.minor) == (0, 0)
    assert body.json_text == LIBVFIO_USER_VERSION_JSON
    caps = body.capabilities
    assert caps is not None
    assert caps.max_msg_fds == 8
    assert caps.max_data_xfer_size == 1048576
    assert caps.migration is not None
    assert caps.migration.pgsize == 4096
    assert caps.migration.max_bitmap_size is None
    assert caps.write_multiple is None
    assert caps.pgsizes is None and caps.max_dma_maps is None


@pytest.mark.parametrize("path", LIBVFIO_USER_CAPTURES, ids=names(LIBVFIO_USER_CAPTURES))
def test_libvfio_user_sample_handshake_is_version_0_2_with_both_capability_sets(
    path: Path,
) -> None:
    (command,) = select(path, Command.VERSION, reply=False)
    (reply,) = select(path, Command.VERSION, reply=True)
    assert isinstance(command.message.body, VersionBody)
    assert isinstance(reply.message.body, VersionBody)
    assert (command.message.body.major, command.message.body.minor) == (0, 2)
    assert (reply.message.body.major, reply.message.body.minor) == (0, 2)
    assert command.message.body.json_text == SAMPLE_CLIENT_VERSION_JSON
    assert reply.message.body.json_text == LIBVFIO_USER_VERSION_JSON
    client_caps = command.message.body.capabilities
    assert client_caps is not None
    assert (client_caps.max_msg_fds, client_caps.max_data_xfer_size) == (32, 1024)
    assert client_caps.migration is None
    server_caps = reply.message.body.capabilities
    assert server_caps is not None
    assert (server_caps.max_msg_fds, server_caps.max_data_xfer_size) == (8, 1048576)
    assert server_caps.migration is not None and server_caps.migration.pgsize == 4096


@pytest.mark.parametrize("path", QEMU_SERVER_CAPTURES, ids=names(QEMU_SERVER_CAPTURES))
def test_qemu_own_server_replies_without_migration_or_write_multiple(path: Path) -> None:
    (reply,) = select(path, Command.VERSION, reply=True)
    body = reply.message.body
    assert isinstance(body, VersionBody)
    assert body.json_text == QEMU_SERVER_VERSION_JSON
    caps = body.capabilities
    assert caps is not None
    assert (caps.max_msg_fds, caps.max_data_xfer_size) == (8, 1048576)
    assert caps.migration is None and caps.write_multiple is None


# --------------------------------------------------------------------- region info


@pytest.mark.parametrize("path", BAR1_CAPTURES, ids=names(BAR1_CAPTURES))
def test_bar1_region_info_is_asked_twice_and_only_the_long_reply_has_caps_and_fd(
    path: Path,
) -> None:
    replies = [
        r
        for r in select(path, Command.DEVICE_GET_REGION_INFO, reply=True)
        if isinstance(r.message.body, RegionInfoBody) and r.message.body.index == 1
    ]
    short, full = replies

    body = short.message.body
    assert isinstance(body, RegionInfoBody)
    assert len(short.raw) == 48
    assert body.argsz == 80
    assert body.flags == RegionFlags.READ | RegionFlags.WRITE | RegionFlags.MMAP == 0x7
    assert body.cap_offset == 0 and body.caps == () and body.extra == b""
    assert body.size == 0x4000
    assert short.fds == ()

    body = full.message.body
    assert isinstance(body, RegionInfoBody)
    assert len(full.raw) == 96
    assert body.argsz == 80
    assert body.flags == 0xF
    assert body.cap_offset == 32
    assert (body.size, body.offset) == (0x4000, 0)
    assert body.caps == (
        SparseMmapCap((SparseMmapArea(0, 0x1000), SparseMmapArea(0x2000, 0x1000))),
    )
    (fd,) = full.fds
    assert fd["kind"] == "file" and fd["size"] == 16384
    assert full.message.fds == full.fds


@pytest.mark.parametrize("path", SOURCE_CAPTURES, ids=names(SOURCE_CAPTURES))
def test_sample_client_pads_its_second_bar1_region_info_command_to_argsz(path: Path) -> None:
    commands = [
        r
        for r in select(path, Command.DEVICE_GET_REGION_INFO, reply=False)
        if isinstance(r.message.body, RegionInfoBody) and r.message.body.index == 1
    ]
    first, second = commands
    assert len(first.raw) == 48
    assert len(second.raw) == 96
    body = second.message.body
    assert isinstance(body, RegionInfoBody)
    assert body.argsz == 80 and len(body.extra) == 48 and body.caps == ()


# --------------------------------------------------------------------- errors and region I/O


@pytest.mark.parametrize("path", SOURCE_CAPTURES, ids=names(SOURCE_CAPTURES))
def test_bogus_region_read_gets_a_header_only_einval_reply(path: Path) -> None:
    command = select(path, Command.REGION_READ, reply=False)[0]
    assert isinstance(command.message.body, RegionAccessBody)
    assert command.message.body.region == 0xDEADBEEF
    reply = reply_to(path, command)
    header = reply.message.header
    assert len(reply.raw) == 16
    assert header.flags == 0x21 and header.is_error and header.is_reply
    assert header.error == 22
    assert reply.message.body == ErrorBody(b"")
    errors = [r for r in capture(path) if r.message.is_error]
    assert errors == [reply]


@pytest.mark.parametrize("path", CAPTURES, ids=names(CAPTURES))
def test_region_write_replies_echo_offset_region_and_count_without_data(path: Path) -> None:
    for command in select(path, Command.REGION_WRITE, reply=False):
        if command.message.header.no_reply:
            continue
        reply = reply_to(path, command)
        sent, echoed = command.message.body, reply.message.body
        assert isinstance(sent, RegionAccessBody) and isinstance(echoed, RegionAccessBody)
        assert (echoed.offset, echoed.region, echoed.count) == (
            sent.offset,
            sent.region,
            sent.count,
        )
        assert echoed.data == b"" and len(reply.raw) == 32


# --------------------------------------------------------------------- migration


@pytest.mark.parametrize("path", SOURCE_CAPTURES, ids=names(SOURCE_CAPTURES))
def test_mig_data_read_request_announces_1_kib_but_carries_no_data(path: Path) -> None:
    requests = select(path, Command.MIG_DATA_READ, reply=False)
    assert len(requests) == 33
    for request in requests:
        assert len(request.raw) == 24
        assert request.message.body == MigDataBody(argsz=0x408, size=1024, data=b"", trailing=b"")


@pytest.mark.parametrize("path", SOURCE_CAPTURES, ids=names(SOURCE_CAPTURES))
def test_final_stop_copy_mig_data_read_reply_has_8_data_bytes_and_zero_padding(
    path: Path,
) -> None:
    replies = select(path, Command.MIG_DATA_READ, reply=True)
    *full, last = replies
    for reply in full:
        body = reply.message.body
        assert isinstance(body, MigDataBody)
        assert (body.argsz, body.size, len(body.data), body.trailing) == (0x408, 1024, 1024, b"")
    body = last.message.body
    assert isinstance(body, MigDataBody)
    assert len(last.raw) == 1048
    assert (body.argsz, body.size) == (16, 8)
    assert len(body.data) == 8
    assert body.trailing == bytes(1016)


@pytest.mark.parametrize("path", SOURCE_CAPTURES, ids=names(SOURCE_CAPTURES))
def test_migration_stream_read_at_the_source_is_written_at_the_destination(path: Path) -> None:
    migrated = path.with_name(path.name.replace("-server-", "-server-migrated-"))
    read: list[bytes] = []
    for r in select(path, Command.MIG_DATA_READ, reply=True):
        assert isinstance(r.message.body, MigDataBody)
        read.append(r.message.body.data)
    written: list[bytes] = []
    for r in select(migrated, Command.MIG_DATA_WRITE, reply=False):
        assert isinstance(r.message.body, MigDataBody)
        assert r.message.body.trailing == b""
        written.append(r.message.body.data)
    # the destination is sent the 17 chunks read after STOP_COPY
    assert written == read[16:]
    for r in select(migrated, Command.MIG_DATA_WRITE, reply=True):
        assert r.message.body == EmptyBody()


def device_states(path: Path) -> list[tuple[MigrationState, MigrationState]]:
    """(requested, echoed) device_state of each MIG_DEVICE_STATE SET and its reply."""
    out = []
    for command in select(path, Command.DEVICE_FEATURE, reply=False):
        body = command.message.body
        assert isinstance(body, DeviceFeatureBody)
        if body.feature != Feature.MIG_DEVICE_STATE:
            continue
        assert body.ops == FeatureOp.SET
        echoed = reply_to(path, command).message.body
        assert isinstance(echoed, DeviceFeatureBody)
        assert echoed == body
        assert isinstance(body.feature_data, DeviceStateData)
        assert isinstance(echoed.feature_data, DeviceStateData)
        assert body.feature_data.data_fd == 0xFFFFFFFF
        out.append(
            (
                MigrationState(body.feature_data.device_state),
                MigrationState(echoed.feature_data.device_state),
            )
        )
    return out


@pytest.mark.parametrize("path", SOURCE_CAPTURES, ids=names(SOURCE_CAPTURES))
def test_source_walks_pre_copy_stop_copy_stop(path: Path) -> None:
    states = [MigrationState.PRE_COPY, MigrationState.STOP_COPY, MigrationState.STOP]
    assert device_states(path) == [(s, s) for s in states]


@pytest.mark.parametrize("path", MIGRATED_CAPTURES, ids=names(MIGRATED_CAPTURES))
def test_destination_walks_resuming_stop_running(path: Path) -> None:
    states = [MigrationState.RESUMING, MigrationState.STOP, MigrationState.RUNNING]
    assert device_states(path) == [(s, s) for s in states]


@pytest.mark.parametrize("path", SOURCE_CAPTURES, ids=names(SOURCE_CAPTURES))
def test_dma_logging_report_reply_appends_an_8_byte_bitmap(path: Path) -> None:
    reports = [
        r
        for r in select(path, Command.DEVICE_FEATURE, reply=False)
        if isinstance(r.message.body, DeviceFeatureBody)
        and r.message.body.feature == Feature.DMA_LOGGING_REPORT
    ]
    assert len(reports) == 16
    for page, command in enumerate(reports):
        body = command.message.body
        assert isinstance(body, DeviceFeatureBody)
        assert len(command.raw) == 48
        assert (body.argsz, body.flags) == (40, 0x10008)
        assert body.feature_data == DmaLoggingReportData(page * 0x1000, 0x1000, 0x1000, b"")
        reply = reply_to(path, command)
        echoed = reply.message.body
        assert isinstance(echoed, DeviceFeatureBody)
        assert len(reply.raw) == 56
        assert echoed.ops == FeatureOp.GET
        data = echoed.feature_data
        assert isinstance(data, DmaLoggingReportData)
        assert (data.iova, data.length, data.page_size) == (page * 0x1000, 0x1000, 0x1000)
        assert len(data.bitmap) == 8


@pytest.mark.parametrize("path", SOURCE_CAPTURES, ids=names(SOURCE_CAPTURES))
def test_dma_logging_start_is_echoed(path: Path) -> None:
    start = [
        r
        for r in select(path, Command.DEVICE_FEATURE, reply=False)
        if isinstance(r.message.body, DeviceFeatureBody)
        and r.message.body.feature == Feature.DMA_LOGGING_START
    ]
    (command,) = start
    body = command.message.body
    assert isinstance(body, DeviceFeatureBody)
    assert len(command.raw) == 40
    assert (body.argsz, body.flags) == (24, 0x20006)
    assert reply_to(path, command).message.body == body


# --------------------------------------------------------------------- DMA map / unmap


@pytest.mark.parametrize("path", MIGRATED_CAPTURES, ids=names(MIGRATED_CAPTURES))
def test_destination_ends_with_dma_unmap_all(path: Path) -> None:
    command = select(path, Command.DMA_UNMAP, reply=False)[-1]
    assert command.position == len(capture(path)) - 2
    body = command.message.body
    assert body == DmaUnmapBody(argsz=24, flags=DmaUnmapFlags.ALL, iova=0, size=0)
    assert reply_to(path, command).message.body == body


@pytest.mark.parametrize("path", QEMU_REALIZE_CAPTURES, ids=names(QEMU_REALIZE_CAPTURES))
def test_qemu_dma_unmap_reply_echoes_the_24_byte_request(path: Path) -> None:
    (command,) = select(path, Command.DMA_UNMAP, reply=False)
    reply = reply_to(path, command)
    body = command.message.body
    assert body == DmaUnmapBody(argsz=24, flags=0, iova=0, size=0x20000000)
    assert reply.message.body == body
    assert len(reply.raw) == 40
    assert len(reply.message.body.serialize()) == 24


@pytest.mark.parametrize("path", QEMU_REALIZE_CAPTURES, ids=names(QEMU_REALIZE_CAPTURES))
def test_qemu_dma_map_replies_are_header_only(path: Path) -> None:
    replies = select(path, Command.DMA_MAP, reply=True)
    assert len(replies) == 6
    for reply in replies:
        assert reply.message.body == EmptyBody() and len(reply.raw) == 16


# --------------------------------------------------------------------- IRQs


@pytest.mark.parametrize("path", QEMU_REALIZE_CAPTURES, ids=names(QEMU_REALIZE_CAPTURES))
def test_qemu_realize_sets_irqs_with_eventfd_trigger_and_disables_intx_with_none_trigger(
    path: Path,
) -> None:
    eventfd_trigger = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER
    none_trigger = IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER
    assert (eventfd_trigger, none_trigger) == (0x24, 0x21)
    seen = []
    for command in select(path, Command.DEVICE_SET_IRQS, reply=False):
        body = command.message.body
        assert isinstance(body, IrqSetBody)
        assert len(command.raw) == 36 and body.argsz == 20
        assert body.data == b"" and body.trailing == b""
        seen.append((body.flags, body.index, body.start, body.count, len(command.fds)))
        assert reply_to(path, command).message.body == EmptyBody()
    assert seen == [
        (0x24, IrqIndex.INTX, 0, 1, 1),
        (0x24, IrqIndex.ERR, 0, 1, 1),
        (0x21, IrqIndex.INTX, 0, 0, 0),
        (0x24, IrqIndex.INTX, 0, 1, 1),
    ]


def test_nvme_boot_posts_doorbell_writes_with_no_reply_and_unmasks_intx() -> None:
    path = by_name("qemu-boot-qemu-server-nvme-001")
    writes = select(path, Command.REGION_WRITE, reply=False)
    posted = [w for w in writes if w.message.header.flags == 0x10]
    assert posted and all(w.message.header.no_reply for w in posted)
    doorbells = 0
    for w in posted:
        body = w.message.body
        assert isinstance(body, RegionAccessBody)
        assert len(body.data) == body.count
        if body.region == 0 and body.offset in (0x1000, 0x1004):
            doorbells += 1
    assert doorbells == 518
    posted_ids = {w.message.msg_id for w in posted}
    reply_ids = {r.message.msg_id for r in select(path, Command.REGION_WRITE, reply=True)}
    assert posted_ids.isdisjoint(reply_ids)

    unmask = IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_UNMASK
    unmasks = [
        c
        for c in select(path, Command.DEVICE_SET_IRQS, reply=False)
        if isinstance(c.message.body, IrqSetBody) and c.message.body.flags == unmask == 0x11
    ]
    assert len(unmasks) == 202
    for command in unmasks:
        body = command.message.body
        assert isinstance(body, IrqSetBody)
        assert (body.index, body.start, body.count) == (IrqIndex.INTX, 0, 1)
        assert command.fds == ()


def test_e1000e_boot_loads_its_option_rom_in_one_262176_byte_reply() -> None:
    path = by_name("qemu-boot-qemu-server-e1000e-001")
    (rom,) = [r for r in select(path, Command.REGION_READ, reply=True) if len(r.raw) == 262176]
    body = rom.message.body
    assert isinstance(body, RegionAccessBody)
    assert (body.region, body.offset, body.count) == (6, 0, 262144)
    assert len(body.data) == 262144
    assert body.data[:2] == b"\x55\xaa"


# --------------------------------------------------------------------- server-initiated DMA


@pytest.mark.parametrize("path", LIBVFIO_USER_CAPTURES, ids=names(LIBVFIO_USER_CAPTURES))
def test_libvfio_user_server_dma_writes_and_reads_decode_in_spec_layout(path: Path) -> None:
    base = 0x8000 if path in MIGRATED_CAPTURES else 0
    writes = select(path, Command.DMA_WRITE, reply=False)
    reads = select(path, Command.DMA_READ, reply=False)
    assert len(writes) == len(reads) == 4
    for i, (write, read) in enumerate(zip(writes, reads, strict=True)):
        address = base + i * 0x400
        fill = bytes([ord("A") + i]) * 1024
        assert write.direction == "s2c" and read.direction == "s2c"

        assert len(write.raw) == 1056
        assert write.message.body == DmaAccessBody(address, 1024, fill, b"", DmaLayout.SPEC)
        write_reply = reply_to(path, write)
        assert write_reply.direction == "c2s"
        assert len(write_reply.raw) == 32
        assert write_reply.message.body == DmaAccessBody(address, 1024, b"", b"", DmaLayout.SPEC)
        assert len(write_reply.message.body.serialize()) == 16

        assert len(read.raw) == 32
        assert read.message.body == DmaAccessBody(address, 1024, b"", b"", DmaLayout.SPEC)
        read_reply = reply_to(path, read)
        assert len(read_reply.raw) == 1056
        assert read_reply.message.body == DmaAccessBody(address, 1024, fill, b"", DmaLayout.SPEC)
