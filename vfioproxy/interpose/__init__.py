"""Interposition: opt-in rewrites that put on the wire what would not cross it.

A transparent proxy sees only the socket. Most of a device's life does not
cross it: the guest touches mmap'd BAR areas directly, the server reaches
guest RAM through the memfds of DMA_MAP, interrupts travel over eventfds.
Each interposition mode rewrites the session so that such traffic becomes
messages (or events) the proxy records with the rest. They are off unless
the user asks (``record``/``proxy`` flags, a rules file's ``[interpose]``
table, :class:`InterposeOptions` in the Python API):

- ``trap-mmap`` (:mod:`.mmap`): DEVICE_GET_REGION_INFO replies lose their
  MMAP flag and sparse-mmap capability and their fd is withheld, so the
  client reaches every BAR through REGION_READ/REGION_WRITE;
- ``trap-dma`` (:mod:`.dma`): DMA_MAP's fd is withheld (for the windows
  asked for), so the server reaches guest memory with DMA_READ/DMA_WRITE;
- ``interpose-irqs`` (:mod:`.irqs`): the eventfds of SET_IRQS are swapped
  for the proxy's own, which it watches, records (``irq`` events) and
  passes on.

This package is sans-IO, as :mod:`vfioproxy.inject` is: a mode sees a
message's bytes and the number of fds it carries and says what the receiver
is to get (:class:`Interposed`): the bytes, and for each fd whether it is
forwarded, withheld (the proxy closes it) or interposed (the proxy keeps it
and forwards a substitute it owns). The proxy (:mod:`vfioproxy.proxy`) does
the fds and the recording: the message record holds what the receiver got;
an ``interpose`` event written with it says which mode acted, how, and
what arrived (FORMAT.md §6).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Protocol

import attrs

from vfioproxy.errors import UsageError
from vfioproxy.protocol.offsets import COMMAND
from vfioproxy.side import Direction

__all__ = [
    "MODES",
    "FdFate",
    "FdPlan",
    "InterposeOptions",
    "Interposed",
    "IovaRange",
    "Mode",
    "SessionInterposer",
    "session_interposer",
]

#: the modes, in the order they act on a message (names as flags and TOML keys spell them)
MODES = ("trap-mmap", "trap-dma", "interpose-irqs")

_U64 = (1 << 64) - 1
_NUMBER = r"(?:0[xX][0-9a-fA-F]+|[0-9]+)"
_RANGE = re.compile(rf"\s*({_NUMBER})\s*([-+])\s*({_NUMBER})\s*")


@attrs.frozen(order=True)
class IovaRange:
    """A range of guest I/O virtual addresses, ``[start, end)``."""

    start: int
    end: int

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.start < self.end <= _U64 + 1:
            raise ValueError(f"not an IOVA range: [{self.start:#x}, {self.end:#x})")

    @classmethod
    def parse(cls, text: str) -> IovaRange:
        """``START-END`` (end exclusive) or ``START+SIZE``, decimal or 0x hex:
        ``0x0-0x80000000``, ``0xfffc0000+0x40000``. A :class:`UsageError`
        names what is wrong."""
        m = _RANGE.fullmatch(text)
        if m is None:
            raise UsageError(f"IOVA range {text!r}: write START-END or START+SIZE "
                             "(0x0-0x80000000, 0xfffc0000+0x40000)")
        start, op, other = int(m[1], 0), m[2], int(m[3], 0)
        end = start + other if op == "+" else other
        if not start < end <= _U64 + 1:
            raise UsageError(f"IOVA range {text!r}: empty or past 2^64")
        return cls(start, end)

    def overlaps(self, iova: int, size: int) -> bool:
        """Whether ``[iova, iova + size)`` shares an address with this range."""
        return iova < self.end and self.start < iova + size

    def __str__(self) -> str:
        return f"{self.start:#x}-{self.end:#x}"


@attrs.frozen
class InterposeOptions:
    """Which interposition modes are on (all off by default).

    ``trap_dma``: None when off; the IOVA ranges whose DMA_MAP windows are
    trapped, every window when empty."""

    trap_mmap: bool = False
    trap_dma: tuple[IovaRange, ...] | None = None
    interpose_irqs: bool = False

    @property
    def enabled(self) -> bool:
        """Whether any mode is on."""
        return self.trap_mmap or self.trap_dma is not None or self.interpose_irqs

    def to_dict(self) -> dict[str, Any]:
        """The modes that are on, as ``session_open``'s ``interpose`` map and a
        rules file's ``[interpose]`` table write them (empty when none)."""
        out: dict[str, Any] = {}
        if self.trap_mmap:
            out["trap-mmap"] = True
        if self.trap_dma is not None:
            out["trap-dma"] = [str(r) for r in self.trap_dma]
        if self.interpose_irqs:
            out["interpose-irqs"] = True
        return out

    @classmethod
    def from_dict(cls, table: Mapping[str, Any], where: str = "[interpose]") -> InterposeOptions:
        """The inverse of :meth:`to_dict` (a rules file's table, a trace's
        ``session_open``); ``trap-dma`` may also be ``true`` (every window).
        A :class:`UsageError` names a key or value that is wrong."""
        unknown = sorted(set(table) - set(MODES))
        if unknown:
            raise UsageError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(MODES)})")
        for key in ("trap-mmap", "interpose-irqs"):
            if not isinstance(table.get(key, False), bool):
                raise UsageError(f"{where}: {key} must be true or false")
        dma = table.get("trap-dma", False)
        ranges: tuple[IovaRange, ...] | None
        if dma is False:
            ranges = None
        elif dma is True:
            ranges = ()
        elif isinstance(dma, list) and all(isinstance(r, str) for r in dma):
            ranges = tuple(IovaRange.parse(r) for r in dma)
        else:
            raise UsageError(f"{where}: trap-dma must be true, false or a list of IOVA "
                             "ranges (\"0x0-0x80000000\")")
        return cls(trap_mmap=table.get("trap-mmap", False), trap_dma=ranges,
                   interpose_irqs=table.get("interpose-irqs", False))


class FdFate(enum.Enum):
    """What becomes of one fd a message carried."""

    FORWARD = "forward"  # the receiver gets it, as without interposition
    WITHHOLD = "withhold"  # the proxy closes it: the receiver gets none in its place
    INTERPOSE = "interpose"  # the proxy keeps it and forwards a substitute it owns


@attrs.frozen
class FdPlan:
    """One fd's fate; for ``INTERPOSE``, what the substitute stands for
    (``irq``: the IRQ index and vector whose eventfd it is)."""

    fate: FdFate
    irq: tuple[int, int] | None = None


#: every fd forwarded (a message no mode changes the fds of)
FORWARD = FdPlan(FdFate.FORWARD)


@attrs.frozen
class Interposed:
    """What a mode makes of one message: ``data``, the bytes the receiver
    gets; ``fds``, one plan per fd that arrived, in order; ``release``, the
    interposed IRQ vectors (index, vector) this message ends (their
    substitutes and kept fds are closed); ``mode``, which mode acted;
    ``note``, what it did, recorded in the ``interpose`` event (JSON-able:
    ints, strings, lists, maps)."""

    data: bytes
    fds: tuple[FdPlan, ...]
    mode: str
    note: dict[str, Any] = attrs.Factory(dict)
    release: tuple[tuple[int, int], ...] = ()


class Mode(Protocol):
    """One interposition mode's state in one session (sans-IO).

    A mode may also have a class attribute ``commands``
    (``frozenset[int]``): the only commands (header command numbers) whose
    messages it acts on, in its directions. The C lane then hands back only
    those (the others stay as fast as without the mode) and the mode sees
    no other; without it the mode sees every message of its directions."""

    name: ClassVar[str]
    #: the directions whose messages it must see (the C lane hands them back)
    directions: ClassVar[frozenset[Direction]]

    def message(self, direction: Direction, data: bytes, nfds: int) -> Interposed | None:
        """What the receiver gets of a whole message (None: it as it arrived).
        A message that does not decode is left alone (None)."""
        ...


class SessionInterposer:
    """The modes that are on, for one session: each message goes through them
    in :data:`MODES` order; the first that acts decides it (the modes act on
    different commands, so at most one acts on a message)."""

    def __init__(self, modes: Sequence[Mode]) -> None:
        self.modes = tuple(modes)
        #: the directions some mode must see
        self.directions = frozenset(d for mode in self.modes for d in mode.directions)
        self._commands = {mode.name: _commands_of(mode) for mode in self.modes}

    def commands(self, direction: Direction) -> frozenset[int] | None:
        """The commands whose messages of ``direction`` some mode must see
        (None: every message; empty: none)."""
        out: set[int] = set()
        for mode in self.modes:
            if direction in mode.directions:
                commands = self._commands[mode.name]
                if commands is None:
                    return None
                out |= commands
        return frozenset(out)

    def message(self, direction: Direction, data: bytes, nfds: int) -> Interposed | None:
        """What the receiver gets of a message (None: it as it arrived)."""
        if direction not in self.directions:
            return None
        command = (int.from_bytes(data[COMMAND.offset:COMMAND.end], "little")
                   if len(data) >= COMMAND.end else None)
        for mode in self.modes:
            if direction in mode.directions:
                commands = self._commands[mode.name]
                if commands is not None and command not in commands:
                    continue
                done = mode.message(direction, data, nfds)
                if done is not None:
                    return done
        return None

    def closing(self, closed_by: str) -> list[tuple[str, str]]:
        """What the modes have to say as the session ends (``closed_by``:
        ``client``, ``server`` or ``proxy``), as (mode, text) pairs: a mode
        with a ``closing(closed_by) -> str | None`` method may warn about
        what its rewrite may have caused (the proxy logs and records each as
        a ``note`` event)."""
        out = []
        for mode in self.modes:
            closing = getattr(mode, "closing", None)
            text = closing(closed_by) if closing is not None else None
            if text:
                out.append((mode.name, text))
        return out


def _commands_of(mode: Mode) -> frozenset[int] | None:
    """A mode's ``commands`` (see :class:`Mode`), None when it has none."""
    commands = getattr(mode, "commands", None)
    return None if commands is None else frozenset(int(c) for c in commands)


def session_interposer(options: InterposeOptions) -> SessionInterposer | None:
    """The modes ``options`` turns on, fresh for one session (each keeps its
    own state); None when none is on. Each mode's module adds its line here,
    in :data:`MODES` order."""
    if not options.enabled:
        return None
    modes: list[Mode] = []
    if options.trap_mmap:
        from vfioproxy.interpose.mmap import TrapMmap
        modes.append(TrapMmap())
    if options.trap_dma is not None:
        from vfioproxy.interpose.dma import TrapDma
        modes.append(TrapDma(options.trap_dma))
    if options.interpose_irqs:
        from vfioproxy.interpose.irqs import InterposeIrqs
        modes.append(InterposeIrqs())
    return SessionInterposer(modes) if modes else None
