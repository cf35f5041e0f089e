"""How the trace tools open a trace: past damaged records, and what they say of them.

Every tool that reads a trace (show, stats, export, timeline, slice, merge,
diff, replay) opens it with :func:`open_trace`: a damaged record (valid
msgpack with invalid fields, bytes that are not msgpack, a message shorter
than the vfio-user header that is not marked torn) is skipped, counted and
described by the reader, and the tool goes on with the next record.
:func:`damage_lines` is what each tool then says: each damaged record with
file, record number and byte offset (the first :data:`DAMAGED_SHOWN`), how
many more, and the count; a tool that skipped any exits 1.
"""

from __future__ import annotations

import os

from recorder.reader import TraceReader
from vfioproxy.protocol.header import HEADER_SIZE

__all__ = ["DAMAGED_SHOWN", "damage_lines", "open_trace"]

#: how many skipped damaged records are named one by one
DAMAGED_SHOWN = 20


def open_trace(path: str | os.PathLike[str]) -> TraceReader:
    """The trace at ``path``, read past damaged records; a message record of
    fewer bytes than a vfio-user header (and not marked torn) is one. Raises
    as :class:`~recorder.reader.TraceReader` does for a file that is not a
    trace at all (or of a newer major version)."""
    return TraceReader(path, skip_damaged=True, min_message_bytes=HEADER_SIZE)


def damage_lines(reader: TraceReader) -> list[str]:
    """What the last pass over ``reader`` skipped, one line each: every
    damaged record (up to :data:`DAMAGED_SHOWN`, then how many more), then
    the count naming the file. Empty when nothing was skipped."""
    if not reader.damaged_count:
        return []
    lines = [f"damaged record: {damaged}" for damaged in reader.damaged[:DAMAGED_SHOWN]]
    if reader.damaged_count > DAMAGED_SHOWN:
        lines.append(f"... and {reader.damaged_count - DAMAGED_SHOWN} more damaged records")
    plural = "s" if reader.damaged_count > 1 else ""
    lines.append(f"{reader.path}: skipped {reader.damaged_count} damaged record{plural}")
    return lines
