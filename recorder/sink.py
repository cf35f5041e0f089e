"""Where a recording goes: one trace for every session, or one file per session."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from recorder.records import TraceHeader
from recorder.writer import TraceWriter

SOURCE = "vfioproxy record"


class TraceSink:
    """Trace writers for a proxy's sessions.

    ``path`` is a file (every session in it) or, when it ends with ``/`` or
    is an existing directory, a directory that gets one file per session
    (``<start time>-s<session>.trace``). ``info`` goes into each header.
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
        self.per_session = text.endswith("/") or Path(text).is_dir()
        self.path = Path(text)
        self._writers: dict[int, TraceWriter] = {}
        self._shared: TraceWriter | None = None
        self._lock = threading.Lock()  # writers are asked for from forwarding threads
        self._stamp = time.strftime("%Y%m%d-%H%M%S")
        if self.per_session:
            self.path.mkdir(parents=True, exist_ok=True)
        else:
            self._shared = TraceWriter(
                self.path, TraceHeader.now(SOURCE, self.info), fsync=fsync, overwrite=overwrite
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
                    target = self.path / f"{self._stamp}-s{session}.trace"
                    info = {**self.info, "session": session}
                    writer = TraceWriter(target, TraceHeader.now(SOURCE, info), fsync=self.fsync)
                    self._writers[session] = writer
        return writer

    def files(self) -> list[Path]:
        """Every file this sink has written to."""
        if self._shared is not None:
            return [self.path]
        return sorted(self.path.glob(f"{self._stamp}-s*.trace"))

    def session_done(self, session: int) -> None:
        writer = self._writers.pop(session, None)
        if writer is not None:
            writer.close()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
        if self._shared is not None:
            self._shared.close()

    def __enter__(self) -> TraceSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
