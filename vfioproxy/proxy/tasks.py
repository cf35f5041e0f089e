"""The trio forwarder: the same relay steps, waited for by trio tasks.

Used where forwarding must follow trio's clock (``trio.testing.MockClock``
in tests; experiments with in-process peers) or share a run loop with the
peers: ``--forwarding trio``. Each peer connection has a reading task
(readable, then one :meth:`~vfioproxy.proxy.relay.Relay.readable` step per
message) and a writing task (writable, or asleep until a held message falls
due), so the two directions are as independent as on the thread. A task
with nothing to wait for parks until some step changes what the relay
wants.

Cancellation ends the session as stopped ("proxy shut down"): what waited
is recorded as undelivered, and the sockets are closed.
"""

from __future__ import annotations

import trio

from vfioproxy.proxy.relay import Leg, Relay
from vfioproxy.proxy.timer import PreciseSleeper

__all__ = ["TaskForwarder"]


class TaskForwarder:
    """Runs one :class:`Relay` on trio tasks (see the module docstring)."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self._changed = trio.Event()

    async def run(self) -> None:
        """Forward until both directions are done or the ledger asks to stop,
        then end the session. Cancellation stops it at once."""
        relay = self.relay
        try:
            async with trio.open_nursery() as nursery:
                for leg in relay.legs:
                    nursery.start_soon(self._reading, leg)
                    nursery.start_soon(self._writing, leg)
                while not relay.finished and relay.ledger.stop_reason is None:
                    await self._wait_change()
                nursery.cancel_scope.cancel()
        except BaseException as exc:
            relay.end(exc)
            raise
        relay.end()

    def _stepped(self) -> None:
        """After a relay step: wake the tasks parked on a change."""
        if self.relay.changed or self.relay.finished or self.relay.ledger.stop_reason:
            self.relay.changed = False
            self._changed.set()
            self._changed = trio.Event()

    async def _wait_change(self) -> None:
        await self._changed.wait()

    async def _reading(self, leg: Leg) -> None:
        relay = self.relay
        while True:
            if not relay.wants_read(leg):
                await self._wait_change()
                continue
            if relay.readable(leg):
                self._stepped()
                await trio.lowlevel.checkpoint()
            else:
                await trio.lowlevel.wait_readable(leg.sock)

    async def _writing(self, leg: Leg) -> None:
        relay = self.relay
        sleeper = PreciseSleeper()
        try:
            while True:
                if relay.wants_write(leg):
                    await trio.lowlevel.wait_writable(leg.sock)
                elif leg.outbox and not leg.gone:
                    due = leg.outbox.next_release()
                    if due is not None:
                        await sleeper.sleep_until(due)
                else:
                    await self._wait_change()
                    continue
                relay.writable(leg)
                self._stepped()
        finally:
            sleeper.close()
