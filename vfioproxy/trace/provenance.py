"""What ``trace slice`` and ``trace merge`` share: where a derived trace came
from, which inputs they can copy, and writing the output so that a failure
leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from typing import Any

from recorder.errors import TraceLimitError
from recorder.reader import TraceReader
from recorder.records import FORMAT_VERSION, TraceHeader
from recorder.writer import TraceWriter
from vfioproxy.errors import UsageError

__all__ = ["file_sha256", "output_trace", "refuse_as_output", "require_copyable", "source_entry"]

_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of the file at ``path`` in hex, read a MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def require_copyable(reader: TraceReader) -> None:
    """Refuse a trace whose records cannot be written as this vfioproxy's
    format version: one of a newer minor version may hold keys and record
    kinds that copying would drop. (A newer major version is refused by
    :class:`TraceReader` already, an older one migrated.)"""
    found = reader.file_version
    if found[0] == FORMAT_VERSION[0] and found[1] > FORMAT_VERSION[1]:
        raise UsageError(
            f"{reader.path}: trace format {found[0]}.{found[1]} is newer than this vfioproxy "
            f"writes ({FORMAT_VERSION[0]}.{FORMAT_VERSION[1]}): copying it would drop what "
            f"{found[0]}.{found[1]} added; upgrade vfioproxy"
        )


def refuse_as_output(out: str | os.PathLike[str], reader: TraceReader) -> None:
    """:class:`UsageError` when ``out`` names the file ``reader`` reads."""
    same = (os.path.samefile(out, reader.path) if os.path.exists(out)
            else os.path.realpath(out) == os.path.realpath(reader.path))
    if same:
        raise UsageError(f"{os.fspath(out)} is also an input: write the output to another file")


def source_entry(reader: TraceReader) -> dict[str, Any]:
    """The provenance of one input: its path and SHA-256 (reads the whole file)."""
    return {"path": reader.path, "sha256": file_sha256(reader.path)}


@contextlib.contextmanager
def output_trace(
    out: str | os.PathLike[str], header: TraceHeader, *, overwrite: bool = False
) -> Iterator[TraceWriter]:
    """A :class:`TraceWriter` of a trace that appears at ``out`` only once the
    ``with`` block ends without an error.

    The trace is written next to ``out`` under a temporary name, then renamed
    to ``out`` (replacing a file there only with ``overwrite``; otherwise an
    ``out`` that appeared meanwhile raises :class:`FileExistsError`). On any
    error or cancellation the temporary file is removed and ``out`` is left
    as it was. A ``header`` a reader would refuse (e.g. a merge listing too
    many sessions) raises :class:`UsageError`.
    """
    out = os.fspath(out)
    partial = os.path.join(os.path.dirname(out) or ".",
                           f".{os.path.basename(out)}.partial-{os.getpid()}")
    try:
        writer = TraceWriter(partial, header, overwrite=True)
    except OSError as exc:  # named by the file asked for, not the temporary one
        raise OSError(exc.errno, exc.strerror, out) from None
    except TraceLimitError as exc:
        raise UsageError(f"{out}: its header would exceed a trace header's limits ({exc})"
                         ) from None
    try:
        with writer:
            yield writer
        if overwrite:
            os.replace(partial, out)
        else:
            os.link(partial, out)
            os.unlink(partial)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
