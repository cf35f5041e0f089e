"""The timeline as one self-contained HTML file (no network: the script,
style and data are inline; the timelines are SVG drawn by the script).

Per session: a zoomable timeline (mouse wheel zooms around the pointer, dragging pans,
a double click shows all): one lane per step, each message a tick (commands
blue, replies green, uncertain labels dashed), the server's share shaded;
hovering a tick shows the decoded message, its label (and why, where the
wire cannot decide) and its QEMU function; under it the step table and
notes of :mod:`~vfioproxy.trace.timeline.table`. With several sessions, the
side-by-side table of :mod:`~vfioproxy.trace.timeline.compare` follows."""

from __future__ import annotations

import html
import importlib.resources
import json
import os
from collections.abc import Sequence
from typing import Any

from vfioproxy.trace.timeline.compare import (
    compare,
    comparison_columns,
    comparison_notes,
    comparison_rows,
)
from vfioproxy.trace.timeline.model import SessionTimeline
from vfioproxy.trace.timeline.spans import server_spans
from vfioproxy.trace.timeline.steps import STEP_INFO
from vfioproxy.trace.timeline.table import (
    STEP_COLUMNS,
    session_notes,
    session_span_ns,
    session_start_ns,
    session_title,
    step_rows,
)

__all__ = ["html_page", "write_html"]

#: how many leading columns of a table are text (the rest are numbers)
TEXT_COLUMNS = 2


def _asset(name: str) -> str:
    return importlib.resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def _table(columns: Sequence[str], rows: Sequence[Sequence[str]], css_id: str) -> str:
    def cells(tag: str, values: Sequence[str]) -> str:
        return "".join(
            f'<{tag}{" class=text" if i < TEXT_COLUMNS else ""}>{html.escape(v)}</{tag}>'
            for i, v in enumerate(values)
        )

    body = "".join(f"<tr>{cells('td', row)}</tr>" for row in rows)
    return (f'<table class="steps" id="{css_id}"><thead><tr>{cells("th", columns)}</tr>'
            f"</thead><tbody>{body}</tbody></table>")


def _notes(notes: Sequence[str]) -> str:
    return '<ul class="notes">' + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"


def _session_data(index: int, timeline: SessionTimeline) -> dict[str, Any]:
    """What the script draws: lanes, messages (ms from the session's start), spans."""
    lanes = [s.step for s in timeline.steps]
    lane_of = {step: i for i, step in enumerate(lanes)}
    start = session_start_ns(timeline)
    messages = [
        {"seq": m.seq, "t": (m.t_ns - start) / 1e6, "lane": lane_of[m.label.step],
         "dir": m.direction.value, "id": m.msg_id, "summary": m.summary,
         "label": m.label.text(), "certain": m.label.certain, "reason": m.label.reason}
        for m in timeline.messages if m.label.step in lane_of
    ]
    spans = [[lane_of[s.step], (s.start_ns - start) / 1e6, (s.end_ns - start) / 1e6]
             for s in server_spans(timeline.messages) if s.step in lane_of]
    info = [STEP_INFO.get(step) for step in lanes]
    return {
        "index": index,
        "title": session_title(timeline),
        "end": session_span_ns(timeline) / 1e6,
        "lanes": [{"step": step, "name": i.name if i else "", "function": i.function if i else ""}
                  for step, i in zip(lanes, info, strict=True)],
        "messages": messages,
        "spans": spans,
    }


def _script_json(value: object) -> str:
    """JSON safe inside a <script> element."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace(
        "&", "\\u0026")


def html_page(timelines: Sequence[SessionTimeline]) -> str:
    """The page of ``timelines`` (with the side by side when there are several)."""
    sections = []
    for index, timeline in enumerate(timelines):
        sections.append(
            f'<section class="session"><h2>{html.escape(session_title(timeline))}</h2>'
            f'<div class="holder" id="timeline-{index}"></div>'
            f"{_table(STEP_COLUMNS, step_rows(timeline), f'steps-{index}')}"
            f"{_notes(session_notes(timeline))}</section>"
        )
    if len(timelines) > 1:
        comparison = compare(timelines)
        sections.append(
            '<section class="compare"><h2>side by side (durations, Δ against #1)</h2>'
            f"{_table(comparison_columns(comparison), comparison_rows(comparison), 'compare')}"
            f"{_notes(comparison_notes(comparison))}</section>"
        )
    data = {"sessions": [_session_data(i, t) for i, t in enumerate(timelines)]}
    legend = ('<p class="legend"><span><i class="swatch" style="background:#1f77b4"></i>command'
              '</span><span><i class="swatch" style="background:#2ca02c"></i>reply</span>'
              '<span><i class="swatch" style="background:#f28e2b;opacity:.45"></i>a request '
              "outstanding at the server (the server's share)</span>"
              "<span>wheel: zoom, drag: pan, double click: all; hover a tick for the message"
              "</span></p>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>vfioproxy timeline</title>"
        f"<style>{_asset('html_page.css')}</style></head><body>"
        "<h1>vfioproxy trace timeline</h1>"
        f"{legend}{''.join(sections)}<div id=\"tip\"></div>"
        f'<script type="application/json" id="timeline-data">{_script_json(data)}</script>'
        f"<script>{_asset('html_page.js')}</script></body></html>\n"
    )


def write_html(timelines: Sequence[SessionTimeline], path: str | os.PathLike[str]) -> None:
    """Write the page of ``timelines`` to ``path``."""
    with open(path, "w", encoding="utf-8") as file:
        file.write(html_page(timelines))
