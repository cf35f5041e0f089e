"""The long-running commands as a user runs them: real processes, sockets and signals."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recorder.reader import TraceReader
from recorder.records import EventRecord, MessageRecord
from vfioproxy.cli import main

VFIOPROXY = [sys.executable, "-m", "vfioproxy"]


def wait_for_socket(path: Path, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited with {proc.returncode}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.02)


@pytest.fixture
def spawn():
    procs = []

    def start(*args):
        proc = subprocess.Popen([*VFIOPROXY, *map(str, args)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def messages(path):
    with TraceReader(path) as reader:
        return [r for r in reader if isinstance(r, MessageRecord)], reader


def test_demo_records_a_realize_and_prints_its_stats(tmp_path, capsys):
    trace = tmp_path / "demo.trace"
    assert main(["demo", "-o", str(trace), "--workload", "3"]) == 0
    out = capsys.readouterr().out
    assert "doorbells: 3" in out and "request -> reply latency (us)" in out
    recs, reader = messages(trace)
    assert reader.truncation is None
    assert recs[0].data[2] == 1  # VERSION first
    assert sum(r.direction.value == "c2s" for r in recs) == sum(
        r.direction.value == "s2c" for r in recs
    )


def test_demo_captures_fd_contents_when_asked(tmp_path, capsys):
    trace = tmp_path / "demo.trace"
    assert main(["demo", "-o", str(trace), "--capture-fd-contents", "64k"]) == 0
    capsys.readouterr()
    recs, _ = messages(trace)
    memfds = [fd for r in recs for fd in r.fds if fd.kind.value == "memfd"]
    assert memfds and any(fd.sha256 is not None for fd in memfds)


def test_serve_device_and_realize_complete_a_realize_with_a_workload(tmp_path, spawn):
    sock = tmp_path / "dev.sock"
    server = spawn("serve-device", "--socket", sock)
    wait_for_socket(sock, server)
    result = subprocess.run([*VFIOPROXY, "realize", "--socket", str(sock), "--workload", "4",
                             "--json"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["vendor_id"] == 0x1B36 and data["device_id"] == 0x1100
    assert data["workload"]["doorbells"] == 4
    server.send_signal(signal.SIGINT)
    assert server.wait(timeout=10) == 0


def test_realize_against_nothing_fails_with_a_clear_error(tmp_path):
    result = subprocess.run([*VFIOPROXY, "realize", "--socket", str(tmp_path / "none.sock")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "realize failed" in result.stderr and "none.sock" in result.stderr


def test_record_stops_on_sigint_and_leaves_a_whole_trace(tmp_path, spawn):
    dev, prox, trace = tmp_path / "dev.sock", tmp_path / "p.sock", tmp_path / "t.trace"
    server = spawn("serve-device", "--socket", dev)
    wait_for_socket(dev, server)
    proxy = spawn("record", "--listen", prox, "--server", dev, "-o", trace)
    wait_for_socket(prox, proxy)
    result = subprocess.run([*VFIOPROXY, "realize", "--socket", str(prox)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    proxy.send_signal(signal.SIGINT)
    assert proxy.wait(timeout=10) == 0
    assert not prox.exists()  # the proxy removes its socket
    recs, reader = messages(trace)
    assert reader.truncation is None
    assert len(recs) > 60
    with TraceReader(trace) as again:
        kinds = [r.kind for r in again if isinstance(r, EventRecord)]
    assert kinds[0] == "session_open" and kinds[-1] == "session_close"


def test_a_trace_survives_sigkill_of_the_recorder(tmp_path, spawn):
    dev, prox, trace = tmp_path / "dev.sock", tmp_path / "p.sock", tmp_path / "t.trace"
    server = spawn("serve-device", "--socket", dev)
    wait_for_socket(dev, server)
    proxy = spawn("record", "--listen", prox, "--server", dev, "-o", trace)
    wait_for_socket(prox, proxy)
    result = subprocess.run([*VFIOPROXY, "realize", "--socket", str(prox)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    os.kill(proxy.pid, signal.SIGKILL)
    proxy.wait(timeout=10)
    recs, _ = messages(trace)
    assert len(recs) > 60  # every forwarded message was already written


def test_record_refuses_a_listen_path_that_is_not_a_socket(tmp_path):
    keep = tmp_path / "keep.txt"
    keep.write_text("data")
    result = subprocess.run([*VFIOPROXY, "proxy", "--listen", str(keep), "--server",
                             str(tmp_path / "s.sock")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert "not a socket" in result.stderr
    assert keep.read_text() == "data"
