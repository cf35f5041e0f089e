"""Where the fields of a message sit in its bytes: the one table of wire offsets.

Every field is a little-endian unsigned integer (protocol.md, notation):
a :class:`Field` gives its offset and size in bytes. Header fields
(protocol.md §1.2) are at absolute offsets; body fields at offsets inside
the payload, which starts at ``HEADER_SIZE`` (``abs = HEADER_SIZE + offset``).
Structs that read several adjacent fields in one call are built from the
fields (:func:`layout`), so no offset is written twice.
"""

from __future__ import annotations

import itertools
import struct
from typing import NamedTuple

from vfioproxy.protocol.header import HEADER_SIZE, Command

__all__ = [
    "ACCESS",
    "ACCESS_COMMANDS",
    "ACCESS_COUNT",
    "ACCESS_OFFSET",
    "ACCESS_REGION",
    "BODY_FIELDS",
    "COMMAND",
    "ERROR",
    "FLAGS",
    "HEADER",
    "HEADER_FIELDS",
    "MSG_ID",
    "MSG_ID_ONLY",
    "SIZE",
    "SIZE_ONLY",
    "VERSION_MAJOR",
    "VERSION_MINOR",
    "VERSION_NUMBERS",
    "Field",
    "layout",
]


class Field(NamedTuple):
    """A little-endian unsigned integer of ``size`` bytes at ``offset``."""

    offset: int
    size: int

    @property
    def end(self) -> int:
        return self.offset + self.size


_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}


def layout(*fields: Field) -> struct.Struct:
    """One struct reading adjacent ``fields`` (in order, no gaps) from the first one's offset."""
    for before, after in itertools.pairwise(fields):
        if before.end != after.offset:
            raise ValueError(f"fields {before} and {after} are not adjacent")
    return struct.Struct("<" + "".join(_CODES[field.size] for field in fields))


# header, absolute offsets (protocol.md §1.2)
MSG_ID = Field(0, 2)
COMMAND = Field(2, 2)
SIZE = Field(4, 4)
FLAGS = Field(8, 4)
ERROR = Field(12, 4)
HEADER_FIELDS: dict[str, Field] = {
    "msg_id": MSG_ID, "command": COMMAND, "size": SIZE, "flags": FLAGS, "error": ERROR,
}
#: the whole header in one unpack: msg_id, command, size, flags, error
HEADER = layout(MSG_ID, COMMAND, SIZE, FLAGS, ERROR)
assert HEADER.size == HEADER_SIZE
#: the header's size alone (``unpack_from(data, SIZE.offset)``): what framing reads
SIZE_ONLY = layout(SIZE)
#: the header's msg_id alone (``pack``/``unpack_from(data, MSG_ID.offset)``)
MSG_ID_ONLY = layout(MSG_ID)

# region access, body offsets (REGION_READ/REGION_WRITE, protocol.md §2.9/§2.10)
ACCESS_OFFSET = Field(0, 8)
ACCESS_REGION = Field(8, 4)
ACCESS_COUNT = Field(12, 4)
#: the commands whose body starts with offset u64, region u32, count u32
ACCESS_COMMANDS = frozenset({Command.REGION_READ, Command.REGION_WRITE})
#: where a region access goes, in one unpack at ``HEADER_SIZE``: offset, region
ACCESS = layout(ACCESS_OFFSET, ACCESS_REGION)

# VERSION, body offsets (protocol.md §2.1)
VERSION_MAJOR = Field(0, 2)
VERSION_MINOR = Field(2, 2)
#: major, minor in one unpack of the VERSION payload
VERSION_NUMBERS = layout(VERSION_MAJOR, VERSION_MINOR)

_ARGSZ = Field(0, 4)
_ARGSZ_COMMANDS = (
    Command.DMA_MAP,
    Command.DMA_UNMAP,
    Command.DEVICE_GET_INFO,
    Command.DEVICE_GET_REGION_INFO,
    Command.DEVICE_GET_REGION_IO_FDS,
    Command.DEVICE_GET_IRQ_INFO,
    Command.DEVICE_SET_IRQS,
    Command.DEVICE_FEATURE,
    Command.MIG_DATA_READ,
    Command.MIG_DATA_WRITE,
)

#: named body fields: per command, body offset and size (protocol.md §2). DMA_READ and
#: DMA_WRITE's count is the spec's u64, whose first bytes are QEMU's u32.
BODY_FIELDS: dict[str, dict[int, Field]] = {
    "offset": {
        Command.REGION_READ: ACCESS_OFFSET,
        Command.REGION_WRITE: ACCESS_OFFSET,
        Command.DMA_MAP: Field(8, 8),
        Command.DEVICE_GET_REGION_INFO: Field(24, 8),
    },
    "region": {Command.REGION_READ: ACCESS_REGION, Command.REGION_WRITE: ACCESS_REGION},
    "count": {
        Command.REGION_READ: ACCESS_COUNT,
        Command.REGION_WRITE: ACCESS_COUNT,
        Command.DMA_READ: Field(8, 8),
        Command.DMA_WRITE: Field(8, 8),
        Command.DEVICE_GET_REGION_IO_FDS: Field(12, 4),
        Command.DEVICE_GET_IRQ_INFO: Field(12, 4),
        Command.DEVICE_SET_IRQS: Field(16, 4),
    },
    "address": {Command.DMA_READ: Field(0, 8), Command.DMA_WRITE: Field(0, 8)},
    "iova": {Command.DMA_MAP: Field(16, 8), Command.DMA_UNMAP: Field(8, 8)},
    "index": {
        Command.DEVICE_GET_REGION_INFO: Field(8, 4),
        Command.DEVICE_GET_REGION_IO_FDS: Field(8, 4),
        Command.DEVICE_GET_IRQ_INFO: Field(8, 4),
        Command.DEVICE_SET_IRQS: Field(8, 4),
    },
    "start": {Command.DEVICE_SET_IRQS: Field(12, 4)},
    "argsz": {command: _ARGSZ for command in _ARGSZ_COMMANDS},
    "major": {Command.VERSION: VERSION_MAJOR},
    "minor": {Command.VERSION: VERSION_MINOR},
}
