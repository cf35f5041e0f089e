"""The 16-byte vfio-user message header and the command numbers."""

from __future__ import annotations

import enum
import errno as errno_module
import struct

import attrs

from vfioproxy.errors import LocalProtocolError, RemoteProtocolError

HEADER_SIZE = 16
HEADER_STRUCT = struct.Struct("<HHIII")

#: low 4 bits of ``flags``: message type
TYPE_MASK = 0x0F
#: command flag: the receiver must not reply
FLAG_NO_REPLY = 0x10
#: reply flag: ``error`` holds an errno
FLAG_ERROR = 0x20
KNOWN_FLAGS = TYPE_MASK | FLAG_NO_REPLY | FLAG_ERROR


class MessageType(enum.IntEnum):
    COMMAND = 0
    REPLY = 1


class Command(enum.IntEnum):
    """vfio-user command numbers (14, DIRTY_PAGES, is retired)."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


#: commands a server sends to the client; all others go client -> server
SERVER_COMMANDS = frozenset({Command.DMA_READ, Command.DMA_WRITE})


def command_name(command: int) -> str:
    """Name of a command number, ``CMD_<n>`` for unknown ones."""
    try:
        return Command(command).name
    except ValueError:
        return "DIRTY_PAGES(retired)" if command == 14 else f"CMD_{command}"


_REPLY = int(MessageType.REPLY)
_COMMAND = int(MessageType.COMMAND)


@attrs.frozen
class Header:
    """A decoded header. ``size`` is the whole message length, header included."""

    msg_id: int
    command: int
    size: int
    flags: int = 0
    error: int = 0

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> Header:
        """Decode the first 16 bytes of ``data`` (no validation beyond length)."""
        if len(data) < HEADER_SIZE:
            raise RemoteProtocolError(
                "truncated header", field="header", offset=0, expected=HEADER_SIZE, got=len(data)
            )
        return cls(*HEADER_STRUCT.unpack_from(data, 0))

    def pack(self) -> bytes:
        try:
            return HEADER_STRUCT.pack(self.msg_id, self.command, self.size, self.flags, self.error)
        except struct.error as exc:
            raise LocalProtocolError(f"header field out of range: {self!r}") from exc

    @property
    def type(self) -> int:
        """The raw type nibble (0 command, 1 reply, others invalid)."""
        return self.flags & TYPE_MASK

    @property
    def is_reply(self) -> bool:
        return self.flags & TYPE_MASK == _REPLY

    @property
    def is_command(self) -> bool:
        return self.flags & TYPE_MASK == _COMMAND

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & FLAG_NO_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & FLAG_ERROR)

    @property
    def command_name(self) -> str:
        return command_name(self.command)

    def describe(self) -> str:
        """Short text such as ``REGION_READ reply id=7``, ``DMA_MAP cmd id=3 (no_reply)``
        or ``REGION_READ reply id=9 error=22 (EINVAL)``
        (``id=``: the msg_id, never to be confused with a trace's ``#seq``)."""
        kind = "reply" if self.is_reply else "cmd" if self.is_command else f"type{self.type}"
        text = f"{self.command_name} {kind} id={self.msg_id}"
        if self.is_error:
            text += f" error={errno_text(self.error)}"
        if self.no_reply:
            text += " (no_reply)"
        return text


def errno_text(value: int) -> str:
    """``22 (EINVAL)``: an errno and its name, when it has one."""
    name = errno_module.errorcode.get(value)
    return f"{value} ({name})" if name else str(value)


#: the largest message libvfio-user and QEMU accept by default: 1 MiB of data + 32
DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024 + 32


def framed_body_length(size: int, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> int:
    """How many body bytes a receiver reads after a header announcing ``size``.

    A size that cannot be framed (below 16, or above ``max_size``) is read as
    a header alone, as libvfio-user does (protocol.md §6 pitfall 20): the
    receiver answers it and takes the next 16 bytes as the next header.
    """
    if size < HEADER_SIZE or size > max_size:
        return 0
    return size - HEADER_SIZE
