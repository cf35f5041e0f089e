"""``--trap-mmap``'s rewrite of DEVICE_GET_REGION_INFO replies, sans-IO: every
shape of capability chain (none, sparse only, sparse + type, + msix-mappable,
a short reply, malformed), and what is left alone."""

from __future__ import annotations

import struct

import pytest

from vfioproxy.interpose import FdFate, InterposeOptions, session_interposer
from vfioproxy.interpose.mmap import TrapMmap, trap_region_info
from vfioproxy.protocol.bodies import (
    MsixMappableCap,
    RegionInfoBody,
    SparseMmapArea,
    SparseMmapCap,
    TypeCap,
)
from vfioproxy.protocol.codec import build_command, build_reply, decode, encode
from vfioproxy.protocol.constants import RegionFlags
from vfioproxy.protocol.header import Command, Header
from vfioproxy.side import Direction

RW = RegionFlags.READ | RegionFlags.WRITE
MMAP = RegionFlags.MMAP
SPARSE = SparseMmapCap((SparseMmapArea(0, 0x1000), SparseMmapArea(0x3000, 0x1000)))
REQUEST = build_command(Command.DEVICE_GET_REGION_INFO, 7, RegionInfoBody.request(1, 200))


def reply(body: RegionInfoBody) -> bytes:
    return encode(build_reply(REQUEST, body))[0]


def trapped(data: bytes, nfds: int = 0):
    return TrapMmap().message(Direction.S2C, data, nfds)


@pytest.mark.parametrize(("caps", "kept"), [
    ((), ()),
    ((SPARSE,), ()),
    ((SPARSE, TypeCap(1, 2)), (TypeCap(1, 2),)),
    ((TypeCap(1, 2), SPARSE), (TypeCap(1, 2),)),
    ((SPARSE, MsixMappableCap(), TypeCap(3, 4)), (MsixMappableCap(), TypeCap(3, 4))),
], ids=["none", "sparse", "sparse+type", "type+sparse", "sparse+msix+type"])
def test_every_chain_shape_loses_mmap_and_sparse_only(caps, kept):
    original = RegionInfoBody.build(index=1, flags=RW | MMAP, size=0x4000, offset=0x1000,
                                    caps=caps)
    done = trapped(reply(original), nfds=1)
    assert done is not None and done.mode == "trap-mmap"
    assert [plan.fate for plan in done.fds] == [FdFate.WITHHOLD]
    message = decode(done.data)
    assert message.header.size == len(done.data)
    assert message.header.msg_id == 7 and message.header.is_reply
    body = message.body
    assert body.flags == RW | (RegionFlags.CAPS if kept else 0)
    assert body.caps == kept
    assert (body.size, body.offset, body.index) == (0x4000, 0x1000, 1)
    assert body.argsz == RegionInfoBody.build(index=1, flags=0, size=0, caps=kept).argsz
    assert body.argsz == len(done.data) - 16 <= original.argsz
    assert body.cap_offset == (32 if kept else 0)
    assert done.note["region"] == 1 and done.note["flags"] == [original.flags, body.flags]
    if SPARSE in caps:
        assert done.note["dropped"] == [SPARSE.describe()]


def test_a_short_reply_keeps_its_argsz_so_the_client_asks_again():
    full = RegionInfoBody.build(index=1, flags=RW | MMAP, size=0x4000,
                                caps=(SPARSE, TypeCap(1, 2)))
    # as libvfio-user answers a 32-byte ask: the size it needs, the chain pointer, no chain
    short = RegionInfoBody(full.argsz, full.flags, 1, 32, 0x4000, 0)
    done = trapped(reply(short))
    body = decode(done.data).body
    assert body.argsz == full.argsz and body.flags == RW | RegionFlags.CAPS
    assert body.cap_offset == 32 and done.fds == ()
    # the re-ask's reply is then never bigger than what the client sent: no loop
    again = decode(trapped(reply(full), 1).data).body
    assert again.argsz < body.argsz


def test_a_region_without_a_mapping_is_left_alone():
    plain = RegionInfoBody.build(index=7, flags=RW, size=256, caps=(TypeCap(1, 2),))
    assert trapped(reply(plain)) is None
    assert trap_region_info(plain.serialize()) is None


@pytest.mark.parametrize("damage", ["loop", "into-fixed", "outside", "cut-areas", "short"])
def test_what_does_not_decode_is_forwarded_unchanged(damage):
    body = RegionInfoBody.build(index=1, flags=RW | MMAP, size=0x4000,
                                caps=(SPARSE, TypeCap(1, 2)))
    payload = bytearray(body.serialize())
    if damage == "loop":  # the last cap's next points back at the first
        second = 32 + 16 + 32
        struct.pack_into("<I", payload, second + 4, 32)
    elif damage == "into-fixed":
        struct.pack_into("<I", payload, 12, 8)
    elif damage == "outside":
        struct.pack_into("<I", payload, 12, 4000)
        payload = payload[:40]
    elif damage == "cut-areas":  # nr_areas says more areas than the payload holds
        struct.pack_into("<I", payload, 32 + 8, 1000)
    else:
        payload = payload[:20]
    header = Header(7, Command.DEVICE_GET_REGION_INFO, 16 + len(payload), 1).pack()
    assert trapped(header + bytes(payload), nfds=1) is None


def test_only_replies_of_region_info_from_the_server():
    body = RegionInfoBody.build(index=1, flags=RW | MMAP, size=0x4000, caps=(SPARSE,))
    data = reply(body)
    assert TrapMmap().message(Direction.C2S, data, 0) is None
    command = Header(7, Command.DEVICE_GET_REGION_INFO, len(data), 0).pack() + data[16:]
    assert trapped(command) is None  # a command, not a reply
    error = Header(7, Command.DEVICE_GET_REGION_INFO, 16, 1 | 0x20, 22).pack()
    assert trapped(error) is None
    other = Header(7, Command.DEVICE_GET_IRQ_INFO, len(data), 1).pack() + data[16:]
    assert trapped(other) is None
    assert trapped(data[:10]) is None


def test_session_interposer_builds_the_modes_that_are_on():
    assert session_interposer(InterposeOptions()) is None
    interposer = session_interposer(InterposeOptions(trap_mmap=True))
    assert interposer is not None
    assert [mode.name for mode in interposer.modes] == ["trap-mmap"]
    assert interposer.directions == {Direction.S2C}
    body = RegionInfoBody.build(index=1, flags=RW | MMAP, size=0x4000, caps=(SPARSE,))
    assert interposer.message(Direction.S2C, reply(body), 1) is not None
    assert interposer.message(Direction.C2S, reply(body), 1) is None
