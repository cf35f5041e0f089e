"""Writing a trace: one msgpack record appended at a time, each handed to the OS at once."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import msgpack  # type: ignore[import-untyped]

from recorder.errors import TraceLimitError
from recorder.framing import object_end
from recorder.limits import DEFAULT_LIMITS
from recorder.records import EventRecord, FdRecord, MessageRecord, TraceHeader
from vfioproxy.side import Direction

__all__ = ["TraceWriter"]


class TraceWriter:
    """A trace file being recorded.

    Creating one creates ``path`` (refusing to replace an existing file
    unless ``overwrite``) and writes ``header``. Each ``write_*`` call packs
    one record, numbers it (``seq`` 1, 2, ...) and appends it with a single
    ``write(2)``, so once it returns the record survives the process being
    killed; with ``fsync`` it is also forced to disk, which costs a disk
    round trip per record. Nothing is kept in memory between records. A
    failed write is cut off the file again, so the file stays a sequence of
    whole records. The writer refuses a record that a reader with the
    default limits would refuse (:class:`TraceLimitError`). Thread-safe: records
    from several threads are appended whole, one after the other.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        header: TraceHeader,
        *,
        fsync: bool = False,
        overwrite: bool = False,
    ) -> None:
        self.path = os.fspath(path)
        self.header = header
        self._fsync = fsync
        self._packer = msgpack.Packer(use_bin_type=True)
        self._seq = 0
        self._size = 0
        self._lock = threading.Lock()
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        self._fd = os.open(path, flags | (os.O_TRUNC if overwrite else os.O_EXCL), 0o666)
        try:
            self._append(header.to_wire(), "max_event_bytes", check=True)
        except BaseException:
            self.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise

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
    ) -> int:
        """:meth:`write_message` without building the record (the proxy's fast
        path); returns its ``seq``."""
        if len(fds) > DEFAULT_LIMITS.max_fds:
            raise TraceLimitError(
                f"{len(fds)} fds exceed max_fds ({DEFAULT_LIMITS.max_fds})", limit="max_fds"
            )
        with self._lock:
            seq = self._seq + 1
            self._append(
                # the wire form of MessageRecord (records.py), built directly
                {"k": "m", "q": seq, "s": session, "d": direction.value, "t": t_ns,
                 "f": [fd.to_wire() for fd in fds], "b": data},
                "max_record_bytes",
            )
            self._seq = seq
        return seq

    def write_event(
        self, session: int | None, kind: str, t_ns: int, data: dict[str, Any] | None = None
    ) -> EventRecord:
        """Append one event (``session`` None: proxy-wide); returns the record written."""
        with self._lock:
            record = EventRecord(self._seq + 1, session, t_ns, kind, {} if data is None else data)
            self._append(record.to_wire(), "max_event_bytes", check=True)
            self._seq = record.seq
        return record

    def close(self) -> None:
        """Close the file; records already written stay. Closing twice is harmless."""
        with self._lock:
            if self._fd >= 0:
                fd, self._fd = self._fd, -1
                os.close(fd)

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _append(self, wire: dict[str, Any], limit: str, *, check: bool = False) -> None:
        """Pack ``wire`` and append it, unless its size exceeds ``limit`` (or, with
        ``check``, its nesting, object count or a string size exceeds theirs)."""
        if self._fd < 0:
            raise ValueError(f"cannot write to {self.path}: the TraceWriter is closed")
        blob = self._packer.pack(wire)
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
        try:
            written = os.write(self._fd, blob)
            while written < len(blob):
                written += os.write(self._fd, memoryview(blob)[written:])
            if self._fsync:
                os.fsync(self._fd)
        except BaseException:
            self._cut_back()
            raise
        self._size += len(blob)

    def _cut_back(self) -> None:
        """Remove a partly written record; if that fails too, stop writing."""
        try:
            os.ftruncate(self._fd, self._size)
        except OSError:
            self.close()
