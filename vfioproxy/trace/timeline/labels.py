"""The labeller: which QEMU step sent each message of one client session.

:func:`label_messages` follows the rules of ``realize-steps.md`` §4 over one
session's decoded messages, in trace order, sans-IO. Commands are recognised
by their shape and position (phase realize → reset → running); a reply takes
the label of the request it answers (same msg_id, other direction). What the
wire alone cannot separate (§4's list) gets an uncertain label whose reason
says what could not be told apart; a message no rule knows is ``unlabelled``
with the reason. A message the server starts (DMA_READ/DMA_WRITE: the
device's own DMA) and its reply are ``device-dma``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from vfioproxy.protocol.bodies import (
    IrqInfoBody,
    IrqSetBody,
    RegionAccessBody,
    RegionInfoBody,
)
from vfioproxy.protocol.constants import (
    IRQ_SET_ACTION_MASK,
    IRQ_SET_DATA_MASK,
    IrqIndex,
    IrqSetFlags,
)
from vfioproxy.protocol.header import Command
from vfioproxy.protocol.pci import (
    BAR_COUNT,
    COMMAND_REGISTER,
    INTERRUPT_PIN,
    ROM_BAR,
    Capability,
    CapId,
    Region,
    bar_index,
    find_capability,
    msix_location,
    msix_pba_size,
    msix_vectors,
    walk_capabilities,
)
from vfioproxy.side import Direction
from vfioproxy.trace.decoded import DecodedMessage
from vfioproxy.trace.timeline.model import UNLABELLED, Label

__all__ = ["label_messages"]

#: the command-register bits S2 clears (I/O, memory, bus master, INTx disable)
_QUIESCE_BITS = 0x0407
_TRIGGER = int(IrqSetFlags.ACTION_TRIGGER)
_UNMASK = int(IrqSetFlags.ACTION_UNMASK)
_EVENTFD = int(IrqSetFlags.DATA_EVENTFD)
_NONE = int(IrqSetFlags.DATA_NONE)
_DMA = frozenset({Command.DMA_MAP, Command.DMA_UNMAP})
_REGION_ACCESS = frozenset({Command.REGION_READ, Command.REGION_WRITE})

#: R13's SET_IRQS: the trigger eventfd, then with a KVM irqfd the mask, the
#: resample eventfd and the unmask (vfio_intx_enable_kvm); anything else on
#: INTx after them, or after R14, is the reset's S1
_INTX_ENABLE = (_EVENTFD | _TRIGGER, _NONE | int(IrqSetFlags.ACTION_MASK), _EVENTFD | _UNMASK,
                _NONE | _UNMASK)

_WHY_PBA = ("an MSI-X PBA read and a plain BAR read at the same offset are identical "
            "on the wire (realize-steps.md §4.7)")
_WHY_EOI = ("INTx unmask not right after a BAR access: an EOI or a KVM-only unmask "
            "(realize-steps.md §4.8)")
_WHY_S1 = ("IRQS(0,0x21,0): the S1 of a guest reset or the start of an MSI/MSI-X enable; "
           "what follows did not tell (realize-steps.md §4.3)")
_WHY_S2 = ("command-register read-modify-write clearing IO/MEM/BUS_MASTER/INTX_DISABLE with no "
           "S3/S4 after it: a guest's write or the S2 of a reset (realize-steps.md §4.4)")
_WHY_S2_END = ("the session ends before S3/S4/S5 could show that this command-register "
               "read-modify-write began a reset (realize-steps.md §4.4)")
_WHY_DMA = ("where one DMA transaction ends and the next begins is a heuristic (a DMA_UNMAP "
            "after a DMA_MAP starts a new one; realize-steps.md §4.6)")
_WHY_EARLY_DMA = ("a DMA transaction during realize or reset that is neither R2 nor S7: a "
                  "memory-map change QEMU made meanwhile (realize-steps.md §4.6)")


class _Phase(enum.Enum):
    REALIZE = "realize"
    RESET = "reset"
    RUNNING = "running"
    GUEST_RESET = "guest-reset"


def _certain(step: str) -> Label:
    return Label(step)


def _unsure(step: str, reason: str, substep: str = "") -> Label:
    return Label(step, certain=False, reason=reason, substep=substep)


def _unlabelled(reason: str) -> Label:
    return Label(UNLABELLED, reason=reason)


def _value(data: bytes) -> int:
    return int.from_bytes(data, "little")


def _field_offset(cap: Capability | None, name: str) -> int | None:
    """Config offset of field ``name`` of ``cap`` (None without the capability)."""
    if cap is None:
        return None
    return next((cap.offset + f.offset for f in cap.fields if f.name == name), None)


class _Labeller:
    """One session's labelling state (realize-steps.md §4's list of what to keep)."""

    def __init__(self) -> None:
        self.labels: list[Label] = []
        self.items: list[DecodedMessage] = []
        self.requests: dict[tuple[Direction, int], int] = {}
        self.answers: dict[int, int] = {}
        self.phase = _Phase.REALIZE
        self.commands = 0
        self.seen_info = False
        self.config_copy: int | None = None
        self.p_msix: dict[str, int] = {}
        self.p_msi: int | None = None
        self.p_pm: int | None = None
        self.msix_entries = 0
        self.pba: tuple[int, int] | None = None
        self.rom_probe = 0
        self.pin_reads = 0
        self.reset_anchor = False
        self.zeroed_bars = 0
        self.s7: list[int] | None = None
        self.s7_done = False
        self.dma_has_map = False
        self.dma_heuristic = False
        self.last: str = ""
        self.candidates: list[tuple[int, str]] = []
        self.command_read: int | None = None
        self.fallback: str | None = None
        self.intx_enable = 0
        self.err_notifier = False
        #: an S2 that began a reset, until S3/S4/S5 shows it did (realize-steps.md §4.4)
        self.unanchored: list[int] = []

    # -- driving ---------------------------------------------------------

    def feed(self, item: DecodedMessage) -> None:
        message = item.observation.message
        index = len(self.items)
        self.items.append(item)
        direction = item.record.direction
        if message.is_reply:
            request = self.requests.pop((direction.reverse, message.msg_id), None)
            if request is None:
                self.labels.append(_unlabelled(
                    f"reply to msg_id {message.msg_id}, which this session never sent"))
                return
            self.answers[index] = request
            self.labels.append(self.labels[request])
            self._learn(request, item)
            return
        if direction is Direction.S2C:
            label = self._server_command(message.command, message.header.command_name)
        else:
            label = self._command(index, item)
            self.commands += 1
        self.labels.append(label)
        if not message.header.no_reply:
            self.requests[(direction, message.msg_id)] = index

    def _server_command(self, command: int, name: str) -> Label:
        """A command the server sent: its DMA_READ/DMA_WRITE are the device's own DMA."""
        if command in (Command.DMA_READ, Command.DMA_WRITE):
            return _certain("device-dma")
        return _unlabelled(f"server command {name}: a server sends only DMA_READ/DMA_WRITE")

    def result(self) -> list[tuple[DecodedMessage, Label]]:
        for i in self.unanchored:
            self.labels[i] = _unsure("S2", _WHY_S2_END)
        for reply, request in self.answers.items():
            self.labels[reply] = self.labels[request]
        return list(zip(self.items, self.labels, strict=True))

    # -- commands --------------------------------------------------------

    def _command(self, index: int, item: DecodedMessage) -> Label:
        message = item.observation.message
        command, body = message.command, message.body
        kind = "dma" if command in _DMA else "other"
        if command not in _DMA:
            self._end_dma()
        if command in _REGION_ACCESS and isinstance(body, RegionAccessBody):
            kind = "bar" if body.region < BAR_COUNT else "other"
        label = self._dispatch(index, item)
        self.last = kind
        self._check_unanchored(index, label)
        return label

    def _check_unanchored(self, index: int, label: Label) -> None:
        """A reset that began with S2 (no S1) is one once S3, S4 or S5 follows;
        anything else first makes that S2 a guest's command-register access."""
        if not self.unanchored:
            return
        step = label.substep or label.step
        if step == "S2":
            if index not in self.unanchored:
                self.unanchored.append(index)
        elif step in ("S3", "S4", "S5"):
            self.unanchored = []
        else:
            for i in self.unanchored:
                self.labels[i] = _unsure("guest-config", _WHY_S2)
            self.unanchored = []

    def _dispatch(self, index: int, item: DecodedMessage) -> Label:
        message = item.observation.message
        command, body = message.command, message.body
        name = message.header.command_name
        if command == Command.VERSION:
            if self.commands == 0:
                return _certain("R1")
            return _unlabelled("VERSION after the session's first message")
        if command in _DMA:
            return self._dma(index, command)
        if command == Command.DEVICE_GET_INFO:
            self.seen_info = True
            if self.phase is _Phase.REALIZE:
                return _certain("R3")
            return _unlabelled("GET_INFO after realize")
        if command == Command.DEVICE_GET_REGION_INFO and isinstance(body, RegionInfoBody):
            return self._region_info(body)
        if command == Command.DEVICE_GET_IRQ_INFO and isinstance(body, IrqInfoBody):
            return self._irq_info(body)
        if command == Command.DEVICE_SET_IRQS and isinstance(body, IrqSetBody):
            return self._set_irqs(index, body)
        if command == Command.DEVICE_RESET:
            return self._device_reset(index)
        if command in _REGION_ACCESS and isinstance(body, RegionAccessBody):
            return self._region_access(index, command == Command.REGION_READ, body,
                                       posted=message.header.no_reply)
        if command == Command.REGION_WRITE_MULTI:
            return self._running("bar-mmio-posted" if message.header.no_reply else "bar-mmio")
        if not message.decoded:
            return _unlabelled(f"{name} body could not be decoded")
        return _unlabelled(f"{name} is no step of QEMU's realize, reset or running guest")

    def _running(self, step: str, label: Label | None = None) -> Label:
        """A running-phase label; it ends a realize or reset that was under way."""
        if self.phase is not _Phase.RUNNING:
            self.phase = _Phase.RUNNING
            self.s7 = None
        return label if label is not None else _certain(step)

    def _in_reset(self, step: str) -> Label:
        """A reset step: of the machine reset, or of a guest-triggered one."""
        if self.phase is _Phase.GUEST_RESET:
            return Label("guest-reset", substep=step)
        return _certain(step)

    def _start_reset(self) -> None:
        self.phase = _Phase.RESET if self.phase is _Phase.REALIZE else _Phase.GUEST_RESET
        self.reset_anchor = False
        self.zeroed_bars = 0
        self.s7 = None
        self.s7_done = False

    # -- DMA bursts (R2, S7, guest memory map) ----------------------------

    def _dma(self, index: int, command: int) -> Label:
        new_transaction = self.last != "dma" or (
            command == Command.DMA_UNMAP and self.dma_has_map)
        if new_transaction:
            if self.last == "dma":
                self.dma_heuristic = True
                if self.s7 is not None:
                    for i in self.s7:
                        self.labels[i] = _unsure(self.labels[i].step, _WHY_DMA,
                                                 self.labels[i].substep)
                    self._s7_over()
            self.dma_has_map = False
        self.dma_has_map |= command == Command.DMA_MAP
        if self.phase is _Phase.REALIZE and not self.seen_info:
            return _certain("R2")
        reset = self.phase in (_Phase.RESET, _Phase.GUEST_RESET)
        if reset and self.zeroed_bars >= BAR_COUNT and not self.s7_done:
            if self.s7 is None:
                self.s7 = []
            self.s7.append(index)
            return self._in_reset("S7")
        if self.phase is not _Phase.RUNNING:
            return _unsure("guest-memory-map", _WHY_EARLY_DMA)
        if self.dma_heuristic:
            return _unsure("guest-memory-map", _WHY_DMA)
        return _certain("guest-memory-map")

    def _end_dma(self) -> None:
        self.dma_heuristic = False
        if self.s7 is not None:
            self._s7_over()

    def _s7_over(self) -> None:
        self.s7 = None
        self.s7_done = True
        self.phase = _Phase.RUNNING

    # -- info queries -----------------------------------------------------

    def _region_info(self, body: RegionInfoBody) -> Label:
        if body.index == Region.ROM:
            return self._running("rom-load")
        if self.phase is _Phase.REALIZE and self.config_copy is None:
            if body.index < BAR_COUNT:
                return _certain("R4")
            if body.index == Region.CONFIG:
                return _certain("R5")
        return _unlabelled(f"GET_REGION_INFO of region {body.index} outside R4/R5 "
                           "(QEMU asks 0-5 and 7 at realize, 6 at the first ROM read)")

    def _irq_info(self, body: IrqInfoBody) -> Label:
        if self.phase is _Phase.REALIZE:
            if body.index == IrqIndex.ERR:
                return _certain("R6")
            if body.index == IrqIndex.MSIX:
                return _certain("R10")
        return _unlabelled(f"GET_IRQ_INFO of index {body.index} outside R6/R10")

    # -- SET_IRQS -------------------------------------------------------------

    def _set_irqs(self, index: int, body: IrqSetBody) -> Label:
        action, data = body.flags & IRQ_SET_ACTION_MASK, body.flags & IRQ_SET_DATA_MASK
        trigger_fd = action == _TRIGGER and data == _EVENTFD and body.count >= 1
        disable = action == _TRIGGER and data == _NONE and body.count == 0
        if body.index == IrqIndex.INTX:
            return self._intx(index, body.flags, trigger_fd=trigger_fd, disable=disable,
                              unmask=action == _UNMASK and data == _NONE)
        if body.index == IrqIndex.ERR:
            if self.phase is _Phase.REALIZE and trigger_fd:
                self.err_notifier = True
                return _certain("R14")
            return _unlabelled("SET_IRQS on ERR outside R14")
        if body.index in (IrqIndex.MSI, IrqIndex.MSIX):
            step = "msi-enable" if body.index == IrqIndex.MSI else "msix-enable"
            self._resolve_s1_as(step)
            self.fallback = step if disable else None
            if not disable:
                self.candidates = []
            elif self.phase is _Phase.RUNNING:
                self.candidates.append((index, "S1"))
            return self._running(step)
        return _unlabelled(f"SET_IRQS on index {body.index}: QEMU's vfio-user-pci never sets it")

    def _intx(self, index: int, flags: int, *, trigger_fd: bool, disable: bool,
              unmask: bool) -> Label:
        phase = self.phase
        if phase is _Phase.REALIZE:
            if not self.pin_reads:
                return _unlabelled("SET_IRQS on INTx before the INTx pin was read")
            sent = self.intx_enable
            if (disable or self.err_notifier or sent >= len(_INTX_ENABLE)
                    or flags != _INTX_ENABLE[sent]):
                self._start_reset()
                return _certain("S1")
            self.intx_enable += 1
            return _certain("R13")
        if phase in (_Phase.RESET, _Phase.GUEST_RESET):
            return self._in_reset("S5" if self.reset_anchor or trigger_fd else "S1")
        if unmask:
            if self.last == "bar":
                return _certain("intx-eoi")
            return _unsure("intx-eoi", _WHY_EOI)
        if trigger_fd and self.fallback is not None:
            if self.candidates:
                self.candidates.append((index, "S1"))
            return _certain(self.fallback)
        if disable:
            self.candidates.append((index, "S1"))
            return _unsure("guest-reset", _WHY_S1, "S1")
        return _unlabelled("SET_IRQS on INTx in the running phase that is neither an EOI, "
                           "an S1 nor the fallback after an MSI/MSI-X disable")

    def _resolve_s1_as(self, step: str) -> None:
        """An MSI/MSI-X SET_IRQS right after IRQS(0,0x21,0): that was its start, not S1."""
        if self.candidates and self.last != "dma":
            last, _ = self.candidates[-1]
            if self.labels[last].step == "guest-reset" and not self.labels[last].certain:
                self.labels[last] = _certain(step)
                self.candidates.pop()

    # -- the reset anchor ------------------------------------------------------

    def _device_reset(self, index: int) -> Label:
        if self.phase is _Phase.RUNNING:
            self._confirm_guest_reset()
        elif self.phase is _Phase.REALIZE:
            self._start_reset()
        self.reset_anchor = True
        return self._in_reset("S4")

    def _confirm_guest_reset(self) -> None:
        """S3 or S4 in the running phase: the messages before it were a guest reset's S1/S2."""
        self._start_reset()
        for i, step in self.candidates:
            self.labels[i] = Label("guest-reset", substep=step)
        self.candidates = []
        self.fallback = None

    # -- region accesses -------------------------------------------------------

    def _region_access(self, index: int, is_read: bool, body: RegionAccessBody, *,
                       posted: bool) -> Label:
        if body.region == Region.CONFIG:
            return self._config(index, is_read, body)
        if body.region == Region.ROM:
            return self._running("rom-load")
        if body.region < BAR_COUNT:
            self.candidates = []
            self.fallback = None
            if is_read and self.pba is not None and body.region == self.pba[0]:
                start = self.pba[1]
                if start <= body.offset < start + msix_pba_size(self.msix_entries):
                    return self._running("pba-read", _unsure("pba-read", _WHY_PBA))
            return self._running("bar-mmio-posted" if posted else "bar-mmio")
        return _unlabelled(f"access to region {body.region}, which QEMU's vfio-user-pci "
                           "never touches")

    def _config(self, index: int, is_read: bool, body: RegionAccessBody) -> Label:
        offset, count = body.offset, body.count
        if self.phase is _Phase.REALIZE:
            step = self._realize_config(index, is_read, offset, count)
            if step is not None:
                return _certain(step)
            if self._reset_start_config(is_read, offset, count):
                self._start_reset()
                if offset == COMMAND_REGISTER:
                    self.unanchored = [index]
                    return _certain("S2")
        if self.phase in (_Phase.RESET, _Phase.GUEST_RESET):
            step = self._reset_config(is_read, offset, count, body.data)
            if step is not None:
                return self._in_reset(step)
        return self._guest_config(index, is_read, offset, count, body.data)

    def _realize_config(self, index: int, is_read: bool, offset: int, count: int) -> str | None:
        if self.config_copy is None:
            if is_read and offset == 0:
                self.config_copy = index
                return "R7"
            return None
        if offset == ROM_BAR and count == 4 and self.rom_probe < 4:
            self.rom_probe += 1
            return "R8"
        if not is_read:
            return None
        if count == 4 and bar_index(offset) is not None:
            return "R9"
        if offset in self.p_msix.values():
            return "R10"
        if self.p_msi is not None and offset == self.p_msi and count == 2:
            return "R11"
        if offset == INTERRUPT_PIN and count == 1 and self.pin_reads < 2:
            self.pin_reads += 1
            return "R12" if self.pin_reads == 1 else "R13"
        return None

    def _reset_start_config(self, is_read: bool, offset: int, count: int) -> bool:
        """The first reset message when S1 is absent: S2's read (or S3's, for safety)."""
        return is_read and count == 2 and offset in (COMMAND_REGISTER, self.p_pm)

    def _reset_config(self, is_read: bool, offset: int, count: int, data: bytes) -> str | None:
        if not self.reset_anchor:
            if offset == COMMAND_REGISTER and count == 2:
                return "S2"
            if self.p_pm is not None and offset == self.p_pm and count == 2:
                return "S3"
        if is_read and offset == INTERRUPT_PIN and count == 1:
            self.reset_anchor = True
            return "S5"
        if (not is_read and count == 4 and bar_index(offset) is not None and not _value(data)
                and self.zeroed_bars < BAR_COUNT):
            self.reset_anchor = True
            self.zeroed_bars += 1
            return "S6"
        return None

    def _guest_config(self, index: int, is_read: bool, offset: int, count: int,
                      data: bytes) -> Label:
        if offset == COMMAND_REGISTER and count == 2:
            if is_read:
                self.command_read = index
                self.candidates.append((index, "S2"))
                return self._running("guest-config")
            read = self.command_read
            if read is not None and self.candidates and self.candidates[-1][0] == read:
                self.candidates.append((index, "S2"))
                read_value = self._read_value(read)
                if read_value is not None and read_value & _QUIESCE_BITS and (
                        _value(data) == read_value & ~_QUIESCE_BITS):
                    self.labels[read] = _unsure("guest-config", _WHY_S2)
                    return self._running("guest-config", _unsure("guest-config", _WHY_S2))
            return self._running("guest-config")
        if self.p_pm is not None and offset == self.p_pm and count == 2 and self.candidates:
            self._confirm_guest_reset()
            return self._in_reset("S3")
        if self.fallback is not None and is_read and offset == INTERRUPT_PIN and count == 1:
            if self.candidates:
                self.candidates.append((index, "S1"))
            return _certain(self.fallback)
        self.candidates = []
        self.fallback = None
        return self._running("guest-config")

    def _read_value(self, request: int) -> int | None:
        """The value a config read returned, once its reply has been seen."""
        for reply, asked in self.answers.items():
            if asked == request:
                body = self.items[reply].observation.message.body
                if isinstance(body, RegionAccessBody) and body.data:
                    return _value(body.data)
        return None

    # -- what replies teach ----------------------------------------------------

    def _learn(self, request: int, reply: DecodedMessage) -> None:
        body = reply.observation.message.body
        if not isinstance(body, RegionAccessBody) or reply.observation.message.is_error:
            return
        if request == self.config_copy:
            caps = walk_capabilities(body.data)
            msix = find_capability(caps, CapId.MSIX)
            self.p_msix = {name: off for name in ("msg_ctl", "table", "pba")
                           if (off := _field_offset(msix, name)) is not None}
            self.p_msi = _field_offset(find_capability(caps, CapId.MSI), "msg_ctl")
            self.p_pm = _field_offset(find_capability(caps, CapId.PM), "pmcsr")
            return
        asked = self.items[request].observation.message.body
        if not isinstance(asked, RegionAccessBody) or asked.region != Region.CONFIG:
            return
        value = _value(body.data)
        if asked.offset == self.p_msix.get("msg_ctl"):
            self.msix_entries = msix_vectors(value)
        elif asked.offset == self.p_msix.get("pba"):
            self.pba = msix_location(value)


def label_messages(items: Iterable[DecodedMessage]) -> list[tuple[DecodedMessage, Label]]:
    """Each of one session's decoded messages (in trace order) with its :class:`Label`.

    Sans-IO and total: every message gets a label, ``unlabelled`` with the
    reason when no rule of realize-steps.md §4 matches. A label may be
    revised by what follows it (an S2 is known once S3/S4 arrives), so the
    whole session is read before the result is returned.
    """
    labeller = _Labeller()
    for item in items:
        labeller.feed(item)
    return labeller.result()
