"""Which end of a connection, and which way a message travels.

:class:`Side` and :class:`Direction` are defined in :mod:`recorder.side`:
the trace format names them (``"client"``, ``"c2s"``), and ``recorder`` is
the lowest layer, importing nothing from ``vfioproxy``.
"""

from recorder.side import Direction, Side

__all__ = ["Direction", "Side"]
