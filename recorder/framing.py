"""Find where one msgpack object ends, checking declared sizes before reading them.

msgpack's C unpacker only checks a bin or str length against its limits once
all of its bytes have arrived, so on a hostile file ("4 GiB follow") it would
read until it runs out of memory or file. :func:`object_end` walks just the
type and length bytes instead: it rejects a declared size over the limits at
once, tells a whole object from a torn one, and says how many bytes a torn
object needs, all without decoding or copying anything.
"""

from __future__ import annotations

from recorder.errors import TraceFormatError, TraceLimitError
from recorder.limits import ReaderLimits

__all__ = ["Incomplete", "object_end"]


class Incomplete(Exception):
    """The buffer ends inside the object; ``need`` is a buffer length that lets it go on."""

    def __init__(self, need: int) -> None:
        super().__init__(need)
        self.need = need


_SCALAR, _STR, _BIN, _ARRAY, _MAP, _EXT, _NEVER = range(7)


def _lead_bytes() -> list[tuple[int, int, int]]:
    """For each first byte: (kind, width of its big-endian length field, inline value).

    The inline value is the whole size of a scalar, or the length / count of
    a fix-sized str, array or map (whose length field width is 0).
    """
    table = [(_SCALAR, 0, 1)] * 256  # positive and negative fixint, nil, false, true
    for b in range(0x80, 0x90):
        table[b] = (_MAP, 0, b & 0x0F)
    for b in range(0x90, 0xA0):
        table[b] = (_ARRAY, 0, b & 0x0F)
    for b in range(0xA0, 0xC0):
        table[b] = (_STR, 0, b & 0x1F)
    table[0xC1] = (_NEVER, 0, 0)
    for b, width in ((0xC4, 1), (0xC5, 2), (0xC6, 4)):
        table[b] = (_BIN, width, 0)
    for b, width in ((0xC7, 1), (0xC8, 2), (0xC9, 4)):
        table[b] = (_EXT, width, 0)
    for b, size in zip(range(0xCA, 0xD4), (5, 9, 2, 3, 5, 9, 2, 3, 5, 9), strict=True):
        table[b] = (_SCALAR, 0, size)  # float 32/64, uint 8..64, int 8..64
    for b in range(0xD4, 0xD9):
        table[b] = (_EXT, 0, 0)
    for b, width in ((0xD9, 1), (0xDA, 2), (0xDB, 4)):
        table[b] = (_STR, width, 0)
    table[0xDC], table[0xDD] = (_ARRAY, 2, 0), (_ARRAY, 4, 0)
    table[0xDE], table[0xDF] = (_MAP, 2, 0), (_MAP, 4, 0)
    return table


_LEAD = _lead_bytes()


def object_end(buf: bytes | bytearray, pos: int, limits: ReaderLimits) -> int:
    """Return the index just past the msgpack object that starts at ``buf[pos]``.

    Raises :class:`Incomplete` if ``buf`` ends first, :class:`TraceLimitError`
    if a declared length, the nesting or the number of objects exceeds
    ``limits``, and :class:`TraceFormatError` for the byte 0xc1 (never used)
    and for extension types (never written in a trace). Error offsets are
    indexes into ``buf``; the caller rebases them to file offsets.
    """
    end = len(buf)
    left = [1]  # objects still to walk at each open nesting level
    objects = 0
    while left:
        if not left[-1]:
            left.pop()
            continue
        left[-1] -= 1
        objects += 1
        if objects > limits.max_objects:
            raise TraceLimitError(
                f"more than max_objects ({limits.max_objects}) msgpack objects in one record",
                limit="max_objects",
                offset=pos,
            )
        if pos >= end:
            raise Incomplete(pos + 1)
        start = pos
        kind, width, n = _LEAD[buf[pos]]
        pos += 1
        if width:
            if pos + width > end:
                raise Incomplete(pos + width)
            n = int.from_bytes(buf[pos : pos + width], "big")
            pos += width
        if kind == _SCALAR:
            pos = start + n
        elif kind == _BIN:
            if n > limits.max_record_bytes:
                raise TraceLimitError(
                    f"bin of {n} bytes exceeds max_record_bytes ({limits.max_record_bytes})",
                    limit="max_record_bytes",
                    offset=start,
                )
            pos += n
        elif kind == _STR:
            if n > limits.max_str_bytes:
                raise TraceLimitError(
                    f"string of {n} bytes exceeds max_str_bytes ({limits.max_str_bytes})",
                    limit="max_str_bytes",
                    offset=start,
                )
            pos += n
        elif kind in (_ARRAY, _MAP):
            count = n if kind == _ARRAY else 2 * n
            if count > limits.max_objects:
                raise TraceLimitError(
                    f"container of {count} objects exceeds max_objects ({limits.max_objects})",
                    limit="max_objects",
                    offset=start,
                )
            if len(left) > limits.max_depth:
                raise TraceLimitError(
                    f"nested deeper than max_depth ({limits.max_depth})",
                    limit="max_depth",
                    offset=start,
                )
            left.append(count)
        elif kind == _EXT:
            raise TraceFormatError(
                f"msgpack extension type (byte {buf[start]:#04x}) in a trace", offset=start
            )
        else:
            raise TraceFormatError(f"invalid msgpack byte {buf[start]:#04x}", offset=start)
    if pos > end:
        raise Incomplete(pos)
    return pos
