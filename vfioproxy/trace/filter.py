"""The display filter language: ``command == REGION_READ and region == ROM``.

:func:`compile_filter` parses an expression once (tokenizer, recursive
descent) into a :class:`Filter`, a predicate over
:class:`~vfioproxy.trace.decoded.DecodedMessage`; :func:`select` applies it
to a stream of decoded items. :data:`FIELDS` is the one table of fields: the
parser, the "did you mean" suggestions and README's field table come from it.
Sans-IO: nothing here reads a file.
"""

from __future__ import annotations

import difflib
import errno as errno_module
import functools
import operator
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import attrs

from recorder.records import EventKind, EventRecord, FdKind, TraceHeader
from vfioproxy.errors import UsageError
from vfioproxy.protocol.header import FLAG_ERROR, TYPE_MASK, Command, MessageType, command_name
from vfioproxy.protocol.pci import Capability, Region, config_register_name, region_name
from vfioproxy.protocol.session import Observation
from vfioproxy.side import Direction
from vfioproxy.trace.decoded import DecodedItem, DecodedMessage, SessionNotice
from vfioproxy.trace.timeline.labels import label_messages

__all__ = ["FIELDS", "Facts", "FieldSpec", "Filter", "compile_filter", "facts_of", "marked",
           "select", "select_facts", "values"]


class Facts:
    """What a field getter reads of one message: its trace facts (``seq``,
    ``session``, ``direction``, ``t_ns``, ``fds``), its decoding, the latency
    of a reply, whether an injection acted on it, its session's first time,
    its step label, ``wall`` (monotonic ns to wall-clock time) and ``caps``,
    the PCI capabilities its session's config space holds (to name the
    capability fields a config access covers).

    Plain slots, built once per message: trace readers make it from a
    :class:`~vfioproxy.trace.decoded.DecodedMessage` (:func:`facts_of`), the
    proxy's live view from what it sees on the path."""

    __slots__ = ("caps", "direction", "fds", "injected", "interposed", "latency_ns",
                 "observation", "seq", "session", "session_start_ns", "step", "t_ns", "wall")

    def __init__(self, seq: int, session: int, direction: Direction, t_ns: int,
                 fds: Sequence[Any], observation: Observation, latency_ns: int | None = None,
                 injected: bool = False, session_start_ns: int = 0, step: str | None = None,
                 wall: Callable[[int], datetime] | None = None,
                 caps: tuple[Capability, ...] = (), interposed: bool = False) -> None:
        self.seq = seq
        self.session = session
        self.direction = direction
        self.t_ns = t_ns
        self.fds = fds
        self.observation = observation
        self.latency_ns = latency_ns
        self.injected = injected
        self.session_start_ns = session_start_ns
        self.step = step
        self.wall = wall
        self.caps = caps
        self.interposed = interposed


def facts_of(message: DecodedMessage, *, session_start_ns: int = 0, step: str | None = None,
             header: TraceHeader | None = None) -> Facts:
    """The :class:`Facts` of a decoded trace message (``header``: the trace's,
    which anchors ``time``)."""
    record = message.record
    return Facts(record.seq, record.session, record.direction, record.t_ns, record.fds,
                 message.observation, message.latency_ns, message.injection is not None,
                 session_start_ns, step, None if header is None else header.wall_time,
                 message.caps, message.interposition is not None)


Getter = Callable[[Facts], Any]


@attrs.frozen
class FieldSpec:
    """One filter field. ``kind``: ``int``, ``number`` (may be fractional),
    ``name`` (a number or a name ``names`` resolves), ``text``, ``bytes``,
    ``bool`` or ``time`` (a quoted ISO 8601 wall-clock time, UTC unless it
    says); ``fold``: text compared case-insensitively by ``==``/``in``;
    ``choices``: the only values a ``text`` field takes, when they are few;
    ``live``: why the proxy's live view cannot know it ("": it can)."""

    name: str
    kind: str
    description: str
    get: Getter
    names: Callable[[int], str] | None = None
    resolve: Callable[[str], int | None] | None = None
    fold: bool = False
    choices: tuple[str, ...] = ()
    live: str = ""


def _body(ctx: Facts, attribute: str) -> Any:
    return getattr(ctx.observation.message.body, attribute, None)


_CMD, _REPLY, _ERROR = _KINDS = ("cmd", "reply", "error")
_DIRECTION_TEXT = {d: d.value for d in Direction}


_REPLY_TYPE = int(MessageType.REPLY)


def _kind(ctx: Facts) -> str:
    flags = ctx.observation.message.header.flags
    return _ERROR if flags & FLAG_ERROR else _REPLY if flags & TYPE_MASK == _REPLY_TYPE else _CMD


def _errno(ctx: Facts) -> int | None:
    header = ctx.observation.message.header
    return header.error if header.flags & FLAG_ERROR else None


_CONFIG = int(Region.CONFIG)


def _register(ctx: Facts) -> str | None:
    body = ctx.observation.message.body
    if getattr(body, "region", None) != _CONFIG:
        return None
    offset, count = getattr(body, "offset", None), getattr(body, "count", None)
    if offset is None or not count:
        return None
    return _register_name(offset, count, ctx.caps)


@functools.lru_cache(maxsize=4096)
def _register_name(offset: int, count: int, caps: tuple[Capability, ...]) -> str:
    """:func:`config_register_name`, remembered: a device's config accesses
    and capability lists are few."""
    return config_register_name(offset, count, caps)


def _data(ctx: Facts) -> bytes | None:
    data = _body(ctx, "data")
    return data if isinstance(data, bytes) else None


def _enum_value(enum: Any) -> Callable[[str], int | None]:
    def resolve(text: str) -> int | None:
        member = enum.__members__.get(text.upper())
        return None if member is None else int(member)
    return resolve


def _errno_value(text: str) -> int | None:
    value = getattr(errno_module, text.upper(), None)
    return value if isinstance(value, int) else None


def _errno_name(value: int) -> str:
    return errno_module.errorcode.get(value, str(value))


FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("seq", "int", "the message's sequence number in the trace",
              lambda c: c.seq),
    FieldSpec("session", "int", "session number", lambda c: c.session),
    FieldSpec("dir", "text", "direction: c2s or s2c",
              lambda c: _DIRECTION_TEXT[c.direction],
              choices=tuple(d.value for d in Direction)),
    FieldSpec("kind", "text", "cmd, reply or error", _kind, choices=_KINDS),
    FieldSpec("command", "name", "command, by name (REGION_READ) or number",
              lambda c: c.observation.message.command, command_name,
              _enum_value(Command)),
    FieldSpec("msg_id", "int", "header msg_id", lambda c: c.observation.message.msg_id),
    FieldSpec("size", "int", "header size (bytes, header included)",
              lambda c: c.observation.message.header.size),
    FieldSpec("t", "number", "seconds since the session's first message",
              lambda c: (c.t_ns - c.session_start_ns) / 1e9),
    FieldSpec("time", "time", 'wall-clock time, UTC: time >= "2026-11-25T09:22:57.2"',
              lambda c: None if c.wall is None else c.wall(c.t_ns)),
    FieldSpec("latency", "number", "reply minus request, in microseconds (replies)",
              lambda c: None if c.latency_ns is None else c.latency_ns / 1e3),
    FieldSpec("region", "name", "region index or name: BAR0..BAR5, ROM, CONFIG, VGA",
              lambda c: _body(c, "region"), region_name, _enum_value(Region)),
    FieldSpec("offset", "int", "body offset (region accesses, region info)",
              lambda c: _body(c, "offset")),
    FieldSpec("count", "int", "body count (region and DMA accesses, ...)",
              lambda c: _body(c, "count")),
    FieldSpec("data", "bytes", "body data bytes; data[0:2] slices", _data),
    FieldSpec("errno", "name", "error replies' errno, by number or name (EINVAL)",
              _errno, _errno_name, _errno_value),
    FieldSpec("fds", "int", "number of fds carried", lambda c: len(c.fds)),
    FieldSpec("fd.kind", "text", "kinds of the fds carried (memfd, eventfd, ...); any matches",
              lambda c: tuple(fd.kind.value for fd in c.fds),
              choices=tuple(k.value for k in FdKind),
              live="the proxy passes fds on without inspecting them (filter the trace)"),
    FieldSpec("violation", "bool", "the message broke a protocol rule",
              lambda c: bool(c.observation.violations)),
    FieldSpec("inject", "bool", "a fault-injection rule acted on the message",
              lambda c: c.injected,
              live="the live view does not see which rules acted (filter the trace)"),
    FieldSpec("interpose", "bool", "an interposition mode (--trap-mmap, ...) rewrote the "
              "message", lambda c: c.interposed,
              live="the live view does not see what the modes did (filter the trace)"),
    FieldSpec("register", "text",
              "config-space register a config access covers: header registers (command, "
              "ROM BAR), capability fields as the session's config names them "
              "(MSI-X[0xa0].msg_ctl)",
              _register, fold=True),
    FieldSpec("step", "text", "the realize timeline's step label (R7, S2?, ...)",
              lambda c: c.step,
              live="a step label is revised by later messages (filter the trace)"),
)
_BY_NAME = {f.name: f for f in FIELDS}

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<number>0[xX][0-9a-fA-F]+|\d+(?:\.\d+)?)
  | (?P<string>"[^"]*")
  | (?P<op>==|!=|<=|>=|<|>)
  | (?P<punct>[(){}\[\],:])
  | (?P<word>[A-Za-z_][A-Za-z0-9_.]*)
""", re.VERBOSE)
_KEYWORDS = {"and", "or", "not", "in", "contains", "matches"}


@attrs.frozen
class _Token:
    kind: str
    text: str
    pos: int


def _tokens(source: str) -> list[_Token]:
    out: list[_Token] = []
    pos = 0
    while pos < len(source):
        match = _TOKEN.match(source, pos)
        if match is None:
            raise UsageError(f'filter: unexpected "{source[pos]}" at {pos}')
        kind = match.lastgroup or ""
        if kind != "space":
            out.append(_Token(kind, match.group(), pos))
        pos = match.end()
    out.append(_Token("end", "", len(source)))
    return out


Predicate = Callable[[Facts], bool]


def _chain(parts: Sequence[Predicate], either: bool) -> Predicate:
    """``parts[0] or parts[1] or ...`` (``either``), else ``... and ...``: nested
    two-part closures (a generator over the parts costs more than the tests)."""
    if len(parts) == 1:
        return parts[0]
    first, rest = parts[0], _chain(parts[1:], either)
    if either:
        return lambda c: first(c) or rest(c)
    return lambda c: first(c) and rest(c)


def _error(token: _Token, what: str) -> UsageError:
    shown = ("end of expression" if token.kind == "end"
             else token.text if token.kind == "string" else f'"{token.text}"')
    return UsageError(f"filter: {what} {shown} at {token.pos}")


class _Parser:
    def __init__(self, source: str) -> None:
        self.tokens = _tokens(source)
        self.i = 0
        self.fields: set[str] = set()

    def peek(self) -> _Token:
        return self.tokens[self.i]

    def take(self) -> _Token:
        token = self.tokens[self.i]
        self.i += 1
        return token

    def expect(self, text: str) -> _Token:
        token = self.take()
        if token.text != text:
            raise _error(token, f'expected "{text}", got')
        return token

    def parse(self) -> Predicate:
        predicate = self.or_()
        if self.peek().kind != "end":
            raise _error(self.peek(), "unexpected")
        return predicate

    def or_(self) -> Predicate:
        return self._joined("or", self.and_, any)

    def and_(self) -> Predicate:
        return self._joined("and", self.not_, all)

    def _joined(self, word: str, operand: Callable[[], Predicate],
                combine: Callable[[Iterable[bool]], bool]) -> Predicate:
        """``operand`` (``word`` ``operand``)*, the parts combined by ``any``/``all``
        (short-circuit, left to right)."""
        parts = [operand()]
        while self.peek().text == word:
            self.take()
            parts.append(operand())
        return _chain(parts, combine is any)

    def not_(self) -> Predicate:
        if self.peek().text == "not":
            self.take()
            inner = self.not_()
            return lambda c: not inner(c)
        if self.peek().text == "(":
            self.take()
            inner = self.or_()
            self.expect(")")
            return inner
        return self.comparison()

    def field(self) -> tuple[FieldSpec, Getter]:
        token = self.take()
        if token.kind != "word" or token.text in _KEYWORDS:
            raise _error(token, "expected a field name, got")
        spec = _BY_NAME.get(token.text)
        if spec is None:
            near = difflib.get_close_matches(token.text, list(_BY_NAME), n=1)
            hint = f'; did you mean "{near[0]}"?' if near else ""
            raise UsageError(f'filter: unknown field "{token.text}" at {token.pos}{hint}')
        self.fields.add(spec.name)
        get = spec.get
        if self.peek().text == "[":
            if spec.kind != "bytes":
                raise _error(self.peek(), f"field {spec.name} cannot be sliced:")
            self.take()
            start = self.integer()
            self.expect(":")
            stop = self.integer()
            self.expect("]")
            def get_slice(c: Facts, whole: Getter = spec.get) -> bytes | None:
                data = whole(c)
                return None if data is None or len(data) < stop else data[start:stop]
            get = get_slice
        return spec, get

    def integer(self) -> int:
        token = self.take()
        if token.kind != "number" or "." in token.text:
            raise _error(token, "expected an integer, got")
        return int(token.text, 0)

    def comparison(self) -> Predicate:
        spec, get = self.field()
        token = self.peek()
        if token.kind == "op":
            self.take()
            return _compare(spec, get, token, self.value(spec))
        if token.text == "in":
            self.take()
            self.expect("{")
            values = [self.value(spec)]
            while self.peek().text == ",":
                self.take()
                values.append(self.value(spec))
            self.expect("}")
            return _member(spec, get, values)
        if token.text == "contains":
            self.take()
            return _contains(spec, get, token, self.value(spec))
        if token.text == "matches":
            self.take()
            return _matches(spec, get, token, self.take())
        if spec.kind == "bool":
            return lambda c: bool(get(c))
        raise _error(token, f"expected an operator after {spec.name}, got")

    def value(self, spec: FieldSpec) -> Any:
        token = self.take()
        if token.kind == "number":
            if spec.kind == "bytes":
                if not token.text.lower().startswith("0x"):
                    raise _error(token, f"{spec.name} compares with hex bytes (0x55aa), not")
                digits = token.text[2:]
                return bytes.fromhex(digits if len(digits) % 2 == 0 else "0" + digits)
            if spec.kind in ("text", "bool"):
                raise _error(token, f"{spec.name} compares with a name, not")
            return float(token.text) if "." in token.text else int(token.text, 0)
        if token.kind in ("word", "string") and token.text not in _KEYWORDS:
            text = token.text.strip('"') if token.kind == "string" else token.text
            if spec.kind == "name":
                assert spec.resolve is not None
                resolved = spec.resolve(text)
                if resolved is None:
                    raise _error(token, f"unknown {spec.name} name")
                return resolved
            if spec.kind == "bytes":
                return text.encode()
            if spec.kind == "time":
                return _wall_time(token, text)
            if spec.choices and text not in spec.choices:
                raise _error(token, f"{spec.name} is one of {', '.join(spec.choices)}, not")
            if spec.kind == "text":
                return text.lower() if spec.fold else text
            raise _error(token, f"{spec.name} compares with a number, not")
        raise _error(token, "expected a value, got")


def _wall_time(token: _Token, text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise _error(token, "time takes an ISO 8601 time (2026-11-25T09:22:57.2), not") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
    ">": operator.gt, ">=": operator.ge,
}


def _compare(spec: FieldSpec, get: Getter, op: _Token, want: Any) -> Predicate:
    if spec.kind in ("text", "bytes", "bool") and op.text not in ("==", "!="):
        raise _error(op, f"{spec.name} takes == != in contains matches, not")
    test = _OPS[op.text]
    fold = spec.fold
    negated = op.text == "!="

    def predicate(c: Facts) -> bool:
        got = get(c)
        if got is None:
            return False
        if got.__class__ is tuple:
            return want not in got if negated else any(test(g, want) for g in got)
        if fold and isinstance(got, str):
            got = got.lower()
        return test(got, want)
    return predicate


def _member(spec: FieldSpec, get: Getter, values: list[Any]) -> Predicate:
    """``field in {A, B}``: a set lookup (each value as ``==`` compares it)."""
    wants = frozenset(values)
    fold = spec.fold

    def predicate(c: Facts) -> bool:
        got = get(c)
        if got is None:
            return False
        if got.__class__ is tuple:
            return not wants.isdisjoint(got)
        if fold and isinstance(got, str):
            got = got.lower()
        return got in wants
    return predicate


def _contains(spec: FieldSpec, get: Getter, token: _Token, want: Any) -> Predicate:
    if spec.kind not in ("text", "bytes"):
        raise _error(token, f"{spec.name} is not text or bytes:")
    fold = spec.fold

    def predicate(c: Facts) -> bool:
        got = get(c)
        if got is None:
            return False
        if isinstance(got, tuple):
            return any(want in g for g in got)
        return bool(want in (got.lower() if fold else got))
    return predicate


def _matches(spec: FieldSpec, get: Getter, token: _Token, pattern: _Token) -> Predicate:
    if spec.kind not in ("text", "name"):
        raise _error(token, f"{spec.name} has no name to match:")
    if pattern.kind != "string":
        raise _error(pattern, 'matches takes a quoted regex ("^REGION"), not')
    try:
        regex = re.compile(pattern.text[1:-1], re.IGNORECASE if spec.fold else 0)
    except re.error as exc:
        raise UsageError(f"filter: bad regex {pattern.text} at {pattern.pos}: {exc}") from exc
    names = spec.names

    def predicate(c: Facts) -> bool:
        got = get(c)
        if got is None:
            return False
        texts = got if isinstance(got, tuple) else (names(got) if names else got,)
        return any(regex.search(t) for t in texts)
    return predicate


@attrs.frozen
class Filter:
    """A compiled filter expression. ``fields`` are the fields it uses."""

    source: str
    fields: frozenset[str]
    _predicate: Predicate

    def matches(self, message: DecodedMessage, *, session_start_ns: int = 0,
                step: str | None = None, header: TraceHeader | None = None) -> bool:
        """Whether ``message`` passes; ``session_start_ns`` anchors ``t``,
        ``header`` ``time`` (without it, ``time`` comparisons are false)."""
        return self._predicate(facts_of(message, session_start_ns=session_start_ns,
                                        step=step, header=header))

    def test(self, facts: Facts) -> bool:
        """Whether the message ``facts`` describe passes."""
        return self._predicate(facts)

    def on_observations(self, wall: Callable[[int], datetime] | None = None,
                        ) -> Callable[[int, Observation, int, int, int | None, int,
                                       tuple[Capability, ...]], bool]:
        """This filter as the proxy's live view asks it: ``accept(session,
        obs, t_ns, seq, latency_ns, session_start_ns, caps)``, the
        fds being the observed message's (counted, not inspected); ``wall``
        turns ``t_ns`` into wall-clock time for ``time``. Compile it with
        ``live=True``: ``step``, ``inject`` and ``fd.kind`` read false here."""
        predicate = self._predicate

        def accept(session: int, obs: Observation, t_ns: int, seq: int,
                   latency_ns: int | None, session_start_ns: int,
                   caps: tuple[Capability, ...]) -> bool:
            return predicate(Facts(seq, session, obs.direction, t_ns, obs.message.fds, obs,
                                   latency_ns, False, session_start_ns, None, wall, caps))
        return accept


def compile_filter(source: str, *, live: bool = False) -> Filter:
    """Parse ``source`` once; a bad one raises :class:`UsageError` naming
    the position and the token (and the nearest field for an unknown one).
    ``live``: for the proxy's live view, which refuses the fields it cannot
    know as messages pass (:attr:`FieldSpec.live`), naming why."""
    parser = _Parser(source)
    predicate = parser.parse()
    if live:
        for spec in FIELDS:
            if spec.name in parser.fields and spec.live:
                raise UsageError(f"filter: {spec.name} is not known as messages pass: "
                                 f"{spec.live}")
    return Filter(source, frozenset(parser.fields), predicate)


def _with_steps(items: Iterable[DecodedItem]) -> Iterator[tuple[DecodedItem, str | None]]:
    """``items`` in their order, each message with its step label.

    A label may depend on what follows it in its session, so a session's
    messages are held until it ends (its ``session_close``, the reader
    dropping its state from the window, or the end of the trace), and with
    them whatever follows its first held message: memory grows with what
    happens while the oldest open session goes on, not with the trace.
    """
    held: deque[DecodedItem] = deque()
    open_sessions: dict[int, list[DecodedMessage]] = {}
    steps: dict[int, str] = {}

    def label(session: int) -> None:
        for message, found in label_messages(open_sessions.pop(session, [])):
            steps[message.record.seq] = found.text()

    def release() -> Iterator[tuple[DecodedItem, str | None]]:
        while held:
            first = held[0]
            if isinstance(first, DecodedMessage):
                if first.record.session in open_sessions:
                    return
                yield held.popleft(), steps.pop(first.record.seq, None)
            else:
                yield held.popleft(), None

    for item in items:
        held.append(item)
        if isinstance(item, DecodedMessage):
            open_sessions.setdefault(item.record.session, []).append(item)
            continue
        ended = None
        if (isinstance(item, SessionNotice) and item.kind == "evicted") or (
                isinstance(item, EventRecord) and item.kind == EventKind.SESSION_CLOSE):
            ended = item.session
        if ended is not None:
            label(ended)
            yield from release()
    for session in list(open_sessions):
        label(session)
    yield from release()


def marked(items: Iterable[DecodedItem], flt: Filter | None,
           header: TraceHeader | None = None, *, steps: bool = False,
           ) -> Iterator[tuple[DecodedItem, Facts | None, bool]]:
    """Every item of ``items`` with its :class:`Facts` (None for what is not a
    decoded message) and whether ``flt`` passes it: every message passes
    without a filter, an event never does; ``header`` is the trace's, for
    ``time``. ``steps``: label every message with its step; a filter using
    ``step`` does too, holding a session's messages until the session ends:
    a label may depend on what follows it (:func:`_with_steps`)."""
    labelled: Iterable[tuple[DecodedItem, str | None]]
    if steps or (flt is not None and "step" in flt.fields):
        labelled = _with_steps(items)
    else:
        labelled = ((item, None) for item in items)
    starts: dict[int, int] = {}
    for item, step in labelled:
        if not isinstance(item, DecodedMessage):
            yield item, None, False
            continue
        start = starts.setdefault(item.record.session, item.record.t_ns)
        facts = facts_of(item, session_start_ns=start, step=step, header=header)
        yield item, facts, flt is None or flt.test(facts)


def select(items: Iterable[DecodedItem], flt: Filter | None, limit: int | None = None,
           header: TraceHeader | None = None) -> Iterator[DecodedItem]:
    """The messages of ``items`` that ``flt`` passes, at most ``limit`` of them;
    ``header`` is the trace's, for ``time``.

    Without a filter every item passes (``limit`` still counts messages
    only); the reader's notices (:class:`SessionNotice`) always do. A filter
    using ``step`` holds a session's messages until the session ends (:func:`marked`)."""
    return (item for item, _ in select_facts(items, flt, limit, header))


def select_facts(items: Iterable[DecodedItem], flt: Filter | None, limit: int | None = None,
                 header: TraceHeader | None = None, *, steps: bool = False,
                 ) -> Iterator[tuple[DecodedItem, Facts | None]]:
    """:func:`select`, each item with its :class:`Facts` (None for what is not
    a decoded message); ``steps`` as :func:`marked`."""
    if limit is not None and limit <= 0:
        return
    found = 0
    for item, facts, passed in marked(items, flt, header, steps=steps):
        if not isinstance(item, DecodedMessage):
            if flt is None or isinstance(item, SessionNotice):
                yield item, None
            continue
        if not passed:
            continue
        yield item, facts
        found += 1
        if found == limit:
            return


def values(facts: Facts, *, raw_bytes: bool = False,
           fields: Sequence[FieldSpec] = FIELDS) -> dict[str, Any]:
    """Every field of ``fields`` (default: :data:`FIELDS`) of one message, by
    name, as plain data: names for commands, regions and errnos, hex for
    bytes (``raw_bytes``: bytes left as they are, for a writer that writes
    their hex piece by piece or only part of it), ISO 8601 for ``time``,
    lists for ``fd.kind``, None for what the message lacks. What ``trace
    export`` writes (README: Exporting)."""
    return {spec.name: _plain(spec, spec.get(facts), raw_bytes) for spec in fields}


def _plain(spec: FieldSpec, value: Any, raw_bytes: bool) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, bytes):
        return value if raw_bytes else value.hex()
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, tuple):
        return list(value)
    if spec.names is not None and isinstance(value, int):
        return spec.names(value)
    return value
