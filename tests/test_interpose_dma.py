"""``trap-dma`` (sans-IO): which DMA_MAPs lose their fd, what else changes, what is noted."""

from __future__ import annotations

import pytest

from vfioproxy.interpose import FdFate, IovaRange
from vfioproxy.interpose.dma import TrapDma, trapped_ranges
from vfioproxy.protocol.bodies import DmaMapBody, DmaUnmapBody
from vfioproxy.protocol.codec import build_command, build_reply, encode
from vfioproxy.protocol.header import Command, Header
from vfioproxy.side import Direction

C2S, S2C = Direction.C2S, Direction.S2C
GIB = 1 << 30


def dma_map(iova: int, size: int, flags: int = 3, offset: int = 0, msg_id: int = 4) -> bytes:
    body = DmaMapBody(32, flags, offset, iova, size)
    return encode(build_command(Command.DMA_MAP, msg_id, body))[0]


def test_every_window_with_an_fd_is_trapped_when_no_range_is_given() -> None:
    mode = TrapDma()
    data = dma_map(0, 0x20000000)
    done = mode.message(C2S, data, 1)
    assert done is not None
    assert done.data == data  # READ|WRITE, offset 0: nothing to change
    assert [p.fate for p in done.fds] == [FdFate.WITHHOLD]
    assert done.mode == "trap-dma"
    assert done.note == {"iova": 0, "size": 0x20000000}
    assert mode.trapped == [(0, 0x20000000)]


def test_extra_fds_are_withheld_too() -> None:
    done = TrapDma().message(C2S, dma_map(0, 4096), 3)
    assert done is not None and [p.fate for p in done.fds] == [FdFate.WITHHOLD] * 3


def test_a_window_outside_the_ranges_keeps_its_fd() -> None:
    mode = TrapDma((IovaRange.parse("0x100000000+0x1000"),))
    assert mode.message(C2S, dma_map(0, 0x80000000), 1) is None
    assert mode.trapped == []


def test_a_window_inside_a_range_is_trapped_and_names_it() -> None:
    mode = TrapDma((IovaRange.parse("0x0-0x80000000"), IovaRange.parse("0x100000000+0x1000")))
    done = mode.message(C2S, dma_map(0x100000, 0x1ff00000), 1)
    assert done is not None
    assert done.note == {"iova": 0x100000, "size": 0x1ff00000, "ranges": ["0x0-0x80000000"]}


def test_a_window_overlapping_a_range_in_part_is_trapped_whole() -> None:
    mode = TrapDma((IovaRange.parse("0xc0000-0xd0000"),))
    done = mode.message(C2S, dma_map(0, 0x20000000), 1)
    assert done is not None and done.data == dma_map(0, 0x20000000)  # nothing to change
    assert done.note["ranges"] == ["0xc0000-0xd0000"]
    assert "trapped whole" in done.note["whole"]


def test_ranges_that_together_cover_a_window_are_not_a_partial_overlap() -> None:
    mode = TrapDma((IovaRange.parse("0x0-0x1000"), IovaRange.parse("0x1000-0x3000")))
    done = mode.message(C2S, dma_map(0x800, 0x2000), 1)
    assert done is not None and "whole" not in done.note
    assert done.note["ranges"] == ["0x0-0x1000", "0x1000-0x3000"]


def test_the_offset_is_zeroed_as_a_client_without_fd_sends_it() -> None:
    data = dma_map(0x100000, 0x1ff00000, offset=0x100000)
    done = TrapDma().message(C2S, data, 1)
    assert done is not None
    assert done.data == dma_map(0x100000, 0x1ff00000)
    assert done.note == {"iova": 0x100000, "size": 0x1ff00000, "offset": [0x100000, 0]}


def test_the_fd_only_access_flags_are_cleared_and_noted() -> None:
    data = dma_map(0, 4096, flags=0x1 | 0x4, offset=0x2000)
    done = TrapDma().message(C2S, data, 1)
    assert done is not None
    body = DmaMapBody.parse(done.data[16:])
    assert (body.flags, body.offset, body.iova, body.size) == (0x1, 0, 0, 4096)
    assert Header.parse(done.data) == Header.parse(data)  # same size: nothing else moves
    assert done.note["flags"] == [0x5, 0x1]
    done = TrapDma().message(C2S, dma_map(0, 4096, flags=0x2 | 0x8), 1)
    assert done is not None and DmaMapBody.parse(done.data[16:]).flags == 0x2


def test_trailing_bytes_of_the_command_are_kept() -> None:
    body = DmaMapBody(40, 0x7, 0, 0, 4096, b"\xaa" * 8)
    data = encode(build_command(Command.DMA_MAP, 9, body))[0]
    done = TrapDma().message(C2S, data, 1)
    assert done is not None and done.data[-8:] == b"\xaa" * 8 and len(done.data) == len(data)


@pytest.mark.parametrize("data, nfds", [
    (dma_map(0, 4096), 0),  # no fd: nothing to withhold
    (dma_map(0, 4096)[:40], 1),  # a short body does not decode
    (dma_map(0, 4096)[:10], 1),  # not even a header
    (dma_map(0, 4096) + b"x", 1),  # the header's size is not the message's
    (encode(build_reply(Header(4, Command.DMA_MAP, 48)))[0], 1),  # a reply
    (encode(build_command(Command.DMA_UNMAP, 5, DmaUnmapBody(24, 0, 0, 4096)))[0], 0),
])
def test_what_is_not_a_dma_map_with_an_fd_is_left_alone(data: bytes, nfds: int) -> None:
    mode = TrapDma()
    assert mode.message(C2S, data, nfds) is None
    assert mode.trapped == []


def test_server_to_client_messages_are_left_alone() -> None:
    assert TrapDma().message(S2C, dma_map(0, 4096), 1) is None
    assert TrapDma.directions == frozenset({C2S})


def test_an_empty_window_overlaps_no_range() -> None:
    assert trapped_ranges((IovaRange(0, 4096),), 0, 0) is None
    assert trapped_ranges((), 0, 0) == ()


def test_a_window_wrapping_past_2_64_is_judged_by_its_addresses_below() -> None:
    top = IovaRange.parse(f"{(1 << 64) - 4096:#x}+0x1000")
    assert trapped_ranges((top,), (1 << 64) - 4096, 2 * 4096) == (top,)
    assert trapped_ranges((IovaRange(0, 4096),), (1 << 64) - 4096, 2 * 4096) is None
    assert trapped_ranges((IovaRange(0, GIB),), GIB, GIB) is None


def unmap(iova: int, size: int, flags: int = 0) -> bytes:
    return encode(build_command(Command.DMA_UNMAP, 7, DmaUnmapBody(24, flags, iova, size)))[0]


def test_a_server_closing_with_trapped_windows_mapped_gets_a_warning() -> None:
    mode = TrapDma()
    assert mode.closing("server") is None  # nothing trapped
    mode.message(C2S, dma_map(0, 0x1000), 1)
    mode.message(C2S, dma_map(0x100000, 0x1000), 1)
    assert mode.closing("client") is None and mode.closing("proxy") is None
    text = mode.closing("server")
    assert text is not None
    assert text.startswith("the server closed the session with 2 trapped DMA window(s) mapped "
                           "([0x0, 0x1000), [0x100000, 0x101000))")
    assert "--trap-dma IOVA-RANGE" in text
    assert mode.message(C2S, unmap(0, 0x1000), 0) is None  # unmaps pass unchanged
    assert mode.mapped == {(0x100000, 0x1000)}
    mode.message(C2S, unmap(0x100000, 0x800), 0)  # not the window: libvfio-user refuses it
    assert mode.mapped == {(0x100000, 0x1000)}
    mode.message(C2S, unmap(0, 0, flags=0x2), 0)  # UNMAP_ALL
    assert mode.closing("server") is None
    assert mode.trapped == [(0, 0x1000), (0x100000, 0x1000)]  # what was trapped, still


def test_the_warning_names_four_windows_and_counts_the_rest() -> None:
    mode = TrapDma()
    for i in range(6):
        mode.message(C2S, dma_map(i * 0x1000, 0x1000), 1)
    text = mode.closing("server")
    assert text is not None and "6 trapped DMA window(s)" in text
    assert "[0x3000, 0x4000) and 2 more)" in text


def test_a_session_interposer_collects_what_the_modes_say_at_the_end() -> None:
    from vfioproxy.interpose import InterposeOptions, session_interposer

    chain = session_interposer(InterposeOptions(trap_dma=()))
    assert chain is not None
    assert chain.closing("server") == []
    chain.message(C2S, dma_map(0, 0x1000), 1)
    ((mode, text),) = chain.closing("server")
    assert mode == "trap-dma" and text.startswith("the server closed the session")
