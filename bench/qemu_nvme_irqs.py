"""A running guest through ``vfioproxy record [FLAGS]``: QEMU's client (SeaBIOS
runs and drives the device) against QEMU's own vfio-user server with an nvme
device model (INTx).

    python bench/qemu_nvme_irqs.py OUTDIR                     # plain record
    python bench/qemu_nvme_irqs.py OUTDIR --interpose-irqs    # every interrupt recorded
    RUN_S=6 QEMU=... QEMU_SRV=... python bench/qemu_nvme_irqs.py OUTDIR ...

OUTDIR gets the trace (t.trace), SeaBIOS's debug console (bios.log: compare
the runs with and without the flag) and the programs' stderr. Not a test:
it needs the two QEMU builds of ../shared/peers/README.md (paths below, or
QEMU / QEMU_SRV) and takes RUN_S (default 6) seconds of guest time. Results:
bench/RESULTS.md, "interrupt latency added by --interpose-irqs".
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

QEMU = os.environ.get("QEMU", "/work/peers/qemu/qemu-10.2.2+ds/build/qemu-system-x86_64")
SRV = os.environ.get("QEMU_SRV", "/work/peers/qemu/qemu-10.2.2+ds/build-srv/qemu-system-x86_64")
VFIOPROXY = [sys.executable, "-m", "vfioproxy"]
ROMS = [arg for where in ("/usr/share/seabios", "/usr/share/qemu", "/usr/lib/ipxe/qemu")
        if Path(where).is_dir() for arg in ("-L", where)]
QUIET = ["-accel", "tcg", "-display", "none", "-nodefaults", "-monitor", "none",
         "-serial", "none"]


def wait(path: Path, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > end:
            raise SystemExit(f"{path} did not appear")
        time.sleep(0.01)


def main() -> int:
    out, flags = Path(sys.argv[1]), sys.argv[2:]
    seconds = float(os.environ.get("RUN_S", "6"))
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.sock"):
        stale.unlink()
    server = subprocess.Popen(
        [SRV, "-machine", "x-remote,vfio-user=on,auto-shutdown=on", *QUIET, *ROMS,
         "-device", "nvme,id=d0,serial=ipx1",
         "-object", f"x-vfio-user-server,id=v0,type=unix,path={out / 's.sock'},device=d0"],
        stdout=subprocess.DEVNULL, stderr=(out / "srv.err").open("w"))
    wait(out / "s.sock")
    trace = out / "t.trace"
    trace.unlink(missing_ok=True)
    recorder = subprocess.Popen(
        [*VFIOPROXY, "record", "--listen", str(out / "p.sock"), "--server", str(out / "s.sock"),
         "-o", str(trace), *flags], stderr=(out / "rec.err").open("w"))
    wait(out / "p.sock")
    device = json.dumps({"driver": "vfio-user-pci", "id": "vu0",
                         "socket": {"type": "unix", "path": str(out / "p.sock")}})
    qmp = out / "qmp.sock"
    client = subprocess.Popen(
        [QEMU, "-machine", "q35,memory-backend=mem", *QUIET, "-m", "512", *ROMS,
         "-object", "memory-backend-memfd,id=mem,size=512M,share=on",
         "-debugcon", f"file:{out / 'bios.log'}", "-global", "isa-debugcon.iobase=0x402",
         "-device", device, "-qmp", f"unix:{qmp},server=on,wait=off"],
        stderr=(out / "qemu.err").open("w"))
    wait(qmp)
    sock = socket.socket(socket.AF_UNIX)
    for _ in range(200):
        try:
            sock.connect(str(qmp))
            break
        except OSError:
            time.sleep(0.01)
    control = sock.makefile("rw")
    control.readline()
    for command in ("qmp_capabilities", "quit"):
        if command == "quit":
            time.sleep(seconds)  # the guest runs
        control.write(json.dumps({"execute": command}) + "\n")
        control.flush()
        with contextlib.suppress(OSError):
            control.readline()
    client.wait(20)
    time.sleep(0.5)
    recorder.send_signal(signal.SIGINT)
    recorder.wait(20)
    server.send_signal(signal.SIGINT)
    try:
        server.wait(10)
    except subprocess.TimeoutExpired:
        server.kill()
    print(f"qemu exit {client.returncode}, trace {trace} ({trace.stat().st_size} bytes)")
    return client.returncode


if __name__ == "__main__":
    raise SystemExit(main())
