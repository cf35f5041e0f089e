"""One recorded session as a replay script: its messages in file order, paired.

A :class:`Script` is what both replay directions play from: every message of
one session with its decoding, the command each reply answers (paired by
:class:`~vfioproxy.protocol.session.SessionState`: per direction, by id,
FIFO for reused ids), the DMA layouts the recorded peers used, and what the
recorded config space looked like (to name registers in reports). Messages
are numbered by their record ``seq``, the number ``vfioproxy trace show``
prints in its first column.

File order is the causal order the replay keeps: the proxy writes records in
the order it forwarded them, so a message recorded after another was sent
after the other was seen.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import attrs

from recorder.reader import TraceReader
from recorder.records import EventKind, EventRecord, FdRecord, MessageRecord, Record
from vfioproxy.errors import VfioProxyError
from vfioproxy.protocol.bodies import RegionAccessBody
from vfioproxy.protocol.capabilities import Capabilities
from vfioproxy.protocol.codec import Dialects, Message
from vfioproxy.protocol.header import Command
from vfioproxy.protocol.offsets import MSG_ID, MSG_ID_ONLY
from vfioproxy.protocol.pci import Region
from vfioproxy.protocol.pci_view import PciView
from vfioproxy.protocol.session import SessionState
from vfioproxy.replay.fields import PciContext
from vfioproxy.side import Direction
from vfioproxy.trace.sessions import TraceSessions

__all__ = ["ReplayError", "Script", "Step", "load_script", "script_from_records"]



class ReplayError(VfioProxyError):
    """A replay cannot start or go on: no such session, nothing to replay, no peer."""


@attrs.frozen
class Step:
    """One recorded message of the session.

    ``position`` is its index in :attr:`Script.steps`; ``seq`` its record
    number in the trace; ``answers`` the position of the command a reply
    answers; ``reply`` the position of a command's reply (None when the
    command is no_reply or the recording ends before its reply).
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


@attrs.frozen
class Script:
    """A session to replay: steps, the recorded peers' dialects and capabilities.

    ``notes`` say what the replay should know about the recording (a torn
    trace, other sessions in the file); ``unanswered`` lists the positions of
    commands whose reply the recording lacks; ``cut_off`` says the session
    has no close record (the recorder stopped before the session did).
    """

    path: str
    session: int
    steps: tuple[Step, ...]
    dialects: Dialects
    client_caps: Capabilities
    server_caps: Capabilities
    pci: PciContext
    notes: tuple[str, ...] = ()
    unanswered: tuple[int, ...] = ()
    cut_off: bool = False

    def of_direction(self, direction: Direction) -> list[Step]:
        return [step for step in self.steps if step.direction is direction]

    def end(self) -> str | None:
        """Where the recording stops short, if it does (for a report's ``stopped``)."""
        if self.unanswered:
            first = self.steps[self.unanswered[0]]
            return f"the recording ends before the reply to {first.describe()}"
        if self.cut_off:
            return (f"the recording was cut off after {self.steps[-1].describe()} "
                    "(no session close): replayed up to there")
        return None

    @property
    def duration_ns(self) -> int:
        """Recorded time from the first message to the last."""
        return self.steps[-1].t_ns - self.steps[0].t_ns if self.steps else 0


def load_script(path: str | os.PathLike[str], session: int | None = None) -> Script:
    """Read ``session`` of the trace at ``path`` (default: its first session with messages).

    Raises :class:`ReplayError` when there is nothing to replay and the
    recorder's :class:`~recorder.errors.TraceError` family for a file that is
    not a trace or comes from a newer format version. A torn tail is not an
    error: the script ends where the trace does and says so in its notes.
    """
    with TraceReader(path) as reader:
        records = list(reader)
        truncation = reader.truncation
    return script_from_records(
        records, path=os.fspath(path), session=session, truncation=truncation
    )


def script_from_records(
    records: Iterable[Record],
    *,
    path: str = "<records>",
    session: int | None = None,
    truncation: str | None = None,
) -> Script:
    """Build a :class:`Script` from trace records (see :func:`load_script`)."""
    items = list(records)
    found = TraceSessions.of(items, path=path)
    sessions = found.with_messages
    if not sessions:
        raise ReplayError(f"{path}: the trace holds no messages to replay")
    chosen = sessions[0] if session is None else session
    found.require(chosen, messages=True)
    notes: list[str] = []
    if truncation is not None:
        notes.append(f"{truncation}: the replay ends where the trace does")
    if session is None and len(sessions) > 1:
        notes.append(
            f"the trace holds sessions {', '.join(map(str, sessions))}; replaying session "
            f"{chosen} (choose another with --session)"
        )
    mine = [r for r in items if r.session == chosen]
    messages = [r for r in mine if isinstance(r, MessageRecord)]
    for position, record in enumerate(messages):
        if record.torn or record.length is not None:
            what = ("closed in the middle of a message" if record.torn else
                    f"sent a {record.length}-byte message the trace holds only the start of")
            notes.append(f"the recorded {record.direction.sender.value} {what} (#{record.seq}): "
                         "the replay ends before it")
            messages = messages[:position]
            break
    if not messages:
        raise ReplayError(f"{path}: session {chosen} has no whole message to replay")
    closed = any(isinstance(r, EventRecord) and r.kind == EventKind.SESSION_CLOSE for r in mine)
    steps, state = _pair(messages)
    if steps[0].direction is not Direction.C2S or steps[0].message.command != Command.VERSION:
        notes.append(f"the session does not start with the client's VERSION ({steps[0].label})")
    unanswered = tuple(
        s.position for s in steps if s.is_command and not s.no_reply and s.reply is None
    )
    return Script(
        path=path,
        session=chosen,
        steps=tuple(steps),
        dialects=state.dialects,
        client_caps=state.client_caps or Capabilities(),
        server_caps=state.server_caps or Capabilities(),
        pci=_pci_context(steps),
        notes=tuple(notes),
        unanswered=unanswered,
        cut_off=not closed,
    )


def _pair(messages: list[MessageRecord]) -> tuple[list[Step], SessionState]:
    state = SessionState()
    steps: list[Step] = []
    position_of: dict[int, int] = {}  # id(recorded command Message) -> position
    replies: dict[int, int] = {}
    for position, record in enumerate(messages):
        obs = state.observe(record.direction, record.data, record.fds)
        answers = None if obs.request is None else position_of.get(id(obs.request))
        if answers is not None:
            replies[answers] = position
        position_of[id(obs.message)] = position
        steps.append(Step(position, record.seq, record.direction, record.t_ns, record.data,
                          record.fds, obs.message, answers))
    return [attrs.evolve(s, reply=replies.get(s.position)) for s in steps], state


def _pci_context(steps: list[Step]) -> PciContext:
    """The config space the recorded session read, to name registers in reports."""
    view = PciView()
    for step in steps:
        body: Any = step.message.body
        if not isinstance(body, RegionAccessBody) or body.region != Region.CONFIG:
            continue
        if step.message.command == Command.REGION_WRITE and step.is_command:
            view.describe_write(body.offset, body.count, body.data)
        elif step.message.command == Command.REGION_READ and step.is_reply:
            view.describe_read_reply(body.offset, body.count, body.data)
    return PciContext.from_config(view.config)
