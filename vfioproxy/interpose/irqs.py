"""``interpose-irqs``: the proxy stands in for every eventfd of DEVICE_SET_IRQS.

A client hands the server one eventfd per interrupt vector
(``DEVICE_SET_IRQS`` with ``DATA_EVENTFD|ACTION_TRIGGER``); the server writes
to it to interrupt, and the proxy never sees that. With this mode on, the
proxy keeps each such fd and forwards an eventfd of its own in its place
(:attr:`~vfioproxy.interpose.FdFate.INTERPOSE`, with the vector it stands
for); the proxy's watcher (:mod:`vfioproxy.proxy.irqs`) reads it, records an
``irq`` event and signals the client's fd.

How fds pair with vectors, as QEMU (``hw/vfio-user/device.c``) and
libvfio-user (``lib/irq.c``) do it: fd ``j`` of a SET_IRQS is vector
``start + j`` of ``index``, and a message carries either one fd per vector
(``count`` fds) or none. QEMU splits a table with ``-1`` entries into runs:
a run of valid fds is sent with its fds, a run of ``-1`` as a SET_IRQS with
``count`` vectors and no fd, which disables them. So this mode:

- interposes every fd of a ``DATA_EVENTFD|ACTION_TRIGGER`` SET_IRQS that
  carries exactly ``count`` fds; a vector it already stood in for is
  swapped (not in :attr:`~vfioproxy.interpose.Interposed.release`: the
  proxy's substitutes close the old substitute and kept fd when they take
  the new one, whatever order the relay calls them in);
- releases the vectors a SET_IRQS disables: ``DATA_EVENTFD`` with no fd
  (``[start, start + count)``), ``DATA_NONE|ACTION_TRIGGER`` with count 0
  (every vector of the index);
- leaves alone ``ACTION_MASK``/``ACTION_UNMASK``, ``DATA_BOOL`` and
  ``DATA_NONE`` with a count (those fire or mask vectors: the fds stay),
  and any SET_IRQS that does not decode or whose fds do not match its
  count (bad input is forwarded as it came; the server refuses it).

It acts on the command as it passes: a SET_IRQS the server then refuses
still swapped the proxy's fds (the server got the substitutes, or none).

ioeventfds (DEVICE_GET_REGION_IO_FDS replies) are not interposed: neither
QEMU's client nor the reference client asks for them (README says so).
"""

from __future__ import annotations

from typing import Any, ClassVar

from vfioproxy.errors import ProtocolError
from vfioproxy.interpose import FdFate, FdPlan, Interposed
from vfioproxy.protocol.bodies import IrqSetBody
from vfioproxy.protocol.constants import (
    IRQ_SET_ACTION_MASK,
    IRQ_SET_DATA_MASK,
    IrqSetFlags,
    irq_vector_name,
)
from vfioproxy.protocol.header import HEADER_SIZE, Command, Header
from vfioproxy.side import Direction

__all__ = ["InterposeIrqs"]

_TRIGGER = int(IrqSetFlags.ACTION_TRIGGER)
_EVENTFD = int(IrqSetFlags.DATA_EVENTFD)
_NONE = int(IrqSetFlags.DATA_NONE)


class InterposeIrqs:
    """The ``interpose-irqs`` mode's state in one session: which vectors the
    proxy stands in for (:attr:`interposed`)."""

    name: ClassVar[str] = "interpose-irqs"
    directions: ClassVar[frozenset[Direction]] = frozenset({Direction.C2S})
    #: the C lane hands back only these (every other c2s message stays in C)
    commands: ClassVar[frozenset[int]] = frozenset({Command.DEVICE_SET_IRQS})

    def __init__(self) -> None:
        #: (index, vector) of every vector whose eventfd the proxy stands in for now
        self.interposed: set[tuple[int, int]] = set()

    def message(self, direction: Direction, data: bytes, nfds: int) -> Interposed | None:
        """What the server gets of a SET_IRQS (None: any other message, or one
        this mode leaves alone). The bytes are never changed: only fds."""
        if direction is not Direction.C2S or len(data) < HEADER_SIZE:
            return None
        header = Header.parse(data)
        if header.command != Command.DEVICE_SET_IRQS or not header.is_command:
            return None
        try:
            body = IrqSetBody.parse(data[HEADER_SIZE:header.size])
        except ProtocolError:  # a body that does not decode is left alone
            return None
        action = body.flags & IRQ_SET_ACTION_MASK
        kind = body.flags & IRQ_SET_DATA_MASK
        if action != _TRIGGER:
            return None
        if kind == _EVENTFD and nfds and nfds == body.count:
            vectors = [(body.index, body.start + j) for j in range(nfds)]
            swapped = [v for v in vectors if v in self.interposed]
            self.interposed.update(vectors)
            plans = tuple(FdPlan(FdFate.INTERPOSE, irq=v) for v in vectors)
            return self._done(data, plans, body, vectors, (), swapped)
        if (kind == _EVENTFD and nfds == 0) or (kind == _NONE and body.count == 0 and nfds == 0):
            if body.count == 0:
                released = tuple(sorted(v for v in self.interposed if v[0] == body.index))
            else:
                end = body.start + body.count
                released = tuple(sorted(v for v in self.interposed
                                        if v[0] == body.index and body.start <= v[1] < end))
            if not released:
                return None
            self.interposed.difference_update(released)
            return self._done(data, (), body, [], released, [])
        return None

    def _done(self, data: bytes, plans: tuple[FdPlan, ...], body: IrqSetBody,
              vectors: list[tuple[int, int]], released: tuple[tuple[int, int], ...],
              swapped: list[tuple[int, int]]) -> Interposed:
        note: dict[str, Any] = {"index": body.index, "start": body.start, "count": body.count}
        if vectors:
            note["interposed"] = [irq_vector_name(i, v) for i, v in vectors]
        if swapped:
            note["swapped"] = [irq_vector_name(i, v) for i, v in swapped]
        if released:
            note["released"] = [irq_vector_name(i, v) for i, v in released]
        return Interposed(data=data, fds=plans, mode=self.name,
                          note=note, release=released)
