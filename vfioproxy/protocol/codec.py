"""Whole messages: ``decode(bytes, fds) -> Message`` and ``encode(Message) -> (bytes, fds)``.

The two are exact mirror images: ``encode(decode(raw))[0] == raw`` for every
byte string ``decode`` accepts. Bytes that do not decode (unknown commands,
bodies too short for their struct, bad VERSION JSON) become a
:class:`~vfioproxy.protocol.bodies.RawBody` that keeps them, with the reason;
``strict=True`` raises :class:`~vfioproxy.errors.RemoteProtocolError` instead.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from vfioproxy.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from vfioproxy.protocol.bodies import (
    Body,
    BodyContext,
    DeviceFeatureBody,
    DeviceInfoBody,
    DmaAccessBody,
    DmaLayout,
    DmaMapBody,
    DmaUnmapBody,
    EmptyBody,
    ErrorBody,
    IrqInfoBody,
    IrqSetBody,
    MigDataBody,
    RawBody,
    RegionAccessBody,
    RegionInfoBody,
    RegionIoFdsBody,
    RegionWriteMultiBody,
    VersionBody,
    WriteMultiReplyBody,
)
from vfioproxy.protocol.header import (
    FLAG_ERROR,
    FLAG_NO_REPLY,
    HEADER_SIZE,
    TYPE_MASK,
    Command,
    Header,
    MessageType,
)
from vfioproxy.side import Side

Parser = Callable[[bytes, BodyContext], Body]

#: body parser per command number, for commands and for (non-error) replies
COMMAND_PARSERS: dict[int, Parser] = {
    Command.VERSION: VersionBody.parse,
    Command.DMA_MAP: DmaMapBody.parse,
    Command.DMA_UNMAP: DmaUnmapBody.parse,
    Command.DEVICE_GET_INFO: DeviceInfoBody.parse,
    Command.DEVICE_GET_REGION_INFO: RegionInfoBody.parse,
    Command.DEVICE_GET_REGION_IO_FDS: RegionIoFdsBody.parse,
    Command.DEVICE_GET_IRQ_INFO: IrqInfoBody.parse,
    Command.DEVICE_SET_IRQS: IrqSetBody.parse,
    Command.REGION_READ: RegionAccessBody.parse,
    Command.REGION_WRITE: RegionAccessBody.parse,
    Command.DMA_READ: DmaAccessBody.parse,
    Command.DMA_WRITE: DmaAccessBody.parse,
    Command.DEVICE_RESET: EmptyBody.parse,
    Command.REGION_WRITE_MULTI: RegionWriteMultiBody.parse,
    Command.DEVICE_FEATURE: DeviceFeatureBody.parse,
    Command.MIG_DATA_READ: MigDataBody.parse,
    Command.MIG_DATA_WRITE: MigDataBody.parse,
}

REPLY_PARSERS: dict[int, Parser] = {
    **COMMAND_PARSERS,
    Command.DMA_MAP: EmptyBody.parse,
    Command.DEVICE_SET_IRQS: EmptyBody.parse,
    Command.REGION_WRITE_MULTI: WriteMultiReplyBody.parse,
    Command.MIG_DATA_WRITE: EmptyBody.parse,
}

#: replies whose parsers read the request's body (``BodyContext.request``);
#: the others get a shared context instead of one made per reply
REPLIES_READING_REQUEST = frozenset({Command.DEVICE_FEATURE})

#: commands whose messages may carry fds: (command, is_reply)
FD_CARRIERS = frozenset(
    {
        (Command.VERSION, True),
        (Command.DMA_MAP, False),
        (Command.DEVICE_GET_REGION_INFO, True),
        (Command.DEVICE_GET_REGION_IO_FDS, True),
        (Command.DEVICE_SET_IRQS, False),
    }
)


def may_carry_fds(command: int, is_reply: bool) -> bool:
    """Whether a message of this kind may legitimately carry fds (protocol.md §1.5)."""
    return (command, is_reply) in FD_CARRIERS


@attrs.frozen
class Dialects:
    """The DMA_READ/DMA_WRITE layout each side uses (protocol.md §2.11, §6.11).

    Rule used when not overridden: the client is ``QEMU`` when its VERSION
    command looks like QEMU's (see :func:`detect_client_dma_layout`), else
    ``SPEC``; the server is ``SPEC`` (libvfio-user, and QEMU's own server,
    which is built on libvfio-user).
    """

    client: DmaLayout = DmaLayout.SPEC
    server: DmaLayout = DmaLayout.SPEC

    def of(self, side: Side) -> DmaLayout:
        return self.client if side is Side.CLIENT else self.server

    def describe(self) -> str:
        return f"client {self.client.value}, server {self.server.value}"


DEFAULT_DIALECTS = Dialects()


def detect_client_dma_layout(version: VersionBody) -> DmaLayout:
    """QEMU's VERSION command has a recognisable capability set: max_msg_fds 16,
    pgsizes and max_dma_maps present, migration with pgsize and max_bitmap_size."""
    caps = version.capabilities
    if (
        caps is not None
        and caps.max_msg_fds == 16
        and caps.pgsizes is not None
        and caps.max_dma_maps is not None
        and caps.migration is not None
        and caps.migration.pgsize is not None
        and caps.migration.max_bitmap_size is not None
    ):
        return DmaLayout.QEMU
    return DmaLayout.SPEC


@attrs.frozen
class Message:
    """One vfio-user message: header, typed body, and the fds it carries.

    ``fds`` are opaque to the codec (ints, :class:`~vfioproxy.io.fds.OwnedFd`, or
    recorded fd metadata): they ride along unchanged.
    """

    header: Header
    body: Body
    fds: tuple[Any, ...] = ()

    @property
    def command(self) -> int:
        return self.header.command

    @property
    def msg_id(self) -> int:
        return self.header.msg_id

    @property
    def is_reply(self) -> bool:
        return self.header.is_reply

    @property
    def is_error(self) -> bool:
        return self.header.is_error

    @property
    def decoded(self) -> bool:
        """False when the body is a raw fallback."""
        return not isinstance(self.body, RawBody)

    def describe(self) -> str:
        """One line: header and decoded body summary."""
        return f"{self.header.describe()} {self.body.summary()}"


def serialize_body(body: Body) -> bytes:
    """``body.serialize()``, with out-of-range fields reported as LocalProtocolError."""
    try:
        return body.serialize()
    except struct.error as exc:
        raise LocalProtocolError(
            f"{type(body).__name__} has a field out of range: {exc}"
        ) from None


def build_command(
    command: int,
    msg_id: int,
    body: Body | None = None,
    *,
    fds: Sequence[Any] = (),
    no_reply: bool = False,
) -> Message:
    """A command message with the header's size computed from ``body``."""
    payload = b"" if body is None else serialize_body(body)
    flags = FLAG_NO_REPLY if no_reply else int(MessageType.COMMAND)
    header = Header(msg_id, command, HEADER_SIZE + len(payload), flags, 0)
    return Message(header, EmptyBody() if body is None else body, tuple(fds))


def build_reply(
    request: Header | Message, body: Body | None = None, *, fds: Sequence[Any] = ()
) -> Message:
    """A success reply to ``request`` (same id and command, flags 0x1)."""
    head = request.header if isinstance(request, Message) else request
    payload = b"" if body is None else serialize_body(body)
    header = Header(head.msg_id, head.command, HEADER_SIZE + len(payload), int(MessageType.REPLY))
    return Message(header, EmptyBody() if body is None else body, tuple(fds))


def build_error_reply(request: Header | Message, errno: int, payload: bytes = b"") -> Message:
    """An error reply (flags 0x21) carrying ``errno``; header-only unless ``payload``."""
    head = request.header if isinstance(request, Message) else request
    header = Header(
        head.msg_id, head.command, HEADER_SIZE + len(payload), int(MessageType.REPLY) | FLAG_ERROR,
        errno,
    )
    return Message(header, ErrorBody(payload))


_REPLY = int(MessageType.REPLY)
_CLIENT = Side.CLIENT  # a module constant: an enum member off its class is a descriptor call
#: the contexts of commands (no request), one per layout
_CONTEXTS = {layout: BodyContext(layout) for layout in DmaLayout}


def decode(
    data: bytes | bytearray | memoryview,
    fds: Sequence[Any] = (),
    *,
    sender: Side | None = None,
    dialects: Dialects = DEFAULT_DIALECTS,
    request: Message | None = None,
    strict: bool = False,
    header: Header | None = None,
) -> Message:
    """Decode one whole message (header + payload) into a :class:`Message`.

    ``sender`` picks the DMA layout from ``dialects`` (the sender's); without
    it, DMA commands are read as sent by the server and DMA replies as sent by
    the client. ``request`` is the command a reply answers, when known.
    A message that does not decode gets a raw body (``strict``: raises).
    ``header``: the header of ``data`` when the caller has parsed it already.
    """
    raw = bytes(data)
    if header is None:
        header = Header.parse(raw)
    if len(raw) > _VIEWED_PAYLOAD and header.command in _VIEWED_PARSERS:
        # a large data payload is parsed from a view, so that only its body's
        # data is copied (not first the whole payload too)
        try:
            return _decode_viewed(raw, header, tuple(fds), sender, dialects, request, strict)
        except ProtocolError:
            if strict:
                raise
    payload = raw[HEADER_SIZE:]
    fd_tuple = tuple(fds)
    if header.size != len(raw):
        # only a header whose size cannot be framed travels alone (pitfall 20)
        problem = RemoteProtocolError(
            "header size does not match the message length",
            command=header.command_name,
            field="size",
            offset=4,
            expected=len(raw),
            got=header.size,
        )
        if strict:
            raise problem
        return Message(header, RawBody(payload, str(problem)), fd_tuple)
    kind = header.flags & TYPE_MASK
    is_reply = kind == _REPLY
    if is_reply and header.flags & FLAG_ERROR:
        return Message(header, ErrorBody(payload), fd_tuple)
    if kind > _REPLY:
        problem = RemoteProtocolError(
            "invalid message type in flags", command=header.command_name, field="flags",
            offset=8, expected="type 0 or 1", got=header.flags,
        )
        if strict:
            raise problem
        return Message(header, RawBody(payload, str(problem)), fd_tuple)
    parsers = REPLY_PARSERS if is_reply else COMMAND_PARSERS
    parser = parsers.get(header.command)
    if parser is None:
        problem = RemoteProtocolError(
            "unknown command", command=header.describe(), field="command", offset=2,
            got=header.command,
        )
        if strict:
            raise problem
        return Message(header, RawBody(payload, str(problem)), fd_tuple)
    if is_reply and not payload:
        return Message(header, EmptyBody(), fd_tuple)
    ctx = _context(header, is_reply, sender, dialects, request)
    try:
        body = parser(payload, ctx)
    except ProtocolError as exc:
        if exc.command is None:
            exc.command = header.describe()
        if strict:
            raise
        return Message(header, RawBody(payload, str(exc)), fd_tuple)
    return Message(header, body, fd_tuple)


def _context(
    header: Header, is_reply: bool, sender: Side | None, dialects: Dialects,
    request: Message | None,
) -> BodyContext:
    """What a body parser needs to know: the DMA layout of the side that sent
    the message (by default, the side that sends this kind of ``header``)
    and, for the replies that read it, the request's body."""
    if sender is None:
        client_sent = is_reply == (header.command in (Command.DMA_READ, Command.DMA_WRITE))
        sender = Side.CLIENT if client_sent else Side.SERVER
    layout = dialects.client if sender is _CLIENT else dialects.server
    if request is None or header.command not in REPLIES_READING_REQUEST:
        return _CONTEXTS[layout]
    return BodyContext(layout, request.body)


#: payloads larger than this, of the commands whose parsers take a memoryview,
#: are parsed from a view of the message (:func:`decode`)
_VIEWED_PAYLOAD = 64 * 1024
#: the parsers that slice their payload only (no bytes methods): a memoryview will do
_VIEWED_PARSERS = frozenset({Command.REGION_READ, Command.REGION_WRITE,
                             Command.DMA_READ, Command.DMA_WRITE})


def _decode_viewed(
    raw: bytes,
    header: Header,
    fds: tuple[Any, ...],
    sender: Side | None,
    dialects: Dialects,
    request: Message | None,
    strict: bool,
) -> Message:
    """:func:`decode` of a whole, well-typed REGION/DMA access message, its payload
    parsed from a view (its data fields copied once, into bytes); raises
    :class:`ProtocolError` (the caller decodes it the ordinary way then)."""
    kind = header.flags & TYPE_MASK
    if header.size != len(raw) or kind > _REPLY or (kind == _REPLY and header.flags & FLAG_ERROR):
        raise ProtocolError("not a plain access message")
    is_reply = kind == _REPLY
    parser = (REPLY_PARSERS if is_reply else COMMAND_PARSERS)[header.command]
    ctx = _context(header, is_reply, sender, dialects, request)
    with memoryview(raw) as view:
        body: Any = parser(view[HEADER_SIZE:], ctx)  # type: ignore[arg-type]
        owned = {field.name: bytes(value) for field in attrs.fields(type(body))
                 if isinstance(value := getattr(body, field.name), memoryview)}
    return Message(header, attrs.evolve(body, **owned), fds)


def encode(message: Message) -> tuple[bytes, tuple[Any, ...]]:
    """The exact bytes of ``message`` and its fds, ready for one ``sendmsg``.

    The header is written as it is (its ``size`` is not recomputed), so a
    decoded message re-encodes byte for byte. Use :func:`build_command` and
    friends to make new messages with a correct size.
    """
    payload = serialize_body(message.body)
    header = message.header
    if header.size != HEADER_SIZE + len(payload) and not isinstance(message.body, RawBody):
        raise LocalProtocolError(
            "header size does not match the body",
            command=header.command_name,
            field="size",
            expected=HEADER_SIZE + len(payload),
            got=header.size,
        )
    return header.pack() + payload, message.fds
