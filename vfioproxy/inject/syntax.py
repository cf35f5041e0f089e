"""Rule text and rule files: :func:`parse_rule`, :func:`rule_from_dict`, :func:`load_rules`.

Grammar of one rule (tokens are separated by blanks; blanks inside
parentheses belong to the token, so ``uniform(1us, 2us)`` is one token;
keywords, names and units are matched as written below, except that
directions, command names, keywords, kinds, errno and region names are
case-insensitive)::

    rule      := direction commands filter* action filter*
               | "irq" vectors irqfilter* ("delay" DIST | "drop") irqfilter*
                                                filters before or after the action:
                                                "c2s * drop p=0.5" is "c2s * p=0.5 drop"
    direction := "c2s" | "s2c" | "*"
    vectors   := "*" | vector ("," vector)*    interrupts (--interpose-irqs)
    vector    := IRQ ["[" INT "]"]             MSIX[0]; MSIX: every vector of MSI-X
    IRQ       := "INTX" | "MSI" | "MSIX" | "ERR" | "REQ" | "IRQ" INT
    irqfilter := "session=" INT | "index=" RANGE | "p=" PROB | "id=" INT
                                                index: among its vector's interrupts
    commands  := "*" | command ("," command)*
    command   := NAME | NUMBER                  REGION_READ, region_read, 9
    filter    := "request" | "reply"            the message kind
               | "kind=" ("request" | "reply")
               | "session=" INT
               | "index=" RANGE                 per-direction message index
               | "region=" (INT | REGION)        REGION: BAR0..BAR5, ROM, CONFIG, VGA
               | "offset=" RANGE
               | ("p=" | "probability=") PROB   0.25 or 25%
               | "id=" INT                      rule id (0: assigned by the injector)
    action    := "delay" DIST                   see vfioproxy.inject.distributions
               | "bandwidth" RATE               10MiB/s, 500KB/s, 1000B/s
               | "error" ERRNO                  EINVAL or 22
               | "drop"
               | "close" ["before" | "after"]    default before
               | "corrupt" FIELD ["mask=" INT]  FIELD: msg_id, command, size, flags,
                                                error, body+N, offset, region, count...
               | "stall" DURATION
    RANGE     := INT | INT ".." | ".." INT | INT ".." INT     start inclusive, stop exclusive
    INT       := decimal | 0x hex | 0o octal | 0b binary
    DURATION  := NUMBER UNIT                    unit required: ns, us, ms, s

Examples::

    c2s REGION_READ delay normal(200us,50us)
    * * delay fixed(100us)
    s2c DEVICE_SET_IRQS reply drop
    c2s DEVICE_GET_REGION_INFO error EINVAL
    c2s REGION_WRITE region=7 offset=0x40..0x50 p=0.5 corrupt offset mask=0xff
    c2s * session=2 index=10.. close before
    s2c * bandwidth 10MiB/s
    c2s * stall 5ms
    irq MSIX[0] delay fixed(100us)
    irq * p=0.01 drop

Rule files are TOML: an array of ``[[rule]]`` tables, each either
``rule = "<text>"`` (plus an optional ``id``) or structured keys: the
filters ``direction``, ``command`` (a name, number or list), ``kind``,
``session``, ``index``, ``region``, ``offset``, ``probability``, ``id``
(an irq rule: ``direction = "irq"`` and ``vectors``, a list such as
``["MSIX[0]"]``, every interrupt when left out);
``action``; and the action's parameters: ``distribution`` (delay), ``rate``
(bandwidth), ``errno`` (error), ``when`` (close), ``field`` and ``mask``
(corrupt), ``duration`` (stall). :meth:`Rule.to_dict` produces that form.
A rules file may also hold an ``[interpose]`` table (the interposition
modes it turns on, read by :mod:`vfioproxy.interpose`; kept as it is here).

Every error is a :class:`RuleSyntaxError` naming the bad token and its
position in the rule text; from files also the file, the rule number and
the key.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs

from vfioproxy.errors import os_reason
from vfioproxy.inject.actions import ACTIONS, Action, Param
from vfioproxy.inject.errors import InjectError, RuleSyntaxError
from vfioproxy.inject.rules import Match, Rule, parse_command, parse_irq_vectors, parse_region
from vfioproxy.inject.values import (
    parse_probability,
    parse_range,
    parse_uint,
)

__all__ = ["load_rules", "loads_rules", "parse_rule", "rule_from_dict"]

T = TypeVar("T")


@attrs.frozen
class _Token:
    text: str
    position: int


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    start: int | None = None
    opened: list[int] = []
    for pos, char in enumerate(text):
        if char.isspace() and not opened:
            if start is not None:
                tokens.append(_Token(text[start:pos], start))
                start = None
            continue
        if start is None:
            start = pos
        if char == "(":
            opened.append(pos)
        elif char == ")":
            if not opened:
                raise RuleSyntaxError("')' without '('", token=")", position=pos, text=text)
            opened.pop()
    if opened:
        raise RuleSyntaxError("'(' is never closed", token="(", position=opened[-1], text=text)
    if start is not None:
        tokens.append(_Token(text[start:], start))
    return tokens


_KINDS = ("request", "reply")
#: filter key -> Match keyword
_FILTER_KEYS = {
    "kind": "kind",
    "session": "session",
    "index": "index",
    "region": "region",
    "offset": "offset",
    "p": "probability",
    "probability": "probability",
    "id": "id",
}


class _RuleParser:
    """Parses one rule text; every error carries the token and its position."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.pos = 0

    def error(self, message: str, token: _Token | None) -> RuleSyntaxError:
        if token is None:
            return RuleSyntaxError(message, position=len(self.text), text=self.text)
        return RuleSyntaxError(message, token=token.text, position=token.position, text=self.text)

    def value(self, token: _Token, skip: int, parse: Callable[[str], T]) -> T:
        """``parse`` the token's text after ``skip`` characters, errors placed in the rule."""
        try:
            return parse(token.text[skip:])
        except RuleSyntaxError as exc:
            raise exc.located(
                offset=token.position + skip, text=self.text, token=token.text
            ) from None

    def next(self, what: str) -> _Token:
        if self.pos >= len(self.tokens):
            raise self.error(f"missing {what}", None)
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def parse(self) -> Rule:
        direction = self.next("direction (c2s, s2c, * or irq)")
        irq = direction.text.lower() == "irq"
        commands = self.next("IRQ vectors (MSIX[0], INTX or *)" if irq
                             else "command (a name, a number or *)")
        match_args: dict[str, Any]
        if irq:
            match_args = {"irq": self.value(commands, 0, parse_irq_vectors)}
        else:
            match_args = {"direction": self.value(direction, 0, _direction)}
            if commands.text != "*":
                match_args["command"] = self.commands(commands)
        seen: dict[str, _Token] = {}
        while True:
            token = self.next("action (" + ", ".join(ACTIONS) + ")")
            word = token.text.lower()
            if word in ACTIONS:
                action_token = token
                break
            key = _filter_key(word)
            if key is None:
                raise self.error(
                    "unknown filter or action (filters: request, reply, "
                    + ", ".join(f"{k}=" for k in _FILTER_KEYS)
                    + "; actions: "
                    + ", ".join(ACTIONS)
                    + ")",
                    token,
                )
            self.filter(token, key, match_args, seen)
        action = self.action(action_token)
        while self.pos < len(self.tokens):  # filters may follow the action too
            token = self.tokens[self.pos]
            key = _filter_key(token.text.lower())
            if key is None:
                raise self.error("unexpected token after the action (only filters may "
                                 "follow it)", token)
            self.pos += 1
            self.filter(token, key, match_args, seen)
        rule_id = match_args.pop("id", 0)
        try:
            match = Match(**match_args)
        except RuleSyntaxError as exc:
            blame = (seen.get("region") or seen.get("offset") or seen.get("kind")
                     or commands)
            raise exc.located(offset=blame.position, text=self.text, token=blame.text) from None
        try:
            return Rule(match, action, rule_id, " ".join(t.text for t in self.tokens))
        except RuleSyntaxError as exc:
            raise exc.located(
                offset=action_token.position, text=self.text, token=action_token.text
            ) from None

    def filter(self, token: _Token, key: str, match_args: dict[str, Any],
               seen: dict[str, _Token]) -> None:
        """One filter token (``key``: its :data:`_FILTER_KEYS` key) into
        ``match_args`` (the rule id under ``id``)."""
        name = _FILTER_KEYS[key]
        if name in seen:
            raise self.error(f"{name} given twice", token)
        seen[name] = token
        skip = len(key) + 1 if "=" in token.text else 0
        if name == "id":
            match_args["id"] = self.value(token, skip, lambda t: parse_uint(t, "rule id"))
        else:
            match_args[name] = self.value(token, skip, _FILTER_PARSERS[name])

    def commands(self, token: _Token) -> frozenset[int]:
        numbers: set[int] = set()
        offset = 0
        for piece in token.text.split(","):
            if not piece:
                raise self.error("empty command name in the list", token)
            numbers.add(self.value(_Token(piece, token.position + offset), 0, parse_command))
            offset += len(piece) + 1
        return frozenset(numbers)

    def action(self, token: _Token) -> Action:
        word = token.text.lower()
        try:
            return self._action(word)
        except RuleSyntaxError as exc:
            if exc.position is not None:
                raise
            raise exc.located(offset=token.position, text=self.text, token=token.text) from None

    def _action(self, word: str) -> Action:
        """The action's parameters from the tokens after its name, as its
        :class:`~vfioproxy.inject.actions.Param` list says."""
        kind = ACTIONS[word]
        values: dict[str, Any] = {}
        first: _Token | None = None
        for param in kind.params:
            following = self.tokens[self.pos] if self.pos < len(self.tokens) else None
            skip = 0
            if param.keyword:
                skip = len(param.key) + 1
                if following is None or not following.text.lower().startswith(param.key + "="):
                    continue
            elif param.optional and (following is None
                                     or _filter_key(following.text.lower()) is not None):
                continue
            token = self.next(param.hint or param.what)
            first = first or token
            values[param.name] = self.value(token, skip, param.convert)
        try:
            return kind(**values)
        except RuleSyntaxError as exc:  # a check across parameters (the corrupt mask)
            if first is None:
                raise
            raise exc.located(offset=first.position, text=self.text, token=first.text) from None


def _filter_key(word: str) -> str | None:
    """The :data:`_FILTER_KEYS` key of a filter token (``request``/``reply``:
    ``kind``), or None when the token is not a filter."""
    key, equals, _ = word.partition("=")
    if not equals:
        return "kind" if word in _KINDS else None
    return key if key in _FILTER_KEYS else None


def _direction(text: str) -> str | None:
    if text.lower() not in ("c2s", "s2c", "*"):
        raise RuleSyntaxError("unknown direction (use c2s, s2c, * or irq)", token=text,
                              position=0)
    return None if text == "*" else text.lower()


def _kind(text: str) -> str:
    if text.lower() not in _KINDS:
        raise RuleSyntaxError("unknown kind (use request or reply)", token=text, position=0)
    return text.lower()


_FILTER_PARSERS: dict[str, Callable[[str], Any]] = {
    "kind": _kind,
    "session": lambda t: parse_uint(t, "session"),
    "index": lambda t: parse_range(t, "index"),
    "region": parse_region,
    "offset": lambda t: parse_range(t, "offset"),
    "probability": parse_probability,
}



def parse_rule(text: str, *, id: int | None = None) -> Rule:
    """Parse one rule (grammar in the module docstring); ``id`` overrides ``id=``."""
    rule = _RuleParser(text).parse()
    return rule if id is None else attrs.evolve(rule, id=id)


# --------------------------------------------------------------------- structured form

_MATCH_KEYS = ("direction", "command", "kind", "session", "index", "region", "offset",
               "probability", "vectors")


def _typed(key: str, value: Any, types: tuple[type, ...], what: str) -> Any:
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        raise RuleSyntaxError(f"expected {what}, got {value!r}", key=key)
    return value


def _match_key(key: str) -> Callable[[Any], Any]:
    """Validate one filter value alone, the way :class:`Match` converts it."""

    def convert(value: Any) -> Any:
        return getattr(Match(**{key: value}), key)

    return convert


#: structured key -> (accepted types, description, validating conversion)
_KEY_TYPES: dict[str, tuple[tuple[type, ...], str, Callable[[Any], Any]]] = {
    "direction": ((str,), "a string (c2s, s2c, * or irq)",
                  lambda v: "irq" if v.lower() == "irq" else _match_key("direction")(v)),
    "vectors": ((list,), "a list of IRQ vectors such as ['MSIX[0]', 'INTX']",
                lambda v: Match(irq=v).irq),
    "command": ((str, int, list), "a command name, number or a list of them",
                _match_key("command")),
    "kind": ((str,), "request or reply", _match_key("kind")),
    "session": ((int,), "an integer", _match_key("session")),
    "index": ((str, int), "a range string such as '5..10' or an integer", _match_key("index")),
    "region": ((int, str), "a region number or name", _match_key("region")),
    "offset": ((str, int), "a range string such as '0x40..0x50' or an integer",
               _match_key("offset")),
    "probability": ((float, int, str), "a number between 0 and 1",
                    lambda v: _match_key("probability")(
                        parse_probability(v) if isinstance(v, str) else v)),
    "id": ((int,), "an integer", lambda v: v),
    "action": ((str,), "an action name", lambda v: v),
}


def _read(table: Mapping[str, Any], key: str, param: Param | None = None) -> Any:
    """The value of ``key``, checked and converted (by the action's ``param``
    when it is one of its parameters)."""
    if param is None:
        types, what, convert = _KEY_TYPES[key]
    else:
        types, what, convert = param.types, param.what, param.convert
    value = table[key]
    try:
        return convert(_typed(key, value, types, what))
    except RuleSyntaxError as exc:
        text = value if isinstance(value, str) else None
        raise exc.located(key=key, text=text) from None


def rule_from_dict(table: Mapping[str, Any]) -> Rule:
    """A rule from its structured form (:meth:`Rule.to_dict`, a rule file table).

    Errors name the offending key.
    """
    if "rule" in table:
        return _rule_from_text(table)
    if "action" not in table:
        raise RuleSyntaxError("a rule needs 'rule' (its text) or 'action'", key="action")
    action_name = str(_read(table, "action")).lower()
    if action_name not in ACTIONS:
        raise RuleSyntaxError(
            f"unknown action (use {', '.join(ACTIONS)})", token=action_name, key="action"
        )
    kind = ACTIONS[action_name]
    params = [p.key for p in kind.params]
    for key in table:
        if key in _MATCH_KEYS or key in params or key in ("action", "id"):
            continue
        if any(key in (p.key for p in other.params) for other in ACTIONS.values()):
            raise RuleSyntaxError(f"not a parameter of action {action_name!r}", key=key)
        raise RuleSyntaxError("unknown key", key=key)
    match_args = {key: _read(table, key) for key in _MATCH_KEYS if key in table}
    if match_args.get("direction") == "irq":
        del match_args["direction"]
        match_args["irq"] = match_args.pop("vectors", ())
    elif "vectors" in match_args:
        raise RuleSyntaxError("vectors is for irq rules (direction = \"irq\")", key="vectors")
    try:
        match = Match(**match_args)
    except RuleSyntaxError as exc:  # region/offset on commands without them, irq filters
        blame = ("direction" if match_args.get("irq") is not None
                 else "region" if "region" in table else "offset")
        raise exc.located(key=blame) from None
    for param in kind.params:
        if param.key not in table and not param.optional:
            raise RuleSyntaxError(f"action {action_name!r} needs this key", key=param.key)
    values = {p.name: _read(table, p.key, p) for p in kind.params if p.key in table}
    try:
        action = kind(**values)
    except RuleSyntaxError as exc:  # the corrupt mask, the only check across keys
        raise exc.located(key="mask") from None
    rule_id = _read(table, "id") if "id" in table else 0
    try:
        return Rule(match, action, rule_id)
    except RuleSyntaxError as exc:
        raise exc.located(key="id" if "id" in table else "action") from None


def _rule_from_text(table: Mapping[str, Any]) -> Rule:
    for key in table:
        if key not in ("rule", "id"):
            raise RuleSyntaxError("a rule given as text takes no other key than id", key=key)
    text = table["rule"]
    if not isinstance(text, str):
        raise RuleSyntaxError(f"expected the rule text as a string, got {text!r}", key="rule")
    try:
        rule = parse_rule(text)
    except RuleSyntaxError as exc:
        raise exc.located(key="rule") from None
    if "id" in table:
        rule_id = _read(table, "id")
        try:
            rule = attrs.evolve(rule, id=rule_id)
        except RuleSyntaxError as exc:
            raise exc.located(key="id") from None
    return rule


# --------------------------------------------------------------------- files


def loads_rules(text: str, source: str = "<rules>") -> tuple[Rule, ...]:
    """The rules of a TOML document (``[[rule]]`` tables); ``source`` names it in errors."""
    return loads_rules_file(text, source)[0]


def loads_rules_file(text: str, source: str = "<rules>",
                     ) -> tuple[tuple[Rule, ...], dict[str, Any]]:
    """The rules of a TOML document (``[[rule]]`` tables) and its ``[interpose]``
    table (empty when it has none; read by :class:`vfioproxy.interpose.InterposeOptions`,
    which says what is wrong in it); ``source`` names the document in errors."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RuleSyntaxError(f"not valid TOML: {exc}", source=source) from None
    for key in document:
        if key not in ("rule", "interpose"):
            raise RuleSyntaxError("unknown top-level key (use [[rule]] tables and an "
                                  "[interpose] table)", source=source, key=key)
    interpose = document.get("interpose", {})
    if not isinstance(interpose, dict):
        raise RuleSyntaxError("expected an [interpose] table", source=source, key="interpose")
    tables = document.get("rule", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise RuleSyntaxError("expected [[rule]] tables", source=source, key="rule")
    rules = []
    for number, table in enumerate(tables, start=1):
        try:
            rules.append(rule_from_dict(table))
        except RuleSyntaxError as exc:
            raise exc.located(source=source, rule_number=number) from None
    return tuple(rules), interpose


def load_rules(path: str | os.PathLike[str]) -> tuple[Rule, ...]:
    """The rules of a TOML rule file (see the module docstring).

    Raises :class:`RuleSyntaxError` naming the file, the rule number and the
    key, and :class:`InjectError` when the file cannot be read.
    """
    return load_rules_file(path)[0]


def load_rules_file(path: str | os.PathLike[str],
                    ) -> tuple[tuple[Rule, ...], dict[str, Any]]:
    """The rules of a TOML rule file and its ``[interpose]`` table (see
    :func:`loads_rules_file`); errors as :func:`load_rules`'s."""
    source = os.fspath(path)
    try:
        text = Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        raise InjectError(f"{source}: cannot read rules: {os_reason(exc)}") from exc
    except UnicodeDecodeError as exc:
        raise InjectError(f"{source}: cannot read rules: {exc}") from exc
    return loads_rules_file(text, source)
