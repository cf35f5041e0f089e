"""Two recorded sessions side by side: ``vfioproxy trace diff A B``.

A diff is a replay where both sides are recorded. Each session is read as a
replay :class:`~vfioproxy.replay.script.Script` (its messages paired:
per direction, by id, FIFO for reused ids), cut into *exchanges* (a command
and the reply that answers it), and the two sessions' exchanges are aligned
per direction, in order, by the rule the replay server pairs a live request
with a recorded one: two commands pair when they agree on what the
:class:`~vfioproxy.replay.match.Matcher` looks at (command, header flags,
every body field, the fds' kinds and sizes), ignore rules applied. A reply
never pairs on its own: it follows its command. Where the next commands of
the two sides do not pair:

- if they are of one kind (and so, perhaps, the next few), and the sides
  match again right after them (:data:`SYNC` exchanges in a row), they
  changed: they pair, and their fields are compared;
- else the nearer partner within :data:`LOOKAHEAD` exchanges wins, if the
  sides then go on matching for :data:`SYNC` exchanges (in a repetitive
  stream the same value comes again soon: that alone proves nothing); the
  exchanges skipped to reach it are only in one side;
- with no such partner near, looser partners are looked for the same way:
  a command of the same kind pointing at the same thing in PCI terms (the
  same config register, a capability's wherever the capability is: MSI-X's
  ``msg_ctl`` at 0xa2 of one device pairs with it at 0x42 of another; the
  same region, BAR offset, IRQ type or iova), then any command of the same
  kind; those pair and their fields are compared, which is how "the same
  step, another value" shows.

The order the two directions interleave in, and timing, never count: two
runs of one QEMU pipeline their DMA_MAPs differently and are still equal.

Paired messages are compared field by field with
:func:`~vfioproxy.replay.match.compare` on :func:`~vfioproxy.replay.fields.flatten`'s
names, so a difference reads as the replay report's do (``data[0x0:0x2]
(vendor_id) 0x494f != 0x1b36``; config-space byte ranges named by A's config
space), and :func:`~vfioproxy.replay.fields.where` places each side's message
in PCI terms with the config space that side read.

Why here and not in :mod:`vfioproxy.trace`: the engine is replay's pairing,
flattening, ignore rules and report wording applied to two recordings; the
layers forbid ``trace`` to import ``replay``, and moving those pieces down
would split replay's own facts between two packages. So ``trace diff`` is a
``trace`` command whose engine lives with the replay it reuses.

Both sessions are held in memory (the alignment looks ahead, and a message
only one side has can be anywhere): :func:`load_session` reads only the
session asked for and refuses one of more than ``max_messages`` messages.
"""

from __future__ import annotations

import bisect
import os
import re
from collections.abc import Callable, Hashable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, Literal

import attrs

from recorder.reader import TraceReader
from vfioproxy.errors import UsageError
from vfioproxy.protocol.bodies import RegionAccessBody
from vfioproxy.protocol.pci import Region
from vfioproxy.replay.fields import flatten, recorded_fd_facts, where
from vfioproxy.replay.match import DEFAULT_IGNORES, IgnoreRule, Matcher, compare
from vfioproxy.replay.report import FieldDiff
from vfioproxy.replay.script import Script, Step, script_from_records
from vfioproxy.side import Direction
from vfioproxy.trace.decoded import DecodedMessage, decoded_records
from vfioproxy.trace.filter import Filter, select
from vfioproxy.trace.sessions import TraceSessions

__all__ = [
    "DEFAULT_MAX_MESSAGES",
    "LOOKAHEAD",
    "DiffReport",
    "Exchange",
    "MessageDiff",
    "Row",
    "diff_scripts",
    "filtered_seqs",
    "load_session",
    "parse_operand",
]

#: how many exchanges ahead the alignment looks for a partner
LOOKAHEAD = 1000
#: how many exchanges in a row must partner after a skip for the skip to count
SYNC = 3
#: how many changed exchanges in a row are looked for before a skip is taken
CHANGED = 64
#: the default bound on the messages of one session (``--max-messages``)
DEFAULT_MAX_MESSAGES = 200_000
#: divergent exchanges the text listing shows without ``--all``
SHOWN = 10
#: differing fields of a message the text listing shows (the first divergence: twice
#: as many; --json has them all)
FIELDS_SHOWN = 4

_OPERAND = re.compile(r"(?P<path>.+):(?P<session>\d+)")
#: a capability's offset in a register name: ``MSI-X[0xa0].msg_ctl``
_CAP_OFFSET = re.compile(r"\[0x[0-9a-fA-F]+\]")


def parse_operand(text: str) -> tuple[str, int | None]:
    """``FILE`` or ``FILE:SESSION`` as (path, session); a path that exists is a
    FILE even if it ends in ``:N``."""
    match = _OPERAND.fullmatch(text)
    if match is None or os.path.exists(text):
        return text, None
    return match["path"], int(match["session"])


def load_session(
    reader: TraceReader, session: int | None = None, *,
    max_messages: int = DEFAULT_MAX_MESSAGES,
) -> Script:
    """Read one session of the trace ``reader`` reads as a paired script.

    ``session`` None means the trace's only session with messages; several
    are a :class:`~vfioproxy.errors.UsageError` naming them, and so is a
    session of more than ``max_messages`` messages (checked before it is
    loaded). The file is read twice: once for its sessions, once for the
    chosen session's records alone. Trace errors propagate; a reader that
    skips damaged records (``skip_damaged``) has them counted as usual.
    """
    path = reader.path
    summaries = reader.sessions()
    found = TraceSessions(
        path,
        tuple(s.session for s in summaries if s.messages),
        tuple(s.session for s in summaries if not s.messages),
    )
    if session is None:
        if not found.with_messages:
            raise UsageError(f"{path}: the trace holds no messages")
        if len(found.with_messages) > 1:
            listed = ", ".join(map(str, found.with_messages))
            raise UsageError(f"{path}: name the session as {path}:N; sessions with "
                             f"messages: {listed}")
        session = found.with_messages[0]
    found.require(session, messages=True)
    count = next(s.messages for s in summaries if s.session == session)
    if count > max_messages:
        raise UsageError(f"{path}: session {session} has {count} messages, more than "
                         f"--max-messages {max_messages}")
    records = list(reader.for_session(session))
    truncation = reader.truncation
    return script_from_records(records, path=path, session=session, truncation=truncation)


@attrs.frozen
class Exchange:
    """A command and its reply (None: no_reply, or the session ends first); a
    reply that answers nothing recorded stands alone as ``first``."""

    first: Step
    reply: Step | None = None

    @property
    def direction(self) -> Direction:
        return self.first.direction

    @property
    def steps(self) -> tuple[Step, ...]:
        return (self.first,) if self.reply is None else (self.first, self.reply)

    def seqs(self) -> str:
        """``#12-#13``: the record numbers of its messages."""
        return "-".join(f"#{s.seq}" for s in self.steps)


def exchanges(script: Script) -> list[Exchange]:
    """The script's exchanges in the order their first messages were recorded."""
    out = []
    for step in script.steps:
        if step.is_command:
            reply = None if step.reply is None else script.steps[step.reply]
            out.append(Exchange(step, reply))
        elif step.answers is None:
            out.append(Exchange(step))
    return out


RowKind = Literal["equal", "differs", "only_a", "only_b"]
DiffKind = Literal["differs", "only_a", "only_b"]


@attrs.frozen
class MessageDiff:
    """One message that differs between the sessions, or that one side lacks.

    ``seq_a`` / ``seq_b`` are its record numbers in A and B (None on the side
    that lacks it); ``where`` places it in PCI terms; ``diffs`` hold A's value
    as ``live`` and B's as ``recorded``."""

    kind: DiffKind
    label: str
    seq_a: int | None
    seq_b: int | None
    where: str | None = None
    diffs: tuple[FieldDiff, ...] = ()

    def subject(self) -> str:
        sides = " / ".join(f"{name} #{seq}" for name, seq in (("A", self.seq_a),
                                                              ("B", self.seq_b))
                           if seq is not None)
        text = f"{sides} {self.label}"
        return f"{text} ({self.where})" if self.where else text

    def text(self, fields: int | None = None) -> str:
        """One line; with ``fields``, the first that many differing fields and a count."""
        if self.kind == "only_a":
            return f"{self.subject()}: only in A"
        if self.kind == "only_b":
            return f"{self.subject()}: only in B"
        shown = self.diffs if fields is None else self.diffs[:fields]
        parts = [d.text(versus="") for d in shown]
        if len(shown) < len(self.diffs):
            parts.append(f"{len(self.diffs) - len(shown)} more difference(s)")
        return f"{self.subject()}: " + "; ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.label, "seq_a": self.seq_a,
                "seq_b": self.seq_b, "where": self.where,
                "diffs": [d.to_json(("a", "b")) for d in self.diffs], "text": self.text()}


@attrs.frozen
class Row:
    """Two aligned exchanges (one of them None when only one side has it) and
    the messages of theirs that differ."""

    a: Exchange | None
    b: Exchange | None
    messages: tuple[MessageDiff, ...] = ()

    @property
    def kind(self) -> RowKind:
        if self.a is None:
            return "only_b"
        if self.b is None:
            return "only_a"
        return "differs" if self.messages else "equal"

    def subject(self) -> str:
        """``A #2-#3 / B #2-#3 VERSION`` for a listing."""
        sides = " / ".join(f"{name} {x.seqs()}" for name, x in (("A", self.a), ("B", self.b))
                           if x is not None)
        some = self.a or self.b
        assert some is not None
        return f"{sides} {some.first.label}"


@attrs.frozen
class SessionFacts:
    """What the report says of one side: where it is from and its size."""

    trace: str
    session: int
    messages: int
    exchanges: int
    duration_ns: int
    notes: tuple[str, ...]
    selected: int | None = None

    def text(self) -> str:
        text = (f"{self.trace} session {self.session}: {self.messages} messages, "
                f"{self.exchanges} exchanges")
        return text if self.selected is None else f"{text}, {self.selected} selected by -Y"

    def to_json(self) -> dict[str, Any]:
        return {"trace": self.trace, "session": self.session, "messages": self.messages,
                "exchanges": self.exchanges, "selected": self.selected,
                "duration_ns": self.duration_ns, "notes": list(self.notes)}


@attrs.frozen
class DiffReport:
    """The outcome of a diff: both sides, the rules used, every aligned row."""

    a: SessionFacts
    b: SessionFacts
    ignore: tuple[IgnoreRule, ...]
    rows: tuple[Row, ...]
    filter: str | None = None

    @property
    def equal(self) -> bool:
        return all(row.kind == "equal" for row in self.rows)

    @property
    def exit_status(self) -> int:
        """0 when the sessions are equal, 1 when they differ."""
        return 0 if self.equal else 1

    def divergences(self) -> list[MessageDiff]:
        return [m for row in self.rows for m in row.messages]

    def counts(self) -> dict[str, int]:
        kinds = [row.kind for row in self.rows]
        return {"exchanges": len(kinds), "equal": kinds.count("equal"),
                "differ": kinds.count("differs"), "only_a": kinds.count("only_a"),
                "only_b": kinds.count("only_b"), "messages_differ": len(self.divergences())}

    def summary(self) -> str:
        c = self.counts()
        paired = c["equal"] + c["differ"]
        return (f"{paired} exchanges paired: {c['equal']} equal, {c['differ']} differ; "
                f"{c['only_a']} only in A, {c['only_b']} only in B; "
                f"{c['messages_differ']} message(s) differ")

    def text(self, *, context: int = 2, all_rows: bool = False) -> str:
        """For people: both sides, the first divergence, then a listing where
        equal exchanges are condensed except ``context`` of them around each
        divergent one; the first :data:`SHOWN` divergent exchanges (every one
        with ``all_rows``). A first divergence is marked ``>>>``, others
        ``!`` (differ), ``-`` (only in A) or ``+`` (only in B)."""
        lines = [f"A: {self.a.text()}", f"B: {self.b.text()}"]
        lines.extend(f"note: A: {note}" for note in self.a.notes)
        lines.extend(f"note: B: {note}" for note in self.b.notes)
        lines.append(f"ignored: {', '.join(map(str, self.ignore)) or 'nothing'}")
        if self.filter is not None:
            lines.append(f"compared: the exchanges with a message -Y {self.filter!r} passes")
        divergences = self.divergences()
        if not divergences:
            lines.append(f"equal: {self.summary()}")
        else:
            lines.append(f"FIRST DIVERGENCE: {divergences[0].text(2 * FIELDS_SHOWN)}")
            lines.extend(self._listing(context, all_rows))
            lines.append(f"differ: {self.summary()}")
        lines.append(f"time (never compared): A {self.a.duration_ns / 1e6:.3f} ms, "
                     f"B {self.b.duration_ns / 1e6:.3f} ms")
        return "\n".join(lines)

    def _listing(self, context: int, all_rows: bool) -> list[str]:
        divergent = [i for i, row in enumerate(self.rows) if row.kind != "equal"]
        shown = divergent if all_rows else divergent[:SHOWN]
        visible: set[int] = set()
        for i in shown:
            visible.update(range(max(0, i - context), i + context + 1))
        end = shown[-1] + context + 1 if shown else 0
        lines: list[str] = []
        run: list[Row] = []

        def flush() -> None:
            if run:
                lines.append(f"    ... {len(run)} equal exchange(s) "
                             f"({_span('A', run, 'a')}, {_span('B', run, 'b')})")
                run.clear()

        first = True
        for i, row in enumerate(self.rows[:end]):
            if i not in visible:
                if row.kind == "equal":
                    run.append(row)
                continue
            flush()
            if row.kind == "equal":
                lines.append(f"    {row.subject()}")
                continue
            for message in row.messages:
                mark = ">>>" if first else _MARKS[message.kind]
                first = False
                lines.append(f"{mark:<3} {message.text(FIELDS_SHOWN)}")
        flush()
        rest = len(divergent) - len(shown)
        if rest:
            lines.append(f"... {rest} more exchange(s) differ (--all lists them, "
                         "--json has every one)")
        return lines

    def to_json(self) -> dict[str, Any]:
        divergences = self.divergences()
        return {
            "equal": self.equal,
            "a": self.a.to_json(),
            "b": self.b.to_json(),
            "ignore": [str(rule) for rule in self.ignore],
            "filter": self.filter,
            "counts": self.counts(),
            "first_divergence": divergences[0].to_json() if divergences else None,
            "divergences": [m.to_json() for m in divergences],
        }


_MARKS: dict[DiffKind, str] = {"differs": "!", "only_a": "-", "only_b": "+"}


def _span(name: str, rows: Sequence[Row], side: str) -> str:
    seqs = [s.seq for row in rows for x in [getattr(row, side)] if x is not None
            for s in x.steps]
    return f"{name} #{min(seqs)}-#{max(seqs)}" if seqs else f"{name} none"


def filtered_seqs(reader: TraceReader, session: int, flt: Filter) -> frozenset[int]:
    """The record numbers of the messages of ``session`` that the display
    filter ``flt`` passes (``trace show -Y``'s selection, read again from ``reader``)."""
    items = decoded_records(reader, session=session)
    return frozenset(item.record.seq for item in select(items, flt, header=reader.header)
                     if isinstance(item, DecodedMessage))


def diff_scripts(
    a: Script,
    b: Script,
    *,
    ignore: Sequence[IgnoreRule] = DEFAULT_IGNORES,
    matcher: Matcher | None = None,
    lookahead: int = LOOKAHEAD,
    selected: tuple[AbstractSet[int] | None, AbstractSet[int] | None] = (None, None),
    filter_text: str | None = None,
) -> DiffReport:
    """Align and compare two sessions (see the module docstring); ``matcher``
    (default: replay server's) says what makes two commands pair, ``lookahead``
    how far ahead a partner is looked for. ``selected`` keeps, of A and of B,
    only the exchanges with a message whose record number is in the set (None:
    all), e.g. those a display filter (``filter_text``) passes."""
    differ = _Differ(a, b, tuple(ignore), matcher or Matcher())
    kept = [_kept(script, seqs) for script, seqs in zip((a, b), selected, strict=True)]
    per_direction = [
        list(_align([x for x in kept[0] if x.direction is d],
                    [x for x in kept[1] if x.direction is d],
                    (differ.key, differ.place, differ.kind), lookahead,
                    differ.pairs_within_ranges if differ.ranges else None))
        for d in Direction
    ]
    rows = [differ.row(x, y) for x, y in _merged(per_direction)]
    facts = [_facts(script, len(mine) if seqs is not None else None)
             for script, mine, seqs in zip((a, b), kept, selected, strict=True)]
    return DiffReport(facts[0], facts[1], tuple(ignore), tuple(rows), filter_text)


def _kept(script: Script, seqs: AbstractSet[int] | None) -> list[Exchange]:
    found = exchanges(script)
    if seqs is None:
        return found
    return [x for x in found if any(step.seq in seqs for step in x.steps)]


def _facts(script: Script, selected: int | None) -> SessionFacts:
    return SessionFacts(script.path, script.session, len(script.steps),
                        len(exchanges(script)), script.duration_ns, script.notes, selected)


Pair = tuple[Exchange | None, Exchange | None]


def _merged(per_direction: list[list[Pair]]) -> list[Pair]:
    """The directions' aligned pairs in one list, in A's recorded order; a pair
    only B has goes right after the pair before it in its direction."""
    keyed: list[tuple[tuple[int, int, int], Pair]] = []
    for pairs in per_direction:
        last, extra = -1, 0
        for x, y in pairs:
            if x is not None:
                last, extra = x.first.position, 0
                keyed.append(((last, 0, 0), (x, y)))
            else:
                extra += 1
                keyed.append(((last, 1, extra), (x, y)))
    keyed.sort(key=lambda item: item[0])
    return [pair for _, pair in keyed]


Key = Callable[[Exchange], Hashable]


class _Index:
    """Where each key occurs in a list of exchanges, to find the next occurrences fast."""

    def __init__(self, items: Sequence[Exchange], key: Key) -> None:
        self.positions: dict[Hashable, list[int]] = {}
        for n, item in enumerate(items):
            self.positions.setdefault(key(item), []).append(n)

    def after(self, key: Hashable, start: int, lookahead: int) -> Iterator[int]:
        """How far after ``start`` each item with ``key`` is, nearest first,
        up to ``lookahead``."""
        found = self.positions.get(key, [])
        for n in range(bisect.bisect_right(found, start), len(found)):
            if found[n] - start > lookahead:
                return
            yield found[n] - start


def _align(
    xs: list[Exchange],
    ys: list[Exchange],
    keys: Sequence[Key],
    lookahead: int,
    also: Callable[[Exchange, Exchange], bool] | None = None,
) -> Iterator[Pair]:
    """Pair two directions' exchanges in order (see the module docstring)."""
    return _Aligner(xs, ys, keys, lookahead, also).pairs()


class _Aligner:
    """The alignment of A's exchanges ``xs`` with B's ``ys``.

    ``keys`` are ever looser partner tests, as keys that partners share: the
    first is the replay's match (``also`` says which other exchanges it
    pairs, looked for one by one: what a byte-range ignore rule leaves equal).
    Everything before ``i`` and ``j`` is paired, so the partners of a key are
    its next occurrences after them (a bisection). Skipping to a partner
    ahead counts only if the two sides then go on partnering for :data:`SYNC`
    exchanges: in a repetitive stream (doorbell writes) a value that changed
    must not pair with the same value further on and leave all between it
    unpaired.
    """

    def __init__(self, xs: list[Exchange], ys: list[Exchange], keys: Sequence[Key],
                 lookahead: int, also: Callable[[Exchange, Exchange], bool] | None) -> None:
        self.xs, self.ys, self.keys, self.lookahead, self.also = xs, ys, keys, lookahead, also
        self.indexes = [(_Index(xs, key), _Index(ys, key)) for key in keys]

    def pairs(self) -> Iterator[Pair]:
        xs, ys = self.xs, self.ys
        i = j = 0
        while i < len(xs) and j < len(ys):
            move, n = self.move(i, j)
            if move == "pair":
                yield from zip(xs[i : i + n], ys[j : j + n], strict=True)
                i, j = i + n, j + n
            elif move == "only_a":
                yield from ((x, None) for x in xs[i : i + n])
                i += n
            elif move == "only_b":
                yield from ((None, y) for y in ys[j : j + n])
                j += n
            else:  # nothing alike near: each is only in its side
                yield xs[i], None
                yield None, ys[j]
                i, j = i + 1, j + 1
        yield from ((x, None) for x in xs[i:])
        yield from ((None, y) for y in ys[j:])

    def move(self, i: int, j: int) -> tuple[Literal["pair", "only_a", "only_b", "apart"], int]:
        """What to do with A's exchanges from ``i`` and B's from ``j``: pair n
        of them, or take n of one side as only in it, or neither pairs."""
        xs, ys = self.xs, self.ys
        if self.partners(0, xs[i], ys[j]):
            return "pair", 1
        for tier in range(len(self.keys)):
            if tier and self.partners(tier, xs[i], ys[j]):
                return "pair", 1  # alike, and no closer-tier partner is ahead
            skip_a = self.skip(tier, i, j, a_side=True)
            skip_b = self.skip(tier, i, j, a_side=False)
            if tier == 0:
                nearest = _nearer(skip_a, skip_b)
                changed = self.changed(i, j, CHANGED if nearest is None else nearest - 1)
                if changed:
                    return "pair", changed
            if skip_a is not None and skip_a == skip_b:
                # as near either way: the way the sides then match longer
                after_a = self.run(tier, i + skip_a, j, CHANGED)
                if after_a > self.run(tier, i, j + skip_b, CHANGED):
                    return "only_a", skip_a
            if skip_b is not None and (skip_a is None or skip_b <= skip_a):
                return "only_b", skip_b
            if skip_a is not None:
                return "only_a", skip_a
        return "apart", 1

    def partners(self, tier: int, x: Exchange, y: Exchange) -> bool:
        key = self.keys[tier]
        return key(x) == key(y) or (tier == 0 and self.also is not None and self.also(x, y))

    def skip(self, tier: int, i: int, j: int, *, a_side: bool) -> int | None:
        """The fewest of A's exchanges from ``i`` (``a_side``; else B's from
        ``j``) to skip for the two sides to partner again, in sync."""
        index_a, index_b = self.indexes[tier]
        key = self.keys[tier]
        if a_side:
            ahead = set(index_a.after(key(self.ys[j]), i, self.lookahead))
            fixed, items, start = self.ys[j], self.xs, i
        else:
            ahead = set(index_b.after(key(self.xs[i]), j, self.lookahead))
            fixed, items, start = self.xs[i], self.ys, j
        if tier == 0 and self.also is not None:
            also = self.also
            ahead.update(k for k in range(1, min(self.lookahead + 1, len(items) - start))
                         if (also(items[start + k], fixed) if a_side
                             else also(fixed, items[start + k])))
        for k in sorted(ahead):
            if self.synced(tier, i + k if a_side else i, j if a_side else j + k):
                return k
        return None

    def changed(self, i: int, j: int, most: int) -> int:
        """How many exchanges from A's ``i`` and B's ``j``, pairwise of one
        kind, changed (at most ``most``; 0: none) before the two sides match
        again in sync: a value that changed, not exchanges one side lacks."""
        kind = self.keys[-1]
        for n in range(1, most + 1):
            if i + n > len(self.xs) or j + n > len(self.ys):
                return 0
            if kind(self.xs[i + n - 1]) != kind(self.ys[j + n - 1]):
                return 0
            if self.synced(0, i + n, j + n, together=True):
                return n
        return 0

    def run(self, tier: int, i: int, j: int, most: int) -> int:
        """How many of A's exchanges from ``i`` and B's from ``j`` partner
        pairwise before the first that do not (at most ``most``)."""
        n = 0
        while (n < most and i + n < len(self.xs) and j + n < len(self.ys)
               and self.partners(tier, self.xs[i + n], self.ys[j + n])):
            n += 1
        return n

    def synced(self, tier: int, i: int, j: int, *, together: bool = False) -> bool:
        """Whether A's exchanges from ``i`` and B's from ``j`` partner pairwise
        for :data:`SYNC` exchanges, or until one side ends (``together``: both)."""
        for m in range(SYNC):
            a_ends, b_ends = i + m >= len(self.xs), j + m >= len(self.ys)
            if a_ends or b_ends:
                return a_ends == b_ends or not together
            if not self.partners(tier, self.xs[i + m], self.ys[j + m]):
                return False
        return True


def _nearer(first: int | None, second: int | None) -> int | None:
    return second if first is None else first if second is None else min(first, second)


class _Differ:
    """The two sessions' flattened messages (computed once each) and the
    comparisons made of them."""

    def __init__(self, a: Script, b: Script, ignore: tuple[IgnoreRule, ...],
                 matcher: Matcher) -> None:
        self.scripts = {"a": a, "b": b}
        self.ignore = ignore
        self.matcher = matcher
        # a rule for a byte range ignores part of a field: keys cannot say that
        self.ranges = any("[" in rule.field and ":" in rule.field for rule in ignore)
        self.flat: dict[tuple[str, int], dict[str, Any]] = {}
        self.keys: dict[tuple[str, int], tuple[Any, ...]] = {}
        self.places: dict[tuple[str, int], str | None] = {}
        self.in_key: dict[tuple[str, str], bool] = {}
        self.side_of: dict[int, str] = {}
        for side, script in self.scripts.items():
            for step in script.steps:
                self.side_of[id(step)] = side

    def _flat(self, step: Step) -> dict[str, Any]:
        at = (self.side_of[id(step)], step.position)
        flat = self.flat.get(at)
        if flat is None:
            flat = self.flat[at] = flatten(step.message, recorded_fd_facts(step.fds))
        return flat

    def key(self, exchange: Exchange) -> tuple[Any, ...]:
        """What the matcher looks at of the exchange's command, ignored fields
        left out, as one value: two commands with equal keys pair as a replay
        would match them."""
        step = exchange.first
        at = (self.side_of[id(step)], step.position)
        key = self.keys.get(at)
        if key is None:
            label = step.label
            fields = sorted((name, None if value == b"" else value)
                            for name, value in self._flat(step).items()
                            if self._in_key(label, name))
            key = self.keys[at] = (label, *fields)
        return key

    def _in_key(self, label: str, name: str) -> bool:
        """Whether the matcher looks at field ``name`` of ``label`` messages and
        no rule ignores it (the same few names recur: asked once each)."""
        kept = self.in_key.get((label, name))
        if kept is None:
            kept = self.in_key[label, name] = self.matcher.selects(name) and not any(
                rule.applies(label, name) for rule in self.ignore)
        return kept

    def kind(self, exchange: Exchange) -> str:
        return exchange.first.label

    def place(self, exchange: Exchange) -> tuple[str, str | None]:
        """The exchange's kind and where its command points in PCI terms: the
        config register (a capability's wherever the capability is:
        ``MSI-X.msg_ctl``), or the region, BAR offset, IRQ type or iova."""
        step = exchange.first
        at = (self.side_of[id(step)], step.position)
        if at not in self.places:
            pci = self.scripts[at[0]].pci
            body = step.message.body
            if (isinstance(body, RegionAccessBody) and body.region == Region.CONFIG
                    and 0 < body.count <= 8):
                place: str | None = _CAP_OFFSET.sub("", pci.register_name(body.offset,
                                                                         body.count))
            else:
                place = where(step.message, pci)
            self.places[at] = place
        return step.label, self.places[at]

    def pairs_within_ranges(self, x: Exchange, y: Exchange) -> bool:
        """Whether two commands of the same kind, keys apart, pair once the
        byte-range ignore rules (which keys cannot apply) are."""
        return (self.kind(x) == self.kind(y)
                and not self._compare(x.first, y.first, only=self.matcher.selects))

    def _compare(self, a: Step, b: Step,
                 only: Callable[[str], bool] | None = None) -> list[FieldDiff]:
        return compare(self._flat(a), self._flat(b), label=a.label, message=a.message,
                       pci=self.scripts["a"].pci, rules=self.ignore, only=only)

    def _only(self, kind: DiffKind, step: Step, exchange: Exchange) -> MessageDiff:
        """``step`` of ``exchange`` only one side has; placed by the exchange's command."""
        side = "a" if kind == "only_a" else "b"
        return MessageDiff(kind, step.label, step.seq if side == "a" else None,
                           step.seq if side == "b" else None,
                           where(exchange.first.message, self.scripts[side].pci))

    def row(self, x: Exchange | None, y: Exchange | None) -> Row:
        if x is None or y is None:
            kind: DiffKind = "only_b" if x is None else "only_a"
            some = y if x is None else x
            assert some is not None
            return Row(x, y, tuple(self._only(kind, s, some) for s in some.steps))
        messages: list[MessageDiff] = []
        place_a = where(x.first.message, self.scripts["a"].pci)
        place_b = where(y.first.message, self.scripts["b"].pci)
        place = place_a if place_a == place_b else f"A: {place_a}; B: {place_b}"
        for a_step, b_step in [(x.first, y.first), (x.reply, y.reply)]:
            if a_step is not None and b_step is not None:
                diffs = self._compare(a_step, b_step)
                if diffs:
                    messages.append(MessageDiff("differs", a_step.label, a_step.seq,
                                                b_step.seq, place, tuple(diffs)))
            elif a_step is not None:
                messages.append(self._only("only_a", a_step, x))
            elif b_step is not None:
                messages.append(self._only("only_b", b_step, y))
        return Row(x, y, tuple(messages))
