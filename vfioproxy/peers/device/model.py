"""The device of layout.py as one client session sees it."""

from __future__ import annotations

import errno
import mmap
import zlib

import attrs

from vfioproxy.io.fds import OwnedFd, make_memfd
from vfioproxy.peers import layout as L
from vfioproxy.peers.device.base import (
    _BAR1_SCRATCH,
    NUM_REGIONS,
    REGION_SIZES,
    DeviceError,
    DmaFault,
    MessageDma,
    _merge_write,
    _span,
)
from vfioproxy.peers.device.config import (
    _COMMAND,
    _COMMAND_INTX_DISABLE,
    _MSI_CTL,
    _MSI_ENABLE,
    _MSI_MASK,
    _MSI_PENDING,
    _MSIX_CTL,
    _MSIX_ENABLE,
    _MSIX_ENTRY,
    _MSIX_ENTRY_WMASK,
    _MSIX_FUNCTION_MASK,
    _MSIX_TABLE_SIZE,
    _MSIX_VECTOR_MASKED,
    _STATUS_INTERRUPT,
    build_rom,
    power_on_config,
)
from vfioproxy.peers.device.dma import DmaSpace
from vfioproxy.peers.device.interrupts import Interrupts
from vfioproxy.peers.device.migration import (
    _LINE_ORDER,
    _RECORD,
    _RUNNING_STATES,
    MAX_INCOMING_STREAM,
    Registers,
    Snapshot,
    decode_state_stream,
    encode_state_records,
    next_migration_state,
)
from vfioproxy.protocol.constants import (
    IrqIndex,
    MigrationState,
)
from vfioproxy.protocol.pci import (
    STATUS,
    Region,
)

# --------------------------------------------------------------------- the device

_OPS = {L.OP_COPY, L.OP_INVERT, L.OP_CRC32}


_INVERT = bytes(b ^ 0xFF for b in range(256))


def _apply_op(op: int, data: bytes) -> bytes:
    if op == L.OP_INVERT:
        return data.translate(_INVERT)
    if op == L.OP_CRC32:
        return zlib.crc32(data).to_bytes(4, "little")
    return data


class Device:
    """The device of layout.py, as one client session sees it.

    ``transport`` carries DMA to windows mapped without an fd (the session's
    DMA_READ/DMA_WRITE messages); without one such DMA faults. The caller
    must :meth:`close` it (DMA mappings, eventfds, the BAR2 memfd).
    """

    def __init__(
        self,
        *,
        vendor_id: int = L.VENDOR_ID,
        device_id: int = L.DEVICE_ID,
        transport: MessageDma | None = None,
        rom: bool = True,
    ) -> None:
        self.vendor_id = vendor_id
        self.device_id = device_id
        #: the expansion ROM (empty without one: region 6 has size 0, the ROM BAR reads 0)
        self.rom = build_rom(vendor_id, device_id) if rom else b""
        #: BAR2's memory: the fd a region-info reply passes; the client's mmap sees the same bytes
        self.bar2_fd = make_memfd("vfioproxy-bar2", L.BAR2_SIZE)
        try:
            self._ram = mmap.mmap(self.bar2_fd.fileno(), L.BAR2_SIZE)
        except BaseException:
            self.bar2_fd.close()
            raise
        self.dma = DmaSpace(transport)
        self.irqs = Interrupts()
        self.migration_state: int = MigrationState.RUNNING
        self._outgoing = bytearray()
        self._incoming = bytearray()
        self._power_on()

    def _power_on(self) -> None:
        self.config = power_on_config(self.vendor_id, self.device_id, rom=bool(self.rom))
        self.regs = Registers()
        self.bar1 = bytearray(_BAR1_SCRATCH)
        # Vector control mask bits start clear, where the PCI spec has them set:
        # QEMU emulates the MSI-X table itself and never writes the device's copy,
        # so behind QEMU a device that starts masked could never signal MSI-X.
        self.msix_table = bytearray(_MSIX_TABLE_SIZE)
        self.pba = 0
        self.irqs.reset()

    def close(self) -> None:
        """Drop every DMA mapping and eventfd and the BAR2 memory; idempotent."""
        self.dma.close()
        self.irqs.close()
        self._ram.close()
        self.bar2_fd.close()

    @property
    def running(self) -> bool:
        """RUNNING or PRE_COPY: the device may DMA and interrupt."""
        return self.migration_state in _RUNNING_STATES

    # ----------------------------------------------------------- regions

    def region_size(self, index: int) -> int:
        """Region ``index``'s size (0: the device does not have it)."""
        if index == Region.ROM:
            return len(self.rom)
        return REGION_SIZES.get(index, 0)

    def check_region_access(self, index: int, offset: int, count: int) -> None:
        """EINVAL unless ``[offset, offset+count)`` lies inside region ``index``."""
        if index >= NUM_REGIONS:
            raise DeviceError(errno.EINVAL, f"no region {index}")
        if offset + count > self.region_size(index):
            raise DeviceError(
                errno.EINVAL, f"access [{offset:#x}+{count:#x}) outside region {index}"
            )

    def read_region(self, index: int, offset: int, count: int) -> bytes:
        """Region bytes as a driver reads them (EINVAL outside the region)."""
        self.check_region_access(index, offset, count)
        if not count:
            return b""
        if index == Region.CONFIG:
            return self.config.read(offset, count)
        if index == Region.BAR0:
            return self._bar0_read(offset, count)
        if index == Region.BAR1:
            return bytes(self.bar1[offset : offset + count].ljust(count, b"\0"))
        if index == Region.BAR2:
            return self._bar2_read(offset, count)
        return self.rom[offset : offset + count]

    async def write_region(self, index: int, offset: int, data: bytes) -> None:
        """A driver's write (EINVAL outside the region and for the ROM).

        A write that rings the doorbell returns once the descriptor completed
        and the interrupt was raised (or latched, while the device is stopped).
        """
        self.check_region_access(index, offset, len(data))
        if index == Region.ROM:
            raise DeviceError(errno.EINVAL, "the expansion ROM is read-only")
        if not data:
            return
        if index == Region.CONFIG:
            self.config.write(offset, data)
            self._service_interrupts()
        elif index == Region.BAR0:
            await self._bar0_write(offset, data)
        elif index == Region.BAR1:
            if offset < _BAR1_SCRATCH:
                piece = data[: _BAR1_SCRATCH - offset]
                self.bar1[offset : offset + len(piece)] = piece
        else:
            self._bar2_write(offset, data)

    def _bar0_read(self, offset: int, count: int) -> bytes:
        first = offset & ~3
        raw = b"".join(
            self.regs.value(o).to_bytes(4, "little") for o in range(first, offset + count, 4)
        )
        return raw[offset - first : offset - first + count]

    async def _bar0_write(self, offset: int, data: bytes) -> None:
        rung = False
        regs = self.regs
        for reg in range(offset & ~3, offset + len(data), 4):
            lo, hi = max(offset, reg), min(offset + len(data), reg + 4)
            piece, shift = data[lo - offset : hi - offset], lo - reg
            if reg == L.REG_DESC_LO:
                regs.desc_lo = _merge_write(regs.desc_lo, piece, shift)
            elif reg == L.REG_DESC_HI:
                regs.desc_hi = _merge_write(regs.desc_hi, piece, shift)
            elif reg == L.REG_SCRATCH:
                regs.scratch = _merge_write(regs.scratch, piece, shift)
            elif reg == L.REG_IRQ_STATUS:
                regs.irq_status &= ~_merge_write(0, piece, shift)
                self._update_interrupt_status()
            elif reg == L.REG_DOORBELL:
                rung = True
        if rung:
            await self.ring_doorbell()

    def _bar2_read(self, offset: int, count: int) -> bytes:
        out = bytearray(count)
        span = _span(offset, count, 0, L.BAR2_MMAP_SIZE)
        if span:
            out[span[0] - offset : span[1] - offset] = self._ram[span[0] : span[1]]
        pba = self.pba.to_bytes(8, "little")
        for start, blob in ((L.MSIX_TABLE_OFFSET, self.msix_table), (L.MSIX_PBA_OFFSET, pba)):
            span = _span(offset, count, start, start + len(blob))
            if span:
                out[span[0] - offset : span[1] - offset] = blob[span[0] - start : span[1] - start]
        return bytes(out)

    def _bar2_write(self, offset: int, data: bytes) -> None:
        span = _span(offset, len(data), 0, L.BAR2_MMAP_SIZE)
        if span:
            self._ram[span[0] : span[1]] = data[span[0] - offset : span[1] - offset]
        table = L.MSIX_TABLE_OFFSET
        span = _span(offset, len(data), table, table + _MSIX_TABLE_SIZE)
        if span:
            for pos in range(*span):
                i = pos - table
                wmask = _MSIX_ENTRY_WMASK[i % _MSIX_ENTRY]
                self.msix_table[i] = (self.msix_table[i] & ~wmask) | (data[pos - offset] & wmask)
            self._service_interrupts()

    def ram(self) -> bytes:
        """BAR2's mmap-able part (what the client's mapping shows)."""
        return self._ram[: L.BAR2_MMAP_SIZE]

    # ----------------------------------------------------------- the DMA engine

    async def ring_doorbell(self) -> None:
        """Run the descriptor at DESC now, or latch the doorbell while stopped."""
        if not self.running:
            self.regs.latched = True
            return
        self.regs.latched = False
        desc = self.regs.descriptor
        try:
            src, dst, length, op, cookie = L.DESCRIPTOR.unpack(
                await self.dma.read(desc, L.DESCRIPTOR.size)
            )
        except DmaFault:
            self._complete(ok=False)
            return
        try:
            if op not in _OPS or length > L.MAX_TRANSFER:
                raise DeviceError(errno.EINVAL, f"bad descriptor: op {op} length {length:#x}")
            result = _apply_op(op, await self.dma.read(src, length))
            await self.dma.write(dst, result)
            record = L.COMPLETION.pack(L.COMPLETION_OK, zlib.crc32(result), cookie, len(result))
            ok = True
        except DeviceError as failure:
            record = L.COMPLETION.pack(L.COMPLETION_ERROR | failure.errno, 0, cookie, 0)
            ok = False
        try:
            await self.dma.write(desc + L.COMPLETION_OFFSET, record)
        except DmaFault:
            ok = False
        self._complete(ok=ok)

    def _complete(self, *, ok: bool) -> None:
        regs = self.regs
        regs.status = L.STATUS_DONE if ok else L.STATUS_ERROR
        regs.doorbell_count = (regs.doorbell_count + 1) & 0xFFFFFFFF
        regs.irq_status |= L.IRQ_STATUS_DONE
        if self.msix_enabled:
            self.pba |= 1
        elif self.msi_enabled:
            self.config.set_u32(_MSI_PENDING, self.config.u32(_MSI_PENDING) | 1)
        self._update_interrupt_status()
        self._service_interrupts()

    # ----------------------------------------------------------- interrupts

    @property
    def msix_enabled(self) -> bool:
        return bool(self.config.u16(_MSIX_CTL) & _MSIX_ENABLE)

    @property
    def msi_enabled(self) -> bool:
        return bool(self.config.u16(_MSI_CTL) & _MSI_ENABLE)

    def _msix_vector_masked(self, vector: int) -> bool:
        control = self.msix_table[vector * _MSIX_ENTRY + 12]
        return bool(control & _MSIX_VECTOR_MASKED)

    def _update_interrupt_status(self) -> None:
        """Status bit 3 follows the INTx level (IRQ_STATUS not clear)."""
        status = self.config.u16(STATUS) & ~_STATUS_INTERRUPT
        self.config.set_u16(STATUS, status | (_STATUS_INTERRUPT if self.regs.irq_status else 0))

    def _service_interrupts(self) -> None:
        """Deliver what is pending and no longer masked; nothing while stopped.

        MSI-X: a PBA bit whose vector and function are unmasked. MSI: the
        pending bit of an unmasked vector. INTx (only with MSI and MSI-X off):
        the level (IRQ_STATUS ≠ 0) unless the command register disables it.
        Then the vectors the client had masked with SET_IRQS and unmasked since.
        """
        if not self.running:
            return
        config = self.config
        if self.msix_enabled and not config.u16(_MSIX_CTL) & _MSIX_FUNCTION_MASK:
            for vector in range(L.MSIX_VECTORS):
                if self.pba >> vector & 1 and not self._msix_vector_masked(vector):
                    self.pba &= ~(1 << vector)
                    self.irqs.signal(IrqIndex.MSIX, vector)
        if self.msi_enabled:
            live = config.u32(_MSI_PENDING) & ~config.u32(_MSI_MASK) & 1
            if live:
                config.set_u32(_MSI_PENDING, config.u32(_MSI_PENDING) & ~live)
                self.irqs.signal(IrqIndex.MSI, 0)
        intx_on = not (self.msi_enabled or self.msix_enabled)
        if intx_on and self.regs.irq_status and not config.u16(_COMMAND) & _COMMAND_INTX_DISABLE:
            self.irqs.assert_intx()
        self.irqs.deliver_pending()

    def set_irqs(
        self, flags: int, index: int, start: int, count: int, data: bytes, fds: list[OwnedFd]
    ) -> None:
        """DEVICE_SET_IRQS (see :meth:`Interrupts.set_irqs`); takes ``fds``."""
        self.irqs.set_irqs(flags, index, start, count, data, fds)
        self._service_interrupts()

    # ----------------------------------------------------------- reset

    def reset(self) -> None:
        """DEVICE_RESET: back to power-on (config, registers, BAR1, MSI-X table,
        IRQ masks, migration state RUNNING). DMA windows, dirty logging, the
        client's eventfds and BAR2's RAM stay, as with a VFIO device reset."""
        self._power_on()
        self.migration_state = MigrationState.RUNNING
        self._outgoing.clear()
        self._incoming.clear()

    # ----------------------------------------------------------- migration

    def snapshot(self) -> Snapshot:
        lines = tuple(
            (self.irqs.line(index, v).masked, self.irqs.line(index, v).pending)
            for index, v in _LINE_ORDER
        )
        return Snapshot(
            config=bytes(self.config.data),
            registers=attrs.evolve(self.regs),
            bar1=bytes(self.bar1),
            ram=self.ram(),
            msix_table=bytes(self.msix_table),
            pba=self.pba,
            irq_lines=lines,
        )

    def restore(self, snap: Snapshot) -> None:
        self.config.data[:] = snap.config
        self.regs = attrs.evolve(snap.registers)
        self.bar1[:] = snap.bar1
        self._ram[: L.BAR2_MMAP_SIZE] = snap.ram
        self.msix_table[:] = snap.msix_table
        self.pba = snap.pba
        for (index, v), (masked, pending) in zip(_LINE_ORDER, snap.irq_lines, strict=True):
            line = self.irqs.line(index, v)
            line.masked, line.pending = masked, pending

    async def set_migration_state(self, target: int) -> None:
        """DEVICE_FEATURE MIG_DEVICE_STATE SET: walk to ``target`` step by step.

        EINVAL for a refused target (state left at the last step reached).
        Leaving RESUMING takes the received state; a bad stream fails the
        step with EINVAL and puts the device in ERROR, which only
        :meth:`reset` leaves. Entering RUNNING runs a latched doorbell.
        """
        if target not in MigrationState.__members__.values():
            raise DeviceError(errno.EINVAL, f"unknown migration state {target}")
        while self.migration_state != target:
            step = next_migration_state(self.migration_state, target)
            if step is None:
                raise DeviceError(
                    errno.EINVAL,
                    f"no migration path from {MigrationState(self.migration_state).name} "
                    f"to {MigrationState(target).name}",
                )
            await self._enter(step)

    async def _enter(self, state: int) -> None:
        previous = self.migration_state
        if state == MigrationState.PRE_COPY:
            self._outgoing[:] = encode_state_records(self.snapshot(), final=False)
        elif state == MigrationState.STOP_COPY:
            self._outgoing += encode_state_records(self.snapshot(), final=True)
        elif state == MigrationState.RESUMING:
            self._incoming.clear()
        elif previous == MigrationState.RESUMING:
            self._take_incoming()
        else:
            self._outgoing.clear()
        self.migration_state = state
        if self.running:
            self._service_interrupts()
            if self.regs.latched:
                await self.ring_doorbell()

    def _take_incoming(self) -> None:
        data = bytes(self._incoming)
        self._incoming.clear()
        try:
            snap = decode_state_stream(data, vendor_id=self.vendor_id, device_id=self.device_id)
        except DeviceError:
            self.migration_state = MigrationState.ERROR
            raise
        self.restore(snap)

    def read_migration_data(self, size: int) -> bytes:
        """MIG_DATA_READ: up to ``size`` stream bytes; b"" = nothing more (PRE_COPY)
        or the end of the stream (STOP_COPY). EINVAL in other states."""
        if self.migration_state not in (MigrationState.PRE_COPY, MigrationState.STOP_COPY):
            raise DeviceError(errno.EINVAL, "migration data is read in PRE_COPY or STOP_COPY")
        chunk = bytes(self._outgoing[:size])
        del self._outgoing[:size]
        return chunk

    def write_migration_data(self, data: bytes) -> None:
        """MIG_DATA_WRITE: collect stream bytes (EINVAL outside RESUMING, or beyond
        :data:`MAX_INCOMING_STREAM`, which also spoils the stream)."""
        if self.migration_state != MigrationState.RESUMING:
            raise DeviceError(errno.EINVAL, "migration data is written in RESUMING")
        if len(self._incoming) + len(data) > MAX_INCOMING_STREAM:
            self._incoming[:] = b"\0" * _RECORD.size  # no longer a valid stream
            raise DeviceError(errno.EINVAL, "more migration data than a device state")
        self._incoming += data
