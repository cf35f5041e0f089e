"""The trace records (header, message, event) and their wire form.

Each record class validates its fields when constructed, so a record object
is always a valid one, and converts to and from the plain dict that msgpack
stores: ``to_wire()`` and ``from_wire()`` (which turns a bad field into a
:class:`TraceFormatError` naming it). FORMAT.md is the reference for the keys.
"""

from __future__ import annotations

import enum
import importlib.metadata
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

import attrs

from recorder.errors import TraceFormatError, TraceLimitError
from recorder.limits import DEFAULT_LIMITS, ReaderLimits
from recorder.side import Direction

__all__ = [
    "FORMAT_MAGIC",
    "FORMAT_VERSION",
    "TOOL_VERSION",
    "EventKind",
    "EventRecord",
    "FdKind",
    "FdRecord",
    "InvalidField",
    "MessageRecord",
    "PlainMessagePacker",
    "Record",
    "TraceHeader",
    "bin_header",
    "data_depth",
    "event_wire",
    "message_wire",
]

FORMAT_MAGIC = "vfioproxy-trace"


def _tool_version() -> str:
    try:
        return importlib.metadata.version("vfioproxy")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


#: the version of vfioproxy writing (the distribution's, from pyproject.toml)
TOOL_VERSION = _tool_version()
#: (major, minor) of the format this code writes
FORMAT_VERSION = (1, 1)

SHA256_BYTES = 32


class InvalidField(ValueError):
    """A record was built with a bad value; ``field`` names the attribute."""

    def __init__(self, field: str, msg: str) -> None:
        super().__init__(f"{field}: {msg}")
        self.field = field
        self.msg = msg


class EventKind(enum.StrEnum):
    """The event kinds vfioproxy writes; readers accept any other string too."""

    SESSION_OPEN = "session_open"
    SESSION_CLOSE = "session_close"
    VIOLATION = "violation"
    DECODE_ERROR = "decode_error"
    INJECT = "inject"
    INTERPOSE = "interpose"
    RULES_CHANGED = "rules_changed"
    ERROR = "error"
    NOTE = "note"
    UNDELIVERED = "undelivered"
    FDS_DROPPED = "fds_dropped"
    QUEUE_FULL = "queue_full"
    DISK_FULL = "disk_full"
    RECORDING_RESUMED = "recording_resumed"
    VIOLATIONS_REPEATED = "violations_repeated"
    MERGED_FROM = "merged_from"
    IRQ = "irq"


# --- field validators (attrs signature: instance, attribute, value) ---------


def _show(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return f"{type(value).__name__} of length {len(value)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _uint(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if type(value) is not int or value < 0:
        raise InvalidField(attribute.name, f"expected a non-negative integer, got {_show(value)}")


def _opt_uint(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        _uint(instance, attribute, value)


def _text(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise InvalidField(attribute.name, f"expected a non-empty string, got {_show(value)}")


def _opt_text(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        _text(instance, attribute, value)


def _bytes(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if type(value) is not bytes:
        raise InvalidField(attribute.name, f"expected bytes, got {_show(value)}")


def _member(enum_type: type[enum.Enum]) -> Callable[[object, attrs.Attribute[Any], Any], None]:
    def check(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if type(value) is not enum_type:
            raise InvalidField(attribute.name, f"expected a {enum_type.__name__}, got {value!r}")

    return check


def _data(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    """A free-form map (event data, header info) must be storable as it is.

    Allowed: maps with string keys, lists and tuples (read back as lists),
    strings, bytes, integers, floats, booleans and None. Sizes and nesting
    are the reader's limits, which the writer checks on the packed record.
    """
    if not isinstance(value, dict):
        raise InvalidField(attribute.name, f"expected a map, got {_show(value)}")
    _check_value(value, attribute.name)


def _check_value(value: Any, where: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidField(where, f"map keys must be strings, got {_show(key)}")
            _check_value(item, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_value(item, f"{where}[{i}]")
    elif value is not None and type(value) not in (bool, int, float, str, bytes):
        raise InvalidField(where, f"cannot store a {type(value).__name__} in a trace")


# --- from_wire helpers -------------------------------------------------------


def _as_map(wire: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(wire, dict):
        raise TraceFormatError(f"{what} is a {type(wire).__name__}, expected a map")
    return wire


def _field_name(key: str, name: str) -> str:
    return key if key == name else f"{key} ({name})"


def _required(wire: Mapping[str, Any], key: str, name: str) -> Any:
    try:
        return wire[key]
    except KeyError:
        raise TraceFormatError("missing", field=_field_name(key, name)) from None


@contextmanager
def _fields(keys: Mapping[str, str]) -> Iterator[None]:
    """Turn an :class:`InvalidField` of a record being built into a format error."""
    try:
        yield
    except InvalidField as exc:
        top = exc.field.split(".", 1)[0].split("[", 1)[0]
        field = _field_name(keys[top], exc.field) if top in keys else exc.field
        raise TraceFormatError(exc.msg, field=field) from None


def _lookup(table: Mapping[str, Any], value: Any, key: str, name: str) -> Any:
    if type(value) is not str or value not in table:
        choices = " or ".join(repr(k) for k in table)
        raise TraceFormatError(
            f"expected {choices}, got {_show(value)}", field=_field_name(key, name)
        )
    return table[value]


# --- records -------------------------------------------------------------------


def _contents(instance: FdRecord, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    _bytes(instance, attribute, value)
    if instance.size is not None and len(value) != instance.size:
        raise InvalidField(
            attribute.name, f"holds {len(value)} bytes but the fd's size is {instance.size}"
        )


def _sha256(instance: FdRecord, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    _bytes(instance, attribute, value)
    if len(value) != SHA256_BYTES:
        raise InvalidField(attribute.name, f"expected {SHA256_BYTES} bytes, got {len(value)}")


class FdKind(enum.StrEnum):
    """What an fd refers to; the values are the strings written to trace files."""

    MEMFD = "memfd"
    EVENTFD = "eventfd"
    SOCKET = "socket"
    FILE = "file"
    OTHER = "other"


_FD_KINDS = {kind.value: kind for kind in FdKind}
_FD_KEYS = {
    "position": "i",
    "kind": "k",
    "size": "z",
    "flags": "f",
    "seals": "s",
    "inode": "n",
    "contents": "c",
    "sha256": "h",
}


@attrs.frozen
class FdRecord:
    """One fd a message carried. ``None`` means "not known" or "not recorded".

    ``position`` is its index in the message's SCM_RIGHTS array; ``size`` is
    ``st_size`` (memfds and files); ``flags`` is ``fcntl(F_GETFL)``; ``seals``
    is ``fcntl(F_GET_SEALS)`` (memfds); ``inode`` is ``st_ino``; ``contents``
    are the whole contents (small memfds only, so ``len(contents) == size``);
    ``sha256`` is the SHA-256 of the whole contents.
    """

    position: int = attrs.field(validator=_uint)
    kind: FdKind = attrs.field(validator=_member(FdKind))
    size: int | None = attrs.field(default=None, validator=_opt_uint)
    flags: int | None = attrs.field(default=None, validator=_opt_uint)
    seals: int | None = attrs.field(default=None, validator=_opt_uint)
    inode: int | None = attrs.field(default=None, validator=_opt_uint)
    contents: bytes | None = attrs.field(default=None, validator=_contents)
    sha256: bytes | None = attrs.field(default=None, validator=_sha256)

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"i": self.position, "k": self.kind.value}
        for name in ("size", "flags", "seals", "inode", "contents", "sha256"):
            value = getattr(self, name)
            if value is not None:
                wire[_FD_KEYS[name]] = value
        return wire

    @classmethod
    def from_wire(cls, wire: Any) -> FdRecord:
        w = _as_map(wire, "fd entry")
        kind = _lookup(_FD_KINDS, _required(w, "k", "kind"), "k", "kind")
        with _fields(_FD_KEYS):
            return cls(
                position=_required(w, "i", "position"),
                kind=kind,
                size=w.get("z"),
                flags=w.get("f"),
                seals=w.get("s"),
                inode=w.get("n"),
                contents=w.get("c"),
                sha256=w.get("h"),
            )


def _fd_tuple(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if type(value) is not tuple:
        raise InvalidField(attribute.name, f"expected a tuple of FdRecord, got {_show(value)}")
    previous = -1
    for i, fd in enumerate(value):
        if type(fd) is not FdRecord:
            raise InvalidField(f"{attribute.name}[{i}]", f"expected an FdRecord, got {_show(fd)}")
        if fd.position <= previous:
            raise InvalidField(
                f"{attribute.name}[{i}].position",
                f"positions must increase, got {fd.position} after {previous}",
            )
        previous = fd.position


_DIRECTIONS = {direction.value: direction for direction in Direction}
_DIRECTION_VALUES = {direction: direction.value for direction in Direction}
_MESSAGE_KEYS = {
    "seq": "q",
    "session": "s",
    "direction": "d",
    "t_ns": "t",
    "fds": "f",
    "data": "b",
    "length": "n",
    "torn": "x",
}
#: the value of ``x`` for a message its sender closed in the middle of
TORN = "eof"


def message_wire(
    seq: int,
    session: int,
    direction: Direction,
    t_ns: int,
    fds: Iterable[FdRecord] = (),
    *,
    length: int | None = None,
    torn: bool = False,
) -> dict[str, Any]:
    """The wire map of a message record without its bytes (``b``, which the
    caller adds last, FORMAT.md §4): the one place the map is built."""
    wire: dict[str, Any] = {
        "k": "m",
        "q": seq,
        "s": session,
        "d": _DIRECTION_VALUES[direction],
        "t": t_ns,
        "f": [fd.to_wire() for fd in fds] if fds else [],
    }
    if length is not None:
        wire["n"] = length
    if torn:
        wire["x"] = TORN
    return wire


def bin_header(length: int) -> bytes:
    """The msgpack ``bin`` header for ``length`` bytes (the shortest form)."""
    if length < 1 << 8:
        return bytes((0xC4, length))
    if length < 1 << 16:
        return b"\xc5" + length.to_bytes(2, "big")
    return b"\xc6" + length.to_bytes(4, "big")


class PlainMessagePacker:
    """Packs the records of one session's direction that carry no fds, no
    ``n`` and no ``x`` (nearly every message) straight to bytes: exactly
    what msgpack makes of :func:`message_wire` with ``b`` added (tested),
    without building the map. The parts that never change are packed once."""

    __slots__ = ("_middle", "_pack")

    _HEAD = b"\x87\xa1k\xa1m\xa1q"  # map of 7; "k": "m", "q":
    _TAIL = b"\xa1f\x90\xa1b"  # "f": [], "b":

    def __init__(self, packer: Any, session: int, direction: Direction) -> None:
        self._pack = packer.pack
        # "s": session, "d": direction, "t":
        self._middle = (b"\xa1s" + packer.pack(session) + b"\xa1d"
                        + packer.pack(_DIRECTION_VALUES[direction]) + b"\xa1t")

    def parts(self) -> tuple[bytes, bytes, bytes]:
        """What never changes, as the proxy's C lane takes it: the bytes before
        seq, those between seq and t, those between t and the bin of the data."""
        return self._HEAD, self._middle, self._TAIL

    def __call__(self, seq: int, t_ns: int, data: bytes) -> bytes:
        pack = self._pack
        return b"".join((self._HEAD, pack(seq), self._middle, pack(t_ns), self._TAIL,
                         bin_header(len(data)), data))


class EventPacker:
    """Packs the events of one session and kind whose data differ only in the
    integer entry ``field`` (fault injection's ``inject`` events while the
    same fixed delays apply to every message) straight to bytes: exactly what
    msgpack makes of :func:`event_wire` (tested), the parts that never change
    packed once. :meth:`parts` hands them to the proxy's C lane."""

    __slots__ = ("_after", "_before", "_head", "_middle", "_pack")

    def __init__(self, packer: Any, session: int, kind: str, data: dict[str, Any],
                 field: str) -> None:
        pack = packer.pack
        keys = list(data)
        at = keys.index(field)

        def entries(names: list[str]) -> bytes:
            return b"".join(pack(name) + pack(data[name]) for name in names)

        self._pack = pack
        # the keys in event_wire's order: k, q | s, t | e, a: {..., field | ...}
        self._head = packer.pack_map_header(6) + pack("k") + pack("e") + pack("q")
        self._middle = pack("s") + pack(session) + pack("t")
        self._before = (pack("e") + pack(kind) + pack("a") + packer.pack_map_header(len(keys))
                        + entries(keys[:at]) + pack(field))
        self._after = entries(keys[at + 1:])

    def parts(self) -> tuple[bytes, bytes, bytes, bytes]:
        """The bytes before seq, between seq and t, between t and the field's
        value, after it."""
        return self._head, self._middle, self._before, self._after

    def __call__(self, seq: int, t_ns: int, value: int) -> bytes:
        pack = self._pack
        return b"".join((self._head, pack(seq), self._middle, pack(t_ns), self._before,
                         pack(value), self._after))


def event_wire(
    seq: int, session: int | None, t_ns: int, kind: str, data: dict[str, Any]
) -> dict[str, Any]:
    """The wire map of an event record (FORMAT.md §6): the one place it is built."""
    return {"k": "e", "q": seq, "s": session, "t": t_ns, "e": kind, "a": data}


def rewritten(arrived: bytes, sent: bytes) -> dict[str, Any]:
    """The ``arrived`` map of an ``inject`` event (FORMAT.md §6) for a message the
    proxy rewrote: the span of the message record's bytes (``sent``, what the
    receiver got) that differed, as it arrived: ``offset``, ``length`` (of the
    span in ``sent``) and ``data`` (the bytes that stood there)."""
    end = min(len(arrived), len(sent))
    start = 0
    while start < end and arrived[start] == sent[start]:
        start += 1
    tail = 0
    while tail < end - start and arrived[-1 - tail] == sent[-1 - tail]:
        tail += 1
    return {"offset": start, "length": len(sent) - start - tail,
            "data": arrived[start:len(arrived) - tail]}


def arrived_bytes(sent: bytes, span: Any) -> bytes | None:
    """The message as it arrived, from its record's bytes and an ``arrived`` map
    (the inverse of :func:`rewritten`); None when ``span`` is not such a map."""
    if not isinstance(span, Mapping):
        return None
    offset, length, data = span.get("offset"), span.get("length"), span.get("data")
    if (not isinstance(offset, int) or not isinstance(length, int)
            or not isinstance(data, bytes) or not 0 <= offset <= offset + length <= len(sent)):
        return None
    return sent[:offset] + data + sent[offset + length:]


def data_depth(value: Any, limit: int) -> int:
    """How deep maps and lists nest in ``value`` (a scalar is 0), counting no
    further than ``limit`` + 1: enough to refuse what is too deep, cheaply."""
    kind = type(value)
    if kind is dict:
        items: Any = value.values()
    elif kind is list or kind is tuple:
        items = value
    else:
        return 0
    if limit <= 0:
        return 1
    deepest = 0
    for item in items:
        kind = type(item)
        if kind is dict or kind is list or kind is tuple:
            depth = data_depth(item, limit - 1)
            if depth > deepest:
                deepest = depth
    return 1 + deepest


def _length(instance: MessageRecord, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    _uint(instance, attribute, value)
    if value <= len(instance.data):
        raise InvalidField(
            attribute.name,
            f"is only given when the record holds fewer bytes than the message had on the "
            f"wire; got {value} for {len(instance.data)} recorded bytes",
        )


def _bool(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if type(value) is not bool:
        raise InvalidField(attribute.name, f"expected True or False, got {_show(value)}")


@attrs.frozen
class MessageRecord:
    """One vfio-user message exactly as it crossed the proxy.

    ``seq`` numbers the records of the file; ``t_ns`` is CLOCK_MONOTONIC on
    the recording host (the header's ``mono_ns`` anchors it to wall time).
    ``length`` is set when ``data`` holds only the first bytes of a message
    that had ``length`` bytes on the wire (too large to record whole);
    ``torn`` when the sender closed before finishing the message, so
    ``data`` is all that arrived (and all the receiver got, then EOF).
    """

    seq: int = attrs.field(validator=_uint)
    session: int = attrs.field(validator=_uint)
    direction: Direction = attrs.field(validator=_member(Direction))
    t_ns: int = attrs.field(validator=_uint)
    data: bytes = attrs.field(validator=_bytes)
    fds: tuple[FdRecord, ...] = attrs.field(default=(), validator=_fd_tuple)
    length: int | None = attrs.field(default=None, validator=_length)
    torn: bool = attrs.field(default=False, validator=_bool)

    @property
    def wire_length(self) -> int:
        """How many bytes of the message crossed the proxy."""
        return len(self.data) if self.length is None else self.length

    def to_wire(self) -> dict[str, Any]:
        wire = message_wire(
            self.seq, self.session, self.direction, self.t_ns, self.fds,
            length=self.length, torn=self.torn,
        )
        wire["b"] = self.data
        return wire

    @classmethod
    def from_wire(cls, wire: Any, *, limits: ReaderLimits = DEFAULT_LIMITS) -> MessageRecord:
        w = _as_map(wire, "message record")
        direction = _lookup(_DIRECTIONS, _required(w, "d", "direction"), "d", "direction")
        wire_fds = _required(w, "f", "fds")
        if not isinstance(wire_fds, list):
            raise TraceFormatError(f"expected an array, got {_show(wire_fds)}", field="f (fds)")
        if len(wire_fds) > limits.max_fds:
            raise TraceLimitError(
                f"{len(wire_fds)} fds exceed max_fds ({limits.max_fds})",
                limit="max_fds",
                field="f (fds)",
            )
        fds = []
        for i, fd in enumerate(wire_fds):
            try:
                fds.append(FdRecord.from_wire(fd))
            except TraceFormatError as exc:
                exc.field = f"f[{i}]" if exc.field is None else f"f[{i}].{exc.field}"
                raise
        torn = w.get("x")
        if torn is not None and torn != TORN:
            raise TraceFormatError(f"expected {TORN!r}, got {_show(torn)}", field="x (torn)")
        with _fields(_MESSAGE_KEYS):
            return cls(
                seq=_required(w, "q", "seq"),
                session=_required(w, "s", "session"),
                direction=direction,
                t_ns=_required(w, "t", "t_ns"),
                data=_required(w, "b", "data"),
                fds=tuple(fds),
                length=w.get("n"),
                torn=torn is not None,
            )


_EVENT_KEYS = {"seq": "q", "session": "s", "t_ns": "t", "kind": "e", "data": "a"}


@attrs.frozen
class EventRecord:
    """Something that happened besides a message: see :class:`EventKind`.

    ``session`` is ``None`` for proxy-wide events. ``data`` is a free-form map
    with string keys; FORMAT.md lists the keys of the known kinds.
    """

    seq: int = attrs.field(validator=_uint)
    session: int | None = attrs.field(validator=_opt_uint)
    t_ns: int = attrs.field(validator=_uint)
    kind: str = attrs.field(validator=_text)
    data: dict[str, Any] = attrs.field(factory=dict, validator=_data)

    def to_wire(self) -> dict[str, Any]:
        return event_wire(self.seq, self.session, self.t_ns, self.kind, self.data)

    @classmethod
    def from_wire(cls, wire: Any) -> EventRecord:
        w = _as_map(wire, "event record")
        with _fields(_EVENT_KEYS):
            return cls(
                seq=_required(w, "q", "seq"),
                session=_required(w, "s", "session"),
                t_ns=_required(w, "t", "t_ns"),
                kind=_required(w, "e", "kind"),
                data=_required(w, "a", "data"),
            )


Record: TypeAlias = MessageRecord | EventRecord


def _version(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if (
        type(value) is not tuple
        or len(value) != 2
        or any(type(part) is not int or part < 0 for part in value)
    ):
        raise InvalidField(attribute.name, f"expected (major, minor), got {_show(value)}")


def _utc(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, datetime) or value.utcoffset() != timedelta(0):
        raise InvalidField(attribute.name, f"expected a UTC datetime, got {_show(value)}")


def _byte_order(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value not in ("little", "big"):
        raise InvalidField(attribute.name, f"expected 'little' or 'big', got {_show(value)}")


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_HEADER_KEYS = {
    "version": "version",
    "tool": "tool",
    "tool_version": "tool_version",
    "created": "created",
    "mono_ns": "mono_ns",
    "host": "host",
    "byte_order": "byte_order",
    "source": "source",
    "info": "info",
}


@attrs.frozen
class TraceHeader:
    """The first record: what the file is and where and when it was recorded.

    ``created`` (UTC wall clock) and ``mono_ns`` (CLOCK_MONOTONIC) were read
    at the same moment, so a record's wall time is ``created + (t_ns -
    mono_ns)``; with ``host`` this lets traces of several hosts merge
    deterministically. ``info`` holds what the user told the recorder
    (socket paths, client/server descriptions, options).
    """

    created: datetime = attrs.field(validator=_utc)
    mono_ns: int = attrs.field(validator=_uint)
    source: str = attrs.field(validator=_text)
    host: str | None = attrs.field(default=None, validator=_opt_text)
    info: dict[str, Any] = attrs.field(factory=dict, validator=_data)
    tool: str = attrs.field(default="vfioproxy", validator=_text)
    tool_version: str = attrs.field(default=TOOL_VERSION, validator=_text)
    byte_order: str = attrs.field(default=sys.byteorder, validator=_byte_order)
    version: tuple[int, int] = attrs.field(default=FORMAT_VERSION, validator=_version)

    @classmethod
    def now(cls, source: str, info: dict[str, Any] | None = None) -> TraceHeader:
        """A header for a recording starting now on this host."""
        before = time.monotonic_ns()
        wall_ns = time.time_ns()
        after = time.monotonic_ns()
        return cls(
            created=_EPOCH + timedelta(microseconds=wall_ns // 1000),
            mono_ns=(before + after) // 2,
            source=source,
            host=socket.gethostname(),
            info={} if info is None else info,
        )

    def wall_time(self, t_ns: int) -> datetime:
        """The UTC wall-clock time of a record's monotonic ``t_ns``."""
        return self.created + timedelta(microseconds=(t_ns - self.mono_ns) // 1000)

    def wall_ns(self, t_ns: int) -> int:
        """A record's monotonic ``t_ns`` as ns since the Unix epoch (``created``,
        whole microseconds, plus ``t_ns - mono_ns``): the clock :meth:`wall_time`
        reads, without its rounding to microseconds."""
        return (self.created - _EPOCH) // timedelta(microseconds=1) * 1000 + t_ns - self.mono_ns

    def to_wire(self) -> dict[str, Any]:
        return {
            "magic": FORMAT_MAGIC,
            "version": list(self.version),
            "tool": self.tool,
            "tool_version": self.tool_version,
            "created": self.created.isoformat(),
            "mono_ns": self.mono_ns,
            "host": self.host,
            "byte_order": self.byte_order,
            "source": self.source,
            "info": self.info,
        }

    @classmethod
    def from_wire(cls, wire: Any) -> TraceHeader:
        w = _as_map(wire, "header")
        if w.get("magic") != FORMAT_MAGIC:
            raise TraceFormatError(f"not a vfioproxy trace (magic is {_show(w.get('magic'))})")
        version = _required(w, "version", "version")
        created = _required(w, "created", "created")
        try:
            created = datetime.fromisoformat(created)
        except (TypeError, ValueError):
            raise TraceFormatError(
                f"expected an ISO-8601 UTC time, got {_show(created)}", field="created"
            ) from None
        with _fields(_HEADER_KEYS):
            return cls(
                created=created,
                mono_ns=_required(w, "mono_ns", "mono_ns"),
                source=_required(w, "source", "source"),
                host=_required(w, "host", "host"),
                info=_required(w, "info", "info"),
                tool=_required(w, "tool", "tool"),
                tool_version=_required(w, "tool_version", "tool_version"),
                byte_order=_required(w, "byte_order", "byte_order"),
                version=tuple(version) if isinstance(version, list) else version,
            )
