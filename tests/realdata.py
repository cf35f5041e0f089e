"""Access to the real captures bundled in traces/ (and their rawcap originals)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from vfioproxy.side import Direction

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT / "traces"
RAWCAP = ROOT.parent / "shared" / "traces" / "real"


def rawcap_files() -> list[Path]:
    return sorted(RAWCAP.glob("*.jsonl"))


def rawcap_messages(path: Path) -> Iterator[tuple[Direction, bytes, int]]:
    """(direction, bytes, number of fds) of every message of a rawcap file."""
    with path.open() as f:
        next(f)
        for line in f:
            rec = json.loads(line)
            yield Direction(rec["dir"]), bytes.fromhex(rec["hex"]), len(rec["fds"])
