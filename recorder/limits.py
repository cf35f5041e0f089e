"""How much a trace reader accepts before it calls a file hostile."""

from __future__ import annotations

import attrs

MiB = 1024 * 1024


@attrs.frozen
class ReaderLimits:
    """Upper bounds a reader enforces on every record (see FORMAT.md, "Limits").

    The writer refuses to write anything the default limits would refuse, so
    a trace written by vfioproxy always reads back with :data:`DEFAULT_LIMITS`.
    """

    #: bytes in one record; a vfio-user message may carry up to 64 MiB
    max_record_bytes: int = 80 * MiB
    #: bytes in a record other than a message: the header and each event
    max_event_bytes: int = 1 * MiB
    #: fds on one message (the kernel's SCM_MAX_FD)
    max_fds: int = 253
    #: nesting of maps and arrays in one record; the record itself is depth 1
    max_depth: int = 16
    #: msgpack objects (keys and values, containers included) in one record
    max_objects: int = 65536
    #: UTF-8 bytes in one string
    max_str_bytes: int = 1 * MiB


DEFAULT_LIMITS = ReaderLimits()
