"""The JSON capabilities carried by VERSION (protocol.md §3).

Known keys are typed; unknown keys are kept in ``extra`` so nothing a peer
said is lost. The exact JSON text stays with the VERSION body: this is a view.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from vfioproxy.errors import RemoteProtocolError

#: message offset where VERSION JSON starts (errors inside it point here)
JSON_OFFSET = 20
#: defaults the spec gives for absent keys
SPEC_MAX_MSG_FDS = 1
SPEC_MAX_DATA_XFER_SIZE = 1024 * 1024


@attrs.frozen
class MigrationCapability:
    pgsize: int | None = None
    max_bitmap_size: int | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class TwinSocketCapability:
    supported: bool | None = None
    fd_index: int | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class Capabilities:
    """The ``capabilities`` object of a VERSION message."""

    max_msg_fds: int | None = None
    max_data_xfer_size: int | None = None
    pgsizes: int | None = None
    max_dma_maps: int | None = None
    migration: MigrationCapability | None = None
    write_multiple: bool | None = None
    twin_socket: TwinSocketCapability | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)

    def effective_max_msg_fds(self, default: int = SPEC_MAX_MSG_FDS) -> int:
        return default if self.max_msg_fds is None else self.max_msg_fds

    def effective_max_data_xfer_size(self) -> int:
        if self.max_data_xfer_size is None:
            return SPEC_MAX_DATA_XFER_SIZE
        return self.max_data_xfer_size

    def to_json_object(self) -> dict[str, Any]:
        """The ``capabilities`` dict, typed keys first, in protocol.md order."""
        out: dict[str, Any] = {}
        for key in ("max_msg_fds", "max_data_xfer_size", "pgsizes", "max_dma_maps"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.migration is not None:
            mig: dict[str, Any] = {}
            if self.migration.pgsize is not None:
                mig["pgsize"] = self.migration.pgsize
            if self.migration.max_bitmap_size is not None:
                mig["max_bitmap_size"] = self.migration.max_bitmap_size
            out["migration"] = {**mig, **self.migration.extra}
        if self.write_multiple is not None:
            out["write_multiple"] = self.write_multiple
        if self.twin_socket is not None:
            twin: dict[str, Any] = {}
            if self.twin_socket.supported is not None:
                twin["supported"] = self.twin_socket.supported
            if self.twin_socket.fd_index is not None:
                twin["fd_index"] = self.twin_socket.fd_index
            out["twin_socket"] = {**twin, **self.twin_socket.extra}
        out.update(self.extra)
        return out


def _want(obj: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = obj.get(key)
    if value is None:
        return None
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if not ok or (kind is int and value < 0):
        raise RemoteProtocolError(
            "capability has the wrong type",
            field=f"{where}.{key}",
            offset=JSON_OFFSET,
            expected="non-negative integer" if kind is int else kind.__name__,
            got=value,
        )
    return value


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RemoteProtocolError(
            "capability must be a JSON object",
            field=where,
            offset=JSON_OFFSET,
            expected="object",
            got=value,
        )
    return value


def parse_capabilities(obj: dict[str, Any]) -> Capabilities:
    """Type the ``capabilities`` object; raises RemoteProtocolError on bad types."""
    known = {"max_msg_fds", "max_data_xfer_size", "pgsizes", "max_dma_maps", "migration",
             "write_multiple", "twin_socket"}
    migration = None
    if "migration" in obj:
        mig = _object(obj["migration"], "capabilities.migration")
        migration = MigrationCapability(
            pgsize=_want(mig, "pgsize", int, "capabilities.migration"),
            max_bitmap_size=_want(mig, "max_bitmap_size", int, "capabilities.migration"),
            extra={k: v for k, v in mig.items() if k not in ("pgsize", "max_bitmap_size")},
        )
    twin = None
    if "twin_socket" in obj:
        tw = _object(obj["twin_socket"], "capabilities.twin_socket")
        twin = TwinSocketCapability(
            supported=_want(tw, "supported", bool, "capabilities.twin_socket"),
            fd_index=_want(tw, "fd_index", int, "capabilities.twin_socket"),
            extra={k: v for k, v in tw.items() if k not in ("supported", "fd_index")},
        )
    return Capabilities(
        max_msg_fds=_want(obj, "max_msg_fds", int, "capabilities"),
        max_data_xfer_size=_want(obj, "max_data_xfer_size", int, "capabilities"),
        pgsizes=_want(obj, "pgsizes", int, "capabilities"),
        max_dma_maps=_want(obj, "max_dma_maps", int, "capabilities"),
        migration=migration,
        write_multiple=_want(obj, "write_multiple", bool, "capabilities"),
        twin_socket=twin,
        extra={k: v for k, v in obj.items() if k not in known},
    )


@attrs.frozen
class VersionJson:
    """A decoded VERSION JSON document: typed capabilities plus other top-level keys."""

    capabilities: Capabilities | None
    extra: dict[str, Any] = attrs.field(factory=dict)


def parse_version_json(text: bytes, *, offset: int = JSON_OFFSET) -> VersionJson:
    """Decode VERSION JSON text (without its NUL); ``offset`` locates errors."""
    try:
        doc = json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, Unicode, int digits
        raise RemoteProtocolError(
            f"VERSION JSON does not parse: {exc}", field="json", offset=offset, got=text[:80]
        ) from None
    if not isinstance(doc, dict):
        raise RemoteProtocolError(
            "VERSION JSON is not an object", field="json", offset=offset, expected="object",
            got=type(doc).__name__,
        )
    caps = None
    if "capabilities" in doc:
        caps = parse_capabilities(_object(doc["capabilities"], "capabilities"))
    return VersionJson(caps, {k: v for k, v in doc.items() if k != "capabilities"})


def dump_version_json(doc: VersionJson, *, style: str = "compact") -> bytes:
    """JSON text for a VERSION body. ``style``: ``compact`` (libvfio-user's
    sample client), ``qemu`` (``", "``/``": "`` separators) or ``json-c``
    (libvfio-user's spaced style)."""
    obj: dict[str, Any] = {}
    if doc.capabilities is not None:
        obj["capabilities"] = doc.capabilities.to_json_object()
    obj.update(doc.extra)
    if style == "compact":
        return json.dumps(obj, separators=(",", ":")).encode()
    if style == "qemu":
        return json.dumps(obj, separators=(", ", ": ")).encode()
    if style == "json-c":
        return _json_c(obj).encode()
    raise ValueError(f"unknown JSON style {style!r}")


def _json_c(value: Any) -> str:
    if isinstance(value, dict):
        if not value:
            return "{ }"
        inner = ", ".join(f"{json.dumps(k)}: {_json_c(v)}" for k, v in value.items())
        return "{ " + inner + " }"
    if isinstance(value, list):
        return "[ " + ", ".join(_json_c(v) for v in value) + " ]" if value else "[ ]"
    return json.dumps(value)
