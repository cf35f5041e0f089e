"""Reading back what `vfioproxy record` wrote during an interop test."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import attrs

from recorder.reader import TraceReader
from recorder.records import EventRecord, MessageRecord
from vfioproxy.protocol.bodies import RawBody
from vfioproxy.protocol.header import Command
from vfioproxy.side import Direction
from vfioproxy.trace.decoded import DecodedMessage, decoded_records


@attrs.frozen
class Recording:
    """Every message of a trace, decoded, with the events and the trace's health."""

    messages: tuple[DecodedMessage, ...]
    events: tuple[EventRecord, ...]
    truncation: str | None

    @property
    def sessions(self) -> list[int]:
        return sorted({m.record.session for m in self.messages})

    def records(self, direction: Direction | None = None) -> list[MessageRecord]:
        return [m.record for m in self.messages
                if direction is None or m.record.direction is direction]

    def undecoded(self) -> list[str]:
        """Messages that fell back to RawBody (did not decode)."""
        return [m.text for m in self.messages
                if isinstance(m.observation.message.body, RawBody)]

    def violations(self) -> list[str]:
        return [f"{m.text}: {v}" for m in self.messages for v in m.observation.violations]

    def counts(self) -> Counter[tuple[str, str, str]]:
        """(command, direction, "cmd" / "reply" / "error") -> messages."""
        return Counter(shape(m.record)[:3] for m in self.messages)

    def fd_kinds(self) -> Counter[tuple[str, str, str]]:
        """(command and type, direction, fd kind) -> fds."""
        found: Counter[tuple[str, str, str]] = Counter()
        for m in self.messages:
            command, direction, kind = shape(m.record)[:3]
            for fd in m.record.fds:
                found[(f"{command} {kind}", direction, fd.kind.value)] += 1
        return found


def read_recording(path: Path) -> Recording:
    with TraceReader(path) as reader:
        items = list(decoded_records(reader))
        truncation = reader.truncation
    return Recording(
        tuple(i for i in items if isinstance(i, DecodedMessage)),
        tuple(i for i in items if isinstance(i, EventRecord)),
        truncation,
    )


def shape(record: MessageRecord) -> tuple[str, str, str, int, tuple[str, ...]]:
    """What a message is, apart from its msg_id and contents.

    (command name, direction, cmd / reply / error, size, fd kinds).
    """
    data = record.data
    command = int.from_bytes(data[2:4], "little")
    flags = int.from_bytes(data[8:12], "little")
    kind = "cmd" if flags & 0xF == 0 else ("error" if flags & 0x20 else "reply")
    try:
        name = Command(command).name
    except ValueError:
        name = f"CMD_{command}"
    return (name, record.direction.value, kind, len(data),
            tuple(fd.kind.value for fd in record.fds))
