"""Sans-IO session state: pairs replies with commands and reports violations.

A :class:`SessionState` watches one vfio-user connection, message by message
in each direction, as a proxy or a recorder sees it. It decodes each message
(a reply with the command it answers, so layouts that depend on the command
decode right), follows the VERSION negotiation (fd and size limits, DMA
layout), and reports every protocol violation as a :class:`Violation` — it
never drops or changes anything. ``strict=True`` raises the first violation
as a :class:`~vfioproxy.errors.RemoteProtocolError` instead.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any

import attrs

from vfioproxy.errors import RemoteProtocolError
from vfioproxy.protocol.bodies import (
    DmaAccessBody,
    RawBody,
    RegionAccessBody,
    VersionBody,
)
from vfioproxy.protocol.capabilities import Capabilities
from vfioproxy.protocol.codec import (
    Dialects,
    Message,
    decode,
    detect_client_dma_layout,
    may_carry_fds,
)
from vfioproxy.protocol.header import (
    FLAG_ERROR,
    FLAG_NO_REPLY,
    HEADER_SIZE,
    KNOWN_FLAGS,
    SERVER_COMMANDS,
    TYPE_MASK,
    Command,
    Header,
    MessageType,
)
from vfioproxy.protocol.negotiation import MESSAGE_OVERHEAD, Negotiation
from vfioproxy.protocol.pairing import MAX_OUTSTANDING, Outstanding
from vfioproxy.side import Direction, Side

__all__ = [
    "MAX_OUTSTANDING",
    "MESSAGE_OVERHEAD",
    "POSTED_MEMORY",
    "Observation",
    "SessionState",
    "Violation",
]

#: how many no_reply commands per direction are remembered for late error replies
POSTED_MEMORY = 64


@attrs.frozen
class Violation:
    """One protocol violation: what, who sent it, where, expected vs got."""

    kind: str
    side: Side
    index: int
    command: str
    text: str
    field: str | None = None
    offset: int | None = None
    expected: Any = None
    got: Any = None
    #: set when the proxy's own fault injection caused it (e.g. "rule 2 corrupt offset")
    caused_by: str | None = None

    def as_error(self) -> RemoteProtocolError:
        return RemoteProtocolError(
            self.text,
            side=self.side,
            index=self.index,
            command=self.command,
            field=self.field,
            offset=self.offset,
            expected=self.expected,
            got=self.got,
        )

    def __str__(self) -> str:
        text = str(self.as_error())
        if self.caused_by is not None:
            return (f"caused by the proxy's injection ({self.caused_by}), not the "
                    f"{self.side.value}: {text}")
        return text

    def to_dict(self) -> dict[str, Any]:
        """Plain data for trace event records."""
        out: dict[str, Any] = {
            "kind": self.kind,
            "side": self.side.value,
            "index": self.index,
            "command": self.command,
            "text": self.text,
        }
        for key in ("field", "offset", "expected", "got", "caused_by"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value if isinstance(value, (int, str, bytes, bool)) else str(value)
        return out


@attrs.frozen
class Observation:
    """What :meth:`SessionState.observe` learned about one message."""

    direction: Direction
    index: int
    message: Message
    request: Message | None = None
    violations: tuple[Violation, ...] = ()


_SENDERS = {direction: direction.sender for direction in Direction}
_RECEIVERS = {direction: direction.receiver for direction in Direction}
_REVERSE = {direction: direction.reverse for direction in Direction}
# module constants: reading an enum member off its class is a descriptor call
_C2S, _S2C = Direction.C2S, Direction.S2C
_REPLY = int(MessageType.REPLY)
_COMMAND = int(MessageType.COMMAND)
_VERSION = int(Command.VERSION)

#: every valid flags word: a command (perhaps no_reply), a reply (perhaps an error)
_VALID_FLAGS = frozenset({
    int(MessageType.COMMAND), int(MessageType.COMMAND) | FLAG_NO_REPLY,
    int(MessageType.REPLY), int(MessageType.REPLY) | FLAG_ERROR,
})


def injection_cause(applied: Any) -> str:
    """``rule 2 corrupt offset``: the actions of an ``inject`` event's ``applied``
    list (the maps :meth:`vfioproxy.inject.Applied.to_dict` makes)."""
    entries = applied if isinstance(applied, list) else []
    return "; ".join(f"rule {a.get('rule')} {a.get('text')}" for a in entries
                     if isinstance(a, dict))


class InjectionBlame:
    """Attributes to the proxy's fault injection the violations it caused: those
    of a message an injected action rewrote, and those of the answer to a
    request it rewrote (the peer answered what it got). One per session, fed
    every observation in order, by a reader of the trace and by live checks."""

    def __init__(self, limit: int = 2 * MAX_OUTSTANDING) -> None:
        #: rewritten requests waiting for their reply, by id() of the message:
        #: its header (so that a reused id does not match) and what rewrote it;
        #: at most ``limit`` (the oldest is forgotten: no reply is waited for longer)
        self._requests: OrderedDict[int, tuple[Header, str]] = OrderedDict()
        self._limit = limit

    def observe(self, obs: Observation, rewritten_by: str | None = None) -> Observation:
        """``obs`` with its violations attributed (``rewritten_by``: the actions
        that rewrote this message, if any)."""
        header = obs.message.header
        cause = rewritten_by
        if cause is not None and header.is_command and not header.no_reply:
            self._requests[id(obs.message)] = (header, cause)
            if len(self._requests) > self._limit:
                self._requests.popitem(last=False)
        if obs.request is not None and self._requests:
            entry = self._requests.pop(id(obs.request), None)
            if entry is not None and entry[0] is obs.request.header:
                cause = entry[1]
        if cause is None or not obs.violations:
            return obs
        return attrs.evolve(obs, violations=tuple(
            attrs.evolve(v, caused_by=cause) for v in obs.violations))


class SessionState:
    """Tracks one connection; feed it every message with :meth:`observe`.

    ``dialects`` fixes the DMA layouts; when ``None`` they are detected from
    the client's VERSION (:func:`~vfioproxy.protocol.codec.detect_client_dma_layout`).
    """

    def __init__(
        self,
        *,
        dialects: Dialects | None = None,
        strict: bool = False,
        max_outstanding: int = MAX_OUTSTANDING,
    ) -> None:
        self.strict = strict
        self.dialects = dialects or Dialects()
        self._auto_dialects = dialects is None
        self.negotiation = Negotiation()
        self.max_outstanding = max_outstanding
        self._counts = {Direction.C2S: 0, Direction.S2C: 0}
        # outstanding commands sent in a direction: (index, message) by msg_id
        self._pending: dict[Direction, Outstanding[tuple[int, Message]]] = {
            Direction.C2S: Outstanding(max_outstanding),
            Direction.S2C: Outstanding(max_outstanding),
        }
        self._posted: dict[Direction, deque[tuple[int, Message]]] = {
            Direction.C2S: deque(maxlen=POSTED_MEMORY),
            Direction.S2C: deque(maxlen=POSTED_MEMORY),
        }
        self._update_max_message_size()

    # ------------------------------------------------------------- limits

    @property
    def client_caps(self) -> Capabilities | None:
        return self.negotiation.client_caps

    @property
    def server_caps(self) -> Capabilities | None:
        return self.negotiation.server_caps

    @property
    def version(self) -> tuple[int, int] | None:
        return self.negotiation.version

    @property
    def known_dialects(self) -> Dialects | None:
        """:attr:`dialects` once they are known: given, or detected from the
        client's VERSION command; None before that VERSION when detecting."""
        if self._auto_dialects and self.negotiation.client_caps is None:
            return None
        return self.dialects

    def max_data_xfer_size(self, receiver: Side) -> int:
        return self.negotiation.max_data_xfer_size(receiver)

    def max_msg_fds(self, receiver: Side) -> int:
        return self.negotiation.max_msg_fds(receiver)

    def max_message_size(self) -> int:
        """The framing limit (:attr:`Negotiation.max_message_size`)."""
        return self.negotiation.max_message_size

    def _update_max_message_size(self) -> None:
        self._xfer_limit = {d: self.max_data_xfer_size(_RECEIVERS[d]) for d in Direction}

    @property
    def counts(self) -> dict[Direction, int]:
        """How many messages were seen in each direction (the next one's index);
        a reader that resumes a session whose state it dropped sets them."""
        return self._counts

    def outstanding(self, direction: Direction) -> list[Message]:
        """Commands sent in ``direction`` that still wait for their reply, oldest first."""
        return [message for _, message in sorted(self._pending[direction], key=lambda p: p[0])]

    # ------------------------------------------------------------- observing

    def observe(
        self,
        direction: Direction,
        data: bytes | bytearray | memoryview,
        fds: Sequence[Any] = (),
        *,
        length: int | None = None,
    ) -> Observation:
        """Account for one whole message (as framed) sent in ``direction``.

        ``length`` is the message's length on the wire when ``data`` holds
        only its first bytes (a recording that kept the start of a message too
        large to buffer): its header still pairs and checks, its body is not
        decoded, and it is reported as ``truncated_record``.
        """
        if len(data) < HEADER_SIZE:
            return self._short(direction, bytes(data), fds)
        index = self._counts[direction]
        self._counts[direction] = index + 1
        sender = _SENDERS[direction]
        problems: list[Violation] = []

        def violation(kind: str, text: str, header: Header, **where: Any) -> None:
            # describing the header is a good part of observing a message: only on a violation
            problems.append(Violation(kind, sender, index, header.describe(), text, **where))

        header = Header.parse(data)
        wire = len(data) if length is None else length
        if header.size != wire or header.flags not in _VALID_FLAGS:
            self._check_header(header, wire, violation)
        if length is not None:
            violation(
                "truncated_record",
                f"a {wire}-byte message, larger than the recorder buffers whole: only its "
                f"first {len(data)} bytes are in the trace", header,
                expected=f"<= {len(data)} bytes", got=wire,
            )
        kind = header.flags & TYPE_MASK
        request: Message | None = None
        if kind == _REPLY:
            request = self._match_reply(direction, header, violation)
        message = decode(
            data,
            fds,
            sender=sender,
            dialects=self.dialects,
            request=request,
            header=header,
        )
        if (
            isinstance(message.body, RawBody)
            and message.body.reason
            and header.size == len(data)
            and length is None
        ):
            violation("decode_error", message.body.reason, header)
        if kind == _COMMAND:
            self._check_command(direction, index, message, violation)
        if fds:
            self._check_fds(direction, header, len(fds), violation)
        if header.command == _VERSION and isinstance(message.body, VersionBody):
            self._negotiate(header, message.body)
        if self.strict and problems:
            raise problems[0].as_error()
        return Observation(direction, index, message, request, tuple(problems))

    def _short(self, direction: Direction, data: bytes, fds: Sequence[Any]) -> Observation:
        """A "message" shorter than the header (only a damaged recording holds
        one): reported as ``short_message``, its header read as if padded with
        zeros, nothing paired, checked or decoded."""
        index = self._counts[direction]
        self._counts[direction] = index + 1
        header = Header.parse(data.ljust(HEADER_SIZE, b"\0"))
        text = f"a {len(data)}-byte message, shorter than the {HEADER_SIZE}-byte header"
        violation = Violation(
            "short_message", _SENDERS[direction], index, f"{len(data)} bytes", text,
            field="header", offset=0, expected=f">= {HEADER_SIZE} bytes", got=len(data),
        )
        if self.strict:
            raise violation.as_error()
        message = Message(header, RawBody(data, text), tuple(fds))
        return Observation(direction, index, message, None, (violation,))

    def torn(
        self,
        direction: Direction,
        data: bytes | bytearray | memoryview,
        received: int | None = None,
    ) -> Violation:
        """Account for a message its sender never finished: it closed after
        ``received`` bytes (default: ``data``, their start), so framing is lost
        and nothing of it is paired or decoded."""
        index = self._counts[direction]
        self._counts[direction] = index + 1
        sender = _SENDERS[direction]
        got = len(data) if received is None else received
        what = Header.parse(data).describe() if len(data) >= HEADER_SIZE else "a header"
        return Violation(
            "torn_message", sender, index, what,
            f"the {sender.value} closed after {got} bytes of a message: framing lost",
            got=got,
        )

    def _check_header(self, header: Header, length: int, violation: Any) -> None:
        """What is wrong with a header whose size or flags are unusual."""
        if header.size < HEADER_SIZE:
            violation(
                "size_too_small", "size below the 16-byte header", header,
                field="size", offset=4, expected=">= 16", got=header.size,
            )
        elif header.size != length:
            violation(
                "size_too_large", "size above the negotiated maximum", header,
                field="size", offset=4, expected=f"<= {self.max_message_size()}",
                got=header.size,
            )
        if header.type not in (MessageType.COMMAND, MessageType.REPLY):
            violation(
                "invalid_flags", "invalid message type", header,
                field="flags", offset=8, expected="type 0 or 1", got=header.flags,
            )
        elif header.flags & ~KNOWN_FLAGS:
            violation(
                "invalid_flags", "unknown flag bits set", header,
                field="flags", offset=8, expected=f"bits within {KNOWN_FLAGS:#x}",
                got=header.flags,
            )
        elif header.is_command and header.is_error:
            violation(
                "invalid_flags", "error flag on a command", header,
                field="flags", offset=8, got=header.flags,
            )
        elif header.is_reply and header.no_reply:
            violation(
                "invalid_flags", "no_reply flag on a reply", header,
                field="flags", offset=8, got=header.flags,
            )

    def _check_command(
        self, direction: Direction, index: int, message: Message, violation: Any
    ) -> None:
        header = message.header
        from_server = header.command in SERVER_COMMANDS
        if from_server != (direction is _S2C):
            violation(
                "wrong_direction", f"{header.command_name} sent by the {direction.sender.value}",
                header, field="command", offset=2,
                expected=f"sent by the {'server' if from_server else 'client'}",
                got=direction.sender.value,
            )
        if direction is _C2S and index == 0 and header.command != _VERSION:
            violation(
                "version_not_first", "the first client message must be VERSION", header,
                field="command", offset=2, expected="VERSION", got=header.command_name,
            )
        self._check_count(direction, message, violation)
        if header.flags & FLAG_NO_REPLY:
            self._posted[direction].append((header.msg_id, message))
            return
        pending = self._pending[direction]
        entry = (index, message)
        forgotten = pending.add(header.msg_id, entry)
        if forgotten is not None:
            violation(
                "outstanding_overflow",
                f"more than {self.max_outstanding} {direction.sender.value} commands wait for "
                f"a reply; the oldest ({forgotten[1].header.describe()}, "
                f"{direction.value}[{forgotten[0]}]) is "
                "no longer tracked",
                header, got=self.max_outstanding,
            )
        waiting = pending.first(header.msg_id)
        if waiting is not entry and waiting is not None:
            violation(
                "duplicate_outstanding_id",
                f"msg_id {header.msg_id} is still outstanding "
                f"({waiting[1].header.command_name} {direction.value}[{waiting[0]}])",
                header, field="msg_id", offset=0, got=header.msg_id,
            )

    def _check_count(self, direction: Direction, message: Message, violation: Any) -> None:
        body = message.body
        if isinstance(body, (RegionAccessBody, DmaAccessBody)):
            limit = self._xfer_limit[direction]
            if body.count > limit:
                violation(
                    "count_too_large",
                    f"count above the {direction.receiver.value}'s max_data_xfer_size",
                    message.header, field="count", offset=28 if isinstance(
                        body, RegionAccessBody) else 24,
                    expected=f"<= {limit}", got=body.count,
                )

    def _match_reply(self, direction: Direction, header: Header, violation: Any) -> Message | None:
        sent_by = _REVERSE[direction]
        taken = self._pending[sent_by].take(header.msg_id)
        if taken is not None:
            request = taken[1]
            if request.header.command != header.command:
                violation(
                    "reply_command_mismatch",
                    f"reply to msg_id {header.msg_id} names another command",
                    header, field="command", offset=2,
                    expected=request.header.command_name, got=header.command_name,
                )
            return request
        for msg_id, posted in reversed(self._posted[sent_by]):
            if msg_id == header.msg_id and header.is_error:
                return posted  # QEMU answers a failed no_reply command with an error
        violation(
            "unknown_reply_id",
            f"reply to msg_id {header.msg_id}, which no outstanding "
            f"{sent_by.sender.value} command has",
            header, field="msg_id", offset=0, got=header.msg_id,
        )
        return None

    def _check_fds(self, direction: Direction, header: Header, nfds: int, violation: Any) -> None:
        if not nfds:
            return
        if not may_carry_fds(header.command, header.is_reply) or header.is_error:
            violation(
                "fds_not_allowed", f"{nfds} fd(s) on a message that carries none", header,
                field="fds", expected=0, got=nfds,
            )
            return
        limit = self.max_msg_fds(direction.receiver)
        if nfds > limit:
            violation(
                "too_many_fds", f"more fds than the {direction.receiver.value}'s max_msg_fds",
                header, field="fds", expected=f"<= {limit}", got=nfds,
            )

    def _negotiate(self, header: Header, body: VersionBody) -> None:
        if header.is_command:
            self.negotiation.client_offer(body)
            if self._auto_dialects:
                self.dialects = attrs.evolve(self.dialects, client=detect_client_dma_layout(body))
        elif not header.is_error:
            self.negotiation.server_offer(body)
        self._update_max_message_size()

