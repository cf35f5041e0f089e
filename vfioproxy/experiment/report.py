"""Terminal output of ``vfioproxy experiment``: progress while running, the summary table."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TextIO

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as Bar
from rich.table import Table

from vfioproxy.experiment.model import ExperimentResults, SummaryRow
from vfioproxy.experiment.runner import Progress

__all__ = ["print_summary", "progress_display", "summary_cells", "summary_lines", "wrap_note"]

#: column headers (times in ms); the plain table joins the two lines
HEADERS = (
    ("", "setting"), ("realize", "ms"), ("total", "ms"), ("total", "min..max"),
    ("session", "ms"), ("added", "ms"), ("expected", "ms"), ("", "ratio"),
    ("per turn", "ms"), ("", "ratio"), ("", "msgs"), ("", "status"),
)
#: the columns a terminal too narrow for all leaves out, in this order (indexes
#: into HEADERS): the setting, total, added, msgs and status stay
NARROW_DROPS = (9, 8, 3, 7, 6, 1, 4)


def _ms(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:+.2f}" if signed else f"{value * 1000:.2f}"


def _status(row: SummaryRow) -> str:
    return ", ".join(f"{status}×{n}" for status, n in sorted(row.statuses.items()))


def summary_cells(row: SummaryRow) -> list[str]:
    """The cells of one summary line, as text."""
    spread = "-"
    if row.total_min_s is not None and row.total_max_s is not None:
        spread = f"{row.total_min_s * 1000:.1f}..{row.total_max_s * 1000:.1f}"
    return [
        row.setting,
        _ms(row.realize_s),
        _ms(row.total_s),
        spread,
        _ms(row.session_s),
        _ms(row.added_s, signed=True),
        _ms(row.expected_added_s, signed=True),
        "-" if row.ratio is None else f"{row.ratio:.2f}",
        _ms(row.expected_turns_added_s, signed=True),
        "-" if row.turns_ratio is None else f"{row.turns_ratio:.2f}",
        "-" if row.messages is None else f"{row.messages:g}",
        _status(row),
    ]


def _notes(results: ExperimentResults) -> list[str]:
    """What the columns mean, then the first error of each setting that had one."""
    base = next((s.label for s in results.settings if s.proxy), "-")
    lines = [
        "realize, total: medians over the runs (ms); session: first to last message at the "
        f"proxy; added: session (direct: total) against setting {base!r}; "
        "expected: messages x mean injected delay (delay rules on '*' commands) against "
        "the same setting; per turn: the same counting only the delayed messages whose "
        "sender had waited for the other side (those that begin a turn); ratio: added / it",
    ]
    errors = [row for row in results.summary if row.error]
    if errors:
        lines.append("errors (first of each setting):")
        lines += [f"  {row.setting}: {row.error}" for row in errors]
    return lines


def wrap_note(line: str, width: int) -> list[str]:
    """A note line wrapped at word boundaries to ``width`` (a word longer than
    that stays whole on its own line); the continuation of an indented line
    (a setting's error) is indented two more."""
    indent = line[: len(line) - len(line.lstrip(" "))]
    return textwrap.wrap(
        line,
        width=width,
        subsequent_indent=indent + "  " if indent else "",
        break_long_words=False,
        break_on_hyphens=False,
    ) or [line]


def summary_lines(results: ExperimentResults) -> list[str]:
    """The summary as plain aligned text."""
    headers = [" ".join(part for part in header if part) for header in HEADERS]
    table = [headers] + [summary_cells(row) for row in results.summary]
    widths = [max(len(line[i]) for line in table[:]) for i in range(len(HEADERS) - 1)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=False)) + "  " + line[-1]
        for line in table
    ]
    return [*lines, "", *_notes(results)]


def _column_name(number: int) -> str:
    """A column's header as one line; a ratio named after the column it divides by."""
    top, bottom = HEADERS[number]
    if not top and bottom == "ratio":
        top = HEADERS[number - 1][0]
    return " ".join(part for part in (top, bottom) if part)


def _table(results: ExperimentResults, columns: Sequence[int]) -> Table:
    title = results.config.sweep or "; ".join(results.config.rules) or "proxy"
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False,
                  collapse_padding=True)
    last = len(HEADERS) - 1
    for number in columns:
        table.add_column("\n".join(HEADERS[number]),
                         justify="left" if number in (0, last) else "right",
                         no_wrap=number not in (0, last))
    for row in results.summary:
        style = None if row.ok == row.runs else "yellow"
        cells = summary_cells(row)
        table.add_row(*(cells[number] for number in columns), style=style)
    return table


def print_summary(
    results: ExperimentResults, file: TextIO | None = None, *, width: int | None = None
) -> None:
    """The summary table (on stdout by default), drawn by ``rich``, and its notes
    wrapped at word boundaries; ``width``: the terminal's width on a terminal,
    else 160 columns. A table wider than that leaves out columns
    (:data:`NARROW_DROPS`) until it fits, and a note names them."""
    file = sys.stdout if file is None else file
    if width is None and not file.isatty():
        width = 160
    out = Console(file=file, width=width)
    unbounded = out.options.update_width(sys.maxsize)  # measure the width the table wants
    columns = list(range(len(HEADERS)))
    table = _table(results, columns)
    for drop in NARROW_DROPS:
        if out.measure(table, options=unbounded).maximum <= out.width:
            break
        columns.remove(drop)
        table = _table(results, columns)
    out.print(table)
    notes = _notes(results)
    left_out = [_column_name(n) for n in range(len(HEADERS)) if n not in columns]
    if left_out:
        notes.append(f"left out for the terminal's width: {', '.join(left_out)} "
                     f"(results.json has the whole summary)")
    for line in notes:
        for part in wrap_note(line, out.width):
            out.print(part, highlight=False, markup=False, soft_wrap=True)


@contextmanager
def progress_display(stream: TextIO | None = None) -> Iterator[Progress | None]:
    """A progress callback for :func:`run_experiment`: a rich progress bar when
    ``stream`` (stderr) is a terminal, else None (no display)."""
    stream = sys.stderr if stream is None else stream
    if not stream.isatty():
        yield None
        return
    with Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
             TimeElapsedColumn(), console=Console(file=stream), transient=True) as bar:
        task = bar.add_task("experiment", total=None)

        def update(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=what)

        yield update

