"""The proxy: forward and record every vfio-user message between a client and a server.

:class:`Proxy` (:mod:`.core`) runs the sessions, on threads
(:mod:`.session_thread`) or trio tasks; :mod:`.model` holds its options,
statistics and session records.
"""

from vfioproxy.proxy.core import MessageObserver, Proxy, open_proxy, serve_proxy
from vfioproxy.proxy.model import (
    BACKLOG_LIMIT,
    DEFAULT_GRACE,
    DRAIN_TIME,
    DirectionStatistics,
    ProxyOptions,
    ProxySession,
    ProxyStatistics,
)

__all__ = [
    "BACKLOG_LIMIT",
    "DEFAULT_GRACE",
    "DRAIN_TIME",
    "DirectionStatistics",
    "MessageObserver",
    "Proxy",
    "ProxyOptions",
    "ProxySession",
    "ProxyStatistics",
    "open_proxy",
    "serve_proxy",
]
