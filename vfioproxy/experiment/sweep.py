"""Sweeps: one rule text with one ``{a,b,c}`` group, expanded into settings.

``c2s * delay fixed({0,50,100}us)`` gives three settings, one rule each:
``c2s * delay fixed(0us)``, ``... fixed(50us)``, ``... fixed(100us)``. Values
are split at top-level commas (``{fixed(1ms),normal(1ms,100us)}`` has two
values). A value directly followed by a unit (``{0,50}us``) is a duration;
its seconds are the setting's ``value_s``. Otherwise ``value_s`` is the mean
of a swept delay, the duration of a swept stall, else None.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import attrs

from vfioproxy.experiment.errors import SweepError
from vfioproxy.inject import Delay, InjectError, Injector, Rule, Stall, parse_duration, parse_rule

__all__ = ["Setting", "expand_sweep", "make_settings", "parse_rules"]

_UNIT = re.compile(r"[A-Za-z]+")


@attrs.frozen
class Setting:
    """One point of a sweep: the rules the proxy injects, or a direct (no proxy) baseline.

    ``rule`` is the canonical text of the swept rule (empty when nothing is
    swept); ``value`` the swept value as text and ``value_s`` in seconds
    (None when it is not a time); ``rules`` every rule of the setting, with
    the ids the injector uses (the swept rule first, then the fixed rules).
    """

    index: int
    label: str
    rule: str = ""
    value: str = ""
    value_s: float | None = None
    rules: tuple[Rule, ...] = ()
    proxy: bool = True

    @property
    def slug(self) -> str:
        """A file-name-safe unique name: ``03-200us``."""
        safe = re.sub(r"[^A-Za-z0-9.+-]+", "_", self.label).strip("_")[:40] or "setting"
        return f"{self.index:02d}-{safe}"


def _split_values(body: str, text: str, start: int) -> list[str]:
    values: list[str] = []
    depth = 0
    current = ""
    for char in body:
        if char == "," and depth == 0:
            values.append(current)
            current = ""
            continue
        depth += {"(": 1, ")": -1}.get(char, 0)
        current += char
    values.append(current)
    stripped = [value.strip() for value in values]
    for number, value in enumerate(stripped, 1):
        if not value:
            raise SweepError(
                f"sweep {text!r}: value {number} of the group at position {start} is empty"
            )
    duplicates = sorted({value for value in stripped if stripped.count(value) > 1})
    if duplicates:
        raise SweepError(f"sweep {text!r}: value {duplicates[0]!r} is given twice")
    return stripped


def expand_sweep(text: str) -> list[tuple[str, float | None, Rule]]:
    """``(value text, value in seconds or None, rule)`` for each value of the one brace group.

    Raises :class:`SweepError` for no group, several groups, an unclosed or
    empty group, an empty or repeated value, and a value that makes a bad
    rule (naming the value and the rule syntax error).
    """
    opens = [i for i, char in enumerate(text) if char == "{"]
    closes = [i for i, char in enumerate(text) if char == "}"]
    if not opens:
        raise SweepError(
            f"sweep {text!r} has no {{a,b,...}} group: put the values to sweep in braces, "
            "e.g. 'c2s * delay fixed({0,100,200}us)'"
        )
    if len(opens) > 1:
        raise SweepError(
            f"sweep {text!r} has {len(opens)} {{...}} groups (the second at position "
            f"{opens[1]}); a sweep has exactly one (use --rule for fixed rules)"
        )
    start = opens[0]
    after = [i for i in closes if i > start]
    if not after:
        raise SweepError(f"sweep {text!r}: the group at position {start} is not closed by '}}'")
    if len(closes) > 1 or closes[0] < start:
        stray = next(i for i in closes if i != after[0])
        raise SweepError(f"sweep {text!r}: unmatched '}}' at position {stray}")
    end = after[0]
    if not text[start + 1 : end].strip():
        raise SweepError(f"sweep {text!r}: the group at position {start} has no values")
    values = _split_values(text[start + 1 : end], text, start)
    unit_match = _UNIT.match(text, end + 1)
    unit = unit_match.group() if unit_match else ""
    expanded = []
    for value in values:
        rule_text = text[:start] + value + text[end + 1 :]
        try:
            rule = parse_rule(rule_text)
        except InjectError as exc:
            raise SweepError(
                f"sweep value {value!r} gives a bad rule {rule_text!r}: {exc}"
            ) from exc
        expanded.append((*_value(value, unit, rule), rule))
    return expanded


def _value(value: str, unit: str, rule: Rule) -> tuple[str, float | None]:
    if unit:
        try:
            return value + unit, parse_duration(value + unit)
        except InjectError:
            pass
    action = rule.action
    if isinstance(action, Delay):
        return value, action.distribution.mean()
    if isinstance(action, Stall):
        return value, action.duration
    return value, None


def parse_rules(texts: Iterable[str]) -> list[Rule]:
    """Parse fixed ``--rule`` texts; a bad one raises :class:`SweepError` naming it."""
    rules = []
    for number, text in enumerate(texts, 1):
        try:
            rules.append(parse_rule(text))
        except InjectError as exc:
            raise SweepError(f"rule {number} {text!r}: {exc}") from exc
    return rules


def _with_ids(rules: Sequence[Rule]) -> tuple[Rule, ...]:
    try:
        return Injector(rules).rules
    except InjectError as exc:
        raise SweepError(f"rules {[r.text for r in rules]!r}: {exc}") from exc


def make_settings(
    sweep: str | None, rules: Iterable[str] = (), *, direct: bool = False
) -> tuple[Setting, ...]:
    """The settings of an experiment, in order.

    ``direct`` puts a no-proxy baseline first; then one setting per sweep
    value, each with the swept rule followed by the fixed ``rules``; without
    a sweep one setting with only the fixed rules (``proxy`` when there are
    none: the bare proxy).
    """
    fixed = parse_rules(rules)
    settings: list[Setting] = []
    if direct:
        settings.append(Setting(0, "direct", proxy=False))
    if sweep is None:
        label = "rules" if fixed else "proxy"
        settings.append(Setting(len(settings), label, rules=_with_ids(fixed)))
    else:
        for value, seconds, rule in expand_sweep(sweep):
            settings.append(
                Setting(
                    len(settings),
                    value,
                    rule=rule.to_text(),
                    value=value,
                    value_s=seconds,
                    rules=_with_ids([rule, *fixed]),
                )
            )
    return tuple(settings)
