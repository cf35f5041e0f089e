"""``vfioproxy trace export``: a trace as data, for jq, pandas and spreadsheets.

Three formats, one set of names: the fields of the display filter
(:data:`~vfioproxy.trace.filter.FIELDS`), written by
:func:`~vfioproxy.trace.filter.values`.

- ``jsonl``: ``trace show --json``'s object per record, each message's with
  a ``fields`` object (:func:`write_jsonl`);
- ``pairs``: one object per request with its reply (:func:`pair_objects`);
- ``csv``: one row per message, a column per field (:func:`write_csv`).

Sans-IO apart from the text stream :func:`write_csv` writes to.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

import attrs

from recorder.records import EventRecord
from vfioproxy.protocol.pairing import MAX_OUTSTANDING
from vfioproxy.trace.decoded import DecodedItem, DecodedMessage, SessionNotice
from vfioproxy.trace.filter import FIELDS, Facts, Filter, values
from vfioproxy.trace.show import json_object, write_json

__all__ = ["CSV_COLUMNS", "CSV_DATA_MAX", "FORMATS", "cell", "message_object", "pair_objects",
           "write_csv", "write_jsonl", "write_pairs"]

FORMATS = ("jsonl", "pairs", "csv", "parquet", "pcapng")

#: the CSV header: every filter field, then the one-line summary
CSV_COLUMNS: tuple[str, ...] = (*(spec.name for spec in FIELDS), "summary")

#: the most data bytes a CSV cell holds in hex: a spreadsheet cell holds at most
#: 32767 characters (and Python's csv reader 131072 by default)
CSV_DATA_MAX = 16383

Selected = Iterable[tuple[DecodedItem, Facts | None]]


def message_object(item: DecodedItem, facts: Facts | None) -> dict[str, Any]:
    """``trace show --json``'s object of ``item``, with a ``fields`` object
    (every filter field by name) when it is a decoded message."""
    obj = json_object(item)
    if facts is not None:
        obj["fields"] = values(facts, raw_bytes=True)  # write_json writes bytes in hex
    return obj


def write_jsonl(selected: Selected, out: TextIO) -> None:
    """One JSON object per record (:func:`message_object`) to ``out``: ``trace
    show --json`` and ``trace export --format jsonl``."""
    write_json((message_object(item, facts) for item, facts in selected), out)


def write_pairs(selected: Selected, out: TextIO, flt: Filter | None = None,
                limit: int | None = None) -> None:
    """:func:`pair_objects` to ``out``, one JSON object a line."""
    write_json(pair_objects(selected, flt, limit), out)


@attrs.define
class _Waiting:
    """A request waiting for its reply, and whether the filter passed it."""

    obj: dict[str, Any]
    passed: bool
    #: the request's message, kept alive while it waits: its id() is the key
    message: object = None


def pair_objects(selected: Selected, flt: Filter | None = None,
                 limit: int | None = None) -> Iterator[dict[str, Any]]:
    """One object per request with its reply, from every decoded message of
    ``selected`` (unfiltered: a reply is paired with its request even when the
    filter passes only one of them).

    A pair is ``{"session", "dir", "command", "msg_id", "latency", "request",
    "reply"}``: ``dir`` the request's direction, ``latency`` the reply's, in
    microseconds; ``request`` and ``reply`` are :func:`message_object`\\ s.
    A pair is emitted when its reply arrives; a command that wants no reply
    at once with ``"reply": null``; requests still unanswered when their
    session closes (or the trace ends) then, with ``"reply": null``; a reply
    to no request as ``"request": null``. ``flt`` keeps the pairs either of
    whose messages it passes; ``limit`` stops after that many pairs. Memory:
    the requests waiting (at most :data:`MAX_OUTSTANDING` per session, as
    the session state keeps; older ones are emitted unanswered), of the
    sessions the reader decodes at once (a session it drops from its window,
    :class:`SessionNotice` ``evicted``, has its waiting requests emitted
    unanswered then).
    """
    if limit is not None and limit <= 0:
        return
    #: per session, the requests waiting, by the identity of their decoded message
    waiting: dict[int, dict[int, _Waiting]] = {}
    emitted = 0
    for item, facts in selected:
        pairs: list[tuple[dict[str, Any], bool]] = []
        if isinstance(item, DecodedMessage) and facts is not None:
            passed = flt is None or flt.test(facts)
            obj = message_object(item, facts)
            session = waiting.setdefault(item.record.session, {})
            header = item.observation.message.header
            request = item.observation.request
            if header.is_command and not header.no_reply:
                session[id(item.observation.message)] = _Waiting(
                    obj, passed, item.observation.message)
                if len(session) > MAX_OUTSTANDING:
                    oldest = next(iter(session))
                    pairs.append(_pair(session.pop(oldest), None, False))
            elif header.is_command:
                pairs.append(_pair(_Waiting(obj, passed), None, False))
            else:
                found = None if request is None else session.pop(id(request), None)
                pairs.append(_pair(found, obj, passed))
        elif ((isinstance(item, EventRecord) and item.kind == "session_close"
               and item.session is not None)
              or (isinstance(item, SessionNotice) and item.kind == "evicted")):
            # a closed session's requests will not be answered; an evicted one's
            # answers will not be paired (its decoding starts afresh)
            assert item.session is not None
            pairs.extend(_pair(w, None, False) for w in waiting.pop(item.session, {}).values())
        for pair, keep in pairs:
            if keep:
                yield pair
                emitted += 1
                if emitted == limit:
                    return
    for session in waiting.values():
        for w in session.values():
            pair, keep = _pair(w, None, False)
            if keep:
                yield pair
                emitted += 1
                if emitted == limit:
                    return


def _pair(request: _Waiting | None, reply: dict[str, Any] | None,
          reply_passed: bool) -> tuple[dict[str, Any], bool]:
    """The pair object of ``request`` and ``reply``, and whether it is kept."""
    first = request.obj if request is not None else reply
    assert first is not None
    fields = first["fields"]
    latency = None if reply is None else reply["fields"]["latency"]
    pair = {
        "session": fields["session"],
        "dir": fields["dir"],
        "command": fields["command"],
        "msg_id": fields["msg_id"],
        "latency": latency,
        "request": None if request is None else request.obj,
        "reply": reply,
    }
    return pair, reply_passed or (request is not None and request.passed)


def write_csv(selected: Selected, out: TextIO) -> int:
    """One row per decoded message of ``selected`` under a header row of
    :data:`CSV_COLUMNS`: empty for what a message lacks, ``true``/``false``,
    fd kinds space-separated, bytes in hex (``data`` longer than
    :data:`CSV_DATA_MAX` bytes cut there, ending ``...``). Returns the rows
    written."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    rows = 0
    for item, facts in selected:
        if not isinstance(item, DecodedMessage) or facts is None:
            continue
        row = values(facts, raw_bytes=True)
        data = row["data"]
        if data is not None:
            cut = len(data) > CSV_DATA_MAX
            row["data"] = data[:CSV_DATA_MAX].hex() + "..." * cut
        writer.writerow([*(cell(row[spec.name]) for spec in FIELDS), item.text])
        rows += 1
    return rows


def cell(value: Any) -> str:
    """A plain value as one CSV (or table) cell: empty for None, ``true`` /
    ``false``, lists space-separated, maps as JSON, the rest as text."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return " ".join(cell(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)
