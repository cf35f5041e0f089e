"""Importing rawcap JSON-lines captures into traces."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import pytest

from recorder.errors import TraceFormatError
from recorder.reader import TraceReader
from recorder.records import (
    FORMAT_VERSION,
    EventKind,
    EventRecord,
    FdKind,
    FdRecord,
    MessageRecord,
    Record,
)
from tests.realdata import RAWCAP as REAL
from tests.realdata import TRACES
from vfioproxy.side import Direction
from vfioproxy.trace.rawcap import ImportResult, import_rawcap

#: message counts from the tables of REAL/README.md
COUNTS = {
    "libvfio-user-client-server-001": 230,
    "libvfio-user-client-server-migrated-001": 90,
    "libvfio-user-client-server-002": 224,
    "libvfio-user-client-server-migrated-002": 90,
    "qemu-realize-libvfio-user-server-001": 82,
    "qemu-realize-libvfio-user-server-002": 82,
    "qemu-realize-libvfio-user-server-003": 82,
    "qemu-realize-gpio-001": 78,
    "qemu-realize-gpio-002": 78,
    "qemu-realize-gpio-003": 78,
    "qemu-realize-qemu-server-e1000e-001": 96,
    "qemu-realize-qemu-server-nvme-001": 88,
    "qemu-boot-qemu-server-e1000e-001": 270,
    "qemu-boot-qemu-server-nvme-001": 1167,
}

needs_real = pytest.mark.skipif(not REAL.is_dir(), reason="shared captures not available")

HEADER = {
    "format": "vfio-user-rawcap",
    "version": 1,
    "client": "test client",
    "server": "test server",
    "captured": "2026-11-25T01:57:23.648112+00:00",
    "listen_path": "/tmp/p.sock",
    "server_path": "/tmp/d.sock",
    "connection": 1,
}
#: a VERSION command header: msg_id 1, command 1, size 16
VERSION_CMD = "0100010010000000" + "00000000" + "00000000"


def message(**changes: Any) -> dict[str, Any]:
    return {"t_ns": 100, "dir": "c2s", "hex": VERSION_CMD, "fds": []} | changes


def write_rawcap(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def read_trace(path: Path) -> tuple[TraceReader, list[Record]]:
    with TraceReader(path) as reader:
        return reader, list(reader)


@needs_real
@pytest.mark.parametrize("stem", sorted(COUNTS))
def test_a_real_capture_imports_every_message_byte_exactly(tmp_path: Path, stem: str) -> None:
    src = REAL / f"{stem}.jsonl"
    dst = tmp_path / f"{stem}.trace"
    lines = [json.loads(line) for line in src.read_text().splitlines()]
    result = import_rawcap(src, dst)
    expected_fds = sum(len(line["fds"]) for line in lines[1:])
    assert result == ImportResult(messages=COUNTS[stem], fds=expected_fds, notes=0)
    reader, records = read_trace(dst)
    assert reader.truncated_after is None
    messages = [r for r in records if isinstance(r, MessageRecord)]
    assert len(messages) == COUNTS[stem] == len(lines) - 1
    for record, line in zip(messages, lines[1:], strict=True):
        assert record.data == bytes.fromhex(line["hex"])
        assert record.direction is Direction(line["dir"])
        assert record.t_ns == line["t_ns"]
        assert record.session == 1
        assert record.fds == tuple(
            FdRecord(i, FdKind(fd["kind"]), size=fd["size"], flags=fd["flags"])
            for i, fd in enumerate(line["fds"])
        )
    assert [r.seq for r in records] == list(range(1, len(records) + 1))


@needs_real
@pytest.mark.parametrize("stem", sorted(COUNTS))
def test_a_real_capture_becomes_one_session_with_its_rawcap_header(
    tmp_path: Path, stem: str
) -> None:
    src = REAL / f"{stem}.jsonl"
    first = json.loads(src.read_text().splitlines()[0])
    import_rawcap(src, tmp_path / "t.trace")
    with TraceReader(tmp_path / "t.trace") as reader:
        records = list(reader)
        summaries = reader.sessions()
    header = reader.header
    assert header.source == "rawcap import"
    assert header.created == datetime.fromisoformat(first["captured"])
    assert header.mono_ns == 0
    assert header.host is None
    assert header.info == {
        key: first[key]
        for key in ("client", "server", "captured", "listen_path", "server_path", "connection")
    } | {"source_file": f"{stem}.jsonl"}
    opened, closed = records[0], records[-1]
    assert isinstance(opened, EventRecord) and isinstance(closed, EventRecord)
    assert (opened.kind, opened.session, opened.t_ns) == (EventKind.SESSION_OPEN, 1, 0)
    assert opened.data == {
        "client": first["client"],
        "server": first["server"],
        "wall": first["captured"],
    }
    assert closed.kind == EventKind.SESSION_CLOSE
    assert closed.t_ns == max(r.t_ns for r in records)
    assert closed.data == {"closed_by": None, "reason": "end of rawcap capture"}
    assert [(s.session, s.messages, s.opened, s.closed) for s in summaries] == [
        (1, COUNTS[stem], opened, closed)
    ]


@needs_real
@pytest.mark.parametrize("stem", sorted(COUNTS))
def test_the_committed_traces_match_a_fresh_import(tmp_path: Path, stem: str) -> None:
    import_rawcap(REAL / f"{stem}.jsonl", tmp_path / "fresh.trace")
    fresh_reader, fresh = read_trace(tmp_path / "fresh.trace")
    committed_reader, committed = read_trace(TRACES / f"{stem}.trace")
    assert committed == fresh
    # the committed files were written by format 1.0: they read as before
    assert committed_reader.header.version[0] == FORMAT_VERSION[0]
    assert committed_reader.header == attrs.evolve(
        fresh_reader.header,
        tool_version=committed_reader.header.tool_version,
        version=committed_reader.header.version,
    )


def test_an_import_is_deterministic(tmp_path: Path) -> None:
    src = write_rawcap(tmp_path / "c.jsonl", [HEADER, message(), message(dir="s2c", t_ns=200)])
    import_rawcap(src, tmp_path / "a.trace")
    import_rawcap(src, tmp_path / "b.trace")
    assert (tmp_path / "a.trace").read_bytes() == (tmp_path / "b.trace").read_bytes()


def test_a_rawcap_note_becomes_a_note_event_after_its_message(tmp_path: Path) -> None:
    src = write_rawcap(
        tmp_path / "c.jsonl",
        [
            HEADER,
            message(),
            message(dir="s2c", t_ns=150, note="VERSION reply advertises twin_socket"),
            message(t_ns=300, fds=[{"kind": "eventfd", "size": None, "flags": 2050}]),
        ],
    )
    result = import_rawcap(src, tmp_path / "t.trace")
    assert result == ImportResult(messages=3, fds=1, notes=1)
    _, records = read_trace(tmp_path / "t.trace")
    assert [r.kind if isinstance(r, EventRecord) else r.direction.value for r in records] == [
        "session_open",
        "c2s",
        "s2c",
        "note",
        "c2s",
        "session_close",
    ]
    note = records[3]
    assert isinstance(note, EventRecord)
    assert (note.t_ns, note.session) == (150, 1)
    assert note.data == {"text": "VERSION reply advertises twin_socket", "seq": 3}


def test_an_import_does_not_replace_a_trace_unless_asked(tmp_path: Path) -> None:
    src = write_rawcap(tmp_path / "c.jsonl", [HEADER, message()])
    dst = tmp_path / "t.trace"
    dst.write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        import_rawcap(src, dst)
    assert dst.read_bytes() == b"keep me"
    assert import_rawcap(src, dst, overwrite=True).messages == 1


BAD_LINES: list[Any] = [
    pytest.param([], 1, "empty file", id="empty-file"),
    pytest.param(["not json"], 1, "not valid JSON", id="header-not-json"),
    pytest.param([[1, 2]], 1, "expected a JSON object", id="header-not-object"),
    pytest.param([HEADER | {"format": "pcap"}], 1, "not a rawcap capture", id="format"),
    pytest.param([HEADER | {"version": 2}], 1, "rawcap version 2 is not supported", id="version"),
    pytest.param([{k: v for k, v in HEADER.items() if k != "server"}], 1, "field server: missing"),
    pytest.param([HEADER | {"connection": "1"}], 1, "field connection: expected an integer"),
    pytest.param(
        [HEADER | {"captured": "2026-11-25T01:57:23+02:00"}], 1, "field captured", id="not-utc"
    ),
    pytest.param([HEADER, message(), "{bad json"], 3, "not valid JSON", id="bad-json"),
    pytest.param([HEADER, message(), ""], 3, "not valid JSON", id="blank-line"),
    pytest.param([HEADER, {"t_ns": 1, "dir": "c2s", "fds": []}], 2, "field hex: missing"),
    pytest.param([HEADER, message(t_ns=-5)], 2, "field t_ns: expected a non-negative"),
    pytest.param([HEADER, message(dir="up")], 2, "field dir: expected 'c2s' or 's2c'"),
    pytest.param([HEADER, message(hex=VERSION_CMD + "0")], 2, "field hex: not hex", id="odd"),
    pytest.param([HEADER, message(hex="zz" * 16)], 2, "field hex: not hex", id="not-hex"),
    pytest.param([HEADER, message(hex="00" * 8)], 2, "shorter than the 16-byte header"),
    pytest.param(
        [HEADER, message(hex=VERSION_CMD + "00")],
        2,
        "field hex: the header's size is 16, but the message has 17 bytes",
        id="size-mismatch",
    ),
    pytest.param([HEADER, message(fds={})], 2, "field fds: expected a list"),
    pytest.param(
        [HEADER, message(fds=[{"kind": "pipe", "size": None, "flags": 0}])],
        2,
        "field fds[0].kind: expected one of memfd",
    ),
    pytest.param(
        [HEADER, message(fds=[{"kind": "file", "size": -1, "flags": 0}])],
        2,
        "field fds[0].size: expected a non-negative integer",
    ),
    pytest.param([HEADER, message(note=7)], 2, "field note: expected a string"),
]


@pytest.mark.parametrize(("lines", "line", "text"), BAD_LINES)
def test_bad_rawcap_input_is_refused_naming_the_line(
    tmp_path: Path, lines: list[Any], line: int, text: str
) -> None:
    src = write_rawcap(tmp_path / "bad.jsonl", lines)
    dst = tmp_path / "t.trace"
    with pytest.raises(TraceFormatError) as info:
        import_rawcap(src, dst)
    assert info.value.line == line
    assert f"{src}: line {line}: " in str(info.value)
    assert text in str(info.value)
    assert list(tmp_path.iterdir()) == [src]


def test_the_capture_time_anchors_rawcap_times_to_wall_clock(tmp_path: Path) -> None:
    src = write_rawcap(tmp_path / "c.jsonl", [HEADER, message(t_ns=2_000_000)])
    import_rawcap(src, tmp_path / "t.trace")
    reader, records = read_trace(tmp_path / "t.trace")
    assert reader.header.wall_time(records[1].t_ns) == datetime(
        2026, 11, 25, 1, 57, 23, 650112, tzinfo=UTC
    )
