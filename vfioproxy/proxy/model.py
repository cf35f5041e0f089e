"""What the proxy is made of: its options, limits and statistics."""

from __future__ import annotations

import resource

import attrs

from vfioproxy.interpose import InterposeOptions
from vfioproxy.protocol.codec import Dialects

__all__ = [
    "DEFAULT_GRACE",
    "DEFAULT_MAX_MESSAGE_BUFFER",
    "DEFAULT_MAX_QUEUE",
    "MAX_MESSAGE_BUFFER",
    "Counters",
    "DirectionStatistics",
    "ProxyOptions",
    "ProxyStatistics",
    "default_max_sessions",
]

#: how long in-flight messages may finish after a shutdown request (seconds)
DEFAULT_GRACE = 1.0
#: the largest message the proxy buffers whole (and records whole); larger ones
#: are handed on as they arrive and recorded truncated to this many bytes
DEFAULT_MAX_MESSAGE_BUFFER = 16 * 1024 * 1024
#: the largest --max-message-buffer: a record holds at most 80 MiB (FORMAT.md §10)
MAX_MESSAGE_BUFFER = 64 * 1024 * 1024
#: bytes queued for a peer that does not read before the proxy stops reading
#: from the other peer (per direction of each session)
DEFAULT_MAX_QUEUE = 4 * 1024 * 1024
#: seconds to keep trying a server whose listen queue is full
DEFAULT_CONNECT_TIMEOUT = 5.0
#: fds a session normally holds (its two sockets, a wake-up fd, a timer, a
#: message's fds in flight): what the default session cap budgets per session
FDS_PER_SESSION = 8
#: fds kept free for everything else (the listener, trace files, the control socket)
FDS_RESERVED = 64


def default_max_sessions() -> int:
    """The session cap that fits this process's fd limit (``RLIMIT_NOFILE``)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 4096
    return max(1, min(4096, (soft - FDS_RESERVED) // FDS_PER_SESSION))


def _positive(_: object, attribute: attrs.Attribute[int], value: int | None) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{attribute.name} must be positive, got {value}")


def _buffer(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not 16 <= value <= MAX_MESSAGE_BUFFER:
        raise ValueError(f"{attribute.name} must be 16..{MAX_MESSAGE_BUFFER} bytes, got {value}")


@attrs.frozen
class ProxyOptions:
    """How the proxy treats what passes through it.

    On the forwarding path the proxy frames, decides (fault injection),
    forwards and records the raw bytes; it decodes nothing else by default.
    ``strict`` (close a session at its first protocol violation),
    ``check_live`` (log and record violations as they happen) and an
    observer (the live view) decode and check each message on the path too;
    ``decode=False`` forbids that (a pure relay). ``capture_fd_contents``
    records the contents of memfds up to that many bytes; ``dialects``
    fixes the DMA layouts of the live decoding. ``threads`` forwards each
    session on a thread of its own (the fast path); without it on trio tasks
    (needed where forwarding must follow trio's clock). ``interpose``: the
    interposition modes that are on (:mod:`vfioproxy.interpose`: each session
    gets its own; recorded in its ``session_open``).

    Limits: ``max_sessions`` sessions at once (None: what the fd limit
    allows, :func:`default_max_sessions`; more clients wait in the listen
    queue); ``max_message_buffer`` bytes of one message buffered (larger
    ones are handed on as they arrive, recorded truncated);
    ``max_queue`` bytes queued per direction for a peer that does not read;
    ``connect_timeout`` seconds to retry a server whose listen queue is full.
    """

    strict: bool = False
    capture_fd_contents: int = 0
    dialects: Dialects | None = None
    decode: bool = True
    mode: int = 0o600
    threads: bool = True
    check_live: bool = False
    max_sessions: int | None = attrs.field(default=None, validator=_positive)
    max_message_buffer: int = attrs.field(default=DEFAULT_MAX_MESSAGE_BUFFER, validator=_buffer)
    max_queue: int = attrs.field(default=DEFAULT_MAX_QUEUE, validator=_positive)
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    interpose: InterposeOptions = attrs.field(factory=InterposeOptions)


@attrs.frozen
class DirectionStatistics:
    messages: int = 0
    bytes: int = 0
    fds: int = 0


@attrs.frozen
class ProxyStatistics:
    """A snapshot of what the proxy has done (see :meth:`Proxy.statistics`).

    ``violations`` counts what the live checks found (0 unless something on
    the path checks: ``strict``, ``check_live`` or the live view).
    """

    sessions_active: int
    sessions_total: int
    c2s: DirectionStatistics
    s2c: DirectionStatistics
    violations: int


@attrs.define
class Counters:
    messages: int = 0
    bytes: int = 0
    fds: int = 0

    def freeze(self) -> DirectionStatistics:
        return DirectionStatistics(self.messages, self.bytes, self.fds)

    def add(self, other: Counters) -> None:
        self.messages += other.messages
        self.bytes += other.bytes
        self.fds += other.fds
