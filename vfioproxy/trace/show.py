"""``vfioproxy trace show``: one line per message, decoded and PCI-aware."""

from __future__ import annotations

import enum
import json
import re
import secrets
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

import attrs

from recorder.errors import TraceError
from recorder.records import EventRecord, FdRecord, MessageRecord, TraceHeader, arrived_bytes
from vfioproxy.protocol.bodies import DmaLayout, VersionBody
from vfioproxy.protocol.constants import irq_vector_name
from vfioproxy.protocol.header import HEADER_SIZE
from vfioproxy.protocol.listing import (
    describe_fd,
    errno_text,
    message_line,
    note_line,
    prefix,
)
from vfioproxy.protocol.session import injection_cause
from vfioproxy.trace.decoded import (
    DecodedItem,
    DecodedMessage,
    SessionNegotiated,
    SessionNotice,
    TornMessage,
)


def header_lines(header: TraceHeader) -> list[str]:
    """The lines that introduce a trace: where, when and how it was recorded."""
    lines = [
        f"# trace format {header.version[0]}.{header.version[1]}, {header.source} "
        f"by {header.tool} {header.tool_version}, {header.created.isoformat()} "
        f"on {header.host or '?'} ({header.byte_order}-endian)"
    ]
    for key, value in sorted(header.info.items()):
        lines.append(f"# {key}: {_scalar(value)}")
    return lines


#: events a recorder with live checks writes that the reader derives anyway
_DERIVED = frozenset({"violation", "violations_repeated"})


def text_lines(items: Iterable[DecodedItem], *, verbose: bool = False,
               raw: bool = False) -> Iterator[str]:
    """Human lines for decoded records (``verbose`` adds every field, the payload
    as a hexdump and every fd's metadata; ``raw``, tshark's ``-x``, the hexdump
    of each whole message as recorded, header included, after its lines)."""
    origin: int | None = None
    #: the seq of the message each ``inject`` event (by its seq) is about
    injected: dict[int, int] = {}
    for item in items:
        if isinstance(item, SessionNegotiated):
            state = item.state
            how = "detected from the client's VERSION" if item.detected else "as given"
            version = "?" if state.version is None else f"{state.version[0]}.{state.version[1]}"
            yield (
                f"# session {item.session}: version {version}; DMA_READ/DMA_WRITE layout "
                f"{state.dialects.describe()} ({how})"
            )
            continue
        if isinstance(item, SessionNotice):
            yield f"# session {item.session}: {item.text}"
            continue
        if origin is None:
            origin = item.t_ns if isinstance(item, EventRecord) else item.record.t_ns
        if isinstance(item, TornMessage):
            record = item.record
            yield (
                f"{prefix(record.seq, record.t_ns, origin)} {record.direction.value} "
                f"s{record.session} {'(torn message)':<36} {item.text}"
            )
            yield note_line(f"!!! {item.violation}")
            if raw:
                yield from raw_lines(record)
            continue
        if isinstance(item, EventRecord):
            if item.kind in _DERIVED:
                continue  # the same violations are shown under their messages
            if item.kind == "interpose" and injected.pop(item.seq, None) is not None:
                continue  # its message's ~~~ line says it all
            yield (
                f"{prefix(item.seq, item.t_ns, origin)} --- s{item.session} "
                f"{item.kind} {event_text(item, injected.pop(item.seq, None))}"
            )
            continue
        record = item.record
        for event in (item.interposition, item.injection):
            if event is not None:
                injected[event.seq] = record.seq
        yield message_line(
            record.seq, record.t_ns, origin, record.direction, record.session,
            item.observation.message.header, item.text,
            fds=", ".join(describe_fd(fd) for fd in record.fds), latency_ns=item.latency_ns,
        )
        if item.interposition is not None:
            yield note_line(f"~~~ {interpose_text(item.interposition)}")
        injected_arrived = None if item.injection is None else arrived_bytes(
            record.data, item.injection.data.get("arrived"))
        if injected_arrived is not None and item.injection is not None:
            yield note_line(f"~~~ {rewrite_text(record.data, injected_arrived, item.injection)}")
        for violation in item.observation.violations:
            yield note_line(f"!!! {violation}")
        if verbose:
            yield from _field_lines(item)
        if raw:
            yield from raw_lines(record)


def raw_lines(record: MessageRecord) -> Iterator[str]:
    """``-x``: the bytes of a message record, offsets from its first header
    byte (only the start of a message recorded truncated, which says so)."""
    data = record.data
    if record.length is not None or record.torn:
        yield note_line(f"raw: {len(data)} of {record.wire_length} bytes recorded")
    else:
        yield note_line(f"raw: {len(data)} bytes")
    yield from (note_line("  " + line) for line in hexdump(data))


def rewrite_text(sent: bytes, arrived: bytes, injection: EventRecord) -> str:
    """``rewritten by the proxy (rule 2 corrupt offset): at offset 40 (0x28) 00
    arrived, 01 was sent``: what an injected action changed in a message."""
    span = injection.data.get("arrived")
    offset = span.get("offset", 0) if isinstance(span, dict) else 0
    length = span.get("length", 0) if isinstance(span, dict) else 0
    was = arrived[offset:offset + len(arrived) - len(sent) + length]
    now = sent[offset:offset + length]
    cause = injection_cause(injection.data.get("applied"))
    return (f"rewritten by the proxy ({cause}): at offset {offset} "
            f"({offset:#x}) {was.hex(' ') or 'nothing'} arrived, "
            f"{now.hex(' ') or 'nothing'} was sent")


def interpose_text(event: EventRecord) -> str:
    """``interposed by the proxy (trap-mmap): region=1 flags=[15, 11] ...;
    withheld fd[0] file 4 KiB``: what an interposition mode did to a message
    (its ``interpose`` event, FORMAT.md §6)."""
    data = event.data
    note = data.get("note")
    parts = [f"interposed by the proxy ({data.get('mode')})"]
    if isinstance(note, dict) and note:
        parts.append(" ".join(f"{k}={_change(k, v)}" for k, v in note.items()))
    text = ": ".join(parts)
    for key in ("withheld", "interposed"):
        entries = data.get(key)
        if isinstance(entries, list) and entries:
            shown = []
            for entry in entries:
                if not isinstance(entry, dict):
                    continue
                try:
                    fd = FdRecord.from_wire(entry)
                except TraceError:  # an entry with no metadata: its position only
                    shown.append(f"fd[{entry.get('i')}]")
                    continue
                irq = entry.get("irq")
                irq = (f" for {irq_vector_name(irq[0], irq[1])}" if isinstance(irq, list)
                       and len(irq) == 2 and all(isinstance(i, int) for i in irq)
                       else f" irq {irq}" if irq is not None else "")
                shown.append(f"fd[{fd.position}] {describe_fd(fd)}{irq}")
            text += f"; {key} " + ", ".join(shown)
    if "arrived" in data:
        text += "; the bytes were rewritten"
    return text


def _change(key: str, value: Any) -> str:
    """A note's value; ``[before, after]`` of ints as ``before->after`` (flags in hex)."""
    if (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        return "->".join(f"{v:#x}" if key == "flags" else str(v) for v in value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "; ".join(value)
    return _scalar(value)


def _applied_value(action: Any, value: Any) -> str | None:
    """An applied action's value as a reader wants it: a corrupt's byte offset
    as an offset, an error's errno with its name, seconds as microseconds."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if action == "corrupt":
            return f"at offset {value} ({value:#x})"
        if action == "error":
            return None  # the rule's text names the errno
        return f"= {value}"
    if isinstance(value, float):
        return f"= {value * 1e6:.1f} us"
    return f"= {_scalar(value)}"


def event_text(event: EventRecord, message_seq: int | None = None) -> str:
    """The text of an event line; ``message_seq``: the message an ``inject`` or
    ``interpose`` event is about."""
    data = event.data
    applied = data.get("applied")
    if event.kind == "interpose" and message_seq is not None:
        return f"#{message_seq} {data.get('direction')}: {interpose_text(event)}"
    if event.kind == "inject" and isinstance(applied, list):
        # "#11 s2c[4]: rule 1 delay fixed(200us) = 203.1 us; rule 2 corrupt offset at offset 40"
        where = f"{data.get('direction')}[{data.get('index')}]"
        if message_seq is not None:
            where = f"#{message_seq} {where}"
        return f"{where}: " + "; ".join(_applied_texts(applied))
    if event.kind == "irq" and isinstance(data.get("index"), int) \
            and isinstance(data.get("vector"), int):
        return irq_text(data)
    return " ".join(f"{k}={_scalar(v)}" for k, v in data.items())


def irq_text(data: dict[str, Any]) -> str:
    """``MSIX[0] count=1``, ``MSIX[0] count=1 delayed 100.0 us: rule 1 delay
    fixed(100us) = 100.0 us``, ``INTX[0] count=1 dropped: rule 2 drop``: an
    ``irq`` event (FORMAT.md §6)."""
    text = f"{irq_vector_name(data['index'], data['vector'])} count={data.get('count')}"
    fate = data.get("fate")
    if fate == "delayed" and isinstance(data.get("delay"), (int, float)):
        text += f" delayed {data['delay'] * 1e6:.1f} us"
    elif fate not in (None, "signalled"):
        text += f" {fate}"
    applied = data.get("applied")
    if isinstance(applied, list) and applied:
        text += ": " + "; ".join(_applied_texts(applied))
    return text


def _applied_texts(applied: list[Any]) -> list[str]:
    """``rule 1 delay fixed(200us) = 203.1 us``: each applied action of an
    ``inject`` or ``irq`` event."""
    actions = []
    for entry in applied:
        if not isinstance(entry, dict):
            continue
        text = f"rule {entry.get('rule')} {entry.get('text')}"
        shown = _applied_value(entry.get("action"), entry.get("value"))
        if shown is not None:
            text += f" {shown}"
        if entry.get("note"):
            text += f" ({entry['note']})"
        actions.append(text)
    return actions


def _scalar(value: Any) -> str:
    """A value of an event or header in one line: JSON for maps, lists, booleans
    and null, bytes in hex."""
    if isinstance(value, bytes):
        return value.hex()
    if value is None or isinstance(value, (bool, dict, list, tuple)):
        return json.dumps(jsonable(value))
    return str(value)


def _field_lines(item: DecodedMessage) -> Iterator[str]:
    message = item.observation.message
    h = message.header
    yield note_line(
        f"header: msg_id={h.msg_id} command={h.command_name} ({h.command}) size={h.size} "
        f"flags={h.flags:#x} error={errno_text(h.error) if h.error else 0}"
    )
    body = message.body
    yield note_line(f"body: {type(body).__name__}")
    yield from _body_lines(body, "  ")
    for fd in item.record.fds:
        shown = ", ".join(f"{k}={_verbose(v)}" for k, v in fd_fields(fd).items()
                          if k not in ("position", "contents") and v is not None)
        yield note_line(f"fd[{fd.position}]: {shown}")
    payload = item.record.data[HEADER_SIZE:]
    if payload:
        yield note_line(f"payload: {len(payload)} bytes")
        yield from (note_line("  " + line) for line in hexdump(payload, HEADER_SIZE))
    if item.arrived is not None:
        yield note_line(f"as it arrived: {len(item.arrived)} bytes")
        yield from (note_line("  " + line) for line in hexdump(item.arrived))


def _body_lines(body: Any, indent: str) -> Iterator[str]:
    """One line per field of an attrs body (nested ones indented); bytes by their
    length (the payload hexdump shows them), VERSION's JSON as JSON."""
    for field in attrs.fields(type(body)):
        name, value = field.name, getattr(body, field.name)
        if isinstance(body, VersionBody) and name in ("json_text", "document"):
            if name == "json_text":
                yield from _json_lines(value, indent)
            continue
        if isinstance(value, bytes):
            if value:
                yield note_line(f"{indent}{name}: {len(value)} bytes")
        elif attrs.has(type(value)):
            yield note_line(f"{indent}{name}: {type(value).__name__}")
            yield from _body_lines(value, indent + "  ")
        elif isinstance(value, (list, tuple)) and value and attrs.has(type(value[0])):
            for i, element in enumerate(value):
                yield note_line(f"{indent}{name}[{i}]: {type(element).__name__}")
                yield from _body_lines(element, indent + "  ")
        else:
            yield note_line(f"{indent}{name}: {_verbose(value)}")


def _json_lines(text: bytes, indent: str) -> Iterator[str]:
    """VERSION's JSON, indented as JSON (as it is when it does not parse)."""
    decoded = text.decode("utf-8", "replace")
    try:
        shown = json.dumps(json.loads(decoded), indent=2)
    except ValueError:
        yield note_line(f"{indent}json (does not parse): {decoded}")
        return
    lines = shown.splitlines()
    yield note_line(f"{indent}json: {lines[0]}")
    for line in lines[1:]:
        yield note_line(f"{indent}      {line}")


def hexdump(data: bytes, start: int = 0) -> Iterator[str]:
    """``0010  01 00 ... 7b  |....{|``: 16 bytes a line, offsets from ``start``,
    printable ASCII on the right."""
    for at in range(0, len(data), 16):
        chunk = data[at:at + 16]
        hexed = " ".join(f"{b:02x}" for b in chunk)
        text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in chunk)
        yield f"{start + at:04x}  {hexed:<47}  |{text}|"


def _verbose(value: Any) -> str:
    """Integers in hex (and decimal when large), enums by name, lists and maps as JSON."""
    if value is None or isinstance(value, bool):
        return _scalar(value)
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, int):
        return f"{value:#x}" if value < 10 else f"{value:#x} ({value})"
    if isinstance(value, (dict, list, tuple)):
        return _scalar(value)
    return str(value)


#: bytes longer than this are written out in hex piece by piece by :func:`write_json`
BIG_BYTES = 64 * 1024

#: what stands for the N-th big bytes value in the JSON text before it is written
_MARK = f"\x00vfioproxy-bytes-{secrets.token_hex(8)}-"
_MARKED = re.compile(re.escape(json.dumps(_MARK)[1:-1]) + r"(\d+)")


def jsonable(value: Any, big: list[bytes] | None = None) -> Any:
    """``value`` as JSON-able data, bytes as hex; with ``big``, bytes longer
    than :data:`BIG_BYTES` are appended to it and stand as a mark instead."""
    if isinstance(value, bytes):
        if big is not None and len(value) > BIG_BYTES:
            big.append(value)
            return f"{_MARK}{len(big) - 1}"
        return value.hex()
    if isinstance(value, DmaLayout):
        return value.value
    if isinstance(value, dict):
        return {str(k): jsonable(v, big) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, big) for v in value]
    if attrs.has(type(value)):
        return body_fields(value, big)
    return value


def body_fields(body: Any, big: list[bytes] | None = None) -> dict[str, Any]:
    """Every field of a body (views included) as JSON-able values, bytes as hex
    (``big``: see :func:`jsonable`)."""
    out: dict[str, Any] = {"type": type(body).__name__}
    for field in attrs.fields(type(body)):
        out[field.name] = jsonable(getattr(body, field.name), big)
    return out


def fd_fields(fd: FdRecord) -> dict[str, Any]:
    return {
        "position": fd.position,
        "kind": fd.kind.value,
        "size": fd.size,
        "flags": fd.flags,
        "seals": fd.seals,
        "inode": fd.inode,
        "contents": None if fd.contents is None else fd.contents.hex(),
        "sha256": None if fd.sha256 is None else fd.sha256.hex(),
    }


def write_json(objects: Iterable[dict[str, Any]], out: TextIO) -> None:
    """Write each of ``objects`` (as :func:`json_object` makes them: bytes still
    bytes) to ``out`` as one line of JSON, bytes in hex; the hex of large bytes
    (a big message) is written piece by piece, not built whole first."""
    for obj in objects:
        big: list[bytes] = []
        text = json.dumps(jsonable(obj, big))
        if not big:
            out.write(text + "\n")
            continue
        at = 0
        for mark in _MARKED.finditer(text):
            out.write(text[at:mark.start()])
            with memoryview(big[int(mark.group(1))]) as value:
                for piece in range(0, len(value), BIG_BYTES):
                    out.write(value[piece:piece + BIG_BYTES].hex())
            at = mark.end()
        out.write(text[at:] + "\n")


def json_object(item: DecodedItem) -> dict[str, Any]:
    """The JSON object of one item, bytes still as bytes (:func:`write_json`
    writes them in hex)."""
    if isinstance(item, SessionNegotiated):
        obj: dict[str, Any] = {
            "record": "negotiated",
            "session": item.session,
            "version": item.state.version,
            "dma_layout": {
                "client": item.state.dialects.client.value,
                "server": item.state.dialects.server.value,
                "detected": item.detected,
            },
        }
    elif isinstance(item, SessionNotice):
        obj = {"record": "notice", "session": item.session, "kind": item.kind,
               "t_ns": item.t_ns, "text": item.text}
    elif isinstance(item, TornMessage):
        obj = {
            **_record_fields(item.record, item.violation.index),
            "torn": True,
            "length": item.record.wire_length,
            "summary": item.text,
            "fds": [fd_fields(fd) for fd in item.record.fds],
            "violations": [item.violation.to_dict()],
            "hex": item.record.data,
        }
    elif isinstance(item, EventRecord):
        obj = {
            "record": "event",
            "seq": item.seq,
            "session": item.session,
            "t_ns": item.t_ns,
            "kind": item.kind,
            "data": jsonable(item.data),
        }
    else:
        record = item.record
        message = item.observation.message
        h = message.header
        obj = {
            **_record_fields(record, item.observation.index),
            "msg_id": h.msg_id,
            "command": h.command_name,
            "type": "reply" if h.is_reply else "command" if h.is_command else h.type,
            "flags": h.flags,
            "error": h.error,
            "size": h.size,
            "decoded": message.decoded,
            "summary": item.text,
            "body": message.body,
            "fds": [fd_fields(fd) for fd in record.fds],
            "latency_ns": item.latency_ns,
            "violations": [v.to_dict() for v in item.observation.violations],
            "hex": record.data,
        }
        if record.length is not None:
            obj["length"] = record.length
        if item.arrived is not None:  # "hex" is what the receiver got
            obj["arrived"] = item.arrived
    return obj


def _record_fields(record: MessageRecord, index: int) -> dict[str, Any]:
    """What every message's JSON line starts with."""
    return {
        "record": "message",
        "seq": record.seq,
        "session": record.session,
        "t_ns": record.t_ns,
        "dir": record.direction.value,
        "index": index,
    }


def write_lines(lines: Iterable[str], out: TextIO) -> None:
    for line in lines:
        out.write(line + "\n")
