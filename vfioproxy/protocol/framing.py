"""Sans-IO framing: bytes and fds in, in any split, whole messages out."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import attrs

from vfioproxy.errors import RemoteProtocolError
from vfioproxy.protocol.header import (
    DEFAULT_MAX_MESSAGE_SIZE,
    HEADER_SIZE,
    HEADER_STRUCT,
    framed_body_length,
)


@attrs.frozen
class Frame:
    """One framed message.

    ``fds`` came with the message's first byte. ``late_fds`` came with a
    later part of it: real receivers never see those (the kernel drops them
    when read without an ancillary buffer), so they are kept apart.
    ``unframable`` is set when the header's size could not be framed
    (below 16 or above the limit): the frame is then the header alone.
    """

    data: bytes
    fds: tuple[Any, ...] = ()
    late_fds: tuple[Any, ...] = ()
    unframable: bool = False


class MessageFramer:
    """Turns a byte stream with fds into :class:`Frame` objects.

    Feed with :meth:`receive_data` as data arrives (any split, one byte at a
    time too), then call :meth:`next_frame` until it returns ``None``. Fds
    passed with a chunk bind to the first message that starts inside that
    chunk; fds of a chunk in which no message starts belong to the message
    in progress as ``late_fds`` (a real receiver would lose them).
    """

    def __init__(self, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self.max_size = max_size
        self._buffer = bytearray()
        # (start, end) stream offsets and fds of each chunk that carried fds
        self._fd_chunks: deque[tuple[int, int, tuple[Any, ...]]] = deque()
        self._consumed = 0  # absolute offset of _buffer[0]
        self._eof = False

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned in a frame."""
        return len(self._buffer)

    def receive_data(self, data: bytes | bytearray | memoryview, fds: Sequence[Any] = ()) -> None:
        if self._eof:
            raise RemoteProtocolError("data after end of stream")
        if fds:
            start = self._consumed + len(self._buffer)
            self._fd_chunks.append((start, start + max(len(data), 1), tuple(fds)))
        self._buffer += data

    def receive_eof(self) -> None:
        """Mark the end of the stream; :meth:`next_frame` then reports a torn message."""
        self._eof = True

    def next_frame(self) -> Frame | None:
        """The next whole message, or ``None`` when more data is needed.

        After :meth:`receive_eof`, a partial message raises
        :class:`RemoteProtocolError` (framing is lost mid-message).
        """
        buf = self._buffer
        if len(buf) < HEADER_SIZE:
            self._check_eof()
            return None
        size = HEADER_STRUCT.unpack_from(buf)[2]
        length = HEADER_SIZE + framed_body_length(size, self.max_size)
        if len(buf) < length:
            self._check_eof()
            return None
        start = self._consumed
        end = start + length
        fds: list[Any] = []
        late: list[Any] = []
        while self._fd_chunks and self._fd_chunks[0][0] < end:
            chunk_start, chunk_end, chunk_fds = self._fd_chunks.popleft()
            if chunk_start <= start:
                fds.extend(chunk_fds)
            elif chunk_end > end:  # the next message starts inside this chunk
                self._fd_chunks.appendleft((end, chunk_end, chunk_fds))
                break
            else:
                late.extend(chunk_fds)
        data = bytes(buf[:length])
        del buf[:length]
        self._consumed = end
        return Frame(data, tuple(fds), tuple(late), unframable=length == HEADER_SIZE != size)

    def _check_eof(self) -> None:
        if self._eof and self._buffer:
            raise RemoteProtocolError(
                "end of stream in the middle of a message: framing lost",
                field="size",
                expected=self._expected(),
                got=len(self._buffer),
            )

    def _expected(self) -> int:
        if len(self._buffer) < HEADER_SIZE:
            return HEADER_SIZE
        size: int = HEADER_STRUCT.unpack_from(self._buffer)[2]
        return HEADER_SIZE + framed_body_length(size, self.max_size)
