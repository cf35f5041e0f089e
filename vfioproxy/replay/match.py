"""Comparing a live message with a recorded one: ignore rules, diffs, the request matcher.

Ignore rules say what legitimately differs. A rule is ``COMMAND:FIELD`` (or
just ``FIELD`` for every command); both parts are shell-style patterns.
``COMMAND`` is matched against the command name and against ``NAME cmd`` /
``NAME reply``; ``FIELD`` names a field of :func:`~vfioproxy.replay.fields.flatten`
and covers its sub-fields (``json`` covers ``json.capabilities.max_msg_fds``,
``data`` every ``data[a:b]`` range), and a byte range such as
``data[0x140:0x148]`` covers the differing ranges inside it. The defaults
ignore message ids (each side numbers its own commands) and the size of
VERSION messages (JSON spacing; the parsed JSON is still compared). Fd
numbers, timing and fd flags or inodes are never compared.

Rules and matcher keys are checked when parsed: a command that does not
exist, a field no message of that command has, or a malformed byte range is
refused with a :class:`RuleError` naming the nearest valid name, rather than
ignoring (or matching) nothing.

Bytes are compared range by range: a value of up to 8 bytes as one
little-endian number, longer data as the ranges that differ — in config space
(region 7) one range per PCI register, named (``data[0x2:0x4] (device_id)``).
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs

from vfioproxy.protocol.bodies import RegionAccessBody
from vfioproxy.protocol.codec import Message
from vfioproxy.protocol.header import Command
from vfioproxy.protocol.pci import Region
from vfioproxy.replay.fields import FD_FIELDS, HEADER_FIELDS, PciContext, field_names
from vfioproxy.replay.report import FieldDiff

__all__ = [
    "DEFAULT_IGNORES",
    "DEFAULT_MATCH_ON",
    "IgnoreRule",
    "Matcher",
    "RuleError",
    "compare",
]

#: differing byte ranges listed per field before the rest is summed up
MAX_RANGES = 16
_RANGE = re.compile(r"(.+)\[(0x[0-9a-fA-F]+|\d+):(0x[0-9a-fA-F]+|\d+)\]")
#: a field name's part: ``name``, ``len(name)``, then indices or one byte range
_PART = re.compile(r"(?:len\((?P<len>[^()\[\]]+)\)|(?P<name>[^()\[\]]+))"
                   r"(?P<index>(?:\[(?:\d+|\*)\])*)"
                   r"(?:\[(?P<low>0x[0-9a-fA-F]+|\d+):(?P<high>0x[0-9a-fA-F]+|\d+)\])?")
#: what a command part of a rule may name after the command: ``NAME cmd``, ``NAME reply``
_KINDS = ("cmd", "reply")
#: the matcher's own keys (any other key is a field pattern)
_MATCH_KEYS = ("command", "header", "body", "fds")


class RuleError(ValueError):
    """An ignore rule or matcher key that names nothing: says what and the nearest name."""


def _nearest(word: str, names: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, sorted(names), n=1, cutoff=0.5)
    if not close:  # "region_read": the case differs
        close = [n for n in names if n.lower() == word.lower()]
    return f" (did you mean {close[0]}?)" if close else ""


def _is_pattern(text: str) -> bool:
    return any(c in text for c in "*?[")


def _check_command(pattern: str) -> list[int]:
    """The command numbers a rule's command part names; RuleError if none."""
    labels = {f"{c.name} {kind}": c for c in Command for kind in _KINDS}
    hits = {c for label, c in labels.items()
            if fnmatch.fnmatchcase(label, pattern) or fnmatch.fnmatchcase(c.name, pattern)}
    if not hits:
        valid = [c.name for c in Command] + list(labels)
        what = "no command matches" if _is_pattern(pattern) else "unknown command"
        raise RuleError(f"{what} {pattern!r}{_nearest(pattern.split(' ')[0], valid)}; "
                        "commands are the names trace show prints, optionally followed by "
                        "' cmd' or ' reply'")
    return sorted(hits)


def check_field(
    pattern: str, commands: Sequence[int] | None = None, *, keys: Sequence[str] = ()
) -> None:
    """Raise :class:`RuleError` unless ``pattern`` names a field that messages of
    ``commands`` (None: any command) have: known names part by part
    (``header.<field>``, ``fds[i].<fact>``, body fields, anything under ``json``),
    well-formed indices and byte ranges (``data[0x2:0x4]``, start below end).
    ``keys`` are other words valid as a whole (a matcher's own keys)."""
    if pattern == "*" or pattern in keys:
        return
    body: set[str] = set()
    for command in commands if commands is not None else [None]:
        body |= field_names(command)
    names: Sequence[str] = sorted(body | {"header", "fds"})
    for position, part in enumerate(pattern.split(".")):
        match = _PART.fullmatch(part)
        if match is None:
            raise RuleError(f"malformed field {pattern!r} at {part!r}: expected NAME, "
                            "NAME[INDEX] or NAME[START:END] (e.g. data[0x2:0x4])")
        if match["low"] is not None and int(match["low"], 0) >= int(match["high"], 0):
            raise RuleError(f"empty byte range in {pattern!r}: the start must be below the end")
        name = match["len"] or match["name"]
        known = any(fnmatch.fnmatchcase(n, name) for n in names) if _is_pattern(name) else (
            name in names)
        if not known:
            inside = "" if name == pattern else f" in {pattern!r}"
            listed = ""
            if commands is not None or position:
                listed = f"; fields here: {', '.join(names)}"
            nearest = _nearest(name, [*names, *keys] if position == 0 else names)
            raise RuleError(f"unknown field {name!r}{inside}{nearest}{listed}")
        if name == "json" or _is_pattern(name):
            return  # the JSON's keys are the peer's; a pattern may cover any sub-field
        if position == 0 and name in ("header", "fds"):
            names = HEADER_FIELDS if name == "header" else FD_FIELDS
        else:
            names = sorted(body)


def _covers(pattern: str, field: str) -> bool:
    """Whether a field pattern covers ``field`` (itself, a sub-field, or a byte range)."""
    if fnmatch.fnmatchcase(field, pattern) or field == f"len({pattern})":
        return True
    if field.startswith((pattern + ".", pattern + "[")):
        return True
    rule, got = _RANGE.fullmatch(pattern), _RANGE.fullmatch(field)
    if rule is None or got is None or rule.group(1) != got.group(1):
        return False
    low, high = int(rule.group(2), 0), int(rule.group(3), 0)
    return low <= int(got.group(2), 0) and int(got.group(3), 0) <= high


@attrs.frozen
class IgnoreRule:
    """Ignore ``field`` (and its sub-fields) of messages whose command matches ``command``."""

    command: str = "*"
    field: str = "*"

    @classmethod
    def parse(cls, text: str) -> IgnoreRule:
        """``"REGION_READ reply:data[0x2:0x4]"`` or ``"header.msg_id"`` (every command)."""
        head, sep, tail = text.partition(":")
        command, field = ("*", text) if not sep or "[" in head else (head.strip(), tail.strip())
        if not command or not field:
            raise RuleError(f"bad ignore rule {text!r}: expected [COMMAND:]FIELD")
        try:
            check_field(field, None if command == "*" else _check_command(command))
        except RuleError as exc:
            raise RuleError(f"bad ignore rule {text!r}: {exc}") from None
        return cls(command, field)

    def applies(self, label: str, field: str) -> bool:
        """Whether the rule ignores ``field`` of a message labelled ``NAME cmd|reply``."""
        name = label.split(" ", 1)[0]
        hit = fnmatch.fnmatchcase(label, self.command) or fnmatch.fnmatchcase(name, self.command)
        return hit and _covers(self.field, field)

    def __str__(self) -> str:
        return f"{self.command}:{self.field}"


DEFAULT_IGNORES = (IgnoreRule("*", "header.msg_id"), IgnoreRule("VERSION", "header.size"))

#: what a live request must share with a recorded one to match it
DEFAULT_MATCH_ON = ("command", "body", "fds")


@attrs.frozen
class Matcher:
    """Which fields decide that a live request matches a recorded one.

    Keys: ``command`` (command number and header flags), ``header`` (every
    header field), ``body`` (every body field), ``fds`` (number, kinds and
    sizes of the fds), or any field pattern (``offset``, ``region``,
    ``json.capabilities``). Ignore rules still apply.
    """

    on: tuple[str, ...] = DEFAULT_MATCH_ON

    @classmethod
    def parse(cls, text: str) -> Matcher:
        """``"command,offset,region"``: the keys, each checked (:class:`RuleError`)."""
        keys = tuple(k.strip() for k in text.split(",") if k.strip())
        if not keys:
            raise RuleError("a matcher needs at least one key")
        for key in keys:
            try:
                check_field(key, keys=_MATCH_KEYS)
            except RuleError as exc:
                raise RuleError(f"bad match key {key!r}: {exc} (keys: "
                                f"{', '.join(_MATCH_KEYS)} or field names)") from None
        return cls(keys)

    def selects(self, field: str) -> bool:
        return any(_selects(key, field) for key in self.on)


def _selects(key: str, field: str) -> bool:
    is_fd = field == "fds" or field.startswith("fds[")
    if key == "command":
        return field in ("header.command", "header.flags")
    if key == "header":
        return field.startswith("header.")
    if key == "body":
        return not field.startswith("header.") and not is_fd
    if key == "fds":
        return is_fd
    return _covers(key, field)


def compare(
    live: dict[str, Any],
    recorded: dict[str, Any],
    *,
    label: str,
    message: Message,
    pci: PciContext,
    rules: Sequence[IgnoreRule] = DEFAULT_IGNORES,
    only: Callable[[str], bool] | None = None,
) -> list[FieldDiff]:
    """Every field of two flattened messages that differs and no rule ignores.

    ``message`` (the recorded one) says how to name data ranges: region
    accesses number them by region offset, config space by register.
    ``only`` limits the comparison to the fields it selects (a matcher).
    """
    body = message.body
    base, config = 0, False
    if isinstance(body, RegionAccessBody):
        base, config = body.offset, body.region == Region.CONFIG
    diffs: list[FieldDiff] = []
    for key in _keys(recorded, live):
        if only is not None and not only(key):
            continue
        a, b = live.get(key), recorded.get(key)
        if a == b or {a, b} <= {b"", None}:
            continue  # the same, or empty bytes on one side and nothing on the other
        if key.endswith(".sha256"):
            if a is not None and b is not None:  # only where both sides have a digest
                diffs.append(FieldDiff(key, _digest(a), _digest(b), "contents"))
        elif isinstance(a, bytes) and isinstance(b, bytes):
            diffs.extend(_bytes_diffs(key, a, b, base, pci if config else None))
        else:
            diffs.append(FieldDiff(key, _plain(a), _plain(b)))
    return [d for d in diffs if not any(rule.applies(label, d.field) for rule in rules)]


def _keys(first: dict[str, Any], second: dict[str, Any]) -> Iterable[str]:
    yield from first
    yield from (key for key in second if key not in first)


def _plain(value: Any) -> Any:
    return value.hex() if isinstance(value, bytes) else value


def _digest(value: bytes) -> str:
    return value.hex()[:16] + "…"


def _int_text(data: bytes) -> str:
    return f"{int.from_bytes(data, 'little'):#0{2 + 2 * len(data)}x}" if data else "(empty)"


def _bytes_diffs(
    field: str, live: bytes, recorded: bytes, base: int, pci: PciContext | None
) -> list[FieldDiff]:
    if len(live) == len(recorded) <= 8:
        return [FieldDiff(field, _int_text(live), _int_text(recorded))]
    ranges = list(_differing_ranges(live, recorded, base, pci))
    diffs = [
        FieldDiff(f"{field}[{start:#x}:{end:#x}]",
                  _show(live[start - base : end - base], pci),
                  _show(recorded[start - base : end - base], pci), note)
        for start, end, note in ranges[:MAX_RANGES]
    ]
    if len(ranges) > MAX_RANGES:
        more = ranges[MAX_RANGES:]
        diffs.append(FieldDiff.summed_up(f"{field}[{more[0][0]:#x}:{more[-1][1]:#x}]",
                                         f"{len(more)} more ranges differ"))
    if len(live) != len(recorded):
        diffs.append(FieldDiff(f"len({field})", len(live), len(recorded)))
    return diffs


def _show(data: bytes, pci: PciContext | None) -> str:
    return _int_text(data) if pci is not None else data.hex()


def _differing_ranges(
    live: bytes, recorded: bytes, base: int, pci: PciContext | None
) -> Iterable[tuple[int, int, str | None]]:
    """(start, end, register name) of each differing range, in region offsets."""
    n = min(len(live), len(recorded))
    i = 0
    while i < n:
        if live[i] == recorded[i]:
            block = (i // 64 + 1) * 64
            if live[i:block] == recorded[i:block]:
                i = block
                continue
            i += 1
            continue
        if pci is not None:
            start, size, name = pci.register_at(base + i)
            end = min(start + size, base + n)
            start = max(start, base)
            while (size == 1 and end - start < 8 and end < base + n
                   and live[end - base] != recorded[end - base]
                   and pci.register_at(end) == (end, 1, name)):
                end += 1  # differing unnamed bytes ("device-specific") go together, up to 8
            yield start, end, name
            i = end - base
            continue
        end = i + 1
        while end < n and end - i < 8 and live[end] != recorded[end]:
            end += 1
        yield base + i, base + end, None
        i = end
