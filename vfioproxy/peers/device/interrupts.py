"""Interrupts: the client's eventfds, VFIO masking, INTx automask, MSI/MSI-X pending bits."""

from __future__ import annotations

import contextlib
import errno
import os
import select
from collections.abc import Sequence

import attrs

from vfioproxy.io.fds import FdKind, OwnedFd, close_all, inspect_fd
from vfioproxy.peers import layout as L
from vfioproxy.peers.device.base import DeviceError
from vfioproxy.protocol.constants import (
    IRQ_SET_ACTION_MASK,
    IRQ_SET_DATA_MASK,
    IrqIndex,
    IrqInfoFlags,
    IrqSetFlags,
)

# --------------------------------------------------------------------- interrupts

#: vectors per IRQ index
IRQ_COUNTS: dict[int, int] = {
    IrqIndex.INTX: 1,
    IrqIndex.MSI: L.MSI_VECTORS,
    IrqIndex.MSIX: L.MSIX_VECTORS,
    IrqIndex.ERR: 1,
    IrqIndex.REQ: 1,
}
#: DEVICE_GET_IRQ_INFO flags per index
IRQ_INFO_FLAGS: dict[int, int] = {
    IrqIndex.INTX: IrqInfoFlags.EVENTFD | IrqInfoFlags.MASKABLE | IrqInfoFlags.AUTOMASKED,
    IrqIndex.MSI: IrqInfoFlags.EVENTFD | IrqInfoFlags.MASKABLE,
    IrqIndex.MSIX: IrqInfoFlags.EVENTFD | IrqInfoFlags.MASKABLE | IrqInfoFlags.NORESIZE,
    IrqIndex.ERR: IrqInfoFlags.EVENTFD,
    IrqIndex.REQ: IrqInfoFlags.EVENTFD,
}


def _signal_eventfd(fd: OwnedFd) -> None:
    """Add 1 to an eventfd without ever blocking (a counter at its maximum stays there)."""
    poller = select.poll()
    poller.register(fd.fileno(), select.POLLOUT)
    if poller.poll(0):
        with contextlib.suppress(BlockingIOError):
            os.eventfd_write(fd.fileno(), 1)


@attrs.define
class IrqLine:
    """One vector: the client's eventfd, VFIO mask, and an interrupt held while masked."""

    eventfd: OwnedFd | None = None
    masked: bool = False
    pending: bool = False

    def fire(self) -> None:
        if self.eventfd is not None:
            _signal_eventfd(self.eventfd)

    def install(self, fd: OwnedFd | None) -> None:
        """Replace the eventfd (the old one is closed)."""
        if self.eventfd is not None:
            self.eventfd.close()
        self.eventfd = fd


class Interrupts:
    """The eventfds of every IRQ index and their VFIO-level state (DEVICE_SET_IRQS)."""

    def __init__(self) -> None:
        self.lines = {index: [IrqLine() for _ in range(n)] for index, n in IRQ_COUNTS.items()}

    def line(self, index: int, vector: int = 0) -> IrqLine:
        return self.lines[index][vector]

    def signal(self, index: int, vector: int) -> None:
        """Raise an edge interrupt; a VFIO-masked vector keeps it pending."""
        line = self.line(index, vector)
        if line.masked:
            line.pending = True
        else:
            line.fire()

    def assert_intx(self) -> None:
        """The INTx line is asserted: fire unless masked, then automask (as VFIO does)."""
        line = self.line(IrqIndex.INTX)
        if not line.masked:
            line.fire()
            line.masked = True

    def deliver_pending(self) -> None:
        for index in (IrqIndex.MSI, IrqIndex.MSIX):
            for line in self.lines[index]:
                if line.pending and not line.masked:
                    line.pending = False
                    line.fire()

    def set_irqs(
        self, flags: int, index: int, start: int, count: int, data: bytes, fds: list[OwnedFd]
    ) -> None:
        """DEVICE_SET_IRQS with libvfio-user's checks (protocol.md §2.8); takes ``fds``."""
        try:
            self._validate(flags, index, start, count, data, fds)
            action, kind = flags & IRQ_SET_ACTION_MASK, flags & IRQ_SET_DATA_MASK
            lines = self.lines[index]
            if action != IrqSetFlags.ACTION_TRIGGER:
                for line in lines[start : start + count]:
                    line.masked = action == IrqSetFlags.ACTION_MASK
                return
            if count == 0 or (kind == IrqSetFlags.DATA_EVENTFD and not fds):
                for line in lines[start : start + (count or len(lines))]:
                    line.install(None)
            elif kind == IrqSetFlags.DATA_EVENTFD:
                for line, fd in zip(lines[start : start + count], fds, strict=True):
                    line.install(fd)
                fds.clear()
            else:
                wanted = data if kind == IrqSetFlags.DATA_BOOL else b"\x01" * count
                for line, flag in zip(lines[start : start + count], wanted, strict=True):
                    if flag == 1:
                        line.fire()
        finally:
            close_all(fds)

    @staticmethod
    def _validate(
        flags: int, index: int, start: int, count: int, data: bytes, fds: Sequence[OwnedFd]
    ) -> None:
        action, kind = flags & IRQ_SET_ACTION_MASK, flags & IRQ_SET_DATA_MASK
        vectors = IRQ_COUNTS.get(index, 0)
        problem = None
        if kind == IrqSetFlags.DATA_BOOL and len(data) != count:
            problem = "DATA_BOOL needs one byte per vector"
        elif not vectors:
            problem = f"IRQ index {index} does not exist"
        elif action not in (IrqSetFlags.ACTION_MASK, IrqSetFlags.ACTION_UNMASK,
                            IrqSetFlags.ACTION_TRIGGER):
            problem = "exactly one action is needed"
        elif kind not in (IrqSetFlags.DATA_NONE, IrqSetFlags.DATA_BOOL, IrqSetFlags.DATA_EVENTFD):
            problem = "exactly one data type is needed"
        elif start >= vectors or start + count > vectors:
            problem = f"vectors [{start}, {start + count}) outside the {vectors} of index {index}"
        elif index in (IrqIndex.ERR, IrqIndex.REQ) and action != IrqSetFlags.ACTION_TRIGGER:
            problem = "ERR and REQ only take TRIGGER"
        elif count == 0 and (
            start or (action, kind) != (IrqSetFlags.ACTION_TRIGGER, IrqSetFlags.DATA_NONE)
        ):
            problem = "count 0 only with DATA_NONE|ACTION_TRIGGER and start 0"
        elif fds and (kind != IrqSetFlags.DATA_EVENTFD or len(fds) != count):
            problem = f"{len(fds)} fds for {count} vectors"
        elif any(inspect_fd(fd).kind is not FdKind.EVENTFD for fd in fds):
            problem = "an fd is not an eventfd"
        if problem:
            raise DeviceError(errno.EINVAL, f"DEVICE_SET_IRQS refused: {problem}")

    def reset(self) -> None:
        """Power-on masks; the eventfds stay (they belong to the client)."""
        for lines in self.lines.values():
            for line in lines:
                line.masked = line.pending = False

    def close(self) -> None:
        for lines in self.lines.values():
            for line in lines:
                line.install(None)
