"""The fast forwarder: one thread per session, polling both sockets.

The thread blocks in ``poll`` on the session's two sockets (and a wake-up
eventfd, and with fault injection a timerfd), and the kernel wakes it
directly when a message arrives: no event loop pass, no task switch, and no
GIL hand-off between the two directions, which on a VM costs a cross-CPU
wake-up each time. Everything it does between two polls is a
:class:`~vfioproxy.proxy.relay.Relay` step; a message that is not whole yet,
or a peer that does not read, only changes what the next ``poll`` waits
for.

While every message is plain (no fds, not VERSION, at most 64 KiB)
and nothing waits, the thread hands the polling to the C lane
(:mod:`vfioproxy.proxy.fastpath`), which forwards and records such messages
without the GIL and hands anything else back to the same
:class:`~vfioproxy.proxy.relay.Relay` steps.

Held messages (fault injection) wake the thread through a timerfd armed a
little early (a running estimate of how late it wakes) and the last
microseconds are spun, so delays of tens of microseconds come out right.

:meth:`ThreadForwarder.wake` (from any thread) makes it stop: it then ends
the session (:meth:`~vfioproxy.proxy.relay.Relay.stop`) and returns.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time

from vfioproxy.proxy import fastpath
from vfioproxy.proxy.relay import LANE_WOKEN, Relay
from vfioproxy.proxy.timer import TimerFd, WakeLatency

__all__ = ["ThreadForwarder"]

_POLLIN = select.POLLIN
_POLLOUT = select.POLLOUT
_POLLHUP = select.POLLHUP | select.POLLERR
#: the longest the thread spins for a held message instead of sleeping
SPIN = 100e-6


class ThreadForwarder:
    """Runs one :class:`Relay` on the calling thread until it is finished or woken."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.stopping = False
        self._wakeup = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._lock = threading.Lock()  # the wake-up fd is closed under it

    def wake(self) -> None:
        """Stop the forwarding (from any thread): the session ends as stopped."""
        self.stopping = True
        self.recheck()

    def recheck(self) -> None:
        """Make the thread look again at what it may let the C lane do (from any
        thread; the fault rules changed)."""
        with self._lock:
            if self._wakeup >= 0:
                os.eventfd_write(self._wakeup, 1)

    def _rechecked(self) -> None:
        """Clear a :meth:`recheck` (a :meth:`wake` is left for the loop to see)."""
        if not self.stopping:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._wakeup)

    def run(self) -> None:
        """Forward until both directions are done, the ledger asks to stop, or
        :meth:`wake`; then end the session. An exception ends the session
        first ("internal error"), then propagates."""
        relay = self.relay
        injector = relay.ledger.injector
        timer = TimerFd() if injector is not None else None
        if injector is not None:
            injector.watch(self.recheck)
        try:
            self._forward(relay, timer)
        except BaseException as exc:
            relay.end(exc)
            raise
        finally:
            if injector is not None:
                injector.unwatch(self.recheck)
            if timer is not None:
                timer.close()
            with self._lock:
                os.close(self._wakeup)
                self._wakeup = -1
        relay.end()

    def _forward(self, relay: Relay, timer: TimerFd | None) -> None:
        ledger = relay.ledger
        legs = {leg.fd: leg for leg in relay.legs}
        registered: dict[int, int | None] = dict.fromkeys(legs)
        poller = select.poll()
        poller.register(self._wakeup, _POLLIN)
        latency = WakeLatency(30e-6, cap=SPIN)
        armed_for: float | None = None
        if timer is not None:
            poller.register(timer.fd, _POLLIN)
        lane = fastpath.lane
        while not relay.finished and ledger.stop_reason is None and not self.stopping:
            if lane is not None:
                plan = relay.lane_plan()
                if plan is not None:
                    pending = relay.run_lane(lane, self._wakeup, plan)
                    if pending == LANE_WOKEN:
                        self._rechecked()
                    if pending < 0 or pending == LANE_WOKEN:
                        continue
            if relay.changed:
                relay.changed = False
                for fd, leg in legs.items():
                    events: int | None = (_POLLIN if relay.wants_read(leg) else 0) | (
                        _POLLOUT if relay.wants_write(leg) else 0)
                    if not events and leg.gone:
                        events = None  # known gone: POLLHUP would wake the poll for ever
                    if events != registered[fd]:
                        if events is None:
                            poller.unregister(fd)
                        elif registered[fd] is None:
                            poller.register(fd, events)
                        else:
                            poller.modify(fd, events)
                        registered[fd] = events
            timeout = -1.0
            if timer is not None:
                due = relay.next_release()
                if due is None:
                    if armed_for is not None:
                        timer.disarm()
                        armed_for = None
                else:
                    now = time.monotonic()
                    if armed_for is not None and now >= armed_for:
                        latency.update(now - armed_for)
                        armed_for = None
                    wait, lead = due - now, latency.value
                    if wait > lead + SPIN / 2:
                        if armed_for != due - lead:  # already armed for it: nothing to do
                            armed_for = due - lead
                            timer.arm(wait - lead)
                    else:
                        while time.monotonic() < due:  # the last few microseconds
                            pass
                        timeout = 0
            for fd, events in poller.poll(timeout):
                ready = legs.get(fd)
                if ready is None:
                    if timer is not None and fd == timer.fd:
                        timer.clear()
                    else:
                        self._rechecked()  # the wake-up eventfd: the loop condition sees a wake
                    continue
                if events & _POLLOUT:
                    relay.writable(ready)
                if events & _POLLIN:
                    relay.readable(ready)
                elif events & _POLLHUP:
                    if not ready.eof and (registered[fd] or 0) & _POLLIN:
                        relay.readable(ready)  # EOF, or the last bytes, first
                    else:
                        relay.hangup(ready)
            if timer is not None:
                relay.release()
