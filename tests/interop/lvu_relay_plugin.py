"""A pytest plugin that runs libvfio-user's own test suite through a relay.

Loaded into libvfio-user's ``test/py`` suite (``-p lvu_relay_plugin``, with
this folder on ``PYTHONPATH``), run by the system ``python3``: stdlib only.
The suite drives an in-process, non-blocking libvfio-user server
synchronously: it sends a message on a client socket, then calls
``vfu_attach_ctx`` / ``vfu_run_ctx`` once and expects the server to have it.
Through any relay the message may still be on its way, so this plugin:

- starts the relay (``VFIOPROXY_LVU_RELAY``: a command line, e.g.
  ``vfioproxy record -o T``, to which ``--listen L --server SOCK_PATH`` are
  appended; SOCK_PATH is ``/tmp/vfio-user.sock.<pid of this process>``, the
  suite's own server socket) and stops it at the end (SIGINT, then SIGKILL);
- points the suite's ``connect_sock`` at the relay's socket ``L``;
- retries ``vfu_attach_ctx`` while it fails with EAGAIN (the relay has not
  connected yet) and ``vfu_run_ctx`` while it finds nothing to do (0
  requests processed, or EAGAIN), for at most ``VFIOPROXY_LVU_RETRY``
  seconds (default 1) per call; a call that still finds nothing is returned
  as it came (the suite may expect exactly that);
- makes closing a client socket take effect at the server as it does
  direct: ``close()`` of a socket from ``connect_sock`` returns once the
  relay has closed the matching server-side connection (the server's
  connection fd, learnt from ``vfu_get_poll_fd`` when ``vfu_attach_ctx``
  succeeded, shows POLLRDHUP), again for at most the retry time. Tests that
  close the client and then need the server's next write to fail
  (``test_dma_map_busy_reply_fail``) depend on it.

Nothing else in the suite changes: the patches are made on the
``libvfio_user`` module (and its ``lib`` handle) before any test module does
``from libvfio_user import *``. With ``VFIOPROXY_LVU_STATS=FILE`` the plugin
writes what it did (retries, calls that ran out of retry time) as JSON.
Without ``VFIOPROXY_LVU_RELAY`` it only counts (the direct run).
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import json
import os
import select
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_STATS: dict[str, Any] = {
    "relay": None,
    "attach_calls": 0,
    "attach_retries": 0,
    "run_calls": 0,
    "run_retries": 0,
    "run_found_nothing": 0,  # calls that still found nothing when the retry time ran out
    "longest_wait_s": 0.0,
    "found_nothing_in": [],  # the tests those calls were in
    "closes": 0,  # client sockets closed after their connection was attached
    "close_wait_s": 0.0,
    "close_not_seen": 0,
}
_CURRENT_TEST = ""
_RETRY = 1.0


class _RelayedSocket(socket.socket):
    """A client socket to the relay; ``server_end`` is the server's connection (fd, inode)."""

    server_end: tuple[int, int] | None = None

    def close(self) -> None:
        server_end, self.server_end = self.server_end, None
        super().close()
        if server_end is not None:
            _wait_server_sees_close(*server_end)


#: the last client socket connected and not yet matched with a server connection
_UNMATCHED: list[_RelayedSocket] = []


def _wait_server_sees_close(fd: int, inode: int) -> None:
    """Return once the server's end of the relayed connection has seen the close."""
    _STATS["closes"] += 1
    started = time.monotonic()
    poller = select.poll()
    try:
        poller.register(fd, select.POLLRDHUP)
    except OSError:
        return  # the server has closed it already
    while time.monotonic() - started < _RETRY:
        try:
            if os.fstat(fd).st_ino != inode:
                return  # closed by the server, and the number reused
        except OSError:
            return
        if any(ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL)
               for _, ev in poller.poll(5)):
            _STATS["close_wait_s"] = max(_STATS["close_wait_s"], time.monotonic() - started)
            return
    _STATS["close_not_seen"] += 1
_RELAY: subprocess.Popen[bytes] | None = None


def _suite_dir(config: Any) -> Path:
    env = os.environ.get("VFIOPROXY_LVU_SUITE")
    candidates = [Path(env)] if env else []
    for arg in config.args:
        path = Path(str(arg).split("::")[0])
        candidates.append(path if path.is_dir() else path.parent)
    for candidate in candidates:
        if (candidate / "libvfio_user.py").is_file():
            return candidate.resolve()
    raise RuntimeError("lvu_relay_plugin: cannot find libvfio_user.py (set VFIOPROXY_LVU_SUITE)")


def _listening(path: str) -> bool:
    """Whether a UNIX socket bound to ``path`` listens (__SO_ACCEPTCON in /proc/net/unix)."""
    with open("/proc/net/unix") as table:
        next(table)
        for line in table:
            fields = line.split(None, 7)
            if len(fields) == 8 and fields[7].rstrip("\n") == path and int(fields[3], 16) & 0x10000:
                return True
    return False


def _wait_for_socket(path: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not _listening(path):
        if proc.poll() is not None:
            raise RuntimeError(f"lvu_relay_plugin: relay exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"lvu_relay_plugin: relay socket {path} did not appear")
        time.sleep(0.01)


def pytest_configure(config: Any) -> None:
    global _RELAY, _RETRY
    suite = _suite_dir(config)
    if str(suite) not in sys.path:
        sys.path.insert(0, str(suite))
    lvu: Any = importlib.import_module("libvfio_user")
    retry = _RETRY = float(os.environ.get("VFIOPROXY_LVU_RETRY", "1"))

    relay_cmd = os.environ.get("VFIOPROXY_LVU_RELAY")
    if relay_cmd:
        server_path = lvu.SOCK_PATH.decode()
        listen = server_path + ".relay"
        argv = [*shlex.split(relay_cmd), "--listen", listen, "--server", server_path]
        _STATS["relay"] = argv
        _RELAY = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        _wait_for_socket(listen, _RELAY, 30.0)

        def connect_sock() -> socket.socket:
            sock = _RelayedSocket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(listen)
            _UNMATCHED[:] = [sock]
            return sock

        lvu.connect_sock = connect_sock

    lib = lvu.lib
    real_attach = lib.vfu_attach_ctx
    real_run = lib.vfu_run_ctx
    poll_fd = lib.vfu_get_poll_fd
    poll_fd.argtypes = (ctypes.c_void_p,)

    def note_wait(started: float) -> None:
        _STATS["longest_wait_s"] = max(_STATS["longest_wait_s"], time.monotonic() - started)

    def attach(ctx: Any) -> int:
        _STATS["attach_calls"] += 1
        started = time.monotonic()
        while True:
            ret: int = real_attach(ctx)
            if ret != -1 or ctypes.get_errno() not in (errno.EAGAIN, errno.EWOULDBLOCK):
                break
            if not relay_cmd or time.monotonic() - started > retry:
                break
            _STATS["attach_retries"] += 1
            time.sleep(0.0002)
        note_wait(started)
        if ret == 0 and _UNMATCHED:
            fd = poll_fd(ctx)
            if fd >= 0:
                _UNMATCHED.pop().server_end = (fd, os.fstat(fd).st_ino)
        return ret

    def run(ctx: Any) -> int:
        _STATS["run_calls"] += 1
        started = time.monotonic()
        while True:
            ret: int = real_run(ctx)
            nothing = ret == 0 or (
                ret == -1 and ctypes.get_errno() in (errno.EAGAIN, errno.EWOULDBLOCK)
            )
            if not nothing:
                break
            if not relay_cmd or time.monotonic() - started > retry:
                _STATS["run_found_nothing"] += 1
                _STATS["found_nothing_in"].append(_CURRENT_TEST)
                break
            _STATS["run_retries"] += 1
            time.sleep(0.0002)
        note_wait(started)
        return ret

    lib.vfu_attach_ctx = attach
    lib.vfu_run_ctx = run


def pytest_runtest_logstart(nodeid: str, location: Any) -> None:
    global _CURRENT_TEST
    _CURRENT_TEST = nodeid


def pytest_unconfigure(config: Any) -> None:
    global _RELAY
    if _RELAY is not None:
        proc, _RELAY = _RELAY, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _STATS["relay_exit"] = proc.returncode
    out = os.environ.get("VFIOPROXY_LVU_STATS")
    if out:
        Path(out).write_text(json.dumps(_STATS, indent=2))
