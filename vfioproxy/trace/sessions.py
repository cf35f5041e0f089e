"""Which sessions a trace holds, and the one check that a session asked for is there.

``trace show --session``, ``trace stats --session`` and replay's ``--session``
all go through :meth:`TraceSessions.require`, so a session the trace does not
hold gets the same error everywhere, naming the sessions that are there.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import attrs

from recorder.records import MessageRecord, Record
from vfioproxy.errors import UsageError
from vfioproxy.trace.reading import open_trace

__all__ = ["NoSuchSessionError", "TraceSessions"]


class NoSuchSessionError(UsageError):
    """The trace holds no such session (or none with messages where they are needed)."""


def _listed(sessions: Iterable[int]) -> str:
    return ", ".join(map(str, sessions)) or "none"


@attrs.frozen
class TraceSessions:
    """The sessions of a trace: those with messages, and those with events only
    (e.g. a client whose server could not be reached)."""

    path: str
    with_messages: tuple[int, ...]
    events_only: tuple[int, ...]

    @classmethod
    def of(cls, records: Iterable[Record], *, path: str = "<records>") -> TraceSessions:
        """The sessions of ``records`` (proxy-wide events belong to none)."""
        talking: set[int] = set()
        seen: set[int] = set()
        for record in records:
            if record.session is None:
                continue
            seen.add(record.session)
            if isinstance(record, MessageRecord):
                talking.add(record.session)
        return cls(path, tuple(sorted(talking)), tuple(sorted(seen - talking)))

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> TraceSessions:
        """The sessions of the trace at ``path`` (read once, start to end or torn
        tail, past damaged records: the tool's own pass reports them)."""
        with open_trace(path) as reader:
            return cls.of(reader, path=os.fspath(path))

    def require(self, session: int, *, messages: bool = False) -> None:
        """Raise :class:`NoSuchSessionError` unless the trace holds ``session``
        (with messages, when ``messages``), naming the sessions it holds."""
        if session in self.with_messages or (not messages and session in self.events_only):
            return
        there = f"sessions with messages: {_listed(self.with_messages)}"
        if self.events_only:
            there += f"; with events only: {_listed(self.events_only)}"
        what = "with messages" if messages and session in self.events_only else "in the trace"
        raise NoSuchSessionError(f"{self.path}: no session {session} {what} ({there})")
