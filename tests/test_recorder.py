"""The trace format: writer, reader, torn tails, corruption, versions and limits."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import attrs
import msgpack  # type: ignore[import-untyped]
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recorder import migrate
from recorder.errors import TraceFormatError, TraceLimitError, TraceVersionError
from recorder.limits import ReaderLimits
from recorder.reader import TraceReader
from recorder.records import (
    FORMAT_VERSION,
    EventKind,
    EventRecord,
    FdKind,
    FdRecord,
    InvalidField,
    MessageRecord,
    PlainMessagePacker,
    Record,
    TraceHeader,
    message_wire,
)
from recorder.writer import TraceWriter
from tests.realdata import RAWCAP
from vfioproxy.side import Direction

REPO = Path(__file__).resolve().parent.parent
CREATED = datetime(2026, 11, 25, 1, 57, 23, 648112, tzinfo=UTC)


def make_header(**changes: Any) -> TraceHeader:
    header = TraceHeader(
        created=CREATED,
        mono_ns=1_000_000,
        source="vfioproxy record",
        host="testhost",
        info={"listen_path": "/tmp/p.sock", "server_path": "/tmp/d.sock", "options": {"a": 1}},
    )
    return attrs.evolve(header, **changes)


FULL_FD = FdRecord(
    position=0,
    kind=FdKind.MEMFD,
    size=4,
    flags=0o100002,
    seals=0x0F,
    inode=1234,
    contents=b"\x01\x02\x03\x04",
    sha256=bytes(range(32)),
)


def write_sample(path: Path) -> tuple[list[Record], list[int]]:
    """A two-session trace; returns its records and the file offset of each record."""
    offsets = []
    records: list[Record] = []
    with TraceWriter(path, make_header()) as writer:
        for write in (
            lambda: writer.write_event(1, EventKind.SESSION_OPEN, 1_000_100, {"client": "qemu"}),
            lambda: writer.write_message(1, Direction.C2S, 1_000_200, b"\x01" * 16, [FULL_FD]),
            lambda: writer.write_event(None, EventKind.NOTE, 1_000_250, {"text": "proxy-wide"}),
            lambda: writer.write_event(2, EventKind.SESSION_OPEN, 1_000_260),
            lambda: writer.write_message(2, Direction.C2S, 1_000_270, b"\x02" * 40),
            lambda: writer.write_message(1, Direction.S2C, 1_000_300, b"\x03" * 16),
            lambda: writer.write_event(
                1, EventKind.SESSION_CLOSE, 1_000_400, {"closed_by": "client", "reason": "EOF"}
            ),
            lambda: writer.write_message(
                2,
                Direction.S2C,
                1_000_500,
                bytes(range(256)) + b"\xff" * 44,
                [FdRecord(0, FdKind.EVENTFD, flags=2), FdRecord(1, FdKind.FILE, size=65536)],
            ),
        ):
            offsets.append(writer.bytes_written)
            records.append(write())
    return records, offsets


def read_all(path: Path, **kwargs: Any) -> tuple[TraceReader, list[Record]]:
    reader = TraceReader(path, **kwargs)
    with reader:
        return reader, list(reader)


def header_bytes(**wire_changes: Any) -> bytes:
    wire = make_header().to_wire()
    wire.update(wire_changes)
    packed: bytes = msgpack.packb(wire, use_bin_type=True)
    return packed


# --- round trips ---------------------------------------------------------------


def test_every_record_kind_round_trips_through_a_file(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    records, _ = write_sample(path)
    reader, read = read_all(path)
    assert reader.header == make_header()
    assert reader.file_version == FORMAT_VERSION == (1, 1)
    assert read == records
    assert [r.seq for r in read] == list(range(1, 9))
    assert reader.truncated_after is None
    assert reader.truncation is None


def test_an_iteration_can_be_repeated_and_selects_one_session(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    records, _ = write_sample(path)
    with TraceReader(path) as reader:
        assert list(reader) == records
        assert list(reader.for_session(2)) == [r for r in records if r.session == 2]
        summaries = reader.sessions()
    assert [(s.session, s.messages) for s in summaries] == [(1, 2), (2, 2)]
    assert summaries[0].opened == records[0]
    assert summaries[0].closed == records[6]
    assert summaries[1].opened == records[3]
    assert summaries[1].closed is None


def test_the_header_anchors_wall_clock_to_monotonic_time() -> None:
    header = TraceHeader.now("vfioproxy record", {"client": "qemu"})
    assert header.host == socket.gethostname()
    assert header.byte_order == sys.byteorder
    assert header.version == FORMAT_VERSION
    assert abs(header.created - datetime.now(UTC)) < timedelta(seconds=5)
    assert header.wall_time(header.mono_ns) == header.created
    assert header.wall_time(header.mono_ns + 1_500_000) == header.created + timedelta(
        microseconds=1500
    )
    epoch_ns = round(header.created.timestamp() * 1_000_000) * 1000
    assert header.wall_ns(header.mono_ns) == epoch_ns
    assert header.wall_ns(header.mono_ns + 1_500_001) == epoch_ns + 1_500_001  # ns kept
    assert header.wall_ns(header.mono_ns - 7) == epoch_ns - 7


def test_a_message_larger_than_a_read_chunk_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "big.trace"
    data = os.urandom(3 * 1024 * 1024 + 17)
    with TraceWriter(path, make_header()) as writer:
        writer.write_message(1, Direction.S2C, 5, data)
        writer.write_message(1, Direction.C2S, 6, b"after")
    _, read = read_all(path)
    assert [r.data for r in read if isinstance(r, MessageRecord)] == [data, b"after"]


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
_data = st.dictionaries(
    st.text(max_size=10),
    st.recursive(
        _scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=12,
    ),
    max_size=5,
)
_uints = st.integers(min_value=0, max_value=2**64 - 1)
_optional_uints = st.none() | _uints


@st.composite
def _fd_lists(draw: st.DrawFn) -> tuple[FdRecord, ...]:
    positions = sorted(draw(st.sets(st.integers(0, 252), max_size=4)))
    fds = []
    for position in positions:
        contents = draw(st.none() | st.binary(max_size=16))
        size = draw(_optional_uints) if contents is None else len(contents)
        fds.append(
            FdRecord(
                position,
                draw(st.sampled_from(FdKind)),
                size=size,
                flags=draw(_optional_uints),
                seals=draw(_optional_uints),
                inode=draw(_optional_uints),
                contents=contents,
                sha256=draw(st.none() | st.binary(min_size=32, max_size=32)),
            )
        )
    return tuple(fds)


_messages = st.builds(
    MessageRecord,
    seq=_uints,
    session=_uints,
    direction=st.sampled_from(Direction),
    t_ns=_uints,
    data=st.binary(max_size=64),
    fds=_fd_lists(),
)
_events = st.builds(
    EventRecord,
    seq=_uints,
    session=_optional_uints,
    t_ns=_uints,
    kind=st.text(min_size=1, max_size=12),
    data=_data,
)
_headers = st.builds(
    TraceHeader,
    created=st.datetimes(timezones=st.just(UTC)),
    mono_ns=_uints,
    source=st.text(min_size=1, max_size=20),
    host=st.none() | st.text(min_size=1, max_size=20),
    info=_data,
    tool_version=st.text(min_size=1, max_size=8),
    byte_order=st.sampled_from(["little", "big"]),
)


def _through_msgpack(wire: dict[str, Any]) -> Any:
    return msgpack.unpackb(msgpack.packb(wire, use_bin_type=True), raw=False)


@given(_messages)
def test_message_records_round_trip_through_msgpack(record: MessageRecord) -> None:
    assert MessageRecord.from_wire(_through_msgpack(record.to_wire())) == record


@given(_events)
def test_event_records_round_trip_through_msgpack(record: EventRecord) -> None:
    assert EventRecord.from_wire(_through_msgpack(record.to_wire())) == record


@given(_headers)
def test_headers_round_trip_through_msgpack(header: TraceHeader) -> None:
    assert TraceHeader.from_wire(_through_msgpack(header.to_wire())) == header


# --- field validation ------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field", "text"),
    [
        ({"d": "sideways"}, "d (direction)", "expected 'c2s' or 's2c'"),
        ({"q": -1}, "q (seq)", "non-negative integer"),
        ({"s": True}, "s (session)", "non-negative integer"),
        ({"t": "now"}, "t (t_ns)", "non-negative integer"),
        ({"b": "text"}, "b (data)", "expected bytes"),
        ({"f": {}}, "f (fds)", "expected an array"),
        ({"f": [{"i": 0, "k": "pipe"}]}, "f[0].k (kind)", "expected 'memfd'"),
        ({"f": [{"i": 0, "k": "memfd", "z": 2, "c": b"abc"}]}, "f[0].c (contents)", "size is 2"),
        ({"f": [{"i": 0, "k": "file", "h": b"short"}]}, "f[0].h (sha256)", "expected 32 bytes"),
        ({"f": [{"i": 1, "k": "file"}, {"i": 1, "k": "file"}]}, "f (fds[1].position)", "increase"),
    ],
)
def test_a_bad_message_field_is_named(change: dict[str, Any], field: str, text: str) -> None:
    wire = MessageRecord(1, 1, Direction.C2S, 5, b"x").to_wire() | change
    with pytest.raises(TraceFormatError) as info:
        MessageRecord.from_wire(wire)
    assert info.value.field == field
    assert text in str(info.value)


def test_a_missing_event_field_is_named() -> None:
    wire = EventRecord(1, None, 5, "note").to_wire()
    del wire["e"]
    with pytest.raises(TraceFormatError, match="field e \\(kind\\): missing"):
        EventRecord.from_wire(wire)


def test_event_data_must_have_string_keys_and_storable_values() -> None:
    with pytest.raises(InvalidField, match=r"data\.rule: map keys must be strings"):
        EventRecord(1, 1, 5, "inject", {"rule": {1: "x"}})
    with pytest.raises(InvalidField, match=r"data\.when\[0\]: cannot store a datetime"):
        EventRecord(1, 1, 5, "inject", {"when": [CREATED]})


# --- writer ------------------------------------------------------------------------


def test_each_record_reads_back_while_the_writer_is_still_open(tmp_path: Path) -> None:
    path = tmp_path / "live.trace"
    with TraceWriter(path, make_header()) as writer, TraceReader(path) as reader:
        assert list(reader) == []
        first = writer.write_event(1, EventKind.SESSION_OPEN, 10)
        assert list(reader) == [first]
        second = writer.write_message(1, Direction.C2S, 11, b"\x00" * 16)
        assert list(reader) == [first, second]
        assert reader.truncated_after is None


def test_the_writer_numbers_records_and_counts_bytes(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    with TraceWriter(path, make_header()) as writer:
        assert writer.seq == 0
        assert writer.write_message(1, Direction.C2S, 1, b"a").seq == 1
        assert writer.write_event(1, "note", 2).seq == 2
        assert writer.seq == 2
        assert writer.bytes_written == path.stat().st_size


def test_the_writer_refuses_to_replace_a_file_unless_asked(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        TraceWriter(path, make_header())
    assert path.read_bytes() == b"precious"
    TraceWriter(path, make_header(), overwrite=True).close()
    assert TraceReader(path).header == make_header()


def test_a_header_a_reader_would_refuse_leaves_no_file_behind(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    with pytest.raises(TraceLimitError, match="max_event_bytes"):
        TraceWriter(path, make_header(info={"blob": b"x" * (2 * 1024 * 1024)}))
    assert not path.exists()


def test_a_closed_writer_refuses_to_write(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path / "t.trace", make_header(), fsync=True)
    writer.write_event(1, "note", 1)
    writer.close()
    writer.close()
    assert writer.closed
    with pytest.raises(ValueError, match="closed"):
        writer.write_event(1, "note", 2)


def test_a_failed_write_is_cut_off_so_the_file_stays_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "t.trace"
    writer = TraceWriter(path, make_header())
    first = writer.write_message(1, Direction.C2S, 1, b"a" * 100)
    real_write = os.write

    def disk_full_halfway(fd: int, data: bytes) -> int:
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full_halfway)
    with pytest.raises(OSError, match="No space"):
        writer.write_message(1, Direction.S2C, 2, b"b" * 100)
    monkeypatch.undo()
    third = writer.write_message(1, Direction.S2C, 3, b"c" * 100)
    writer.close()
    reader, read = read_all(path)
    assert read == [first, third]
    assert third.seq == 2
    assert reader.truncated_after is None


@pytest.mark.parametrize(
    ("data", "limit"),
    [
        ({"deep": [[[[[[[[[[[[[[[[["too deep"]]]]]]]]]]]]]]]]]}, "max_depth"),
        ({"big": b"x" * (1024 * 1024)}, "max_event_bytes"),
        ({"many": list(range(70000))}, "max_objects"),
    ],
)
def test_the_writer_refuses_events_a_default_reader_would_refuse(
    tmp_path: Path, data: dict[str, Any], limit: str
) -> None:
    path = tmp_path / "t.trace"
    with TraceWriter(path, make_header()) as writer:
        with pytest.raises(TraceLimitError) as info:
            writer.write_event(1, "note", 1, data)
        assert info.value.limit == limit
        writer.write_event(1, "note", 2)
    _, read = read_all(path)
    assert [r.seq for r in read] == [1]


def test_the_writer_refuses_more_fds_than_the_kernel_passes(tmp_path: Path) -> None:
    fds = [FdRecord(i, FdKind.EVENTFD) for i in range(254)]
    with (
        TraceWriter(tmp_path / "t.trace", make_header()) as writer,
        pytest.raises(TraceLimitError, match="254 fds exceed max_fds"),
    ):
        writer.write_message(1, Direction.C2S, 1, b"x", fds)


# --- torn tails --------------------------------------------------------------------


def _cut(src: Path, dst: Path, size: int) -> Path:
    dst.write_bytes(src.read_bytes()[:size])
    return dst


@pytest.mark.parametrize(
    "cut",
    [
        pytest.param(1, id="after-the-map-byte"),
        pytest.param(4, id="mid-key"),
        pytest.param(-302, id="mid-bin-length"),
        pytest.param(-150, id="mid-data"),
        pytest.param(-1, id="last-byte-missing"),
    ],
)
def test_a_torn_last_record_is_reported_and_the_whole_ones_kept(tmp_path: Path, cut: int) -> None:
    full = tmp_path / "full.trace"
    records, offsets = write_sample(full)
    end = full.stat().st_size
    size = offsets[-1] + cut if cut > 0 else end + cut
    reader, read = read_all(_cut(full, tmp_path / "torn.trace", size))
    assert read == records[:-1]
    assert reader.truncated_after == 7
    assert reader.trailing_bytes == size - offsets[-1]
    assert (
        reader.truncation == f"trace truncated after record 7 ({size - offsets[-1]} trailing bytes)"
    )


def test_every_cut_inside_the_last_record_keeps_all_whole_records(tmp_path: Path) -> None:
    full = tmp_path / "full.trace"
    records, offsets = write_sample(full)
    for size in range(offsets[-1] + 1, full.stat().st_size):
        reader, read = read_all(_cut(full, tmp_path / "torn.trace", size))
        assert read == records[:-1], size
        assert reader.truncated_after == 7, size


def test_a_cut_right_after_the_header_gives_an_empty_trace(tmp_path: Path) -> None:
    full = tmp_path / "full.trace"
    _, offsets = write_sample(full)
    reader, read = read_all(_cut(full, tmp_path / "cut.trace", offsets[0]))
    assert read == []
    assert reader.truncated_after is None


@pytest.mark.parametrize("size", [1, 10, 30, 100])
def test_a_torn_header_is_a_clear_error(tmp_path: Path, size: int) -> None:
    full = tmp_path / "full.trace"
    write_sample(full)
    with pytest.raises(TraceFormatError, match=f"ends inside the header \\({size} bytes\\)"):
        TraceReader(_cut(full, tmp_path / "cut.trace", size))


def test_a_trace_killed_mid_session_reads_back_to_its_last_whole_record(tmp_path: Path) -> None:
    path = tmp_path / "killed.trace"
    child = textwrap.dedent(
        """
        import sys
        from recorder.records import TraceHeader
        from recorder.writer import TraceWriter
        from vfioproxy.side import Direction

        payload = bytes(range(256)) * 256
        writer = TraceWriter(sys.argv[1], TraceHeader.now("kill test"))
        writer.write_event(1, "session_open", 0)
        t_ns = 0
        while True:
            t_ns += 1
            writer.write_message(1, Direction.C2S, t_ns, payload)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", child, str(path)], env=env)
    try:
        deadline = time.monotonic() + 30
        while not path.exists() or path.stat().st_size < 4 * 1024 * 1024:
            assert proc.poll() is None, "the writer process died on its own"
            assert time.monotonic() < deadline, "the writer process wrote too little"
            time.sleep(0.01)
        with TraceReader(path) as live:
            seen = sum(1 for _ in live)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    reader, read = read_all(path)
    assert len(read) >= seen
    assert [r.seq for r in read] == list(range(1, len(read) + 1))
    assert all(r.data == bytes(range(256)) * 256 for r in read if isinstance(r, MessageRecord))
    if reader.truncated_after is not None:
        assert reader.truncated_after == len(read)
        assert 0 < reader.trailing_bytes < 70000


# --- corruption ----------------------------------------------------------------------


def _replace(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new) :]


@pytest.mark.parametrize(
    ("damage", "text"),
    [
        pytest.param(lambda rec: b"\xc1" + rec[1:], "invalid msgpack byte 0xc1", id="invalid-byte"),
        pytest.param(lambda rec: b"\xd4\x01\x00" + rec[3:], "extension type", id="ext-type"),
        pytest.param(lambda rec: b"\x2a" + rec[1:], "record is of type int", id="not-a-map"),
        pytest.param(
            lambda rec: rec.replace(b"\xa1d\xa3c2s", b"\xa1d\xa3x2s"), "field d", id="direction"
        ),
        pytest.param(lambda rec: rec.replace(b"\xa1k\xa1m", b"\xa1k\xa1z"), "unknown record kind"),
        pytest.param(lambda rec: rec.replace(b"\xa1q\x05", b"\xa1q\x01"), "seq 1 after seq 4"),
        pytest.param(
            lambda rec: rec.replace(b"\xa3c2s", b"\xa3\xff2s"), "undecodable msgpack", id="utf8"
        ),
    ],
)
def test_damage_in_the_middle_names_the_record_and_its_offset(
    tmp_path: Path, damage: Any, text: str
) -> None:
    full = tmp_path / "full.trace"
    _, offsets = write_sample(full)
    data = full.read_bytes()
    record = data[offsets[4] : offsets[5]]
    damaged = damage(record)
    assert damaged != record and len(damaged) == len(record)
    path = tmp_path / "bad.trace"
    path.write_bytes(data[: offsets[4]] + damaged + data[offsets[5] :])
    with TraceReader(path) as reader, pytest.raises(TraceFormatError) as info:
        list(reader)
    assert info.value.record == 5
    assert info.value.offset == offsets[4]
    assert text in str(info.value)
    assert f"{path}: record 5: byte offset {offsets[4]}" in str(info.value)


# --- not a trace -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "text"),
    [
        pytest.param(b"", "empty file: not a vfioproxy trace", id="empty"),
        pytest.param(bytes(range(7, 250)) * 20, "not a vfioproxy trace", id="random-bytes"),
        pytest.param(b'{"magic": "vfioproxy-trace"}\n', "not a vfioproxy trace", id="json"),
        pytest.param(
            (Path(__file__).parent.parent / "pyproject.toml").read_bytes(),
            "not a vfioproxy trace",
            id="text",
        ),
        pytest.param(msgpack.packb({"magic": "other"}), "not a vfioproxy trace", id="msgpack-map"),
        pytest.param(
            msgpack.packb({"version": [1, 0], "magic": "vfioproxy-trace"}),
            "not a vfioproxy trace",
            id="magic-not-first",
        ),
        pytest.param(b"\xdf\xff\xff\xff\xff" + bytes(40), "not a vfioproxy trace", id="huge-map"),
        pytest.param(b"\xdf\xff\xff\xff\xff", "ends inside the header", id="huge-map-short"),
    ],
)
def test_a_file_that_is_not_a_trace_is_refused_clearly(
    tmp_path: Path, content: bytes, text: str
) -> None:
    path = tmp_path / "x.trace"
    path.write_bytes(content)
    with pytest.raises(TraceFormatError, match=text):
        TraceReader(path)


def test_a_rawcap_capture_is_not_a_trace() -> None:
    capture = RAWCAP / "qemu-realize-gpio-001.jsonl"
    if not capture.exists():
        pytest.skip("shared captures not available")
    with pytest.raises(TraceFormatError, match="not a vfioproxy trace"):
        TraceReader(capture)


def test_a_damaged_header_field_is_named(tmp_path: Path) -> None:
    path = tmp_path / "x.trace"
    path.write_bytes(header_bytes(created="yesterday"))
    with pytest.raises(TraceFormatError, match="record 0: byte offset 0: field created"):
        TraceReader(path)


# --- versions ------------------------------------------------------------------------


def test_a_newer_major_version_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "future.trace"
    path.write_bytes(header_bytes(version=[3, 0], future_key="whatever"))
    with pytest.raises(TraceVersionError) as info:
        TraceReader(path)
    assert info.value.found == (3, 0)
    assert str(info.value).endswith(
        "trace format 3.0 is newer than this vfioproxy supports (1.x); upgrade vfioproxy"
    )


def test_a_newer_minor_version_reads_and_skips_what_it_does_not_know(tmp_path: Path) -> None:
    path = tmp_path / "minor.trace"
    message = MessageRecord(2, 1, Direction.C2S, 7, b"m")
    path.write_bytes(
        header_bytes(version=[1, 4], new_header_key=1)
        + msgpack.packb({"k": "x", "q": 1, "whatever": [1, 2]})
        + msgpack.packb(message.to_wire() | {"new_key": "ignored"}, use_bin_type=True)
    )
    reader, read = read_all(path)
    assert reader.file_version == (1, 4)
    assert read == [message]
    assert reader.skipped == 1


def test_an_older_major_version_is_migrated_step_by_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def header_v0_to_v1(wire: dict[str, Any]) -> dict[str, Any]:
        mono_ns = wire.pop("monotonic")
        return {**wire, "version": list(FORMAT_VERSION), "mono_ns": mono_ns}

    def record_v0_to_v1(wire: dict[str, Any]) -> dict[str, Any]:
        direction = "c2s" if wire.pop("from_client") else "s2c"
        return {**wire, "d": direction}

    monkeypatch.setitem(migrate.MIGRATIONS, 0, migrate.Migration(header_v0_to_v1, record_v0_to_v1))
    header = make_header().to_wire() | {"version": [0, 7], "monotonic": 5}
    del header["mono_ns"]
    record = MessageRecord(1, 1, Direction.S2C, 9, b"old").to_wire() | {"from_client": False}
    del record["d"]
    path = tmp_path / "old.trace"
    path.write_bytes(msgpack.packb(header) + msgpack.packb(record, use_bin_type=True))
    reader, read = read_all(path)
    assert reader.file_version == (0, 7)
    assert reader.header == make_header(mono_ns=5)
    assert read == [MessageRecord(1, 1, Direction.S2C, 9, b"old")]


def test_an_older_major_version_without_a_migration_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "old.trace"
    path.write_bytes(header_bytes(version=[0, 3]))
    with pytest.raises(TraceVersionError, match=r"trace format 0\.3 is older than any"):
        TraceReader(path)


# --- hostile files ---------------------------------------------------------------------


def _hostile_record(value: bytes) -> bytes:
    """A message record whose data field is the raw msgpack ``value``."""
    head: bytes = msgpack.packb({"k": "m", "q": 1, "s": 1, "d": "c2s", "t": 1, "f": []})
    key: bytes = msgpack.packb("b")
    return bytes([head[0] + 1]) + head[1:] + key + value


@pytest.mark.parametrize(
    ("record", "limit"),
    [
        pytest.param(_hostile_record(b"\xc6\xff\xff\xff\xff" + b"x" * 64), "max_record_bytes"),
        pytest.param(_hostile_record(b"\xdb\x7f\xff\xff\xff"), "max_str_bytes"),
        pytest.param(_hostile_record(b"\xdd\xff\xff\xff\xff"), "max_objects"),
        pytest.param(_hostile_record(b"\xdf\x00\x01\x00\x00"), "max_objects"),
        pytest.param(_hostile_record(b"\x91" * 100 + b"\x00"), "max_depth"),
        pytest.param(
            _hostile_record(b"\x92" + (b"\xdc\xff\xff" + bytes(65535)) * 2), "max_objects"
        ),
    ],
)
def test_a_hostile_record_hits_a_limit_quickly_without_allocating(
    tmp_path: Path, record: bytes, limit: str
) -> None:
    path = tmp_path / "hostile.trace"
    head = header_bytes()
    path.write_bytes(head + record)
    tracemalloc.start()
    started = time.monotonic()
    try:
        with TraceReader(path) as reader, pytest.raises(TraceLimitError) as info:
            list(reader)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 1
    assert peak < 2 * 1024 * 1024
    assert info.value.limit == limit
    assert info.value.record == 1
    assert info.value.offset is not None and info.value.offset >= len(head)


def test_a_message_with_too_many_fds_hits_max_fds(tmp_path: Path) -> None:
    path = tmp_path / "fds.trace"
    wire = MessageRecord(1, 1, Direction.C2S, 1, b"x").to_wire()
    wire["f"] = [{"i": i, "k": "eventfd"} for i in range(254)]
    path.write_bytes(header_bytes() + msgpack.packb(wire, use_bin_type=True))
    with TraceReader(path) as reader, pytest.raises(TraceLimitError, match="max_fds") as info:
        list(reader)
    assert info.value.record == 1


def test_a_big_event_hits_max_event_bytes(tmp_path: Path) -> None:
    path = tmp_path / "event.trace"
    wire = EventRecord(1, 1, 1, "note", {"blob": b"x" * (2 * 1024 * 1024)}).to_wire()
    path.write_bytes(header_bytes() + msgpack.packb(wire, use_bin_type=True))
    with TraceReader(path) as reader, pytest.raises(TraceLimitError, match="max_event_bytes"):
        list(reader)


def test_a_record_exactly_at_the_size_limit_passes_and_one_byte_more_does_not(
    tmp_path: Path,
) -> None:
    path = tmp_path / "t.trace"
    with TraceWriter(path, make_header()) as writer:
        writer.write_message(1, Direction.C2S, 1, b"x" * 1000)
        size = writer.bytes_written
        writer.write_message(1, Direction.C2S, 2, b"x" * 1001)
        record_bytes = writer.bytes_written - size
    limits = ReaderLimits(max_record_bytes=record_bytes - 1)
    with TraceReader(path, limits=limits) as reader, pytest.raises(TraceLimitError) as info:
        list(reader)
    assert info.value.record == 2
    assert info.value.offset == size
    assert len(list(TraceReader(path, limits=ReaderLimits(max_record_bytes=record_bytes)))) == 2


@settings(max_examples=300)
@given(
    seq=st.integers(1, 2**64 - 1),
    session=st.integers(0, 2**64 - 1),
    direction=st.sampled_from(list(Direction)),
    t_ns=st.integers(0, 2**64 - 1),
    data=st.binary(max_size=70000),
)
def test_the_plain_packer_writes_exactly_the_record_the_wire_map_describes(
    seq: int, session: int, direction: Direction, t_ns: int, data: bytes
) -> None:
    packer = msgpack.Packer(use_bin_type=True)
    wire = message_wire(seq, session, direction, t_ns, ())
    wire["b"] = data
    plain = PlainMessagePacker(packer, session, direction)
    assert plain(seq, t_ns, data) == msgpack.packb(wire, use_bin_type=True)
