"""Where a step's requests were outstanding at the server: each command paired
with its reply, as a time span (what the PNG and HTML views shade)."""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from vfioproxy.side import Direction
from vfioproxy.trace.timeline.model import LabelledMessage

__all__ = ["ServerSpan", "server_spans"]


@attrs.frozen
class ServerSpan:
    """A command of ``step`` sent at ``start_ns`` and answered at ``end_ns``."""

    step: str
    start_ns: int
    end_ns: int


def server_spans(messages: Iterable[LabelledMessage]) -> list[ServerSpan]:
    """The spans of the client's commands that got a reply, in reply order; a
    posted write or a command the trace ends before answering has none."""
    waiting: dict[int, LabelledMessage] = {}
    spans: list[ServerSpan] = []
    for message in messages:
        if message.direction is Direction.C2S and not message.is_reply:
            waiting[message.msg_id] = message
        elif message.direction is Direction.S2C and message.is_reply:
            command = waiting.pop(message.msg_id, None)
            if command is not None:
                spans.append(ServerSpan(command.label.step, command.t_ns, message.t_ns))
    return spans
