"""The proxy: accept clients, connect each to the server, forward and record.

For each client that connects to the listening socket, the proxy connects
to the server and runs a session: a :class:`~vfioproxy.proxy.ledger.SessionLedger`
(decisions, records) and a :class:`~vfioproxy.proxy.relay.Relay` (the two
sockets) driven by a thread of its own (:mod:`vfioproxy.proxy.threaded`,
the default) or by trio tasks (:mod:`vfioproxy.proxy.tasks`). Messages are
forwarded byte-exact, each in one ``sendmsg`` with its fds, never
reordered, merged or split, and recorded raw as they pass.

Sessions are isolated: whatever one peer sends, and any failure while
forwarding it, ends that session only, with the reason recorded and
logged. The proxy keeps accepting: at most ``max_sessions`` sessions run
at once (further clients wait in the listen queue), running out of fds in
``accept`` backs off and retries, a server whose listen queue is full is
retried for ``connect_timeout`` seconds.

What cannot work is refused (:mod:`vfioproxy.proxy.refusal`): a server path
that is the proxy's own listening socket, at start; a session whose server
connection came back to the proxy's listener, at run time; a client whose
server cannot be reached is told by a clean close (EOF), and the proxy warns
at start when the server is not there yet.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from recorder.sink import TraceSink
from recorder.writer import TraceWriter
from vfioproxy.inject import Injector
from vfioproxy.interpose import session_interposer
from vfioproxy.io.unix import open_unix_listener
from vfioproxy.proxy.checks import LiveChecks, MessageObserver
from vfioproxy.proxy.irqs import irq_watcher
from vfioproxy.proxy.ledger import Numbering, SessionLedger
from vfioproxy.proxy.model import (
    DEFAULT_GRACE,
    Counters,
    ProxyOptions,
    ProxyStatistics,
    default_max_sessions,
)
from vfioproxy.proxy.refusal import LoopGuard, check_not_itself, close_cleanly, server_problem
from vfioproxy.proxy.relay import Relay
from vfioproxy.proxy.substitutes import SubstitutesFactory
from vfioproxy.proxy.tasks import TaskForwarder
from vfioproxy.proxy.threaded import ThreadForwarder
from vfioproxy.side import Direction

log = logging.getLogger("vfioproxy.proxy")

__all__ = ["MessageObserver", "Proxy", "open_proxy", "open_proxy_listener", "serve_proxy"]

#: accept errors that mean "out of a resource for now": back off and retry
_ACCEPT_CAPACITY = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: how long accept backs off when out of fds
ACCEPT_BACKOFF = 0.1
#: connect errors that mean "the server's listen queue is full": retry
_CONNECT_BUSY = frozenset({errno.EAGAIN, errno.EWOULDBLOCK})


class Proxy:
    """Relays sessions from clients on a listener to ``server_path``.

    ``sink`` records every session (None: record nothing); ``observer`` is
    called after each forwarded message with its session's ledger, its
    decoding and its time (the live view; from the forwarding thread with
    threaded forwarding). ``injector`` injects faults (delays, errors,
    drops...): against the monotonic clock on threads, or on trio's clock
    (a ``MockClock`` in tests) with ``options.threads`` off.
    ``options.interpose`` turns interposition modes on; ``substitutes``
    makes each session's keeper of the fds forwarded in place of those a
    mode interposes on (:mod:`vfioproxy.proxy.substitutes`); by default,
    with ``interpose-irqs`` on, each session's IRQ watcher
    (:mod:`vfioproxy.proxy.irqs`).
    """

    def __init__(
        self,
        server_path: str | os.PathLike[str],
        *,
        sink: TraceSink | None = None,
        options: ProxyOptions = ProxyOptions(),
        observer: MessageObserver | None = None,
        injector: Injector | None = None,
        substitutes: SubstitutesFactory | None = None,
    ) -> None:
        self.server_path = os.fspath(server_path)
        self.sink = sink
        self.options = options
        self.observer = observer
        #: with nothing recorded, the live view numbers messages as a trace would
        self._numbering = Numbering() if sink is None and observer is not None else None
        self.injector = injector
        if substitutes is None and options.interpose.interpose_irqs:
            substitutes = irq_watcher
        self.substitutes = substitutes
        self.max_sessions = options.max_sessions or default_max_sessions()
        self.sessions: dict[int, SessionLedger] = {}
        self._next_session = 1
        self._ended = {Direction.C2S: Counters(), Direction.S2C: Counters()}
        self._ended_violations = 0
        self._accepting: trio.CancelScope | None = None
        self._running = 0  # sessions accepted and not yet ended, twins included
        self._sessions_done = trio.Event()
        self._sessions_done.set()
        self._slots = trio.CapacityLimiter(self.max_sessions)
        self._threads = trio.CapacityLimiter(math.inf)  # bounded by the slots
        self._loop = LoopGuard()

    @property
    def checks_live(self) -> bool:
        """Whether each message is decoded and checked on the path: ``strict``,
        ``check_live`` or an observer asked for it and ``decode`` allows it."""
        options = self.options
        return options.decode and (
            options.strict or options.check_live or self.observer is not None)

    def statistics(self) -> ProxyStatistics:
        """Sessions, messages/bytes/fds per direction, and live-check violations.

        Messages the C lane forwards are counted when it returns: after at
        most :data:`~vfioproxy.proxy.relay.LANE_BATCH` messages, or
        :data:`~vfioproxy.proxy.relay.LANE_IDLE_MS` after the last one."""
        sessions = list(self.sessions.values())
        totals = {}
        for direction, ended in self._ended.items():
            total = Counters(ended.messages, ended.bytes, ended.fds)
            for ledger in sessions:
                total.add(ledger.counters[direction])
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
        once every session has ended. Cancellation ends all sessions at once.

        While ``max_sessions`` sessions run, no client is accepted (they wait
        in the listen queue); when the process is out of fds, accepting backs
        off for :data:`ACCEPT_BACKOFF` seconds and retries. A server that is not
        there (yet) is warned about; clients that come meanwhile are closed."""
        self._loop.listen_name = listener.socket.getsockname()
        problem = server_problem(self.server_path)
        if problem is not None:
            log.warning("warning: the server %s %s (yet): serving anyway; until it listens, "
                        "each client is told so in this log and closed", self.server_path,
                        problem)
        async with trio.open_nursery() as nursery:
            try:
                with trio.CancelScope() as accepting:
                    self._accepting = accepting
                    task_status.started()
                    while True:
                        await self._accept_one(listener, nursery)
            finally:
                await listener.aclose()

    async def _accept_one(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        slot = object()
        if self._slots.borrowed_tokens >= self._slots.total_tokens:
            log.warning("%d sessions running (--max-sessions): new clients wait",
                        self._slots.total_tokens)
        await self._slots.acquire_on_behalf_of(slot)
        try:
            stream = await listener.accept()
        except OSError as exc:
            self._slots.release_on_behalf_of(slot)
            if exc.errno in _ACCEPT_CAPACITY:
                log.warning("cannot accept a client: %s; retrying in %.1f s", exc.strerror,
                            ACCEPT_BACKOFF)
                await trio.sleep(ACCEPT_BACKOFF)
            else:
                log.warning("accepting a client failed: %s", exc)
                await trio.lowlevel.checkpoint()
            return
        except BaseException:
            self._slots.release_on_behalf_of(slot)
            raise
        sock = socket.socket(fileno=stream.socket.detach())
        if self._loop.is_marked(sock):  # a refused session's own server connection
            sock.close()
            self._slots.release_on_behalf_of(slot)
            return
        self._session_started()
        nursery.start_soon(self._run_session, sock, slot)

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

    def record_event(self, kind: str, data: dict[str, Any]) -> None:
        """Record a proxy-wide event (e.g. a rule change): once in a single
        trace, or in every running session's file of a per-session sink."""
        if self.sink is None:
            if self._numbering is not None:  # a trace would have it
                self._numbering.take(1)
            return
        shared = self.sink.shared_writer()
        if shared is not None:
            try:
                shared.write_event(None, kind, time.monotonic_ns(), data)
            except (OSError, ValueError) as exc:
                log.error("cannot record %s: %s", kind, exc)
            return
        for ledger in list(self.sessions.values()):
            ledger.event(kind, data)

    # ------------------------------------------------------------- one session

    def _session_started(self) -> None:
        self._running += 1
        if self._sessions_done.is_set():
            self._sessions_done = trio.Event()

    def _session_ended(self) -> None:
        self._running -= 1
        if not self._running:
            self._sessions_done.set()

    def _new_ledger(self, twin_of: int | None = None) -> SessionLedger:
        sid = self._next_session
        self._next_session += 1
        writer: TraceWriter | None = None
        if self.sink is not None:
            try:
                writer = self.sink.writer_for(sid)
            except OSError as exc:  # e.g. out of fds or disk for a per-session file
                log.error("session %d: cannot open its trace: %s; forwarding it unrecorded",
                          sid, exc)
        options = self.options
        ledger = SessionLedger(sid, writer=writer, injector=self.injector,
                               numbering=self._numbering,
                               interposer=session_interposer(options.interpose))
        if self.checks_live:
            ledger.checks = LiveChecks(
                ledger,
                dialects=options.dialects,
                observer=self.observer,
                record=ledger.event if options.check_live else None,
                log_violations=options.check_live or options.strict,
                strict=options.strict,
            )
        self.sessions[sid] = ledger
        info: dict[str, Any] = {"server_path": self.server_path, "wall": time.time()}
        if twin_of is not None:
            info["twin_of"] = twin_of
        if self.injector is not None:  # enough to reconstruct the experiment from the trace
            info["inject"] = {
                "seed": self.injector.seed,
                "rules": [rule.to_dict() for rule in self.injector.rules],
            }
        if options.interpose.enabled:  # what replay and the reader look at
            info["interpose"] = options.interpose.to_dict()
        ledger.event("session_open", info)
        return ledger

    def _retire(self, ledger: SessionLedger) -> None:
        """A session ended (its sockets closed): record its close if nothing did,
        fold its counters in, let its trace file go."""
        if not ledger.closed:
            ledger.close()
        log.info("session %d: closed by %s (%s)", ledger.id, ledger.closed_by, ledger.reason)
        self.sessions.pop(ledger.id, None)
        for direction, ended in self._ended.items():
            ended.add(ledger.counters[direction])
        self._ended_violations += ledger.violations
        if self.sink is not None:
            self.sink.session_done(ledger.id)
        if self.observer is not None:
            self.observer.forget(ledger.id)
        self._session_ended()

    @staticmethod
    def _failed(ledger: SessionLedger | None, exc: Exception) -> None:
        """A bug, or a resource gone, ended one session: say so; nothing else ends."""
        log.error("session %s ended by an internal error: %r",
                  "?" if ledger is None else ledger.id, exc)
        if ledger is not None:
            ledger.end("proxy", f"internal error: {exc!r}")

    async def _run_session(self, client: socket.socket, slot: object) -> None:
        """One client: connect to the server, forward until the session ends.
        Nothing that happens here ends another session or the proxy."""
        ledger: SessionLedger | None = None
        try:
            ledger = self._new_ledger()
            try:
                server = await self._connect_server()
            except OSError as exc:
                text = f"cannot connect to the server {self.server_path}: {exc.strerror or exc}"
                log.error("session %d: %s; closing the client", ledger.id, text)
                ledger.event("error", {"text": text})
                ledger.end("proxy", f"server unreachable: {exc.strerror or exc}")
                await close_cleanly(client)
                return
            if self._loop.came_back(server):
                server.close()
                self._refuse_loop(ledger)
                await close_cleanly(client)
                return
            log.info("session %d: opened", ledger.id)
            await self._forward(ledger, client, server)
        except Exception as exc:
            self._failed(ledger, exc)
        finally:
            client.close()  # the relay closed it already, unless something failed first
            self._slots.release_on_behalf_of(slot)
            if ledger is None:
                self._session_ended()
            else:
                self._retire(ledger)

    def _refuse_loop(self, ledger: SessionLedger) -> None:
        text = (f"the server path {self.server_path} leads back to this proxy's own "
                "listening socket")
        if self._loop.refused == 1:
            log.error("session %d: %s: refused (so is every such session, logged only in "
                      "the trace); closing the client", ledger.id, text)
        ledger.event("error", {"text": text})
        ledger.end("proxy", "server path leads back to the proxy")

    async def _connect_server(self) -> socket.socket:
        """A socket connected to the server.

        An AF_UNIX connect to a listening socket completes at once unless its
        listen queue is full; then the kernel says EAGAIN (not EINPROGRESS)
        and nothing is in progress: retry, backing off, for up to
        ``connect_timeout`` seconds, as a blocking connect would wait.
        """
        deadline = time.monotonic() + self.options.connect_timeout
        pause = 100e-6
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                sock.connect(self.server_path)
                return sock
            except BaseException as exc:
                sock.close()
                if not isinstance(exc, OSError) or exc.errno not in _CONNECT_BUSY:
                    raise
                if time.monotonic() >= deadline:
                    raise OSError(exc.errno, f"the server's listen queue stayed full for "
                                  f"{self.options.connect_timeout:g} s") from exc
            await trio.sleep(pause)
            pause = min(pause * 2, 0.01)

    async def _forward(
        self, ledger: SessionLedger, client: socket.socket, server: socket.socket
    ) -> None:
        """Run the session's relay on its forwarder until the session ends."""
        options = self.options
        async with trio.open_nursery() as nursery:
            token = trio.lowlevel.current_trio_token()
            threaded = options.threads

            def spawn_twin(server_end: socket.socket, proxy_end: socket.socket) -> int:
                if threaded:
                    twin_id: int = trio.from_thread.run_sync(
                        self._start_twin, ledger, server_end, proxy_end, nursery,
                        trio_token=token,
                    )
                    return twin_id
                return self._start_twin(ledger, server_end, proxy_end, nursery)

            relay = Relay(
                ledger, client, server,
                buffer_limit=options.max_message_buffer,
                queue_limit=options.max_queue,
                clock=time.monotonic if threaded else trio.current_time,
                capture_fd_contents=options.capture_fd_contents,
                spawn_twin=spawn_twin,
                substitutes=None if self.substitutes is None else self.substitutes(ledger),
            )
            try:
                if threaded:
                    forwarder = ThreadForwarder(relay)
                    nursery.start_soon(_wake_on_cancel, forwarder)
                    await trio.to_thread.run_sync(forwarder.run, limiter=self._threads)
                else:
                    await TaskForwarder(relay).run()
            finally:
                if not relay.closed:  # cancelled before its forwarder ran
                    ledger.end("proxy", "proxy shut down")
                    relay.stop("proxy shut down")
            nursery.cancel_scope.cancel()  # a twin ends with its session

    def _start_twin(
        self,
        main: SessionLedger,
        server_end: socket.socket,
        proxy_end: socket.socket,
        nursery: trio.Nursery,
    ) -> int:
        """Relay a twin socket as a session of its own (``twin_of`` in its
        session_open), ending with its main session."""
        ledger = self._new_ledger(twin_of=main.id)
        self._session_started()
        nursery.start_soon(self._run_twin, ledger, proxy_end, server_end)
        return ledger.id

    async def _run_twin(
        self, ledger: SessionLedger, proxy_end: socket.socket, server_end: socket.socket
    ) -> None:
        try:
            await self._forward(ledger, proxy_end, server_end)
        except Exception as exc:
            self._failed(ledger, exc)
        finally:
            proxy_end.close()  # closed by the relay already, unless something failed first
            server_end.close()
            self._retire(ledger)


async def _wake_on_cancel(forwarder: ThreadForwarder) -> None:
    """The cancel scope of a threaded session: when the session's nursery is
    cancelled, wake the thread so it stops (the session ends as stopped)."""
    try:
        await trio.sleep_forever()
    finally:
        forwarder.wake()


async def open_proxy_listener(
    listen_path: str | os.PathLike[str], server_path: str | os.PathLike[str], *, mode: int = 0o600
) -> trio.SocketListener:
    """The proxy's listening socket on ``listen_path`` (see
    :func:`~vfioproxy.io.unix.open_unix_listener`), refused with
    :class:`~vfioproxy.proxy.refusal.ProxyLoopError` (and removed again) when
    ``server_path`` is that same socket."""
    listener = await open_unix_listener(listen_path, mode=mode)
    try:
        check_not_itself(os.fspath(listen_path), os.fspath(server_path))
    except BaseException:
        await listener.aclose()
        os.unlink(listen_path)
        raise
    return listener


@asynccontextmanager
async def open_proxy(
    listen_path: str | os.PathLike[str],
    server_path: str | os.PathLike[str],
    *,
    sink: TraceSink | None = None,
    options: ProxyOptions = ProxyOptions(),
    observer: MessageObserver | None = None,
    injector: Injector | None = None,
    substitutes: SubstitutesFactory | None = None,
) -> AsyncIterator[Proxy]:
    """A running proxy on ``listen_path`` for the body of the ``async with``.

    On exit it stops accepting and cancels the sessions still running.
    """
    proxy = Proxy(server_path, sink=sink, options=options, observer=observer, injector=injector,
                  substitutes=substitutes)
    listener = await open_proxy_listener(listen_path, server_path, mode=options.mode)
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
    substitutes: SubstitutesFactory | None = None,
    task_status: trio.TaskStatus[Proxy] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a proxy on ``listen_path`` until cancelled (``task_status`` gets the Proxy)."""
    proxy = Proxy(server_path, sink=sink, options=options, observer=observer, injector=injector,
                  substitutes=substitutes)
    listener = await open_proxy_listener(listen_path, server_path, mode=options.mode)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve, listener)
        task_status.started(proxy)
