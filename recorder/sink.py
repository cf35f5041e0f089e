"""Where a recording goes: one trace for every session, or one file per session."""

from __future__ import annotations

import contextlib
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

from recorder.closing import Closing
from recorder.errors import TraceError
from recorder.records import TraceHeader
from recorder.writer import TraceWriter

SOURCE = "vfioproxy record"


#: how many names a session's file tries in a directory before giving up
_MAX_NAME_ATTEMPTS = 1000


class TraceSink(Closing):
    """Trace writers for a proxy's sessions.

    ``path`` is a file (every session in it) or, when it ends with ``/`` or
    is an existing directory, a directory that gets one file per session
    (``<start time>-s<session>.trace``, ``-2``... appended when a recording
    that started in the same second took the name). ``info`` goes into each
    header.
    Files are created 0600 and a directory the sink makes 0700 (traces hold
    device traffic and may hold guest memory); neither the file nor the
    directory may be a symlink, and files inside the directory are opened
    without following one. Writers pause recording when the disk is full
    (:class:`~recorder.writer.TraceWriter`, ``pause_when_full``) instead of
    failing the session.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        info: dict[str, Any] | None = None,
        fsync: bool = False,
        overwrite: bool = False,
    ) -> None:
        text = os.fspath(path)
        self.info = dict(info or {})
        self.fsync = fsync
        self.path = Path(text)
        _refuse_symlink(self.path)
        self.per_session = text.endswith("/") or self.path.is_dir()
        self._writers: dict[int, TraceWriter] = {}
        self._closed: list[Path] = []
        self._shared: TraceWriter | None = None
        self._dir_fd: int | None = None
        self._lock = threading.Lock()  # writers are asked for from forwarding threads
        self._stamp = time.strftime("%Y%m%d-%H%M%S")
        if self.per_session:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            _refuse_symlink(self.path)
            self._dir_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                   | os.O_CLOEXEC)
        else:
            self._shared = TraceWriter(
                self.path, TraceHeader.now(SOURCE, self.info), fsync=fsync, overwrite=overwrite,
                pause_when_full=True,
            )

    def shared_writer(self) -> TraceWriter | None:
        """The one writer of a single-file sink (None per session)."""
        return self._shared

    def writer_for(self, session: int) -> TraceWriter:
        if self._shared is not None:
            return self._shared
        writer = self._writers.get(session)
        if writer is None:
            with self._lock:
                writer = self._writers.get(session)
                if writer is None:
                    writer = self._session_writer(session)
                    self._writers[session] = writer
        return writer

    def _session_writer(self, session: int) -> TraceWriter:
        """A new file for ``session``: ``<start>-s<session>.trace``, or with
        ``-2``, ``-3``... when another recording into the same directory that
        started in the same second already has that name (never replaced)."""
        info = {**self.info, "session": session}
        for attempt in range(1, _MAX_NAME_ATTEMPTS + 1):
            suffix = "" if attempt == 1 else f"-{attempt}"
            try:
                return TraceWriter(
                    self.path / f"{self._stamp}-s{session}{suffix}.trace",
                    TraceHeader.now(SOURCE, info), fsync=self.fsync, pause_when_full=True,
                    dir_fd=self._dir_fd,
                )
            except FileExistsError:
                continue
        raise TraceError(f"{self.path}: {_MAX_NAME_ATTEMPTS} files named "
                         f"{self._stamp}-s{session}[-N].trace exist already", path=self.path)

    def files(self) -> list[Path]:
        """Every file this sink has written to."""
        if self._shared is not None:
            return [self.path]
        with self._lock:
            return sorted({*self._closed, *(Path(w.path) for w in self._writers.values())})

    def session_done(self, session: int) -> None:
        with self._lock:
            writer = self._writers.pop(session, None)
            if writer is not None:
                writer.close()
                self._closed.append(Path(writer.path))

    def close(self) -> None:
        with self._lock:
            for writer in self._writers.values():
                writer.close()
                self._closed.append(Path(writer.path))
            self._writers.clear()
            if self._shared is not None:
                self._shared.close()
            if self._dir_fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._dir_fd)
                self._dir_fd = None



def _refuse_symlink(path: Path) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        raise TraceError(f"{path} is a symlink; a trace is never written through one", path=path)
