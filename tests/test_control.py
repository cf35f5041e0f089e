"""The control socket: JSON lines in, JSON lines out, bad requests answered clearly."""

import json
import socket

import pytest
import trio

from tests.conftest import FD_HYGIENE
from vfioproxy.control import ControlError, control_request, serve_control
from vfioproxy.inject import Injector
from vfioproxy.proxy import Proxy

pytestmark = FD_HYGIENE


@pytest.fixture
async def control(nursery, tmp_path):
    injector = Injector(["c2s * delay 1ms"], seed=3)
    path = tmp_path / "ctl.sock"
    await nursery.start(serve_control, path, Proxy(tmp_path / "server.sock"), injector)
    return path, injector


async def ask(path, request):
    return await trio.to_thread.run_sync(control_request, path, request)


async def raw_lines(path, payload: bytes, replies: int):
    def talk():
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            sock.sendall(payload)
            data = b""
            while data.count(b"\n") < replies:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            return [json.loads(line) for line in data.splitlines()]

    return await trio.to_thread.run_sync(talk)


async def test_list_add_remove_and_stats(control):
    path, injector = control
    listed = await ask(path, {"op": "list"})
    assert listed["seed"] == 3 and [r["id"] for r in listed["rules"]] == [1]
    added = await ask(path, {"op": "add", "rule": "s2c DEVICE_RESET error EIO"})
    assert added["rule"]["id"] == 2 and [r.id for r in injector.rules] == [1, 2]
    removed = await ask(path, {"op": "remove", "id": 1})
    assert removed["rule"]["text"] == "c2s * delay 1ms"
    stats = await ask(path, {"op": "stats"})
    assert stats["proxy"]["sessions_total"] == 0
    assert [r["rule_id"] for r in stats["inject"]["rules"]] == [2]


@pytest.mark.parametrize("request_, words", [
    ({"op": "frobnicate"}, ["unknown op", "frobnicate"]),
    ({"op": "add"}, ["add", "rule"]),
    ({"op": "add", "rule": "c2s * delay 1parsec"}, ["parsec"]),
    ({"op": "remove", "id": "1"}, ["remove", "id"]),
    ({"op": "remove", "id": 99}, ["no rule with id 99"]),
    (["op", "list"], ["JSON object"]),
])
async def test_bad_requests_are_answered_with_what_was_wrong(control, request_, words):
    path, _ = control
    with pytest.raises(ControlError) as info:
        await ask(path, request_)
    assert all(word in str(info.value) for word in words)


async def test_a_connection_survives_bad_lines(control):
    path, _ = control
    replies = await raw_lines(path, b'not json\n\n{"op": "list"}\n', 2)
    assert replies[0]["ok"] is False and "not JSON" in replies[0]["error"]
    assert replies[1]["ok"] is True


async def test_an_endless_line_is_refused(control):
    path, _ = control
    replies = await raw_lines(path, b"x" * (70 * 1024), 1)
    assert replies == [{"ok": False, "error": "request longer than 65536 bytes"}]


async def test_the_socket_is_removed_when_the_control_ends(tmp_path):
    path = tmp_path / "ctl.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, Proxy(tmp_path / "s.sock"), Injector())
        assert path.exists()
        nursery.cancel_scope.cancel()
    assert not path.exists()
