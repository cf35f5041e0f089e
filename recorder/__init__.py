"""recorder: the vfioproxy trace format (records, writer, reader, sink, limits, migration).

The format is specified in ``recorder/FORMAT.md``. This package imports
nothing from ``vfioproxy`` (an import-linter contract checks it): a tool in
another language can be written from FORMAT.md alone, and reading the
records back as protocol messages (decoding, statistics, the listing of
``vfioproxy trace show``, rawcap import) lives in :mod:`vfioproxy.trace`.
"""

from recorder.errors import TraceError, TraceFormatError, TraceLimitError, TraceVersionError
from recorder.limits import DEFAULT_LIMITS, ReaderLimits
from recorder.reader import SessionSummary, TraceReader
from recorder.records import (
    FORMAT_VERSION,
    EventKind,
    EventRecord,
    FdKind,
    FdRecord,
    InvalidField,
    MessageRecord,
    Record,
    TraceHeader,
)
from recorder.writer import TraceWriter

__all__ = [
    "DEFAULT_LIMITS",
    "FORMAT_VERSION",
    "EventKind",
    "EventRecord",
    "FdKind",
    "FdRecord",
    "InvalidField",
    "MessageRecord",
    "ReaderLimits",
    "Record",
    "SessionSummary",
    "TraceError",
    "TraceFormatError",
    "TraceHeader",
    "TraceLimitError",
    "TraceReader",
    "TraceVersionError",
    "TraceWriter",
]
