"""Argument types: each turns an option's text into its value or refuses it
where it is parsed, with the accepted range in the message (argparse prints
``vfioproxy VERB: error: argument --OPTION: <message>`` and exits 2)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TypeVar

__all__ = [
    "integer", "octal_mode", "pci_id", "real", "seconds", "size", "size_in", "span",
]

T = TypeVar("T")

_SIZE_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def size(text: str) -> int:
    """A size such as ``64k`` or ``16M`` in bytes (``ValueError`` if it is none)."""
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in _SIZE_UNITS:
        return int(text[:-1]) * _SIZE_UNITS[text[-1]]
    return int(text)


def _show_size(value: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("k", 1 << 10)):
        if value and value % scale == 0:
            return f"{value // scale}{unit}"
    return str(value)


def _checked(convert: Callable[[str], T], accepts: Callable[[T], bool], wanted: str,
             example: str = "") -> Callable[[str], T]:
    """An argparse type: ``convert(text)`` when it converts (no ``ValueError``)
    and ``accepts`` the value; else ``expected WANTED [such as EXAMPLE], got TEXT``."""
    such_as = f" such as {example}" if example else ""

    def parse(text: str) -> T:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {wanted}{such_as}, got {text!r}") from None
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text}")
        return value

    return parse


def size_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a size (:func:`size`) from ``low`` up to ``high`` bytes."""
    if high is not None:
        wanted = f"a size from {_show_size(low)} to {_show_size(high)} bytes"
    else:
        unit = "byte" if low == 1 else "bytes"
        wanted = f"a size of at least {_show_size(low)} {unit}" if low else "a size in bytes"

    return _checked(size, lambda value: low <= value and (high is None or value <= high),
                    wanted, "64k or 16M")


def integer(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a decimal integer from ``low`` to ``high`` (either may be open)."""
    if low is not None and high is not None:
        wanted = f"an integer from {low} to {high}"
    elif low is not None:
        wanted = f"an integer >= {low}"
    elif high is not None:
        wanted = f"an integer <= {high}"
    else:
        wanted = "an integer"

    return _checked(int, lambda value: (low is None or value >= low)
                    and (high is None or value <= high), wanted)


def real(what: str, *, zero: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number above 0 (or from 0 with ``zero``);
    ``what`` names it in the message (``seconds``, ``a speed factor``)."""
    wanted = f"{what} >= 0" if zero else f"{what} > 0"

    return _checked(float, lambda value: math.isfinite(value)
                    and (value > 0 or (zero and value == 0)), wanted, "0.5")


def seconds(*, zero: bool = False) -> Callable[[str], float]:
    """An argparse type: a duration in seconds above 0 (or from 0 with ``zero``)."""
    return real("seconds", zero=zero)


def span(number: Callable[[str], float], what: str,
         example: str) -> Callable[[str], tuple[float | None, float | None]]:
    """An argparse type: ``A:B``, inclusive bounds of ``what`` that ``number``
    converts (``int`` or ``float``, from 0); either may be left out (``A:``,
    ``:B``), not both, and ``A`` may not exceed ``B``."""
    wanted = f"A:B, {what} from A to B (either may be left out)"

    def convert(text: str) -> tuple[float | None, float | None]:
        low, sep, high = text.partition(":")
        if not sep or not (low.strip() or high.strip()):
            raise ValueError(text)
        bounds = tuple(number(part) if part.strip() else None for part in (low, high))
        return bounds[0], bounds[1]

    def accepts(bounds: tuple[float | None, float | None]) -> bool:
        low, high = bounds
        return (all(b is None or (math.isfinite(b) and b >= 0) for b in bounds)
                and (low is None or high is None or low <= high))

    return _checked(convert, accepts, wanted, example)


def octal_mode(text: str) -> int:
    """An argparse type: file permissions in octal, ``000`` to ``777`` (e.g. ``0600``)."""
    try:
        value = int(text, 8)
    except ValueError:
        value = -1
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(
            f"expected an octal permission mode from 000 to 777 such as 0600, got {text!r}")
    return value


def pci_id(text: str) -> int:
    """An argparse type: a 16-bit PCI vendor or device id, hex with ``0x`` or decimal."""
    try:
        value = int(text, 0)
    except ValueError:
        value = -1
    if not 0 <= value <= 0xFFFF:
        raise argparse.ArgumentTypeError(
            f"expected a 16-bit PCI id from 0x0000 to 0xffff such as 0x1b36, got {text!r}")
    return value
