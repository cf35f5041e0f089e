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

Combination, when several rules match one message (in rule order). Each
action acts in the phase of its class (:mod:`vfioproxy.inject.actions`);
the engine runs the phases in this order and knows no action by name:

1. Each rule whose filters match counts as matched and then fires with its
   probability.
2. Fate (drop, error, close): the first firing fate rule decides what
   happens to the message; later ones are ignored. Drop: not forwarded.
   Error: not forwarded, answered with an error reply (a no_reply request
   is dropped without reply, as libvfio-user does on failure). Close
   before: not forwarded, the session closed. Close after: forwarded, then
   closed.
3. Hold (stall): a firing hold rule, when its direction is not already
   held, holds the direction until ``now + duration``; the message and
   every later message of the direction are released no earlier. It
   applies whatever the fate.
4. Timing (delay, bandwidth), unless the fate leaves the message alone
   (a plain drop): starting from ``max(now, held until)``, each firing
   timing rule moves the due time on, in rule order: delays add their
   drawn value, bandwidth rules queue the message on their link (``t =
   max(t, link free) + len / rate``; not for error replies or closes,
   which send nothing on the link). Finally ``release_at = max(t,
   previous release_at of the direction)``: delays never reorder a
   direction, and a direction never waits for the other. An error reply
   is due at ``release_at`` too and holds back later messages of its
   request's direction (the device would have answered in order).
5. Rewrite (corrupt): the rules change the bytes, in rule order, when the
   message is forwarded.

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
reply comes back (at most 64 per id). Only requests whose replies some rule
could match by region or offset need that: the requests of a direction are
remembered from the time the injector first holds a rule that filters the
replies of the other direction by region or offset (and from then on, even
after that rule is removed); a reply to a request forwarded before is
matched by its own body.

Interrupts (``irq`` rules, :meth:`Injector.irq`): the proxy's IRQ watcher
asks about each interrupt it reads (``--interpose-irqs``). In rule order,
each irq rule whose filters match counts as matched and fires with its
probability; the first firing drop drops the interrupt (the client is not
signalled); else the firing delays add their drawn seconds. The watcher signals
a delayed interrupt when due and holds later interrupts of its vector
behind it, so a vector's interrupts stay in order. Each (seed, session,
IRQ index, vector, rule id) has its own random stream. The watcher's
thread asks; :meth:`Injector.irq` locks what it shares with the message
path (the rules it reads are an immutable tuple).

Cost and threads: each rule's filters are compiled once, when it is added,
into a predicate over the header fields (:meth:`Match.predicate
<vfioproxy.inject.rules.Match.predicate>`), which are read from the bytes
in one ``struct`` unpack, and only when some rule of the direction needs
them; which rules can apply to a session direction at all (direction and
session filters) is worked out once per session direction and rule change.
Deciding takes no lock: a session direction's state (index, release times,
counters, random streams, links, tracked requests) is only touched by the
thread deciding that session, and a rule change replaces, under the lock,
the immutable rule lists deciding reads. :meth:`Injector.statistics` sums
the counters under the lock, from any thread.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, cast

import attrs

from vfioproxy.inject.actions import (
    Action,
    Delay,
    Fate,
    FateAction,
    HoldAction,
    Phase,
    RewriteAction,
    TimingAction,
)
from vfioproxy.inject.distributions import capped
from vfioproxy.inject.errors import InjectError
from vfioproxy.inject.rules import Kind, Predicate, Rule
from vfioproxy.inject.syntax import parse_rule
from vfioproxy.protocol.header import FLAG_NO_REPLY, HEADER_SIZE, TYPE_MASK, MessageType
from vfioproxy.protocol.offsets import (
    ACCESS,
    ACCESS_COMMANDS,
    ACCESS_REGION,
    HEADER,
    MSG_ID,
    layout,
)
from vfioproxy.protocol.pairing import MAX_OUTSTANDING, Outstanding
from vfioproxy.side import Direction

__all__ = ["Applied", "Decision", "Injector", "InjectorStatistics", "IrqDecision",
           "RuleStatistics"]

_MAX_PENDING_PER_ID = 64
_C2S = Direction.C2S
_FATE, _HOLD, _TIMING, _REWRITE = Phase.FATE, Phase.HOLD, Phase.TIMING, Phase.REWRITE
#: the method of each phase's actions that says their effect
_EFFECTS = {
    _FATE: FateAction.fate.__name__, _HOLD: HoldAction.hold.__name__,
    _TIMING: TimingAction.time.__name__, _REWRITE: RewriteAction.apply.__name__,
}
_COMMAND_TYPE = int(MessageType.COMMAND)
_REPLY_TYPE = int(MessageType.REPLY)
#: the bytes a region access needs to tell its offset and region
_ACCESS_END = HEADER_SIZE + ACCESS_REGION.end
_MSG_ID = layout(MSG_ID)


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


class Decision(NamedTuple):
    """What to do with one message, and when (see the module docstring).

    ``index`` is the message's per-direction index in its session.
    ``release_at`` equals ``now`` when nothing holds the message back.
    Immutable, and equal only to another Decision with equal fields. One is
    made for every message, so it is a tuple underneath (made at C speed).
    """

    release_at: float
    forward: bool
    data: bytes
    reply: bytes | None = None
    close_before: bool = False
    close_after: bool = False
    applied: tuple[Applied, ...] = ()
    index: int = 0  # type: ignore[assignment]  # a field, in place of tuple.index()

    def __eq__(self, other: object) -> bool:
        if type(other) is Decision:
            return tuple.__eq__(self, other)
        return False if isinstance(other, tuple) else NotImplemented

    def __ne__(self, other: object) -> bool:
        if type(other) is Decision:
            return tuple.__ne__(self, other)
        return True if isinstance(other, tuple) else NotImplemented

    def __hash__(self) -> int:
        return tuple.__hash__(self)


#: a Decision from its fields in order, without a Python-level call
_decision = tuple.__new__


@attrs.frozen
class IrqDecision:
    """What to do with one interrupt: ``drop`` it (the client is not
    signalled), or signal it ``delay`` seconds late; ``applied``: the
    actions that took effect (drawn delays, the drop)."""

    drop: bool
    delay: float
    applied: tuple[Applied, ...]

    def to_dict(self) -> dict[str, Any]:
        """The ``irq`` event's keys: ``applied`` as an ``inject`` event's."""
        return {"applied": [a.to_dict() for a in self.applied]}


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


class _Counts:
    """Filters matched, actions applied and seconds added, by one rule."""

    __slots__ = ("applied", "injected_delay", "matched")

    def __init__(self) -> None:
        self.matched = 0
        self.applied = 0
        self.injected_delay = 0.0

    def add(self, other: _Counts) -> None:
        # read in the opposite order of the deciding thread's increments, so that
        # a sum taken while it decides never shows more applied than matched
        self.injected_delay += other.injected_delay
        self.applied += other.applied
        self.matched += other.matched


class _Compiled:
    """A rule made ready for deciding, once, when it is added.

    ``phase``: its action's (:class:`~vfioproxy.inject.actions.Phase`),
    ``effect`` the action's method of that phase (``fate``, ``hold``,
    ``time`` or ``apply``);
    ``commands``: its command filter, checked before ``test``, the
    predicate of its other message filters (None: none);
    ``reads_header``: whether it needs the header's fields, ``regions``
    the commands whose region and offset it needs; ``fixed``: the record
    (in a tuple of one) and seconds of a timing action that adds the same
    seconds every time; ``always`` its record and seconds when it also
    applies to every message of the session directions it serves;
    ``retired``: the counters of the sessions already forgotten.
    """

    __slots__ = (
        "always", "commands", "effect", "fixed", "irq_counts", "phase", "probability",
        "reads_header", "regions", "retired", "rule", "test",
    )

    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        action = rule.action
        traits = action.traits
        self.phase = action.phase
        self.effect: Callable[..., Any] = getattr(action, _EFFECTS[action.phase])
        self.commands = rule.match.command
        self.test: Predicate | None = rule.match.predicate(
            requests_only=traits.requests_only, screened=True
        )
        self.reads_header = rule.match.needs_header or traits.reads_header
        self.regions: frozenset[int] = frozenset()
        if rule.match.region is not None or rule.match.offset is not None:
            self.regions = ACCESS_COMMANDS & (rule.match.command or ACCESS_COMMANDS)
        self.probability = rule.match.probability
        self.fixed: tuple[tuple[Applied], float] | None = None
        self.always: tuple[Applied, float] | None = None
        seconds = action.fixed_seconds() if isinstance(action, TimingAction) else None
        if seconds is not None:
            record = Applied(rule.id, action, seconds)
            self.fixed = (record,), seconds
            if self.commands is None and self.test is None and self.probability >= 1.0:
                self.always = record, seconds
        self.retired = _Counts()
        #: the counters of its interrupts (an irq rule)
        self.irq_counts = _Counts()

    def serves(self, session: int, direction: Direction) -> bool:
        """Whether the rule's direction and session filters admit this session direction."""
        match = self.rule.match
        if match.irq is not None:  # an irq rule: no message
            return False
        return (match.direction is None or match.direction is direction) and (
            match.session is None or match.session == session
        )

    def remembered(self) -> set[Direction]:
        """The directions whose region-access requests it needs remembered for their replies."""
        match = self.rule.match
        if match.region is None and match.offset is None:
            return set()
        if match.kind is Kind.REQUEST or self.rule.action.traits.requests_only:
            return set()
        replied = list(Direction) if match.direction is None else [match.direction]
        return {direction.reverse for direction in replied}


class _Entry(_Counts):
    """One rule on one session direction: its counters, random stream and link."""

    __slots__ = ("_seed", "_stream", "compiled", "link_free")

    def __init__(self, compiled: _Compiled, seed: str) -> None:
        super().__init__()
        self.compiled = compiled
        self.link_free = -math.inf
        self._seed = seed
        self._stream: random.Random | None = None

    def stream(self) -> random.Random:
        """The rule's random stream for this session direction (made at its first use)."""
        stream = self._stream
        if stream is None:
            stream = self._stream = random.Random(self._seed)
        return stream

    def time(self, t: float, size: int, forward: bool) -> tuple[Applied | None, float]:
        """The record (None: no effect) of one application of a timing rule to a
        ``size``-byte message due at ``t``, and its due time after it (uncounted)."""
        compiled = self.compiled
        if compiled.fixed is not None:
            (record,), seconds = compiled.fixed
            return record, t + seconds
        timed = compiled.effect(t, size, forward, self)
        if timed is None:
            return None, t
        after, seconds, note = timed
        return Applied(compiled.rule.id, compiled.rule.action, seconds, note), after


#: a tracked request: command, region, offset
_Pending = tuple[int, int | None, int | None]
#: the records and the (entry, seconds) of a lane whose rules apply to every
#: message and are all fixed delays (or none at all)
_Constant = tuple[tuple[Applied, ...], tuple[tuple[_Entry, float], ...]]


class _Plan(NamedTuple):
    """What deciding reads of a lane's rules, all at once.

    ``entries``: the rules that can apply to the lane, in rule order;
    ``inspect``: whether to read the header; ``regions``: the commands
    whose region and offset some entry filters on; ``remember`` /
    ``recall``: whether to track region-access requests sent this way /
    look replies up in the other lane's.
    """

    entries: tuple[_Entry, ...]
    inspect: bool
    regions: frozenset[int]
    remember: bool
    recall: bool

    @classmethod
    def of(cls, entries: tuple[_Entry, ...], remember: bool, recall: bool) -> _Plan:
        rules = [entry.compiled for entry in entries]
        inspect = remember or recall or any(compiled.reads_header for compiled in rules)
        regions = frozenset().union(*(compiled.regions for compiled in rules))
        return cls(entries, inspect, regions, remember, recall)

    def constant(self) -> _Constant | None:
        """The outcome when it is the same for every message: nothing to look at, and
        every entry a fixed delay applying to every message (or no entry)."""
        if self.inspect:
            return None
        records: list[Applied] = []
        delays: list[tuple[_Entry, float]] = []
        for entry in self.entries:
            always = entry.compiled.always
            if always is None:
                return None
            records.append(always[0])
            delays.append((entry, always[1]))
        return tuple(records), tuple(delays)


class _Lane:
    """One direction of one session.

    ``plan`` (see :class:`_Plan`) and ``constant`` (its
    :meth:`~_Plan.constant`, read first) are replaced by the injector under
    its lock when rules change; everything else belongs to the thread
    deciding the session. ``sent`` holds the region-access requests
    forwarded this way until their replies come the ``other`` way.
    """

    __slots__ = (
        "constant", "direction", "index", "last_release", "other", "plan", "sent", "session",
        "stalled_until",
    )

    def __init__(self, session: int, direction: Direction) -> None:
        self.session = session
        self.direction = direction
        self.index = 0
        self.last_release = -math.inf
        self.stalled_until = -math.inf
        self.plan = _Plan.of((), remember=False, recall=False)
        self.constant = self.plan.constant()
        self.sent: Outstanding[_Pending] = Outstanding(MAX_OUTSTANDING,
                                                       per_id=_MAX_PENDING_PER_ID)
        self.other = self


class Injector:
    """Decides, message by message, which faults to inject (sans-IO, no clock).

    ``rules`` are added in order (see :meth:`add`); ``seed`` seeds every
    random draw. Rules can be added and removed while messages flow, from
    any thread; each session is decided by one thread at a time.
    """

    def __init__(self, rules: Iterable[Rule | str] = (), seed: int = 0) -> None:
        self.seed = seed
        # held to change rules and lanes, and to read counters; never to decide
        self._lock = threading.Lock()
        #: called (from the thread that changed them) after the rules change
        self._watchers: list[Callable[[], None]] = []
        self._compiled: tuple[_Compiled, ...] = ()
        self._next_id = 1
        self._remembered: set[Direction] = set()
        self._c2s: dict[int, _Lane] = {}
        self._s2c: dict[int, _Lane] = {}
        #: messages of forgotten sessions
        self._retired_messages = 0
        #: per (session, IRQ index, vector): interrupts asked about so far
        self._irq_counts: dict[tuple[int, int, int], int] = {}
        #: per (session, IRQ index, vector, rule id): the random stream
        self._irq_streams: dict[tuple[int, int, int, int], random.Random] = {}
        for rule in rules:
            self.add(rule)

    # ----------------------------------------------------------------- rules

    @property
    def rules(self) -> tuple[Rule, ...]:
        """The current rules, in the order they are applied."""
        return tuple(compiled.rule for compiled in self._compiled)

    def add(self, rule: Rule | str) -> Rule:
        """Append a rule (or rule text); returns it with its id.

        A rule with id 0 gets the next free id (one above the highest seen);
        an id already in use raises :class:`InjectError`.
        """
        if isinstance(rule, str):
            rule = parse_rule(rule)
        with self._lock:
            if rule.id == 0:
                rule = attrs.evolve(rule, id=self._next_id)
            elif any(compiled.rule.id == rule.id for compiled in self._compiled):
                raise InjectError(f"rule id {rule.id} is already in use")
            self._next_id = max(self._next_id, rule.id + 1)
            compiled = _Compiled(rule)
            self._compiled = (*self._compiled, compiled)
            self._remembered |= compiled.remembered()
            self._replan()
        self._changed()
        return rule

    def remove(self, rule_id: int) -> Rule:
        """Take a rule out (with its counters and random streams); returns it."""
        with self._lock:
            for compiled in self._compiled:
                if compiled.rule.id == rule_id:
                    self._compiled = tuple(c for c in self._compiled if c is not compiled)
                    self._replan()
                    break
            else:
                raise InjectError(f"no rule with id {rule_id}")
        self._changed()
        return compiled.rule

    def watch(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from the changing thread) whenever rules are added
        or removed: whoever lets messages by undecided (:meth:`unchanged`)
        asks again."""
        with self._lock:
            self._watchers.append(callback)

    def unwatch(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if callback in self._watchers:
                self._watchers.remove(callback)

    def _changed(self) -> None:
        with self._lock:
            watchers = list(self._watchers)
        for callback in watchers:
            callback()

    def statistics(self) -> InjectorStatistics:
        """Counters per current rule (see :class:`RuleStatistics`)."""
        with self._lock:
            totals: dict[_Compiled, _Counts] = {}
            for compiled in self._compiled:
                totals[compiled] = counts = _Counts()
                counts.add(compiled.retired)
                counts.add(compiled.irq_counts)
            messages = self._retired_messages
            for lane in self._lanes():
                for entry in lane.plan.entries:
                    if entry.compiled in totals:
                        totals[entry.compiled].add(entry)
                # read after the counters, as deciding counts the message first
                messages += lane.index
        return InjectorStatistics(
            messages,
            tuple(
                RuleStatistics(c.rule.id, c.rule.text, t.matched, t.applied, t.injected_delay)
                for c, t in totals.items()
            ),
        )

    def forget(self, session: int) -> None:
        """Drop the per-session state of a finished session (indexes, queues, streams).

        Its messages and counters stay in :meth:`statistics`.
        """
        with self._lock:
            for key in [k for k in self._irq_counts if k[0] == session]:
                del self._irq_counts[key]
            for stream in [k for k in self._irq_streams if k[0] == session]:
                del self._irq_streams[stream]
            for lanes in (self._c2s, self._s2c):
                lane = lanes.pop(session, None)
                if lane is not None:
                    self._retired_messages += lane.index
                    for entry in lane.plan.entries:
                        entry.compiled.retired.add(entry)

    def _lanes(self) -> list[_Lane]:
        return [*self._c2s.values(), *self._s2c.values()]

    def _replan(self) -> None:
        """Give every lane the plan of the current rules (under the lock)."""
        for lane in self._lanes():
            self._plan(lane)

    def _plan(self, lane: _Lane) -> None:
        """Set ``lane.plan`` from the current rules, keeping the entries of kept rules."""
        kept = {entry.compiled: entry for entry in lane.plan.entries}
        prefix = f"vfioproxy.inject/{self.seed}/{lane.session}/{lane.direction.value}"
        entries = tuple(
            kept.get(compiled) or _Entry(compiled, f"{prefix}/{compiled.rule.id}")
            for compiled in self._compiled
            if compiled.serves(lane.session, lane.direction)
        )
        remember = lane.direction in self._remembered
        recall = lane.direction.reverse in self._remembered
        plan = _Plan.of(entries, remember, recall)
        lane.plan, lane.constant = plan, plan.constant()

    def _open(self, session: int, direction: Direction) -> _Lane:
        """The lane of a session direction; both are made at the session's first message."""
        with self._lock:
            if session not in self._c2s:
                c2s, s2c = _Lane(session, Direction.C2S), _Lane(session, Direction.S2C)
                c2s.other, s2c.other = s2c, c2s
                self._plan(c2s)
                self._plan(s2c)
                self._c2s[session], self._s2c[session] = c2s, s2c
            return (self._c2s if direction is _C2S else self._s2c)[session]

    # ----------------------------------------------------------------- interrupts

    def irq(self, session: int, index: int, vector: int, now: float) -> IrqDecision | None:
        """What becomes of an interrupt of (``index``, ``vector``) read at
        ``now`` (None: no irq rule acts: signal it now); see the module
        docstring. Safe from any thread."""
        rules = self._compiled
        if not any(compiled.rule.match.irq is not None for compiled in rules):
            return None
        with self._lock:
            key = (session, index, vector)
            count = self._irq_counts.get(key, 0)
            self._irq_counts[key] = count + 1
            fired: list[tuple[_Compiled, random.Random]] = []
            for compiled in rules:
                rule = compiled.rule
                if not rule.match.irq_matches(session, index, vector, count):
                    continue
                compiled.irq_counts.matched += 1
                probability = compiled.probability
                stream = self._irq_streams.get((*key, rule.id))
                if stream is None:
                    stream = random.Random(
                        f"vfioproxy.inject/{self.seed}/{session}/irq/{index}.{vector}/{rule.id}")
                    self._irq_streams[(*key, rule.id)] = stream
                if probability < 1.0 and (probability <= 0.0 or stream.random() >= probability):
                    continue
                fired.append((compiled, stream))
            # the first firing drop decides; delays apply to what is not dropped
            drops = [c for c, _ in fired if c.phase is _FATE][:1]
            applied: list[Applied] = []
            delay = 0.0
            for compiled in drops:
                compiled.irq_counts.applied += 1
                applied.append(Applied(compiled.rule.id, compiled.rule.action))
            for compiled, stream in [] if drops else fired:
                action = compiled.rule.action
                if not isinstance(action, Delay):  # pragma: no cover - Rule checks it
                    continue
                seconds, note = capped(action.distribution.draw(stream))
                compiled.irq_counts.applied += 1
                compiled.irq_counts.injected_delay += seconds
                delay += seconds
                applied.append(Applied(compiled.rule.id, action, seconds, note))
        if not applied:
            return None
        return IrqDecision(bool(drops), delay, tuple(applied))

    # ----------------------------------------------------------------- deciding

    def unchanged(
        self, session: int, direction: Direction, now: float
    ) -> tuple[Applied, ...] | None:
        """What every next message of this session direction gets at ``now``
        when that is the same for each and leaves it as it is: ``()`` when no
        rule serves the direction, else the records of the rules that serve it,
        all fixed zero delays that apply to every message (and nothing is
        tracked for the other direction's rules, the direction is not stalled,
        nothing of it is held). None: :meth:`decide` each message. While it is
        not None, messages may be forwarded at once without :meth:`decide`,
        their inject records made from what it returned and counted with
        :meth:`passed`, until the rules change (:meth:`watch`)."""
        lane = (self._c2s if direction is _C2S else self._s2c).get(session)
        if lane is None:
            lane = self._open(session, direction)
        constant = lane.constant
        if (constant is None or lane.plan.remember or lane.stalled_until > now
                or lane.last_release > now):
            return None
        applied, delays = constant
        for _, seconds in delays:
            if seconds:
                return None
        return applied

    def next_index(self, session: int, direction: Direction) -> int:
        """The index the next message of this session direction will have."""
        lane = (self._c2s if direction is _C2S else self._s2c).get(session)
        return 0 if lane is None else lane.index

    def passed(self, session: int, direction: Direction, messages: int) -> None:
        """Count messages forwarded without :meth:`decide` while :meth:`unchanged`
        (their indexes, which rules match on, and the zero delays applied)."""
        lane = (self._c2s if direction is _C2S else self._s2c).get(session)
        if lane is None:
            lane = self._open(session, direction)
        lane.index += messages
        constant = lane.constant
        if constant is not None:
            for entry, _ in constant[1]:
                entry.matched += messages
                entry.applied += messages

    def decide(self, session: int, direction: Direction, data: bytes, now: float) -> Decision:
        """Decide the fate of one message arriving at ``now``; never raises on bad bytes."""
        if type(data) is not bytes:
            data = bytes(data)
        lane = (self._c2s if direction is _C2S else self._s2c).get(session)
        if lane is None:
            lane = self._open(session, direction)
        index = lane.index
        lane.index = index + 1
        constant = lane.constant
        if constant is not None:  # nothing to look at: no rules, or fixed delays for all
            applied, delays = constant
            t = now
            if lane.stalled_until > t:
                t = lane.stalled_until
            for entry, seconds in delays:
                t += seconds
                entry.matched += 1
                entry.applied += 1
                entry.injected_delay += seconds
        else:
            entries, inspect, regions, remember, recall = lane.plan
            command = flags = message_type = region = offset = None
            if inspect and len(data) >= HEADER_SIZE:
                msg_id, command, _, flags, _ = HEADER.unpack_from(data)
                message_type = flags & TYPE_MASK
                if command in regions and len(data) >= _ACCESS_END:
                    offset, region = ACCESS.unpack_from(data, HEADER_SIZE)
                if recall and message_type == _REPLY_TYPE and command in ACCESS_COMMANDS:
                    pending = lane.other.sent.take(msg_id, lambda p: p[0] == command)
                    if pending is not None:
                        _, region, offset = pending
            fired: list[_Entry] | None = None
            timing_only = True
            for entry in entries:
                compiled = entry.compiled
                commands = compiled.commands
                if commands is not None and command not in commands:
                    continue  # a message without header too
                test = compiled.test
                if test is not None and not test(index, command, message_type, region, offset):
                    continue
                entry.matched += 1
                probability = compiled.probability
                if probability < 1.0 and (
                    probability <= 0.0 or entry.stream().random() >= probability
                ):
                    continue
                if fired is None:
                    fired = [entry]
                else:
                    fired.append(entry)
                if compiled.phase is not _TIMING:
                    timing_only = False
            track = (
                remember and message_type == _COMMAND_TYPE and command in ACCESS_COMMANDS
            )
            if not timing_only:
                assert fired is not None
                decision = _act(lane, fired, data, now, index, command)
                if track and decision.forward:
                    _remember(lane, decision.data, data, command, flags)
                return decision
            if track:
                _remember(lane, data, data, command, flags)
            # the release time and timing alone (module docstring, step 4)
            t = lane.stalled_until if lane.stalled_until > now else now
            applied = ()
            if fired is not None:
                applied, t = _timing(fired, t, len(data))
        if lane.last_release > t:
            t = lane.last_release
        lane.last_release = t
        return _decision(Decision, (t, True, data, None, False, False, applied, index))


def _timing(fired: list[_Entry], t: float, size: int) -> tuple[tuple[Applied, ...], float]:
    """The records of the timing rules that fired on a forwarded message, and
    ``t`` after them."""
    if len(fired) == 1:  # the common case, made once
        entry = fired[0]
        fixed = entry.compiled.fixed
        if fixed is not None:
            entry.applied += 1
            entry.injected_delay += fixed[1]
            return fixed[0], t + fixed[1]
    applied = []
    for entry in fired:
        record, after = entry.time(t, size, True)
        if record is not None:
            entry.applied += 1
            entry.injected_delay += cast(float, record.value)
            applied.append(record)
        t = after
    return tuple(applied), t


def _act(
    lane: _Lane, fired: list[_Entry], data: bytes, now: float, index: int, command: int | None
) -> Decision:
    """The decision on a message some rules fired on: the phases in order
    (module docstring, steps 2-5), each rule acting in its action's phase."""
    records: list[Applied | None] = [None] * len(fired)
    forward, acts = True, True
    reply: bytes | None = None
    close_before = close_after = False
    for position, entry in enumerate(fired):
        if entry.compiled.phase is _FATE:
            rule = entry.compiled.rule
            fate: Fate = entry.compiled.effect(data)
            records[position] = Applied(rule.id, rule.action, fate.value, fate.note)
            forward, acts, reply = fate.forward, fate.acts, fate.reply
            close_before, close_after = fate.close_before, fate.close_after
            break

    stalled = lane.stalled_until
    if now >= stalled:
        for position, entry in enumerate(fired):
            if entry.compiled.phase is _HOLD:
                rule = entry.compiled.rule
                seconds = entry.compiled.effect()
                stalled = max(stalled, now + seconds)
                records[position] = Applied(
                    rule.id, rule.action, seconds, f"direction held until {stalled!r}"
                )
        lane.stalled_until = stalled
    if not acts:
        return _finish(fired, records, now, False, data, None, False, False, index)

    t = max(now, stalled)
    buffer: bytearray | None = None
    for position, entry in enumerate(fired):
        phase = entry.compiled.phase
        if phase is _TIMING:
            records[position], t = entry.time(t, len(data), forward)
        elif phase is _REWRITE and forward:
            if buffer is None:
                buffer = bytearray(data)
            rule = entry.compiled.rule
            value, note = entry.compiled.effect(buffer, command)
            records[position] = Applied(rule.id, rule.action, value, note)
    release = max(t, lane.last_release)
    lane.last_release = release
    out = data if buffer is None else bytes(buffer)
    return _finish(fired, records, release, forward, out, reply, close_before, close_after, index)


def _finish(
    fired: list[_Entry],
    records: list[Applied | None],
    release: float,
    forward: bool,
    data: bytes,
    reply: bytes | None,
    close_before: bool,
    close_after: bool,
    index: int,
) -> Decision:
    """The decision, its applied records (in rule order) counted on their rules."""
    applied = []
    for entry, record in zip(fired, records, strict=True):
        if record is not None:
            applied.append(record)
            entry.applied += 1
            if record.action.delays and isinstance(record.value, (int, float)):
                entry.injected_delay += record.value
    return _decision(
        Decision,
        (release, forward, data, reply, close_before, close_after, tuple(applied), index),
    )


def _remember(
    lane: _Lane, sent: bytes, data: bytes, command: int | None, flags: int | None
) -> None:
    """Track a forwarded region-access request, unless no_reply, until its reply.

    ``data``: the request as it arrived (its region and offset are
    remembered); ``sent``: as it was forwarded (its msg_id is what the
    reply repeats).
    """
    if command is None or flags is None or flags & FLAG_NO_REPLY:
        return
    region = offset = None
    if len(data) >= _ACCESS_END:
        offset, region = ACCESS.unpack_from(data, HEADER_SIZE)
    (msg_id,) = _MSG_ID.unpack_from(sent, MSG_ID.offset)
    lane.sent.add(msg_id, (command, region, offset))
