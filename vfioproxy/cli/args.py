"""What several command groups share: argument types and the DMA layouts."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from vfioproxy.protocol.bodies import DmaLayout
from vfioproxy.protocol.codec import Dialects

__all__ = ["LAYOUTS", "dialects", "positive_int", "size", "size_in"]

LAYOUTS = [layout.value for layout in DmaLayout]


def dialects(args: argparse.Namespace) -> Dialects | None:
    """The DMA layouts ``--client-dma``/``--server-dma`` ask for (None: detect)."""
    if args.client_dma is None and args.server_dma is None:
        return None
    return Dialects(
        client=DmaLayout(args.client_dma or DmaLayout.SPEC.value),
        server=DmaLayout(args.server_dma or DmaLayout.SPEC.value),
    )


def size(text: str) -> int:
    """A size such as ``64k`` or ``16M`` in bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)


def size_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a size (:func:`size`) from ``low`` up to ``high`` bytes."""
    def parse(text: str) -> int:
        try:
            value = size(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a size such as 16M, got {text!r}") from None
        if value < low or (high is not None and value > high):
            wanted = f"at least {low} bytes" if high is None else f"{low} bytes .. {high >> 20}M"
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text}")
        return value

    return parse


def positive_int(text: str) -> int:
    """An argparse type: an integer above 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value
