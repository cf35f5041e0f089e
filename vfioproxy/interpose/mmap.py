"""``--trap-mmap``: the client maps no region, so every BAR access is a message.

A DEVICE_GET_REGION_INFO reply (server to client) that offers a mapping is
rewritten: the MMAP flag is cleared, the sparse-mmap capability is taken out
of the capability chain and the region's fd is withheld (the proxy closes
it). The client then reaches the whole region with REGION_READ and
REGION_WRITE, which the proxy records; the server is unchanged (it still
answers those for every region it declares readable or writable).

What is kept: the other capabilities (TYPE, and MSIX_MAPPABLE, which only
says the MSI-X table *may* lie in a mapped area: with no MMAP flag the
client maps nothing, so it changes nothing), every other flag and field
(the region's ``offset`` in the withheld fd is left as it was: a client
that does not map does not use it).

``argsz`` and ``cap_offset``: a full reply (its capability chain within the
payload) is laid out anew, its chain back to back from offset 32 and
``argsz`` the new, smaller size, so that a client that compares the reply's
``argsz`` with its own (QEMU re-asks with a bigger buffer when the reply's
is bigger) does not ask again for what it will not get. A short reply (the
client's ``argsz`` was too small for the chain; the server says how big a
buffer it needs and sends the fixed part) keeps its ``argsz`` and chain
pointer: the client re-asks with that size, never more than it sent, and the
full reply is then rewritten as above. Either way no loop: the rewritten
``argsz`` is never bigger than the server's.

A reply that does not decode (a malformed chain, an error reply, a short
payload) is forwarded unchanged, fds included.
"""

from __future__ import annotations

from typing import Any, ClassVar

from vfioproxy.errors import ProtocolError
from vfioproxy.interpose import FdFate, FdPlan, Interposed
from vfioproxy.protocol.bodies import RegionInfoBody, SparseMmapCap
from vfioproxy.protocol.constants import RegionFlags
from vfioproxy.protocol.header import HEADER_SIZE, Command, Header
from vfioproxy.side import Direction

__all__ = ["TrapMmap", "trap_region_info"]

_MMAP = int(RegionFlags.MMAP)
_CAPS = int(RegionFlags.CAPS)
_WITHHOLD = FdPlan(FdFate.WITHHOLD)


def trap_region_info(payload: bytes) -> tuple[bytes, dict[str, Any]] | None:
    """The payload of a DEVICE_GET_REGION_INFO reply with no mapping offered,
    and what changed (``region``, ``flags`` before and after, ``dropped``: the
    capabilities taken out, ``argsz`` before and after); None when the reply
    offers no mapping or does not decode (left as it is). Nothing is raised."""
    try:
        body = RegionInfoBody.parse(payload)
    except (ProtocolError, ValueError):
        return None
    sparse = [cap for cap in body.caps if isinstance(cap, SparseMmapCap)]
    if not (body.flags & _MMAP or sparse):
        return None
    flags = body.flags & ~_MMAP
    note: dict[str, Any] = {"region": body.index, "flags": [body.flags, flags]}
    if body.caps:  # the whole chain is here: lay out what is kept
        kept = tuple(cap for cap in body.caps if not isinstance(cap, SparseMmapCap))
        new = RegionInfoBody.build(index=body.index, flags=flags & ~_CAPS, size=body.size,
                                   offset=body.offset, caps=kept)
        note["flags"][1] = new.flags
        note["dropped"] = [cap.describe() for cap in sparse]
        note["argsz"] = [body.argsz, new.argsz]
        return new.serialize(), note
    if body.flags & _CAPS and body.cap_offset and not (
            RegionInfoBody.FIXED.size <= body.cap_offset < body.argsz):
        return None  # a short reply whose chain pointer lies past the size it asks for
    # no chain, or a short reply whose chain the client will ask for again
    rewritten = RegionInfoBody(body.argsz, flags, body.index, body.cap_offset, body.size,
                               body.offset, body.extra)
    return rewritten.serialize(), note


class TrapMmap:
    """The ``trap-mmap`` mode of one session (see the module docstring)."""

    name: ClassVar[str] = "trap-mmap"
    directions: ClassVar[frozenset[Direction]] = frozenset({Direction.S2C})
    commands: ClassVar[frozenset[int]] = frozenset({Command.DEVICE_GET_REGION_INFO})

    def message(self, direction: Direction, data: bytes, nfds: int) -> Interposed | None:
        """A DEVICE_GET_REGION_INFO reply that offers a mapping, rewritten not to,
        its fds withheld; None for anything else (and for what does not decode)."""
        if direction is not Direction.S2C or len(data) < HEADER_SIZE:
            return None
        try:
            header = Header.parse(data)
        except ProtocolError:
            return None
        if (header.command != Command.DEVICE_GET_REGION_INFO or not header.is_reply
                or header.is_error or header.size != len(data)):
            return None
        done = trap_region_info(data[HEADER_SIZE:])
        if done is None:
            return None
        payload, note = done
        out = Header(header.msg_id, header.command, HEADER_SIZE + len(payload), header.flags,
                     header.error).pack() + payload
        return Interposed(out, (_WITHHOLD,) * nfds, self.name, note)

