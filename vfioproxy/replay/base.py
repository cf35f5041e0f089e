"""What replaying as client and as server share: the state, the run, the report.

:class:`Replay` holds the recorded session (``script``), the live stream,
the options, the rebuilt fds, the divergences and the counters, and runs
the replay: a reader task (:meth:`Replay._read`) beside the player
(:meth:`Replay._main`), until the player is done or stops
(:class:`~vfioproxy.replay.report.StopReplay`); then it releases what the
replay holds (:meth:`Replay._release`), closes the stream (shielded from
cancellation) and assembles the :class:`~vfioproxy.replay.report.ReplayReport`.
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar, Literal

import trio

from vfioproxy.io.transport import FdStream
from vfioproxy.replay.fdrebuild import FdRebuilder
from vfioproxy.replay.report import Divergence, ReplayReport, StopReplay
from vfioproxy.replay.script import ReplayError, Script

__all__ = ["Replay"]


class Replay:
    """One replay over a connected ``stream`` (closed when it ends)."""

    #: ``"client"`` or ``"server"``: which recorded side is played
    mode: ClassVar[Literal["client", "server"]]

    def __init__(self, script: Script, stream: FdStream, options: Any, peer: str) -> None:
        self.script = script
        self.stream = stream
        self.options = options
        self.peer = peer
        self.fds = FdRebuilder()
        #: the first ``options.max_divergences`` divergences; ``dropped`` counts the rest
        self.divergences: list[Divergence] = []
        self.dropped = 0
        self.notes = list(script.notes)
        self.sent = self.received = self.compared = self.matched = self.replayed = 0
        #: why the replay stopped early (None: it played to the end)
        self.stopped: str | None = None
        #: why the live peer's stream closed (None: it did not)
        self.closed: str | None = None

    async def run(self) -> ReplayReport:
        """Play the session; the report says what matched and what diverged.

        Raises :class:`~vfioproxy.replay.script.ReplayError` when the trace of a
        session read on demand changed since it was loaded."""
        start = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read)
                with contextlib.suppress(StopReplay):
                    await self._main()
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            matched, rest = group.split(ReplayError)
            if matched is None or rest is not None:
                raise
            leaf: BaseException = matched
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            raise leaf from None  # the trace changed under the replay: one error, not a group
        finally:
            self.fds.close()
            self._release()
            with trio.CancelScope(shield=True):
                await self.stream.aclose()
                await self._aclose()
        self.stopped = self.stopped or self.script.end()
        return ReplayReport(
            mode=self.mode, trace=self.script.path, session=self.script.session, peer=self.peer,
            recorded=len(self.script), replayed=self.replayed, sent=self.sent,
            received=self.received, compared=self.compared, matched=self.matched,
            elapsed=trio.current_time() - start, divergences=tuple(self.divergences),
            stopped=self.stopped, notes=tuple(self.notes), dropped=self.dropped,
            max_divergences=self.options.max_divergences, damaged=self.script.damaged,
        )

    def diverged(self, divergence: Divergence) -> None:
        """Keep ``divergence`` in the report, or only count it once the report
        holds ``options.max_divergences``."""
        if len(self.divergences) < self.options.max_divergences:
            self.divergences.append(divergence)
        else:
            self.dropped += 1

    async def _read(self) -> None:
        """Receive the live peer's messages until it closes (a task beside the player)."""
        raise NotImplementedError

    async def _main(self) -> None:
        """Play the recorded side; raise StopReplay to stop early."""
        raise NotImplementedError

    def _release(self) -> None:
        """Release what the replay holds besides the rebuilt fds (on any end)."""

    async def _aclose(self) -> None:
        """Close what else the replay opened (shielded; after the stream)."""
