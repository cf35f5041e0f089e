"""Flag words and numbered constants of vfio-user payloads (protocol.md §2.19)."""

from __future__ import annotations

import enum


class DeviceFlags(enum.IntFlag):
    RESET = 0x1
    PCI = 0x2
    PLATFORM = 0x4
    AMBA = 0x8
    CCW = 0x10
    AP = 0x20
    FSL_MC = 0x40
    CAPS = 0x80
    CDX = 0x100


class RegionFlags(enum.IntFlag):
    READ = 0x1
    WRITE = 0x2
    MMAP = 0x4
    CAPS = 0x8


class RegionCapId(enum.IntEnum):
    SPARSE_MMAP = 1
    TYPE = 2
    MSIX_MAPPABLE = 3


class IrqIndex(enum.IntEnum):
    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


def irq_name(index: int) -> str:
    """``MSIX``, ``INTX``..., ``IRQ7`` for an index with no name."""
    try:
        return IrqIndex(index).name
    except ValueError:
        return f"IRQ{index}"


def irq_vector_name(index: int, vector: int | None) -> str:
    """``MSIX[3]``, ``INTX[0]``, ``IRQ7[0]``; ``MSIX`` for every vector (None)."""
    return irq_name(index) if vector is None else f"{irq_name(index)}[{vector}]"


class IrqInfoFlags(enum.IntFlag):
    EVENTFD = 0x1
    MASKABLE = 0x2
    AUTOMASKED = 0x4
    NORESIZE = 0x8


class IrqSetFlags(enum.IntFlag):
    DATA_NONE = 0x1
    DATA_BOOL = 0x2
    DATA_EVENTFD = 0x4
    ACTION_MASK = 0x8
    ACTION_UNMASK = 0x10
    ACTION_TRIGGER = 0x20


IRQ_SET_DATA_MASK = 0x07
IRQ_SET_ACTION_MASK = 0x38


class DmaMapFlags(enum.IntFlag):
    READ = 0x1
    WRITE = 0x2
    MMAP = 0x4
    FILE_IO = 0x8


class DmaUnmapFlags(enum.IntFlag):
    GET_DIRTY_BITMAP = 0x1
    ALL = 0x2


class FeatureOp(enum.IntFlag):
    GET = 0x10000
    SET = 0x20000
    PROBE = 0x40000


FEATURE_INDEX_MASK = 0xFFFF


class Feature(enum.IntEnum):
    MIGRATION = 1
    MIG_DEVICE_STATE = 2
    DMA_LOGGING_START = 6
    DMA_LOGGING_STOP = 7
    DMA_LOGGING_REPORT = 8


class MigrationFlags(enum.IntFlag):
    STOP_COPY = 0x1
    P2P = 0x2
    PRE_COPY = 0x4


class MigrationState(enum.IntEnum):
    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7


def flag_names(flags_type: type[enum.IntFlag], value: int) -> str:
    """``READ|WRITE|0x100`` style text for a flag word, ``0`` when empty."""
    names = []
    rest = value
    for member in flags_type:
        if member.value and value & member.value == member.value:
            names.append(member.name or hex(member.value))
            rest &= ~member.value
    if rest:
        names.append(hex(rest))
    return "|".join(names) if names else "0"


def enum_name(enum_type: type[enum.IntEnum], value: int) -> str:
    """The member name of ``value``, or the number itself when unknown."""
    try:
        return enum_type(value).name
    except ValueError:
        return str(value)
