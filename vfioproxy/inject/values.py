"""Scalar values of injection rules: durations, rates, integers, ranges, errnos.

Every value has a parser (text to value) and a formatter whose output parses
back to an equal value. Parsers raise :class:`RuleSyntaxError` naming the bad
token and its position inside the text they were given; callers shift the
position into the whole rule with :meth:`RuleSyntaxError.located`.

- duration: a non-negative decimal number and a unit, ``ns``, ``us`` (or
  ``µs``), ``ms`` or ``s``: ``200us``, ``1.5ms``, ``2e3ns``. A bare number is
  an error: the unit is required. Stored as float seconds.
- rate: a positive number and ``B/s``, ``KB/s``/``kB/s``, ``MB/s``, ``GB/s``
  (powers of 1000) or ``KiB/s``, ``MiB/s``, ``GiB/s`` (powers of 1024).
  Stored as float bytes per second.
- integer: decimal, ``0x`` hex, ``0o`` octal or ``0b`` binary, never negative.
- range: ``A..B`` (A inclusive, B exclusive), ``A..`` (A and up), ``..B``
  (from 0) or ``A`` (A alone).
- errno: a Linux errno name (``EINVAL``, any case) or a number 0..2**32-1.
"""

from __future__ import annotations

import errno as errno_module
import math
import re
from decimal import Decimal, InvalidOperation

import attrs

from vfioproxy.inject.errors import RuleSyntaxError

__all__ = [
    "IntRange",
    "format_duration",
    "format_errno",
    "format_probability",
    "format_rate",
    "parse_duration",
    "parse_errno",
    "parse_float",
    "parse_probability",
    "parse_range",
    "parse_rate",
    "parse_uint",
]

_NUMBER = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")

_DURATION_UNITS: dict[str, Decimal] = {
    "s": Decimal(1),
    "ms": Decimal("1e-3"),
    "us": Decimal("1e-6"),
    "µs": Decimal("1e-6"),
    "ns": Decimal("1e-9"),
}
#: units tried by format_duration, largest first
_DURATION_FORMAT = ("s", "ms", "us", "ns")

_RATE_UNITS: dict[str, Decimal] = {
    "B/s": Decimal(1),
    "KB/s": Decimal(1000),
    "kB/s": Decimal(1000),
    "MB/s": Decimal(1000**2),
    "GB/s": Decimal(1000**3),
    "KiB/s": Decimal(1024),
    "MiB/s": Decimal(1024**2),
    "GiB/s": Decimal(1024**3),
}
#: units tried by format_rate: the first that gives a whole number wins
_RATE_FORMAT = ("GiB/s", "MiB/s", "KiB/s", "GB/s", "MB/s", "KB/s")

U32_MAX = 0xFFFF_FFFF


def _plain(value: Decimal) -> str:
    """``200``, ``1.5``: a decimal without exponent or trailing zeros."""
    return format(value.normalize(), "f")


def _split_number(text: str, what: str) -> tuple[Decimal, str]:
    match = _NUMBER.match(text)
    if match is None:
        raise RuleSyntaxError(f"expected a {what}", token=text, position=0)
    try:
        number = Decimal(match.group())
    except InvalidOperation:  # pragma: no cover - the regex only admits valid numbers
        raise RuleSyntaxError(f"expected a {what}", token=text, position=0) from None
    return number, text[match.end() :]


def parse_duration(text: str) -> float:
    """Seconds of a duration such as ``200us``; the unit is required."""
    number, unit = _split_number(text, "duration such as 200us")
    if not unit:
        raise RuleSyntaxError(
            "a duration needs a unit (ns, us, ms, s)", token=text, position=0
        )
    scale = _DURATION_UNITS.get(unit)
    if scale is None:
        raise RuleSyntaxError(
            "unknown duration unit (use ns, us, ms or s)",
            token=unit,
            position=len(text) - len(unit),
        )
    seconds = float(number * scale)
    if not math.isfinite(seconds):
        raise RuleSyntaxError("duration too large", token=text, position=0)
    return seconds


def format_duration(seconds: float) -> str:
    """Text for ``seconds`` in the largest unit that keeps it >= 1 (``200us``).

    The result parses back to exactly ``seconds``.
    """
    exact = Decimal(repr(float(seconds)))
    if exact == 0:
        return "0s"
    for unit in _DURATION_FORMAT:
        if abs(exact) >= _DURATION_UNITS[unit] or unit == "ns":
            return _plain(exact / _DURATION_UNITS[unit]) + unit
    raise AssertionError("unreachable")  # pragma: no cover


def parse_rate(text: str) -> float:
    """Bytes per second of a rate such as ``10MiB/s``."""
    number, unit = _split_number(text, "rate such as 10MiB/s")
    scale = _RATE_UNITS.get(unit)
    if scale is None:
        raise RuleSyntaxError(
            "unknown rate unit (use B/s, KB/s, MB/s, GB/s, KiB/s, MiB/s or GiB/s)",
            token=unit or text,
            position=len(text) - len(unit) if unit else 0,
        )
    rate = float(number * scale)
    if not math.isfinite(rate) or rate <= 0:
        raise RuleSyntaxError("a rate must be positive and finite", token=text, position=0)
    return rate


def format_rate(bytes_per_second: float) -> str:
    """Text for a rate, in the largest unit giving a whole number (``10MiB/s``)."""
    exact = Decimal(repr(float(bytes_per_second)))
    for unit in _RATE_FORMAT:
        quotient = exact / _RATE_UNITS[unit]
        if quotient >= 1 and quotient == quotient.to_integral_value():
            return _plain(quotient) + unit
    return _plain(exact) + "B/s"


def parse_uint(text: str, what: str = "number", maximum: int | None = None) -> int:
    """A non-negative integer in decimal, hex (0x), octal (0o) or binary (0b)."""
    try:
        value = int(text, 0)
    except ValueError:
        raise RuleSyntaxError(f"expected an integer for {what}", token=text, position=0) from None
    if value < 0:
        raise RuleSyntaxError(f"{what} must not be negative", token=text, position=0)
    if maximum is not None and value > maximum:
        raise RuleSyntaxError(f"{what} must be at most {maximum:#x}", token=text, position=0)
    return value


def parse_float(text: str, what: str) -> float:
    """A finite decimal number (shape parameters such as sigma and alpha)."""
    try:
        value = float(text)
    except ValueError:
        raise RuleSyntaxError(f"expected a number for {what}", token=text, position=0) from None
    if not math.isfinite(value):
        raise RuleSyntaxError(f"{what} must be finite", token=text, position=0)
    return value


def parse_probability(text: str) -> float:
    """A probability: ``0.25`` or ``25%``, between 0 and 1."""
    percent = text.endswith("%")
    value = parse_float(text[:-1] if percent else text, "the probability")
    if percent:
        value /= 100
    if not 0.0 <= value <= 1.0:
        raise RuleSyntaxError("a probability must be between 0 and 1", token=text, position=0)
    return value


def format_probability(value: float) -> str:
    """``0.5``: shortest text that parses back to ``value``."""
    return repr(float(value))


def _check_range(
    instance: IntRange, attribute: attrs.Attribute[int | None], value: int | None
) -> None:
    if instance.start < 0:
        raise RuleSyntaxError(f"a range must not start below 0, got {instance.start}")
    if value is not None and value <= instance.start:
        raise RuleSyntaxError(
            f"empty range: the stop ({value}) must be above the start ({instance.start})"
        )


@attrs.frozen
class IntRange:
    """Integers ``start <= x < stop``; ``stop`` None means no upper bound."""

    start: int = 0
    stop: int | None = attrs.field(default=None, validator=_check_range)

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, int):
            return False
        return value >= self.start and (self.stop is None or value < self.stop)

    def to_text(self, *, hexadecimal: bool = False) -> str:
        """``5..10``, ``10..``, ``..10``, or ``5`` for a single value."""
        show = (lambda n: f"{n:#x}") if hexadecimal else str
        if self.stop == self.start + 1:
            return show(self.start)
        start = show(self.start) if self.start else ""
        stop = show(self.stop) if self.stop is not None else ""
        if not start and not stop:
            return show(0) + ".."
        return f"{start}..{stop}"


def parse_range(text: str, what: str = "range") -> IntRange:
    """An :class:`IntRange` from ``A..B``, ``A..``, ``..B`` or ``A``."""
    if ".." not in text:
        value = parse_uint(text, what)
        return IntRange(value, value + 1)
    head, _, tail = text.partition("..")
    try:
        start = parse_uint(head, what) if head else 0
    except RuleSyntaxError as exc:
        raise exc.located(offset=0) from None
    try:
        stop = parse_uint(tail, what) if tail else None
    except RuleSyntaxError as exc:
        raise exc.located(offset=len(head) + 2) from None
    try:
        return IntRange(start, stop)
    except RuleSyntaxError as exc:
        raise exc.located(offset=0, token=text) from None


def parse_errno(text: str) -> int:
    """An errno from its name (``EINVAL``, any case) or number."""
    if text[:1].isdigit():
        return parse_uint(text, "errno", U32_MAX)
    value = getattr(errno_module, text.upper(), None)
    if not isinstance(value, int) or not text.upper().startswith("E"):
        raise RuleSyntaxError("unknown errno name", token=text, position=0)
    return value


def format_errno(value: int) -> str:
    """The errno's name when it has one (``EINVAL``), else the number."""
    return errno_module.errorcode.get(value, str(value))
