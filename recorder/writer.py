"""Writing a trace: one msgpack record appended at a time, each handed to the OS at once."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import msgpack  # type: ignore[import-untyped]

from recorder.closing import Closing
from recorder.errors import TraceLimitError
from recorder.framing import object_end
from recorder.limits import DEFAULT_LIMITS
from recorder.records import (
    EventPacker,
    EventRecord,
    FdRecord,
    MessageRecord,
    PlainMessagePacker,
    Record,
    TraceHeader,
    bin_header,
    data_depth,
    event_wire,
    message_wire,
)
from recorder.side import Direction

__all__ = ["RESERVE", "RETRY_INTERVAL", "Appender", "TraceWriter", "use_appender"]

#: bytes kept allocated on disk beyond the end of the file, so that the events
#: saying the disk is full (and the sessions' closes) still fit when it is
RESERVE = 64 * 1024
#: how far beyond the reserve one allocation reaches (one fallocate per this much)
_GROW = 1024 * 1024
#: seconds between attempts to resume recording after the disk filled up
RETRY_INTERVAL = 1.0
#: the file-system errors that mean "no room", not "broken"
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
#: messages up to this size are packed whole; larger ones go out with writev,
#: their bytes never copied into the record
_INLINE = 4096
_FALLOC_FL_KEEP_SIZE = 1
#: an event written with a message: (kind, data), or (EventPacker, its field's value)
Event = tuple[str, dict[str, Any]] | tuple[EventPacker, int]


class Appender:
    """A trace file's lock, and the state every writer of it shares: fd, the
    seq of the last record, size, the allocated end, and whether plain
    appends may go the short way (``fast``). The proxy's C lane appends
    through its own class with the same attributes and methods
    (:func:`use_appender`)."""

    def __init__(self) -> None:
        self.fd = -1
        self.seq = 0
        self.size = 0
        self.reserved_end = 0
        self.reserve = 0
        self.fast = 0
        self.inline_max = 0
        self._lock = threading.Lock()

    def acquire(self) -> bool:
        return self._lock.acquire()

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> Appender:
        self._lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


_appender_type: type[Appender] = Appender


class _Shared:
    """An attribute of a :class:`TraceWriter` that lives in its appender."""

    def __init__(self, field: str) -> None:
        self.field = field

    def __get__(self, writer: TraceWriter, owner: type | None = None) -> int:
        value: int = getattr(writer.appender, self.field)
        return value

    def __set__(self, writer: TraceWriter, value: int) -> None:
        setattr(writer.appender, self.field, value)


def use_appender(kind: type[Appender]) -> None:
    """Make writers created from now on use ``kind`` for their shared state
    (:mod:`vfioproxy.proxy.fastpath` gives its C class, which the C lane appends
    through)."""
    global _appender_type
    _appender_type = kind


def _fallocate_function() -> Any:
    try:
        function = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    function.restype = ctypes.c_int
    return function


_FALLOCATE = _fallocate_function()


class TraceWriter(Closing):
    """A trace file being recorded.

    Creating one creates ``path`` with mode 0600 (a trace holds device
    traffic and may hold guest memory), refusing to replace an existing file
    unless ``overwrite`` and never following a symlink, and writes
    ``header``. Each ``write_*``/``append_*`` call packs one record (or a
    message and the events that go with it), numbers it (``seq`` 1, 2, ...)
    and appends it with a single ``write(2)``, so once it returns the record
    survives the process being killed; with ``fsync`` it is also forced to
    disk, which costs a disk round trip per record. Nothing is kept in memory
    between records. A failed write is cut off the file again, so the file
    stays a sequence of whole records. The writer refuses a record that a
    reader with the default limits would refuse (:class:`TraceLimitError`).
    Thread-safe: records from several threads are appended whole, one after
    the other.

    Disk space: the writer keeps :data:`RESERVE` bytes allocated beyond the
    end of the file (``fallocate``, where the file system has it). By default
    a write that finds no room raises :class:`OSError`. With
    ``pause_when_full`` (what the proxy uses) it instead writes a
    ``disk_full`` event into the reserve and stops recording messages
    (:meth:`append_message` returns 0 and counts them) while events still go
    into the reserve; every :data:`RETRY_INTERVAL` seconds it tries again,
    and once there is room it writes ``recording_resumed`` with what was not
    recorded, and goes on.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        header: TraceHeader,
        *,
        fsync: bool = False,
        overwrite: bool = False,
        pause_when_full: bool = False,
        dir_fd: int | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.header = header
        self._fsync = fsync
        self._pause_when_full = pause_when_full
        self._packer = msgpack.Packer(use_bin_type=True)
        self._plain: dict[tuple[int, Direction], PlainMessagePacker] = {}
        #: the file's lock, and the state every writer of it shares: fd, last seq,
        #: size, allocated end (the proxy's C lane appends through it too)
        self.appender = _appender_type()
        self.appender.reserve = RESERVE
        self.appender.inline_max = _INLINE
        self._lock = self.appender
        #: while the disk is full: (since monotonic, messages, bytes, events) not recorded
        self._lost_counts: list[int] | None = None
        self._retry_at = 0.0
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
        # with dir_fd, the file is the last component of path inside that directory
        name = self.path if dir_fd is None else os.path.basename(self.path)
        self._fd = os.open(
            name, flags | (os.O_TRUNC if overwrite else os.O_EXCL), 0o600, dir_fd=dir_fd
        )
        self._allow_fast()
        try:
            os.fchmod(self._fd, 0o600)  # an overwritten file keeps its mode otherwise
            self._reserve(0)
            self._append(header.to_wire(), "max_event_bytes", check=True)
        except BaseException:
            self.close()
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=dir_fd)
            raise

    # the shared state lives in the appender (read and changed with its lock held)
    _seq = _Shared("seq")
    _size = _Shared("size")
    _reserved_end = _Shared("reserved_end")

    @property
    def _fd(self) -> int:
        return self.appender.fd

    @_fd.setter
    def _fd(self, value: int) -> None:
        self.appender.fd = value
        self._allow_fast()

    @property
    def _lost(self) -> list[int] | None:
        return self._lost_counts

    @_lost.setter
    def _lost(self, value: list[int] | None) -> None:
        self._lost_counts = value
        self._allow_fast()

    def _allow_fast(self) -> None:
        """Let the C lane append plain records while nothing needs the careful way."""
        self.appender.fast = int(self._fd >= 0 and self._lost_counts is None and not self._fsync)

    def event_packer(self, session: int, kind: str, data: dict[str, Any],
                     field: str) -> EventPacker:
        """An :class:`~recorder.records.EventPacker` of ``session``'s ``kind``
        events, ``field`` of ``data`` varying (an event a reader would refuse
        is refused here, once). In :meth:`append_message`'s ``events``,
        ``(packer, value)`` stands for ``(kind, data with field=value)``."""
        widest = {**data, field: (1 << 64) - 1}
        self._check(EventRecord(1 << 62, session, 1 << 62, kind, widest).to_wire(),
                    "max_event_bytes", check=True)
        return EventPacker(self._packer, session, kind, data, field)

    def plain_parts(self, session: int, direction: Direction) -> tuple[bytes, bytes, bytes]:
        """The parts of a plain message record of ``session`` and ``direction``
        that never change, for the C lane (:meth:`PlainMessagePacker.parts`)."""
        return self._plain_packer(session, direction).parts()

    @property
    def seq(self) -> int:
        """The ``seq`` of the last record written (0 before the first)."""
        return self._seq

    @property
    def bytes_written(self) -> int:
        """The size of the file: header and every record written so far."""
        return self._size

    @property
    def closed(self) -> bool:
        return self._fd < 0

    @property
    def paused(self) -> bool:
        """True while the disk is full and messages are not recorded."""
        return self._lost is not None

    def write_message(
        self,
        session: int,
        direction: Direction,
        t_ns: int,
        data: bytes,
        fds: Sequence[FdRecord] = (),
    ) -> MessageRecord:
        """Append one message with the fds it carried; returns the record written."""
        seq = self.append_message(session, direction, t_ns, data, fds)
        return MessageRecord(seq, session, direction, t_ns, data, tuple(fds))

    def append_message(
        self,
        session: int,
        direction: Direction,
        t_ns: int,
        data: bytes,
        fds: Sequence[FdRecord] = (),
        *,
        length: int | None = None,
        torn: bool = False,
        events: Sequence[Event] = (),
    ) -> int:
        """Append one message record (and ``events``, each ``(kind, data)``, in
        the same ``write``), without building record objects: the proxy's path.

        ``length`` is the message's length on the wire when ``data`` holds
        only its first bytes; ``torn`` marks a message its sender never
        finished (FORMAT.md §4). Returns the message's ``seq`` (0 when the
        disk is full and recording is paused, see the class docstring).
        """
        if not fds and length is None and not torn:
            return self._append_plain(session, direction, t_ns, data, events)
        return self._append_whole(session, direction, t_ns, data, fds, length, torn, events)

    def _append_whole(
        self,
        session: int,
        direction: Direction,
        t_ns: int,
        data: bytes,
        fds: Sequence[FdRecord],
        length: int | None,
        torn: bool,
        events: Sequence[Event],
    ) -> int:
        """:meth:`append_message` the careful way: any record, room checked,
        the disk being full handled."""
        if len(fds) > DEFAULT_LIMITS.max_fds:
            raise TraceLimitError(
                f"{len(fds)} fds exceed max_fds ({DEFAULT_LIMITS.max_fds})", limit="max_fds"
            )
        with self._lock:
            if self._lost is not None and not self._resume():
                self._count_lost(len(data), len(events))
                return 0
            seq = self._seq + 1
            wire = message_wire(seq, session, direction, t_ns, fds, length=length, torn=torn)
            if len(data) <= _INLINE:
                wire["b"] = data
                blob = self._packer.pack(wire)
                if events:
                    blob = b"".join((blob, *self._event_blobs(seq, session, t_ns, events)))
                pieces = [blob]
            else:
                wire["b"] = b""
                blob = self._packer.pack(wire)[:-2] + bin_header(len(data))  # drop b""'s c4 00
                if len(blob) + len(data) > DEFAULT_LIMITS.max_record_bytes:
                    raise TraceLimitError(
                        f"record of {len(blob) + len(data)} bytes exceeds max_record_bytes "
                        f"({DEFAULT_LIMITS.max_record_bytes})",
                        limit="max_record_bytes",
                    )
                # one write: the record, its bytes not copied, then its events
                pieces = [blob, data, *self._event_blobs(seq, session, t_ns, events)]
            if self._write(pieces, message=True):
                self._seq = seq + len(events)
                return seq
            self._count_lost(len(data), len(events))
            return 0

    def _append_plain(
        self,
        session: int,
        direction: Direction,
        t_ns: int,
        data: bytes,
        events: Sequence[Event] = (),
    ) -> int:
        """:meth:`append_message` of a message without fds, length or torn mark
        (nearly every one), kept short: packed by a per-direction
        :class:`~recorder.records.PlainMessagePacker`, with its events (fault
        injection's) one plain write while the reserve has room; anything else
        the careful way."""
        app = self.appender
        with app:
            plain = self._plain.get((session, direction)) or self._plain_packer(session,
                                                                                direction)
            if len(data) <= _INLINE and app.fast:
                seq = app.seq + 1
                blob = plain(seq, t_ns, data)
                if events:
                    blob = b"".join((blob, *self._event_blobs(seq, session, t_ns, events)))
                if app.size + len(blob) + RESERVE <= app.reserved_end:
                    try:
                        written = os.write(app.fd, blob)
                    except OSError:
                        written = -1
                    if written == len(blob):
                        app.size += written
                        app.seq = seq + len(events)
                        return seq
                    self._cut_back()  # and go the careful way below
        return self._append_whole(session, direction, t_ns, data, (), None, False, events)

    def _plain_packer(self, session: int, direction: Direction) -> PlainMessagePacker:
        plain = self._plain.get((session, direction))
        if plain is None:
            plain = PlainMessagePacker(self._packer, session, direction)
            self._plain[(session, direction)] = plain
        return plain

    def _count_lost(self, size: int, events: int) -> None:
        if self._lost is None:
            self._lost = [time.monotonic_ns(), 0, 0, 0]
        self._lost[1] += 1
        self._lost[2] += size
        self._lost[3] += events

    def write_event(
        self, session: int | None, kind: str, t_ns: int, data: dict[str, Any] | None = None
    ) -> EventRecord:
        """Append one event (``session`` None: proxy-wide); returns the record written.

        While the disk is full, events go into the reserve; one that does not
        fit is counted and the record returned has ``seq`` 0.
        """
        with self._lock:
            record = EventRecord(self._seq + 1, session, t_ns, kind, {} if data is None else data)
            seq = self._append_event(self._check(record.to_wire(), "max_event_bytes", check=True))
        return record if seq else EventRecord(0, session, t_ns, kind, record.data)

    def append_event(
        self, session: int | None, kind: str, t_ns: int, data: dict[str, Any]
    ) -> int:
        """:meth:`write_event` without building the record (the proxy's path):
        ``data`` must hold only what a record may (string keys; maps, lists,
        strings, bytes, numbers, booleans, None). Returns its ``seq`` (0: not
        written, the disk being full)."""
        with self._lock:
            return self._append_event(self._event_blob(self._seq + 1, session, t_ns, kind, data))

    def copy_record(self, record: Record) -> int:
        """Append ``record`` as it is, its ``seq`` included: what a tool that
        slices or merges traces writes (FORMAT.md §7 lets such a file have gaps
        in ``seq``). ``record.seq`` must exceed the last ``seq`` written
        (:class:`ValueError` otherwise, nothing written); a record a reader
        would refuse raises :class:`TraceLimitError`. Returns the ``seq``."""
        message = isinstance(record, MessageRecord)
        with self._lock:
            if record.seq <= self._seq:
                raise ValueError(f"cannot write seq {record.seq} after seq {self._seq}: "
                                 "sequence numbers must increase")
            blob = self._check(record.to_wire(),
                               "max_record_bytes" if message else "max_event_bytes", check=True)
            if not self._write([blob], message=message):
                raise OSError(errno.ENOSPC, f"{self.path}: no room for record {record.seq}")
            self._seq = record.seq
        return record.seq

    def _append_event(self, blob: bytes) -> int:
        """Append one packed event numbered ``seq + 1`` (the lock held): its seq, or 0
        when there is no room for it (counted while the disk is full)."""
        if not self._write([blob], message=False):
            if self._lost is not None:
                self._lost[3] += 1
            return 0
        self._seq += 1
        return self._seq

    def close(self) -> None:
        """Give back the reserve and close the file; records already written
        stay. Closing twice is harmless."""
        with self._lock:
            if self._fd >= 0:
                fd, self._fd = self._fd, -1
                with contextlib.suppress(OSError):
                    if self._reserved_end > self._size:
                        os.ftruncate(fd, self._size)  # frees the blocks beyond the end
                os.close(fd)


    # ------------------------------------------------------------------ internals

    def _event_blobs(
        self, seq: int, session: int, t_ns: int, events: Sequence[Event]
    ) -> list[bytes]:
        """The events written with message ``seq`` (see :meth:`_event_blob`)."""
        return [kind(i, t_ns, data) if type(kind) is EventPacker  # type: ignore[arg-type]
                else self._event_blob(i, session, t_ns, kind, data)  # type: ignore[arg-type]
                for i, (kind, data) in enumerate(events, start=seq + 1)]

    def _event_blob(
        self, seq: int, session: int | None, t_ns: int, kind: str, data: dict[str, Any]
    ) -> bytes:
        """An event packed without building (and validating) an
        :class:`EventRecord`. A reader's limits still hold: a blob smaller than
        ``max_objects`` bytes cannot hold more objects nor a longer string than
        allowed, so only the nesting needs a look; anything larger gets the
        full check."""
        limits = DEFAULT_LIMITS
        blob: bytes = self._packer.pack(event_wire(seq, session, t_ns, kind, data))
        small = len(blob) <= min(limits.max_objects, limits.max_str_bytes)
        if not small or data_depth(data, limits.max_depth) > limits.max_depth - 2:
            blob = self._check(EventRecord(seq, session, t_ns, kind, data).to_wire(),
                               "max_event_bytes", check=True)
        return blob

    def _check(self, wire: dict[str, Any], limit: str, *, check: bool = False) -> bytes:
        """Pack ``wire``, refusing it when its size exceeds ``limit`` (or, with
        ``check``, its nesting, object count or a string size exceeds theirs)."""
        if self._fd < 0:
            raise ValueError(f"cannot write to {self.path}: the TraceWriter is closed")
        blob: bytes = self._packer.pack(wire)
        max_bytes: int = getattr(DEFAULT_LIMITS, limit)
        if len(blob) > max_bytes:
            raise TraceLimitError(
                f"record of {len(blob)} bytes exceeds {limit} ({max_bytes})", limit=limit
            )
        if check:
            try:
                object_end(blob, 0, DEFAULT_LIMITS)
            except TraceLimitError as exc:
                exc.offset = None  # an offset into the refused record means nothing here
                raise
        return blob

    def _append(self, wire: dict[str, Any], limit: str, *, check: bool = False) -> None:
        blob = self._check(wire, limit, check=check)
        if not self._write([blob], message=False):
            raise OSError(errno.ENOSPC, f"{self.path}: no room for the trace header")

    def _write(self, pieces: list[bytes], *, message: bool) -> bool:
        """Append ``pieces`` as one write; False when the disk has no room for
        them (only with ``pause_when_full``; otherwise that raises)."""
        if self._fd < 0:
            raise ValueError(f"cannot write to {self.path}: the TraceWriter is closed")
        total = sum(len(piece) for piece in pieces)
        if self._lost is None:
            try:
                self._reserve(total)
            except OSError as exc:
                if not self._pause_when_full or exc.errno not in _FULL:
                    raise
                self._pause(exc)
        if self._lost is not None and (message or self._size + total > self._reserved_end):
            return False  # messages wait for room; events go into the reserve while it lasts
        try:
            written = os.writev(self._fd, pieces) if len(pieces) > 1 else os.write(
                self._fd, pieces[0])
            while written < total:
                rest = b"".join(pieces)[written:]
                written += os.write(self._fd, rest)
            if self._fsync:
                os.fsync(self._fd)
        except BaseException as exc:
            self._cut_back()
            if (
                self._pause_when_full
                and isinstance(exc, OSError)
                and exc.errno in _FULL
                and self._fd >= 0
            ):
                self._pause(exc)
                return False
            raise
        self._size += total
        return True

    def _reserve(self, upcoming: int) -> None:
        """Keep :data:`RESERVE` bytes allocated beyond what is about to be written."""
        need = self._size + upcoming + RESERVE
        if need <= self._reserved_end or _FALLOCATE is None:
            return
        start = max(self._reserved_end, self._size)
        end = need + _GROW
        if _FALLOCATE(self._fd, _FALLOC_FL_KEEP_SIZE, start, end - start) != 0:
            err = ctypes.get_errno()
            if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                self._reserved_end = 1 << 62  # no fallocate here: nothing to keep
                return
            raise OSError(err, f"{self.path}: {os.strerror(err)}")
        self._reserved_end = end

    def _pause(self, exc: OSError) -> None:
        """The disk is full: say so (from the reserve) and stop recording messages."""
        if self._lost is None:
            self._lost = [time.monotonic_ns(), 0, 0, 0]
            self._retry_at = time.monotonic() + RETRY_INTERVAL
            text = f"{self.path}: {exc.strerror or exc}: recording of messages paused"
            with contextlib.suppress(OSError, TraceLimitError):
                blob = self._event_blob(self._seq + 1, None, time.monotonic_ns(), "disk_full",
                                        {"text": text, "errno": exc.errno})
                if self._write([blob], message=False):
                    self._seq += 1

    def _resume(self) -> bool:
        """Try to leave the paused state (at most every RETRY_INTERVAL)."""
        assert self._lost is not None
        now = time.monotonic()
        if now < self._retry_at:
            return False
        self._retry_at = now + RETRY_INTERVAL
        try:
            self._reserve(_GROW)
        except OSError:
            return False
        since, messages, size, events = self._lost
        self._lost = None
        self._append_event(self._event_blob(self._seq + 1, None, time.monotonic_ns(),
                                            "recording_resumed", {
            "messages": messages, "bytes": size, "events": events,
            "paused_ns": time.monotonic_ns() - since,
        }))
        return self._lost is None

    def _cut_back(self) -> None:
        """Remove a partly written record; if that fails too, stop writing."""
        try:
            os.ftruncate(self._fd, self._size)
        except OSError:
            self._drop_fd()

    def _drop_fd(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)
