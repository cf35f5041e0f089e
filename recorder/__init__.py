"""recorder: the vfioproxy trace format (writer, reader, tools).

The format is specified in ``recorder/FORMAT.md``.
"""

from recorder.errors import TraceError, TraceFormatError, TraceLimitError, TraceVersionError
from recorder.limits import DEFAULT_LIMITS, ReaderLimits
from recorder.rawcap import ImportResult, import_rawcap
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
    "ImportResult",
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
    "import_rawcap",
]
