"""``vfioproxy trace show``: one line per message, decoded and PCI-aware."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

import attrs

from recorder.records import EventRecord, FdRecord, MessageRecord, TraceHeader
from vfioproxy.protocol.bodies import DmaLayout
from vfioproxy.protocol.pci import format_size
from vfioproxy.trace.decoded import DecodedItem, DecodedMessage, SessionNegotiated, TornMessage


def describe_fd(fd: FdRecord) -> str:
    text = fd.kind.value
    if fd.size is not None:
        text += f" {format_size(fd.size)}"
    if fd.contents is not None:
        text += " +contents"
    return text


def header_lines(header: TraceHeader) -> list[str]:
    """The lines that introduce a trace: where, when and how it was recorded."""
    lines = [
        f"# trace format {header.version[0]}.{header.version[1]}, {header.source} "
        f"by {header.tool} {header.tool_version}, {header.created.isoformat()} "
        f"on {header.host or '?'} ({header.byte_order}-endian)"
    ]
    for key, value in sorted(header.info.items()):
        lines.append(f"# {key}: {value}")
    return lines


#: events a recorder with live checks writes that the reader derives anyway
_DERIVED = frozenset({"violation", "violations_repeated"})


def _fmt_ns(t_ns: int, origin: int) -> str:
    return f"{(t_ns - origin) / 1e6:11.3f}"


def text_lines(items: Iterable[DecodedItem], *, verbose: bool = False) -> Iterator[str]:
    """Human lines for decoded records (``verbose`` adds every body field)."""
    origin: int | None = None
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
        if origin is None:
            origin = item.t_ns if isinstance(item, EventRecord) else item.record.t_ns
        if isinstance(item, TornMessage):
            record = item.record
            yield (
                f"{record.seq:>6} {_fmt_ns(record.t_ns, origin)} {record.direction.value} "
                f"s{record.session} {'(torn message)':<36} {item.text}"
            )
            yield f"{'':>6} {'':>11} !!! {item.violation}"
            continue
        if isinstance(item, EventRecord):
            if item.kind in _DERIVED:
                continue  # the same violations are shown under their messages
            yield (
                f"{item.seq:>6} {_fmt_ns(item.t_ns, origin)} --- s{item.session} "
                f"{item.kind} {_event_text(item.kind, item.data)}"
            )
            continue
        record = item.record
        header = item.observation.message.header
        line = (
            f"{record.seq:>6} {_fmt_ns(record.t_ns, origin)} {record.direction.value} "
            f"s{record.session} {header.describe():<36} {item.text}"
        )
        if record.fds:
            line += "  [fds: " + ", ".join(describe_fd(fd) for fd in record.fds) + "]"
        if item.latency_ns is not None:
            line += f"  (+{item.latency_ns / 1000:.1f} us)"
        yield line
        for violation in item.observation.violations:
            yield f"{'':>6} {'':>11} !!! {violation}"
        if verbose:
            yield from _field_lines(item)


def _event_text(kind: str, data: dict[str, Any]) -> str:
    applied = data.get("applied")
    if kind == "inject" and isinstance(applied, list):
        # "c2s #3: rule 1 delay fixed(200us) = 203.1 us; rule 2 corrupt offset = 24"
        actions = []
        for item in applied:
            if not isinstance(item, dict):
                continue
            value = item.get("value")
            shown = f"{value * 1e6:.1f} us" if isinstance(value, float) else value
            text = f"rule {item.get('rule')} {item.get('text')}"
            actions.append(text if shown is None else f"{text} = {shown}")
        return f"{data.get('direction')} #{data.get('index')}: " + "; ".join(actions)
    return " ".join(f"{k}={v}" for k, v in data.items())


def _field_lines(item: DecodedMessage) -> Iterator[str]:
    message = item.observation.message
    h = message.header
    yield (
        f"{'':>19}header: msg_id={h.msg_id} command={h.command} size={h.size} "
        f"flags={h.flags:#x} error={h.error}"
    )
    for name, value in body_fields(message.body).items():
        if name == "json_text":
            value = bytes.fromhex(value).decode("utf-8", "replace")
        yield f"{'':>19}{name}: {_verbose(value)}"
    for fd in item.record.fds:
        yield f"{'':>19}fd[{fd.position}]: {fd_fields(fd)}"


def _verbose(value: Any) -> str:
    """Integers in hex (and decimal when large), recursively."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:#x}" if value < 10 else f"{value:#x} ({value})"
    if isinstance(value, dict):
        inner = ", ".join(f"{k}={_verbose(v)}" for k, v in value.items() if k != "type")
        return f"{value['type']}({inner})" if "type" in value else "{" + inner + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_verbose(v) for v in value) + "]"
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, DmaLayout):
        return value.value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if attrs.has(type(value)):
        return body_fields(value)
    return value


def body_fields(body: Any) -> dict[str, Any]:
    """Every field of a body (views included) as JSON-able values, bytes as hex."""
    out: dict[str, Any] = {"type": type(body).__name__}
    for field in attrs.fields(type(body)):
        out[field.name] = _jsonable(getattr(body, field.name))
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


def json_lines(items: Iterable[DecodedItem]) -> Iterator[str]:
    """One JSON object per record, for jq and other tools."""
    for item in items:
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
        elif isinstance(item, TornMessage):
            obj = {
                **_record_fields(item.record, item.violation.index),
                "torn": True,
                "length": item.record.wire_length,
                "summary": item.text,
                "fds": [fd_fields(fd) for fd in item.record.fds],
                "violations": [item.violation.to_dict()],
                "hex": item.record.data.hex(),
            }
        elif isinstance(item, EventRecord):
            obj = {
                "record": "event",
                "seq": item.seq,
                "session": item.session,
                "t_ns": item.t_ns,
                "kind": item.kind,
                "data": _jsonable(item.data),
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
                "body": body_fields(message.body),
                "fds": [fd_fields(fd) for fd in record.fds],
                "latency_ns": item.latency_ns,
                "violations": [v.to_dict() for v in item.observation.violations],
                "hex": record.data.hex(),
            }
            if record.length is not None:
                obj["length"] = record.length
        yield json.dumps(_jsonable(obj))


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
