"""The proxy: forward every vfio-user message between a client and a server.

For each client that connects to the listening socket, the proxy connects
to the server and runs a session: one task per direction, each reading one
whole message with its fds, forwarding it byte-exact in one ``sendmsg``, and
only then decoding and recording it (the peers' own think time hides that
work) and closing the proxy's copies of the fds. Messages are never
reordered, merged or split. Bad input is forwarded the way the receiver will
frame it and recorded as a violation; a session is closed only when framing
is really lost (EOF mid-message), when one side leaves, or with ``strict``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from recorder.fdmeta import fd_record
from recorder.records import FdRecord
from recorder.sink import TraceSink
from vfioproxy.errors import ConnectionClosedError, TransportError
from vfioproxy.fds import FdKind, OwnedFd, inspect_fd
from vfioproxy.protocol.bodies import VersionBody
from vfioproxy.protocol.codec import Dialects, decode
from vfioproxy.protocol.header import Command
from vfioproxy.protocol.session import Observation, SessionState
from vfioproxy.side import Direction
from vfioproxy.transport import FdStream, open_unix_fd_stream
from vfioproxy.unix import open_unix_listener

log = logging.getLogger(__name__)

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
    neither records nor checks.
    """

    strict: bool = False
    capture_fd_contents: int = 0
    dialects: Dialects | None = None
    decode: bool = True
    mode: int = 0o600


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
class _Counters:
    messages: int = 0
    bytes: int = 0
    fds: int = 0

    def freeze(self) -> DirectionStatistics:
        return DirectionStatistics(self.messages, self.bytes, self.fds)


class _SessionEnd(Exception):
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


#: forwarded messages waiting to be decoded and recorded, per session, before a
#: pump stops to catch up itself (keeps memory bounded when peers outrun us)
BACKLOG_LIMIT = 256

#: (direction, t_ns, bytes, fd records or the number of fds)
_Forwarded = tuple[Direction, int, bytes, list[FdRecord] | int]


@attrs.define
class ProxySession:
    """One client connection and its server connection.

    ``backlog`` holds forwarded messages not yet decoded and recorded: the
    pumps forward first and leave that work to the session's digest task,
    which runs while the peers think.
    """

    id: int
    client: FdStream
    server: FdStream
    state: SessionState
    closed_by: str | None = None
    reason: str | None = None
    backlog: deque[_Forwarded] = attrs.field(factory=deque)
    has_backlog: trio.Event = attrs.field(factory=trio.Event)


MessageObserver = Callable[[ProxySession, Observation, int], None]


class Proxy:
    """Relays sessions from clients on a listener to ``server_path``.

    ``sink`` records every session (None: record nothing); ``observer`` is
    called after each forwarded message with its decoding (the live view).
    """

    def __init__(
        self,
        server_path: str | os.PathLike[str],
        *,
        sink: TraceSink | None = None,
        options: ProxyOptions = ProxyOptions(),
        observer: MessageObserver | None = None,
    ) -> None:
        self.server_path = os.fspath(server_path)
        self.sink = sink
        self.options = options
        self.observer = observer
        self.sessions: dict[int, ProxySession] = {}
        self._next_session = 1
        self._counters = {Direction.C2S: _Counters(), Direction.S2C: _Counters()}
        self._violations = 0
        self._accepting: trio.CancelScope | None = None
        self._starting = 0  # accepted, not yet in self.sessions or ended
        self._sessions_done = trio.Event()
        self._sessions_done.set()

    def statistics(self) -> ProxyStatistics:
        return ProxyStatistics(
            sessions_active=len(self.sessions),
            sessions_total=self._next_session - 1,
            c2s=self._counters[Direction.C2S].freeze(),
            s2c=self._counters[Direction.S2C].freeze(),
            violations=self._violations,
        )

    # ------------------------------------------------------------- serving

    async def serve(
        self,
        listener: trio.SocketListener,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept clients until :meth:`stop_accepting` (or cancellation); returns
        once every session has ended. Cancellation ends all sessions at once."""
        async with trio.open_nursery() as nursery:
            try:
                with trio.CancelScope() as accepting:
                    self._accepting = accepting
                    task_status.started()
                    while True:
                        stream = await listener.accept()
                        self._starting += 1
                        self._sessions_done = trio.Event()
                        nursery.start_soon(self._run_session, stream.socket)
            finally:
                await listener.aclose()

    def stop_accepting(self) -> None:
        """Stop taking new clients; running sessions go on."""
        if self._accepting is not None:
            self._accepting.cancel()

    async def wait_sessions(self) -> None:
        """Return once no session is running (accepted clients count as running)."""
        await self._sessions_done.wait()

    async def shutdown(self, grace: float = DEFAULT_GRACE) -> None:
        """Stop accepting, give running sessions ``grace`` seconds to end on their own."""
        self.stop_accepting()
        with trio.move_on_after(grace):
            await self.wait_sessions()

    # ------------------------------------------------------------- one session

    async def _run_session(self, sock: trio.socket.SocketType) -> None:
        client = FdStream(sock)
        sid = self._next_session
        self._next_session += 1
        self._starting -= 1
        t_open = time.monotonic_ns()
        try:
            server = await open_unix_fd_stream(self.server_path)
        except OSError as exc:
            log.error("session %d: cannot connect to the server %s: %s", sid,
                      self.server_path, exc)
            self._event(sid, "session_open", t_open, self._open_info())
            self._event(sid, "error", time.monotonic_ns(),
                        {"text": f"cannot connect to the server {self.server_path}: {exc}"})
            self._event(sid, "session_close", time.monotonic_ns(),
                        {"closed_by": "proxy", "reason": f"server unreachable: {exc}"})
            await client.aclose()
            self._session_done(sid)
            return
        session = ProxySession(sid, client, server, SessionState(
            dialects=self.options.dialects, strict=self.options.strict))
        self.sessions[sid] = session
        self._event(sid, "session_open", t_open, self._open_info())
        log.info("session %d: opened", sid)
        try:
            async with trio.open_nursery() as nursery:
                for direction, src, dst in (
                    (Direction.C2S, client, server),
                    (Direction.S2C, server, client),
                ):
                    nursery.start_soon(self._pump_until_end, session, direction, src, dst,
                                       nursery)
                nursery.start_soon(self._digest_until_end, session, nursery)
        finally:
            with trio.CancelScope(shield=True):
                await client.aclose()
                await server.aclose()
            self._digest_backlog(session)
            if session.closed_by is None:
                session.closed_by, session.reason = "proxy", "proxy shut down"
            self._event(sid, "session_close", time.monotonic_ns(),
                        {"closed_by": session.closed_by, "reason": session.reason})
            log.info("session %d: closed by %s (%s)", sid, session.closed_by, session.reason)
            del self.sessions[sid]
            self._session_done(sid)

    def _session_done(self, sid: int) -> None:
        if self.sink is not None:
            self.sink.session_done(sid)
        if not self.sessions and not self._starting:
            self._sessions_done.set()

    def _open_info(self) -> dict[str, Any]:
        return {"server_path": self.server_path, "wall": time.time()}

    async def _pump_until_end(
        self,
        session: ProxySession,
        direction: Direction,
        src: FdStream,
        dst: FdStream,
        nursery: trio.Nursery,
    ) -> None:
        try:
            await self._pump(session, direction, src, dst, nursery)
        except _SessionEnd as end:
            if session.closed_by is None:
                session.closed_by, session.reason = end.closed_by, end.reason
            if end.drain:
                scope = nursery.cancel_scope
                scope.deadline = min(scope.deadline, trio.current_time() + DRAIN_TIME)
            else:
                nursery.cancel_scope.cancel()

    async def _pump(
        self,
        session: ProxySession,
        direction: Direction,
        src: FdStream,
        dst: FdStream,
        nursery: trio.Nursery,
    ) -> None:
        """Forward ``src`` to ``dst`` message by message until the session ends."""
        counters = self._counters[direction]
        sender = direction.sender.value
        receiver = direction.receiver.value
        decode = self.options.decode
        while True:
            try:
                data, fds = await src.receive_message(session.state.max_message_size())
            except ConnectionClosedError as exc:
                if exc.mid_message:
                    await self._forward_torn(session, direction, dst, exc)
                    raise _SessionEnd(sender, f"EOF mid-message ({exc})") from exc
                raise _SessionEnd(sender, "EOF") from exc
            except TransportError as exc:
                raise _SessionEnd("proxy", f"receiving from the {sender} failed: {exc}") from exc
            t_ns = time.monotonic_ns()
            try:
                if fds and direction is Direction.S2C and data[2] == Command.VERSION:
                    self._substitute_twin_socket(session, data, fds, nursery)
                try:
                    await dst.send_message(data, fds)
                except ConnectionClosedError as exc:
                    raise _SessionEnd(
                        receiver, f"EOF while forwarding ({exc})", drain=True
                    ) from exc
                except (TransportError, OSError) as exc:
                    raise _SessionEnd(
                        "proxy", f"forwarding to the {receiver} failed: {exc}"
                    ) from exc
                counters.messages += 1
                counters.bytes += len(data)
                counters.fds += len(fds)
                if decode:
                    self._queue_forwarded(session, direction, t_ns, data, fds)
            finally:
                for fd in fds:
                    fd.close()

    async def _forward_torn(
        self,
        session: ProxySession,
        direction: Direction,
        dst: FdStream,
        exc: ConnectionClosedError,
    ) -> None:
        """The sender left in the middle of a message: hand the receiver the
        bytes that did arrive (it then sees the same torn stream it would have
        seen directly) and record them, before the session ends."""
        sender = direction.sender.value
        self._digest_backlog(session)
        self._event(session.id, "error", time.monotonic_ns(), {
            "text": f"{sender} closed in the middle of a message: framing lost",
            "side": sender,
            "direction": direction.value,
            "received": exc.received,
            "partial": exc.partial,
        })
        log.warning("session %d: %s closed after %d bytes of a message", session.id, sender,
                    exc.received)
        if exc.partial:
            with contextlib.suppress(TransportError, OSError):
                await dst.send_message(exc.partial)

    def _substitute_twin_socket(
        self, session: ProxySession, data: bytes, fds: list[OwnedFd], nursery: trio.Nursery
    ) -> None:
        """Give the client a proxy-owned twin socket and relay it to the server's.

        A VERSION reply that enables ``twin_socket`` carries the client's end
        of a socketpair to the server at ``fd_index``. The proxy keeps that fd,
        sends the client one end of a socketpair of its own in its place (same
        position, so the bytes stay unchanged) and relays between the two as a
        session of its own (``twin_of`` in its session_open event).
        """
        reply = decode(data, fds)
        body = reply.body
        caps = body.capabilities if isinstance(body, VersionBody) else None
        twin = None if caps is None else caps.twin_socket
        if twin is None or not twin.supported or twin.fd_index is None:
            return
        index = twin.fd_index
        if not 0 <= index < len(fds) or inspect_fd(fds[index]).kind is not FdKind.SOCKET:
            return  # inconsistent: forwarded as it is, the client will refuse it
        server_end = FdStream(trio.socket.from_stdlib_socket(
            socket.socket(fileno=fds[index].detach())))
        client_end, proxy_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds[index] = OwnedFd(client_end.detach())
        twin_stream = FdStream(trio.socket.from_stdlib_socket(proxy_end))
        twin_id = self._next_session
        self._next_session += 1
        twin_session = ProxySession(twin_id, twin_stream, server_end, SessionState(
            dialects=session.state.dialects, strict=self.options.strict))
        self.sessions[twin_id] = twin_session
        now = time.monotonic_ns()
        self._event(session.id, "note", now, {"text": f"twin socket relayed as session {twin_id}"})
        self._event(twin_id, "session_open", now, {**self._open_info(), "twin_of": session.id})
        nursery.start_soon(self._run_twin, session, twin_session, nursery)

    async def _run_twin(
        self, main: ProxySession, twin: ProxySession, nursery: trio.Nursery
    ) -> None:
        try:
            async with trio.open_nursery() as twin_nursery:
                for direction, src, dst in (
                    (Direction.C2S, twin.client, twin.server),
                    (Direction.S2C, twin.server, twin.client),
                ):
                    twin_nursery.start_soon(self._pump_until_end, twin, direction, src, dst,
                                            twin_nursery)
                twin_nursery.start_soon(self._digest_until_end, twin, twin_nursery)
        finally:
            with trio.CancelScope(shield=True):
                await twin.client.aclose()
                await twin.server.aclose()
            self._digest_backlog(twin)
            if twin.closed_by is None:
                twin.closed_by, twin.reason = "proxy", f"session {main.id} ended"
            self._event(twin.id, "session_close", time.monotonic_ns(),
                        {"closed_by": twin.closed_by, "reason": twin.reason})
            del self.sessions[twin.id]
            if self.sink is not None:
                self.sink.session_done(twin.id)

    def _queue_forwarded(
        self,
        session: ProxySession,
        direction: Direction,
        t_ns: int,
        data: bytes,
        fds: list[OwnedFd],
    ) -> None:
        """Leave a forwarded message to the digest task (fd metadata is taken
        now, while the fds are still open)."""
        fd_info: list[FdRecord] | int = len(fds)
        if fds and self.sink is not None:
            limit = self.options.capture_fd_contents
            fd_info = [fd_record(fd, i, contents_limit=limit) for i, fd in enumerate(fds)]
        session.backlog.append((direction, t_ns, data, fd_info))
        session.has_backlog.set()
        if len(session.backlog) > BACKLOG_LIMIT:
            self._digest_backlog(session, raise_strict=True)

    async def _digest_until_end(self, session: ProxySession, nursery: trio.Nursery) -> None:
        """Decode and record forwarded messages one at a time, yielding to the
        pumps between them, until the session ends."""
        try:
            while True:
                await session.has_backlog.wait()
                while session.backlog:
                    self._digest(session, *session.backlog.popleft())
                    await trio.lowlevel.checkpoint()
                session.has_backlog = trio.Event()
        except _SessionEnd as end:
            if session.closed_by is None:
                session.closed_by, session.reason = end.closed_by, end.reason
            nursery.cancel_scope.cancel()

    def _digest_backlog(self, session: ProxySession, *, raise_strict: bool = False) -> None:
        """Digest everything queued now (at session end, or to catch up)."""
        while session.backlog:
            try:
                self._digest(session, *session.backlog.popleft())
            except _SessionEnd:
                if raise_strict:
                    raise

    def _digest(
        self,
        session: ProxySession,
        direction: Direction,
        t_ns: int,
        data: bytes,
        fd_info: list[FdRecord] | int,
    ) -> None:
        """Decode, record and check one forwarded message."""
        # the session state only counts fds: records, or placeholders when not recording
        if isinstance(fd_info, list):
            fd_records: list[FdRecord] = fd_info
            fds: Sequence[object] = fd_info
        else:
            fd_records, fds = [], range(fd_info)
        state = session.state
        strict, state.strict = state.strict, False  # record first, then enforce
        try:
            obs = state.observe(direction, data, fds)
        finally:
            state.strict = strict
        if self.sink is not None:
            self.sink.writer_for(session.id).write_message(
                session.id, direction, t_ns, data, fd_records
            )
        for violation in obs.violations:
            self._violations += 1
            log.warning("session %d: %s", session.id, violation)
            self._event(session.id, "violation", t_ns, violation.to_dict())
        if self.observer is not None:
            self.observer(session, obs, t_ns)
        if strict and obs.violations:
            raise _SessionEnd("proxy", f"strict: {obs.violations[0]}")

    def _event(self, sid: int | None, kind: str, t_ns: int, data: dict[str, Any]) -> None:
        if self.sink is not None:
            target = self.sink.writer_for(sid) if sid is not None else self.sink.shared_writer()
            if target is not None:
                target.write_event(sid, kind, t_ns, data)


@asynccontextmanager
async def open_proxy(
    listen_path: str | os.PathLike[str],
    server_path: str | os.PathLike[str],
    *,
    sink: TraceSink | None = None,
    options: ProxyOptions = ProxyOptions(),
    observer: MessageObserver | None = None,
) -> AsyncIterator[Proxy]:
    """A running proxy on ``listen_path`` for the body of the ``async with``.

    On exit it stops accepting and cancels the sessions still running.
    """
    proxy = Proxy(server_path, sink=sink, options=options, observer=observer)
    listener = await open_unix_listener(listen_path, mode=options.mode)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve, listener)
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()


async def serve_proxy(
    listen_path: str | os.PathLike[str],
    server_path: str | os.PathLike[str],
    *,
    sink: TraceSink | None = None,
    options: ProxyOptions = ProxyOptions(),
    observer: MessageObserver | None = None,
    task_status: trio.TaskStatus[Proxy] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a proxy on ``listen_path`` until cancelled (``task_status`` gets the Proxy)."""
    proxy = Proxy(server_path, sink=sink, options=options, observer=observer)
    listener = await open_unix_listener(listen_path, mode=options.mode)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve, listener)
        task_status.started(proxy)


__all__ = [
    "DirectionStatistics",
    "Proxy",
    "ProxyOptions",
    "ProxySession",
    "ProxyStatistics",
    "open_proxy",
    "serve_proxy",
]
