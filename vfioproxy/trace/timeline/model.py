"""What a realize timeline is made of: labels, labelled messages, per-step times.

The labeller (:mod:`vfioproxy.trace.timeline.labels`) gives every message of
a client session a :class:`Label`; :mod:`vfioproxy.trace.timeline.build`
turns a session's labelled messages into a :class:`SessionTimeline` with a
:class:`StepTimes` per step, which every output (table, JSON, PNG, HTML,
side by side) reads. Steps are named as in
``realize-steps.md``: ``R1``..``R14`` (realize), ``S1``..``S7`` (reset), and
the running-phase categories of :data:`RUNNING_STEPS`.
"""

from __future__ import annotations

from typing import Any

import attrs

from vfioproxy.protocol.steps import (
    REALIZE_STEPS,
    RESET_STEPS,
    RUNNING_STEPS,
    STEP_ORDER,
    UNLABELLED,
)
from vfioproxy.side import Direction

__all__ = [
    "REALIZE_STEPS",
    "RESET_STEPS",
    "RUNNING_STEPS",
    "STEP_ORDER",
    "UNLABELLED",
    "Label",
    "LabelledMessage",
    "SessionTimeline",
    "StepTimes",
]


@attrs.frozen
class Label:
    """The step a message belongs to. ``certain`` is False where the wire alone
    cannot decide (realize-steps.md §4's list): the label is then shown with a
    ``?`` and ``reason`` says what could not be told apart; an unlabelled
    message's ``reason`` says why no rule matched."""

    step: str
    certain: bool = True
    reason: str = ""
    #: inside a ``guest-reset``: the reset step (``S4``) it repeats
    substep: str = ""

    def text(self) -> str:
        """``R7``, ``S2?``, ``guest-reset S4``, ``unlabelled``."""
        text = f"{self.step} {self.substep}" if self.substep else self.step
        return text if self.certain else f"{text}?"

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {"step": self.step, "certain": self.certain}
        if self.reason:
            result["reason"] = self.reason
        if self.substep:
            result["substep"] = self.substep
        return result


@attrs.frozen
class LabelledMessage:
    """One message of a session with its label (a reply takes its request's).

    ``seq`` is the trace seq; ``t_ns`` the record's time; ``summary`` the
    decoded one-line description (``trace show``'s); ``function`` the QEMU
    function behind the step (empty when unknown)."""

    seq: int
    t_ns: int
    direction: Direction
    msg_id: int
    command: int
    is_reply: bool
    size: int
    label: Label
    summary: str = ""
    function: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq, "t_ns": self.t_ns, "direction": self.direction.value,
            "msg_id": self.msg_id, "command": self.command, "reply": self.is_reply,
            "size": self.size, "label": self.label.to_dict(), "summary": self.summary,
            "function": self.function,
        }


@attrs.frozen
class StepTimes:
    """One step of a session: its messages (commands and replies), first and
    last time, the time a request of it was outstanding at the server
    (``server_ns``) and the time the client took between a reply and its next
    command of the step (``client_ns``), the bytes of its messages, and for a
    ROM load the bytes of ROM read (``rom_bytes``)."""

    step: str
    messages: int
    first_ns: int
    last_ns: int
    server_ns: int
    client_ns: int
    bytes: int
    rom_bytes: int | None = None
    uncertain: int = 0

    @property
    def duration_ns(self) -> int:
        return self.last_ns - self.first_ns

    @property
    def rom_throughput(self) -> float | None:
        """ROM bytes per second over the step (None: not a ROM load, or no time)."""
        if self.rom_bytes is None or self.duration_ns <= 0:
            return None
        return self.rom_bytes / (self.duration_ns / 1e9)

    def to_dict(self) -> dict[str, Any]:
        result = attrs.asdict(self)
        result["duration_ns"] = self.duration_ns
        result["rom_throughput"] = self.rom_throughput
        return result


@attrs.frozen
class SessionTimeline:
    """The timeline of one client session of one trace: its labelled
    ``messages`` in trace order, a :class:`StepTimes` per step present (in
    :data:`STEP_ORDER`), how many messages are ``unlabelled``, and whether the
    trace ends inside the session (``cut_short``: labelled up to its end)."""

    trace: str
    session: int
    messages: tuple[LabelledMessage, ...]
    steps: tuple[StepTimes, ...]
    unlabelled: int = 0
    cut_short: bool = False

    def step(self, name: str) -> StepTimes | None:
        return next((s for s in self.steps if s.step == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "trace": self.trace, "session": self.session, "unlabelled": self.unlabelled,
            "cut_short": self.cut_short, "steps": [s.to_dict() for s in self.steps],
            "messages": [m.to_dict() for m in self.messages],
        }
