"""The proxy's IRQ watcher: it stands in for the eventfds of ``interpose-irqs``.

For every SET_IRQS eventfd the ``interpose-irqs`` mode
(:mod:`vfioproxy.interpose.irqs`) plans as interposed, the relay hands the
client's fd to the session's :class:`IrqWatcher` (its
:class:`~vfioproxy.proxy.substitutes.Substitutes`): the watcher keeps it,
makes an eventfd of its own (``EFD_CLOEXEC|EFD_NONBLOCK``) and returns a
duplicate of that for the relay to forward to the server. One thread per
session with interposed vectors waits (``epoll``) on those eventfds and a
wake fd. When the server signals one, the thread reads its counter, records
an ``irq`` event (index, vector, count: the value read, time of the read)
and writes the value to the client's eventfd, so the client sees what it
would have seen, later by the time that takes (bench/RESULTS.md).

With fault injection, the thread asks for each interrupt what to do
(``decide``, :meth:`vfioproxy.inject.Injector.irq`): drop it (the client is
not signalled; the event says so) or delay it. A delayed interrupt is
signalled when its time comes (the epoll timeout, armed a little early, then
a short spin: right to a few microseconds), and holds
later interrupts of its vector behind it, as a delayed message holds later
messages.

A SET_IRQS that re-points an interposed vector swaps it (:meth:`interpose`
closes the old substitute and kept fd); one that disables vectors releases
them (:meth:`release`); :meth:`close`, at the session's end (whatever ended
it, cancellation too), stops the thread and closes everything: no fd
outlives the session. Interrupts still held back by a delay when a vector
is released or the session ends are not signalled (the client's fd is gone).

Recording from the watcher's thread goes through the session's ledger,
whose :class:`~recorder.writer.TraceWriter` appends whole records under its
lock, from any thread.
"""

from __future__ import annotations

import heapq
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from vfioproxy.inject import IrqDecision
from vfioproxy.interpose import FdPlan
from vfioproxy.io.fds import OwnedFd, make_eventfd

if TYPE_CHECKING:
    from vfioproxy.proxy.ledger import SessionLedger

__all__ = ["MAX_WATCHERS", "IrqWatcher", "irq_watcher"]

log = logging.getLogger("vfioproxy.proxy")

#: at most this many sessions have a watcher thread at once; a session beyond
#: that has its eventfds forwarded as they are (the relay's fallback)
MAX_WATCHERS = 64

_watchers = threading.BoundedSemaphore(MAX_WATCHERS)
#: a delayed interrupt's last seconds are waited by spinning (epoll's timeout
#: is in milliseconds): delays are right to a few microseconds
_SPIN = 0.002


#: asks fault injection about an interrupt of (index, vector) read at a time
#: (``time.monotonic`` seconds); None: signal it now
Decide = Callable[[int, int, float], IrqDecision | None]
#: records an ``irq`` event: its data and time (monotonic ns)
Record = Callable[[dict[str, Any], int], object]


@attrs.define
class _Vector:
    index: int
    vector: int
    substitute: OwnedFd  # the proxy's eventfd (the server got a duplicate)
    client: OwnedFd  # the client's eventfd, signalled in its place
    #: monotonic time before which nothing more of this vector is signalled
    held_until: float = 0.0


class IrqWatcher:
    """A session's interposed eventfds and the thread that watches them.

    ``record`` records an ``irq`` event; ``decide`` asks fault injection
    (None: every interrupt is signalled at once); ``clock`` is the
    ``time.monotonic`` the delays are counted on."""

    def __init__(self, record: Record, decide: Decide | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._record = record
        self._decide = decide
        self._clock = clock
        self._lock = threading.Lock()
        self._vectors: dict[tuple[int, int], _Vector] = {}
        self._by_fd: dict[int, _Vector] = {}
        #: delayed interrupts: (due, order, vector, value)
        self._due: list[tuple[float, int, _Vector, int]] = []
        self._order = 0
        self._epoll: select.epoll | None = None
        self._wake: OwnedFd | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        #: interrupts read, signalled to the client, dropped (for tests and stats)
        self.read = self.signalled = self.dropped = 0

    # ------------------------------------------------------------------ the relay's side

    def interpose(self, fd: OwnedFd, plan: FdPlan) -> OwnedFd:
        """Keep the client's ``fd`` for vector ``plan.irq`` and return an eventfd
        for the server (the relay forwards and closes it; the watcher keeps
        its own). A vector already interposed is swapped: its old fds are
        closed. :class:`OSError` when no eventfd or thread can be had (then
        ``fd`` is not taken)."""
        if plan.irq is None:
            raise OSError("an interposed fd with no IRQ vector")
        with self._lock:
            if self._closed:
                raise OSError("the session's IRQ watcher is closed")
            self._start()
            assert self._epoll is not None
            substitute = make_eventfd()
            try:
                forwarded = OwnedFd(os.dup(substitute.fileno()))
            except OSError:
                substitute.close()
                raise
            self._drop_vector(plan.irq)
            entry = _Vector(plan.irq[0], plan.irq[1], substitute, fd)
            self._vectors[plan.irq] = entry
            self._by_fd[substitute.fileno()] = entry
            self._epoll.register(substitute.fileno(), select.EPOLLIN)
        return forwarded

    def release(self, irqs: Sequence[tuple[int, int]]) -> None:
        """Close what is kept for the vectors ``irqs`` (a SET_IRQS disabled them)."""
        with self._lock:
            for irq in irqs:
                self._drop_vector(irq)

    def close(self) -> None:
        """Stop the thread (waiting for it) and close every fd; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = self._stopping = True
            thread = self._thread
            if self._wake is not None:
                os.eventfd_write(self._wake.fileno(), 1)
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._lock:
            for irq in list(self._vectors):
                self._drop_vector(irq)
            self._due.clear()
            self._close_poll()
            if thread is not None:
                _watchers.release()
                self._thread = None

    @property
    def vectors(self) -> list[tuple[int, int]]:
        """The vectors interposed now, sorted."""
        with self._lock:
            return sorted(self._vectors)

    # ------------------------------------------------------------------ inside

    def _start(self) -> None:
        """Start the thread on the first vector (the lock held)."""
        if self._thread is not None:
            return
        if not _watchers.acquire(blocking=False):
            raise OSError(f"{MAX_WATCHERS} sessions already have an IRQ watcher")
        try:
            self._epoll = select.epoll()
            self._wake = make_eventfd()
            self._epoll.register(self._wake.fileno(), select.EPOLLIN)
            thread = threading.Thread(target=self._run, name="vfioproxy-irqs", daemon=True)
            thread.start()
        except BaseException:
            self._close_poll()
            _watchers.release()
            raise
        self._thread = thread

    def _close_poll(self) -> None:
        """Close the epoll and the wake-up fd, if open (the lock held)."""
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        if self._wake is not None:
            self._wake.close()
            self._wake = None

    def _drop_vector(self, irq: tuple[int, int]) -> None:
        """Forget and close one vector's fds (the lock held)."""
        entry = self._vectors.pop(irq, None)
        if entry is None:
            return
        fd = entry.substitute.fileno()
        del self._by_fd[fd]
        if self._epoll is not None:
            self._epoll.unregister(fd)
        entry.substitute.close()
        entry.client.close()
        if self._due:
            self._due = [item for item in self._due if item[2] is not entry]
            heapq.heapify(self._due)

    def _run(self) -> None:
        """The thread: wait, read, record, signal; until :meth:`close`."""
        try:
            while True:
                with self._lock:
                    if self._stopping or self._epoll is None:
                        return
                    epoll = self._epoll
                    timeout = -1.0
                    if self._due:  # epoll counts in ms: wake early, spin the rest
                        timeout = max(0.0, self._due[0][0] - self._clock() - _SPIN)
                try:
                    ready = epoll.poll(timeout)
                except (OSError, ValueError):  # closed under us: close() is under way
                    return
                with self._lock:
                    if self._stopping:
                        return
                    for fd, _ in ready:
                        entry = self._by_fd.get(fd)
                        if entry is None:  # the wake fd, or a vector released meanwhile
                            if self._wake is not None and fd == self._wake.fileno():
                                _read(fd)
                            continue
                        value = _read(fd)
                        if value:
                            self._interrupt(entry, value)
                    self._signal_due()
        except Exception:  # a watcher bug must not end the proxy
            log.exception("IRQ watcher failed: interposed interrupts are no longer passed on")

    def _interrupt(self, entry: _Vector, value: int) -> None:
        """One read of a substitute (the lock held): signal the client now (then
        record it), later, or not at all."""
        now = self._clock()
        t_ns = time.monotonic_ns()
        self.read += 1
        data: dict[str, Any] = {"index": entry.index, "vector": entry.vector, "count": value}
        fate = None if self._decide is None else self._decide(entry.index, entry.vector, now)
        if fate is not None:
            data.update(fate.to_dict())
        if fate is not None and fate.drop:
            data["fate"] = "dropped"
            self.dropped += 1
        else:
            delay = 0.0 if fate is None else fate.delay
            due = max(now + delay, entry.held_until)
            if due > now:
                data["fate"] = "delayed"
                data["delay"] = due - now
                entry.held_until = due
                self._order += 1
                heapq.heappush(self._due, (due, self._order, entry, value))
            else:
                data["fate"] = "signalled"
                self._signal(entry, value)  # first: the client waits; the record can
        self._record(data, t_ns)

    def _signal_due(self) -> None:
        """Signal the delayed interrupts whose time has come (the lock held)."""
        now = self._clock()
        while self._due and self._due[0][0] <= now:
            _, _, entry, value = heapq.heappop(self._due)
            self._signal(entry, value)

    def _signal(self, entry: _Vector, value: int) -> None:
        try:
            os.eventfd_write(entry.client.fileno(), value)
            self.signalled += 1
        except (BlockingIOError, OSError, ValueError) as exc:
            log.warning("IRQ %d vector %d: cannot signal the client's eventfd: %s",
                        entry.index, entry.vector, exc)


def _read(fd: int) -> int:
    """An eventfd's counter (0 when another read took it first)."""
    try:
        return os.eventfd_read(fd)
    except (BlockingIOError, OSError):
        return 0


def irq_watcher(ledger: SessionLedger) -> IrqWatcher:
    """A session's watcher: ``irq`` events recorded through its ledger, its
    fault injector (if any) asked about every interrupt."""
    injector = ledger.injector
    session = ledger.id

    def record(data: dict[str, Any], t_ns: int) -> int:
        return ledger.event("irq", data, t_ns)

    decide: Decide | None = None
    if injector is not None:
        def decide(index: int, vector: int, now: float) -> IrqDecision | None:
            return injector.irq(session, index, vector, now)

    return IrqWatcher(record, decide)
