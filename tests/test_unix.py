import os
import socket
import stat

import pytest

from tests.conftest import FD_HYGIENE
from vfioproxy.transport import open_unix_fd_stream
from vfioproxy.unix import SocketPathError, open_unix_listener

pytestmark = FD_HYGIENE


async def test_listener_creates_the_socket_with_mode_0600_by_default(tmp_path):
    path = tmp_path / "s.sock"
    listener = await open_unix_listener(path)
    async with listener:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_ISSOCK(os.stat(path).st_mode)


async def test_listener_takes_another_mode(tmp_path):
    path = tmp_path / "s.sock"
    async with await open_unix_listener(path, mode=0o660):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660


async def test_a_stale_socket_is_replaced(tmp_path):
    path = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nothing listens
    async with await open_unix_listener(path) as listener:
        stream = await open_unix_fd_stream(path)
        accepted = await listener.accept()
        await accepted.aclose()
        await stream.aclose()


async def test_a_socket_something_listens_on_is_not_replaced(tmp_path):
    path = tmp_path / "s.sock"
    async with await open_unix_listener(path):
        with pytest.raises(SocketPathError, match="in use"):
            await open_unix_listener(path)


async def test_a_path_that_is_not_a_socket_is_never_removed(tmp_path):
    path = tmp_path / "important.txt"
    path.write_text("keep me")
    with pytest.raises(SocketPathError, match="not a socket"):
        await open_unix_listener(path)
    assert path.read_text() == "keep me"


async def test_the_socket_appears_only_once_it_listens(tmp_path, monkeypatch):
    path = tmp_path / "p.sock"
    seen = []
    real_rename = os.rename

    def rename(src, dst):
        # the moment the path appears: a client connecting now must get through
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(src)
            seen.append(dst)
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    listener = await open_unix_listener(path)
    async with listener:
        assert seen == [str(path)]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["p.sock"]  # no staging file left
        (await listener.accept()).socket.close()


async def test_a_path_too_long_for_a_staging_name_is_bound_in_place(tmp_path):
    path = tmp_path / ("s" * (107 - len(str(tmp_path)) - 1))
    assert len(str(path)) == 107
    async with await open_unix_listener(path):
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
