"""What the proxy refuses: a server path that leads back to itself (at start and
at run time) and a server that is not there (warned at start, clients closed
cleanly). Real sockets, real fds, counted in /proc/self/fd."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import pytest
import trio

from recorder.reader import TraceReader
from recorder.records import EventRecord
from recorder.sink import TraceSink
from tests.conftest import FD_HYGIENE
from tests.test_proxy import Server, settle
from vfioproxy.cli import main
from vfioproxy.io.fds import count_open_fds
from vfioproxy.proxy import open_proxy
from vfioproxy.proxy.refusal import CLOSE_DRAIN, ProxyLoopError

pytestmark = FD_HYGIENE

VERSION_HEADER = bytes.fromhex("0000 0100 1000 0000 0000 0000 0000 0000")


def server_paths(tmp_path: Path) -> dict[str, str]:
    """Names for the server that all lead to the proxy's socket ``tmp_path/p.sock``."""
    (tmp_path / "sub").mkdir()
    os.symlink(tmp_path / "p.sock", tmp_path / "link.sock")  # dangling until the proxy binds
    os.symlink(tmp_path, tmp_path / "dir")
    return {
        "the same path": str(tmp_path / "p.sock"),
        "another spelling": str(tmp_path / "sub" / ".." / "p.sock"),
        "a symlink to it": str(tmp_path / "link.sock"),
        "a path through a symlinked directory": str(tmp_path / "dir" / "p.sock"),
    }


@pytest.mark.parametrize("how", ["the same path", "another spelling", "a symlink to it",
                                 "a path through a symlinked directory"])
async def test_a_server_path_leading_to_the_listening_socket_is_refused_at_start(tmp_path, how):
    server = server_paths(tmp_path)[how]
    with pytest.raises(ProxyLoopError, match="this proxy's own --listen socket"):
        async with open_proxy(tmp_path / "p.sock", server):
            pytest.fail("the proxy started")
    assert not (tmp_path / "p.sock").exists()  # nothing left listening


@pytest.mark.parametrize("command", ["proxy", "record"])
def test_the_cli_refuses_a_proxy_to_itself_in_one_line_with_exit_2_and_keeps_the_trace(
    tmp_path, capsys, command
):
    listen = str(tmp_path / "p.sock")
    old = tmp_path / "old.trace"
    old.write_bytes(b"an earlier recording")
    extra = ["-o", str(old), "--force"] if command == "record" else []
    assert main([command, "--listen", listen, "--server", str(tmp_path / "p.sock"),
                 *extra]) == 2
    assert capsys.readouterr().err == (
        f"vfioproxy {command}: --server {listen} is this proxy's own --listen socket {listen}: "
        "every session would connect to the proxy itself\n")
    assert old.read_bytes() == b"an earlier recording"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.trace"]


def records(path):
    with TraceReader(path) as reader:
        return list(reader)


@pytest.mark.parametrize("link", [os.symlink, os.link])
async def test_a_server_path_leading_back_later_refuses_each_session_without_a_storm(
    tmp_path, caplog, link
):
    caplog.set_level(logging.WARNING, "vfioproxy.proxy")
    trace = tmp_path / "t.trace"
    sink = TraceSink(trace)
    async with open_proxy(tmp_path / "p.sock", tmp_path / "s.sock", sink=sink) as proxy:
        link(tmp_path / "p.sock", tmp_path / "s.sock")  # a symlink, or another name of it
        for n in (1, 2, 3):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.connect(os.fspath(tmp_path / "p.sock"))
            client.sendall(VERSION_HEADER)
            await trio.lowlevel.wait_readable(client)
            assert client.recv(16) == b""  # EOF: closed cleanly, not reset
            client.close()
            await settle(proxy, n)
            assert proxy.statistics().sessions_total == n  # one session per client, no more
            if n == 1:
                fds = count_open_fds()  # the listener and the trace
            assert count_open_fds() == fds  # no fd held for a refused session
    sink.close()
    refusals = [r for r in caplog.records if "leads back" in r.getMessage()]
    assert len(refusals) == 1  # logged once
    assert refusals[0].getMessage() == (
        f"session 1: the server path {tmp_path / 's.sock'} leads back to this proxy's own "
        "listening socket: refused (so is every such session, logged only in the trace); "
        "closing the client")
    closes = [r.data["reason"] for r in records(trace)
              if isinstance(r, EventRecord) and r.kind == "session_close"]
    assert closes == ["server path leads back to the proxy"] * 3


async def test_a_missing_server_is_warned_about_and_its_clients_closed_cleanly_until_it_comes(
    tmp_path, caplog, nursery
):
    caplog.set_level(logging.WARNING, "vfioproxy.proxy")
    server = Server(tmp_path / "s.sock")
    async with open_proxy(tmp_path / "p.sock", server.path) as proxy:
        assert [r.getMessage() for r in caplog.records] == [
            f"warning: the server {server.path} does not exist (yet): serving anyway; until "
            "it listens, each client is told so in this log and closed"]
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(os.fspath(tmp_path / "p.sock"))
        client.sendall(VERSION_HEADER)
        await trio.lowlevel.wait_readable(client)
        assert client.recv(16) == b""  # EOF, where a close with unread bytes resets
        client.close()
        await settle(proxy)
        assert caplog.records[-1].getMessage() == (
            f"session 1: cannot connect to the server {server.path}: No such file or "
            "directory; closing the client")
        await nursery.start(server.serve)  # the server comes up: the proxy serves it
        stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stream.connect(os.fspath(tmp_path / "p.sock"))
        with trio.fail_after(5):
            while not server.endpoints:
                await trio.sleep(0.001)
        stream.close()
        await settle(proxy, 2)
    nursery.cancel_scope.cancel()


@pytest.mark.parametrize("what", ["a regular file", "a socket nothing listens on"])
async def test_a_server_path_that_cannot_accept_is_named_in_the_warning(tmp_path, caplog, what):
    caplog.set_level(logging.WARNING, "vfioproxy.proxy")
    path = tmp_path / "s.sock"
    if what == "a regular file":
        path.write_text("")
    else:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bound:
            bound.bind(os.fspath(path))
    async with open_proxy(tmp_path / "p.sock", path):
        pass
    said = "is not a socket" if what == "a regular file" else "is a socket nothing listens on"
    assert [r.getMessage() for r in caplog.records] == [
        f"warning: the server {path} {said} (yet): serving anyway; until it listens, each "
        "client is told so in this log and closed"]


async def test_a_refused_client_that_never_closes_is_let_go_after_the_drain_time(
    tmp_path, autojump_clock
):
    async with open_proxy(tmp_path / "p.sock", tmp_path / "nobody.sock") as proxy:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(os.fspath(tmp_path / "p.sock"))
        client.sendall(VERSION_HEADER)
        start = trio.current_time()
        while proxy.statistics().sessions_total < 1:
            await trio.sleep(0.001)
        await proxy.wait_sessions()  # the client never closed: the proxy let it go
        assert trio.current_time() - start == pytest.approx(CLOSE_DRAIN, abs=0.01)
        assert client.recv(16) == b""
        client.close()
