"""Resource exhaustion, as a user meets it: `vfioproxy record` run as a process
with a low fd limit or a file-size limit (which the kernel reports the way a
full disk is reported). The proxy keeps forwarding, says what happened, and
the trace stays whole."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from recorder.reader import TraceReader
from recorder.records import EventRecord, MessageRecord
from vfioproxy.io.unix import is_listening
from vfioproxy.protocol.bodies import RegionAccessBody, VersionBody
from vfioproxy.protocol.codec import build_command, encode
from vfioproxy.protocol.header import Command

VFIOPROXY = [sys.executable, "-m", "vfioproxy"]
ROOT = Path(__file__).resolve().parent.parent


def start(args, *, limits=()):
    def preexec():
        for which, value in limits:
            resource.setrlimit(which, (value, value))

    return subprocess.Popen([*VFIOPROXY, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=preexec, cwd=ROOT)


def wait_for(path: Path, proc) -> None:
    """Until a socket listens at ``path`` (the file appears at bind(), before listen())."""
    deadline = time.monotonic() + 20
    while not is_listening(path):
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode}: {proc.communicate()}")
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def version() -> bytes:
    return encode(build_command(Command.VERSION, 0, VersionBody.build(0, 0, None)))[0]


def recv_message(sock: socket.socket) -> bytes:
    data = b""
    while len(data) < 16 or len(data) < int.from_bytes(data[4:8], "little"):
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(f"EOF after {len(data)} bytes")
        data += chunk
    return data


class Limited:
    """A device server, and a `vfioproxy proxy` in front of it with an fd limit;
    clients to it; all of them gone at the end of the test."""

    def __init__(self, tmp_path):
        self.device, self.listen = tmp_path / "dev.sock", tmp_path / "p.sock"
        self.procs = [start(["serve-device", "--socket", self.device])]
        self.clients = []
        wait_for(self.device, self.procs[0])

    def proxy(self, nofile, *extra):
        proc = start(["proxy", "--listen", self.listen, "--server", self.device, *extra],
                     limits=[(resource.RLIMIT_NOFILE, nofile)])
        self.procs.append(proc)
        wait_for(self.listen, proc)
        return proc

    def connect(self, n):
        for _ in range(n):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(self.listen))  # blocking: waits while the listen queue is full
            sock.settimeout(10)
            self.clients.append(sock)
        return self.clients[-n:]

    def stop(self, proc):
        """SIGINT the proxy; its stderr."""
        proc.send_signal(2)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
        return err

    def close(self):
        for sock in self.clients:
            sock.close()
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


@pytest.fixture
def limited(tmp_path):
    setup = Limited(tmp_path)
    yield setup
    setup.close()


def test_accept_backs_off_when_the_proxy_is_out_of_fds(limited):
    proxy = limited.proxy(48, "--max-sessions", 500)
    clients = limited.connect(30)  # more sessions than 48 fds allow (two sockets each, ...)
    time.sleep(0.5)
    assert proxy.poll() is None  # out of fds, still running
    for sock in clients:
        sock.close()
    time.sleep(0.5)
    (sock,) = limited.connect(1)  # and serving again
    sock.sendall(version())
    assert len(recv_message(sock)) > 16
    err = limited.stop(proxy)
    assert "cannot accept a client" in err and "retrying" in err


def test_the_default_session_cap_follows_the_fd_limit(limited):
    proxy = limited.proxy(80, "-v")
    clients = limited.connect(6)
    for sock in clients:
        sock.sendall(version())
    # (80 - 64) // 8 = 2 sessions run; the others wait in the listen queue
    assert [len(recv_message(sock)) > 16 for sock in clients[:2]] == [True, True]
    clients[0].close()
    assert len(recv_message(clients[2])) > 16  # a slot freed: the next is served
    err = limited.stop(proxy)
    assert "sessions running (--max-sessions): new clients wait" in err


@pytest.mark.parametrize(("body", "count"), [(4096, 2000), (1000, 4000)])
def test_a_full_disk_pauses_the_recording_while_forwarding_goes_on(tmp_path, body, count):
    """8 or 4 MiB of messages through a 2 MiB "disk" (1000-byte ones are
    recorded by the C lane, 4096-byte ones by Python)."""
    listen, trace = tmp_path / "p.sock", tmp_path / "t.trace"
    server_path = tmp_path / "server.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(server_path))
    listener.listen(4)
    proxy = start(["record", "--listen", listen, "--server", server_path, "-o", trace],
                  limits=[(resource.RLIMIT_FSIZE, 2 << 20)])
    got = bytearray()
    try:
        wait_for(listen, proxy)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(listen))
        server, _ = listener.accept()

        def read_all():
            while chunk := server.recv(1 << 16):
                got.extend(chunk)

        reader = threading.Thread(target=read_all)
        reader.start()
        sent = bytearray()
        for msg_id in range(count):
            message = encode(build_command(Command.REGION_WRITE, msg_id, RegionAccessBody(
                0, 2, body, os.urandom(body)), no_reply=True))[0]
            client.sendall(message)
            sent += message
        client.close()
        reader.join(timeout=60)
        server.close()
        proxy.send_signal(2)
        _, err = proxy.communicate(timeout=60)
    finally:
        listener.close()
        if proxy.poll() is None:
            proxy.kill()
            proxy.communicate()
    assert proxy.returncode == 0, err
    assert bytes(got) == bytes(sent)  # every message was forwarded
    assert "the disk is full: recording paused" in err and "Traceback" not in err
    with TraceReader(trace) as reader:
        records = list(reader)
        assert reader.truncation is None  # whole records only
    messages = [r for r in records if isinstance(r, MessageRecord)]
    kinds = [r.kind for r in records if isinstance(r, EventRecord)]
    assert 0 < len(messages) < count
    assert kinds[0] == "session_open" and "disk_full" in kinds and kinds[-1] == "session_close"
    close = records[-1].data
    assert close["unrecorded"] == count - len(messages)
    assert b"".join(m.data for m in messages) == bytes(sent)[: sum(len(m.data) for m in messages)]
