"""Tables as text lines, laid out by rich: the trace tools' tables (``trace stats``)."""

from __future__ import annotations

import io
from collections.abc import Sequence

from rich import box
from rich.console import Console
from rich.table import Table

__all__ = ["table", "table_lines"]


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[object]],
          *, left: int = 1, text_last: bool = False) -> Table:
    """A plain table: a header row, ``columns`` (the first ``left`` of them
    left-aligned, the rest, numbers, right-aligned; with ``text_last`` the
    last one, a text, left-aligned too) and ``rows``."""
    out = Table(title=title, title_justify="left", title_style=None, box=box.SIMPLE_HEAD,
                show_edge=False, pad_edge=False, header_style=None)
    for i, name in enumerate(columns):
        text = i < left or (text_last and i == len(columns) - 1)
        out.add_column(name, justify="left" if text else "right")
    for row in rows:
        out.add_row(*(str(cell) for cell in row))
    return out


def table_lines(tables: Sequence[Table], width: int = 200) -> list[str]:
    """The ``tables`` as text lines, a blank line between them, no colour or
    terminal codes, whatever the output is."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=False,
                      highlight=False, emoji=False, markup=False)
    for i, item in enumerate(tables):
        if i:
            console.print()
        console.print(item)
    return [line.rstrip() for line in buffer.getvalue().splitlines()]
