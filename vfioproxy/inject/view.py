"""What injection rules look at in a message: header, kind, region and offset.

Reading never raises: a message shorter than the 16-byte header has no
header (only rules without command, kind, region and offset filters can
match it), and region/offset are read only from REGION_READ/REGION_WRITE
messages long enough to hold them (protocol.md §2.9/§2.10: offset u64 at
abs 16, region u32 at abs 24).
"""

from __future__ import annotations

import struct

import attrs

from vfioproxy.protocol.header import HEADER_SIZE, Command, Header

__all__ = ["REGION_ACCESS", "MessageView", "inspect"]

#: the commands whose body starts with offset u64, region u32, count u32
REGION_ACCESS = frozenset({Command.REGION_READ, Command.REGION_WRITE})
_ACCESS = struct.Struct("<QI")


@attrs.frozen
class MessageView:
    """One message as the injector sees it.

    ``header`` is None for a message shorter than 16 bytes. ``region`` and
    ``offset`` are set for region accesses: from the message body, or for a
    reply from the request it answers when the injector tracked it.
    """

    length: int
    header: Header | None = None
    region: int | None = None
    offset: int | None = None

    @property
    def is_request(self) -> bool:
        return self.header is not None and self.header.is_command

    @property
    def is_reply(self) -> bool:
        return self.header is not None and self.header.is_reply

    @property
    def command(self) -> int | None:
        return None if self.header is None else self.header.command


def inspect(data: bytes) -> MessageView:
    """Read the header and, for region accesses, region and offset of ``data``."""
    if len(data) < HEADER_SIZE:
        return MessageView(len(data))
    header = Header.parse(data)
    if header.command in REGION_ACCESS and len(data) >= HEADER_SIZE + _ACCESS.size:
        offset, region = _ACCESS.unpack_from(data, HEADER_SIZE)
        return MessageView(len(data), header, region, offset)
    return MessageView(len(data), header)
