"""Errors, the DMA transport the session provides, the regions, and byte helpers."""

from __future__ import annotations

import errno
from typing import Protocol

from vfioproxy.errors import VfioProxyError
from vfioproxy.peers import layout as L
from vfioproxy.protocol.pci import (
    Region,
)


class DeviceError(VfioProxyError):
    """The device refuses a request; ``errno`` is what the error reply carries."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{text} ({errno.errorcode.get(code, code)})")
        self.errno = code


class DmaFault(DeviceError):
    """A DMA access failed (unmapped iova, permission, or the client refused it)."""


class MessageDma(Protocol):
    """Access to DMA windows that have no fd: DMA_READ / DMA_WRITE messages.

    Implemented by the session; each call raises :class:`DmaFault` when the
    client cannot complete the transfer.
    """

    async def dma_read(self, iova: int, count: int) -> bytes: ...

    async def dma_write(self, iova: int, data: bytes) -> None: ...


# --------------------------------------------------------------------- regions

NUM_REGIONS = 9
#: region index -> size (BAR3 is the upper half of 64-bit BAR2; BAR4/5 and VGA are absent)
REGION_SIZES: dict[int, int] = {
    Region.BAR0: L.BAR0_SIZE,
    Region.BAR1: L.BAR1_SIZE,
    Region.BAR2: L.BAR2_SIZE,
    Region.ROM: L.ROM_SIZE,
    Region.CONFIG: L.CONFIG_SIZE,
}
#: the client-visible scratch of BAR1: 4 dwords; the rest of the I/O BAR reads 0
_BAR1_SCRATCH = 16
#: largest DMA window table, as advertised in VERSION (``max_dma_maps``)
MAX_DMA_MAPS = 65535


def _span(offset: int, count: int, start: int, end: int) -> tuple[int, int] | None:
    """The part of ``[offset, offset+count)`` inside ``[start, end)``, or None."""
    lo, hi = max(offset, start), min(offset + count, end)
    return (lo, hi) if lo < hi else None


def _merge_write(old: int, new: bytes, shift: int, width: int = 4) -> int:
    """``old`` (a ``width``-byte register) with the bytes of ``new`` placed at byte ``shift``."""
    raw = bytearray(old.to_bytes(width, "little"))
    raw[shift : shift + len(new)] = new
    return int.from_bytes(raw, "little")
