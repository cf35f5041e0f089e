"""Injection rules: which messages (:class:`Match`) get which fault (an action).

A :class:`Rule` pairs one :class:`Match` with one action and carries an
``id`` (0 until an :class:`~vfioproxy.inject.engine.Injector` assigns one)
and the ``text`` it was written as. ``Rule.to_text()`` is the canonical rule
syntax (:mod:`vfioproxy.inject.syntax`) and parses back to an equal rule;
``Rule.to_dict()`` gives the structured form a rule file accepts.

Matching. Every filter left at None matches anything:

- ``direction``: c2s or s2c; ``session``: the proxy's session number;
- ``index``: the message's 0-based index among the messages of its
  direction in its session (every message counts, dropped ones included);
- ``command``: a set of command numbers; ``kind``: request (a header of
  type 0) or reply (type 1);
- ``region`` / ``offset``: only REGION_READ and REGION_WRITE messages match
  these, by the ``region`` index and the ``offset`` field of the access
  (the offset alone lies in the range; the access's count is not looked
  at). Requests carry both fields. A reply is matched by the fields of the
  request it answers: the injector tracks forwarded region-access requests
  by (direction, msg_id), first in first out, from the time it first holds
  a rule that needs it; for a reply whose request it did not track it
  reads the reply's own body, and an error reply without a payload then
  has no region;
- ``probability``: once the filters match, the rule fires with this
  probability (toxicity), drawn from the rule's own seeded stream.

A message shorter than the 16-byte header has no command, kind, region or
offset: only rules without those filters can match it.

Corrupt fields (bits flipped with ``mask``, little endian; the table is
:mod:`vfioproxy.protocol.offsets`):

- header: ``msg_id`` (abs 0, u16), ``command`` (2, u16), ``size`` (4, u32),
  ``flags`` (8, u32), ``error`` (12, u32);
- ``body+N``: the ``mask``'s bytes from body offset N (abs 16 + N);
- named body fields (body offsets, protocol.md §2): ``offset`` (REGION_*
  0 u64, DMA_MAP 8 u64, DEVICE_GET_REGION_INFO 24 u64), ``region`` (REGION_*
  8 u32), ``count`` (REGION_* 12 u32, DMA_READ/DMA_WRITE 8 u64 — spec
  layout, the same first bytes as QEMU's u32, DEVICE_GET_REGION_IO_FDS and
  DEVICE_GET_IRQ_INFO 12 u32, DEVICE_SET_IRQS 16 u32), ``address``
  (DMA_READ/DMA_WRITE 0 u64), ``iova`` (DMA_MAP 16 u64, DMA_UNMAP 8 u64),
  ``index`` (DEVICE_GET_REGION_INFO, DEVICE_GET_REGION_IO_FDS,
  DEVICE_GET_IRQ_INFO, DEVICE_SET_IRQS 8 u32), ``start`` (DEVICE_SET_IRQS
  12 u32), ``argsz`` (0 u32 of every command that has one), ``major`` /
  ``minor`` (VERSION 0 / 2 u16).

A field past the end of the message, or a named field the message's command
does not have, leaves the message unchanged; the injector says so in the
applied record.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Protocol

import attrs

from vfioproxy.inject.distributions import Distribution, parse_distribution
from vfioproxy.inject.errors import RuleSyntaxError
from vfioproxy.inject.values import (
    U32_MAX,
    IntRange,
    format_duration,
    format_errno,
    format_probability,
    format_rate,
    parse_duration,
    parse_errno,
    parse_range,
    parse_rate,
    parse_uint,
)
from vfioproxy.inject.view import MessageView
from vfioproxy.protocol.codec import build_error_reply, encode
from vfioproxy.protocol.header import HEADER_SIZE, Command, Header, MessageType, command_name
from vfioproxy.protocol.offsets import ACCESS_COMMANDS, BODY_FIELDS, HEADER_FIELDS
from vfioproxy.protocol.pci import Region
from vfioproxy.side import Direction

__all__ = [
    "Action",
    "ActionTraits",
    "Bandwidth",
    "Close",
    "Corrupt",
    "Delay",
    "Drop",
    "Error",
    "Fate",
    "Kind",
    "Match",
    "Param",
    "Predicate",
    "Rule",
    "Stall",
    "command_token",
    "parse_command",
]


class Kind(enum.Enum):
    """Requests (commands, header type 0) or replies (type 1)."""

    REQUEST = "request"
    REPLY = "reply"


# --------------------------------------------------------------------- converters


def parse_command(text: str) -> int:
    """A command number from its name (any case) or a number 0..65535."""
    if text[:1].isdigit():
        return _known(parse_uint(text, "command number", 0xFFFF))
    try:
        return Command[text.upper()]
    except KeyError:
        raise RuleSyntaxError(
            "unknown command (use a name such as REGION_READ, or a number)",
            token=text,
            position=0,
        ) from None


def _known(number: int) -> int:
    try:
        return Command(number)
    except ValueError:
        return number


def command_token(number: int) -> str:
    """The command's name in rule text, or its number when it has none."""
    return Command(number).name if number in Command._value2member_map_ else str(number)


def _command_value(number: int) -> int | str:
    """A command in the structured form: its name, or its number when it has none."""
    return Command(number).name if number in Command._value2member_map_ else number


CommandSpec = int | str | Iterable[int | str] | None


def _to_commands(value: CommandSpec) -> frozenset[int] | None:
    if value is None:
        return None
    items: Iterable[int | str] = [value] if isinstance(value, (int, str)) else value
    result = set()
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise RuleSyntaxError(f"a command is a name or a number, got {item!r}")
        if isinstance(item, str):
            result.add(parse_command(item))
        elif 0 <= item <= 0xFFFF:
            result.add(_known(item))
        else:
            raise RuleSyntaxError(f"command number out of range: {item}")
    if not result:
        raise RuleSyntaxError("an empty command set matches nothing; use None for any")
    return frozenset(result)


def _to_direction(value: Direction | str | None) -> Direction | None:
    if value is None or isinstance(value, Direction):
        return value
    text = value.lower()
    if text == "*":
        return None
    try:
        return Direction(text)
    except ValueError:
        raise RuleSyntaxError(
            "unknown direction (use c2s, s2c or *)", token=value, position=0
        ) from None


def _to_kind(value: Kind | str | None) -> Kind | None:
    if value is None or isinstance(value, Kind):
        return value
    try:
        return Kind(value.lower())
    except ValueError:
        raise RuleSyntaxError(
            "unknown kind (use request or reply)", token=value, position=0
        ) from None


def _to_range(value: IntRange | int | str | None) -> IntRange | None:
    if value is None or isinstance(value, IntRange):
        return value
    if isinstance(value, bool):
        raise RuleSyntaxError(f"expected a range, got {value!r}")
    if isinstance(value, int):
        return IntRange(value, value + 1)
    return parse_range(value)


def parse_region(text: str) -> int:
    """A region index from a number or a PCI region name (``CONFIG``, ``BAR0``...)."""
    if text[:1].isdigit():
        return parse_uint(text, "region", U32_MAX)
    try:
        return Region[text.upper()]
    except KeyError:
        raise RuleSyntaxError(
            "unknown region (use a number or BAR0..BAR5, ROM, CONFIG, VGA)",
            token=text,
            position=0,
        ) from None


def _to_region(value: int | str | None) -> int | None:
    if value is None:
        return None
    return parse_region(value) if isinstance(value, str) else value


def _optional_uint(instance: Any, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or value < 0
    ):
        raise RuleSyntaxError(f"{attribute.name} must be an integer >= 0, got {value!r}")


def _probability(instance: Any, attribute: attrs.Attribute[float], value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise RuleSyntaxError(f"probability must be between 0 and 1, got {value!r}")


# --------------------------------------------------------------------- match

#: (index, command, type nibble, region, offset) -> whether a rule's filters accept the message
Predicate = Callable[[int, int | None, int | None, int | None, int | None], bool]
_COMMAND_TYPE = int(MessageType.COMMAND)
_REPLY_TYPE = int(MessageType.REPLY)


@attrs.frozen
class Match:
    """Which messages a rule applies to; every filter left at None matches anything.

    ``command`` accepts a :class:`Command`, a number, a name (any case) or an
    iterable of those; ``direction`` a :class:`Direction` or ``"c2s"``/
    ``"s2c"``; ``kind`` a :class:`Kind` or ``"request"``/``"reply"``;
    ``index`` and ``offset`` an :class:`IntRange`, a number or range text
    (``"5..10"``); ``region`` a number or a region name.
    """

    direction: Direction | None = attrs.field(default=None, converter=_to_direction)
    command: frozenset[int] | None = attrs.field(default=None, converter=_to_commands)
    kind: Kind | None = attrs.field(default=None, converter=_to_kind)
    session: int | None = attrs.field(default=None, validator=_optional_uint)
    index: IntRange | None = attrs.field(default=None, converter=_to_range)
    region: int | None = attrs.field(
        default=None, converter=_to_region, validator=_optional_uint
    )
    offset: IntRange | None = attrs.field(default=None, converter=_to_range)
    probability: float = attrs.field(default=1.0, converter=float, validator=_probability)

    def __attrs_post_init__(self) -> None:
        access = self.region is not None or self.offset is not None
        if access and self.command is not None and not self.command & ACCESS_COMMANDS:
            raise RuleSyntaxError(
                "region and offset filters only match REGION_READ and REGION_WRITE"
            )

    @property
    def needs_header(self) -> bool:
        """Whether only messages with a full header can match."""
        return any(
            value is not None for value in (self.command, self.kind, self.region, self.offset)
        )

    def matches(
        self, view: MessageView, session: int, direction: Direction, index: int
    ) -> bool:
        """Whether the filters (not the probability) accept this message."""
        if self.direction is not None and direction is not self.direction:
            return False
        if self.session is not None and session != self.session:
            return False
        test = self.predicate()
        if test is None:
            return True
        header = view.header
        if header is None:
            return test(index, None, None, None, None)
        return test(index, header.command, header.type, view.region, view.offset)

    def predicate(
        self, *, requests_only: bool = False, screened: bool = False
    ) -> Predicate | None:
        """The filters on the message itself as one function, made once; None: no such filter.

        The function takes the message's index in its direction, its
        header's command and type nibble (None for a message without a
        header), and the region and offset of a region access (None for
        other messages), and says whether index, command, kind, region and
        offset filters accept it. ``requests_only`` adds a filter on
        requests (error rules answer nothing else). ``screened``: the
        caller only asks about messages whose command is in ``command``
        (when set), so the function leaves that filter out. Direction and
        session are not its business: they are fixed for a whole session
        direction.
        """
        commands = self.command
        needs_header = self.needs_header or requests_only
        if screened and commands is not None:  # checked by the caller, header included
            commands = None
            needs_header = False
        wanted_type = (
            _COMMAND_TYPE if requests_only or self.kind is Kind.REQUEST
            else _REPLY_TYPE if self.kind is Kind.REPLY
            else None
        )
        region = self.region
        remaining = (self.index, commands, wanted_type, region, self.offset)
        if all(value is None for value in remaining):
            return None
        index_start = None if self.index is None else self.index.start
        index_stop = None if self.index is None else self.index.stop
        offset_start = None if self.offset is None else self.offset.start
        offset_stop = None if self.offset is None else self.offset.stop

        def test(
            index: int,
            command: int | None,
            message_type: int | None,
            got_region: int | None,
            got_offset: int | None,
        ) -> bool:
            if index_start is not None and (
                index < index_start or (index_stop is not None and index >= index_stop)
            ):
                return False
            if command is None:
                return not needs_header
            if commands is not None and command not in commands:
                return False
            if wanted_type is not None and message_type != wanted_type:
                return False
            if region is not None and got_region != region:
                return False
            return offset_start is None or (
                got_offset is not None
                and got_offset >= offset_start
                and (offset_stop is None or got_offset < offset_stop)
            )

        return test

    def command_text(self) -> str:
        """``*`` or the commands, comma-separated in number order."""
        if self.command is None:
            return "*"
        return ",".join(command_token(number) for number in sorted(self.command))

    def filter_texts(self) -> list[str]:
        """The filter tokens of the rule syntax, in canonical order."""
        parts: list[str] = []
        if self.kind is not None:
            parts.append(self.kind.value)
        if self.session is not None:
            parts.append(f"session={self.session}")
        if self.index is not None:
            parts.append(f"index={self.index.to_text()}")
        if self.region is not None:
            parts.append(f"region={self.region}")
        if self.offset is not None:
            parts.append(f"offset={self.offset.to_text(hexadecimal=True)}")
        if self.probability != 1.0:
            parts.append(f"p={format_probability(self.probability)}")
        return parts

    def to_dict(self) -> dict[str, Any]:
        """The filters that are set, as a rule file's structured keys."""
        result: dict[str, Any] = {}
        if self.direction is not None:
            result["direction"] = self.direction.value
        if self.command is not None:
            result["command"] = [_command_value(n) for n in sorted(self.command)]
        if self.kind is not None:
            result["kind"] = self.kind.value
        if self.session is not None:
            result["session"] = self.session
        if self.index is not None:
            result["index"] = self.index.to_text()
        if self.region is not None:
            result["region"] = self.region
        if self.offset is not None:
            result["offset"] = self.offset.to_text(hexadecimal=True)
        if self.probability != 1.0:
            result["probability"] = self.probability
        return result


# --------------------------------------------------------------------- actions


def _to_distribution(value: Distribution | str) -> Distribution:
    return parse_distribution(value) if isinstance(value, str) else value


def _to_rate(value: float | str) -> float:
    return parse_rate(value) if isinstance(value, str) else float(value)


def _to_errno(value: int | str) -> int:
    return parse_errno(value) if isinstance(value, str) else value


def _to_duration(value: float | str) -> float:
    return parse_duration(value) if isinstance(value, str) else float(value)


def _positive_finite(instance: Any, attribute: attrs.Attribute[float], value: float) -> None:
    if not math.isfinite(value) or value <= 0:
        raise RuleSyntaxError(f"{instance.name}: {attribute.name} must be > 0, got {value!r}")


@attrs.frozen
class ActionTraits:
    """What the injection engine needs to know of an action, besides its effect.

    ``fate``: it decides what becomes of the message (forwarded, dropped,
    answered, the session closed) and is the only such rule applied to it;
    ``reads_header``: it needs the message's header; ``requests_only``: it
    applies to requests only (it answers them); ``delays``: the value of its
    records is seconds added to the message's release (counted as injected
    delay).
    """

    fate: bool = False
    reads_header: bool = False
    requests_only: bool = False
    delays: bool = False


@attrs.frozen
class Fate:
    """What a fate action (:attr:`ActionTraits.fate`) makes of a message:
    ``forward`` it or not, whether the other rules still ``act`` on it (its
    timing), the ``reply`` sent back in place of the receiver's, whether the
    session closes before or after it, and the ``value`` and ``note`` of its
    record."""

    forward: bool = False
    acts: bool = False
    reply: bytes | None = None
    close_before: bool = False
    close_after: bool = False
    value: float | int | str | None = None
    note: str = ""


@attrs.frozen
class Param:
    """A parameter of an action, as a rule file's ``[[rule]]`` table gives it:
    its ``key``, the TOML ``types`` the key accepts, ``what`` it is (for
    errors), ``convert`` (its value on its own, as the action's constructor
    takes it; raises :class:`RuleSyntaxError`) and whether it is
    ``optional``. An action's parameters are its constructor's, in order."""

    key: str
    types: tuple[type, ...]
    what: str
    convert: Callable[[Any], Any]
    optional: bool = False


@attrs.frozen
class Delay:
    """Hold the message for a duration drawn from ``distribution``."""

    distribution: Distribution = attrs.field(converter=_to_distribution)
    name: ClassVar[str] = "delay"
    #: what the engine needs to know of it (see :class:`ActionTraits`)
    traits: ClassVar[ActionTraits] = ActionTraits(delays=True)
    params: ClassVar[tuple[Param, ...]] = (
        Param("distribution", (str,), "a distribution such as 'normal(200us,50us)'",
              parse_distribution),)
    #: what the text form's one argument is (None: the parser knows the grammar)
    argument: ClassVar[str | None] = "distribution, e.g. fixed(100us) or normal(200us,50us)"

    def to_text(self) -> str:
        return f"delay {self.distribution.to_text()}"

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.name, "distribution": self.distribution.to_text()}


@attrs.frozen
class Bandwidth:
    """Pass the direction's messages through a link of ``bytes_per_second``."""

    bytes_per_second: float = attrs.field(converter=_to_rate, validator=_positive_finite)
    name: ClassVar[str] = "bandwidth"
    traits: ClassVar[ActionTraits] = ActionTraits(delays=True)
    params: ClassVar[tuple[Param, ...]] = (
        Param("rate", (str, int, float), "a rate such as '10MiB/s' or bytes per second",
              lambda v: Bandwidth(v).bytes_per_second),)
    argument: ClassVar[str | None] = "rate, e.g. 10MiB/s"

    def to_text(self) -> str:
        return f"bandwidth {format_rate(self.bytes_per_second)}"

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.name, "rate": format_rate(self.bytes_per_second)}


def _errno_range(instance: Error, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= U32_MAX:
        raise RuleSyntaxError(f"error: errno must be 0..{U32_MAX:#x}, got {value!r}")


@attrs.frozen
class Error:
    """Answer a request with an error reply carrying ``errno``; don't forward it."""

    errno: int = attrs.field(converter=_to_errno, validator=_errno_range)
    name: ClassVar[str] = "error"
    traits: ClassVar[ActionTraits] = ActionTraits(fate=True, reads_header=True, requests_only=True)
    params: ClassVar[tuple[Param, ...]] = (
        Param("errno", (str, int), "an errno name or number", lambda v: Error(v).errno),)
    argument: ClassVar[str | None] = "errno, e.g. EINVAL or 22"

    def fate(self, data: bytes) -> Fate:
        header = Header.parse(data)  # error rules fire on requests only: a header is there
        if header.no_reply:
            return Fate(value=self.errno,
                        note="no_reply request: dropped without an error reply")
        reply = encode(build_error_reply(header, self.errno))[0]
        return Fate(acts=True, reply=reply, value=self.errno)

    def to_text(self) -> str:
        return f"error {format_errno(self.errno)}"

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.name, "errno": format_errno(self.errno)}


@attrs.frozen
class Drop:
    """Don't forward the message."""

    name: ClassVar[str] = "drop"
    traits: ClassVar[ActionTraits] = ActionTraits(fate=True)
    params: ClassVar[tuple[Param, ...]] = ()
    argument: ClassVar[str | None] = None

    def fate(self, data: bytes) -> Fate:
        return Fate()

    def to_text(self) -> str:
        return self.name

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.name}


def _lower(value: str) -> str:
    return value.lower() if isinstance(value, str) else value


def _when(instance: Close, attribute: attrs.Attribute[str], value: str) -> None:
    if value not in ("before", "after"):
        raise RuleSyntaxError(f"close: when must be 'before' or 'after', got {value!r}")


@attrs.frozen
class Close:
    """Close both legs of the session ``before`` the message (not forwarding it) or ``after``."""

    when: str = attrs.field(default="before", converter=_lower, validator=_when)
    name: ClassVar[str] = "close"
    traits: ClassVar[ActionTraits] = ActionTraits(fate=True)
    params: ClassVar[tuple[Param, ...]] = (
        Param("when", (str,), "before or after", lambda v: Close(v).when, optional=True),)
    argument: ClassVar[str | None] = None

    def fate(self, data: bytes) -> Fate:
        if self.when == "before":
            return Fate(acts=True, close_before=True, value=self.when)
        return Fate(forward=True, acts=True, close_after=True, value=self.when)

    def to_text(self) -> str:
        return f"close {self.when}"

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.name, "when": self.when}


def _to_field(value: str) -> str:
    text = value.strip().lower()
    if text.startswith("body+"):
        number = text[len("body+") :]
        try:
            return f"body+{parse_uint(number, 'body offset')}"
        except RuleSyntaxError as exc:
            raise exc.located(offset=len("body+"), token=value) from None
    if text in HEADER_FIELDS or text in BODY_FIELDS:
        return text
    known = ", ".join([*HEADER_FIELDS, *BODY_FIELDS])
    raise RuleSyntaxError(
        f"unknown corrupt field (use body+N or one of {known})", token=value, position=0
    )


def _mask(instance: Corrupt, attribute: attrs.Attribute[int], value: int) -> None:
    width = instance.field_width()
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise RuleSyntaxError(f"corrupt: mask must be a positive integer, got {value!r}")
    if width is not None and value.bit_length() > 8 * width:
        raise RuleSyntaxError(
            f"corrupt: mask {value:#x} is wider than field {instance.field} ({width} bytes)"
        )


@attrs.frozen
class Corrupt:
    """Flip the bits of ``mask`` in ``field`` (see the module docstring for fields)."""

    field: str = attrs.field(converter=_to_field)
    mask: int = attrs.field(default=1, validator=_mask)
    name: ClassVar[str] = "corrupt"
    traits: ClassVar[ActionTraits] = ActionTraits(reads_header=True)
    params: ClassVar[tuple[Param, ...]] = (
        Param("field", (str,), "a field name such as 'offset' or 'body+4'",
              lambda v: Corrupt(v).field),
        Param("mask", (int, str), "an integer",
              lambda v: parse_uint(v, "mask") if isinstance(v, str) else v, optional=True),
    )
    argument: ClassVar[str | None] = None

    def field_width(self) -> int | None:
        """Bytes the field spans everywhere it exists (the narrowest); None for body+N."""
        if self.field in HEADER_FIELDS:
            return HEADER_FIELDS[self.field].size
        if self.field in BODY_FIELDS:
            return min(field.size for field in BODY_FIELDS[self.field].values())
        return None

    def commands(self) -> frozenset[int] | None:
        """The commands that have this field; None when every message has it."""
        if self.field in BODY_FIELDS:
            return frozenset(BODY_FIELDS[self.field])
        return None

    def locate(self, command: int | None) -> tuple[int, int] | None:
        """Absolute offset and width of the field in a message of ``command``.

        None when the command has no such named field (or the message has no
        header to tell its command).
        """
        if self.field in HEADER_FIELDS:
            return HEADER_FIELDS[self.field]
        if self.field.startswith("body+"):
            return HEADER_SIZE + int(self.field[len("body+") :]), (self.mask.bit_length() + 7) // 8
        if command is None or command not in BODY_FIELDS[self.field]:
            return None
        offset, width = BODY_FIELDS[self.field][command]
        return HEADER_SIZE + offset, width

    def apply(self, data: bytearray, command: int | None) -> tuple[int | None, str]:
        """Flip the bits in place; returns the absolute offset, or None and why not."""
        where = self.locate(command)
        if where is None:
            name = "a message without header" if command is None else command_name(command)
            return None, f"{name} has no field {self.field}: unchanged"
        offset, width = where
        if offset + width > len(data):
            return None, (
                f"field {self.field} (bytes {offset}..{offset + width}) is outside the "
                f"{len(data)}-byte message: unchanged"
            )
        value = int.from_bytes(data[offset : offset + width], "little") ^ self.mask
        data[offset : offset + width] = value.to_bytes(width, "little")
        return offset, ""

    def to_text(self) -> str:
        mask = f" mask={self.mask:#x}" if self.mask != 1 else ""
        return f"corrupt {self.field}{mask}"

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.name, "field": self.field, "mask": self.mask}


@attrs.frozen
class Stall:
    """Stop forwarding the direction for ``duration`` seconds from this message on."""

    duration: float = attrs.field(converter=_to_duration, validator=_positive_finite)
    name: ClassVar[str] = "stall"
    traits: ClassVar[ActionTraits] = ActionTraits(delays=True)
    params: ClassVar[tuple[Param, ...]] = (
        Param("duration", (str,), "a duration with a unit such as '5ms'",
              lambda v: Stall(v).duration),)
    argument: ClassVar[str | None] = "duration, e.g. 5ms"

    def to_text(self) -> str:
        return f"stall {format_duration(self.duration)}"

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.name, "duration": format_duration(self.duration)}


Action = Delay | Bandwidth | Error | Drop | Close | Corrupt | Stall


class FateAction(Protocol):
    """An action whose ``traits.fate`` is set: it says what becomes of a message."""

    def fate(self, data: bytes) -> Fate: ...
#: every action class by its name (the one list of them): the checks here and the
#: text and TOML syntax (:mod:`vfioproxy.inject.syntax`) derive from it
ACTIONS: dict[str, type[Action]] = {
    cls.name: cls for cls in (Delay, Bandwidth, Error, Drop, Close, Corrupt, Stall)
}
_ACTION_TYPES = tuple(ACTIONS.values())


# --------------------------------------------------------------------- rule


def _check_action(instance: Rule, attribute: attrs.Attribute[Action], action: Action) -> None:
    if not isinstance(action, _ACTION_TYPES):
        raise RuleSyntaxError(f"not an action: {action!r}")
    match = instance.match
    if isinstance(action, Error) and match.kind is Kind.REPLY:
        raise RuleSyntaxError("error answers requests; this rule only matches replies")
    if isinstance(action, Corrupt):
        having = action.commands()
        if having is not None and match.command is not None and not having & match.command:
            raise RuleSyntaxError(
                f"corrupt: none of the rule's commands ({match.command_text()}) "
                f"has a field {action.field}"
            )


def _check_id(instance: Rule, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RuleSyntaxError(f"rule id must be an integer >= 0, got {value!r}")


def _canonical(rule: Rule) -> str:
    # runs before the validators: an invalid action is reported by them
    if not isinstance(rule.action, _ACTION_TYPES):
        return repr(rule.action)
    return rule.to_text()


@attrs.frozen
class Rule:
    """One injection rule: a :class:`Match`, an action, an ``id`` and its ``text``.

    ``id`` 0 means "not assigned yet". ``text`` is the text the rule was
    written as (the canonical :meth:`to_text` when built directly); it does
    not take part in equality.
    """

    match: Match
    action: Action = attrs.field(validator=_check_action)
    id: int = attrs.field(default=0, validator=_check_id)
    text: str = attrs.field(
        default=attrs.Factory(_canonical, takes_self=True), eq=False
    )

    def to_text(self) -> str:
        """Canonical rule syntax; ``parse_rule(rule.to_text()) == rule``."""
        direction = self.match.direction.value if self.match.direction else "*"
        parts = [direction, self.match.command_text(), *self.match.filter_texts()]
        if self.id:
            parts.append(f"id={self.id}")
        parts.append(self.action.to_text())
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """The structured form (JSON, or a rule file's ``[[rule]]`` keys)."""
        result: dict[str, Any] = {"id": self.id} if self.id else {}
        return {**result, **self.match.to_dict(), **self.action.to_dict()}
