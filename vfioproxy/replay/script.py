"""One recorded session as a replay script: its messages in file order, paired.

A :class:`Script` is what both replay directions play from: every message of
one session, the command each reply answers (paired by
:class:`~vfioproxy.protocol.session.SessionState`: per direction, by id,
FIFO for reused ids), the DMA layouts the recorded peers used, and what the
recorded config space looked like (to name registers in reports). Messages
are numbered by their record ``seq``, the number ``vfioproxy trace show``
prints in its first column.

File order is the causal order the replay keeps: the proxy writes records in
the order it forwarded them, so a message recorded after another was sent
after the other was seen.

Memory: loading reads the trace as a stream and keeps a compact index of
the session (:data:`INDEX_BYTES` bytes a message: seq, direction and kind,
command, pairing, a CRC of its bytes), not the messages; a session of up to
``keep`` messages is kept whole. A message's bytes and decoding, a
:class:`Step`, are read again from the trace when a replay needs them,
through a :class:`Cursor`: a forward reader that keeps the last
:data:`CURSOR_KEEP` steps it read. :meth:`Script.statistics` says how many
decoded steps were held at once and how often a cursor had to start over.
"""

from __future__ import annotations

import array
import os
import zlib
from collections import deque
from collections.abc import Generator, Iterable, Iterator, Sequence
from typing import Any, overload

import attrs

from recorder.records import EventKind, EventRecord, FdRecord, MessageRecord, Record
from vfioproxy.errors import UsageError, VfioProxyError
from vfioproxy.interpose import InterposeOptions
from vfioproxy.protocol.bodies import RegionAccessBody
from vfioproxy.protocol.capabilities import Capabilities
from vfioproxy.protocol.codec import Dialects, Message
from vfioproxy.protocol.header import Command, Header, command_name
from vfioproxy.protocol.offsets import MSG_ID, MSG_ID_ONLY
from vfioproxy.protocol.pairing import MAX_OUTSTANDING
from vfioproxy.protocol.pci import Region
from vfioproxy.protocol.pci_view import PciView
from vfioproxy.protocol.session import POSTED_MEMORY, Observation, SessionState
from vfioproxy.replay.fields import PciContext
from vfioproxy.side import Direction
from vfioproxy.trace.reading import damage_lines, open_trace
from vfioproxy.trace.sessions import TraceSessions

__all__ = [
    "CURSOR_KEEP",
    "DEFAULT_WINDOW",
    "INDEX_BYTES",
    "Cursor",
    "IrqMark",
    "ReplayError",
    "Script",
    "Step",
    "load_script",
    "script_from_records",
]

#: decoded steps a :class:`Cursor` keeps behind its reading position
CURSOR_KEEP = 64
#: by default: a session of up to this many messages is kept in memory whole;
#: commands a client replay may have await their reply at once; unused recorded
#: requests a server replay matches live ones against (a replay's ``window``)
DEFAULT_WINDOW = 4096
#: bytes of the script's index per recorded message
INDEX_BYTES = 8 + 1 + 2 + 4 + 4 + 4

_C2S, _COMMAND, _NO_REPLY, _REPLY = 1, 2, 4, 8  # bits of the index's kind byte
#: ids of live recorded commands kept while pairing, before dropping those the
#: session state forgot (it keeps MAX_OUTSTANDING per direction, and posted ones)
_PAIRING_PRUNE = 4 * (MAX_OUTSTANDING + POSTED_MEMORY)


@attrs.frozen
class IrqMark:
    """An interrupt the recorded server raised (an ``irq`` event, recorded with
    ``--interpose-irqs``): ``after`` is the position of the last message
    recorded before it by time (-1: before any), ``fate`` whether the client
    got it (``dropped``: not)."""

    after: int
    index: int
    vector: int
    count: int
    fate: str


class ReplayError(VfioProxyError):
    """A replay cannot start or go on: no such session, nothing to replay, no peer."""


@attrs.frozen
class Step:
    """One recorded message of the session.

    ``position`` is its index in the script; ``seq`` its record number in the
    trace; ``answers`` the position of the command a reply answers; ``reply``
    the position of a command's reply (None when the command is no_reply or
    the recording ends before its reply).
    """

    position: int
    seq: int
    direction: Direction
    t_ns: int
    data: bytes
    fds: tuple[FdRecord, ...]
    message: Message
    answers: int | None = None
    reply: int | None = None

    @property
    def is_command(self) -> bool:
        return self.message.header.is_command

    @property
    def is_reply(self) -> bool:
        return self.message.header.is_reply

    @property
    def no_reply(self) -> bool:
        return self.message.header.no_reply

    @property
    def label(self) -> str:
        """``REGION_READ reply``, ``DMA_MAP cmd``: what the message is."""
        kind = "reply" if self.is_reply else "cmd"
        return f"{self.message.header.command_name} {kind}"

    def describe(self) -> str:
        """``#17 REGION_READ reply``."""
        return f"#{self.seq} {self.label}"

    def with_id(self, msg_id: int) -> bytes:
        """The recorded bytes with the header's msg_id replaced."""
        return MSG_ID_ONLY.pack(msg_id) + self.data[MSG_ID.end :]


@attrs.define
class _Index:
    """Per recorded message: seq, kind bits, command, answers and reply (-1: none),
    and the CRC-32 of its bytes (to notice a trace that changed since)."""

    seqs: array.array[int] = attrs.field(factory=lambda: array.array("Q"))
    kinds: bytearray = attrs.field(factory=bytearray)
    commands: array.array[int] = attrs.field(factory=lambda: array.array("H"))
    answers: array.array[int] = attrs.field(factory=lambda: array.array("i"))
    replies: array.array[int] = attrs.field(factory=lambda: array.array("i"))
    crcs: array.array[int] = attrs.field(factory=lambda: array.array("I"))


class Script:
    """A session to replay: its index, the recorded peers' dialects and capabilities.

    ``notes`` say what the replay should know about the recording (a torn
    trace, other sessions in the file); ``cut_off`` says the session has no
    close record (the recorder stopped before the session did). Per
    position, :meth:`direction`, :meth:`is_command`, :meth:`answers`,
    :meth:`reply` and the rest come from the index; :meth:`step` (and
    :attr:`steps`, a sequence view) read the whole :class:`Step` again.
    """

    def __init__(
        self,
        *,
        path: str,
        session: int,
        index: _Index,
        dialects: Dialects,
        client_caps: Capabilities,
        server_caps: Capabilities,
        pci: PciContext,
        notes: tuple[str, ...],
        cut_off: bool,
        span_ns: int,
        records: Sequence[Record] | None,
        steps: list[Step] | None = None,
        irqs: tuple[IrqMark, ...] = (),
        interpose: InterposeOptions | None = None,
    ) -> None:
        self.path = path
        #: the interrupts the recorded server raised, in order (none unless
        #: recorded with ``--interpose-irqs``)
        self.irqs = irqs
        #: the interposition modes the recording proxy had on (its ``session_open``)
        self.interpose = InterposeOptions() if interpose is None else interpose
        self.session = session
        self.dialects = dialects
        self.client_caps = client_caps
        self.server_caps = server_caps
        self.pci = pci
        self.notes = notes
        self.cut_off = cut_off
        #: damaged records of the trace skipped while loading (named in ``notes``)
        self.damaged = 0
        self._index = index
        self._span_ns = span_ns
        self._records = records
        #: every step, when the session is small enough to keep (``keep`` of load_script)
        self._all = steps
        #: decoded steps held now (cursors' and what replays keep), and at most
        self.held = self.most_held = 0 if steps is None else len(steps)
        #: passes over the trace started by cursors, and restarts behind their position
        self.passes = self.restarts = 0

    # ------------------------------------------------------------- the index

    def __len__(self) -> int:
        return len(self._index.seqs)

    def seq(self, position: int) -> int:
        return self._index.seqs[position]

    def direction(self, position: int) -> Direction:
        return Direction.C2S if self._index.kinds[position] & _C2S else Direction.S2C

    def is_command(self, position: int) -> bool:
        return bool(self._index.kinds[position] & _COMMAND)

    def no_reply(self, position: int) -> bool:
        return bool(self._index.kinds[position] & _NO_REPLY)

    def command(self, position: int) -> int:
        return self._index.commands[position]

    def answers(self, position: int) -> int | None:
        """The position of the command the reply at ``position`` answers."""
        answers = self._index.answers[position]
        return None if answers < 0 else answers

    def reply(self, position: int) -> int | None:
        """The position of the recorded reply to the command at ``position``."""
        reply = self._index.replies[position]
        return None if reply < 0 else reply

    def is_reply(self, position: int) -> bool:
        return bool(self._index.kinds[position] & _REPLY)

    def label(self, position: int) -> str:
        """``REGION_READ reply``: what :attr:`Step.label` says, from the index."""
        kind = "reply" if self.is_reply(position) else "cmd"
        return f"{command_name(self.command(position))} {kind}"

    def describe(self, position: int) -> str:
        return f"#{self.seq(position)} {self.label(position)}"

    def positions(self, direction: Direction, *, commands: bool = False) -> Iterator[int]:
        """Positions of the messages sent in ``direction`` (only commands: ``commands``)."""
        want = (_C2S if direction is Direction.C2S else 0) | (_COMMAND if commands else 0)
        mask = _C2S | (_COMMAND if commands else 0)
        return (p for p, kind in enumerate(self._index.kinds) if kind & mask == want)

    def unanswered_positions(self) -> Iterator[int]:
        """Commands (not no_reply) whose reply the recording lacks, in order."""
        kinds, replies = self._index.kinds, self._index.replies
        return (p for p, kind in enumerate(kinds)
                if kind & (_COMMAND | _NO_REPLY) == _COMMAND and replies[p] < 0)

    @property
    def unanswered(self) -> tuple[int, ...]:
        """Positions of the commands whose reply the recording lacks."""
        return tuple(self.unanswered_positions())

    def end(self) -> str | None:
        """Where the recording stops short, if it does (for a report's ``stopped``)."""
        first = next(self.unanswered_positions(), None)
        if first is not None:
            return f"the recording ends before the reply to {self.describe(first)}"
        if self.cut_off:
            return (f"the recording was cut off after {self.describe(len(self) - 1)} "
                    "(no session close): replayed up to there")
        return None

    @property
    def duration_ns(self) -> int:
        """Recorded time from the first message to the last."""
        return self._span_ns

    # ------------------------------------------------------------- steps

    def step(self, position: int) -> Step:
        """The whole step at ``position``, read again from the trace (a pass of its own)."""
        cursor = self.cursor(keep=1)
        try:
            return cursor.get(position)
        finally:
            cursor.close()

    @property
    def steps(self) -> _Steps:
        """Every step, as a sequence read on demand (each access may read the trace)."""
        return _Steps(self)

    def of_direction(self, direction: Direction) -> list[Step]:
        """Every step sent in ``direction`` (all of them in memory: for small sessions)."""
        cursor = self.cursor(keep=1)
        try:
            return [cursor.get(p) for p in self.positions(direction)]
        finally:
            cursor.close()

    def cursor(self, keep: int = CURSOR_KEEP) -> Cursor:
        """A new forward reader of the steps that keeps the last ``keep``."""
        return Cursor(self, keep)

    def hold(self, count: int = 1) -> None:
        """Count ``count`` decoded steps more as held (negative: released)."""
        self.held += count
        self.most_held = max(self.most_held, self.held)

    def statistics(self) -> dict[str, int]:
        """``messages``; ``held``/``most_held``: decoded steps held now and at most at
        once; ``passes``: reads of the trace; ``restarts``: those a cursor began
        again because it was asked for a step behind it."""
        return {"messages": len(self), "held": self.held, "most_held": self.most_held,
                "passes": self.passes, "restarts": self.restarts,
                "index_bytes": len(self) * INDEX_BYTES}

    def _messages(self) -> Generator[MessageRecord, None, None]:
        """The session's first ``len(self)`` messages, read again."""
        self.passes += 1
        if self._records is not None:
            yield from self._session_messages(self._records)
            return
        with open_trace(self.path) as reader:
            yield from self._session_messages(reader)

    def _session_messages(self, records: Any) -> Iterator[MessageRecord]:
        count = 0
        for record in records:
            if count == len(self):
                return
            if isinstance(record, MessageRecord) and record.session == self.session:
                if (record.seq != self._index.seqs[count]
                        or zlib.crc32(record.data) != self._index.crcs[count]):
                    raise ReplayError(f"{self.path}: the trace changed during the replay "
                                      f"(message #{record.seq} is not the one loaded)")
                count += 1
                yield record
        if count < len(self):
            raise ReplayError(f"{self.path}: the trace changed during the replay (it ends "
                              f"after {count} of session {self.session}'s {len(self)} messages)")

    def _read_steps(self) -> Generator[Step, None, None]:
        """Every step from the first, decoded as loading decoded it."""
        state = SessionState()
        index = self._index
        messages = self._messages()
        try:
            for position, record in enumerate(messages):
                obs = state.observe(record.direction, record.data, record.fds)
                answers, reply = index.answers[position], index.replies[position]
                yield Step(position, record.seq, record.direction, record.t_ns, record.data,
                           record.fds, obs.message, None if answers < 0 else answers,
                           None if reply < 0 else reply)
        finally:
            messages.close()


class Cursor:
    """Reads a script's steps forward from the trace, keeping the last ``keep``.

    :meth:`get` of a kept step or one ahead is cheap (ahead: the steps between
    are read and decoded); one behind what it keeps starts a new pass over
    the trace (counted in :meth:`Script.statistics`). Replays give each
    mostly-forward stream of accesses its own cursor.
    """

    def __init__(self, script: Script, keep: int = CURSOR_KEEP) -> None:
        self.script = script
        self.keep = max(keep, 1)
        self._kept: dict[int, Step] = {}
        self._order: deque[int] = deque()
        self._steps: Generator[Step, None, None] | None = None
        self._next = 0  # the position the pass yields next

    @property
    def ahead(self) -> int:
        """The position the cursor reads next (those before it are read or kept)."""
        return self._next

    def get(self, position: int) -> Step:
        """The step at ``position`` (IndexError outside the script)."""
        if not 0 <= position < len(self.script):
            raise IndexError(f"no step {position} in a script of {len(self.script)}")
        if self.script._all is not None:
            return self.script._all[position]
        step = self._kept.get(position)
        if step is not None:
            return step
        if self._steps is None or position < self._next:
            if self._steps is not None:
                self.script.restarts += 1
                self._steps.close()
            self._steps, self._next = self.script._read_steps(), 0
        while True:
            step = next(self._steps)
            self._next += 1
            self._keep(step)
            if step.position == position:
                return step

    def _keep(self, step: Step) -> None:
        self._kept[step.position] = step
        self._order.append(step.position)
        self.script.hold()
        if len(self._order) > self.keep:
            del self._kept[self._order.popleft()]
            self.script.hold(-1)

    def close(self) -> None:
        """Drop what the cursor keeps and close the trace (it reads again if used)."""
        self.script.hold(-len(self._order))
        self._kept.clear()
        self._order.clear()
        if self._steps is not None:
            self._steps.close()
            self._steps = None


class _Steps(Sequence[Step]):
    """A script's steps as a sequence; each access goes through the script's cursor."""

    def __init__(self, script: Script) -> None:
        self._script = script

    def __len__(self) -> int:
        return len(self._script)

    @overload
    def __getitem__(self, index: int) -> Step: ...
    @overload
    def __getitem__(self, index: slice) -> list[Step]: ...
    def __getitem__(self, index: int | slice) -> Step | list[Step]:
        if isinstance(index, slice):
            return [self._script.step(p) for p in range(len(self))[index]]
        if index < 0:
            index += len(self)
        return self._script.step(index)

    def __iter__(self) -> Iterator[Step]:
        cursor = self._script.cursor(keep=1)
        try:
            for position in range(len(self)):
                yield cursor.get(position)
        finally:
            cursor.close()


def load_script(
    path: str | os.PathLike[str], session: int | None = None, *, keep: int = DEFAULT_WINDOW
) -> Script:
    """Read ``session`` of the trace at ``path`` (default: its first session with messages).

    Raises :class:`ReplayError` when there is nothing to replay and the
    recorder's :class:`~recorder.errors.TraceError` family for a file that is
    not a trace or comes from a newer format version. A torn tail is not an
    error: the script ends where the trace does and says so in its notes.
    The trace is read as a stream (twice: its sessions, then the session),
    past damaged records: they are named in the script's notes and counted
    in ``damaged`` (a replay of such a script is not ok).
    A session of up to ``keep`` messages is kept in memory whole; a longer
    one is read again as replays need it (and must not change meanwhile:
    :class:`ReplayError` if it does).
    """
    name = os.fspath(path)
    indexer = _Indexer(session, keep)
    with open_trace(path) as reader:
        if session is None:  # the first session with messages: known after a first pass
            found = TraceSessions.read(path)
            indexer.session = _choose(found, name, None)
            for record in reader:
                indexer.feed(record)
        else:
            found = TraceSessions.of(indexer.tap(reader), path=name)
        truncation = reader.truncation
        damage = damage_lines(reader)
        damaged = reader.damaged_count
    script = indexer.finish(found, path=name, session=session, records=None)
    if truncation is not None:
        script.notes = (f"{truncation}: the replay ends where the trace does", *script.notes)
    if damaged:
        script.damaged = damaged
        script.notes = (*damage, "the replay plays the records around them", *script.notes)
    return script


def script_from_records(
    records: Sequence[Record],
    *,
    path: str = "<records>",
    session: int | None = None,
    truncation: str | None = None,
    keep: int = DEFAULT_WINDOW,
) -> Script:
    """Build a :class:`Script` from trace records (see :func:`load_script`); the
    script reads its steps from ``records`` again when replayed."""
    items = list(records)
    found = TraceSessions.of(items, path=path)
    indexer = _Indexer(_choose(found, path, session), keep)
    for record in items:
        indexer.feed(record)
    script = indexer.finish(found, path=path, session=session, records=items)
    if truncation is not None:
        script.notes = (f"{truncation}: the replay ends where the trace does", *script.notes)
    return script


def _choose(found: TraceSessions, path: str, session: int | None) -> int:
    """The session to replay (default: the first with messages); ReplayError or
    NoSuchSessionError when there is none such."""
    sessions = found.with_messages
    if not sessions:
        raise ReplayError(f"{path}: the trace holds no messages to replay")
    chosen = sessions[0] if session is None else session
    found.require(chosen, messages=True)
    return chosen


class _Indexer:
    """Indexes one session from its records, fed in file order (one pass):
    pairing, dialects, config space; and its steps, while no more than ``keep``."""

    def __init__(self, session: int | None, keep: int) -> None:
        self.session = session
        self.keep = keep
        self.index = _Index()
        self.state = SessionState()
        self.pairing = _Pairing(self.state)
        self.view = PciView()
        self.notes: list[str] = []
        self.closed = self.stopped = False
        self.first: tuple[Direction, Header] | None = None
        self.t_first = self.t_last = 0
        self.early: list[tuple[MessageRecord, Message]] | None = []
        self.irqs: list[IrqMark] = []
        #: (position, time) of the last messages: an ``irq`` event is written
        #: once its client is signalled, maybe after messages that came later
        self.recent: deque[tuple[int, int]] = deque(maxlen=16)
        self.interpose: Any = None  # session_open's interpose map, if any

    def tap(self, records: Iterable[Record]) -> Iterator[Record]:
        """``records``, each fed on its way."""
        for record in records:
            self.feed(record)
            yield record

    def feed(self, record: Record) -> None:
        if record.session != self.session or record.session is None:
            return
        if isinstance(record, EventRecord):
            self.closed = self.closed or record.kind == EventKind.SESSION_CLOSE
            if record.kind == EventKind.SESSION_OPEN:
                self.interpose = record.data.get("interpose")
            if record.kind == EventKind.IRQ and not self.stopped:
                self._irq(record)
            return
        if self.stopped:
            return
        if record.torn or record.length is not None:
            what = ("closed in the middle of a message" if record.torn else
                    f"sent a {record.length}-byte message the trace holds only the start of")
            self.notes.append(f"the recorded {record.direction.sender.value} {what} "
                              f"(#{record.seq}): the replay ends before it")
            self.stopped = True
            return
        index = self.index
        position = len(index.seqs)
        obs = self.state.observe(record.direction, record.data, record.fds)
        header = obs.message.header
        answers = self.pairing.answers(obs)
        if answers is not None:
            index.replies[answers] = position
        index.seqs.append(record.seq)
        index.kinds.append((_C2S if record.direction is Direction.C2S else 0)
                           | (_COMMAND if header.is_command else 0)
                           | (_REPLY if header.is_reply else 0)
                           | (_NO_REPLY if header.no_reply else 0))
        index.commands.append(header.command)
        index.answers.append(-1 if answers is None else answers)
        index.replies.append(-1)
        index.crcs.append(zlib.crc32(record.data))
        _describe_config(self.view, obs.message)
        if self.early is not None:
            self.early.append((record, obs.message))
            if len(self.early) > self.keep:
                self.early = None
        if self.first is None:
            self.first, self.t_first = (record.direction, header), record.t_ns
        self.t_last = record.t_ns
        self.recent.append((position, record.t_ns))

    def _irq(self, event: EventRecord) -> None:
        """Place an ``irq`` event after the last message recorded before it."""
        data = event.data
        index, vector, count = data.get("index"), data.get("vector"), data.get("count")
        if not (isinstance(index, int) and isinstance(vector, int) and isinstance(count, int)):
            return
        after = self.recent[0][0] - 1 if self.recent else -1
        for position, t_ns in reversed(self.recent):
            if t_ns <= event.t_ns:
                after = position
                break
        self.irqs.append(IrqMark(after, index, vector, count, str(data.get("fate", ""))))

    def finish(self, found: TraceSessions, *, path: str, session: int | None,
               records: Sequence[Record] | None) -> Script:
        """The script of the records fed (``session``: the one asked for)."""
        chosen = _choose(found, path, session)
        notes: list[str] = []
        sessions = found.with_messages
        if session is None and len(sessions) > 1:
            notes.append(
                f"the trace holds sessions {', '.join(map(str, sessions))}; replaying session "
                f"{chosen} (choose another with --session)"
            )
        notes += self.notes
        if self.first is None:
            raise ReplayError(f"{path}: session {chosen} has no whole message to replay")
        direction, header = self.first
        if direction is not Direction.C2S or header.command != Command.VERSION:
            kind = "reply" if header.is_reply else "cmd"
            notes.append(f"the session does not start with the client's VERSION "
                         f"({header.command_name} {kind})")
        interpose = None
        if isinstance(self.interpose, dict):
            try:
                interpose = InterposeOptions.from_dict(self.interpose,
                                                       "session_open's interpose")
            except UsageError as exc:
                notes.append(f"{exc}: replayed as if no mode had been on")
        elif self.interpose is not None:
            notes.append("session_open's interpose is not a map: replayed as if no mode "
                         "had been on")
        index, state = self.index, self.state
        return Script(
            path=path,
            session=chosen,
            index=index,
            dialects=state.dialects,
            client_caps=state.client_caps or Capabilities(),
            server_caps=state.server_caps or Capabilities(),
            pci=PciContext.from_config(self.view.config),
            notes=tuple(notes),
            cut_off=not self.closed,
            span_ns=self.t_last - self.t_first,
            records=records,
            steps=None if self.early is None else [
                Step(p, record.seq, record.direction, record.t_ns, record.data, record.fds,
                     message, None if index.answers[p] < 0 else index.answers[p],
                     None if index.replies[p] < 0 else index.replies[p])
                for p, (record, message) in enumerate(self.early)],
            irqs=tuple(sorted(self.irqs, key=lambda mark: mark.after)),
            interpose=interpose,
        )


class _Pairing:
    """Which recorded command a reply answers, by position, keeping only the
    positions of commands the session state still remembers."""

    def __init__(self, state: SessionState) -> None:
        self.state = state
        self.position_of: dict[int, int] = {}  # id(recorded command Message) -> position
        self.posted = {d: deque[int](maxlen=POSTED_MEMORY) for d in Direction}
        self.count = 0

    def answers(self, obs: Observation) -> int | None:
        """The position of the command ``obs`` answers; notes ``obs`` if a command."""
        position = self.count
        self.count += 1
        header = obs.message.header
        if header.is_command:
            self.position_of[id(obs.message)] = position
            if header.no_reply:
                self.posted[obs.direction].append(id(obs.message))
            if len(self.position_of) > _PAIRING_PRUNE:
                self._prune()
            return None
        if obs.request is None:
            return None
        return self.position_of.get(id(obs.request))

    def _prune(self) -> None:
        """Forget the commands the session state forgot (their ids may come back)."""
        alive = {id(m) for d in Direction for m in self.state.outstanding(d)}
        alive.update(i for queue in self.posted.values() for i in queue)
        self.position_of = {k: v for k, v in self.position_of.items() if k in alive}


def _describe_config(view: PciView, message: Message) -> None:
    """Learn from one recorded message what config space looked like."""
    body: Any = message.body
    if not isinstance(body, RegionAccessBody) or body.region != Region.CONFIG:
        return
    header = message.header
    if header.command == Command.REGION_WRITE and header.is_command:
        view.describe_write(body.offset, body.count, body.data)
    elif header.command == Command.REGION_READ and header.is_reply:
        view.describe_read_reply(body.offset, body.count, body.data)
