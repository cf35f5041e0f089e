"""Checks on the forwarding path, when the user asks for them.

By default the proxy decodes nothing: violations, pairing and statistics
are derived from the trace by whoever reads it
(:mod:`vfioproxy.trace.decoded`). ``-v`` (a live line per message), ``--strict``
(close a session at its first violation) and ``--check-live`` (log and
record violations as they happen) need the decoding on the path:
:class:`LiveChecks` runs the same sans-IO
:class:`~vfioproxy.protocol.session.SessionState` over each forwarded message
right after it is recorded, so it reports exactly what a reader of the
trace derives.

Hostile peers can make every message a violation, so logging is rate
limited (:data:`LOG_BURST` lines per session, then one line per
:data:`LOG_INTERVAL` saying how many were not logged) and recording is
compact: the first :data:`RECORD_REPEATS` violations of each kind from each
side are recorded whole; later ones are counted and recorded as one
``violations_repeated`` event per kind and side (count, first and last
message) at most every :data:`LOG_INTERVAL` seconds and when the session ends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from vfioproxy.protocol.codec import Dialects
from vfioproxy.protocol.session import InjectionBlame, Observation, SessionState, Violation
from vfioproxy.side import Direction

__all__ = ["LOG_BURST", "LOG_INTERVAL", "RECORD_REPEATS", "LiveChecks", "MessageObserver"]

log = logging.getLogger("vfioproxy.proxy")

#: violations a session logs before the rate limit applies
LOG_BURST = 10
#: seconds between "N violations not logged" lines
LOG_INTERVAL = 1.0
#: violations of one kind and side in a row recorded whole before they are counted
RECORD_REPEATS = 3


class _HasId(Protocol):
    @property
    def id(self) -> int: ...


class MessageObserver(Protocol):
    """What watches the decoded messages (the live view): called after each
    forwarded message with its session, decoding, time (ns) and trace seq, and
    told when a session ended, so that it keeps nothing of it."""

    def __call__(self, session: Any, obs: Observation, t_ns: int, seq: int) -> None: ...

    def forget(self, session: int) -> None: ...


class LiveChecks:
    """Decode and check one session's messages as they are forwarded.

    ``observer`` gets each observation (the live view); ``record`` (``kind,
    data, t_ns``) writes an event to the session's trace, set when
    violations are to be recorded (``--check-live``); ``log_violations``
    logs them; ``strict`` makes :meth:`observe` return a reason to close at
    the first violation.
    """

    def __init__(
        self,
        session: _HasId,
        *,
        dialects: Dialects | None = None,
        observer: MessageObserver | None = None,
        record: Callable[[str, dict[str, Any], int], object] | None = None,
        log_violations: bool = False,
        strict: bool = False,
    ) -> None:
        self.session = session
        self.state = SessionState(dialects=dialects)
        self.blame = InjectionBlame()
        self.observer = observer
        self.record = record
        self.log_violations = log_violations
        self.strict = strict
        self.violations = 0
        self._logged = 0
        self._not_logged = 0
        self._log_at = 0.0
        #: violations seen per (kind, side), and those counted but not yet recorded:
        #: [count, first index, last index, first seq, last seq]
        self._seen: dict[tuple[str, str], int] = {}
        self._counted: dict[tuple[str, str], list[int]] = {}
        self._flush_at = 0.0

    def observe(
        self,
        direction: Direction,
        data: bytes,
        fds: Sequence[Any],
        t_ns: int,
        seq: int,
        *,
        length: int | None = None,
        torn: bool = False,
        rewritten_by: str | None = None,
    ) -> str | None:
        """Decode and check one message as a reader of the trace will
        (``length``, ``torn``: see :meth:`SessionState.observe` and
        :meth:`SessionState.torn`; ``rewritten_by``: the injected actions that
        rewrote it, blamed for what it breaks); returns why to close
        (``strict``) or None."""
        if torn:
            violations: tuple[Violation, ...] = (self.state.torn(direction, data, length),)
        else:
            obs = self.blame.observe(self.state.observe(direction, data, fds, length=length),
                                     rewritten_by)
            if self.observer is not None:
                self.observer(self.session, obs, t_ns, seq)
            violations = obs.violations
        if not violations:
            return None
        for violation in violations:
            self._violation(violation, t_ns, seq)
        if self.strict:
            return f"strict: {violations[0]}"
        return None

    def _violation(self, violation: Violation, t_ns: int, seq: int) -> None:
        self.violations += 1
        if self.log_violations:
            self._log(violation)
        if self.record is None:
            return
        key = (violation.kind, violation.side.value)
        seen = self._seen[key] = self._seen.get(key, 0) + 1
        if seen <= RECORD_REPEATS:
            self.record("violation", {**violation.to_dict(), "seq": seq}, t_ns)
            return
        counted = self._counted.get(key)
        if counted is None:
            self._counted[key] = [1, violation.index, violation.index, seq, seq]
        else:
            counted[0] += 1
            counted[2] = violation.index
            counted[4] = seq
        now = time.monotonic()
        if now >= self._flush_at:
            self._flush_at = now + LOG_INTERVAL
            self.flush(t_ns)

    def flush(self, t_ns: int) -> None:
        """Record the repeats counted so far (periodically, and at the session's end)."""
        if self.record is not None:
            for (kind, side), (count, first, last, first_seq, last_seq) in self._counted.items():
                self.record("violations_repeated", {
                    "kind": kind, "side": side, "count": count,
                    "first_index": first, "last_index": last,
                    "first_seq": first_seq, "last_seq": last_seq,
                }, t_ns)
        self._counted = {}
        if self.log_violations and self._not_logged:
            log.warning("session %d: %d more violation(s) not logged", self.session.id,
                        self._not_logged)
            self._not_logged = 0

    def _log(self, violation: Violation) -> None:
        if self._logged < LOG_BURST:
            self._logged += 1
            log.warning("session %d: %s", self.session.id, violation)
            return
        self._not_logged += 1
        now = time.monotonic()
        if now >= self._log_at:
            log.warning("session %d: %d more violation(s) not logged (last: %s)",
                        self.session.id, self._not_logged, violation)
            self._not_logged = 0
            self._log_at = now + LOG_INTERVAL
