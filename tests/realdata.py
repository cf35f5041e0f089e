"""The real captures bundled in traces/ (imported from ../shared/traces/real/).

Tests read the bundled traces so they need nothing outside the repository;
``RAWCAP`` (the original JSON-lines captures) is only used where a test
checks the import itself, and such tests skip when it is absent.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from recorder.reader import TraceReader
from recorder.records import MessageRecord
from vfioproxy.side import Direction

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT / "traces"
RAWCAP = ROOT.parent / "shared" / "traces" / "real"


def capture_files() -> list[Path]:
    """Every bundled real capture (``reference-*`` traces are this project's own)."""
    return sorted(p for p in TRACES.glob("*.trace") if not p.name.startswith("reference-"))


def capture_messages(path: Path) -> Iterator[MessageRecord]:
    with TraceReader(path) as reader:
        for record in reader:
            if isinstance(record, MessageRecord):
                yield record


def capture_records(path: Path) -> list[dict[str, Any]]:
    """The messages of a capture in rawcap's shape: dir, t_ns, hex, fds (kind, size, flags)."""
    return [
        {
            "dir": m.direction.value,
            "t_ns": m.t_ns,
            "hex": m.data.hex(),
            "fds": [{"kind": fd.kind.value, "size": fd.size, "flags": fd.flags} for fd in m.fds],
        }
        for m in capture_messages(path)
    ]


def wire_messages(path: Path) -> Iterator[tuple[Direction, bytes, int]]:
    """(direction, bytes, number of fds) of every message of a capture."""
    for m in capture_messages(path):
        yield m.direction, m.data, len(m.fds)
