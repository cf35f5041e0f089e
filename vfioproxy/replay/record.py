"""Recording a session to replay later: a client run against a server through the proxy.

:func:`record_session` starts a recording proxy (:func:`vfioproxy.proxy.open_proxy`
with a :class:`~recorder.sink.TraceSink`) in front of a live server, runs a
client against the proxy, waits for the session to end and leaves the trace.
The default client is the reference realize client
(:func:`vfioproxy.peers.client.realize`: QEMU 10.2's realize and reset).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from recorder.sink import TraceSink
from vfioproxy.peers.client import RealizeOptions, realize
from vfioproxy.proxy import ProxyOptions, open_proxy

__all__ = ["ClientRun", "realize_client", "record_session"]

#: runs a client against the socket path it is given
ClientRun = Callable[[str], Awaitable[Any]]

#: how long the proxy may take to see the session end after the client returned
SESSION_END_TIMEOUT = 5.0


def realize_client(options: RealizeOptions | None = None) -> ClientRun:
    """The reference realize client with ``options``, as a :data:`ClientRun`."""

    async def run(path: str) -> Any:
        return await realize(path, options or RealizeOptions())

    return run


async def record_session(
    trace: str | os.PathLike[str],
    server: str | os.PathLike[str],
    client: ClientRun | None = None,
    *,
    info: dict[str, Any] | None = None,
    capture_fd_contents: int = 0,
) -> Path:
    """Record ``client`` (default: the realize client) talking to ``server`` into ``trace``.

    ``trace`` is replaced if it exists. ``info`` goes into the trace header;
    ``capture_fd_contents`` records the contents of memfds up to that size.
    Whatever the client raises propagates (the partial trace stays).
    Cancellation stops the client and the proxy.
    """
    target = Path(trace)
    run = client or realize_client()
    header = {"server_path": os.fspath(server), "recorded_by": "vfioproxy.replay.record",
              **(info or {})}
    with tempfile.TemporaryDirectory(prefix="vfioproxy-record-") as tmp:
        listen = Path(tmp) / "proxy.sock"
        with TraceSink(target, info=header, overwrite=True) as sink:
            options = ProxyOptions(capture_fd_contents=capture_fd_contents)
            async with open_proxy(listen, server, sink=sink, options=options) as proxy:
                await run(str(listen))
                with trio.fail_after(SESSION_END_TIMEOUT):
                    await proxy.wait_sessions()
    return target
