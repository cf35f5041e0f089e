"""PreciseSleeper: never early, exact under MockClock, its timerfd closed."""

import os

import trio
import trio.testing

from tests.conftest import FD_HYGIENE
from vfioproxy.proxy.timer import PreciseSleeper

pytestmark = FD_HYGIENE


async def test_it_never_returns_before_the_deadline_on_the_real_clock():
    sleeper = PreciseSleeper()
    try:
        for delay in (0.0, 20e-6, 300e-6, 0.006):
            deadline = trio.current_time() + delay
            await sleeper.sleep_until(deadline)
            assert trio.current_time() >= deadline
    finally:
        sleeper.close()


async def test_a_deadline_in_the_past_is_a_checkpoint():
    sleeper = PreciseSleeper()
    with trio.CancelScope() as scope:
        scope.cancel()
        await sleeper.sleep_until(trio.current_time() - 1)
    assert scope.cancelled_caught
    sleeper.close()


async def test_under_a_mock_clock_it_is_trios_own_sleep(autojump_clock):
    sleeper = PreciseSleeper()
    start = trio.current_time()
    await sleeper.sleep_until(start + 0.000250)
    assert trio.current_time() == start + 0.000250
    sleeper.close()


async def test_cancelling_a_wait_leaves_the_timer_usable():
    sleeper = PreciseSleeper()
    try:
        with trio.move_on_after(0.001):
            await sleeper.sleep_until(trio.current_time() + 10)
        deadline = trio.current_time() + 100e-6
        await sleeper.sleep_until(deadline)
        assert trio.current_time() >= deadline
        fd = sleeper._timer.fd
        assert fd >= 0
    finally:
        sleeper.close()
    assert not os.path.exists(f"/proc/self/fd/{fd}") or os.readlink(f"/proc/self/fd/{fd}") != \
        "anon_inode:[timerfd]"
