"""What a run's trace says: per-command latency, injected actions, expected delay."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from recorder.reader import TraceReader
from recorder.records import EventRecord
from vfioproxy.experiment.model import CommandLatency
from vfioproxy.inject import Delay, Rule
from vfioproxy.inject.actions import ACTIONS, DELAYING
from vfioproxy.trace import stats
from vfioproxy.trace.decoded import DecodedMessage, decoded_records

__all__ = ["TraceFacts", "analyse_trace", "expected_delay", "inject_items"]

#: actions whose value is seconds added to the message
_TIMED = frozenset(name for name, kind in ACTIONS.items() if kind.phase in DELAYING)


@attrs.frozen
class TraceFacts:
    """What one run's trace holds (see :func:`analyse_trace`)."""

    messages: int
    latency: dict[str, CommandLatency]
    #: messages per direction ("c2s", "s2c")
    per_direction: dict[str, int]
    #: None when the trace has no inject events at all
    applied: tuple[dict[str, Any], ...] | None
    actions: dict[str, int]
    injected_delay_s: float
    #: first to last message, as the proxy saw them (None without messages)
    span_s: float | None = None
    #: per direction, the messages that begin a turn: their sender had waited
    #: for the other side (the message before them went the other way). A delay
    #: on such a message adds to the session; one on a message sent right
    #: behind another of its direction mostly overlaps with that one's
    turns: dict[str, int] = attrs.field(factory=dict)


def inject_items(events: Iterable[EventRecord]) -> list[dict[str, Any]]:
    """The applied actions of ``inject`` events, tolerant of their shape.

    An event's ``applied`` list gives one item each (``rule``, ``action``,
    ``text``, ``value`` in seconds for delays); an event without it is one
    item itself (the older FORMAT.md shape, delay values in ns).
    """
    items: list[dict[str, Any]] = []
    for event in events:
        if event.kind != "inject":
            continue
        applied = event.data.get("applied")
        if isinstance(applied, list):
            items.extend(item for item in applied if isinstance(item, dict))
        elif "action" in event.data:
            item = dict(event.data)
            value = item.get("value")
            if item.get("action") in _TIMED and isinstance(value, int):
                item["value"] = value / 1e9
            items.append(item)
    return items


def analyse_trace(path: str | os.PathLike[str]) -> TraceFacts:
    """Counts, request -> reply latency per command (as the proxy saw it), injections."""
    events: list[EventRecord] = []
    times: list[int] = []
    turns: Counter[str] = Counter()
    last: dict[int, str] = {}

    def keep(items: Iterable[Any]) -> Iterable[Any]:
        for item in items:
            if isinstance(item, EventRecord):
                events.append(item)
            elif isinstance(item, DecodedMessage):
                record = item.record
                times.append(record.t_ns)
                direction = record.direction.value
                if last.get(record.session) != direction:
                    turns[direction] += 1
                last[record.session] = direction
            yield item

    with TraceReader(path) as reader:
        collected = stats.collect(keep(decoded_records(reader)))
    latency = {}
    for name, sample in sorted(collected.latencies.items()):
        if sample.count:
            table = stats.LatencyStats.of(sample)
            latency[name] = CommandLatency(
                table.count, table.p50_ns / 1e9, table.p99_ns / 1e9, sample.total / 1e9
            )
    per_direction: Counter[str] = Counter()
    for (_, direction, _), (count, _) in collected.traffic.items():
        per_direction[direction] += count
    has_inject = any(event.kind == "inject" for event in events)
    items = inject_items(events)
    delay = sum(
        float(item["value"])
        for item in items
        if item.get("action") in _TIMED and isinstance(item.get("value"), (int, float))
    )
    return TraceFacts(
        messages=collected.messages,
        latency=latency,
        per_direction=dict(per_direction),
        applied=tuple(items) if has_inject else None,
        actions=dict(Counter(str(item.get("action")) for item in items)),
        injected_delay_s=delay,
        span_s=(max(times) - min(times)) / 1e9 if times else None,
        turns=dict(turns),
    )


def expected_delay(
    rules: Sequence[Rule], facts: TraceFacts, *, turns: bool = False
) -> float | None:
    """Messages matched x mean delay, summed over the delay rules on ``*`` commands
    (None when there is no such rule).

    Matched messages are counted from the inject events when the trace has
    them, else as every message of the rule's direction (index, session and
    probability filters are then not taken into account). With ``turns``,
    only the messages that begin a turn count (see :attr:`TraceFacts.turns`;
    the rule's other filters are then not taken into account).
    """
    total: float | None = None
    for rule in rules:
        if not isinstance(rule.action, Delay) or rule.match.command is not None:
            continue
        total = total or 0.0
        if turns:
            if rule.match.direction is None:
                matched = sum(facts.turns.values())
            else:
                matched = facts.turns.get(rule.match.direction.value, 0)
        elif facts.applied is not None:
            matched = sum(
                1
                for item in facts.applied
                if item.get("rule") == rule.id and item.get("action") == "delay"
            )
        elif rule.match.direction is None:
            matched = sum(facts.per_direction.values())
        else:
            matched = facts.per_direction.get(rule.match.direction.value, 0)
        if matched:
            total += matched * rule.action.distribution.mean()
    return total
