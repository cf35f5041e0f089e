"""Fault actions: one class per action, registered under its name.

An action is a frozen attrs class, decorated with :func:`register`, that
derives from the base of the engine phase it acts in (Toxiproxy's toxic
shape). The class is everything the rest of the package knows of it:

- ``name``: its word in rule text and the ``action`` key of a rule file;
- ``params``: its parameters (:class:`Param`) in constructor order, with
  their parsers, formats, hints and TOML keys. The rule grammar, the rule
  file keys, :meth:`~Action.to_text` and :meth:`~Action.to_dict` derive
  from them;
- ``traits`` (:class:`ActionTraits`): what it needs of a message;
- its effect, the one method of its phase (the engine runs the phases in
  this order, :mod:`vfioproxy.inject.engine`):

  ========================  ==========================================
  :class:`FateAction`       ``fate(data)``: what becomes of the message
                            (forward, drop, answer, close); the first
                            that fires is the only one applied
  :class:`HoldAction`       ``hold()``: seconds the whole direction is
                            held from this message on
  :class:`TimingAction`     ``time(t, size, forward, state)``: the
                            message's release time after it
  :class:`RewriteAction`    ``apply(buffer, command)``: the forwarded
                            bytes, changed in place
  ========================  ==========================================

- ``check(match)``: refuse a rule that can never take effect.

Adding an action is one class here (and its tests); :data:`ACTIONS`, the
syntax of :mod:`vfioproxy.inject.syntax` and the engine pick it up.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Callable
from typing import Any, ClassVar, Protocol, TypeVar, cast

import attrs

from vfioproxy.inject.distributions import Distribution, Fixed, capped, parse_distribution
from vfioproxy.inject.errors import RuleSyntaxError
from vfioproxy.inject.values import (
    U32_MAX,
    format_duration,
    format_errno,
    format_rate,
    parse_duration,
    parse_errno,
    parse_rate,
    parse_uint,
)
from vfioproxy.protocol.codec import build_error_reply, encode
from vfioproxy.protocol.header import HEADER_SIZE, Header, command_name
from vfioproxy.protocol.offsets import BODY_FIELDS, HEADER_FIELDS

__all__ = [
    "ACTIONS",
    "DELAYING",
    "Action",
    "ActionTraits",
    "Bandwidth",
    "Close",
    "Corrupt",
    "Delay",
    "Drop",
    "Error",
    "Fate",
    "FateAction",
    "HoldAction",
    "Param",
    "Phase",
    "RewriteAction",
    "Stall",
    "TimingAction",
    "TimingState",
    "register",
]


# --------------------------------------------------------------------- the frame


class Phase(enum.Enum):
    """The engine phase an action acts in, in the order the engine runs them."""

    FATE = "fate"
    HOLD = "hold"
    TIMING = "timing"
    REWRITE = "rewrite"


#: the phases whose actions' record values are seconds a message waits
DELAYING = frozenset({Phase.HOLD, Phase.TIMING})


@attrs.frozen
class ActionTraits:
    """What the engine needs to know of an action, besides its phase:
    ``reads_header``: it needs the message's header; ``requests_only``: it
    applies to requests only (it answers them)."""

    reads_header: bool = False
    requests_only: bool = False


@attrs.frozen
class Param:
    """One parameter of an action.

    ``key``: its rule file key (and ``key=`` in rule text when
    ``keyword``); ``attribute``: the action's attribute holding it (the
    key when None); ``types`` and ``what``: the TOML types it accepts and
    how errors describe it; ``convert``: its value on its own, from rule
    text or TOML, as the constructor takes it (raises
    :class:`RuleSyntaxError`); ``format``: its rule text; ``toml``: its
    rule file value (``format`` when None); ``hint``: what rule text is
    missing when it is absent (``what`` when None); ``optional``: it has a
    default; ``keyword``: in rule text it is written ``key=value`` (and
    left out at its default), else it is a bare token in its place.
    """

    key: str
    types: tuple[type, ...]
    what: str
    convert: Callable[[Any], Any]
    format: Callable[[Any], str] = str
    attribute: str | None = None
    toml: Callable[[Any], Any] | None = None
    hint: str | None = None
    optional: bool = False
    keyword: bool = False

    @property
    def name(self) -> str:
        """The action attribute that holds it."""
        return self.attribute or self.key


class Match(Protocol):
    """What an action's :meth:`~Action.check` reads of its rule's
    :class:`~vfioproxy.inject.rules.Match`."""

    @property
    def command(self) -> frozenset[int] | None: ...
    @property
    def replies_only(self) -> bool: ...
    def command_text(self) -> str: ...


class Action:
    """The base of every action (see the module docstring)."""

    __slots__ = ()
    #: its word in rule text and its ``action`` key in a rule file
    name: ClassVar[str]
    #: the engine phase it acts in (set by the phase's base class)
    phase: ClassVar[Phase]
    traits: ClassVar[ActionTraits] = ActionTraits()
    params: ClassVar[tuple[Param, ...]] = ()

    def check(self, match: Match) -> None:
        """Raise :class:`RuleSyntaxError` when a rule with ``match`` could never
        take effect; nothing by default."""

    @property
    def delays(self) -> bool:
        """Whether its records' value is seconds the message waits (counted as
        injected delay)."""
        return self.phase in DELAYING

    def to_text(self) -> str:
        """Its rule text: the name, then the parameters (keyword ones left out
        at their default)."""
        parts = [self.name]
        defaults = {field.name: field.default for field in attrs.fields(cast(Any, type(self)))}
        for param in self.params:
            value = getattr(self, param.name)
            if not param.keyword:
                parts.append(param.format(value))
            elif value != defaults[param.name]:
                parts.append(f"{param.key}={param.format(value)}")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """Its rule file keys: ``action`` and every parameter."""
        result: dict[str, Any] = {"action": self.name}
        for param in self.params:
            value = getattr(self, param.name)
            result[param.key] = (param.toml or param.format)(value)
        return result


#: every action class by its name, in registration order
ACTIONS: dict[str, type[Action]] = {}

A = TypeVar("A", bound=type[Action])


def register(cls: A) -> A:
    """Class decorator: make an action known by its name (after ``attrs.frozen``)."""
    if cls.name in ACTIONS:
        raise ValueError(f"action {cls.name!r} is registered twice")
    ACTIONS[cls.name] = cls
    return cls


# --------------------------------------------------------------------- the phases


@attrs.frozen
class Fate:
    """What a fate action makes of a message: ``forward`` it or not, whether
    the other rules still ``acts`` on it (its timing), the ``reply`` sent
    back in place of the receiver's, whether the session closes before or
    after it, and the ``value`` and ``note`` of its record."""

    forward: bool = False
    acts: bool = False
    reply: bytes | None = None
    close_before: bool = False
    close_after: bool = False
    value: float | int | str | None = None
    note: str = ""


class FateAction(Action):
    """An action that decides what becomes of the message."""

    __slots__ = ()
    phase: ClassVar[Phase] = Phase.FATE

    def fate(self, data: bytes) -> Fate:
        raise NotImplementedError


class HoldAction(Action):
    """An action that holds its whole direction, this message and those after."""

    __slots__ = ()
    phase: ClassVar[Phase] = Phase.HOLD

    def hold(self) -> float:
        """Seconds the direction is held from the message's arrival."""
        raise NotImplementedError


class TimingState(Protocol):
    """What a timing action keeps per rule and session direction: its seeded
    random stream and the time its link is free."""

    link_free: float

    def stream(self) -> random.Random: ...


class TimingAction(Action):
    """An action that moves the message's release time."""

    __slots__ = ()
    phase: ClassVar[Phase] = Phase.TIMING

    def fixed_seconds(self) -> float | None:
        """The seconds it adds when they are the same every time, whatever the
        message (the engine then makes its record once); None otherwise."""
        return None

    def time(
        self, t: float, size: int, forward: bool, state: TimingState
    ) -> tuple[float, float, str] | None:
        """The release time after it for a ``size``-byte message due at ``t``,
        its record's value (seconds added) and note; None: no effect (the
        message is not ``forward``-ed and it only acts on forwarded bytes)."""
        raise NotImplementedError


class RewriteAction(Action):
    """An action that changes the bytes of a forwarded message."""

    __slots__ = ()
    phase: ClassVar[Phase] = Phase.REWRITE

    def apply(self, data: bytearray, command: int | None) -> tuple[Any, str]:
        """Change ``data`` in place; its record's value and note."""
        raise NotImplementedError


# --------------------------------------------------------------------- helpers


def _to_distribution(value: Distribution | str) -> Distribution:
    return parse_distribution(value) if isinstance(value, str) else value


def _to_rate(value: float | str) -> float:
    return parse_rate(value) if isinstance(value, str) else float(value)


def _to_errno(value: int | str) -> int:
    return parse_errno(value) if isinstance(value, str) else value


def _to_duration(value: float | str) -> float:
    return parse_duration(value) if isinstance(value, str) else float(value)


def _positive_finite(instance: Action, attribute: attrs.Attribute[float], value: float) -> None:
    if not math.isfinite(value) or value <= 0:
        raise RuleSyntaxError(f"{instance.name}: {attribute.name} must be > 0, got {value!r}")


# --------------------------------------------------------------------- the actions


@register
@attrs.frozen
class Delay(TimingAction):
    """Hold the message for a duration drawn from ``distribution``."""

    distribution: Distribution = attrs.field(converter=_to_distribution)
    name: ClassVar[str] = "delay"
    params: ClassVar[tuple[Param, ...]] = (
        Param("distribution", (str,), "a distribution such as 'normal(200us,50us)'",
              parse_distribution, lambda d: d.to_text(),
              hint="distribution, e.g. fixed(100us) or normal(200us,50us)"),)

    def fixed_seconds(self) -> float | None:
        return self.distribution.value if isinstance(self.distribution, Fixed) else None

    def time(
        self, t: float, size: int, forward: bool, state: TimingState
    ) -> tuple[float, float, str]:
        seconds, note = capped(self.distribution.draw(state.stream()))
        return t + seconds, seconds, note


@register
@attrs.frozen
class Bandwidth(TimingAction):
    """Pass the direction's forwarded messages through a link of ``bytes_per_second``."""

    bytes_per_second: float = attrs.field(converter=_to_rate, validator=_positive_finite)
    name: ClassVar[str] = "bandwidth"
    params: ClassVar[tuple[Param, ...]] = (
        Param("rate", (str, int, float), "a rate such as '10MiB/s' or bytes per second",
              lambda v: Bandwidth(v).bytes_per_second, format_rate,
              attribute="bytes_per_second", hint="rate, e.g. 10MiB/s"),)

    def time(
        self, t: float, size: int, forward: bool, state: TimingState
    ) -> tuple[float, float, str] | None:
        if not forward:  # an error reply or a close sends nothing on the link
            return None
        end = max(t, state.link_free) + size / self.bytes_per_second
        state.link_free = end
        return end, end - t, ""


def _errno_range(instance: Error, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= U32_MAX:
        raise RuleSyntaxError(f"error: errno must be 0..{U32_MAX:#x}, got {value!r}")


@register
@attrs.frozen
class Error(FateAction):
    """Answer a request with an error reply carrying ``errno``; don't forward it."""

    errno: int = attrs.field(converter=_to_errno, validator=_errno_range)
    name: ClassVar[str] = "error"
    traits: ClassVar[ActionTraits] = ActionTraits(reads_header=True, requests_only=True)
    params: ClassVar[tuple[Param, ...]] = (
        Param("errno", (str, int), "an errno name or number", lambda v: Error(v).errno,
              format_errno, hint="errno, e.g. EINVAL or 22"),)

    def check(self, match: Match) -> None:
        if match.replies_only:
            raise RuleSyntaxError("error answers requests; this rule only matches replies")

    def fate(self, data: bytes) -> Fate:
        header = Header.parse(data)  # error rules fire on requests only: a header is there
        if header.no_reply:
            return Fate(value=self.errno,
                        note="no_reply request: dropped without an error reply")
        reply = encode(build_error_reply(header, self.errno))[0]
        return Fate(acts=True, reply=reply, value=self.errno)


@register
@attrs.frozen
class Drop(FateAction):
    """Don't forward the message."""

    name: ClassVar[str] = "drop"

    def fate(self, data: bytes) -> Fate:
        return Fate()


def _when(value: str) -> str:
    text = value.lower() if isinstance(value, str) else value
    if text not in ("before", "after"):
        raise RuleSyntaxError(f"close: when must be 'before' or 'after', got {value!r}")
    return text


@register
@attrs.frozen
class Close(FateAction):
    """Close both legs of the session ``before`` the message (not forwarding it) or ``after``."""

    when: str = attrs.field(default="before", converter=_when)
    name: ClassVar[str] = "close"
    params: ClassVar[tuple[Param, ...]] = (
        Param("when", (str,), "before or after", _when, optional=True),)

    def fate(self, data: bytes) -> Fate:
        if self.when == "before":
            return Fate(acts=True, close_before=True, value=self.when)
        return Fate(forward=True, acts=True, close_after=True, value=self.when)


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


@register
@attrs.frozen
class Corrupt(RewriteAction):
    """Flip the bits of ``mask`` in ``field``.

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

    field: str = attrs.field(converter=_to_field)
    mask: int = attrs.field(default=1, validator=_mask)
    name: ClassVar[str] = "corrupt"
    traits: ClassVar[ActionTraits] = ActionTraits(reads_header=True)
    params: ClassVar[tuple[Param, ...]] = (
        Param("field", (str,), "a field name such as 'offset' or 'body+4'", _to_field,
              hint="field to corrupt (msg_id, command, size, flags, error, body+N...)"),
        Param("mask", (int, str), "an integer",
              lambda v: parse_uint(v, "mask") if isinstance(v, str) else v,
              lambda mask: f"{mask:#x}", toml=lambda mask: mask, optional=True,
              keyword=True),
    )

    def check(self, match: Match) -> None:
        having = self.commands()
        if having is not None and match.command is not None and not having & match.command:
            raise RuleSyntaxError(
                f"corrupt: none of the rule's commands ({match.command_text()}) "
                f"has a field {self.field}"
            )

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


@register
@attrs.frozen
class Stall(HoldAction):
    """Stop forwarding the direction for ``duration`` seconds from this message on."""

    duration: float = attrs.field(converter=_to_duration, validator=_positive_finite)
    name: ClassVar[str] = "stall"
    params: ClassVar[tuple[Param, ...]] = (
        Param("duration", (str,), "a duration with a unit such as '5ms'",
              lambda v: Stall(v).duration, format_duration, hint="duration, e.g. 5ms"),)

    def hold(self) -> float:
        return self.duration
