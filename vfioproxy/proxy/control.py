"""The proxy's control socket: list, add and remove injection rules at runtime.

Protocol: JSON lines over a UNIX stream socket, one request object per line,
one reply object per line, as many as the client likes on one connection::

    {"op": "list"}                       -> {"ok": true, "seed": 0, "rules": [...]}
    {"op": "add", "rule": "c2s * delay 1ms"}  -> {"ok": true, "rule": {...}}
    {"op": "remove", "id": 3}            -> {"ok": true, "rule": {...}}
    {"op": "stats"}                      -> {"ok": true, "proxy": {...}, "inject": {...}}

A request that cannot be carried out gets ``{"ok": false, "error": "..."}``
naming what was wrong in one line, and the connection stays usable: a line
that is not UTF-8, not JSON, nested deeper than :data:`MAX_DEPTH`, holds a
number beyond a float's range or an integer of more than
:data:`MAX_INTEGER_DIGITS` digits, is no object, names an unknown op, or
carries a rule text longer than :data:`MAX_RULE_TEXT`. A line longer than
:data:`MAX_REQUEST` is refused without being read further: the bytes up to
its end are skipped. One connection's input never ends the control server or
another connection. Every change is recorded in the trace (event
``rules_changed``), so a recording says which rules held when.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import socket
from typing import Any

import attrs
import trio

from vfioproxy.errors import VfioProxyError, os_reason
from vfioproxy.inject import InjectError, Injector, Rule
from vfioproxy.io.unix import open_unix_listener
from vfioproxy.proxy.core import Proxy

__all__ = ["ControlError", "control_request", "parse_request", "serve_control"]

#: a request line longer than this is refused, and skipped up to its end
MAX_REQUEST = 64 * 1024
#: the deepest nesting of arrays and objects a request may have
MAX_DEPTH = 32
#: the most digits an integer in a request may have
MAX_INTEGER_DIGITS = 20
#: the longest rule text "add" takes, in characters
MAX_RULE_TEXT = 4096
#: error texts in replies are cut to this many characters
MAX_ERROR = 1000

_log = logging.getLogger(__name__)


class ControlError(VfioProxyError):
    """The control socket refused a request, or could not be reached."""


def _rule_json(rule: Rule) -> dict[str, Any]:
    return {**rule.to_dict(), "id": rule.id, "text": rule.text}


#: what the nesting scan looks at: an escape pair (inside strings), a quote, a bracket
_STRUCTURE = re.compile(rb'\\.|["\[\]{}]', re.DOTALL)


def _check_depth(line: bytes) -> None:
    """Refuse arrays and objects nested deeper than :data:`MAX_DEPTH`, before parsing.

    Brackets inside strings do not count; the scan is linear in the line.
    """
    depth = 0
    in_string = False
    for token in _STRUCTURE.finditer(line):
        char = token.group()
        if char == b'"':
            in_string = not in_string
        elif in_string or len(char) > 1:
            continue
        elif char in b"[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise ControlError(
                    f"request nested deeper than {MAX_DEPTH} arrays or objects "
                    f"(at byte {token.start()})"
                )
        else:
            depth -= 1


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ControlError(f"number {_cut(text, 40)} is beyond a float's range")
    return value


def _short_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INTEGER_DIGITS:
        raise ControlError(
            f"integer of {digits} digits (at most {MAX_INTEGER_DIGITS}): {_cut(text, 40)}"
        )
    return int(text)


def _no_constant(text: str) -> Any:
    raise ControlError(f"{text} is not a JSON number")


def _cut(text: str, limit: int) -> str:
    """``text`` on one line and at most about ``limit`` characters."""
    text = text.replace("\r", " ").replace("\n", " ")
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def parse_request(line: bytes) -> Any:
    """The JSON value of one request line; :class:`ControlError` saying what is wrong."""
    if len(line) > MAX_REQUEST:
        raise ControlError(f"request longer than {MAX_REQUEST} bytes")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ControlError(
            f"request is not UTF-8: byte {line[exc.start]:#04x} at offset {exc.start}"
        ) from None
    _check_depth(line)
    try:
        return json.loads(
            text, parse_float=_finite_float, parse_int=_short_int, parse_constant=_no_constant
        )
    except json.JSONDecodeError as exc:
        raise ControlError(f"not JSON: {exc}") from None
    except (ValueError, RecursionError) as exc:  # beyond what the checks above foresee
        raise ControlError(f"not JSON: {exc}") from None


class _Controller:
    def __init__(self, proxy: Proxy, injector: Injector) -> None:
        self.proxy = proxy
        self.injector = injector

    def handle(self, request: Any) -> dict[str, Any]:
        if not isinstance(request, dict):
            raise ControlError(f"a request is a JSON object, got {type(request).__name__}")
        op = request.get("op")
        if op == "list":
            return {"seed": self.injector.seed,
                    "rules": [_rule_json(r) for r in self.injector.rules]}
        if op == "add":
            text = request.get("rule")
            if not isinstance(text, str):
                raise ControlError('"add" needs "rule": the rule text')
            if len(text) > MAX_RULE_TEXT:
                raise ControlError(
                    f'"add": a rule text of {len(text)} characters (at most {MAX_RULE_TEXT})'
                )
            rule = self.injector.add(text)
            self.proxy.record_event("rules_changed", {"added": _rule_json(rule)})
            return {"rule": _rule_json(rule)}
        if op == "remove":
            rule_id = request.get("id")
            if not isinstance(rule_id, int) or isinstance(rule_id, bool):
                raise ControlError('"remove" needs "id": a rule id (see "list")')
            rule = self.injector.remove(rule_id)
            self.proxy.record_event("rules_changed", {"removed": _rule_json(rule)})
            return {"rule": _rule_json(rule)}
        if op == "stats":
            return {"proxy": attrs.asdict(self.proxy.statistics()),
                    "inject": self.injector.statistics().to_dict()}
        shown = _cut(repr(op), 80)
        raise ControlError(f"unknown op {shown}: one of list, add, remove, stats")

    def reply(self, line: bytes) -> bytes:
        """The reply line to one request line; never raises."""
        try:
            answer = {"ok": True, **self.handle(parse_request(line))}
        except (ControlError, InjectError) as exc:
            answer = {"ok": False, "error": _cut(str(exc), MAX_ERROR)}
        except Exception as exc:
            _log.exception("control request failed")
            answer = {"ok": False,
                      "error": _cut(f"internal error: {exc or 'see the proxy log'}", MAX_ERROR)}
        return json.dumps(answer).encode() + b"\n"


async def _serve_connection(stream: trio.SocketStream, controller: _Controller) -> None:
    """Answer the requests of one connection until its client closes it.

    A line longer than :data:`MAX_REQUEST` is answered when it passes the
    limit and then skipped up to its newline. A client that goes away, even
    in the middle of a reply, just ends this connection. Cancellation closes
    the connection.
    """
    async with stream:
        try:
            await _answer_lines(stream, controller)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:  # a bug here must not end the server and its other connections
            _log.exception("control connection failed")


async def _answer_lines(stream: trio.SocketStream, controller: _Controller) -> None:
    """Read request lines until EOF and answer each; cancelled, it stops where it waits."""
    pending = b""
    skipping = False
    while chunk := await stream.receive_some(65536):
        if skipping:
            end = chunk.find(b"\n")
            if end < 0:
                continue
            chunk, skipping = chunk[end + 1 :], False
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.strip():
                await stream.send_all(controller.reply(line))
        if len(pending) > MAX_REQUEST:
            await stream.send_all(controller.reply(pending))
            pending, skipping = b"", True


async def serve_control(
    path: str | os.PathLike[str],
    proxy: Proxy,
    injector: Injector,
    *,
    mode: int = 0o600,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control socket at ``path`` until cancelled (then it is removed).

    Each connection is served on its own; whatever one sends ends neither
    the server nor the others. On cancellation every connection is closed
    and the socket file removed.
    """
    listener = await open_unix_listener(path, mode=mode)
    controller = _Controller(proxy, injector)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            await trio.serve_listeners(
                functools.partial(_serve_connection, controller=controller), [listener],
                handler_nursery=nursery,
            )
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def control_request(path: str | os.PathLike[str], request: dict[str, Any],
                    timeout: float = 5.0) -> dict[str, Any]:
    """Send one request to a proxy's control socket and return its reply (blocking).

    Raises :class:`ControlError` when the socket cannot be reached or answers
    ``ok: false``.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(path))
            sock.sendall(json.dumps(request).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise ControlError(f"{path}: the proxy closed the control connection")
                data += chunk
        except OSError as exc:
            raise ControlError(
                f"cannot talk to the control socket {os.fspath(path)}: {os_reason(exc)}"
            ) from exc
    try:
        answer = json.loads(data)
    except ValueError as exc:
        raise ControlError(f"{path}: the proxy's answer is not JSON: {exc}") from None
    if not isinstance(answer, dict):
        raise ControlError(f"{path}: the proxy's answer is not a JSON object")
    if not answer.get("ok"):
        raise ControlError(str(answer.get("error")))
    return answer
