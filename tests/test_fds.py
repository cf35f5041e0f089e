"""OwnedFd ownership rules and fd inspection, on real memfds, eventfds, sockets and files."""

from __future__ import annotations

import fcntl
import gc
import os
import socket
from pathlib import Path

import pytest

from tests.conftest import FD_HYGIENE
from vfioproxy.io.fds import (
    FdInfo,
    FdKind,
    OwnedFd,
    count_open_fds,
    inspect_fd,
    make_eventfd,
    make_memfd,
    read_fd_contents,
)

pytestmark = FD_HYGIENE


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_owned_fd_closes_exactly_once() -> None:
    r, w = os.pipe()
    owned = OwnedFd(r)
    owned.close()
    assert owned.closed
    reused = os.dup(w)  # the kernel hands out the lowest free number: r's
    try:
        owned.close()
        assert _is_open(reused), "a second close() closed someone else's fd"
    finally:
        os.close(reused)
        os.close(w)


def test_owned_fd_as_context_manager_closes_on_exit() -> None:
    with make_eventfd() as owned:
        fd = owned.fileno()
        assert _is_open(fd)
    assert owned.closed
    assert not _is_open(fd)


def test_fileno_of_a_closed_owned_fd_raises() -> None:
    owned = make_eventfd()
    owned.close()
    with pytest.raises(ValueError, match="closed"):
        owned.fileno()


def test_detach_gives_up_ownership_and_leaves_the_fd_open() -> None:
    owned = make_eventfd()
    fd = owned.detach()
    assert owned.closed
    owned.close()
    assert _is_open(fd)
    os.close(fd)


def test_dup_returns_an_independent_owner_of_the_same_file() -> None:
    with make_memfd("dup-me", 4096) as original:
        copy = original.dup()
        assert copy.fileno() != original.fileno()
        assert inspect_fd(copy).inode == inspect_fd(original).inode
        assert os.get_inheritable(copy.fileno()) is False
        copy.close()
        assert _is_open(original.fileno())


def test_owned_fd_collected_while_open_closes_its_fd_and_warns() -> None:
    owned = make_eventfd()
    fd = owned.fileno()
    with pytest.warns(ResourceWarning, match="unclosed <OwnedFd fd="):
        del owned
        gc.collect()
    assert not _is_open(fd)


def test_owned_fd_refuses_a_negative_number() -> None:
    with pytest.raises(ValueError):
        OwnedFd(-1)


def test_owned_fd_repr_shows_the_number_or_that_it_is_closed() -> None:
    owned = make_eventfd()
    assert repr(owned) == f"<OwnedFd fd={owned.fileno()}>"
    owned.close()
    assert repr(owned) == "<OwnedFd closed>"


def test_fd_kind_values_are_the_trace_file_strings() -> None:
    assert [k.value for k in FdKind] == ["memfd", "eventfd", "socket", "file", "other"]


def test_inspect_fd_reports_a_memfd_with_its_size_and_seals() -> None:
    seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
    with make_memfd("guest-ram", 2 * 4096, seals=seals) as memfd:
        info = inspect_fd(memfd)
        assert info.kind is FdKind.MEMFD
        assert info.size == 2 * 4096
        assert info.seals == seals
        assert info.target == "/memfd:guest-ram (deleted)"
        assert info.flags & os.O_ACCMODE == os.O_RDWR
        assert info.inode == os.fstat(memfd.fileno()).st_ino


def test_inspect_fd_reports_no_seals_on_a_fresh_sealable_memfd() -> None:
    with make_memfd("plain") as memfd:
        assert inspect_fd(memfd).seals == 0
        assert inspect_fd(memfd).size == 0


def test_inspect_fd_reports_an_eventfd_without_size_or_seals() -> None:
    with make_eventfd(nonblocking=True) as efd:
        info = inspect_fd(efd)
    assert info.kind is FdKind.EVENTFD
    assert info.target == "anon_inode:[eventfd]"
    assert info.size is None
    assert info.seals is None
    assert info.flags & os.O_NONBLOCK


def test_inspect_fd_reports_a_blocking_eventfd_flags() -> None:
    with make_eventfd(nonblocking=False) as efd:
        assert not inspect_fd(efd).flags & os.O_NONBLOCK


def test_inspect_fd_reports_a_socket() -> None:
    a, b = socket.socketpair()
    with a, b:
        info = inspect_fd(a.fileno())
    assert info.kind is FdKind.SOCKET
    assert info.target.startswith("socket:[")
    assert info.size is None
    assert info.seals is None


def test_inspect_fd_reports_a_regular_file_with_its_size(tmp_path: Path) -> None:
    path = tmp_path / "region.bin"
    path.write_bytes(b"x" * 1000)
    with OwnedFd(os.open(path, os.O_RDONLY | os.O_CLOEXEC)) as fd:
        info = inspect_fd(fd)
    assert info == FdInfo(
        kind=FdKind.FILE,
        size=1000,
        flags=info.flags,
        seals=None,
        inode=path.stat().st_ino,
        target=str(path),
    )
    assert info.flags & os.O_ACCMODE == os.O_RDONLY


def test_inspect_fd_reports_a_pipe_as_other() -> None:
    r, w = os.pipe()
    with OwnedFd(r), OwnedFd(w):
        info = inspect_fd(r)
    assert info.kind is FdKind.OTHER
    assert info.target.startswith("pipe:[")
    assert info.size is None


def test_read_fd_contents_returns_memfd_bytes_without_moving_the_offset() -> None:
    with make_memfd("small", data=b"hello vfio-user") as memfd:
        os.lseek(memfd.fileno(), 6, os.SEEK_SET)
        assert read_fd_contents(memfd, limit=4096) == b"hello vfio-user"
        assert os.lseek(memfd.fileno(), 0, os.SEEK_CUR) == 6


def test_read_fd_contents_includes_the_zero_filled_tail_of_a_memfd() -> None:
    with make_memfd("tail", size=8, data=b"ab") as memfd:
        assert read_fd_contents(memfd.fileno(), limit=8) == b"ab" + bytes(6)


def test_read_fd_contents_returns_none_above_the_limit() -> None:
    with make_memfd("big", size=4097) as memfd:
        assert read_fd_contents(memfd, limit=4096) is None


def test_read_fd_contents_reads_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"file contents")
    with OwnedFd(os.open(path, os.O_RDONLY | os.O_CLOEXEC)) as fd:
        assert read_fd_contents(fd, limit=100) == b"file contents"


def test_read_fd_contents_returns_none_for_a_write_only_file(tmp_path: Path) -> None:
    path = tmp_path / "w"
    path.write_bytes(b"secret")
    with OwnedFd(os.open(path, os.O_WRONLY | os.O_CLOEXEC)) as fd:
        assert read_fd_contents(fd, limit=100) is None


def test_read_fd_contents_returns_none_for_an_eventfd() -> None:
    with make_eventfd(5) as efd:
        assert read_fd_contents(efd, limit=100) is None
        assert os.eventfd_read(efd.fileno()) == 5, "the counter must not have been consumed"


def test_make_memfd_writes_data_and_leaves_the_offset_at_zero() -> None:
    with make_memfd("data", data=b"abc") as memfd:
        assert os.lseek(memfd.fileno(), 0, os.SEEK_CUR) == 0
        assert os.read(memfd.fileno(), 10) == b"abc"
        assert os.get_inheritable(memfd.fileno()) is False


def test_make_eventfd_starts_at_initval() -> None:
    with make_eventfd(3) as efd:
        assert os.eventfd_read(efd.fileno()) == 3
        with pytest.raises(BlockingIOError):
            os.eventfd_read(efd.fileno())


def test_count_open_fds_sees_a_new_fd_and_its_close() -> None:
    before = count_open_fds()
    with make_eventfd():
        assert count_open_fds() == before + 1
    assert count_open_fds() == before
