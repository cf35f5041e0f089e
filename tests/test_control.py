"""The control socket: JSON lines in, JSON lines out, bad requests answered clearly."""

import json
import socket

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import FD_HYGIENE
from vfioproxy.inject import Injector
from vfioproxy.proxy import Proxy
from vfioproxy.proxy.control import (
    MAX_DEPTH,
    MAX_REQUEST,
    ControlError,
    _Controller,
    control_request,
    parse_request,
    serve_control,
)

pytestmark = FD_HYGIENE


@pytest.fixture
async def control(nursery, tmp_path):
    injector = Injector(["c2s * delay 1ms"], seed=3)
    path = tmp_path / "ctl.sock"
    await nursery.start(serve_control, path, Proxy(tmp_path / "server.sock"), injector)
    return path, injector


async def ask(path, request):
    return await trio.to_thread.run_sync(control_request, path, request)


def talk(path, payload: bytes, replies: int):
    """Send ``payload`` on a new connection; the first ``replies`` reply lines, decoded."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(payload)
        data = b""
        while data.count(b"\n") < replies:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return [json.loads(line) for line in data.splitlines()]


async def raw_lines(path, payload: bytes, replies: int):
    return await trio.to_thread.run_sync(talk, path, payload, replies)


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


LIST = b'{"op": "list"}\n'

#: bad request lines and words their error names
BAD_LINES = [
    (b"\xff\xfe{\"op\": \"list\"}", ["not UTF-8", "0xff", "offset 0"]),
    (b'{"op": "list", "x": "\xc3"}', ["not UTF-8", "0xc3", "offset 21"]),
    (b"[" * 60_000, ["nested deeper than 32"]),
    (b'{"a": ' * 10_000, ["nested deeper than 32"]),
    (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), ["nested deeper than 32"]),
    (b'{"op": "remove", "id": 1e400}', ["1e400", "beyond a float's range"]),
    (b'{"op": "remove", "id": -1e400}', ["-1e400", "beyond a float's range"]),
    (b'{"op": "remove", "id": NaN}', ["NaN is not a JSON number"]),
    (b'{"op": "remove", "id": Infinity}', ["Infinity is not a JSON number"]),
    (b'{"op": "remove", "id": ' + b"9" * 5000 + b"}", ["integer of 5000 digits"]),
    (b'{"op": "remove", "id": 12345678901234567890123}', ["integer of 23 digits"]),
    (b"[]", ["JSON object", "list"]),
    (b'"list"', ["JSON object", "str"]),
    (b"3", ["JSON object", "int"]),
    (b"null", ["JSON object", "NoneType"]),
    (b'{"op": {"nested": [1, 2]}}', ["unknown op"]),
    (b'{"op": "' + b"x" * 50_000 + b'"}', ["unknown op", "more characters"]),
    (b'{"op": "add", "rule": "' + b"x" * 5000 + b'"}', ["rule text of 5000 characters"]),
    (b'{"op": "add", "rule": "c2s * delay pareto(1us,0.0001)"}', ["alpha", "0.1"]),
    (b'{"op": "add", "rule": 7}', ["add", "rule"]),
    (b'{"op": "list"', ["not JSON"]),
    (b'{"op": "list"}}', ["not JSON", "Extra data"]),
    (b"\x00\x01\x02", ["not JSON"]),
]


@pytest.mark.parametrize(("line", "words"), BAD_LINES)
async def test_a_bad_line_is_answered_in_one_line_and_the_connection_stays_usable(
    control, line, words
):
    path, _ = control
    replies = await raw_lines(path, line + b"\n" + LIST, 2)
    assert len(replies) == 2
    assert replies[0]["ok"] is False
    assert all(word in replies[0]["error"] for word in words), replies[0]["error"]
    assert len(replies[0]["error"]) < 1200
    assert replies[1]["ok"] is True and [r["id"] for r in replies[1]["rules"]] == [1]


async def test_every_bad_line_in_a_row_on_one_connection_gets_its_answer(control):
    path, injector = control
    payload = b"".join(line + b"\n" for line, _ in BAD_LINES) + LIST
    replies = await raw_lines(path, payload, len(BAD_LINES) + 1)
    assert [r["ok"] for r in replies] == [False] * len(BAD_LINES) + [True]
    assert [r.id for r in injector.rules] == [1]


def test_brackets_inside_strings_do_not_count_as_nesting():
    assert parse_request(b'{"op": "add", "rule": "[[[[{{{{' + b"[" * 100 + b'"}') == {
        "op": "add", "rule": "[[[[{{{{" + "[" * 100,
    }
    escaped = rb'{"s": "\"' + b"[" * 100 + rb'\\"}'  # the quote is escaped, the \ is not
    assert parse_request(escaped) == {"s": '"' + "[" * 100 + "\\"}
    deepest = parse_request(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH)
    for _ in range(MAX_DEPTH - 1):
        (deepest,) = deepest
    assert deepest == []
    with pytest.raises(ControlError, match="nested deeper"):
        parse_request(b'["]", ' + b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b"]")


async def test_a_megabyte_rule_is_refused_and_skipped_to_its_end(control):
    path, injector = control
    line = b'{"op": "add", "rule": "c2s * delay ' + b"x" * (1024 * 1024) + b'"}\n'
    replies = await raw_lines(path, line + LIST, 2)
    assert replies[0] == {"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"}
    assert replies[1]["ok"] is True
    assert [r.id for r in injector.rules] == [1]


async def test_a_line_just_over_the_limit_is_refused_even_when_whole(control):
    path, _ = control
    line = b'{"op": "list", "pad": "' + b"x" * MAX_REQUEST + b'"}\n'
    replies = await raw_lines(path, line + LIST, 2)
    assert replies[0]["error"] == f"request longer than {MAX_REQUEST} bytes"
    assert replies[1]["ok"] is True


async def test_bad_input_on_one_connection_ends_neither_the_server_nor_another(control):
    path, _ = control
    with socket.socket(socket.AF_UNIX) as bystander:
        bystander.settimeout(10)
        bystander.connect(str(path))
        garbage = b"".join(line + b"\n" for line, _ in BAD_LINES) + b"[" * 70_000
        await raw_lines(path, garbage, len(BAD_LINES) + 1)

        def leave_without_reading():
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(path))
                sock.sendall(LIST * 2000)  # replies nobody reads: their send fails

        await trio.to_thread.run_sync(leave_without_reading)
        await trio.sleep(0.05)
        bystander.sendall(LIST)
        reply = await trio.to_thread.run_sync(bystander.recv, 65536)
        assert json.loads(reply)["ok"] is True
    assert (await ask(path, {"op": "list"}))["ok"] is True


class FailingInjector(Injector):
    def statistics(self):
        raise RuntimeError("counters are gone")


async def test_an_internal_error_is_answered_and_the_connection_goes_on(nursery, tmp_path):
    path = tmp_path / "ctl.sock"
    await nursery.start(serve_control, path, Proxy(tmp_path / "s.sock"), FailingInjector())
    replies = await raw_lines(path, b'{"op": "stats"}\n' + LIST, 2)
    assert replies[0] == {"ok": False,
                          "error": "internal error: counters are gone"}
    assert replies[1]["ok"] is True


@settings(deadline=None, max_examples=300)
@given(st.one_of(
    st.binary(max_size=200),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda children: st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(["op", "rule", "id", "x"]), children, max_size=4),
        max_leaves=30,
    ).map(lambda value: json.dumps(value).encode()),
))
def test_any_line_gets_exactly_one_json_reply_line(line):
    controller = _Controller(Proxy("/nonexistent/server.sock"), Injector(seed=1))
    reply = controller.reply(line.replace(b"\n", b" "))
    assert reply.endswith(b"\n") and reply.count(b"\n") == 1
    answer = json.loads(reply)
    assert isinstance(answer["ok"], bool)
    if not answer["ok"]:
        assert "\n" not in answer["error"] and len(answer["error"]) < 1200
