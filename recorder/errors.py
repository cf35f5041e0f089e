"""Errors raised while reading, writing or importing traces.

Every error says where it happened as far as that is known: the file
(``path``), the rawcap ``line``, the trace ``record`` index (0 is the header)
and the byte ``offset`` in the file, and the ``field`` at fault.
"""

from __future__ import annotations

import os

__all__ = [
    "TraceError",
    "TraceFormatError",
    "TraceLimitError",
    "TraceVersionError",
    "VfioProxyError",
]


class VfioProxyError(Exception):
    """Base class of every error vfioproxy (and this package) raises on purpose.

    The project's one exception root is defined here, in its lowest layer,
    so that the trace errors derive from it without this package importing
    ``vfioproxy``; :mod:`vfioproxy.errors` re-exports it with the rest of the
    hierarchy."""


class TraceError(VfioProxyError):
    """Base class of the trace errors; ``str()`` puts the location first."""

    def __init__(
        self,
        msg: str,
        *,
        path: str | os.PathLike[str] | None = None,
        line: int | None = None,
        record: int | None = None,
        offset: int | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(msg)
        self.msg = msg
        self.path = None if path is None else os.fspath(path)
        self.line = line
        self.record = record
        self.offset = offset
        self.field = field

    def located(
        self,
        *,
        path: str | os.PathLike[str] | None = None,
        record: int | None = None,
        offset: int | None = None,
    ) -> TraceError:
        """Fill in ``path``, ``record`` and ``offset`` where still unknown; returns ``self``."""
        if self.path is None and path is not None:
            self.path = os.fspath(path)
        if self.record is None:
            self.record = record
        if self.offset is None:
            self.offset = offset
        return self

    def __str__(self) -> str:
        parts = []
        if self.path is not None:
            parts.append(self.path)
        if self.line is not None:
            parts.append(f"line {self.line}")
        if self.record is not None:
            parts.append(f"record {self.record}")
        if self.offset is not None:
            parts.append(f"byte offset {self.offset}")
        if self.field is not None:
            parts.append(f"field {self.field}")
        return ": ".join([*parts, self.msg])


class TraceFormatError(TraceError):
    """The content is not a valid trace (corrupted, hostile or not a trace)."""


class TraceLimitError(TraceError):
    """A record or field is larger than the reader's limits allow.

    ``limit`` names the :class:`recorder.limits.ReaderLimits` attribute that
    was exceeded, so the message can tell the user which knob to turn.
    """

    def __init__(
        self,
        msg: str,
        *,
        limit: str,
        path: str | os.PathLike[str] | None = None,
        record: int | None = None,
        offset: int | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(msg, path=path, record=record, offset=offset, field=field)
        self.limit = limit


class TraceVersionError(TraceError):
    """The trace's format version cannot be read by this vfioproxy.

    ``found`` is the file's (major, minor); ``supported`` the major version
    this code reads natively.
    """

    def __init__(
        self,
        found: tuple[int, int],
        supported: int,
        *,
        path: str | os.PathLike[str] | None = None,
    ) -> None:
        version = f"{found[0]}.{found[1]}"
        if found[0] > supported:
            msg = (
                f"trace format {version} is newer than this vfioproxy supports "
                f"({supported}.x); upgrade vfioproxy"
            )
        else:
            msg = (
                f"trace format {version} is older than any this vfioproxy can migrate "
                f"(it reads {supported}.x)"
            )
        super().__init__(msg, path=path, record=0)
        self.found = found
        self.supported = supported
