"""``vfioproxy trace stats``: counts, bytes, latencies and fds of a trace."""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from recorder.records import EventRecord, MessageRecord
from vfioproxy.protocol.constants import irq_vector_name
from vfioproxy.trace.decoded import DecodedItem, DecodedMessage, SessionNotice, TornMessage
from vfioproxy.trace.tables import table, table_lines
from vfioproxy.trace.timeline.model import SessionTimeline
from vfioproxy.trace.timeline.table import session_lines

#: c2s messages kept per session to find the one just before an interrupt
_RECENT_C2S = 8


def percentile(sorted_values: Sequence[int], fraction: float) -> int:
    """Nearest-rank percentile of an ascending, non-empty sequence."""
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


#: latencies kept exactly per command; past that many, a uniform sample of that many
LATENCY_SAMPLES = 10_000


class LatencySample:
    """The request -> reply latencies of one command, in bounded memory.

    ``count``, ``total`` and ``max`` are exact. The values themselves are
    kept exactly up to ``size`` of them; past that, ``values`` is a uniform
    random sample of ``size`` of all of them (reservoir sampling, Vitter's
    algorithm R, seeded: the same trace always gives the same figures), so
    percentiles computed from it are estimates (``exact`` is False).
    """

    __slots__ = ("_random", "count", "max", "size", "total", "values")

    def __init__(self, size: int = LATENCY_SAMPLES) -> None:
        self.size = size
        self.values: list[int] = []
        self.count = 0
        self.total = 0
        self.max = 0
        self._random = random.Random(0)

    @property
    def exact(self) -> bool:
        """Whether every value is kept (so percentiles are exact)."""
        return self.count == len(self.values)

    def add(self, ns: int) -> None:
        self.count += 1
        self.total += ns
        self.max = max(self.max, ns)
        if len(self.values) < self.size:
            self.values.append(ns)
            return
        slot = self._random.randrange(self.count)
        if slot < self.size:
            self.values[slot] = ns


@attrs.frozen
class LatencyStats:
    """Percentiles of one command's latencies; ``exact`` False when they are
    estimated from a sample (:class:`LatencySample`); count and max are exact."""

    count: int
    p50_ns: int
    p90_ns: int
    p99_ns: int
    max_ns: int
    exact: bool = True

    @classmethod
    def of(cls, values: Sequence[int] | LatencySample) -> LatencyStats:
        if isinstance(values, LatencySample):
            ordered = sorted(values.values)
            return cls(values.count, percentile(ordered, 0.50), percentile(ordered, 0.90),
                       percentile(ordered, 0.99), values.max, values.exact)
        ordered = sorted(values)
        return cls(
            len(ordered),
            percentile(ordered, 0.50),
            percentile(ordered, 0.90),
            percentile(ordered, 0.99),
            ordered[-1],
        )


@attrs.define
class TraceStats:
    """Everything ``trace stats`` reports, also as plain data (``to_dict``)."""

    sessions: set[int] = attrs.field(factory=set)
    messages: int = 0
    bytes: int = 0
    first_ns: int | None = None
    last_ns: int | None = None
    #: (command, direction, kind) -> [messages, bytes]; kind: command/reply/error/posted
    traffic: dict[tuple[str, str, str], list[int]] = attrs.field(factory=dict)
    latencies: dict[str, LatencySample] = attrs.field(
        factory=lambda: defaultdict(LatencySample))
    fds: Counter[tuple[str, str]] = attrs.field(factory=Counter)
    violations: Counter[str] = attrs.field(factory=Counter)
    events: Counter[str] = attrs.field(factory=Counter)
    undecoded: int = 0
    #: the reader's own notices (SessionNotice.kind: evicted, resumed)
    notices: Counter[str] = attrs.field(factory=Counter)
    #: per interrupt vector (``MSIX[0]``) of ``irq`` events: [events, signals
    #: (the eventfd counts summed), dropped, delayed]
    irqs: dict[str, list[int]] = attrs.field(factory=dict)
    #: per vector: the time from the last c2s message before each interrupt,
    #: when that message was a REGION_WRITE (a doorbell, if the device has one)
    irq_latencies: dict[str, LatencySample] = attrs.field(
        factory=lambda: defaultdict(LatencySample))
    #: per session: the times and commands of its last c2s messages so far
    #: (an ``irq`` event may be written after messages that came later than it)
    _last_c2s: dict[int, deque[tuple[int, str]]] = attrs.field(factory=dict)

    def add(self, item: DecodedItem) -> None:
        if isinstance(item, EventRecord):
            self.events[item.kind] += 1
            if item.kind == "irq":
                self._irq(item)
            return
        if isinstance(item, SessionNotice):
            self.notices[item.kind] += 1
            return
        if isinstance(item, TornMessage):
            self._count(item.record)
            self.violations[item.violation.kind] += 1
            return
        if not isinstance(item, DecodedMessage):
            return
        record = item.record
        header = item.observation.message.header
        self._count(record)
        if header.is_reply:
            kind = "error" if header.is_error else "reply"
        else:
            kind = "posted" if header.no_reply else "command"
        if record.direction.value == "c2s":
            recent = self._last_c2s.get(record.session)
            if recent is None:
                recent = self._last_c2s[record.session] = deque(maxlen=_RECENT_C2S)
            recent.append((record.t_ns, header.command_name))
        key = (header.command_name, record.direction.value, kind)
        row = self.traffic.setdefault(key, [0, 0])
        row[0] += 1
        row[1] += record.wire_length
        if item.latency_ns is not None:
            self.latencies[header.command_name].add(item.latency_ns)
        for fd in record.fds:
            self.fds[(fd.kind.value, record.direction.value)] += 1
        for violation in item.observation.violations:
            self.violations[violation.kind] += 1
        if not item.observation.message.decoded:
            self.undecoded += 1

    def _irq(self, event: EventRecord) -> None:
        """Count an ``irq`` event, and time it from the c2s REGION_WRITE just
        before it in its session (the last c2s message by time, if that is
        one and among the session's last few)."""
        data = event.data
        index, vector, count = data.get("index"), data.get("vector"), data.get("count")
        if not isinstance(index, int) or not isinstance(vector, int):
            return
        name = irq_vector_name(index, vector)
        row = self.irqs.setdefault(name, [0, 0, 0, 0])
        row[0] += 1
        row[1] += count if isinstance(count, int) else 0
        row[2] += data.get("fate") == "dropped"
        row[3] += data.get("fate") == "delayed"
        recent = None if event.session is None else self._last_c2s.get(event.session)
        before = [m for m in recent or () if m[0] <= event.t_ns]
        if before and before[-1][1] == "REGION_WRITE":
            self.irq_latencies[name].add(event.t_ns - before[-1][0])

    def _count(self, record: MessageRecord) -> None:
        self.sessions.add(record.session)
        self.messages += 1
        self.bytes += record.wire_length
        self.first_ns = record.t_ns if self.first_ns is None else min(self.first_ns, record.t_ns)
        self.last_ns = record.t_ns if self.last_ns is None else max(self.last_ns, record.t_ns)

    def latency_table(self) -> dict[str, LatencyStats]:
        return {name: LatencyStats.of(v) for name, v in sorted(self.latencies.items()) if v.count}

    def to_dict(self) -> dict[str, Any]:
        span = 0 if self.first_ns is None or self.last_ns is None else self.last_ns - self.first_ns
        return {
            "sessions": sorted(self.sessions),
            "messages": self.messages,
            "bytes": self.bytes,
            "duration_ns": span,
            "undecoded": self.undecoded,
            "traffic": [
                {"command": c, "dir": d, "kind": k, "messages": n, "bytes": b}
                for (c, d, k), (n, b) in sorted(self.traffic.items())
            ],
            "latency": {name: attrs.asdict(stats) for name, stats in self.latency_table().items()},
            "fds": [
                {"kind": kind, "dir": d, "count": n} for (kind, d), n in sorted(self.fds.items())
            ],
            "violations": dict(sorted(self.violations.items())),
            "events": dict(sorted(self.events.items())),
            "notices": dict(sorted(self.notices.items())),
            "irqs": [
                {"vector": name, "events": n, "signals": signals, "dropped": dropped,
                 "delayed": delayed, "per_second": n / (span / 1e9) if span else None,
                 "after_region_write": (attrs.asdict(LatencyStats.of(self.irq_latencies[name]))
                                        if self.irq_latencies[name].count else None)}
                for name, (n, signals, dropped, delayed) in sorted(self.irqs.items())
            ],
        }


def violations_by_session(items: Iterable[DecodedItem]) -> dict[int, Counter[str]]:
    """The protocol violations of each session, by kind (sessions without any left out)."""
    found: dict[int, Counter[str]] = defaultdict(Counter)
    for item in items:
        if isinstance(item, DecodedMessage):
            for violation in item.observation.violations:
                found[item.record.session][violation.kind] += 1
        elif isinstance(item, TornMessage):
            found[item.record.session][item.violation.kind] += 1
    return dict(found)


def collect(items: Iterable[DecodedItem]) -> TraceStats:
    stats = TraceStats()
    for item in items:
        stats.add(item)
    return stats


def _us(ns: int) -> str:
    return f"{ns / 1000:.1f}"


def text_report(stats: TraceStats) -> list[str]:
    """``trace stats`` for people: a summary line, then tables (laid out by rich)."""
    span = 0 if stats.first_ns is None or stats.last_ns is None else stats.last_ns - stats.first_ns
    tables = [table(None, ("command", "dir", "kind", "msgs", "bytes"), [
        (command, direction, kind, n, size)
        for (command, direction, kind), (n, size) in sorted(stats.traffic.items())
    ], left=3)]
    latencies = stats.latency_table()
    if latencies:
        tables.append(table("request -> reply latency (us)",
                            ("command", "n", "p50", "p90", "p99", "max"), [
            (name, s.count, *(("" if s.exact else "~") + _us(ns)
                              for ns in (s.p50_ns, s.p90_ns, s.p99_ns)), _us(s.max_ns))
            for name, s in latencies.items()
        ]))
    tables.append(table("fds passed", ("kind", "dir", "count"), [
        (kind, direction, n) for (kind, direction), n in sorted(stats.fds.items())
    ] or [("none", "", "")], left=2))
    if stats.violations:
        tables.append(table("protocol violations", ("kind", "count"),
                            sorted(stats.violations.items())))
    if stats.events:
        tables.append(table("events", ("kind", "count"), sorted(stats.events.items())))
    if stats.irqs:
        rows = []
        for name, (n, signals, dropped, delayed) in sorted(stats.irqs.items()):
            after = stats.irq_latencies[name]
            timed = LatencyStats.of(after) if after.count else None
            rows.append((name, n, signals, dropped, delayed,
                         f"{n / (span / 1e9):.1f}" if span else "",
                         timed.count if timed else 0,
                         *((_us(timed.p50_ns), _us(timed.p90_ns), _us(timed.max_ns))
                           if timed else ("", "", ""))))
        tables.append(table(
            "interrupts (--interpose-irqs); after: us since the last c2s message before "
            "the interrupt, when that was a REGION_WRITE",
            ("vector", "irqs", "signals", "dropped", "delayed", "per s", "after n",
             "p50", "p90", "max"), rows))
    notes = []
    sizes = sorted({sample.size for sample in stats.latencies.values() if not sample.exact})
    if sizes:
        notes = [f"~: latency percentiles estimated from a uniform sample of "
                 f"{'/'.join(map(str, sizes))} per command (n and max exact)", ""]
    if stats.notices["evicted"]:
        notes += [f"decoding state of {stats.notices['evicted']} sessions dropped (more open at "
                 f"once than --max-open-sessions), {stats.notices['resumed']} of them went on "
                 "and were decoded afresh", ""]
    return [
        f"sessions: {len(stats.sessions)}  messages: {stats.messages}  bytes: {stats.bytes}  "
        f"span: {span / 1e6:.3f} ms  undecoded: {stats.undecoded}",
        "",
        *notes,
        *table_lines(tables),
    ]


def by_step_report(timelines: Sequence[SessionTimeline]) -> list[str]:
    """``trace stats --by-step`` for people: per session, the step table of
    ``trace timeline`` (:func:`vfioproxy.trace.timeline.table.session_lines`)."""
    lines: list[str] = []
    for timeline in timelines:
        if lines:
            lines.append("")
        lines += session_lines(timeline)
    return lines or ["no client session with messages in the trace"]


def by_step_dict(timelines: Sequence[SessionTimeline]) -> dict[str, Any]:
    """``trace stats --by-step --json``: per session, its steps' times."""
    return {"sessions": [
        {"session": t.session, "messages": len(t.messages), "unlabelled": t.unlabelled,
         "cut_short": t.cut_short, "steps": [s.to_dict() for s in t.steps]}
        for t in timelines
    ]}
