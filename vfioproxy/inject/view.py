"""What injection rules look at in a message: header, kind, region and offset.

Reading never raises: a message shorter than the 16-byte header has no
header (only rules without command, kind, region and offset filters can
match it), and region/offset are read only from REGION_READ/REGION_WRITE
messages long enough to hold them (:mod:`vfioproxy.protocol.offsets`).
"""

from __future__ import annotations

import attrs

from vfioproxy.protocol.header import HEADER_SIZE, Header
from vfioproxy.protocol.offsets import ACCESS, ACCESS_COMMANDS, ACCESS_REGION

__all__ = ["MessageView", "inspect"]

#: the bytes a region access needs to tell its offset and region
_ACCESS_END = HEADER_SIZE + ACCESS_REGION.end


@attrs.frozen
class MessageView:
    """One message as a rule's :meth:`~vfioproxy.inject.rules.Match.matches` sees it.

    ``header`` is None for a message shorter than 16 bytes. ``region`` and
    ``offset`` are set for region accesses: from the message body, or for a
    reply from the request it answers when the injector tracked it.
    """

    header: Header | None = None
    region: int | None = None
    offset: int | None = None


def inspect(data: bytes) -> MessageView:
    """Read the header and, for region accesses, region and offset of ``data``."""
    if len(data) < HEADER_SIZE:
        return MessageView()
    header = Header.parse(data)
    if header.command in ACCESS_COMMANDS and len(data) >= _ACCESS_END:
        offset, region = ACCESS.unpack_from(data, HEADER_SIZE)
        return MessageView(header, region, offset)
    return MessageView(header)
