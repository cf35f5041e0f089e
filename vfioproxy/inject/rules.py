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

Interrupts. A rule whose ``irq`` is set (rule text ``irq VECTORS ...``)
matches no message: it applies to the interrupts the proxy passes on with
``--interpose-irqs`` (:meth:`~vfioproxy.inject.engine.Injector.irq`), by IRQ
index and vector (``MSIX[0]``, ``INTX``: every vector of an index, ``*``:
every interrupt), ``session``, ``index`` (the interrupt's 0-based index
among its vector's in its session) and ``probability``; its action is
``delay`` or ``drop``.

The actions, one class each, are in :mod:`vfioproxy.inject.actions`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import Any

import attrs

from vfioproxy.inject.actions import ACTIONS, Action
from vfioproxy.inject.errors import RuleSyntaxError
from vfioproxy.inject.values import (
    U32_MAX,
    IntRange,
    format_probability,
    parse_range,
    parse_uint,
)
from vfioproxy.inject.view import MessageView
from vfioproxy.protocol.constants import IrqIndex, irq_vector_name
from vfioproxy.protocol.header import Command, MessageType
from vfioproxy.protocol.offsets import ACCESS_COMMANDS
from vfioproxy.protocol.pci import Region
from vfioproxy.side import Direction

__all__ = [
    "IRQ_ACTIONS",
    "IrqVector",
    "Kind",
    "Match",
    "Predicate",
    "Rule",
    "command_token",
    "irq_token",
    "parse_command",
    "parse_irq_vectors",
    "parse_region",
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


# --------------------------------------------------------------------- interrupts

#: an interrupt selector: IRQ index and vector (None: every vector of the index)
IrqVector = tuple[int, int | None]
#: the actions an irq rule may take
IRQ_ACTIONS = ("delay", "drop")


def _irq_vector(text: str) -> IrqVector:
    name, bracket, rest = text.partition("[")
    upper = name.upper()
    if upper in IrqIndex.__members__:
        index = int(IrqIndex[upper])
    elif upper.startswith("IRQ") and upper[3:].isdigit():
        index = int(upper[3:])
    else:
        raise RuleSyntaxError(
            "unknown IRQ (use INTX, MSI, MSIX, ERR, REQ or IRQn, with [vector] or without "
            "for every vector)", token=text, position=0)
    if not bracket:
        return index, None
    if not rest.endswith("]"):
        raise RuleSyntaxError("an IRQ vector is written MSIX[3]", token=text, position=0)
    return index, parse_uint(rest[:-1], "IRQ vector", U32_MAX)


def parse_irq_vectors(text: str) -> tuple[IrqVector, ...]:
    """``*`` (every interrupt: an empty tuple) or a comma-separated list of
    ``MSIX[0]``, ``INTX`` (every vector of an index), ``IRQ7[1]``."""
    if text == "*":
        return ()
    vectors = []
    for piece in text.split(","):
        if not piece:
            raise RuleSyntaxError("empty IRQ in the list", token=text, position=0)
        vectors.append(_irq_vector(piece))
    return tuple(sorted(set(vectors), key=lambda v: (v[0], -1 if v[1] is None else v[1])))


def irq_token(vectors: tuple[IrqVector, ...]) -> str:
    """The rule text of an irq rule's vectors (``*`` for every interrupt)."""
    if not vectors:
        return "*"
    return ",".join(irq_vector_name(index, vector) for index, vector in vectors)


def _to_irq(value: str | Iterable[Any] | None) -> tuple[IrqVector, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return parse_irq_vectors(value)
    if isinstance(value, tuple) and all(
            isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], int) for v in value):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return parse_irq_vectors(",".join(value)) if value else ()
    raise RuleSyntaxError(f"irq vectors are '*' or names such as 'MSIX[0]', got {value!r}")


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
    #: None: the rule matches messages; else the interrupts it matches (empty: all)
    irq: tuple[IrqVector, ...] | None = attrs.field(default=None, converter=_to_irq)

    def __attrs_post_init__(self) -> None:
        if self.irq is not None and any(
                value is not None
                for value in (self.direction, self.command, self.kind, self.region, self.offset)):
            raise RuleSyntaxError(
                "an irq rule takes only session=, index=, p= and id= filters")
        access = self.region is not None or self.offset is not None
        if access and self.command is not None and not self.command & ACCESS_COMMANDS:
            raise RuleSyntaxError(
                "region and offset filters only match REGION_READ and REGION_WRITE"
            )

    @property
    def replies_only(self) -> bool:
        """Whether only replies can match."""
        return self.kind is Kind.REPLY

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
        if self.irq is not None:
            return False
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

    def irq_matches(self, session: int, index: int, vector: int, count: int) -> bool:
        """Whether the filters (not the probability) of an irq rule accept the
        ``count``-th (0-based) interrupt of (``index``, ``vector``) in ``session``."""
        if self.irq is None or (self.session is not None and session != self.session):
            return False
        if self.index is not None and not (
                count >= self.index.start
                and (self.index.stop is None or count < self.index.stop)):
            return False
        return not self.irq or any(
            index == i and (v is None or v == vector) for i, v in self.irq)

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
        if self.irq is not None:
            result["direction"] = "irq"
            if self.irq:
                result["vectors"] = irq_token(self.irq).split(",")
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


# --------------------------------------------------------------------- rule


def _check_action(instance: Rule, attribute: attrs.Attribute[Action], action: Action) -> None:
    if not isinstance(action, Action) or type(action) not in ACTIONS.values():
        raise RuleSyntaxError(f"not an action: {action!r}")
    if instance.match.irq is not None and action.name not in IRQ_ACTIONS:
        raise RuleSyntaxError(f"an irq rule's action is delay or drop, not {action.name}")
    action.check(instance.match)


def _check_id(instance: Rule, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RuleSyntaxError(f"rule id must be an integer >= 0, got {value!r}")


def _canonical(rule: Rule) -> str:
    # runs before the validators: an invalid action is reported by them
    if type(rule.action) not in ACTIONS.values():
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
        if self.match.irq is not None:
            parts = ["irq", irq_token(self.match.irq), *self.match.filter_texts()]
        else:
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
