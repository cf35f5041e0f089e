"""The reference device model behind ``vfioproxy serve-device`` (no socket code).

One :class:`Device` per client session implements the programming model of
:mod:`vfioproxy.peers.layout` the way a libvfio-user device author would:

- PCI config space (:class:`ConfigSpace`) with write masks as hardware has
  them: writable, read-only and write-1-to-clear bits, BAR and ROM sizing;
- the regions: BAR0 registers and the DMA engine, BAR1 I/O scratch, BAR2
  RAM (a memfd the client may mmap) plus the emulated MSI-X table and PBA,
  the expansion ROM, config space;
- DMA windows (:class:`DmaSpace`): fd-backed windows through mmap, the
  others through DMA_READ/DMA_WRITE messages that the session sends for it
  (:class:`MessageDma`), dirty-page logging of the device's own writes;
- interrupts (:class:`Interrupts`): the eventfds the client installed,
  VFIO masking, INTx automask, MSI/MSI-X pending bits;
- VFIO migration: the state machine, and the state stream of
  :func:`encode_state_records` / :func:`decode_state_stream`.

Whatever the caller asks, the model never crashes: a request it refuses
raises :class:`DeviceError` carrying the errno for the error reply, and a
DMA that faults completes its descriptor with an error status.

Each part is a module of this package: ``base`` (errors, the DMA transport
the session provides, regions, byte helpers), ``config``, ``dma``,
``interrupts``, ``migration`` and ``model`` (:class:`Device`, which puts
them together); this package exports their public names. Names with a
leading underscore are shared between these modules only.
"""

from __future__ import annotations

from vfioproxy.peers.device.base import (
    MAX_DMA_MAPS,
    NUM_REGIONS,
    REGION_SIZES,
    DeviceError,
    DmaFault,
    MessageDma,
)
from vfioproxy.peers.device.config import ConfigSpace, build_rom, power_on_config
from vfioproxy.peers.device.dma import DmaSpace, DmaWindow
from vfioproxy.peers.device.interrupts import IRQ_COUNTS, IRQ_INFO_FLAGS, Interrupts, IrqLine
from vfioproxy.peers.device.migration import (
    MAX_INCOMING_STREAM,
    Registers,
    Snapshot,
    decode_state_stream,
    encode_state_records,
    next_migration_state,
)
from vfioproxy.peers.device.model import Device

__all__ = [
    "IRQ_COUNTS",
    "IRQ_INFO_FLAGS",
    "MAX_DMA_MAPS",
    "MAX_INCOMING_STREAM",
    "NUM_REGIONS",
    "REGION_SIZES",
    "ConfigSpace",
    "Device",
    "DeviceError",
    "DmaFault",
    "DmaSpace",
    "DmaWindow",
    "Interrupts",
    "IrqLine",
    "MessageDma",
    "Registers",
    "Snapshot",
    "build_rom",
    "decode_state_stream",
    "encode_state_records",
    "next_migration_state",
    "power_on_config",
]
