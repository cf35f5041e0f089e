import os
import socket
import stat

import pytest

from tests.conftest import FD_HYGIENE
from vfioproxy.io.transport import open_unix_fd_stream
from vfioproxy.io.unix import SocketPathError, is_listening, open_unix_listener

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


async def test_is_listening_tells_a_bound_socket_from_a_listening_one(tmp_path):
    path = tmp_path / "s.sock"
    bound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        bound.bind(str(path))
        assert not is_listening(path)
        bound.listen(1)
        assert is_listening(path)
    finally:
        bound.close()
    assert not is_listening(tmp_path / "nothing.sock")
