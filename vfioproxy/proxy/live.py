"""The proxy's live view: one line per message, and a periodic status line."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

import trio

from recorder.records import FdRecord
from vfioproxy.protocol.listing import RequestTimes, describe_fd, message_line, note_line
from vfioproxy.protocol.pci import Capability
from vfioproxy.protocol.pci_view import PciView, describe
from vfioproxy.protocol.session import Observation
from vfioproxy.proxy.core import Proxy
from vfioproxy.proxy.ledger import SessionLedger
from vfioproxy.proxy.model import ProxyStatistics

#: ``accept(session, obs, t_ns, seq, latency_ns, session_start_ns, caps)``: whether
#: the live view prints a message (a display filter, ``-Y``, the CLI builds);
#: ``caps``: the PCI capabilities of the session's config space read so far
Accept = Callable[[int, Observation, int, int, int | None, int, tuple[Capability, ...]], bool]

#: back to the start of the line, and erase it
_CLEAR = "\r\x1b[K"


class StatusLine:
    """The one status line at the bottom of a terminal, which message lines
    printed above it (:class:`MessageLog`, from any thread) push down: each
    is written with the status line cleared first and drawn again after."""

    def __init__(self, out: TextIO = sys.stderr) -> None:
        self.out = out
        self.text = ""
        self._lock = threading.Lock()

    def show(self, text: str) -> None:
        """Replace the status line with ``text`` ("" clears it)."""
        with self._lock:
            self.text = text
            self.out.write(_CLEAR + text)
            self.out.flush()

    def above(self, out: TextIO, lines: list[str]) -> None:
        """Write ``lines`` to ``out`` above the status line."""
        with self._lock:
            if self.text:
                self.out.write(_CLEAR)
                self.out.flush()
            out.write("".join(line + "\n" for line in lines))
            out.flush()
            if self.text:
                self.out.write(self.text)
                self.out.flush()


class MessageLog:
    """A proxy observer printing each forwarded message as ``trace show`` lists it
    (:func:`~vfioproxy.protocol.listing.message_line`): the seq its record has
    in the trace (or would have: ``proxy -v``), the time, direction, session,
    header, the decoded PCI-aware summary, the latency of replies, and the
    message's violations under it. ``status``: the terminal's status line, kept
    below the lines. ``accept``: which messages to print (default: all); every
    message still feeds the session's PCI view and latencies."""

    def __init__(self, out: TextIO = sys.stdout, status: StatusLine | None = None,
                 accept: Accept | None = None) -> None:
        self.out = out
        self.status = status
        self.accept = accept
        self._pci: dict[int, PciView] = {}
        self._times: dict[int, RequestTimes] = {}
        #: each session's first message time (``t`` of a filter counts from it)
        self._starts: dict[int, int] = {}
        self._origin: int | None = None

    def __call__(self, session: SessionLedger, obs: Observation, t_ns: int, seq: int) -> None:
        if self._origin is None:
            self._origin = t_ns
        sid = session.id
        pci = self._pci.get(sid)
        if pci is None:
            pci = self._pci[sid] = PciView()
            self._times[sid] = RequestTimes()
            self._starts[sid] = t_ns
        message = obs.message
        text = describe(obs, pci)  # a filtered-out message still teaches the PCI view
        latency_ns = self._times[sid].latency(obs, t_ns)
        if self.accept is not None and not self.accept(sid, obs, t_ns, seq, latency_ns,
                                                       self._starts[sid], pci.capabilities):
            return
        fds = message.fds
        described = ", ".join(describe_fd(fd) if isinstance(fd, FdRecord) else "fd"
                              for fd in fds)
        lines = [message_line(seq, t_ns, self._origin, obs.direction, sid, message.header,
                              text, fds=described, latency_ns=latency_ns)]
        lines.extend(note_line(f"!!! {violation}") for violation in obs.violations)
        if self.status is not None:
            self.status.above(self.out, lines)
        else:
            self.out.write("".join(line + "\n" for line in lines))
            self.out.flush()

    @property
    def sessions(self) -> frozenset[int]:
        """The sessions it keeps something of (those still running)."""
        return frozenset(self._pci)

    def forget(self, session: int) -> None:
        """Drop what it kept of a session that ended (its PCI view, its requests)."""
        self._pci.pop(session, None)
        self._times.pop(session, None)
        self._starts.pop(session, None)


def _rate(now: int, before: int, seconds: float) -> str:
    return f"{(now - before) / seconds:.0f}/s"


def status_text(stats: ProxyStatistics, before: ProxyStatistics, seconds: float) -> str:
    """``sessions 1/3 | c2s 120 msg 4.1 KiB 12/s | s2c ...`` for a terminal."""
    parts = [f"sessions {stats.sessions_active}/{stats.sessions_total}"]
    for name in ("c2s", "s2c"):
        now, old = getattr(stats, name), getattr(before, name)
        parts.append(
            f"{name} {now.messages} msg {now.bytes / 1024:.1f} KiB "
            f"{_rate(now.messages, old.messages, seconds)}"
        )
    if stats.violations:
        parts.append(f"violations {stats.violations}")
    return " | ".join(parts)


async def run_status_line(
    proxy: Proxy, status: StatusLine | TextIO = sys.stderr, interval: float = 1.0
) -> None:
    """Rewrite the status line (``status``, or a new one on that stream) every
    ``interval`` seconds, until cancelled; it is cleared on the way out."""
    line = status if isinstance(status, StatusLine) else StatusLine(status)
    before = proxy.statistics()
    last = time.monotonic()
    try:
        while True:
            await trio.sleep(interval)
            now = time.monotonic()
            stats = proxy.statistics()
            line.show(status_text(stats, before, now - last))
            before, last = stats, now
    finally:
        line.show("")
