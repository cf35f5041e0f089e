"""What several command groups share: the DMA layout options.

Argument types every command uses are in :mod:`vfioproxy.usage.types`
(below the layers that define commands).
"""

from __future__ import annotations

import argparse

from vfioproxy.protocol.bodies import DmaLayout
from vfioproxy.protocol.codec import Dialects

__all__ = ["LAYOUTS", "dialects"]

LAYOUTS = [layout.value for layout in DmaLayout]


def dialects(args: argparse.Namespace) -> Dialects | None:
    """The DMA layouts ``--client-dma``/``--server-dma`` ask for (None: detect)."""
    if args.client_dma is None and args.server_dma is None:
        return None
    return Dialects(
        client=DmaLayout(args.client_dma or DmaLayout.SPEC.value),
        server=DmaLayout(args.server_dma or DmaLayout.SPEC.value),
    )
