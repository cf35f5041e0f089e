"""Sleeping until a deadline with microsecond precision, in trio.

trio waits for its deadlines in ``epoll_wait``, whose timeout is in whole
milliseconds (CPython rounds up), so ``trio.sleep(50e-6)`` sleeps about a
millisecond. Injected delays of tens of microseconds need better: a
``timerfd`` armed for the rest of the delay wakes ``epoll_wait`` when it
expires. Waking up takes a while itself (20-30 us on a VM), so the timer
is armed that much early (a running estimate) and the last microseconds are
spent in checkpoints. Under a clock that is not trio's system clock
(``trio.testing.MockClock`` in tests) the deadline is the clock's own and
:func:`trio.sleep_until` is exact already.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os

import trio
import trio.testing

__all__ = ["PreciseSleeper", "TimerFd", "WakeLatency"]

_CLOCK_MONOTONIC = 1
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC
#: above this, sleep with trio first (epoll's millisecond timeout may be a
#: millisecond late) and leave the last _COARSE_MARGIN to the timerfd
_COARSE = 0.004
_COARSE_MARGIN = 0.003


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.timerfd_settime.argtypes = [
            ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec), ctypes.c_void_p,
        ]
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


class TimerFd:
    """A Linux timerfd: readable once the time it was armed for has passed.

    Usable from trio (wait for it to be readable) or in a thread's ``poll``
    set. Raises :class:`OSError` where timerfd does not exist.
    """

    def __init__(self) -> None:
        if _LIBC is None:
            raise OSError("timerfd is not available here")
        fd = _LIBC.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_create: {os.strerror(err)}")
        self.fd: int = fd

    def fileno(self) -> int:
        return self.fd

    def arm(self, seconds: float) -> None:
        """Expire ``seconds`` from now (at least a nanosecond); re-arming replaces."""
        self._set(max(seconds, 1e-9))

    def disarm(self) -> None:
        self._set(0.0)

    def clear(self) -> None:
        """Take the expiry (the fd is not readable until it expires again)."""
        with contextlib.suppress(BlockingIOError):
            os.read(self.fd, 8)

    def _set(self, seconds: float) -> None:
        assert _LIBC is not None
        whole = int(seconds)
        spec = _Itimerspec(_Timespec(0, 0), _Timespec(whole, int((seconds - whole) * 1e9)))
        if _LIBC.timerfd_settime(self.fd, 0, ctypes.byref(spec), None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_settime: {os.strerror(err)}")

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


class WakeLatency:
    """A running estimate of how late a timerfd wakes its waiter: a timer is
    armed that much early and the rest spun. ``cap`` bounds one observation
    (a waiter that was busy elsewhere is not the timer's lateness)."""

    def __init__(self, initial: float = 0.0, cap: float = math.inf) -> None:
        self.value = initial
        self._cap = cap

    def update(self, late: float) -> None:
        self.value = max(0.0, 0.8 * self.value + 0.2 * min(late, self._cap))


class PreciseSleeper:
    """Sleeps of one task until deadlines on trio's clock, precise to microseconds.

    Owns a timerfd (made on first use); :meth:`close` it when done. Without
    timerfd (not Linux) it falls back to :func:`trio.sleep_until`.
    """

    def __init__(self) -> None:
        self._timer: TimerFd | None = None
        self._wake_latency = WakeLatency()

    async def sleep_until(self, deadline: float) -> None:
        """Return at ``deadline`` (trio time); always a checkpoint."""
        remaining = deadline - trio.current_time()
        if remaining <= 0:
            await trio.lowlevel.checkpoint()
            return
        if _LIBC is None or isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock):
            await trio.sleep_until(deadline)
            return
        if remaining > _COARSE:
            await trio.sleep_until(deadline - _COARSE_MARGIN)
            remaining = deadline - trio.current_time()
        lead = self._wake_latency.value
        if remaining > lead:
            await self._wait_timerfd(remaining - lead)
            self._wake_latency.update(trio.current_time() - (deadline - lead))
        while trio.current_time() < deadline:
            await trio.lowlevel.checkpoint()

    async def _wait_timerfd(self, seconds: float) -> None:
        if self._timer is None:
            self._timer = TimerFd()
        self._timer.arm(seconds)
        try:
            await trio.lowlevel.wait_readable(self._timer.fd)
        finally:
            self._timer.clear()

    def close(self) -> None:
        if self._timer is not None:
            trio.lowlevel.notify_closing(self._timer.fd)
            self._timer.close()
            self._timer = None
