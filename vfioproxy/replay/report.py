"""What a replay found: field-level divergences and a summary, as text or JSON.

A :class:`Divergence` names the recorded message (by its ``seq``, the number
``vfioproxy trace show`` prints), says where it points in PCI terms, and
lists each differing field with its live and recorded value::

    message #17 REGION_READ reply (config space offset 0x10 BAR0):
        data 0xfe000000 != recorded 0xfd000000

A :class:`ReplayReport` gathers them with counts and time; ``ok`` (and the
CLI's exit status 0) means nothing diverged.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

from vfioproxy.protocol.header import command_name
from vfioproxy.protocol.listing import errno_text

__all__ = ["Divergence", "DivergenceKind", "FieldDiff", "Nearest", "ReplayReport"]

#: how many lines of divergences the text report shows before pointing at --json
TEXT_LIMIT = 60
#: a run of more missing messages than this is shown by its ends
MISSING_RUN = 4
#: divergences a report keeps by default (the rest are counted)
DEFAULT_MAX_DIVERGENCES = 1000

#: mismatch: a live message differs from its recorded counterpart; unmatched: a
#: live request no recorded one matches; unexpected: a live message with no
#: recorded counterpart; missing: a recorded message the live peer never sent;
#: timeout: the live peer went quiet; closed: it closed the connection early
DivergenceKind = Literal["mismatch", "unmatched", "unexpected", "missing", "timeout", "closed"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _value_text(field: str, value: Any, other: Any) -> str:
    """``value`` for a report; numbers in hex unless both sides are below 10."""
    if value is None:
        return "(absent)"
    if not _is_int(value):
        return str(value)
    if field == "header.error":
        return errno_text(value)
    if field == "header.command":
        return command_name(value)
    small = 0 <= value < 10 and (not _is_int(other) or 0 <= other < 10)
    return str(value) if small else hex(value)


def _json_value(value: Any) -> Any:
    return value.hex() if isinstance(value, bytes) else value


class StopReplay(Exception):
    """Ends a replay early; the reason is already in its report."""


@attrs.frozen
class FieldDiff:
    """One field that differs: ``live`` is what the peer sent, ``recorded`` the trace.

    ``note`` names the field in PCI terms (a config register) when it helps.
    Values of data ranges are preformatted strings (``0xfe000000``).
    """

    field: str
    live: Any
    recorded: Any
    note: str | None = None
    remark: str | None = None

    @classmethod
    def summed_up(cls, field: str, remark: str) -> FieldDiff:
        """A diff that stands for several (``data[0x53:0x14c]: 39 more ranges differ``)."""
        return cls(field, None, None, remark=remark)

    def text(self, versus: str = "recorded") -> str:
        """``data 0xfe000000 != recorded 0xfd000000``; ``versus`` names the second
        value (``""``: none, as ``trace diff`` shows its A and B values)."""
        name = f"{self.field} ({self.note})" if self.note else self.field
        if self.remark:
            return f"{name}: {self.remark}"
        live = _value_text(self.field, self.live, self.recorded)
        recorded = _value_text(self.field, self.recorded, self.live)
        return f"{name} {live} != {versus + ' ' if versus else ''}{recorded}"

    def to_json(self, names: tuple[str, str] = ("live", "recorded")) -> dict[str, Any]:
        """The diff as JSON; ``names`` are the keys of the two values."""
        out = {
            "field": self.field,
            names[0]: _json_value(self.live),
            names[1]: _json_value(self.recorded),
        }
        if self.note:
            out["note"] = self.note
        if self.remark:
            out["remark"] = self.remark
        return out


@attrs.frozen
class Nearest:
    """A recorded request close to an unmatched live one, and how it differs."""

    seq: int
    label: str
    diffs: tuple[FieldDiff, ...]

    def text(self) -> str:
        return f"#{self.seq} {self.label}: " + "; ".join(d.text() for d in self.diffs)

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "message": self.label,
                "diffs": [d.to_json() for d in self.diffs]}


@attrs.frozen
class Divergence:
    """One way the live session differed from the recording.

    ``seq`` and ``label`` name the recorded message (``None`` for a live
    message the recording does not have: then ``label`` describes the live
    one); ``where`` places it in PCI terms; ``detail`` is free text.
    """

    kind: DivergenceKind
    label: str
    seq: int | None = None
    where: str | None = None
    diffs: tuple[FieldDiff, ...] = ()
    detail: str | None = None
    nearest: tuple[Nearest, ...] = ()

    def headline(self) -> str:
        subject = f"message #{self.seq} {self.label}" if self.seq is not None else self.label
        if self.where:
            subject += f" ({self.where})"
        parts = [d.text() for d in self.diffs]
        if self.detail:
            parts.insert(0, self.detail)
        return f"{subject}: " + "; ".join(parts) if parts else subject

    def text(self) -> str:
        lines = [self.headline()]
        if self.nearest:
            lines.append("  nearest recorded requests:")
            lines.extend(f"    {n.text()}" for n in self.nearest)
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "seq": self.seq, "message": self.label,
                               "where": self.where, "diffs": [d.to_json() for d in self.diffs]}
        if self.detail:
            out["detail"] = self.detail
        if self.nearest:
            out["nearest"] = [n.to_json() for n in self.nearest]
        out["text"] = self.headline()
        return out


@attrs.frozen
class ReplayReport:
    """The outcome of one replay.

    ``recorded``: messages in the recorded session; ``replayed``: how many of
    them the replay played or met; ``sent``/``received``: live messages each
    way; ``compared``: live messages compared with a recorded one, of which
    ``matched`` had no difference. ``stopped`` says why a replay ended before
    the recording did; ``notes`` what to know about the recording.
    ``divergences`` holds the first ``max_divergences`` (None: no bound);
    ``dropped`` counts those found beyond them; ``damaged`` the trace's
    records skipped as damaged (named in ``notes``).
    """

    mode: Literal["client", "server"]
    trace: str
    session: int
    peer: str
    recorded: int
    replayed: int
    sent: int
    received: int
    compared: int
    matched: int
    elapsed: float
    divergences: tuple[Divergence, ...] = ()
    stopped: str | None = None
    notes: tuple[str, ...] = ()
    dropped: int = 0
    max_divergences: int | None = None
    damaged: int = 0

    @property
    def ok(self) -> bool:
        """True when nothing diverged and the whole trace was read (the CLI's
        exit status 0): ``damaged`` counts its records skipped as damaged."""
        return not self.divergences and not self.dropped and not self.damaged

    @property
    def diverged_count(self) -> int:
        """Every divergence found, kept or not."""
        return len(self.divergences) + self.dropped

    @property
    def exit_status(self) -> int:
        return 0 if self.ok else 1

    def summary(self) -> str:
        return (
            f"{self.replayed} of {self.recorded} recorded messages replayed "
            f"({self.sent} sent, {self.received} received); {self.compared} compared: "
            f"{self.matched} matched, {self.compared - self.matched} diverged; "
            f"{self.diverged_count} divergence(s); {self.elapsed:.3f} s"
        )

    def text(self) -> str:
        """The report for people: first divergence highlighted, all listed."""
        direction = "against" if self.mode == "client" else "towards the client on"
        lines = [f"replay {self.mode} of {self.trace} session {self.session} "
                 f"{direction} {self.peer}"]
        lines.extend(f"note: {note}" for note in self.notes)
        if self.divergences:
            lines.append(f"FIRST DIVERGENCE: {self.divergences[0].text()}")
            lines.append(f"divergences ({self.diverged_count}):")
            lines.extend(f"  {line}" for line in self._listing())
            if self.dropped:
                lines.append(f"  ... and {self.dropped} more divergence(s) counted, not kept "
                             f"(the report keeps the first {self.max_divergences}: "
                             "--max-divergences)")
        else:
            lines.append("no divergence")
        if self.stopped:
            lines.append(f"stopped: {self.stopped}")
        lines.append(f"summary: {self.summary()}")
        return "\n".join(lines)

    def _listing(self) -> list[str]:
        """Every divergence; a long run of missing messages is shown by its ends."""
        lines: list[str] = []
        run: list[Divergence] = []

        def flush() -> None:
            if len(run) > MISSING_RUN:
                lines.extend([run[0].text(),
                              f"... {len(run) - 2} more recorded messages, #{run[1].seq} to "
                              f"#{run[-2].seq}: {run[0].detail}",
                              run[-1].text()])
            else:
                lines.extend(d.text() for d in run)
            run.clear()

        for divergence in self.divergences:
            if divergence.kind == "missing":
                run.append(divergence)
                continue
            flush()
            if len(lines) >= TEXT_LIMIT:
                lines.append(f"... (--json lists all {len(self.divergences)})")
                return lines
            lines.extend(divergence.text().splitlines())
        flush()
        return lines

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "trace": self.trace,
            "session": self.session,
            "peer": self.peer,
            "ok": self.ok,
            "recorded": self.recorded,
            "replayed": self.replayed,
            "sent": self.sent,
            "received": self.received,
            "compared": self.compared,
            "matched": self.matched,
            "diverged": self.compared - self.matched,
            "elapsed": self.elapsed,
            "stopped": self.stopped,
            "notes": list(self.notes),
            "divergences": [d.to_json() for d in self.divergences],
            "divergences_dropped": self.dropped,
            "damaged": self.damaged,
        }
