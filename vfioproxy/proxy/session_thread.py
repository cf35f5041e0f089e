"""The fast path: both directions of a proxy session on one blocking thread.

:class:`SessionThread` forwards, injects and digests; the decoding,
recording and fault decisions themselves are the :class:`~vfioproxy.proxy.core.Proxy`'s,
shared with its trio-task forwarding.
"""

from __future__ import annotations

import contextlib
import select
import time
from collections import deque
from typing import TYPE_CHECKING

import trio

from vfioproxy.blocking_transport import BlockingFdSocket
from vfioproxy.errors import ConnectionClosedError, TransportError
from vfioproxy.fds import OwnedFd
from vfioproxy.protocol.header import Command
from vfioproxy.proxy.model import (
    BACKLOG_LIMIT,
    DRAIN_TIME,
    ProxySession,
    Received,
    Release,
    SessionEnd,
)
from vfioproxy.side import Direction
from vfioproxy.timer import TimerFd, WakeLatency

if TYPE_CHECKING:
    from vfioproxy.proxy.core import Proxy

__all__ = ["SessionThread"]

_VERSION = int(Command.VERSION)
_S2C = Direction.S2C  # a module constant: an enum member off its class is a descriptor call


class Held:
    """What an injecting session thread holds back: a queue per direction, in
    order, and a timerfd armed for the first message due.

    The timer is armed a little early (by a running estimate of how late a
    timerfd wakes the thread) and the last microseconds are spun, so that
    delays of tens of microseconds come out right.
    """

    #: the longest the thread spins for a message instead of sleeping
    SPIN = 100e-6

    def __init__(self, session: ProxySession, ends: dict[Direction, BlockingFdSocket]) -> None:
        self.session = session
        self.ends = ends
        self.queues: dict[Direction, deque[Release]] = {
            Direction.C2S: deque(), Direction.S2C: deque()
        }
        self.timer = TimerFd()
        self._wake_latency = WakeLatency(30e-6, cap=self.SPIN)
        self._armed_for: float | None = None

    def hold(self, direction: Direction, item: Release) -> None:
        self.queues[direction].append(item)

    def release_due(self, thread: SessionThread) -> None:
        """Send every held message whose time has come; arm the timer for the next."""
        while True:
            now = time.monotonic()
            if self._armed_for is not None and now >= self._armed_for:
                self._wake_latency.update(now - self._armed_for)
                self._armed_for = None
            first: float | None = None
            for direction, queue in self.queues.items():
                while queue and queue[0].at <= now:
                    thread.release(self.session, direction, self.ends[direction],
                                   queue.popleft())
                if queue and (first is None or queue[0].at < first):
                    first = queue[0].at
            if first is None:
                self.timer.disarm()
                self._armed_for = None
                return
            wait, lead = first - now, self._wake_latency.value
            if wait > lead + self.SPIN / 2:
                self._armed_for = first - lead
                self.timer.arm(wait - lead)
                return
            while time.monotonic() < first:  # the last few microseconds
                pass

    def close(self) -> None:
        """Drop what is still held (its fds are closed) and the timer."""
        for queue in self.queues.values():
            while queue:
                for fd in queue.popleft().fds:
                    fd.close()
        self.timer.close()


class SessionThread:
    """Runs sessions of ``proxy`` on the calling thread (see :meth:`run`)."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def run(
        self, session: ProxySession, nursery: trio.Nursery, token: trio.lowlevel.TrioToken
    ) -> None:
        """Both directions of a session on one thread (the fast path).

        ``poll`` on the two sockets, forward each message that arrives, and
        decode and record the backlog only while nothing waits to be
        forwarded. One thread per session, unlike a thread per direction,
        never hands the GIL from one direction to the other, which on a VM
        costs a cross-CPU wake-up each time. With an injector, messages held
        back wait in a queue per direction and a timerfd in the poll set
        wakes the thread when the first of them is due.
        """
        client, server = session.client, session.server
        assert isinstance(client, BlockingFdSocket) and isinstance(server, BlockingFdSocket)
        routes = {
            client.fileno(): (Direction.C2S, client, server),
            server.fileno(): (Direction.S2C, server, client),
        }
        poller = select.poll()
        for fd in routes:
            poller.register(fd, select.POLLIN)
        held: Held | None = None
        if self.proxy.injector is not None:
            held = Held(session, {Direction.C2S: server, Direction.S2C: client})
            poller.register(held.timer.fd, select.POLLIN)
        backlog = session.backlog
        drain_until: float | None = None
        try:
            while True:
                if held is not None:
                    held.release_due(self)
                if drain_until is not None:
                    timeout = drain_until - time.monotonic()
                    if timeout <= 0:
                        raise SessionEnd("proxy", "drain time over")
                    ready = poller.poll(timeout * 1000)
                elif backlog:
                    ready = poller.poll(0)
                    if not ready:
                        self.proxy._digest_one(session)
                        continue
                else:
                    ready = poller.poll()
                for fd, _ in ready:
                    if held is not None and fd == held.timer.fd:
                        held.timer.clear()
                        continue
                    direction, src, dst = routes[fd]
                    try:
                        if held is None:
                            self._forward(session, direction, src, dst, nursery, token)
                        else:
                            self._inject(session, direction, src, held, nursery, token)
                    except SessionEnd as end:
                        if not end.drain:
                            raise
                        # the receiver left: stop reading for it, read its last messages
                        session.end(end.closed_by, end.reason)
                        poller.unregister(fd)
                        drain_until = time.monotonic() + DRAIN_TIME
                if len(backlog) > BACKLOG_LIMIT:  # never idle: keep up, a message at a time
                    self.proxy._digest_one(session)
        finally:
            if held is not None:
                held.close()

    def _receive(
        self,
        session: ProxySession,
        direction: Direction,
        src: BlockingFdSocket,
        dst: BlockingFdSocket,
    ) -> tuple[bytes, list[OwnedFd]]:
        """Receive the message ``src`` has ready; its end ends the session."""
        try:
            return src.receive_message(session.state.max_message_size())
        except ConnectionClosedError as exc:
            sender = direction.sender.value
            if exc.mid_message:
                if self.proxy._record_torn(session, direction, exc):
                    with contextlib.suppress(TransportError, OSError):
                        dst.send_message(exc.partial)
                raise SessionEnd(sender, f"EOF mid-message ({exc})") from exc
            raise SessionEnd(sender, "EOF") from exc
        except (TransportError, OSError) as exc:
            raise SessionEnd(
                "proxy", f"receiving from the {direction.sender.value} failed: {exc}"
            ) from exc

    def _forward(
        self,
        session: ProxySession,
        direction: Direction,
        src: BlockingFdSocket,
        dst: BlockingFdSocket,
        nursery: trio.Nursery,
        token: trio.lowlevel.TrioToken,
    ) -> None:
        """Forward the one message that ``src`` has ready (see ``Proxy._pump``)."""
        data, fds = self._receive(session, direction, src, dst)
        if not fds:  # the usual case
            self.proxy._received(session, direction, data, fds)
            try:
                dst.send_message(data)
            except (TransportError, OSError) as exc:
                raise self.proxy._send_failed(direction, exc) from exc
            self._forwarded(session, direction, data, fds)
            return
        entry: Received | None = None
        try:
            if direction is Direction.S2C and data[2] == _VERSION:
                trio.from_thread.run_sync(self.proxy._substitute_twin_socket, session, data, fds,
                                          nursery, trio_token=token)
            # fd metadata after the send, unless contents are captured: those
            # must be read as they passed, before the receiver can write to them
            entry = self.proxy._received(
                session, direction, data, fds,
                inspect_fds=self.proxy.options.capture_fd_contents > 0,
            )
            try:
                dst.send_message(data, fds)
            except (TransportError, OSError) as exc:
                raise self.proxy._send_failed(direction, exc) from exc
        finally:
            if entry is not None and isinstance(entry[3], int):
                entry[3] = self.proxy._fd_records(fds)  # syscalls: after the send, before the close
            for fd in fds:
                fd.close()
        self._forwarded(session, direction, data, fds)

    def _inject(
        self,
        session: ProxySession,
        direction: Direction,
        src: BlockingFdSocket,
        held: Held,
        nursery: trio.Nursery,
        token: trio.lowlevel.TrioToken,
    ) -> None:
        """``Proxy._inject`` on the session's thread: hold or send what the injector decided."""
        data, fds = self._receive(session, direction, src, held.ends[direction])
        try:
            if fds and direction is Direction.S2C and data[2] == _VERSION:
                trio.from_thread.run_sync(self.proxy._substitute_twin_socket, session, data, fds,
                                          nursery, trio_token=token)
        except BaseException:
            for fd in fds:
                fd.close()
            raise
        t_ns = time.monotonic_ns()
        now = t_ns / 1e9
        injected = self.proxy._decide(session, direction, data, fds, now, t_ns)
        if injected.reply is not None:
            held.hold(direction.reverse, injected.reply)
        if injected.message is not None:
            if held.queues[direction] or injected.message.at > now:
                held.hold(direction, injected.message)
            else:
                self.release(session, direction, held.ends[direction], injected.message)
        if injected.close is not None:
            raise SessionEnd("proxy", injected.close)

    def release(
        self, session: ProxySession, direction: Direction, dst: BlockingFdSocket, item: Release
    ) -> None:
        """Send a message the injector let through (or its error reply) now."""
        try:
            try:
                dst.send_message(item.data, item.fds)
            except (TransportError, OSError) as exc:
                raise self.proxy._send_failed(direction, exc) from exc
        finally:
            for fd in item.fds:
                fd.close()
        if item.forwarded:
            self._forwarded(session, direction, item.data, item.fds)
        if item.close_after is not None:
            raise SessionEnd("proxy", item.close_after)

    def _forwarded(
        self, session: ProxySession, direction: Direction, data: bytes, fds: list[OwnedFd]
    ) -> None:
        """Count a forwarded message; the digest waits until the thread idles,
        except after a VERSION reply: the negotiation sets the framing limit of
        the messages that follow, so it is observed before the next receive."""
        session.counters[direction].count(data, fds)
        if data[2] == _VERSION and direction is _S2C:
            self.proxy._digest_backlog(session)
