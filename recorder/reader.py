"""Reading a trace: the header first, then the records, streamed one at a time."""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from typing import Any

import attrs
import msgpack  # type: ignore[import-untyped]

from recorder.closing import Closing
from recorder.errors import TraceError, TraceFormatError, TraceLimitError, TraceVersionError
from recorder.framing import Incomplete, object_end
from recorder.limits import DEFAULT_LIMITS, ReaderLimits
from recorder.migrate import Migration, steps_from
from recorder.records import (
    FORMAT_MAGIC,
    FORMAT_VERSION,
    EventKind,
    EventRecord,
    MessageRecord,
    Record,
    TraceHeader,
)

__all__ = ["SessionSummary", "TraceReader"]

#: how much is read from the file at a time (more when a record is bigger)
CHUNK = 256 * 1024

#: the header's first map entry, "magic": "vfioproxy-trace", as msgpack bytes
SIGNATURE = msgpack.packb("magic") + msgpack.packb(FORMAT_MAGIC)


@attrs.frozen
class SessionSummary:
    """What a trace holds about one session; ``closed`` is None if it was cut off."""

    session: int
    messages: int
    opened: EventRecord | None
    closed: EventRecord | None


class TraceReader(Closing):
    """An open trace file: its ``header``, and its records when iterated.

    Opening reads and checks the header: a file that is not a trace raises
    :class:`TraceFormatError`, a newer major version :class:`TraceVersionError`;
    an older one is migrated (see :mod:`recorder.migrate`). Iterating yields
    :class:`MessageRecord` and :class:`EventRecord` objects in file order,
    reading the file piece by piece, so memory does not grow with its length;
    each iteration starts again at the first record, and the file may still
    be growing. A torn last record (the writer was killed while writing it)
    ends the iteration quietly and sets :attr:`truncated_after`; damage
    anywhere else raises :class:`TraceFormatError` or, past ``limits``,
    :class:`TraceLimitError`, both naming the record index (the header is 0)
    and the byte offset.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, limits: ReaderLimits = DEFAULT_LIMITS
    ) -> None:
        self.path = os.fspath(path)
        self.limits = limits
        #: index of the last whole record if the last pass found a torn tail
        self.truncated_after: int | None = None
        #: bytes after the last whole record (0 unless truncated)
        self.trailing_bytes = 0
        #: records of unknown kind skipped in a newer-minor file by the last pass
        self.skipped = 0
        self._file = open(path, "rb", buffering=0)  # noqa: SIM115 (closed by close())
        try:
            self._read_header()
        except BaseException:
            self._file.close()
            raise

    @property
    def truncation(self) -> str | None:
        """The human message for a torn tail, or None."""
        if self.truncated_after is None:
            return None
        return (
            f"trace truncated after record {self.truncated_after} "
            f"({self.trailing_bytes} trailing bytes)"
        )

    def __iter__(self) -> Iterator[Record]:
        self.truncated_after = None
        self.trailing_bytes = 0
        self.skipped = 0
        last_seq = 0
        for index, offset, size, wire in self._frames(self._body_offset, 1):
            try:
                record = self._record(wire, size)
                if record is None:
                    continue
                if record.seq <= last_seq:
                    raise TraceFormatError(
                        f"seq {record.seq} after seq {last_seq}: sequence numbers must increase",
                        field="q (seq)",
                    )
            except TraceError as exc:
                exc.located(path=self.path, record=index, offset=offset)
                raise
            last_seq = record.seq
            yield record

    def for_session(self, session: int) -> Iterator[Record]:
        """The messages and events of one session, in file order."""
        return (record for record in self if record.session == session)

    def sessions(self) -> list[SessionSummary]:
        """One summary per session, in session order (reads the whole file)."""
        messages: dict[int, int] = {}
        opened: dict[int, EventRecord] = {}
        closed: dict[int, EventRecord] = {}
        for record in self:
            session = record.session
            if session is None:
                continue
            messages.setdefault(session, 0)
            if isinstance(record, MessageRecord):
                messages[session] += 1
            elif record.kind == EventKind.SESSION_OPEN:
                opened.setdefault(session, record)
            elif record.kind == EventKind.SESSION_CLOSE:
                closed[session] = record
        return [
            SessionSummary(session, count, opened.get(session), closed.get(session))
            for session, count in sorted(messages.items())
        ]

    def close(self) -> None:
        self._file.close()


    def _read_header(self) -> None:
        self._check_signature()
        frames = self._frames(0, 0)
        try:
            _, _, size, wire = next(frames)
        except StopIteration:
            raise self._torn_header(self.trailing_bytes) from None
        finally:
            frames.close()
        where: dict[str, Any] = {"path": self.path, "record": 0, "offset": 0}
        if size > self.limits.max_event_bytes:
            raise TraceLimitError(
                f"header of {size} bytes exceeds max_event_bytes ({self.limits.max_event_bytes})",
                limit="max_event_bytes",
                **where,
            )
        version = wire.get("version")
        if not (
            isinstance(version, list)
            and len(version) == 2
            and all(type(part) is int and part >= 0 for part in version)
        ):
            raise TraceFormatError(
                f"expected [major, minor], got {version!r}", field="version", **where
            )
        self.file_version: tuple[int, int] = (version[0], version[1])
        steps = None if version[0] > FORMAT_VERSION[0] else steps_from(version[0])
        if steps is None:
            raise TraceVersionError(self.file_version, FORMAT_VERSION[0], path=self.path)
        for step in steps:
            wire = step.header(wire)
        try:
            self.header = TraceHeader.from_wire(wire)
        except TraceError as exc:
            exc.located(**where)
            raise
        self._steps: list[Migration] = steps
        #: a newer minor version may hold record kinds this code does not know
        self._skip_unknown = self.file_version[0] == FORMAT_VERSION[0] and (
            self.file_version[1] > FORMAT_VERSION[1]
        )
        self._body_offset = size

    def _check_signature(self) -> None:
        """Refuse a file that does not start like a trace, before parsing anything."""
        first = os.pread(self._file.fileno(), 5 + len(SIGNATURE), 0)
        if not first:
            raise TraceFormatError("empty file: not a vfioproxy trace", path=self.path)
        at = {0xDE: 3, 0xDF: 5}.get(first[0], 1 if 0x80 <= first[0] <= 0x8F else 0)
        found = first[at : at + len(SIGNATURE)]
        if not at or not SIGNATURE.startswith(found):
            raise TraceFormatError(
                f"not a vfioproxy trace (it starts with {first[:16].hex(' ')})", path=self.path
            )
        if len(found) < len(SIGNATURE):
            raise self._torn_header(len(first))

    def _torn_header(self, size: int) -> TraceFormatError:
        return TraceFormatError(
            f"the file ends inside the header ({size} bytes): its writer died before finishing it",
            path=self.path,
            record=0,
            offset=0,
        )

    def _frames(self, offset: int, index: int) -> Generator[tuple[int, int, int, Any], None, None]:
        """Yield (index, offset, size, decoded msgpack) of each whole record from ``offset``.

        At the end of the file, records a torn tail in the truncation attributes.
        """
        fd = self._file.fileno()
        limits = self.limits
        buf = b""
        base = offset  # file offset of buf[0]
        pos = 0
        while True:
            try:
                end = object_end(buf, pos, limits)
            except Incomplete as torn:
                if torn.need - pos > limits.max_record_bytes:
                    raise TraceLimitError(
                        f"record of at least {torn.need - pos} bytes exceeds "
                        f"max_record_bytes ({limits.max_record_bytes})",
                        limit="max_record_bytes",
                        path=self.path,
                        record=index,
                        offset=base + pos,
                    ) from None
                more = os.pread(fd, max(torn.need - len(buf), CHUNK), base + len(buf))
                if not more:
                    if len(buf) > pos:
                        self.truncated_after = index - 1
                        self.trailing_bytes = len(buf) - pos
                    return
                buf = buf[pos:] + more
                base += pos
                pos = 0
                continue
            except TraceError as exc:
                if exc.offset is not None:
                    exc.offset += base
                exc.located(path=self.path, record=index)
                raise
            if end - pos > limits.max_record_bytes:
                raise TraceLimitError(
                    f"record of {end - pos} bytes exceeds "
                    f"max_record_bytes ({limits.max_record_bytes})",
                    limit="max_record_bytes",
                    path=self.path,
                    record=index,
                    offset=base + pos,
                )
            try:
                wire = msgpack.unpackb(memoryview(buf)[pos:end], raw=False, strict_map_key=True)
            except ValueError as exc:
                raise TraceFormatError(
                    f"undecodable msgpack ({exc})", path=self.path, record=index, offset=base + pos
                ) from None
            yield index, base + pos, end - pos, wire
            pos = end
            index += 1

    def _record(self, wire: Any, size: int) -> Record | None:
        """Build one record from its wire form, or None if it is skipped."""
        if not isinstance(wire, dict):
            raise TraceFormatError(f"record is of type {type(wire).__name__}, expected a map")
        for step in self._steps:
            wire = step.record(wire)
        kind = wire.get("k")
        if kind == "m":
            return MessageRecord.from_wire(wire, limits=self.limits)
        if kind == "e":
            if size > self.limits.max_event_bytes:
                raise TraceLimitError(
                    f"event of {size} bytes exceeds max_event_bytes "
                    f"({self.limits.max_event_bytes})",
                    limit="max_event_bytes",
                )
            return EventRecord.from_wire(wire)
        if self._skip_unknown:
            self.skipped += 1
            return None
        raise TraceFormatError(f"unknown record kind {repr(kind)[:40]}", field="k (kind)")
