"""The proxy: forward and record every vfio-user message between a client and a server.

:class:`Proxy` (:mod:`.core`) accepts clients and runs their sessions. Each
session's decisions and records are a :class:`~.ledger.SessionLedger` (no
I/O); its two sockets a :class:`~.relay.Relay` (the forwarding steps, over
:mod:`.wire`), driven by one thread (:mod:`.threaded`) or trio tasks
(:mod:`.tasks`). :mod:`.checks` holds the opt-in decoding on the path,
:mod:`.model` the options, limits and statistics.
"""

from vfioproxy.proxy.checks import MessageObserver
from vfioproxy.proxy.core import Proxy, open_proxy, serve_proxy
from vfioproxy.proxy.ledger import SessionLedger
from vfioproxy.proxy.model import (
    DEFAULT_GRACE,
    DEFAULT_MAX_MESSAGE_BUFFER,
    DEFAULT_MAX_QUEUE,
    DirectionStatistics,
    ProxyOptions,
    ProxyStatistics,
    default_max_sessions,
)

__all__ = [
    "DEFAULT_GRACE",
    "DEFAULT_MAX_MESSAGE_BUFFER",
    "DEFAULT_MAX_QUEUE",
    "DirectionStatistics",
    "MessageObserver",
    "Proxy",
    "ProxyOptions",
    "ProxyStatistics",
    "SessionLedger",
    "default_max_sessions",
    "open_proxy",
    "serve_proxy",
]
