"""Which end of a connection, and which way a message travels.

Defined here, in the trace format's package (a trace names them), and
re-exported as :mod:`vfioproxy.side`."""

from __future__ import annotations

import enum


class Side(enum.Enum):
    """One end of a vfio-user connection."""

    CLIENT = "client"
    SERVER = "server"

    # members are singletons compared by identity: hash them so too (Enum's
    # own __hash__ is Python code hashing the name, run on every dict lookup)
    __hash__ = object.__hash__

    @property
    def other(self) -> Side:
        return Side.SERVER if self is Side.CLIENT else Side.CLIENT


class Direction(enum.Enum):
    """The way a message travels: ``c2s`` (client to server) or ``s2c``."""

    C2S = "c2s"
    S2C = "s2c"

    __hash__ = object.__hash__  # see Side

    @property
    def sender(self) -> Side:
        return Side.CLIENT if self is Direction.C2S else Side.SERVER

    @property
    def receiver(self) -> Side:
        return self.sender.other

    @property
    def reverse(self) -> Direction:
        return Direction.S2C if self is Direction.C2S else Direction.C2S
