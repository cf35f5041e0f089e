"""The proxy's IRQ watcher on its own: real eventfds, a real thread; fds
counted in /proc/self/fd."""

from __future__ import annotations

import os
import select
import time
from typing import Any

import pytest

from vfioproxy.inject import Injector, IrqDecision
from vfioproxy.interpose import FdFate, FdPlan
from vfioproxy.io.fds import OwnedFd
from vfioproxy.proxy.irqs import IrqWatcher

MSIX = 2


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def plan(vector: int, index: int = MSIX) -> FdPlan:
    return FdPlan(FdFate.INTERPOSE, irq=(index, vector))


def client_eventfd() -> tuple[OwnedFd, int]:
    """An eventfd as a client makes it: the fd handed over, and the client's own copy."""
    fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    return OwnedFd(os.dup(fd)), fd


def wait_value(fd: int, timeout: float = 2.0) -> int:
    """The client's view: wait for its eventfd to be readable, read it."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    assert poller.poll(timeout * 1000), "the client's eventfd was never signalled"
    return os.eventfd_read(fd)


def readable(fd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


class Events:
    def __init__(self) -> None:
        self.items: list[tuple[dict[str, Any], int]] = []

    def __call__(self, data: dict[str, Any], t_ns: int) -> int:
        self.items.append((data, t_ns))
        return len(self.items)


def test_server_signals_reach_the_client_and_are_recorded() -> None:
    before = open_fds()
    events = Events()
    watcher = IrqWatcher(events)
    handed, client = client_eventfd()
    to_server = watcher.interpose(handed, plan(3))
    assert watcher.vectors == [(MSIX, 3)]
    os.eventfd_write(to_server.fileno(), 1)  # the server interrupts
    assert wait_value(client) == 1
    os.eventfd_write(to_server.fileno(), 1)
    assert wait_value(client) == 1
    to_server.close()
    watcher.close()  # the client is signalled first, then the event recorded: wait
    watcher.close()
    assert [e[0] for e in events.items] == [
        {"index": MSIX, "vector": 3, "count": 1, "fate": "signalled"}] * 2
    assert events.items[0][1] <= events.items[1][1]
    assert (watcher.read, watcher.signalled, watcher.dropped) == (2, 2, 0)
    os.close(client)
    assert open_fds() == before


def test_swap_and_release_close_what_was_kept() -> None:
    before = open_fds()
    events = Events()
    watcher = IrqWatcher(events)
    handed, old_client = client_eventfd()
    old_server = watcher.interpose(handed, plan(0))
    handed, other_client = client_eventfd()
    other_server = watcher.interpose(handed, plan(1))
    during = open_fds()
    handed, new_client = client_eventfd()
    new_server = watcher.interpose(handed, plan(0))  # re-pointed: swapped
    # the client's two, the watcher's substitute and the server's copy; the old
    # substitute and kept client fd closed
    assert open_fds() == during + 2 + 2 - 2
    # the old substitute is no longer watched: the old client is not signalled
    os.eventfd_write(old_server.fileno(), 1)
    os.eventfd_write(new_server.fileno(), 1)
    assert wait_value(new_client) == 1
    assert not readable(old_client, 0.05)
    watcher.release([(MSIX, 1), (MSIX, 9)])  # a vector never interposed is ignored
    assert watcher.vectors == [(MSIX, 0)]
    os.eventfd_write(other_server.fileno(), 1)
    assert not readable(other_client, 0.05)
    for fd in (old_server, other_server, new_server):
        fd.close()
    watcher.close()
    for fd in (old_client, other_client, new_client):
        os.close(fd)
    assert open_fds() == before
    assert [e[0]["vector"] for e in events.items] == [0]


def test_close_with_nothing_interposed_and_after_close() -> None:
    before = open_fds()
    watcher = IrqWatcher(Events())
    watcher.close()
    handed, client = client_eventfd()
    with pytest.raises(OSError):
        watcher.interpose(handed, plan(0))
    handed.close()
    os.close(client)
    assert open_fds() == before


def test_coalesced_signals_are_one_read_with_their_count() -> None:
    events = Events()
    watcher = IrqWatcher(events)
    handed, client = client_eventfd()
    to_server = watcher.interpose(handed, plan(0))
    with watcher._lock:  # three signals land before the thread can read
        for _ in range(3):
            os.eventfd_write(to_server.fileno(), 1)
    assert wait_value(client) == 3
    to_server.close()
    watcher.close()
    assert events.items[0][0]["count"] == 3
    os.close(client)


def test_injected_drop_and_delay_keep_order_per_vector() -> None:
    events = Events()
    # vector 0 dropped; vector 1: its first interrupt delayed, the second not
    injector = Injector(["irq MSIX[0] drop", "irq MSIX[1] index=0 delay fixed(150ms)"])

    def decide(index: int, vector: int, now: float) -> IrqDecision | None:
        return injector.irq(5, index, vector, now)

    watcher = IrqWatcher(events, decide)
    h0, c0 = client_eventfd()
    h1, c1 = client_eventfd()
    s0, s1 = watcher.interpose(h0, plan(0)), watcher.interpose(h1, plan(1))
    os.eventfd_write(s0.fileno(), 1)
    start = time.monotonic()
    while len(events.items) < 1:
        time.sleep(0.001)
    os.eventfd_write(s1.fileno(), 1)
    while len(events.items) < 2:
        time.sleep(0.001)
    os.eventfd_write(s1.fileno(), 1)  # not delayed itself, but held behind the first
    assert wait_value(c1) in (1, 2)
    waited = time.monotonic() - start
    assert waited >= 0.14
    fate = [(e[0]["vector"], e[0]["fate"]) for e in events.items]
    assert fate == [(0, "dropped"), (1, "delayed"), (1, "delayed")]
    assert events.items[1][0]["applied"] == [
        {"rule": 2, "action": "delay", "text": "delay fixed(150ms)", "value": 0.15}]
    assert events.items[1][0]["delay"] == pytest.approx(0.15, abs=0.01)
    assert "applied" not in events.items[2][0]  # held behind the first, not delayed by a rule
    assert events.items[0][0]["applied"][0]["action"] == "drop"
    assert not readable(c0, 0.05)  # the dropped one never reached the client
    assert watcher.dropped == 1
    for fd in (s0, s1):
        fd.close()
    watcher.close()
    os.close(c0)
    os.close(c1)


def test_close_with_a_delay_pending_closes_everything() -> None:
    before = open_fds()
    injector = Injector(["irq * delay fixed(60s)"])
    watcher = IrqWatcher(Events(), lambda i, v, now: injector.irq(1, i, v, now))
    handed, client = client_eventfd()
    to_server = watcher.interpose(handed, plan(0))
    os.eventfd_write(to_server.fileno(), 1)
    time.sleep(0.02)
    started = time.monotonic()
    watcher.close()
    assert time.monotonic() - started < 1.0
    to_server.close()
    assert not readable(client, 0)
    os.close(client)
    assert open_fds() == before


def test_beyond_the_watcher_limit_no_fd_is_taken(monkeypatch) -> None:
    import threading

    from vfioproxy.proxy import irqs

    monkeypatch.setattr(irqs, "_watchers", threading.BoundedSemaphore(1))
    before = open_fds()
    first, second = IrqWatcher(Events()), IrqWatcher(Events())
    handed, client = client_eventfd()
    to_server = first.interpose(handed, plan(0))
    other, other_client = client_eventfd()
    with pytest.raises(OSError, match="already have an IRQ watcher"):
        second.interpose(other, plan(0))
    assert not other.closed  # not taken: the relay forwards it as it is
    first.close()
    second.interpose(other, plan(0)).close()  # the slot is free again
    second.close()
    for fd in (to_server,):
        fd.close()
    os.close(client)
    os.close(other_client)
    assert open_fds() == before


def test_short_delays_are_kept_to_well_under_a_millisecond() -> None:
    injector = Injector(["irq * delay fixed(300us)"])
    watcher = IrqWatcher(Events(), lambda i, v, now: injector.irq(1, i, v, now))
    handed, client = client_eventfd()
    to_server = watcher.interpose(handed, plan(0))
    waited = []
    for _ in range(15):
        start = time.monotonic()
        os.eventfd_write(to_server.fileno(), 1)
        wait_value(client)
        waited.append(time.monotonic() - start)
    to_server.close()
    watcher.close()
    os.close(client)
    waited.sort()
    assert waited[0] >= 0.0003
    assert waited[len(waited) // 2] < 0.0003 + 0.0007  # epoll alone would give >= 1 ms
