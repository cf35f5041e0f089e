"""The proxy's live view: one line per message, and a periodic status line."""

from __future__ import annotations

import sys
import time
from typing import TextIO

import trio

from vfioproxy.protocol.pci_view import PciView, describe
from vfioproxy.protocol.session import Observation
from vfioproxy.proxy.core import Proxy
from vfioproxy.proxy.ledger import SessionLedger
from vfioproxy.proxy.model import ProxyStatistics


class MessageLog:
    """A proxy observer printing each forwarded message, decoded and PCI-aware."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out
        self._pci: dict[int, PciView] = {}
        self._origin: int | None = None

    def __call__(self, session: SessionLedger, obs: Observation, t_ns: int) -> None:
        if self._origin is None:
            self._origin = t_ns
        pci = self._pci.setdefault(session.id, PciView())
        message = obs.message
        line = (
            f"{(t_ns - self._origin) / 1e6:11.3f} s{session.id} {obs.direction.value} "
            f"{message.header.describe():<36} {describe(obs, pci)}"
        )
        if message.fds:
            line += f"  [{len(message.fds)} fd(s)]"
        print(line, file=self.out, flush=True)
        for violation in obs.violations:
            print(f"{'':>11} !!! {violation}", file=self.out, flush=True)

    def forget(self, session: int) -> None:
        self._pci.pop(session, None)


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


async def run_status_line(proxy: Proxy, out: TextIO = sys.stderr, interval: float = 1.0) -> None:
    """Rewrite one status line on ``out`` every ``interval`` seconds, until cancelled."""
    before = proxy.statistics()
    last = time.monotonic()
    try:
        while True:
            await trio.sleep(interval)
            now = time.monotonic()
            stats = proxy.statistics()
            out.write("\r\x1b[K" + status_text(stats, before, now - last))
            out.flush()
            before, last = stats, now
    finally:
        out.write("\r\x1b[K")
        out.flush()
