"""A message as named fields, and where it points in PCI terms.

:func:`flatten` turns a decoded message and facts about its fds into a flat
``{field: value}`` map: ``header.msg_id``, ``header.size``, ``header.flags``,
``header.error`` and ``header.command``; the body's fields by name
(``offset``, ``region``, ``count``, ``data``, ``argsz``, ``caps[0].areas[1].size``);
VERSION's JSON as parsed keys (``json.capabilities.max_msg_fds``) rather than
its text, so key order and spacing do not count; and the fds as ``fds`` (how
many), ``fds[0].kind``, ``fds[0].size`` and ``fds[0].sha256`` (when the
recording has the contents). Comparing two such maps is :mod:`.match`'s job.
:func:`field_names` lists the names those fields are made of, per command,
so that a rule naming a field can be checked before anything is compared.

:class:`PciContext` names config-space registers (from the config space the
recorded session read), so a report says ``config space offset 0x10 BAR0``.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import json
import re
import typing
from collections.abc import Iterator, Sequence
from typing import Any

import attrs

from recorder.records import FdRecord
from vfioproxy.io.fds import OwnedFd, inspect_fd, read_fd_contents
from vfioproxy.protocol.bodies import (
    DeviceFeatureBody,
    DmaAccessBody,
    DmaMapBody,
    DmaUnmapBody,
    ErrorBody,
    IrqInfoBody,
    IrqSetBody,
    RawBody,
    RegionAccessBody,
    RegionInfoBody,
    RegionIoFdsBody,
    VersionBody,
)
from vfioproxy.protocol.codec import COMMAND_PARSERS, REPLY_PARSERS, Message, Parser
from vfioproxy.protocol.constants import IrqIndex, enum_name
from vfioproxy.protocol.pci import (
    EXT_CONFIG_SIZE,
    BarKind,
    Capability,
    Region,
    config_bar_kinds,
    config_register_name,
    region_name,
    walk_capabilities,
)

__all__ = [
    "FD_FIELDS",
    "HEADER_FIELDS",
    "FdFacts",
    "PciContext",
    "field_names",
    "flatten",
    "live_fd_facts",
    "recorded_fd_facts",
    "where",
]

#: the header's fields, flattened as ``header.<name>``
HEADER_FIELDS = ("msg_id", "command", "size", "flags", "error")
#: what is compared of each fd, flattened as ``fds[i].<name>``
FD_FIELDS = ("kind", "size", "sha256")
#: a body field shown as its parsed view: VERSION's JSON document as ``json.*``
_VIEW_NAMES = {"document": "json"}

#: fields whose raw bytes a decoded view already covers, when that view exists
_RAW_WHEN_VIEWED = {
    VersionBody: ("json_text", "document"),
    RegionInfoBody: ("extra", "caps"),
    RegionIoFdsBody: ("extra", "entries"),
    DeviceFeatureBody: ("data", "feature_data"),
}

_INDEXED = re.compile(r"(.*)\[(\d+)\]")


@attrs.frozen
class FdFacts:
    """What is compared of one fd: its kind, size and (optionally) contents digest."""

    kind: str
    size: int | None = None
    sha256: bytes | None = None


def recorded_fd_facts(records: Sequence[FdRecord]) -> tuple[FdFacts, ...]:
    return tuple(FdFacts(r.kind.value, r.size, r.sha256) for r in records)


def live_fd_facts(
    fds: Sequence[OwnedFd], recorded: Sequence[FdFacts] = ()
) -> tuple[FdFacts, ...]:
    """Facts about live fds; contents are hashed only where the recording has a digest."""
    facts = []
    for i, fd in enumerate(fds):
        info = inspect_fd(fd)
        digest = None
        if i < len(recorded) and recorded[i].sha256 is not None and info.size is not None:
            data = read_fd_contents(fd, info.size)
            digest = None if data is None else hashlib.sha256(data).digest()
        facts.append(FdFacts(info.kind.value, info.size, digest))
    return tuple(facts)


@attrs.frozen
class PciContext:
    """Config space as the recorded session saw it: capabilities and BAR kinds."""

    config: bytes = b""
    caps: tuple[Capability, ...] = ()
    kinds: tuple[BarKind | None, ...] = ()

    @classmethod
    def from_config(cls, config: bytes) -> PciContext:
        return cls(config, walk_capabilities(config), config_bar_kinds(config))

    def register_name(self, offset: int, count: int) -> str:
        return config_register_name(offset, count, self.caps, self.kinds)

    def register_at(self, offset: int) -> tuple[int, int, str]:
        """(start, size, name) of the config register holding byte ``offset``."""
        name = self.register_name(offset, 1)
        match = _INDEXED.fullmatch(name)
        if match is None:
            return offset, 1, name
        base, start = match.group(1), offset - int(match.group(2))
        size = 1
        while size < 8 and self.register_name(start + size, 1) == f"{base}[{size}]":
            size += 1
        return start, size, base


def where(message: Message, pci: PciContext) -> str | None:
    """Where a message points, in PCI terms: ``config space offset 0x10 BAR0``,
    ``BAR2 offset 0x8000``, ``iova 0x200000``, ``region BAR1``, ``IRQ MSIX``."""
    body = message.body
    if isinstance(body, RegionAccessBody):
        if body.region == Region.CONFIG:
            if 0 < body.count <= 8 and body.offset < EXT_CONFIG_SIZE:
                name = pci.register_name(body.offset, body.count)
                return f"config space offset {body.offset:#x} {name}"
            return f"config space offset {body.offset:#x}, {body.count} bytes"
        return f"{region_name(body.region)} offset {body.offset:#x}"
    if isinstance(body, DmaAccessBody):
        return f"iova {body.address:#x}"
    if isinstance(body, DmaMapBody | DmaUnmapBody):
        return f"iova {body.iova:#x} size {body.size:#x}"
    if isinstance(body, RegionInfoBody | RegionIoFdsBody):
        return f"region {region_name(body.index)}"
    if isinstance(body, IrqInfoBody | IrqSetBody):
        return f"IRQ {enum_name(IrqIndex, body.index)}"
    return None


def flatten(message: Message, fds: Sequence[FdFacts] = ()) -> dict[str, Any]:
    """The message as ``{field name: value}`` (see the module docstring)."""
    header = message.header
    out: dict[str, Any] = {f"header.{name}": getattr(header, name) for name in HEADER_FIELDS}
    _flatten_body(message.body, out)
    out["fds"] = len(fds)
    for i, fd in enumerate(fds):
        out[f"fds[{i}].kind"] = fd.kind
        out[f"fds[{i}].size"] = fd.size
        if fd.sha256 is not None:
            out[f"fds[{i}].sha256"] = fd.sha256
    return out


def _flatten_body(body: Any, out: dict[str, Any]) -> None:
    if not attrs.has(type(body)):
        return
    skip: set[str] = set()
    raw, view = _RAW_WHEN_VIEWED.get(type(body), (None, None))
    if raw is not None and view is not None:
        shown = getattr(body, view)
        if shown:
            skip.add(raw)  # the view holds what the raw bytes say
        elif shown is None:
            skip.add(view)
    for field in attrs.fields(type(body)):
        if field.name in skip:
            continue
        value = getattr(body, field.name)
        if field.name in _VIEW_NAMES:
            if value is not None:
                text = body.json_text.decode("utf-8", "replace")
                _flatten_value(_VIEW_NAMES[field.name], json.loads(text), out)
            continue
        _flatten_value(field.name, value, out)


def _flatten_value(name: str, value: Any, out: dict[str, Any]) -> None:
    if attrs.has(type(value)):
        cap_id = getattr(value, "id", None)
        if isinstance(cap_id, int):
            out[f"{name}.id"] = cap_id
        for field in attrs.fields(type(value)):
            _flatten_value(f"{name}.{field.name}", getattr(value, field.name), out)
    elif isinstance(value, tuple | list):
        out[f"len({name})"] = len(value)
        for i, item in enumerate(value):
            _flatten_value(f"{name}[{i}]", item, out)
    elif isinstance(value, dict):
        for key, item in value.items():
            _flatten_value(f"{name}.{key}", item, out)
    elif isinstance(value, enum.Enum):
        out[name] = value.value
    else:
        out[name] = value


@functools.cache
def field_names(command: int | None = None) -> frozenset[str]:
    """The names the body fields of ``command``'s messages (None: any command's)
    are made of, as :func:`flatten` names them: ``data``, ``caps``, ``areas``,
    ``offset``, ``json``... (not ``header`` and ``fds``, which every message has:
    :data:`HEADER_FIELDS`, :data:`FD_FIELDS`). A reply with an error and a body
    that did not decode flatten as :class:`ErrorBody` / :class:`RawBody` fields."""
    parsers: list[Parser] = []
    for table in (COMMAND_PARSERS, REPLY_PARSERS):
        parsers.extend(table.values() if command is None else
                       [table[command]] if command in table else [])
    classes = {getattr(parser, "__self__", None) for parser in parsers}
    names: set[str] = set()
    for cls in (*classes, ErrorBody, RawBody):
        if isinstance(cls, type) and attrs.has(cls):
            names.update(_names_in(cls))
    return frozenset(names)


def _names_in(cls: type) -> Iterator[str]:
    """The field names of an attrs class and of the attrs classes its fields hold."""
    if getattr(cls, "id", None) is not None:
        yield "id"  # a region capability's id, flattened with it
    for field in attrs.fields(attrs.resolve_types(cls)):
        yield _VIEW_NAMES.get(field.name, field.name)
        if field.name not in _VIEW_NAMES:
            for inner in _attrs_classes(field.type):
                yield from _names_in(inner)


def _attrs_classes(hint: Any) -> Iterator[type]:
    if isinstance(hint, type) and attrs.has(hint):
        yield hint
    for arg in typing.get_args(hint):
        yield from _attrs_classes(arg)
