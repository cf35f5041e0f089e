"""VFIO migration: the state machine and the device state stream."""

from __future__ import annotations

import errno
import struct
import zlib

import attrs

from vfioproxy.peers import layout as L
from vfioproxy.peers.device.base import _BAR1_SCRATCH, DeviceError
from vfioproxy.peers.device.config import _MSIX_TABLE_SIZE
from vfioproxy.peers.device.interrupts import IRQ_COUNTS
from vfioproxy.protocol.constants import (
    MigrationState,
)

# --------------------------------------------------------------------- migration

_S = MigrationState
#: libvfio-user's ``next_state`` table: the step taken from a state towards a target
#: (direct arcs, else the shortest path not passing through PRE_COPY/STOP_COPY)
_NEXT_STATE: dict[int, dict[int, int]] = {
    _S.STOP: {_S.RUNNING: _S.RUNNING, _S.STOP_COPY: _S.STOP_COPY, _S.RESUMING: _S.RESUMING,
              _S.PRE_COPY: _S.RUNNING},
    _S.RUNNING: {_S.STOP: _S.STOP, _S.STOP_COPY: _S.STOP, _S.RESUMING: _S.STOP,
                 _S.PRE_COPY: _S.PRE_COPY},
    _S.STOP_COPY: {_S.STOP: _S.STOP, _S.RUNNING: _S.STOP, _S.RESUMING: _S.STOP},
    _S.RESUMING: {_S.STOP: _S.STOP, _S.RUNNING: _S.STOP, _S.STOP_COPY: _S.STOP,
                  _S.PRE_COPY: _S.STOP},
    _S.PRE_COPY: {_S.STOP: _S.RUNNING, _S.RUNNING: _S.RUNNING, _S.STOP_COPY: _S.STOP_COPY,
                  _S.RESUMING: _S.RUNNING},
}  # fmt: skip
_RUNNING_STATES = frozenset({_S.RUNNING, _S.PRE_COPY})


def next_migration_state(current: int, target: int) -> int | None:
    """The next state on the way from ``current`` to ``target``; None if refused
    (ERROR and the P2P states, STOP_COPY → PRE_COPY, anything out of ERROR)."""
    return _NEXT_STATE.get(current, {}).get(target)


# The migration stream (version 1) is a sequence of records, each
#   magic b"VFPS" | kind u16 | version u16 | payload length u32 | crc32 u32 | payload
# kind 1, device state: config space (4096) | BAR0 registers (_REGS: DESC lo/hi,
#   STATUS, IRQ_STATUS, DOORBELL_COUNT, SCRATCH, latched doorbell) | BAR1 scratch
#   (16) | BAR2 RAM (BAR2_MMAP_SIZE) | MSI-X table (64) | PBA u64 | per vector in
#   _LINE_ORDER: VFIO masked u8, pending u8;
# kind 2, end: empty, last.
# Entering PRE_COPY queues a device record (a pre-copy snapshot); entering
# STOP_COPY appends the final device record and the end record. Reads take the
# queue in order, so a pre-copy record read only in part stays whole in the
# stream; the destination keeps the last device record.
#: record header: magic, kind, version, payload length, crc32 of the payload
_RECORD = struct.Struct("<4sHHII")
_MAGIC = b"VFPS"
_STREAM_VERSION = 1
_KIND_DEVICE = 1
_KIND_END = 2
_REGS = struct.Struct("<IIIIIIB3x")
_LINE_ORDER = tuple((index, v) for index, n in IRQ_COUNTS.items() for v in range(n))
_DEVICE_PARTS = (
    ("config", L.CONFIG_SIZE),
    ("registers", _REGS.size),
    ("bar1", _BAR1_SCRATCH),
    ("ram", L.BAR2_MMAP_SIZE),
    ("msix_table", _MSIX_TABLE_SIZE),
    ("pba", 8),
    ("irq_lines", 2 * len(_LINE_ORDER)),
)
_DEVICE_SIZE = sum(size for _, size in _DEVICE_PARTS)
#: incoming stream bytes a RESUMING device accepts: a pre-copy and a final
#: device record and the end record, with room to spare
MAX_INCOMING_STREAM = 4 * (_DEVICE_SIZE + _RECORD.size)


@attrs.define
class Registers:
    """BAR0's registers; ``latched``: a doorbell rung while the device was stopped."""

    desc_lo: int = 0
    desc_hi: int = 0
    status: int = 0
    irq_status: int = 0
    doorbell_count: int = 0
    scratch: int = 0
    latched: bool = False

    def value(self, offset: int) -> int:
        """What a read of the dword at ``offset`` returns."""
        return {
            L.REG_ID: L.REG_ID_VALUE,
            L.REG_STATUS: self.status,
            L.REG_DESC_LO: self.desc_lo,
            L.REG_DESC_HI: self.desc_hi,
            L.REG_IRQ_STATUS: self.irq_status,
            L.REG_DOORBELL_COUNT: self.doorbell_count,
            L.REG_SCRATCH: self.scratch,
        }.get(offset, 0)

    @property
    def descriptor(self) -> int:
        return self.desc_hi << 32 | self.desc_lo


@attrs.frozen
class Snapshot:
    """Everything the migration stream carries (not DMA windows or eventfds:
    the destination's client maps and sends those again)."""

    config: bytes
    registers: Registers
    bar1: bytes
    ram: bytes
    msix_table: bytes
    pba: int
    irq_lines: tuple[tuple[bool, bool], ...]  # (masked, pending) in _LINE_ORDER


def _record(kind: int, payload: bytes) -> bytes:
    header = _RECORD.pack(_MAGIC, kind, _STREAM_VERSION, len(payload), zlib.crc32(payload))
    return header + payload


def _device_payload(snap: Snapshot) -> bytes:
    r = snap.registers
    regs = _REGS.pack(r.desc_lo, r.desc_hi, r.status, r.irq_status, r.doorbell_count,
                      r.scratch, r.latched)
    lines = bytes(b for masked, pending in snap.irq_lines for b in (masked, pending))
    return b"".join(
        (snap.config, regs, snap.bar1, snap.ram, snap.msix_table, snap.pba.to_bytes(8, "little"),
         lines)
    )


def encode_state_records(snap: Snapshot, *, final: bool) -> bytes:
    """A device-state record, followed by the end record if ``final`` (STOP_COPY)."""
    out = _record(_KIND_DEVICE, _device_payload(snap))
    return out + _record(_KIND_END, b"") if final else out


def _bad_stream(text: str) -> DeviceError:
    return DeviceError(errno.EINVAL, f"migration stream refused: {text}")


def _decode_device(payload: bytes, vendor_id: int, device_id: int) -> Snapshot:
    if len(payload) != _DEVICE_SIZE:
        raise _bad_stream(f"device record of {len(payload)} bytes, expected {_DEVICE_SIZE}")
    parts: dict[str, bytes] = {}
    pos = 0
    for name, size in _DEVICE_PARTS:
        parts[name] = payload[pos : pos + size]
        pos += size
    ids = struct.unpack_from("<HH", parts["config"])
    if ids != (vendor_id, device_id):
        raise _bad_stream(f"state of device {ids[0]:04x}:{ids[1]:04x}")
    desc_lo, desc_hi, status, irq_status, count, scratch, latched = _REGS.unpack(
        parts["registers"]
    )
    lines = parts["irq_lines"]
    return Snapshot(
        config=parts["config"],
        registers=Registers(desc_lo, desc_hi, status, irq_status, count, scratch, bool(latched)),
        bar1=parts["bar1"],
        ram=parts["ram"],
        msix_table=parts["msix_table"],
        pba=int.from_bytes(parts["pba"], "little") & ((1 << L.MSIX_VECTORS) - 1),
        irq_lines=tuple((bool(lines[i]), bool(lines[i + 1])) for i in range(0, len(lines), 2)),
    )


def decode_state_stream(data: bytes, *, vendor_id: int, device_id: int) -> Snapshot:
    """The state a whole stream carries: its last device record (earlier ones are
    pre-copy snapshots it supersedes). Every record must be intact (magic,
    version, length, crc32), the stream must end with the end record, and the
    state must be of this device (vendor/device id); else EINVAL."""
    snap = None
    pos = 0
    ended = False
    while pos < len(data):
        if ended:
            raise _bad_stream("data after the end record")
        if len(data) - pos < _RECORD.size:
            raise _bad_stream("truncated record header")
        magic, kind, version, length, crc = _RECORD.unpack_from(data, pos)
        payload = data[pos + _RECORD.size : pos + _RECORD.size + length]
        if magic != _MAGIC or version != _STREAM_VERSION:
            raise _bad_stream(f"record at {pos} has magic {magic!r} version {version}")
        if len(payload) != length or zlib.crc32(payload) != crc:
            raise _bad_stream(f"record at {pos} is truncated or corrupt")
        if kind == _KIND_DEVICE:
            snap = _decode_device(payload, vendor_id, device_id)
        elif kind != _KIND_END or length:
            raise _bad_stream(f"record at {pos} has unknown kind {kind}")
        ended = kind == _KIND_END
        pos += _RECORD.size + length
    if snap is None or not ended:
        raise _bad_stream("no device record, or no end record")
    return snap
