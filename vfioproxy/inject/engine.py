"""The sans-IO injection engine: one :class:`Decision` per message.

The proxy calls :meth:`Injector.decide` for every message before forwarding
it, with the session number, the direction, the bytes and the current time
(float seconds, any monotonic clock), then acts on the decision at
``release_at``: first ``close_before`` (close both legs), else forward
``data`` when ``forward``; send ``reply`` back to the sender; then
``close_after``. The error ``reply`` travels the other way; the engine does
not order it against that direction's messages (the two directions
interleave freely, protocol.md §1.7), so it may be written as soon as due.
Messages of one direction must be acted on in the order of their
decisions; ``release_at`` never decreases within a (session, direction)
for messages that are acted on, so a FIFO per direction is enough.
Nothing here sleeps or does I/O.

Combination, when several rules match one message (in rule order):

1. Each rule whose filters match counts as matched and then fires with its
   probability.
2. Fate: the first firing drop, error or close rule decides what happens to
   the message; later ones in that group are ignored. Drop: not forwarded.
   Error: not forwarded, answered with an error reply (a no_reply request
   is dropped without reply, as libvfio-user does on failure). Close
   before: not forwarded, the session closed. Close after: forwarded, then
   closed.
3. Stall: a firing stall rule, when its direction is not already stalled,
   holds the direction until ``now + duration``; the message and every
   later message of the direction are released no earlier. It applies
   whatever the fate.
4. Timing, unless the message is simply dropped: starting from
   ``max(now, stalled until)``, delays add their drawn value and bandwidth
   rules queue the message on their link (``t = max(t, link free) +
   len / rate``; not for error replies or closes, which send nothing on the
   link), in rule order. Finally ``release_at = max(t, previous release_at
   of the direction)``: delays never reorder a direction, and a direction
   never waits for the other. An error reply is due at ``release_at`` too
   and holds back later messages of its request's direction (the device
   would have answered in order).
5. Corrupt rules flip bits, in rule order, when the message is forwarded.

Every action that took effect is listed in ``Decision.applied`` with the
drawn value, so an experiment can be rebuilt from a trace alone.

Randomness: each (seed, session, direction, rule id) has its own
``random.Random`` seeded from a string (stable across processes and Python
runs), used for that rule's probability draws (only when ``0 < p < 1``) and
distribution draws. A rule's draws therefore depend only on the messages of
its own session and direction, not on how sessions and directions
interleave.

Region matching of replies: forwarded REGION_READ/REGION_WRITE requests are
remembered by (session, direction, msg_id), first in first out, until their
reply comes back (at most 64 per id).
"""

from __future__ import annotations

import collections
import functools
import math
import random
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, cast

import attrs

from vfioproxy.inject.distributions import capped
from vfioproxy.inject.errors import InjectError
from vfioproxy.inject.rules import (
    Action,
    Bandwidth,
    Close,
    Corrupt,
    Delay,
    Drop,
    Error,
    Rule,
    Stall,
)
from vfioproxy.inject.syntax import parse_rule
from vfioproxy.inject.view import REGION_ACCESS, MessageView, inspect
from vfioproxy.protocol.codec import build_error_reply, encode
from vfioproxy.protocol.header import HEADER_SIZE, Header
from vfioproxy.side import Direction

__all__ = ["Applied", "Decision", "Injector", "InjectorStatistics", "RuleStatistics"]

_MAX_PENDING_PER_ID = 64

_Key = tuple[int, Direction]


@attrs.frozen
class Applied:
    """One action that took effect on a message.

    ``value`` is what was drawn or done: delay and bandwidth the seconds
    they added, stall its duration, error the errno, close "before" or
    "after", corrupt the absolute byte offset flipped (None when the field
    was not in the message), drop None. ``note`` explains the unusual cases
    (a delay drawn above ``MAX_DELAY`` and capped, a corrupt field the
    message lacks, an error rule on a no_reply request).
    """

    rule_id: int
    action: Action
    value: float | int | str | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: rule id, action name and text, value, and note when set."""
        result: dict[str, Any] = {
            "rule": self.rule_id,
            "action": self.action.name,
            "text": self.action.to_text(),
            "value": self.value,
        }
        if self.note:
            result["note"] = self.note
        return result


@attrs.frozen
class Decision:
    """What to do with one message, and when (see the module docstring).

    ``index`` is the message's per-direction index in its session.
    ``release_at`` equals ``now`` when nothing holds the message back.
    """

    release_at: float
    forward: bool
    data: bytes
    reply: bytes | None = None
    close_before: bool = False
    close_after: bool = False
    applied: tuple[Applied, ...] = ()
    index: int = 0


@attrs.frozen
class RuleStatistics:
    """Counters of one rule: filters matched, actions applied, seconds of delay added."""

    rule_id: int
    text: str
    matched: int
    applied: int
    injected_delay: float

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class InjectorStatistics:
    """Messages decided so far and the counters of every current rule, in rule order."""

    messages: int
    rules: tuple[RuleStatistics, ...]

    def rule(self, rule_id: int) -> RuleStatistics:
        """The counters of one rule; KeyError when it is not (any longer) there."""
        for stats in self.rules:
            if stats.rule_id == rule_id:
                return stats
        raise KeyError(rule_id)

    def to_dict(self) -> dict[str, Any]:
        return {"messages": self.messages, "rules": [r.to_dict() for r in self.rules]}


@attrs.define
class _Counts:
    matched: int = 0
    applied: int = 0
    injected_delay: float = 0.0


@attrs.frozen
class _Pending:
    command: int
    region: int | None
    offset: int | None


_F = TypeVar("_F", bound=Callable[..., Any])


def _locked(method: _F) -> _F:
    """Run ``method`` under the injector's lock."""

    @functools.wraps(method)
    def locked(self: Injector, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return cast(_F, locked)


class Injector:
    """Decides, message by message, which faults to inject (sans-IO, no clock).

    ``rules`` are added in order (see :meth:`add`); ``seed`` seeds every
    random draw. Rules can be added and removed while messages flow.
    """

    def __init__(self, rules: Iterable[Rule | str] = (), seed: int = 0) -> None:
        self.seed = seed
        # forwarding threads decide while the control socket adds and removes rules
        self._lock = threading.RLock()
        self._rules: list[Rule] = []
        self._counts: dict[int, _Counts] = {}
        self._next_id = 1
        self._messages = 0
        self._index: dict[_Key, int] = {}
        self._last_release: dict[_Key, float] = {}
        self._stalled_until: dict[_Key, float] = {}
        self._link_free: dict[tuple[int, int, Direction], float] = {}
        self._streams: dict[tuple[int, int, Direction], random.Random] = {}
        self._pending: dict[tuple[int, Direction, int], collections.deque[_Pending]] = {}
        for rule in rules:
            self.add(rule)

    # ----------------------------------------------------------------- rules

    @property
    @_locked
    def rules(self) -> tuple[Rule, ...]:
        """The current rules, in the order they are applied."""
        return tuple(self._rules)

    @_locked
    def add(self, rule: Rule | str) -> Rule:
        """Append a rule (or rule text); returns it with its id.

        A rule with id 0 gets the next free id (one above the highest seen);
        an id already in use raises :class:`InjectError`.
        """
        if isinstance(rule, str):
            rule = parse_rule(rule)
        if rule.id == 0:
            rule = attrs.evolve(rule, id=self._next_id)
        elif rule.id in self._counts:
            raise InjectError(f"rule id {rule.id} is already in use")
        self._next_id = max(self._next_id, rule.id + 1)
        self._rules.append(rule)
        self._counts[rule.id] = _Counts()
        return rule

    @_locked
    def remove(self, rule_id: int) -> Rule:
        """Take a rule out (with its counters and random streams); returns it."""
        for position, rule in enumerate(self._rules):
            if rule.id == rule_id:
                del self._rules[position]
                del self._counts[rule_id]
                for table in (self._streams, self._link_free):
                    for key in [k for k in table if k[0] == rule_id]:
                        del table[key]
                return rule
        raise InjectError(f"no rule with id {rule_id}")

    @_locked
    def statistics(self) -> InjectorStatistics:
        """Counters per current rule (see :class:`RuleStatistics`)."""
        return InjectorStatistics(
            self._messages,
            tuple(
                RuleStatistics(
                    rule.id,
                    rule.text,
                    self._counts[rule.id].matched,
                    self._counts[rule.id].applied,
                    self._counts[rule.id].injected_delay,
                )
                for rule in self._rules
            ),
        )

    @_locked
    def forget(self, session: int) -> None:
        """Drop the per-session state of a finished session (indexes, queues, streams)."""
        for table in (self._index, self._last_release, self._stalled_until):
            for key in [k for k in table if k[0] == session]:
                del table[key]
        for keyed in (self._link_free, self._streams):
            for rkey in [k for k in keyed if k[1] == session]:
                del keyed[rkey]
        for pkey in [k for k in self._pending if k[0] == session]:
            del self._pending[pkey]

    # ----------------------------------------------------------------- deciding

    @_locked
    def decide(self, session: int, direction: Direction, data: bytes, now: float) -> Decision:
        """Decide the fate of one message arriving at ``now``; never raises on bad bytes."""
        data = bytes(data)
        key = (session, direction)
        index = self._index.get(key, 0)
        self._index[key] = index + 1
        self._messages += 1
        view = self._view(session, direction, data)

        fired = [rule for rule in self._rules if self._fires(rule, view, session, direction, index)]
        fate = next((r for r in fired if isinstance(r.action, (Drop, Error, Close))), None)
        records: list[Applied] = []
        forward, acts = True, True
        reply: bytes | None = None
        close_before = close_after = False
        if fate is not None:
            forward, acts, reply, close_before, close_after = self._fate(fate, view, records)

        stalled = self._stalled_until.get(key, -math.inf)
        if now >= stalled:
            for rule in fired:
                if isinstance(rule.action, Stall):
                    stalled = max(stalled, now + rule.action.duration)
                    records.append(Applied(rule.id, rule.action, rule.action.duration,
                                           f"direction held until {stalled!r}"))
            self._stalled_until[key] = stalled
        if not acts:
            return self._finish(records, now, False, data, None, False, False, index)

        t = max(now, stalled)
        buffer = bytearray(data)
        for rule in fired:
            action = rule.action
            if isinstance(action, Delay):
                value, note = capped(
                    action.distribution.draw(self._stream(rule.id, session, direction))
                )
                t += value
                records.append(Applied(rule.id, action, value, note))
            elif isinstance(action, Bandwidth) and forward:
                link = (rule.id, session, direction)
                start = t
                t = max(t, self._link_free.get(link, -math.inf)) + len(data) / (
                    action.bytes_per_second
                )
                self._link_free[link] = t
                records.append(Applied(rule.id, action, t - start))
            elif isinstance(action, Corrupt) and forward:
                offset, note = action.apply(buffer, view.command)
                records.append(Applied(rule.id, action, offset, note))
        release = max(t, self._last_release.get(key, -math.inf))
        self._last_release[key] = release
        out = bytes(buffer)
        if forward:
            self._remember(session, direction, view, out)
        return self._finish(records, release, forward, out, reply, close_before, close_after, index)

    def _fires(
        self, rule: Rule, view: MessageView, session: int, direction: Direction, index: int
    ) -> bool:
        if isinstance(rule.action, Error) and not view.is_request:
            return False
        if not rule.match.matches(view, session, direction, index):
            return False
        self._counts[rule.id].matched += 1
        probability = rule.match.probability
        if probability >= 1.0:
            return True
        if probability <= 0.0:
            return False
        return self._stream(rule.id, session, direction).random() < probability

    def _fate(
        self, rule: Rule, view: MessageView, records: list[Applied]
    ) -> tuple[bool, bool, bytes | None, bool, bool]:
        """(forward, acts, reply, close_before, close_after) decided by ``rule``."""
        action = rule.action
        if isinstance(action, Drop):
            records.append(Applied(rule.id, action))
            return False, False, None, False, False
        if isinstance(action, Error):
            header = view.header
            assert header is not None  # error rules fire on requests only
            if header.no_reply:
                note = "no_reply request: dropped without an error reply"
                records.append(Applied(rule.id, action, action.errno, note))
                return False, False, None, False, False
            records.append(Applied(rule.id, action, action.errno))
            reply = encode(build_error_reply(header, action.errno))[0]
            return False, True, reply, False, False
        assert isinstance(action, Close)
        records.append(Applied(rule.id, action, action.when))
        if action.when == "before":
            return False, True, None, True, False
        return True, True, None, False, True

    def _finish(
        self,
        records: list[Applied],
        release: float,
        forward: bool,
        data: bytes,
        reply: bytes | None,
        close_before: bool,
        close_after: bool,
        index: int,
    ) -> Decision:
        order = {rule.id: position for position, rule in enumerate(self._rules)}
        records.sort(key=lambda record: order[record.rule_id])
        for record in records:
            counts = self._counts[record.rule_id]
            counts.applied += 1
            timed = isinstance(record.action, (Delay, Bandwidth, Stall))
            if timed and isinstance(record.value, (int, float)):
                counts.injected_delay += record.value
        return Decision(
            release, forward, data, reply, close_before, close_after, tuple(records), index
        )

    def _stream(self, rule_id: int, session: int, direction: Direction) -> random.Random:
        key = (rule_id, session, direction)
        stream = self._streams.get(key)
        if stream is None:
            stream = random.Random(
                f"vfioproxy.inject/{self.seed}/{session}/{direction.value}/{rule_id}"
            )
            self._streams[key] = stream
        return stream

    # ----------------------------------------------------------------- replies

    def _view(self, session: int, direction: Direction, data: bytes) -> MessageView:
        """The message, a reply's region and offset taken from its tracked request."""
        view = inspect(data)
        header = view.header
        if header is None or not header.is_reply or header.command not in REGION_ACCESS:
            return view
        key = (session, direction.reverse, header.msg_id)
        queue = self._pending.get(key)
        if not queue:
            return view
        for pending in queue:
            if pending.command == header.command:
                queue.remove(pending)
                if not queue:
                    del self._pending[key]
                return attrs.evolve(view, region=pending.region, offset=pending.offset)
        return view

    def _remember(self, session: int, direction: Direction, view: MessageView, sent: bytes) -> None:
        """Track a forwarded region-access request until its reply."""
        header = view.header
        if (
            header is None
            or not header.is_command
            or header.no_reply
            or header.command not in REGION_ACCESS
            or len(sent) < HEADER_SIZE
        ):
            return
        msg_id = Header.parse(sent).msg_id
        queue = self._pending.setdefault(
            (session, direction, msg_id), collections.deque(maxlen=_MAX_PENDING_PER_ID)
        )
        queue.append(_Pending(header.command, view.region, view.offset))
