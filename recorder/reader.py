"""Reading a trace: the header first, then the records, streamed one at a time."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any, cast

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
    TORN,
    EventKind,
    EventRecord,
    MessageRecord,
    Record,
    TraceHeader,
)

__all__ = ["FOLLOW_POLL", "PAUSED", "DamagedRecord", "Paused", "SessionSummary", "TraceReader"]

#: how much is read from the file at a time (more when a record is bigger)
CHUNK = 256 * 1024

#: how many :class:`DamagedRecord` a pass keeps (it counts them all)
DAMAGED_KEPT = 100

#: how a record starts: a small map whose first entry is "k": "m" or "k": "e"
#: (the writer puts ``k`` first); what a resync after damage looks for
_RECORD_START = re.compile(rb"[\x80-\x8f]\xa1k\xa1[me]")

#: the header's first map entry, "magic": "vfioproxy-trace", as msgpack bytes
SIGNATURE = msgpack.packb("magic") + msgpack.packb(FORMAT_MAGIC)

#: seconds :meth:`TraceReader.follow` waits between looks at a file that
#: stopped growing
FOLLOW_POLL = 0.1


@attrs.frozen
class Paused:
    """What :meth:`TraceReader.follow` yields when it has read every whole
    record the file holds and waits for more: a reader of its records that
    holds one back (to see what follows it) lets it go now."""


#: the one :class:`Paused`
PAUSED = Paused()


class _Following:
    """How :meth:`TraceReader.follow` waits for the file to grow."""

    def __init__(self, path: str, fd: int, poll: float, idle: Callable[[], None] | None) -> None:
        if poll <= 0:
            raise ValueError(f"poll must be positive, got {poll}")
        self.path = path
        self.poll = poll
        self.idle = idle
        st = os.fstat(fd)
        self.identity = (st.st_dev, st.st_ino)
        self.gone = False

    def wait(self, fd: int, size: int) -> bool:
        """Sleep ``poll`` seconds at a time, calling ``idle`` before each sleep,
        until the file holds more than ``size`` bytes (True), or its path names
        no file or another one (False, once what it held then has been read)."""
        while not self.gone:
            if self.idle is not None:
                self.idle()
            time.sleep(self.poll)
            try:
                st = os.stat(self.path)
                self.gone = (st.st_dev, st.st_ino) != self.identity
            except FileNotFoundError:
                self.gone = True
            if os.fstat(fd).st_size > size:
                return True
        return False


@attrs.frozen
class DamagedRecord:
    """A damaged stretch of a trace that a lenient reader skipped.

    ``record`` is its index (the header is 0; after a resync, the records
    that follow are counted on from it, as if the stretch were one record),
    ``offset`` its first byte, ``size`` how many bytes were skipped, and
    ``error`` what was wrong with it.
    """

    path: str
    record: int
    offset: int
    size: int
    error: TraceError

    def __str__(self) -> str:
        return f"{self.error}; skipped {self.size} bytes"


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

    With ``skip_damaged``, damage is not raised but skipped: a record that is
    whole msgpack but not a valid record (a bad field, a message shorter
    than its header, a sequence number that does not increase) is skipped
    alone; bytes that are not msgpack, or a record over ``limits``, are
    skipped up to the next place a valid record starts (the next
    ``"k": "m"``/``"k": "e"`` map that reads as a whole record with a larger
    seq), or to the end of the file when there is none. Each skip is
    counted in :attr:`damaged_count` and described (the first
    :data:`DAMAGED_KEPT`) in :attr:`damaged`. A header that does not read
    is still an error.

    The format does not interpret a message's bytes, so any length reads;
    ``min_message_bytes`` (the protocol's header size, for a reader that
    decodes them) makes a message record that holds fewer bytes and is not
    marked torn a damaged record.

    Memory: about one read chunk, or the record being read (once as read,
    once as decoded) when it is bigger.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        limits: ReaderLimits = DEFAULT_LIMITS,
        skip_damaged: bool = False,
        min_message_bytes: int = 0,
    ) -> None:
        self.path = os.fspath(path)
        self.limits = limits
        self.skip_damaged = skip_damaged
        self.min_message_bytes = min_message_bytes
        #: the damaged stretches the last pass skipped (the first DAMAGED_KEPT)
        self.damaged: list[DamagedRecord] = []
        #: how many damaged stretches the last pass skipped
        self.damaged_count = 0
        self._last_seq = 0
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
        # without following, no PAUSED is yielded
        return cast(Iterator[Record], self._records(None))

    def follow(self, *, poll: float = FOLLOW_POLL,
               idle: Callable[[], None] | None = None) -> Iterator[Record | Paused]:
        """The records, as iterating yields them, and then those a writer still
        appends: at the end of the file, or at a record not yet whole, it
        yields :data:`PAUSED` (a lenient reader first lets go of the record it
        holds), then, when the consumer comes back, looks again every
        ``poll`` seconds until the file grows, calling ``idle`` before each
        sleep (to flush what was made of the records; what it raises ends
        the iteration and propagates). It ends when the path is unlinked or
        names another file (after reading what the file held then), or when
        the consumer stops; a signal's exception (KeyboardInterrupt) raised
        while it sleeps propagates. Reading only: the writer never waits for
        it."""
        return self._records(_Following(self.path, self._file.fileno(), poll, idle))

    def _records(self, follow: _Following | None) -> Iterator[Record | Paused]:
        self.truncated_after = None
        self.trailing_bytes = 0
        self.skipped = 0
        self.damaged = []
        self.damaged_count = 0
        self._last_seq = 0
        if self.skip_damaged:
            yield from self._lenient(follow)
            return
        for frame in self._frames(self._body_offset, 1, follow):
            if frame is None:
                yield PAUSED
                continue
            index, offset, size, wire = frame
            try:
                record = self._checked(wire, size)
            except TraceError as exc:
                exc.located(path=self.path, record=index, offset=offset)
                raise
            if record is None:
                continue
            self._last_seq = record.seq
            yield record

    def _lenient(self, follow: _Following | None) -> Iterator[Record | Paused]:
        """The records past damage (``skip_damaged``), one record behind the file.

        A seq that does not increase is damage, but which one: a record whose
        seq jumped ahead, or the next whose seq went back? Each record is held
        until the next one is read: when the next one's seq is not above the
        held one's but is above the last yielded, the held one jumped ahead
        and is skipped; otherwise the next one went back and is. When following,
        the held record is let go at each pause (a next one whose seq is not
        above it is then the damaged one)."""
        held: tuple[Record, int, int, int] | None = None  # record, index, offset, size
        yielded = 0
        for frame in self._frames(self._body_offset, 1, follow):
            if frame is None:
                if held is not None:
                    yielded = held[0].seq
                    yield held[0]
                    held = None
                yield PAUSED
                continue
            index, offset, size, wire = frame
            try:
                record = self._record(wire, size)
            except TraceError as exc:
                exc.located(path=self.path, record=index, offset=offset)
                self._damage(exc, size)
                continue
            if record is None:
                continue
            last = yielded if held is None else held[0].seq
            if record.seq <= last:
                if held is not None and record.seq > yielded:
                    jumped, at, where, length = held
                    self._damage(TraceFormatError(
                        f"seq {jumped.seq} after seq {yielded}, then seq {record.seq}: "
                        "its sequence number jumped ahead", field="q (seq)",
                        path=self.path, record=at, offset=where), length)
                    held = None
                else:
                    self._damage(TraceFormatError(
                        f"seq {record.seq} after seq {last}: sequence numbers must increase",
                        field="q (seq)", path=self.path, record=index, offset=offset), size)
                    continue
            if held is not None:
                yielded = held[0].seq
                yield held[0]
            held = (record, index, offset, size)
            self._last_seq = record.seq
        if held is not None:
            yield held[0]

    def _checked(self, wire: Any, size: int) -> Record | None:
        """The record ``wire`` holds (None: skipped), its seq checked against the last one's."""
        record = self._record(wire, size)
        if record is not None and record.seq <= self._last_seq:
            raise TraceFormatError(
                f"seq {record.seq} after seq {self._last_seq}: sequence numbers must increase",
                field="q (seq)",
            )
        return record

    def _damage(self, error: TraceError, size: int) -> None:
        """Count (and keep, up to DAMAGED_KEPT) one skipped damaged stretch."""
        self.damaged_count += 1
        if len(self.damaged) < DAMAGED_KEPT:
            self.damaged.append(DamagedRecord(
                self.path, error.record or 0, error.offset or 0, size, error))

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
            frame = next(frames)
        except StopIteration:
            raise self._torn_header(self.trailing_bytes) from None
        finally:
            frames.close()
        assert frame is not None  # only a follower pauses
        _, _, size, wire = frame
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

    def _frames(self, offset: int, index: int, follow: _Following | None = None,
                ) -> Generator[tuple[int, int, int, Any] | None, None, None]:
        """Yield (index, offset, size, decoded msgpack) of each whole record from ``offset``.

        At the end of the file, records a torn tail in the truncation
        attributes; with ``follow``, yields None first and waits for the file
        to grow (a record not yet whole is not damage), and ends only when
        :meth:`_Following.wait` says the file is gone. Bytes that do not frame
        as msgpack raise, or with ``skip_damaged`` are skipped up to the next
        record (:meth:`_resync`).
        """
        fd = self._file.fileno()
        limits = self.limits
        buf = bytearray()
        base = offset  # file offset of buf[0]
        pos = 0
        while True:
            try:
                try:
                    end = object_end(buf, pos, limits)
                except Incomplete as torn:
                    need = torn.need - pos  # bytes of the record, at least
                    if need > limits.max_record_bytes:
                        raise TraceLimitError(
                            f"record of at least {need} bytes exceeds "
                            f"max_record_bytes ({limits.max_record_bytes})",
                            limit="max_record_bytes",
                            offset=pos,
                        ) from None
                    there = os.fstat(fd).st_size - (base + pos)  # bytes from the record on
                    if need > there or there == len(buf) - pos:
                        if follow is not None and index:
                            yield None
                            if follow.wait(fd, base + pos + there):
                                continue
                        found = None
                        if index and there > 0 and self.skip_damaged and follow is None:
                            found = self._resync(base + pos + 1)
                        if found is not None:  # not a torn tail: damage before a record
                            self._damage(TraceFormatError(
                                f"a record of at least {need} bytes runs past the end of the "
                                f"file ({there} bytes), but a record starts after it",
                                path=self.path, record=index, offset=base + pos,
                            ), found - base - pos)
                            buf, base, pos = bytearray(), found, 0
                            index += 1
                            continue
                        if there > 0:
                            self.truncated_after = index - 1
                            self.trailing_bytes = there
                        return
                    buf = _refill(fd, buf, pos, base + len(buf), min(max(need, CHUNK), there))
                    base += pos
                    pos = 0
                    continue
                if end - pos > limits.max_record_bytes:
                    raise TraceLimitError(
                        f"record of {end - pos} bytes exceeds "
                        f"max_record_bytes ({limits.max_record_bytes})",
                        limit="max_record_bytes",
                        offset=pos,
                    )
                try:
                    wire = msgpack.unpackb(memoryview(buf)[pos:end], raw=False,
                                           strict_map_key=True)
                except ValueError as exc:
                    raise TraceFormatError(f"undecodable msgpack ({exc})", offset=pos) from None
            except TraceError as exc:
                start = base + pos
                exc.offset = start if exc.offset is None else exc.offset + base
                exc.located(path=self.path, record=index)
                if not (self.skip_damaged and index):
                    raise
                found = self._resync(start + 1)
                exc.offset = start
                if found is None:
                    self._damage(exc, os.fstat(fd).st_size - start)
                    return
                self._damage(exc, found - start)
                buf, base, pos = bytearray(), found, 0
                index += 1
                continue
            start, size = base + pos, end - pos
            if size > CHUNK:  # let go of a big record's bytes before it is used
                buf = bytearray(memoryview(buf)[end:])
                base += end
                pos = 0
            else:
                pos = end
            yield index, start, size, wire
            index += 1

    def _resync(self, offset: int) -> int | None:
        """The offset of the first record at or after ``offset`` that reads as a
        whole valid record with a larger seq than the last one, or None."""
        fd = self._file.fileno()
        while True:
            window = os.pread(fd, CHUNK + 4, offset)
            if len(window) < 5:
                return None
            for match in _RECORD_START.finditer(window):
                at = offset + match.start()
                if self._valid_at(at):
                    return at
            offset += len(window) - 4

    def _valid_at(self, offset: int) -> bool:
        """Whether a whole valid record with a larger seq than the last one starts at ``offset``."""
        fd = self._file.fileno()
        data = os.pread(fd, CHUNK, offset)
        while True:
            try:
                end = object_end(data, 0, self.limits)
            except Incomplete as torn:
                if torn.need > self.limits.max_record_bytes:
                    return False
                more = os.pread(fd, torn.need - len(data), offset + len(data))
                if not more:
                    return False
                data += more
                continue
            except TraceError:
                return False
            break
        try:
            wire = msgpack.unpackb(memoryview(data)[:end], raw=False, strict_map_key=True)
            return self._checked(wire, end) is not None
        except (ValueError, TraceError):
            return False

    def _record(self, wire: Any, size: int) -> Record | None:
        """Build one record from its wire form, or None if it is skipped."""
        if not isinstance(wire, dict):
            raise TraceFormatError(f"record is of type {type(wire).__name__}, expected a map")
        for step in self._steps:
            wire = step.record(wire)
        kind = wire.get("k")
        if kind == "m":
            message = MessageRecord.from_wire(wire, limits=self.limits)
            if len(message.data) < self.min_message_bytes and not message.torn:
                raise TraceFormatError(
                    f"a message of {len(message.data)} bytes, shorter than the "
                    f"{self.min_message_bytes}-byte header, and not marked torn (x: {TORN!r})",
                    field="b (data)",
                )
            return message
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


def _refill(fd: int, buf: bytearray, pos: int, offset: int, size: int) -> bytearray:
    """A new buffer: ``buf[pos:]`` then up to ``size - len(buf[pos:])`` bytes more of
    the file from ``offset`` (fewer at its end), read in place, without a
    second copy of a large record."""
    kept = len(buf) - pos
    new = bytearray(max(size, kept + 1))
    new[:kept] = memoryview(buf)[pos:]
    view = memoryview(new)
    filled = kept
    while filled < len(new):
        got = os.preadv(fd, [view[filled:]], offset + filled - kept)
        if not got:
            break
        filled += got
    view.release()
    if filled < len(new):
        del new[filled:]
    return new
