"""The one exception hierarchy of vfioproxy.

Everything vfioproxy raises on purpose derives from :class:`VfioProxyError`.
Protocol problems are split the way h11 splits them: :class:`LocalProtocolError`
means *we* (the caller of this library) tried something the protocol forbids;
:class:`RemoteProtocolError` means a *peer* sent something that breaks it. A
proxy needs that split to say which side is at fault.
"""

from __future__ import annotations

import os
from typing import Any

from recorder.errors import VfioProxyError
from vfioproxy.side import Side

__all__ = [
    "ConnectionClosedError",
    "FdsTruncatedError",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "Side",
    "TransportError",
    "UsageError",
    "VfioProxyError",
    "os_error_text",
    "os_reason",
]

class ProtocolError(VfioProxyError):
    """A vfio-user protocol rule was broken.

    Carries where: which ``side`` sent the offending message, its ``index``
    (0-based, per direction), the ``command`` name, the ``field`` and byte
    ``offset`` (from the first byte of the message) at fault, and what was
    ``expected`` versus what was ``got``. Any of them may be ``None`` when
    not known. ``str()`` renders all known parts in one line.
    """

    def __init__(
        self,
        msg: str,
        *,
        side: Side | None = None,
        index: int | None = None,
        command: str | None = None,
        field: str | None = None,
        offset: int | None = None,
        expected: Any = None,
        got: Any = None,
    ) -> None:
        super().__init__(msg)
        self.msg = msg
        self.side = side
        self.index = index
        self.command = command
        self.field = field
        self.offset = offset
        self.expected = expected
        self.got = got

    def located(self, *, side: Side | None = None, index: int | None = None) -> ProtocolError:
        """Fill in ``side``/``index`` where still unknown; returns ``self``."""
        if self.side is None:
            self.side = side
        if self.index is None:
            self.index = index
        return self

    def __str__(self) -> str:
        where = []
        if self.side is not None:
            where.append(f"{self.side.value} message")
        if self.index is not None:
            where.append(f"{direction_index(self.side, self.index)}")
        if self.command is not None:
            where.append(f"({self.command})")
        parts = [" ".join(where)] if where else []
        if self.field is not None:
            loc = f"field {self.field}"
            if self.offset is not None:
                loc += f" at offset {self.offset}"
            parts.append(loc)
        elif self.offset is not None:
            parts.append(f"at offset {self.offset}")
        text = ": ".join([*parts, self.msg])
        if self.expected is not None:
            text += f" (expected {_show(self.expected)}, got {_show(self.got)})"
        elif self.got is not None:
            text += f" (got {_show(self.got)})"
        return text


def direction_index(sender: Side | None, index: int) -> str:
    """``c2s[12]``: the ``index``-th message (0-based) ``sender`` sent in its session."""
    if sender is None:
        return f"[{index}]"
    return f"{'c2s' if sender is Side.CLIENT else 's2c'}[{index}]"


def _show(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and 9 < value < 1 << 64:
        return f"{value} ({value:#x})"
    text = repr(value) if isinstance(value, (str, bytes)) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


class LocalProtocolError(ProtocolError):
    """This program tried to build or send something the protocol forbids."""


class RemoteProtocolError(ProtocolError):
    """A peer sent something that breaks the protocol."""


class UsageError(VfioProxyError):
    """Bad input to a command, or what it asks for cannot work: an option's
    value, a path that cannot be used, an output that exists, a session the
    trace does not hold, a proxy told to forward to itself. The command line
    prints it as one line naming the command and exits 2."""


class TransportError(VfioProxyError):
    """A socket-level failure that is not a protocol rule (e.g. lost fds)."""


class FdsTruncatedError(TransportError):
    """The kernel reported MSG_CTRUNC: some passed fds were dropped."""


class ConnectionClosedError(TransportError):
    """The peer closed the connection; ``mid_message`` tells if framing was lost.

    ``received`` counts the bytes of the torn message that did arrive and
    ``partial`` holds them (when the receiver kept them), so nothing is lost.
    """

    def __init__(
        self, msg: str, *, mid_message: bool = False, received: int = 0, partial: bytes = b""
    ) -> None:
        super().__init__(msg)
        self.mid_message = mid_message
        self.received = received
        self.partial = partial


def os_reason(exc: OSError) -> str:
    """The OS's words for ``exc`` ("No such file or directory"), without the
    errno number or the exception's class."""
    return exc.strerror or str(exc) or type(exc).__name__


def os_error_text(exc: OSError) -> str:
    """``exc`` as one line for a user: ``PATH: the OS's words`` when it names
    a file (both files of a rename), else the OS's words alone."""
    reason = os_reason(exc)
    if exc.filename is None:
        return reason
    where = os.fsdecode(exc.filename)
    if exc.filename2 is not None:
        where += f" -> {os.fsdecode(exc.filename2)}"
    return f"{where}: {reason}"
