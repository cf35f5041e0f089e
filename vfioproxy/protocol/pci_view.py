"""What one session has shown of a device's config space, for describing region-7 traffic.

:class:`PciView` is the stateful companion of :mod:`vfioproxy.protocol.pci`:
a trace viewer feeds it every REGION_READ/REGION_WRITE on region 7 of one
session, in order, and gets one line per message back.
"""

from __future__ import annotations

from vfioproxy.protocol.bodies import RegionAccessBody
from vfioproxy.protocol.header import Command
from vfioproxy.protocol.pci import (
    EXT_CONFIG_SIZE,
    ROM_BAR,
    BarKind,
    Capability,
    Region,
    bar_index,
    bar_offset,
    config_bar_kinds,
    describe_config_access,
    is_sizing_write,
    region_name,
    walk_capabilities,
)
from vfioproxy.protocol.session import Observation


class PciView:
    """Config space as learned from one session's region-7 reads, plus pending BAR sizing.

    Read replies are copied into a 4096-byte image (writes are not: the
    device may ignore some bits) and the capabilities are walked again from
    it. A sizing write to a BAR or the ROM BAR is remembered until the next
    4-byte read of that register, which is then described as a size mask,
    or until another write to it. Offsets and counts are the wire values;
    no method raises, whatever they are.
    """

    def __init__(self) -> None:
        self._image = bytearray(EXT_CONFIG_SIZE)
        self._known = bytearray(EXT_CONFIG_SIZE)
        self._extent = 0
        self._caps: tuple[Capability, ...] = ()
        self._pending_sizing: set[int] = set()
        self._size_masks: dict[int, int] = {}

    @property
    def capabilities(self) -> tuple[Capability, ...]:
        """The capabilities walked from the config bytes read so far."""
        return self._caps

    @property
    def config(self) -> bytes:
        """Config bytes read so far, up to the highest offset read (bytes never read are 0)."""
        return bytes(self._image[: self._extent])

    def describe_read_request(self, offset: int, count: int) -> str:
        """The line for a REGION_READ command on region 7 (no value yet)."""
        return self._describe(
            offset, count, None, is_write=False, sizing=self._is_pending(offset, count)
        )

    def describe_read_reply(self, offset: int, count: int, data: bytes) -> str:
        """The line for a REGION_READ reply; learns ``data`` unless it is a size mask."""
        sizing = self._is_pending(offset, count) and len(data) >= 4
        if sizing:
            self._pending_sizing.discard(offset)
            self._size_masks[offset] = int.from_bytes(data[:4], "little")
        else:
            self._learn(offset, data[: max(count, 0)])
        return self._describe(offset, count, data, is_write=False, sizing=sizing)

    def describe_write(self, offset: int, count: int, data: bytes) -> str:
        """The line for a REGION_WRITE command on region 7; notes sizing writes."""
        if count == 4 and len(data) >= 4 and (offset == ROM_BAR or bar_index(offset) is not None):
            if is_sizing_write(offset, 4, int.from_bytes(data[:4], "little")):
                self._pending_sizing.add(offset)
            else:
                self._pending_sizing.discard(offset)
        return self._describe(offset, count, data, is_write=True, sizing=False)

    def _is_pending(self, offset: int, count: int) -> bool:
        return count == 4 and offset in self._pending_sizing

    def _learn(self, offset: int, data: bytes) -> None:
        end = min(offset + len(data), EXT_CONFIG_SIZE)
        if offset < 0 or offset >= end:
            return
        self._image[offset:end] = data[: end - offset]
        self._known[offset:end] = b"\x01" * (end - offset)
        self._extent = max(self._extent, end)
        self._caps = walk_capabilities(self.config)

    def _describe(
        self, offset: int, count: int, data: bytes | None, *, is_write: bool, sizing: bool
    ) -> str:
        kinds = config_bar_kinds(self._image, self._known)
        index = bar_index(offset)
        lower_mask = None
        if sizing and index and kinds[index] is BarKind.MEM64_HIGH:
            lower_mask = self._size_masks.get(bar_offset(index - 1))
        return describe_config_access(
            offset,
            count,
            data,
            is_write=is_write,
            caps=self._caps,
            after_sizing_write=sizing,
            bar_kinds=kinds,
            lower_mask=lower_mask,
        )


def describe(obs: Observation, pci: PciView) -> str:
    """The body summary, in PCI terms for region accesses."""
    message = obs.message
    body = message.body
    if message.is_error or not isinstance(body, RegionAccessBody):
        return body.summary()
    if message.command not in (Command.REGION_READ, Command.REGION_WRITE):
        return body.summary()
    if body.region != Region.CONFIG:
        return _describe_region_io(message.command, message.is_reply, body)
    if message.command == Command.REGION_WRITE:
        if message.is_reply:
            return f"cfg WR{body.count} @{body.offset:#x} done"
        return pci.describe_write(body.offset, body.count, body.data)
    if message.is_reply:
        return pci.describe_read_reply(body.offset, body.count, body.data)
    return pci.describe_read_request(body.offset, body.count)


def _describe_region_io(command: int, is_reply: bool, body: RegionAccessBody) -> str:
    op = "RD" if command == Command.REGION_READ else "WR"
    where = f"{region_name(body.region)} {op}{body.count} @{body.offset:#x}"
    if not body.data:
        return where + (" done" if is_reply else "")
    if len(body.data) <= 8:
        value = int.from_bytes(body.data, "little")
        return f"{where} = {value:#0{2 + 2 * len(body.data)}x}"
    return f"{where} data {body.data[:16].hex()}… ({len(body.data)}B)"
