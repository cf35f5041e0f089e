"""The proxy's control socket: list, add and remove injection rules at runtime.

Protocol: JSON lines over a UNIX stream socket, one request object per line,
one reply object per line, as many as the client likes on one connection::

    {"op": "list"}                       -> {"ok": true, "seed": 0, "rules": [...]}
    {"op": "add", "rule": "c2s * delay 1ms"}  -> {"ok": true, "rule": {...}}
    {"op": "remove", "id": 3}            -> {"ok": true, "rule": {...}}
    {"op": "stats"}                      -> {"ok": true, "proxy": {...}, "inject": {...}}

A request that cannot be carried out gets ``{"ok": false, "error": "..."}``
naming what was wrong; the connection stays usable. Every change is recorded
in the trace (event ``rules_changed``), so a recording says which rules held
when.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
from typing import Any

import attrs
import trio

from vfioproxy.errors import VfioProxyError
from vfioproxy.inject import InjectError, Injector, Rule
from vfioproxy.proxy import Proxy
from vfioproxy.unix import open_unix_listener

__all__ = ["ControlError", "control_request", "serve_control"]

#: a request line longer than this is refused (and the connection closed)
MAX_REQUEST = 64 * 1024


class ControlError(VfioProxyError):
    """The control socket refused a request, or could not be reached."""


def _rule_json(rule: Rule) -> dict[str, Any]:
    return {**rule.to_dict(), "id": rule.id, "text": rule.text}


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
        raise ControlError(f"unknown op {op!r}: one of list, add, remove, stats")

    def reply(self, line: bytes) -> bytes:
        try:
            answer = {"ok": True, **self.handle(json.loads(line))}
        except json.JSONDecodeError as exc:
            answer = {"ok": False, "error": f"not JSON: {exc}"}
        except (ControlError, InjectError) as exc:
            answer = {"ok": False, "error": str(exc)}
        return json.dumps(answer).encode() + b"\n"


async def _serve_connection(stream: trio.SocketStream, controller: _Controller) -> None:
    async with stream:
        pending = b""
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return
            if not chunk:
                return
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.strip():
                    await stream.send_all(controller.reply(line))
            if len(pending) > MAX_REQUEST:
                await stream.send_all(json.dumps(
                    {"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"}
                ).encode() + b"\n")
                return


async def serve_control(
    path: str | os.PathLike[str],
    proxy: Proxy,
    injector: Injector,
    *,
    mode: int = 0o600,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control socket at ``path`` until cancelled (then it is removed)."""
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
            raise ControlError(f"cannot talk to the control socket {path}: {exc}") from exc
    answer: dict[str, Any] = json.loads(data)
    if not answer.get("ok"):
        raise ControlError(str(answer.get("error")))
    return answer
