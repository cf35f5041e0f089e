"""The proxy: forward every vfio-user message between a client and a server.

For each client that connects to the listening socket, the proxy connects
to the server and runs a session: by default on one thread of its own
(:mod:`vfioproxy.proxy.session_thread`), or on trio tasks, one per
direction. A message is read whole with its fds, forwarded byte-exact in
one ``sendmsg``, and only then decoded and recorded (while the peers think)
and the proxy's copies of the fds closed. Messages are never reordered,
merged or split. Bad input is forwarded the way the receiver will frame it
and recorded as a violation; a session is closed only when framing is
really lost (EOF mid-message), when one side leaves, or with ``strict``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from recorder.fdmeta import fd_record
from recorder.records import FdRecord
from recorder.sink import TraceSink
from vfioproxy.blocking_transport import BlockingFdSocket
from vfioproxy.errors import ConnectionClosedError, TransportError
from vfioproxy.fds import FdKind, OwnedFd, inspect_fd
from vfioproxy.inject import Injector
from vfioproxy.protocol.bodies import VersionBody
from vfioproxy.protocol.codec import decode
from vfioproxy.protocol.header import Command
from vfioproxy.protocol.session import SessionState
from vfioproxy.proxy.model import (
    DEFAULT_GRACE,
    DRAIN_TIME,
    Counters,
    Endpoint,
    Injected,
    MessageObserver,
    ProxyOptions,
    ProxySession,
    ProxyStatistics,
    Received,
    Release,
    SessionEnd,
)
from vfioproxy.proxy.session_thread import SessionThread
from vfioproxy.side import Direction
from vfioproxy.timer import PreciseSleeper
from vfioproxy.transport import FdStream
from vfioproxy.unix import open_unix_listener

log = logging.getLogger(__name__)

__all__ = ["MessageObserver", "Proxy", "open_proxy", "serve_proxy"]

class Proxy:
    """Relays sessions from clients on a listener to ``server_path``.

    ``sink`` records every session (None: record nothing); ``observer`` is
    called after each forwarded message with its decoding (the live view;
    with threaded forwarding it is called from a forwarding thread).
    ``injector`` injects faults (delays, errors, drops...): on the session
    threads against the monotonic clock, or, with ``options.threads`` off,
    on trio tasks against trio's clock (a ``MockClock`` in tests).
    """

    def __init__(
        self,
        server_path: str | os.PathLike[str],
        *,
        sink: TraceSink | None = None,
        options: ProxyOptions = ProxyOptions(),
        observer: MessageObserver | None = None,
        injector: Injector | None = None,
    ) -> None:
        self.server_path = os.fspath(server_path)
        self.sink = sink
        self.options = options
        self.observer = observer
        self.injector = injector
        self._threaded = options.threads
        self.sessions: dict[int, ProxySession] = {}
        self._next_session = 1
        self._ended = {Direction.C2S: Counters(), Direction.S2C: Counters()}
        self._ended_violations = 0
        self._accepting: trio.CancelScope | None = None
        self._starting = 0  # accepted, not yet in self.sessions or ended
        self._sessions_done = trio.Event()
        self._sessions_done.set()
        self._threads = trio.CapacityLimiter(math.inf)

    def statistics(self) -> ProxyStatistics:
        sessions = list(self.sessions.values())
        totals = {}
        for direction, ended in self._ended.items():
            total = Counters(ended.messages, ended.bytes, ended.fds)
            for session in sessions:
                total.add(session.counters[direction])
            totals[direction] = total.freeze()
        return ProxyStatistics(
            sessions_active=len(sessions),
            sessions_total=self._next_session - 1,
            c2s=totals[Direction.C2S],
            s2c=totals[Direction.S2C],
            violations=self._ended_violations + sum(s.violations for s in sessions),
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

    def _endpoint(self, sock: trio.socket.SocketType | socket.socket) -> Endpoint:
        """Wrap a connected socket for the way this proxy forwards."""
        if self._threaded:
            if isinstance(sock, socket.socket):
                return BlockingFdSocket(sock)
            return BlockingFdSocket(socket.socket(fileno=sock.detach()))
        if isinstance(sock, socket.socket):
            sock = trio.socket.from_stdlib_socket(sock)
        return FdStream(sock)

    async def _run_session(self, sock: trio.socket.SocketType) -> None:
        sid = self._next_session
        self._next_session += 1
        self._starting -= 1
        t_open = time.monotonic_ns()
        try:
            server_sock = await self._connect_server()
        except OSError as exc:
            log.error("session %d: cannot connect to the server %s: %s", sid,
                      self.server_path, exc)
            self._event(sid, "session_open", t_open, self._open_info())
            self._event(sid, "error", time.monotonic_ns(),
                        {"text": f"cannot connect to the server {self.server_path}: {exc}"})
            self._event(sid, "session_close", time.monotonic_ns(),
                        {"closed_by": "proxy", "reason": f"server unreachable: {exc}"})
            sock.close()
            self._session_done(sid)
            return
        session = ProxySession(
            sid, self._endpoint(sock), self._endpoint(server_sock),
            # not strict: the proxy records a message before it enforces (see _digest)
            SessionState(dialects=self.options.dialects),
        )
        self.sessions[sid] = session
        self._event(sid, "session_open", t_open, self._open_info())
        log.info("session %d: opened", sid)
        try:
            await self._relay(session)
        finally:
            self._end_session(session, "proxy shut down")
            log.info("session %d: closed by %s (%s)", sid, session.closed_by, session.reason)
            self._session_done(sid)

    async def _connect_server(self) -> socket.socket:
        """A socket connected to the server. An AF_UNIX connect to a listening
        socket completes at once unless its backlog is full: try that without
        yielding to trio (each yield is a pass of its run loop before the first
        message can move), wait only if the kernel says so."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            try:
                sock.connect(self.server_path)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err)) from None
        except BaseException:
            sock.close()
            raise
        return sock

    async def _relay(self, session: ProxySession) -> None:
        """Run both directions of ``session`` until it ends, then close its sockets."""
        queues = []
        try:
            async with trio.open_nursery() as nursery:
                if self._threaded:
                    nursery.start_soon(self._stop_threads_on_cancel, session)
                    # in this task: a task of its own would start a run-loop pass later
                    await self._until_end(session, nursery, self._run_thread, session, nursery)
                    return
                for direction, src, dst in (
                    (Direction.C2S, session.client, session.server),
                    (Direction.S2C, session.server, session.client),
                ):
                    assert isinstance(src, FdStream) and isinstance(dst, FdStream)
                    if self.injector is not None:
                        send, receive = trio.open_memory_channel[Release](math.inf)
                        session.releases[direction] = send
                        queues.append(receive)
                        nursery.start_soon(self._until_end, session, nursery, self._release,
                                           session, direction, dst, receive)
                    nursery.start_soon(self._until_end, session, nursery, self._pump,
                                       session, direction, src, dst, nursery)
        finally:
            for queue in queues:  # what was still held back is not sent: its fds go
                while True:
                    try:
                        held = queue.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    for fd in held.fds:
                        fd.close()
            for end in (session.client, session.server):
                if isinstance(end, FdStream):
                    with trio.CancelScope(shield=True):
                        await end.aclose()
                else:
                    end.close()

    def _end_session(self, session: ProxySession, default_reason: str) -> None:
        """Digest what is left, record the close and fold the session's counters in."""
        self._drain_all(session)
        if self.injector is not None:
            self.injector.forget(session.id)
        session.end("proxy", default_reason)
        self._event(session.id, "session_close", time.monotonic_ns(),
                    {"closed_by": session.closed_by, "reason": session.reason})
        del self.sessions[session.id]
        for direction, ended in self._ended.items():
            ended.add(session.counters[direction])
        self._ended_violations += session.violations

    def _session_done(self, sid: int) -> None:
        if self.sink is not None:
            self.sink.session_done(sid)
        if not self.sessions and not self._starting:
            self._sessions_done.set()

    def _open_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"server_path": self.server_path, "wall": time.time()}
        if self.injector is not None:  # enough to reconstruct the experiment from the trace
            info["inject"] = {
                "seed": self.injector.seed,
                "rules": [rule.to_dict() for rule in self.injector.rules],
            }
        return info

    @staticmethod
    async def _stop_threads_on_cancel(session: ProxySession) -> None:
        """The cancel scope of a threaded session: when the session's nursery is
        cancelled, shut both sockets down so the blocked threads return."""
        try:
            await trio.sleep_forever()
        finally:
            session.stopping = True
            for end in (session.client, session.server):
                if isinstance(end, BlockingFdSocket):
                    end.shutdown()

    async def _run_thread(self, session: ProxySession, nursery: trio.Nursery) -> None:
        await trio.to_thread.run_sync(
            SessionThread(self).run, session, nursery, trio.lowlevel.current_trio_token(),
            limiter=self._threads,
        )

    async def _until_end(
        self,
        session: ProxySession,
        nursery: trio.Nursery,
        run: Callable[..., Awaitable[None]],
        *args: Any,
    ) -> None:
        """Run one of the session's tasks; its :class:`SessionEnd` ends the session."""
        try:
            await run(*args)
        except SessionEnd as end:
            if session.stopping:
                return  # the proxy shut the sockets down: not the peer's doing
            session.end(end.closed_by, end.reason)
            if end.drain:
                scope = nursery.cancel_scope
                scope.deadline = min(scope.deadline, trio.current_time() + DRAIN_TIME)
            else:
                nursery.cancel_scope.cancel()

    # --------------------------------------------------------------- pumps

    async def _pump(
        self,
        session: ProxySession,
        direction: Direction,
        src: FdStream,
        dst: FdStream,
        nursery: trio.Nursery,
    ) -> None:
        """Forward ``src`` to ``dst`` message by message until the session ends."""
        sender = direction.sender.value
        while True:
            try:
                data, fds = await src.receive_message(session.state.max_message_size())
            except ConnectionClosedError as exc:
                if exc.mid_message:
                    if self._record_torn(session, direction, exc):
                        with contextlib.suppress(TransportError, OSError):
                            await dst.send_message(exc.partial)
                    raise SessionEnd(sender, f"EOF mid-message ({exc})") from exc
                raise SessionEnd(sender, "EOF") from exc
            except TransportError as exc:
                raise SessionEnd("proxy", f"receiving from the {sender} failed: {exc}") from exc
            if self.injector is not None:
                await self._inject(session, direction, data, fds, dst, nursery)
                continue
            try:
                if fds and direction is Direction.S2C and data[2] == Command.VERSION:
                    self._substitute_twin_socket(session, data, fds, nursery)
                self._received(session, direction, data, fds)
                try:
                    await dst.send_message(data, fds)
                except (TransportError, OSError) as exc:
                    raise self._send_failed(direction, exc) from exc
            finally:
                for fd in fds:
                    fd.close()
            self._forwarded(session, direction, data, fds)

    async def _inject(
        self,
        session: ProxySession,
        direction: Direction,
        data: bytes,
        fds: list[OwnedFd],
        dst: FdStream,
        nursery: trio.Nursery,
    ) -> None:
        """Ask the injector what becomes of a received message and queue it for
        release (the direction's release task sends it at the decided time);
        one that is due now, with nothing held before it, is sent at once."""
        try:
            if fds and direction is Direction.S2C and data[2] == Command.VERSION:
                self._substitute_twin_socket(session, data, fds, nursery)
        except BaseException:
            for fd in fds:
                fd.close()
            raise
        t_ns = time.monotonic_ns()
        now = trio.current_time()
        injected = self._decide(session, direction, data, fds, now, t_ns)
        if injected.reply is not None:
            self._hold(session, direction.reverse, injected.reply)
        item = injected.message
        if item is not None:
            lock = session.sending[direction]
            if session.held[direction] or item.at > now or lock.locked():
                self._hold(session, direction, item)
            else:
                async with lock:
                    await self._send_release(session, direction, dst, item)
        if injected.close is not None:
            raise SessionEnd("proxy", injected.close)

    def _decide(
        self,
        session: ProxySession,
        direction: Direction,
        data: bytes,
        fds: list[OwnedFd],
        now: float,
        t_ns: int,
    ) -> Injected:
        """The injector's decision on a received message, recorded, as what to release.

        The message is queued for the digest and the applied actions go into
        the trace; a message that is not forwarded loses its fds here.
        ``now`` is the arrival on the injector's clock, ``t_ns`` the same for the trace.
        """
        assert self.injector is not None
        decision = self.injector.decide(session.id, direction, data, now)
        try:
            self._received(session, direction, data, fds, t_ns=t_ns)
        except BaseException:
            for fd in fds:
                fd.close()
            raise
        where = f"{direction.sender.value} message #{decision.index}"
        if decision.applied:
            self._event(session.id, "inject", time.monotonic_ns(), {
                "direction": direction.value,
                "index": decision.index,
                "applied": [applied.to_dict() for applied in decision.applied],
            })
        if decision.close_before or not decision.forward:
            for fd in fds:
                fd.close()
            self._digest_backlog(session)
        if decision.close_before:
            return Injected(None, None, f"injected close before {where}")
        reply = None
        if decision.reply is not None:  # in place of the receiver, after what it already sent
            reply = Release(decision.release_at, decision.reply, [], forwarded=False)
        if not decision.forward:
            close = f"injected close after {where}" if decision.close_after else None
            return Injected(None, reply, close)
        message = Release(
            decision.release_at, decision.data, fds,
            close_after=f"injected close after {where}" if decision.close_after else None,
        )
        return Injected(message, reply, None)

    @staticmethod
    def _hold(session: ProxySession, direction: Direction, item: Release) -> None:
        session.held[direction] += 1
        session.releases[direction].send_nowait(item)

    async def _send_release(
        self, session: ProxySession, direction: Direction, dst: FdStream, item: Release
    ) -> None:
        try:
            try:
                await dst.send_message(item.data, item.fds)
            except (TransportError, OSError) as exc:
                raise self._send_failed(direction, exc) from exc
        finally:
            for fd in item.fds:
                fd.close()
        if item.forwarded:
            self._forwarded(session, direction, item.data, item.fds)
        if item.close_after is not None:
            raise SessionEnd("proxy", item.close_after)

    async def _release(
        self,
        session: ProxySession,
        direction: Direction,
        dst: Endpoint,
        queue: trio.MemoryReceiveChannel[Release],
    ) -> None:
        """Send what the injector held back, in order, each at its release time."""
        assert isinstance(dst, FdStream)
        sleeper = PreciseSleeper()
        try:
            async for item in queue:
                try:
                    await sleeper.sleep_until(item.at)
                    async with session.sending[direction]:
                        await self._send_release(session, direction, dst, item)
                except BaseException:
                    for fd in item.fds:
                        fd.close()
                    raise
                finally:
                    session.held[direction] -= 1
        finally:
            sleeper.close()

    def _send_failed(self, direction: Direction, exc: BaseException) -> SessionEnd:
        receiver = direction.receiver.value
        if isinstance(exc, ConnectionClosedError):
            return SessionEnd(receiver, f"EOF while forwarding ({exc})", drain=True)
        return SessionEnd("proxy", f"forwarding to the {receiver} failed: {exc}")

    def _received(
        self,
        session: ProxySession,
        direction: Direction,
        data: bytes,
        fds: list[OwnedFd],
        *,
        inspect_fds: bool = True,
        t_ns: int | None = None,
    ) -> Received | None:
        """Queue a message for decoding and recording, before it is sent: a
        reply cannot be received before its request was sent, so the backlog
        is in forwarding order. Fd metadata is taken now, while the fds are
        open; with ``inspect_fds`` false the caller fills it in (entry[3])
        before anything digests the entry. Returns the entry (None: not queued)."""
        if not self.options.decode:
            return None
        fd_info: list[FdRecord] | int = len(fds)
        if inspect_fds and fds:
            fd_info = self._fd_records(fds)
        entry = [direction, time.monotonic_ns() if t_ns is None else t_ns, data, fd_info]
        session.backlog.append(entry)
        return entry

    def _fd_records(self, fds: list[OwnedFd]) -> list[FdRecord] | int:
        """What the trace keeps of ``fds`` (only their number when not recording)."""
        if self.sink is None:
            return len(fds)
        limit = self.options.capture_fd_contents
        return [fd_record(fd, i, contents_limit=limit) for i, fd in enumerate(fds)]

    def _forwarded(
        self, session: ProxySession, direction: Direction, data: bytes, fds: list[OwnedFd]
    ) -> None:
        """Count a forwarded message, then decode and record the backlog."""
        session.counters[direction].count(data, fds)
        self._digest_backlog(session)

    def _digest_one(self, session: ProxySession) -> None:
        """Decode and record the oldest queued message, if any.

        A session's backlog is only ever digested by the one thread or trio
        run loop that forwards the session (or, once that has ended, by the
        session's own task), so no lock is needed.
        """
        if session.backlog:
            self._digest(session, *session.backlog.popleft())

    def _digest_backlog(self, session: ProxySession) -> None:
        """Decode and record everything queued."""
        backlog = session.backlog
        while backlog:
            self._digest(session, *backlog.popleft())

    def _drain_all(self, session: ProxySession) -> None:
        """Digest everything still queued (the session is ending; strict is moot)."""
        while session.backlog:
            with contextlib.suppress(SessionEnd):
                self._digest(session, *session.backlog.popleft())

    def _record_torn(
        self, session: ProxySession, direction: Direction, exc: ConnectionClosedError
    ) -> bool:
        """The sender left in the middle of a message: record the bytes that did
        arrive; the pump then hands them on (the receiver sees the same torn
        stream it would have seen directly). True if there are bytes to hand on."""
        sender = direction.sender.value
        self._drain_all(session)
        self._event(session.id, "error", time.monotonic_ns(), {
            "text": f"{sender} closed in the middle of a message: framing lost",
            "side": sender,
            "direction": direction.value,
            "received": exc.received,
            "partial": exc.partial,
        })
        log.warning("session %d: %s closed after %d bytes of a message", session.id, sender,
                    exc.received)
        return bool(exc.partial)

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
        server_end = socket.socket(fileno=fds[index].detach())
        client_end, proxy_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds[index] = OwnedFd(client_end.detach())
        twin_id = self._next_session
        self._next_session += 1
        twin_session = ProxySession(
            twin_id, self._endpoint(proxy_end), self._endpoint(server_end),
            SessionState(dialects=session.state.dialects),
        )
        self.sessions[twin_id] = twin_session
        now = time.monotonic_ns()
        self._event(session.id, "note", now, {"text": f"twin socket relayed as session {twin_id}"})
        self._event(twin_id, "session_open", now, {**self._open_info(), "twin_of": session.id})
        nursery.start_soon(self._run_twin, session, twin_session)

    async def _run_twin(self, main: ProxySession, twin: ProxySession) -> None:
        try:
            await self._relay(twin)
        finally:
            self._end_session(twin, f"session {main.id} ended")
            if self.sink is not None:
                self.sink.session_done(twin.id)

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
        obs = session.state.observe(direction, data, fds)
        if self.sink is not None:
            self.sink.writer_for(session.id).append_message(
                session.id, direction, t_ns, data, fd_records
            )
        for violation in obs.violations:
            session.violations += 1
            log.warning("session %d: %s", session.id, violation)
            self._event(session.id, "violation", t_ns, violation.to_dict())
        if self.observer is not None:
            self.observer(session, obs, t_ns)
        if obs.violations and self.options.strict:  # recorded first, then enforced
            raise SessionEnd("proxy", f"strict: {obs.violations[0]}")

    def record_event(self, kind: str, data: dict[str, Any]) -> None:
        """Record a proxy-wide event (e.g. a rule change): once in a single
        trace, or in every running session's file of a per-session sink."""
        if self.sink is None:
            return
        now = time.monotonic_ns()
        if self.sink.shared_writer() is not None:
            self._event(None, kind, now, data)
        else:
            for sid in list(self.sessions):
                self._event(sid, kind, now, data)

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
    injector: Injector | None = None,
) -> AsyncIterator[Proxy]:
    """A running proxy on ``listen_path`` for the body of the ``async with``.

    On exit it stops accepting and cancels the sessions still running.
    """
    proxy = Proxy(server_path, sink=sink, options=options, observer=observer, injector=injector)
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
    injector: Injector | None = None,
    task_status: trio.TaskStatus[Proxy] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a proxy on ``listen_path`` until cancelled (``task_status`` gets the Proxy)."""
    proxy = Proxy(server_path, sink=sink, options=options, observer=observer, injector=injector)
    listener = await open_unix_listener(listen_path, mode=options.mode)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve, listener)
        task_status.started(proxy)


