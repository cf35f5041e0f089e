"""What the VERSION exchange fixes for the rest of a session (sans-IO).

Both sides offer capabilities in VERSION (protocol.md §2.1, §3): the client
in its command, the server in its reply. From then on each receiver frames
and checks messages by them: the largest data transfer it takes
(``max_data_xfer_size``), the most fds per message (``max_msg_fds``), and
whether server commands move to a twin socket. :class:`Negotiation` keeps
that state; :class:`~vfioproxy.protocol.session.SessionState` (the full
decoder) and the proxy's forwarding (which decodes nothing else) both use
it, so the framing limit is computed in one place.
"""

from __future__ import annotations

import attrs

from vfioproxy.protocol.bodies import VersionBody
from vfioproxy.protocol.capabilities import (
    SPEC_MAX_DATA_XFER_SIZE,
    SPEC_MAX_MSG_FDS,
    Capabilities,
)
from vfioproxy.protocol.codec import decode
from vfioproxy.protocol.header import FLAG_ERROR, HEADER_SIZE, TYPE_MASK, Command, MessageType
from vfioproxy.protocol.offsets import COMMAND
from vfioproxy.side import Direction, Side

__all__ = ["MESSAGE_OVERHEAD", "Negotiation", "TwinSocket", "is_version"]

#: bytes of a message beyond its data count (header + the largest fixed part)
MESSAGE_OVERHEAD = 32

_VERSION = int(Command.VERSION)
_COMMAND = int(MessageType.COMMAND)
_REPLY = int(MessageType.REPLY)


_COMMAND_LOW, _COMMAND_HIGH = COMMAND.offset, COMMAND.offset + 1


def is_version(data: bytes | bytearray | memoryview) -> bool:
    """True when ``data`` starts with a header whose command is VERSION."""
    return (len(data) >= HEADER_SIZE and data[_COMMAND_LOW] == _VERSION
            and data[_COMMAND_HIGH] == 0)


@attrs.frozen
class TwinSocket:
    """A server's VERSION reply that hands the client a twin socket at ``fd_index``."""

    fd_index: int


class Negotiation:
    """The capabilities both sides offered, and the limits they imply.

    Feed it every VERSION message with :meth:`observe` (or the decoded
    bodies with :meth:`client_offer` / :meth:`server_offer`). Before the
    exchange the spec's defaults hold.
    """

    def __init__(self) -> None:
        self.client_caps: Capabilities | None = None
        self.server_caps: Capabilities | None = None
        self.version: tuple[int, int] | None = None
        self.max_message_size = MESSAGE_OVERHEAD + SPEC_MAX_DATA_XFER_SIZE

    def caps_of(self, receiver: Side) -> Capabilities | None:
        return self.client_caps if receiver is Side.CLIENT else self.server_caps

    def max_data_xfer_size(self, receiver: Side) -> int:
        """The largest data count ``receiver`` said it takes."""
        caps = self.caps_of(receiver)
        return SPEC_MAX_DATA_XFER_SIZE if caps is None else caps.effective_max_data_xfer_size()

    def max_msg_fds(self, receiver: Side) -> int:
        """The most fds ``receiver`` said it takes with one message."""
        caps = self.caps_of(receiver)
        return SPEC_MAX_MSG_FDS if caps is None else caps.effective_max_msg_fds()

    def client_offer(self, body: VersionBody) -> None:
        """The client's VERSION command."""
        self.client_caps = body.capabilities or Capabilities()
        self._update()

    def server_offer(self, body: VersionBody) -> None:
        """The server's VERSION reply (not an error reply)."""
        self.server_caps = body.capabilities or Capabilities()
        self.version = (body.major, body.minor)
        self._update()

    def _update(self) -> None:
        # the framing limit: 32 bytes plus the largest data size either side
        # offered (at least 1 MiB, the size libvfio-user always accepts)
        self.max_message_size = MESSAGE_OVERHEAD + max(
            SPEC_MAX_DATA_XFER_SIZE,
            self.max_data_xfer_size(Side.CLIENT),
            self.max_data_xfer_size(Side.SERVER),
        )

    def observe(self, direction: Direction, data: bytes) -> TwinSocket | None:
        """Account for one raw message if it is a VERSION command (c2s) or a
        successful VERSION reply (s2c); anything else, or a body that does not
        parse, changes nothing. Returns the twin socket a reply hands over."""
        if not is_version(data):
            return None
        flags = int.from_bytes(data[8:12], "little")
        kind = flags & TYPE_MASK
        if direction is Direction.C2S and kind == _COMMAND:
            body = decode(data).body
            if isinstance(body, VersionBody):
                self.client_offer(body)
            return None
        if direction is Direction.S2C and kind == _REPLY and not flags & FLAG_ERROR:
            body = decode(data).body
            if not isinstance(body, VersionBody):
                return None
            self.server_offer(body)
            twin = body.capabilities.twin_socket if body.capabilities else None
            if twin is not None and twin.supported and twin.fd_index is not None:
                return TwinSocket(twin.fd_index)
        return None
