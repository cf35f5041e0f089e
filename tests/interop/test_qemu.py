"""Opt-in: QEMU's own vfio-user-pci client realizes `vfioproxy serve-device` through `record`.

Runs only when ``VFIOPROXY_QEMU`` names a ``qemu-system-x86_64`` >= 10.1
(``bash ../shared/peers/build-qemu.sh`` builds one into ``../peers/qemu``,
about 6 minutes). QEMU starts with the command line of
``../shared/peers/qemu-realize.sh`` (q35, TCG, 512 MiB memfd guest RAM shared,
``-S``): realize and the machine reset are done once QMP answers. The test
checks the device QEMU sees (``query-pci``), that the recorded session
decodes with no violation, and, for QEMU 10.2.x (the version the realize
client copies), that ``vfioproxy realize`` sends the reference device
exactly what QEMU sent it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.interop.conftest import SUMMARY
from tests.interop.peers import VFIOPROXY, Peers, Proc
from tests.interop.tracecheck import Recording, read_recording
from vfioproxy.peers import layout
from vfioproxy.side import Direction

QEMU_VARIABLE = "VFIOPROXY_QEMU"


def qemu_version(binary: str) -> tuple[int, int, int]:
    out = subprocess.run([binary, "-version"], capture_output=True, text=True, timeout=30).stdout
    found = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
    if not found:
        pytest.fail(f"{QEMU_VARIABLE}={binary}: cannot read its version from {out!r}")
    major, minor, micro = (int(g) for g in found.groups())
    return major, minor, micro


@pytest.fixture
def qemu() -> tuple[str, tuple[int, int, int]]:
    binary = os.environ.get(QEMU_VARIABLE)
    if not binary:
        pytest.skip(f"{QEMU_VARIABLE} is not set: point it at a qemu-system-x86_64 >= 10.1 "
                    "(`bash ../shared/peers/build-qemu.sh` builds one in ../peers/qemu)")
    version = qemu_version(binary)
    if version[:2] < (10, 1):
        pytest.fail(f"{QEMU_VARIABLE}={binary} is QEMU {version}: vfio-user-pci needs >= 10.1")
    return binary, version


def qmp_session(path: Path, proc: Proc, timeout: float = 30.0) -> list[Any]:
    """Wait for QMP (QEMU answers once realize and the machine reset are done), run
    query-pci and quit; return query-pci's answer."""
    limit = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"QEMU exited with {proc.popen.returncode}\n{proc.describe()}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            break
        except OSError:
            sock.close()
            if time.monotonic() > limit:
                raise AssertionError(f"no QMP on {path}\n{proc.describe()}") from None
            time.sleep(0.02)
    sock.settimeout(timeout)
    with sock, sock.makefile("rwb") as f:

        def call(command: str) -> Any:
            f.write(json.dumps({"execute": command}).encode() + b"\n")
            f.flush()
            while True:
                line = f.readline()
                if not line:
                    return None  # quit may end with EOF
                reply = json.loads(line)
                if "event" not in reply:
                    assert "error" not in reply, reply
                    return reply.get("return")

        greeting = json.loads(f.readline())
        assert "QMP" in greeting
        call("qmp_capabilities")
        pci: list[Any] = call("query-pci")
        call("quit")
    return pci


def qemu_argv(binary: str, device_socket: Path, qmp: Path) -> list[str]:
    device = json.dumps({"driver": "vfio-user-pci", "id": "vu0",
                         "socket": {"type": "unix", "path": str(device_socket)}})
    return [binary, "-machine", "q35,memory-backend=mem", "-accel", "tcg", "-display", "none",
            "-nodefaults", "-monitor", "none", "-serial", "none", "-m", "512",
            "-L", "/usr/share/seabios", "-L", "/usr/share/qemu",
            "-object", "memory-backend-memfd,id=mem,size=512M,share=on",
            "-device", device, "-S", "-qmp", f"unix:{qmp},server=on,wait=off"]


def record_against_reference(peers: Peers, sockdir: Path, name: str) -> tuple[Path, Proc, Proc]:
    dev, prox = sockdir / f"{name}-dev.sock", sockdir / f"{name}-p.sock"
    device = peers.vfioproxy(f"{name}-device", "serve-device", "--socket", dev)
    peers.wait_for_socket(dev, device)
    trace = sockdir / f"{name}.trace"
    recorder = peers.vfioproxy(f"{name}-record", "record", "--listen", prox, "--server", dev,
                               "-o", trace)
    peers.wait_for_socket(prox, recorder)
    return prox, recorder, device


def finished(recorder: Proc, trace: Path) -> Recording:
    assert recorder.stop(signal.SIGINT) == 0, recorder.describe()
    recording = read_recording(trace)
    assert recording.truncation is None and recording.sessions == [1]
    assert recording.undecoded() == [] and recording.violations() == []
    return recording


@pytest.mark.interop_timeout(120)
def test_qemu_realizes_the_reference_device_through_record(
    qemu: tuple[str, tuple[int, int, int]], peers: Peers, sockdir: Path
) -> None:
    binary, version = qemu
    prox, recorder, _ = record_against_reference(peers, sockdir, "qemu")
    qmp = sockdir / "qmp.sock"
    proc = peers.start("qemu", qemu_argv(binary, prox, qmp))
    pci = qmp_session(qmp, proc)
    assert proc.wait(30) == 0, proc.describe()
    devices = [d for bus in pci for d in bus["devices"] if d.get("qdev_id") == "vu0"]
    assert [(d["id"]["vendor"], d["id"]["device"]) for d in devices] == [
        (layout.VENDOR_ID, layout.DEVICE_ID)
    ]
    qemu_session = finished(recorder, sockdir / "qemu.trace")

    qemu_text = ".".join(map(str, version))
    if version[:2] != (10, 2):
        SUMMARY.append(f"QEMU {qemu_text} realized serve-device through `vfioproxy record`: "
                       f"{len(qemu_session.messages)} messages, all decoded")
        return  # the realize client copies QEMU 10.2; other versions may differ
    prox, recorder, _ = record_against_reference(peers, sockdir, "realize")
    result = subprocess.run([*VFIOPROXY, "realize", "--socket", str(prox)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    realize_session = finished(recorder, sockdir / "realize.trace")
    for direction in Direction:
        mine = [r.data for r in realize_session.records(direction)]
        theirs = [r.data for r in qemu_session.records(direction)]
        assert mine == theirs, direction
    SUMMARY.append(f"QEMU {qemu_text} realized serve-device through `vfioproxy record`: "
                   f"{len(qemu_session.messages)} messages, all decoded; `vfioproxy realize` "
                   "exchanged the same bytes in both directions")
