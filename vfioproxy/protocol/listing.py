"""One message as one line: the format ``trace show`` and the proxy's live view share.

A line reads ``SEQ MS DIR sSESSION COMMAND KIND id=MSG_ID  SUMMARY [fds] (+latency)``:
``SEQ`` is the message's trace sequence number (the ``#N`` every report
names it by), ``MS`` the time since the first record, the decoded summary
comes from :func:`vfioproxy.protocol.pci_view.describe`. Lines under a
message (its violations, its fields) are indented past the first two
columns. :class:`RequestTimes` measures the request -> reply latency both
views print.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

from vfioproxy.protocol.header import Header, errno_text
from vfioproxy.protocol.pci import format_size
from vfioproxy.protocol.session import MAX_OUTSTANDING, Observation
from vfioproxy.side import Direction

__all__ = [
    "INDENT", "RequestTimes", "describe_fd", "errno_text", "message_line", "note_line", "prefix",
]

#: what lines under a message start with: the width of its seq and time columns
INDENT = " " * 19


def prefix(seq: int, t_ns: int, origin: int) -> str:
    """The first two columns: the trace seq and the milliseconds since ``origin``."""
    return f"{seq:>6} {(t_ns - origin) / 1e6:11.3f}"


class _FdKind(Protocol):
    @property
    def value(self) -> str: ...


class FdMetadata(Protocol):
    """What a listing says of an fd (a :class:`recorder.records.FdRecord` has it)."""

    @property
    def kind(self) -> _FdKind: ...
    @property
    def size(self) -> int | None: ...
    @property
    def contents(self) -> bytes | None: ...


def describe_fd(fd: FdMetadata) -> str:
    """``memfd 64 KiB +contents``: an fd's kind, size and whether its contents are recorded."""
    text = fd.kind.value
    if fd.size is not None:
        text += f" {format_size(fd.size)}"
    if fd.contents is not None:
        text += " +contents"
    return text


def message_line(
    seq: int,
    t_ns: int,
    origin: int,
    direction: Direction,
    session: int,
    header: Header,
    summary: str,
    *,
    fds: str = "",
    latency_ns: int | None = None,
) -> str:
    """The line of one message (``fds``: their description, if any)."""
    line = (f"{prefix(seq, t_ns, origin)} {direction.value} s{session} "
            f"{header.describe():<36} {summary}")
    if fds:
        line += f"  [fds: {fds}]"
    if latency_ns is not None:
        line += f"  (+{latency_ns / 1000:.1f} us)"
    return line


def note_line(text: str) -> str:
    """A line under a message: a violation (``!!! ...``) or a remark on it."""
    return f"{INDENT}{text}"


class RequestTimes:
    """When each request of one session was sent, to give its reply a latency
    (and the seq of the request it answers).

    Remembers at most ``limit`` requests (by default as many as a session
    state keeps waiting in both directions): the oldest is forgotten first,
    so a peer that never answers does not make it grow.
    """

    def __init__(self, limit: int = 2 * MAX_OUTSTANDING) -> None:
        # by id() of the request: its header (so that a reused id does not
        # match another message), when it was sent and its seq; oldest first
        self._sent: OrderedDict[int, tuple[Header, int, int]] = OrderedDict()
        self._limit = limit
        #: the ``seq`` the request answered by the reply the last :meth:`latency`
        #: gave a latency was noted with; None after any other call
        self.request_seq: int | None = None

    def __len__(self) -> int:
        return len(self._sent)

    def latency(self, obs: Observation, t_ns: int, seq: int = 0) -> int | None:
        """Note a request sent at ``t_ns`` (its trace ``seq``, if it has one), or
        return the latency of a reply (ns), setting :attr:`request_seq` to its
        request's seq (one attribute store: the proxy's live view, which has no
        use for it, pays nothing more)."""
        self.request_seq = None
        header = obs.message.header
        if header.is_command and not header.no_reply:
            self._sent[id(obs.message)] = (header, t_ns, seq)
            if len(self._sent) > self._limit:
                self._sent.popitem(last=False)
            return None
        if obs.request is not None:
            sent = self._sent.pop(id(obs.request), None)
            if sent is None or sent[0] is not obs.request.header:
                return None
            self.request_seq = sent[2]
            return t_ns - sent[1]
        return None


