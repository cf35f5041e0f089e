"""Importing rawcap captures (JSON lines, one message per line) into traces.

The rawcap format is described in ``traces/real/README.md`` of the shared
captures: a header line, then one line per message with its monotonic time
since the connection was accepted, direction, bytes in hex, the fds it
carried and an optional note.
"""

from __future__ import annotations

import binascii
import contextlib
import errno
import json
import os
from collections.abc import Generator, Iterator
from datetime import datetime, timedelta
from typing import Any

import attrs

from recorder.errors import TraceFormatError
from recorder.records import EventKind, FdKind, FdRecord, InvalidField, TraceHeader
from recorder.writer import TraceWriter
from vfioproxy.protocol.header import HEADER_SIZE, Header
from vfioproxy.side import Direction

__all__ = ["RAWCAP_FORMAT", "ImportResult", "import_rawcap"]

RAWCAP_FORMAT = "vfio-user-rawcap"
RAWCAP_VERSION = 1
#: a rawcap file holds one connection; it becomes this session
SESSION = 1

_TEXT_KEYS = ("client", "server", "captured", "listen_path", "server_path")
_DIRECTIONS = {direction.value: direction for direction in Direction}
_FD_KINDS = {kind.value: kind for kind in FdKind}


@attrs.frozen
class ImportResult:
    """What an import wrote: messages, the fds they carried, and rawcap notes."""

    messages: int
    fds: int
    notes: int


def import_rawcap(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, overwrite: bool = False
) -> ImportResult:
    """Convert the rawcap capture ``src`` into the trace ``dst``.

    The trace's header has source ``"rawcap import"``, ``created`` = the
    capture's accept time and ``mono_ns`` = 0 (rawcap times count from the
    accept), and the rawcap header fields plus ``source_file`` in ``info``.
    Session 1 then holds a ``session_open`` event, every message with its
    fds, a ``note`` event after each message that has a rawcap note, and a
    ``session_close`` event. Bad input raises :class:`TraceFormatError`
    naming the line; ``dst`` is written under a temporary name and only
    appears when the import succeeded. An existing ``dst`` is replaced only
    with ``overwrite``.
    """
    if not overwrite and os.path.exists(dst):
        raise FileExistsError(errno.EEXIST, "refusing to replace an existing file", os.fspath(dst))
    tmp = f"{os.fspath(dst)}.tmp"
    with contextlib.closing(_lines(src)) as lines:
        _, first = next(lines, (1, None))
        if first is None:
            raise TraceFormatError("empty file: expected the rawcap header", path=src, line=1)
        header = _header(first, src)
        try:
            with TraceWriter(tmp, header, overwrite=True) as writer:
                result = _write_session(first, lines, writer, src)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    os.replace(tmp, dst)
    return result


def _write_session(
    first: dict[str, Any],
    lines: Iterator[tuple[int, dict[str, Any]]],
    writer: TraceWriter,
    src: str | os.PathLike[str],
) -> ImportResult:
    """Write session 1: its open event, the messages and notes, its close event."""
    writer.write_event(
        SESSION,
        EventKind.SESSION_OPEN,
        0,
        {"client": first["client"], "server": first["server"], "wall": first["captured"]},
    )
    messages = fds = notes = 0
    last_t_ns = 0
    for lineno, line in lines:
        try:
            t_ns, direction, data, fd_records, note = _message(line)
        except TraceFormatError as exc:
            exc.line = lineno
            exc.located(path=src)
            raise
        seq = writer.write_message(SESSION, direction, t_ns, data, fd_records).seq
        messages += 1
        fds += len(fd_records)
        last_t_ns = max(last_t_ns, t_ns)
        if note is not None:
            writer.write_event(SESSION, EventKind.NOTE, t_ns, {"text": note, "seq": seq})
            notes += 1
    writer.write_event(
        SESSION,
        EventKind.SESSION_CLOSE,
        last_t_ns,
        {"closed_by": None, "reason": "end of rawcap capture"},
    )
    return ImportResult(messages=messages, fds=fds, notes=notes)


def _lines(src: str | os.PathLike[str]) -> Generator[tuple[int, dict[str, Any]], None, None]:
    """Yield (line number, JSON object) for each line of ``src``."""
    with open(src, "rb") as file:
        for lineno, raw in enumerate(file, 1):
            try:
                obj = json.loads(raw)
            except ValueError as exc:
                raise TraceFormatError(f"not valid JSON ({exc})", path=src, line=lineno) from None
            if not isinstance(obj, dict):
                raise TraceFormatError(
                    f"expected a JSON object, got {type(obj).__name__}", path=src, line=lineno
                )
            yield lineno, obj


def _header(line: dict[str, Any], src: str | os.PathLike[str]) -> TraceHeader:
    """The trace header for the rawcap header line of ``src``."""
    where: dict[str, Any] = {"path": src, "line": 1}
    if line.get("format") != RAWCAP_FORMAT:
        raise TraceFormatError(
            f"not a rawcap capture (format is {line.get('format')!r}, expected {RAWCAP_FORMAT!r})",
            **where,
        )
    if line.get("version") != RAWCAP_VERSION:
        raise TraceFormatError(
            f"rawcap version {line.get('version')!r} is not supported "
            f"(this vfioproxy reads {RAWCAP_VERSION})",
            field="version",
            **where,
        )
    for key in _TEXT_KEYS:
        _check(line, key, str, "a string", where)
    _check(line, "connection", int, "an integer", where)
    try:
        created = datetime.fromisoformat(line["captured"])
    except ValueError:
        created = None
    if created is None or created.utcoffset() != timedelta(0):
        raise TraceFormatError(
            f"expected an ISO-8601 UTC time, got {line['captured']!r}", field="captured", **where
        )
    info = {key: line[key] for key in (*_TEXT_KEYS, "connection")}
    info["source_file"] = os.path.basename(src)
    return TraceHeader(created=created, mono_ns=0, source="rawcap import", info=info)


def _check(
    line: dict[str, Any], key: str, kind: type, expected: str, where: dict[str, Any]
) -> None:
    if key not in line:
        raise TraceFormatError("missing", field=key, **where)
    if type(line[key]) is not kind:
        raise TraceFormatError(f"expected {expected}, got {line[key]!r}", field=key, **where)


def _message(
    line: dict[str, Any],
) -> tuple[int, Direction, bytes, list[FdRecord], str | None]:
    """Decode one message line: (t_ns, direction, bytes, fds, note)."""
    for key in ("t_ns", "dir", "hex", "fds"):
        if key not in line:
            raise TraceFormatError("missing", field=key)
    t_ns = line["t_ns"]
    if type(t_ns) is not int or t_ns < 0:
        raise TraceFormatError(f"expected a non-negative integer, got {t_ns!r}", field="t_ns")
    direction = _DIRECTIONS.get(line["dir"]) if isinstance(line["dir"], str) else None
    if direction is None:
        raise TraceFormatError(f"expected 'c2s' or 's2c', got {line['dir']!r}", field="dir")
    data = _hex(line["hex"])
    size = Header.parse(data).size
    if size != len(data):
        raise TraceFormatError(
            f"the header's size is {size}, but the message has {len(data)} bytes", field="hex"
        )
    if not isinstance(line["fds"], list):
        raise TraceFormatError(f"expected a list, got {line['fds']!r}", field="fds")
    fds = [_fd(i, fd) for i, fd in enumerate(line["fds"])]
    note = line.get("note")
    if note is not None and not isinstance(note, str):
        raise TraceFormatError(f"expected a string, got {note!r}", field="note")
    return t_ns, direction, data, fds, note


def _hex(text: Any) -> bytes:
    if not isinstance(text, str):
        raise TraceFormatError(f"expected a hex string, got {type(text).__name__}", field="hex")
    try:
        data = binascii.unhexlify(text)
    except (binascii.Error, ValueError) as exc:
        raise TraceFormatError(f"not hex ({exc})", field="hex") from None
    if len(data) < HEADER_SIZE:
        raise TraceFormatError(
            f"{len(data)} bytes is shorter than the {HEADER_SIZE}-byte header", field="hex"
        )
    return data


def _fd(position: int, fd: Any) -> FdRecord:
    field = f"fds[{position}]"
    if not isinstance(fd, dict):
        raise TraceFormatError(f"expected an object, got {fd!r}", field=field)
    name = fd.get("kind")
    kind = _FD_KINDS.get(name) if isinstance(name, str) else None
    if kind is None:
        raise TraceFormatError(
            f"expected one of {', '.join(_FD_KINDS)}, got {name!r}", field=f"{field}.kind"
        )
    try:
        return FdRecord(position, kind, size=fd.get("size"), flags=fd.get("flags"))
    except InvalidField as exc:
        raise TraceFormatError(exc.msg, field=f"{field}.{exc.field}") from None
