"""What the proxy is made of: its options and statistics, a session, and the
small records its forwarding passes around."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sized
from typing import Any

import attrs
import trio

from vfioproxy.blocking_transport import BlockingFdSocket
from vfioproxy.fds import OwnedFd
from vfioproxy.protocol.codec import Dialects
from vfioproxy.protocol.session import Observation, SessionState
from vfioproxy.side import Direction
from vfioproxy.transport import FdStream

__all__ = [
    "DEFAULT_GRACE",
    "DRAIN_TIME",
    "DirectionStatistics",
    "MessageObserver",
    "ProxyOptions",
    "ProxySession",
    "ProxyStatistics",
]

#: how long in-flight messages may finish after a shutdown request (seconds)
DEFAULT_GRACE = 1.0
#: how long a session whose peer vanished keeps reading that peer's last messages
DRAIN_TIME = 1.0


@attrs.frozen
class ProxyOptions:
    """How the proxy treats what passes through it.

    ``strict`` closes a session at its first protocol violation;
    ``capture_fd_contents`` records the contents of memfds up to that many
    bytes; ``dialects`` fixes the DMA layouts used for decoding (else
    detected per session); ``decode`` may be turned off for a pure relay that
    neither records nor checks. ``threads`` forwards each direction on a
    thread of its own blocked in ``recvmsg`` (the fast path); without it the
    pumps are trio tasks (needed where forwarding must follow trio's clock).
    """

    strict: bool = False
    capture_fd_contents: int = 0
    dialects: Dialects | None = None
    decode: bool = True
    mode: int = 0o600
    threads: bool = True


@attrs.frozen
class DirectionStatistics:
    messages: int = 0
    bytes: int = 0
    fds: int = 0


@attrs.frozen
class ProxyStatistics:
    """A snapshot of what the proxy has done (see :meth:`Proxy.statistics`)."""

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

    def count(self, data: Sized, fds: Sized) -> None:
        """One more forwarded message: ``data`` its bytes, ``fds`` its fds."""
        self.messages += 1
        self.bytes += len(data)
        self.fds += len(fds)


class SessionEnd(Exception):
    """Internal: ends a session, saying who closed it and why.

    ``drain``: the peer this pump writes to is gone; the pump reading from
    that peer may still have its last messages to read (and record) before
    it meets EOF, so the session ends after a short drain instead of at once.
    """

    def __init__(self, closed_by: str, reason: str, *, drain: bool = False) -> None:
        super().__init__(reason)
        self.closed_by = closed_by
        self.reason = reason
        self.drain = drain


#: received messages not yet decoded and recorded, per session, beyond which the
#: forwarding thread stops to catch up (when the peers never leave it idle)
BACKLOG_LIMIT = 256

#: [direction, t_ns, bytes, fd records or the number of fds]: a list, so that
#: the forwarding thread can fill in the fd records after the send
Received = list[Any]

#: one end of a session: a trio stream, or a blocking socket for a forwarding thread
Endpoint = FdStream | BlockingFdSocket


@attrs.frozen
class Release:
    """A message waiting in a direction's release queue (fault injection).

    ``forwarded``: the sender's message (counted and digested once sent);
    otherwise an error reply the proxy makes up in place of the receiver.
    ``close_after``: the reason to end the session once it is sent.
    """

    at: float
    data: bytes
    fds: list[OwnedFd]
    forwarded: bool = True
    close_after: str | None = None


@attrs.frozen
class Injected:
    """What an injector's decision leaves to send: the message (None: not
    forwarded), an error reply for its sender, and why to close at once."""

    message: Release | None
    reply: Release | None
    close: str | None


@attrs.define(eq=False)
class ProxySession:
    """One client connection and its server connection.

    ``backlog`` holds received messages not yet decoded and recorded, in the
    order they were forwarded; the forwarding digests it after its sends, so
    the work follows the forward instead of delaying it.
    """

    id: int
    client: Endpoint
    server: Endpoint
    state: SessionState
    closed_by: str | None = None
    reason: str | None = None
    stopping: bool = False
    counters: dict[Direction, Counters] = attrs.field(
        factory=lambda: {Direction.C2S: Counters(), Direction.S2C: Counters()}
    )
    violations: int = 0
    backlog: deque[Received] = attrs.field(factory=deque)
    #: per direction, the release queue of an injecting proxy, how many
    #: messages it holds, and the lock of sending in that direction
    releases: dict[Direction, trio.MemorySendChannel[Release]] = attrs.field(factory=dict)
    held: dict[Direction, int] = attrs.field(
        factory=lambda: {Direction.C2S: 0, Direction.S2C: 0}
    )
    sending: dict[Direction, trio.Lock] = attrs.field(
        factory=lambda: {Direction.C2S: trio.Lock(), Direction.S2C: trio.Lock()}
    )

    def end(self, closed_by: str, reason: str) -> None:
        """Say who ended the session and why (the first to say it wins)."""
        if self.closed_by is None:
            self.closed_by, self.reason = closed_by, reason


MessageObserver = Callable[[ProxySession, Observation, int], None]
