"""``vfioproxy trace export --format pcapng``: a trace as a pcapng file for Wireshark.

The layout is docs/pcapng.md's (the contract with the Lua dissector,
``vfioproxy/wireshark/vfio_user.lua``): one Section Header Block, an
Interface Description Block per session (``LINKTYPE_WIRESHARK_UPPER_PDU``,
nanosecond timestamps) written just before the session's first record, and
an Enhanced Packet Block per record, whose packet is the exported-PDU tags
naming the ``vfio_user`` dissector, the vfioproxy pseudo-header with its
TLVs (:func:`pseudo_header`), then the message's bytes as recorded.

What a packet says comes from the reader and the display filter, not from
a second decoding: :func:`~vfioproxy.trace.decoded.decoded_records` gives the
violations, the paired request's seq, the latency, the injection and the
DMA layout; the filter's :class:`~vfioproxy.trace.filter.Facts` the
``register`` and ``step`` fields.

Our own small writer: pcapng is a few fixed little-endian blocks, and the
PyPI writers are unmaintained (python-pcapng and pcapng since 2022 and 2020,
dpkt's since 2022) or a whole packet toolkit (scapy) for what is ~100 lines.
It streams: nothing is kept per record, only each session's interface
number (:class:`PcapngWriter`).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from typing import Any, BinaryIO

import attrs

from recorder.records import TOOL_VERSION, EventRecord, FdRecord, MessageRecord, TraceHeader
from vfioproxy.protocol.bodies import DmaLayout
from vfioproxy.side import Direction
from vfioproxy.trace.decoded import DecodedItem, DecodedMessage, TornMessage
from vfioproxy.trace.filter import FIELDS, Facts
from vfioproxy.trace.show import event_text, jsonable

__all__ = [
    "DISSECTOR", "LINKTYPE_WIRESHARK_UPPER_PDU", "MAX_PACKET", "PSEUDO_HEADER", "PSEUDO_MAGIC",
    "PSEUDO_VERSION", "PcapngWriter", "exported_pdu_tags", "pseudo_header", "wall_ns",
    "write_pcapng",
]

#: the link type of every interface: packets start with exported-PDU tags
LINKTYPE_WIRESHARK_UPPER_PDU = 252
#: the longest packet Wireshark reads for this link type (wiretap's
#: WTAP_MAX_PACKET_SIZE_STANDARD): a message's bytes past it are cut
MAX_PACKET = 262144
#: the dissector the exported-PDU tags name (the Lua one's protocol name)
DISSECTOR = "vfio_user"
PSEUDO_MAGIC = b"VFUP"
PSEUDO_VERSION = 1
#: the fixed part of the pseudo-header (docs/pcapng.md §3), 48 bytes
PSEUDO_HEADER = struct.Struct("<4sBBBBIQQQIBBHI")

# pseudo-header ``record`` values
RECORD_MESSAGE, RECORD_TORN, RECORD_EVENT = 0, 1, 2
# pseudo-header ``flags`` bits
FLAG_VIOLATION, FLAG_INJECTED, FLAG_CUT, FLAG_REQUEST_SEQ = 1, 2, 4, 8
#: pseudo-header ``dir`` of an event
DIR_EVENT = 255
DIRS = {Direction.C2S: 0, Direction.S2C: 1}
DMA_LAYOUTS = {DmaLayout.SPEC: 1, DmaLayout.QEMU: 2}

# TLV types (docs/pcapng.md §4)
TLV_VIOLATION, TLV_REGISTER, TLV_STEP, TLV_FD, TLV_EVENT_KIND, TLV_EVENT_DATA = 1, 2, 3, 4, 5, 6
TLV_INJECTION, TLV_LATENCY, TLV_TORN = 7, 8, 9
#: TLV 4's size when the fd's size is not known
UNKNOWN_SIZE = 0xFFFF_FFFF_FFFF_FFFF

# pcapng block types and option codes
_SHB, _IDB, _EPB = 0x0A0D0D0A, 0x00000001, 0x00000006
_BYTE_ORDER_MAGIC = 0x1A2B3C4D
_OPT_END, _OPT_COMMENT = 0, 1
_SHB_USERAPPL = 4
_IF_NAME, _IF_DESCRIPTION, _IF_TSRESOL = 2, 3, 9
_U16_MAX = 0xFFFF
_U32_MAX = 0xFFFF_FFFF
_U64 = struct.Struct("<Q")
#: what a text value longer than a 16-bit length allows ends with, cut
_CUT = "..."
#: the FIELDS getter of ``register`` (the filter's one way to name it)
_REGISTER = next(spec.get for spec in FIELDS if spec.name == "register")
#: session_open data that does not describe the peers
_NOT_PEERS = frozenset({"wall", "inject"})


def exported_pdu_tags(dissector: str = DISSECTOR) -> bytes:
    """Tag 12 (the dissector's name, NUL-padded to a multiple of 4) and the end
    tag, big-endian as Wireshark's exported-PDU dissector reads them."""
    name = dissector.encode()
    padded = name + b"\0" * (4 - len(name) % 4)
    return struct.pack(">HH", 12, len(padded)) + padded + struct.pack(">HH", 0, 0)


_TAGS = exported_pdu_tags()


def wall_ns(header: TraceHeader, t_ns: int) -> int:
    """A record's wall-clock time in ns since the epoch: the header's
    ``created`` (microseconds) plus ``t_ns`` minus ``mono_ns``; 0 for a time
    before the epoch (a pcapng timestamp is unsigned)."""
    return max(0, header.wall_ns(t_ns))


def _cut(text: str) -> bytes:
    """``text`` as UTF-8, at most 65535 bytes: a longer one cut on a character
    boundary, ending ``...``."""
    raw = text.encode()
    if len(raw) <= _U16_MAX:
        return raw
    keep = raw[:_U16_MAX - len(_CUT)].decode(errors="ignore")
    return (keep + _CUT).encode()


def _tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("<HH", kind, len(value)) + value


def _json(value: Any) -> str:
    return json.dumps(jsonable(value), sort_keys=True)


def _fd_tlv(fd: FdRecord) -> bytes:
    size = UNKNOWN_SIZE if fd.size is None else fd.size
    return _tlv(TLV_FD, _U64.pack(size) + fd.kind.value.encode())


def pseudo_header(record: int, direction: int, flags: int, session: int, seq: int, t_ns: int,
                  request_seq: int, wire_length: int, dma_layout: int, nfds: int,
                  tlvs: Iterable[bytes]) -> bytes:
    """The pseudo-header (docs/pcapng.md §3) followed by ``tlvs``."""
    body = b"".join(tlvs)
    return PSEUDO_HEADER.pack(PSEUDO_MAGIC, PSEUDO_VERSION, record, direction, flags, session,
                              seq, t_ns, request_seq, min(wire_length, _U32_MAX), dma_layout,
                              min(nfds, 255), 0, len(body)) + body


def _options(options: Iterable[tuple[int, bytes]]) -> bytes:
    """pcapng options, each padded to 4 bytes, then opt_endofopt."""
    parts = []
    for code, value in options:
        parts.append(struct.pack("<HH", code, len(value)) + value + b"\0" * (-len(value) % 4))
    parts.append(struct.pack("<HH", _OPT_END, 0))
    return b"".join(parts)


def _block(kind: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return struct.pack("<II", kind, total) + body + struct.pack("<I", total)


def header_comments(header: TraceHeader) -> list[str]:
    """The Section Header Block's comments: one per line of the trace header."""
    return [
        f"vfioproxy trace format {header.version[0]}.{header.version[1]}",
        f"source: {header.source}",
        f"host: {header.host or '?'}",
        f"created: {header.created.isoformat()}",
        f"info: {_json(header.info)}",
    ]


class PcapngWriter:
    """Writes pcapng blocks to the binary stream ``out``: the Section Header
    Block and interface 0 (``trace``, the records of no session) when made,
    then a packet per :meth:`write`. Holds each session's interface number,
    nothing per record. An error writing ``out`` propagates."""

    def __init__(self, out: BinaryIO, header: TraceHeader) -> None:
        self.out = out
        self.header = header
        #: interface number of each session that has one
        self.interfaces: dict[int, int] = {}
        #: packets written
        self.packets = 0
        comments = [(_OPT_COMMENT, _cut(line)) for line in header_comments(header)]
        options = [(_SHB_USERAPPL, _cut(f"vfioproxy {TOOL_VERSION} trace export")), *comments]
        out.write(_block(_SHB, struct.pack("<IHHq", _BYTE_ORDER_MAGIC, 1, 0, -1)
                         + _options(options)))
        self._interface("trace", None)

    def _interface(self, name: str, description: str | None) -> None:
        options = [(_IF_NAME, _cut(name))]
        if description is not None:
            options.append((_IF_DESCRIPTION, _cut(description)))
        options.append((_IF_TSRESOL, bytes((9,))))
        self.out.write(_block(_IDB, struct.pack("<HHI", LINKTYPE_WIRESHARK_UPPER_PDU, 0, 0)
                              + _options(options)))

    def _interface_of(self, session: int | None, first: EventRecord | None) -> int:
        """The interface of ``session`` (0: none), its IDB written now if it has
        none yet (``first``: the record being written, when an event)."""
        if session is None:
            return 0
        number = self.interfaces.get(session)
        if number is None:
            number = self.interfaces[session] = len(self.interfaces) + 1
            if first is not None and first.kind == "session_open":
                peers = {k: v for k, v in first.data.items() if k not in _NOT_PEERS}
                said = event_text(attrs.evolve(first, data=peers)) if peers else ""
                description = f"vfio-user session {session}" + (f": {said}" if said else "")
            else:
                description = f"vfio-user session {session}"
            self._interface(f"session {session}", description)
        return number

    def write(self, item: DecodedItem, facts: Facts | None) -> bool:
        """Write ``item`` as a packet if it is a record (a decoded or torn
        message, an event; ``facts``: a decoded message's filter facts); the
        reader's own items (negotiated, notices) are not. Whether it wrote."""
        if isinstance(item, DecodedMessage):
            self._message(item, facts)
        elif isinstance(item, TornMessage):
            self._torn(item)
        elif isinstance(item, EventRecord):
            self._event(item)
        else:
            return False
        self.packets += 1
        return True

    def _message(self, item: DecodedMessage, facts: Facts | None) -> None:
        record = item.record
        violations = item.observation.violations
        tlvs = [_tlv(TLV_VIOLATION, _cut(f"{v.kind}: {v}")) for v in violations]
        flags = FLAG_VIOLATION * bool(violations)
        if facts is not None:
            register = _REGISTER(facts)
            if register is not None:
                tlvs.append(_tlv(TLV_REGISTER, _cut(register)))
            if facts.step is not None:
                tlvs.append(_tlv(TLV_STEP, _cut(facts.step)))
        tlvs.extend(_fd_tlv(fd) for fd in record.fds)
        if item.injection is not None:
            flags |= FLAG_INJECTED
            tlvs.append(_tlv(TLV_INJECTION, _cut(_json(item.injection.data))))
        if item.latency_ns is not None:
            tlvs.append(_tlv(TLV_LATENCY, _U64.pack(max(0, item.latency_ns))))
        if record.length is not None:
            flags |= FLAG_CUT
        if item.request_seq is not None:
            flags |= FLAG_REQUEST_SEQ
        layout = 0
        if item.dialects is not None:
            layout = DMA_LAYOUTS[item.dialects.of(record.direction.sender)]
        head = pseudo_header(RECORD_MESSAGE, DIRS[record.direction], flags,
                             record.session, record.seq, record.t_ns, item.request_seq or 0,
                             record.wire_length, layout, len(record.fds), tlvs)
        self._packet(record.session, None, record.t_ns, head, record)

    def _torn(self, item: TornMessage) -> None:
        record = item.record
        violation = item.violation
        tlvs = [_tlv(TLV_VIOLATION, _cut(f"{violation.kind}: {violation}")),
                *(_fd_tlv(fd) for fd in record.fds), _tlv(TLV_TORN, _cut(item.text))]
        flags = FLAG_VIOLATION | (FLAG_CUT if record.length is not None else 0)
        head = pseudo_header(RECORD_TORN, DIRS[record.direction], flags,
                             record.session, record.seq, record.t_ns, 0, record.wire_length, 0,
                             len(record.fds), tlvs)
        self._packet(record.session, None, record.t_ns, head, record)

    def _event(self, event: EventRecord) -> None:
        tlvs = [_tlv(TLV_EVENT_KIND, _cut(event.kind)),
                _tlv(TLV_EVENT_DATA, _cut(_json(event.data)))]
        head = pseudo_header(RECORD_EVENT, DIR_EVENT, 0, event.session or 0, event.seq,
                             event.t_ns, 0, 0, 0, 0, tlvs)
        self._packet(event.session, event, event.t_ns, head, None)

    def _packet(self, session: int | None, event: EventRecord | None, t_ns: int, head: bytes,
                record: MessageRecord | None) -> None:
        """One Enhanced Packet Block: the tags, ``head`` and the record's bytes
        (at most :data:`MAX_PACKET` in all: the rest is cut, and counted in the
        original length with what the recorder left out), written in pieces
        (a big message's bytes are not copied)."""
        interface = self._interface_of(session, event)
        data = memoryview(b"" if record is None else record.data)
        room = max(0, MAX_PACKET - len(_TAGS) - len(head))
        if len(data) > room:
            data = data[:room]
        captured = len(_TAGS) + len(head) + len(data)
        wire = 0 if record is None else record.wire_length
        original = min(len(_TAGS) + len(head) + wire, _U32_MAX)
        padding = -captured % 4
        total = 28 + captured + padding + 4  # no options; the total again
        ts = wall_ns(self.header, t_ns)
        out = self.out
        out.write(struct.pack("<IIIIIII", _EPB, total, interface, ts >> 32, ts & _U32_MAX,
                              captured, original) + _TAGS + head)
        out.write(data)
        out.write(b"\0" * padding + struct.pack("<I", total))


def write_pcapng(selected: Iterable[tuple[DecodedItem, Facts | None]], header: TraceHeader,
                 out: BinaryIO) -> int:
    """The records of ``selected`` (decoded items with their filter facts, as
    :func:`~vfioproxy.trace.filter.select_facts` gives them) as pcapng to
    ``out``, streaming. Returns the packets written."""
    writer = PcapngWriter(out, header)
    for item, facts in selected:
        writer.write(item, facts)
    return writer.packets
