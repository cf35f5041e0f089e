"""Real peers: QEMU's vfio-user-pci client through each relay, realize and a running guest.

    .venv/bin/python bench/real_peers.py --quick      # short run (about 2 minutes)
    .venv/bin/python bench/real_peers.py              # full run (about 12 minutes on 2 cores)
    .venv/bin/python bench/real_peers.py --vfioproxy-tree /tmp/vfioproxy-old -o OLD.json

Two workloads with unmodified peers, each measured directly and through every
relay, in interleaved rounds (each round runs every configuration once, in a
shuffled order), every figure a ratio to a baseline of the same run:

- ``realize``: QEMU (``VFIOPROXY_QEMU``) realizes one ``vfio-user-pci`` device
  against libvfio-user's ``samples/server`` (``LIBVFIO_USER_BUILD``; a fresh
  server process per QEMU) with ``-S``, answers QMP once realize and the
  machine reset are done, and quits. The figure is the span QEMU's own trace
  events give, from its first message sent (VERSION) to the last reply it
  received.
- ``io``: QEMU boots its guest firmware (SeaBIOS, then the NIC's iPXE option
  ROM) against QEMU's own vfio-user server (``VFIOPROXY_QEMU_SERVER``, a build
  with ``--enable-vfio-user-server``) serving an e1000e; the figure is the
  number of messages the client sends in a fixed window of the running guest
  (by default 6 s, starting 3 s after its VERSION), while iPXE polls the NIC.

Relays: ``c-relay`` (``bench/c/vu_relay.c``), ``bare-threads``
(``bench/bare_thread_relay.py``, the Python floor of the threaded forwarding;
only with ``--configs``), ``proxy`` (``vfioproxy proxy``), ``record``
(``vfioproxy record -o TRACE``) and ``record-inject`` (``record --rule 'c2s *
delay fixed(0us)'``). ``--vfioproxy-tree PATH`` runs the proxy
configurations from another checkout of the project (``python -m vfioproxy``
with ``PYTHONPATH=PATH``), e.g. a ``git worktree`` of an older commit. Each
relay's CPU time (its process CPU clock before and after a QEMU session) is
divided by the messages the session's trace events count. Results are printed
(markdown tables) and written to ``-o`` (JSON). When QEMU or a device server is
missing, the workload is skipped with a one-line reason.
"""

from __future__ import annotations

import argparse
import atexit
import calendar
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import proxy_overhead as po  # noqa: E402  (bench/ is not a package)

PYTHON = sys.executable

#: every configuration, in table order; "direct" has no relay
ALL_CONFIGS = ("direct", "c-relay", "bare-threads", "proxy", "record", "record-inject")
DEFAULT_CONFIGS = {
    "realize": ("direct", "c-relay", "proxy", "record", "record-inject"),
    "io": ("direct", "c-relay", "proxy", "record"),
}
WORKLOADS = ("realize", "io")

QEMU_VARIABLE = "VFIOPROXY_QEMU"
QEMU_SERVER_VARIABLE = "VFIOPROXY_QEMU_SERVER"
LIBVFIO_USER_VARIABLE = "LIBVFIO_USER_BUILD"
FIRMWARE_DIRS = ("/usr/share/seabios", "/usr/share/qemu", "/usr/lib/ipxe/qemu")

#: QEMU trace events read: one line per message sent, one per message header received
TRACE_EVENTS = ("vfio_user_send_write", "vfio_user_recv_hdr")

#: a pause of the guest at least this long ends the firmware's start (``io_start``)
IO_PAUSE_S = 0.5


# ----------------------------------------------------------------------------- processes


class Spawned:
    """Every process the benchmark starts, each in its own process group, all killed
    (the whole group: SIGTERM, then SIGKILL) on stop, at exit and on SIGTERM/SIGHUP."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Any] = []
        atexit.register(self.stop_all)

    def spawn(self, argv: Sequence[str], log: Path, *, cwd: Path = ROOT,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        out = open(log, "ab")  # noqa: SIM115 (closed in stop_all)
        self.logs.append(out)
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                cwd=cwd, env=env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
        """The process's group: SIGTERM, up to ``timeout`` s, then SIGKILL."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=timeout)
        # whatever is left of the group (a child the process started), and the process
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self.procs):
            self.stop(proc, timeout=3.0)
        for log in self.logs:
            log.close()
        self.logs.clear()


SPAWNED = Spawned()


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # runs the finally blocks and atexit


def wait_for_path(path: Path, proc: subprocess.Popen[bytes], log: Path,
                  timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{program(proc)} exited with {proc.returncode} "
                               f"before creating {path}: {tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear within {timeout} s: {tail(log)}")
        time.sleep(0.01)


def program(proc: subprocess.Popen[bytes]) -> str:
    args = proc.args
    first = args[0] if isinstance(args, (list, tuple)) else args
    return Path(str(first)).name


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    """The process's exit status, or None (it is then killed) after ``timeout`` s."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        SPAWNED.stop(proc)
        return None


def tail(log: Path, lines: int = 8) -> str:
    with contextlib.suppress(OSError):
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:])
    return ""


def settled_cpu(relay: po.Relay, timeout: float = 2.0) -> tuple[int, int, int]:
    """The relay's CPU clock once it stopped moving (the session's last work, e.g. the
    digest of its tail, is done): two reads 20 ms apart within 0.2 ms."""
    deadline = time.monotonic() + timeout
    last = relay.cpu()
    while time.monotonic() < deadline:
        time.sleep(0.02)
        now = relay.cpu()
        if now[0] - last[0] < 200_000:
            return now
        last = now
    return last


# ----------------------------------------------------------------------------- peers


@dataclass
class Peers:
    qemu: Path | None = None
    qemu_server: Path | None = None
    lvu_server: Path | None = None
    firmware: list[str] = field(default_factory=list)
    skip: dict[str, str] = field(default_factory=dict)  # workload -> reason
    qemu_version: str = ""


def find_peers(args: argparse.Namespace, workloads: Sequence[str]) -> Peers:
    """The peer binaries, and for each workload that cannot run, why (one line)."""
    peers = Peers(firmware=[d for d in FIRMWARE_DIRS if Path(d).is_dir()])
    qemu = args.qemu or os.environ.get(QEMU_VARIABLE) or str(
        ROOT.parent / "peers" / "qemu" / "qemu-system-x86_64")
    if not Path(qemu).is_file() or not os.access(qemu, os.X_OK):
        for w in workloads:
            peers.skip[w] = (f"no QEMU client at {qemu} (set {QEMU_VARIABLE} or --qemu to a "
                             "qemu-system-x86_64 >= 10.1; ../shared/peers/build-qemu.sh "
                             "builds one)")
        return peers
    peers.qemu = Path(qemu)
    try:
        version = subprocess.run([qemu, "-version"], capture_output=True, text=True,
                                 timeout=30).stdout
        devices = subprocess.run([qemu, "-device", "help"], capture_output=True, text=True,
                                 timeout=30).stdout
        events = subprocess.run([qemu, "-trace", "help"], capture_output=True, text=True,
                                timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError) as e:
        for w in workloads:
            peers.skip[w] = f"QEMU client {qemu} does not run: {e}"
        return peers
    found = re.search(r"version (\S+)", version)
    peers.qemu_version = found.group(1) if found else "?"
    missing = [e for e in TRACE_EVENTS if e not in events]
    why = ("has no vfio-user-pci device (QEMU >= 10.1 needed)"
           if '"vfio-user-pci"' not in devices else
           f"lacks the trace events {', '.join(missing)}" if missing else "")
    if why:
        for w in workloads:
            peers.skip[w] = f"QEMU client {qemu} {why}"
        return peers
    if "realize" in workloads:
        build = args.libvfio_user_build or os.environ.get(LIBVFIO_USER_VARIABLE)
        candidates = [Path(build)] if build else [
            ROOT / ".peers" / "libvfio-user" / "build",
            ROOT.parent / "peers" / "libvfio-user" / "build"]
        for cand in candidates:
            if (cand / "samples" / "server").is_file():
                peers.lvu_server = cand / "samples" / "server"
                break
        else:
            peers.skip["realize"] = (
                f"no libvfio-user samples/server under {', '.join(map(str, candidates))} (set "
                f"{LIBVFIO_USER_VARIABLE} or --libvfio-user-build; "
                "../shared/peers/build-libvfio-user.sh builds one)")
    if "io" in workloads:
        srv = args.qemu_server or os.environ.get(QEMU_SERVER_VARIABLE) or str(
            peers.qemu.resolve().parent.parent / "build-srv" / "qemu-system-x86_64")
        if not Path(srv).is_file() or not os.access(srv, os.X_OK):
            peers.skip["io"] = (f"no QEMU vfio-user server at {srv} (set "
                                f"{QEMU_SERVER_VARIABLE} or --qemu-server; "
                                "../shared/peers/build-qemu-server.sh builds one)")
        elif not any((Path(d) / "efi-e1000e.rom").exists() for d in peers.firmware):
            peers.skip["io"] = ("no e1000e option ROM (efi-e1000e.rom) in "
                                f"{', '.join(FIRMWARE_DIRS)} (Debian: ipxe-qemu)")
        else:
            peers.qemu_server = Path(srv)
    return peers


def firmware_args(peers: Peers) -> list[str]:
    return [a for d in peers.firmware for a in ("-L", d)]


def client_argv(peers: Peers, sock: Path, qmp: Path, log: Path, stopped: bool) -> list[str]:
    """The command line of ../shared/peers/qemu-realize.sh (without -S: the guest runs),
    QEMU's vfio-user trace events to ``log`` with wall-clock timestamps."""
    assert peers.qemu is not None
    device = json.dumps({"driver": "vfio-user-pci", "id": "vu0",
                         "socket": {"type": "unix", "path": str(sock)}})
    argv = [str(peers.qemu), "-machine", "q35,memory-backend=mem", "-accel", "tcg",
            "-display", "none", "-nodefaults", "-monitor", "none", "-serial", "none",
            "-m", "512", *firmware_args(peers),
            "-object", "memory-backend-memfd,id=mem,size=512M,share=on",
            "-device", device, "-qmp", f"unix:{qmp},server=on,wait=off"]
    if stopped:
        argv.append("-S")
    for event in TRACE_EVENTS:
        argv += ["-trace", event]
    return [*argv, "-msg", "timestamp=on", "-D", str(log)]


def lvu_server_argv(peers: Peers, sock: Path) -> list[str]:
    assert peers.lvu_server is not None
    return [str(peers.lvu_server), str(sock)]


def qemu_server_argv(peers: Peers, sock: Path) -> list[str]:
    assert peers.qemu_server is not None
    return [str(peers.qemu_server), "-machine", "x-remote,vfio-user=on,auto-shutdown=on",
            "-accel", "tcg", "-display", "none", "-nodefaults", "-monitor", "none",
            "-serial", "none", *firmware_args(peers), "-device", "e1000e,id=d0",
            "-object", f"x-vfio-user-server,id=v0,type=unix,path={sock},device=d0"]


# ----------------------------------------------------------------------------- QMP


class QMP:
    """A QMP client with a deadline on everything."""

    def __init__(self, path: Path, proc: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"QEMU exited with {proc.returncode} before QMP answered")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                break
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no QMP on {path} within {timeout} s") from None
                time.sleep(0.01)
        sock.settimeout(max(1.0, deadline - time.monotonic()))
        self.sock = sock
        self.file = sock.makefile("rwb")
        self.greeting = self._read()
        self.greeting_wall_ns = time.time_ns()
        if "QMP" not in self.greeting:
            raise RuntimeError(f"no QMP greeting: {self.greeting}")
        # QEMU 10 greets from its monitor thread as soon as the socket is connected, which
        # can be while the devices are realized; commands run in the main loop, which
        # starts after realize and the machine reset: the first answer is the mark
        self.call("qmp_capabilities")
        self.answered_wall_ns = time.time_ns()

    def _read(self) -> dict[str, Any]:
        while True:
            line = self.file.readline()
            if not line:
                raise EOFError("QMP closed")
            msg: dict[str, Any] = json.loads(line)
            if "event" not in msg:
                return msg

    def call(self, command: str) -> Any:
        self.file.write(json.dumps({"execute": command}).encode() + b"\n")
        self.file.flush()
        try:
            reply = self._read()
        except (EOFError, OSError):
            if command == "quit":
                return {}
            raise
        if "return" not in reply:
            raise RuntimeError(f"QMP {command}: {reply}")
        return reply["return"]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()


def pci_id(buses: Any) -> str | None:
    for bus in buses or []:
        for dev in bus.get("devices", []):
            if dev.get("qdev_id") == "vu0":
                return f"{dev['id']['vendor']:04x}:{dev['id']['device']:04x}"
    return None


# ----------------------------------------------------------------------------- trace log


@dataclass
class TraceLog:
    """The client's messages from QEMU's trace log: wall-clock times in us, and for each
    message sent/received whether it was sent (c2s) or received (s2c)."""

    sent_us: list[int]
    received_us: list[int]
    received_cmds: list[int]
    received_sizes: list[int]


_MINUTES: dict[bytes, int] = {}


def _stamp_us(line: bytes) -> int:
    """``2026-12-06T15:32:27.187903Z ...`` (GLib's ISO 8601 of -msg timestamp=on) in us."""
    stamp = line.split(b" ", 1)[0]
    minute = stamp[:16]
    base = _MINUTES.get(minute)
    if base is None:
        base = calendar.timegm(time.strptime(minute.decode(), "%Y-%m-%dT%H:%M")) * 1_000_000
        _MINUTES[minute] = base
    seconds = stamp[17:].rstrip(b"Z")
    whole, _, frac = seconds.partition(b".")
    return base + int(whole) * 1_000_000 + (int(frac.ljust(6, b"0")[:6]) if frac else 0)


_RECV = re.compile(rb" cmd 0x([0-9a-f]+) size 0x([0-9a-f]+) ")


def read_trace_log(path: Path) -> TraceLog:
    log = TraceLog([], [], [], [])
    with open(path, "rb") as f:
        for line in f:
            if b" vfio_user_send_write " in line:
                log.sent_us.append(_stamp_us(line))
            elif b" vfio_user_recv_hdr " in line:
                log.received_us.append(_stamp_us(line))
                found = _RECV.search(line)
                log.received_cmds.append(int(found.group(1), 16) if found else -1)
                log.received_sizes.append(int(found.group(2), 16) if found else -1)
    return log


def first_sent_us(path: Path, proc: subprocess.Popen[bytes], timeout: float) -> int:
    """Wait until QEMU's log shows its first message sent (VERSION); its time in us."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"QEMU exited with {proc.returncode} before sending a message")
        with contextlib.suppress(OSError), open(path, "rb") as f:
            for line in f:
                if b" vfio_user_send_write " in line and line.endswith(b"\n"):
                    return _stamp_us(line)
        time.sleep(0.02)
    raise RuntimeError(f"QEMU sent no message within {timeout} s")


# ----------------------------------------------------------------------------- relays


@dataclass
class Tree:
    """The checkout whose ``vfioproxy`` the proxy configurations run."""

    path: Path
    commit: str
    dirty: bool
    imported: dict[str, str]

    def argv(self) -> list[str]:
        return [PYTHON, "-m", "vfioproxy"]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(self.path)
        return env


def open_tree(path: Path) -> Tree:
    """The tree's commit, whether its code differs from it, and where its packages come from
    (``python -m`` puts the working directory first, so the tree's own packages win)."""
    def git(*argv: str) -> str:
        return subprocess.run(["git", "-C", str(path), *argv], capture_output=True, text=True,
                              timeout=30).stdout.strip()

    commit = git("rev-parse", "HEAD") or "?"
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "vfioproxy",
                     "recorder"))
    probe = ("import json, importlib.util as u\n"
             "d = {n: (u.find_spec(n).origin if u.find_spec(n) else None)\n"
             "     for n in ('vfioproxy', 'recorder')}\n"
             "import importlib\n"
             "d['lane'] = 'Python (no C lane in this tree)'\n"
             "for name in ('vfioproxy.proxy.fastpath', 'vfioproxy.fastpath'):  # now, before\n"
             "    try:\n"
             "        f = importlib.import_module(name)\n"
             "    except ImportError:\n"
             "        continue\n"
             "    d['lane'] = 'C' if f.lane else f'Python ({f.without})'\n"
             "    break\n"
             "print(json.dumps(d))")
    env = dict(os.environ, PYTHONPATH=str(path))
    out = subprocess.run([PYTHON, "-c", probe], capture_output=True, text=True, cwd=path,
                         env=env, timeout=60)
    imported = json.loads(out.stdout) if out.returncode == 0 else {}
    origin = imported.get("vfioproxy") or ""
    if not origin.startswith(str(path.resolve()) + os.sep):
        raise SystemExit(f"--vfioproxy-tree {path}: vfioproxy imports from {origin or '?'}, "
                         "not from the tree")
    return Tree(path.resolve(), commit, dirty, imported)


class RelaySet:
    """One process of each relay configuration, each in front of its own server socket
    (the device servers come and go per QEMU session: one client each)."""

    def __init__(self, tmp: Path, tag: str, configs: Sequence[str], tree: Tree,
                 programs: dict[str, Path]) -> None:
        self.relays: dict[str, po.Relay] = {}
        self.servers: dict[str, Path] = {}
        self.procs: list[subprocess.Popen[bytes]] = []
        try:
            for i, name in enumerate(configs):
                server = tmp / f"{tag}{i}-srv.sock"
                self.servers[name] = server
                if name == "direct":
                    self.relays[name] = po.Relay(name, server)
                    continue
                listen = tmp / f"{tag}{i}.sock"
                trace = tmp / f"{tag}{i}.trace" if name.startswith("record") else None
                ends = ["--listen", str(listen), "--server", str(server)]
                cwd, env = ROOT, None
                if name == "c-relay":
                    argv = [str(programs["vu_relay"]), *ends]
                elif name == "bare-threads":  # the Python floor: bench/bare_thread_relay.py
                    argv = [sys.executable, str(BENCH / "bare_thread_relay.py"), *ends]
                else:
                    argv, cwd, env = [*tree.argv()], tree.path, tree.env()
                    if name == "proxy":
                        argv += ["proxy", *ends]
                    else:
                        argv += ["record", *ends, "-o", str(trace)]
                        if name == "record-inject":
                            argv += ["--rule", po.ZERO_DELAY_RULE]
                log = tmp / f"{tag}{i}-{name}.log"
                proc = SPAWNED.spawn(argv, log, cwd=cwd, env=env)
                self.procs.append(proc)
                wait_for_path(listen, proc, log)
                self.relays[name] = po.Relay(name, listen, proc, trace)
        except BaseException:
            self.stop()
            raise

    def check_alive(self) -> None:
        for relay in self.relays.values():
            if relay.proc is not None and relay.proc.poll() is not None:
                raise RuntimeError(f"relay {relay.name} exited with {relay.proc.returncode}")

    def stop(self) -> None:
        for proc in self.procs:
            SPAWNED.stop(proc)


# ----------------------------------------------------------------------------- sessions


@dataclass
class Session:
    """One QEMU session through one configuration."""

    config: str
    set_index: int
    round_index: int
    figures: dict[str, Any] = field(default_factory=dict)
    cpu_ns: int = 0
    user_ns: int = 0
    sys_ns: int = 0
    messages: int = 0  # both directions, from QEMU's trace events

    @property
    def cpu_us_per_msg(self) -> float | None:
        return self.cpu_ns / self.messages / 1000 if self.messages and self.cpu_ns else None


#: where QEMU writes its trace log: tmpfs when there is one (the client writes a line per
#: message, in every configuration alike); set by main()
QEMU_LOG_DIR: Path | None = None


def qemu_log(tmp: Path) -> Path:
    return (QEMU_LOG_DIR or tmp) / "qemu.log"


def start_server(kind: str, peers: Peers, sock: Path, log: Path) -> subprocess.Popen[bytes]:
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    argv = lvu_server_argv(peers, sock) if kind == "lvu" else qemu_server_argv(peers, sock)
    proc = SPAWNED.spawn(argv, log)
    wait_for_path(sock, proc, log)
    return proc


def finish(proc: subprocess.Popen[bytes], server: subprocess.Popen[bytes],
           qmp: QMP | None, timeout: float) -> tuple[int | None, int | None]:
    """Quit QEMU (QMP, else SIGTERM), wait for it and for the server (it exits when its
    client goes); kill what does not go in time."""
    if qmp is not None:
        with contextlib.suppress(OSError, EOFError, RuntimeError):
            qmp.call("quit")
        qmp.close()
    elif proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    rc = wait_exit(proc, timeout)
    SPAWNED.stop(proc)
    src = wait_exit(server, timeout)
    SPAWNED.stop(server)
    return rc, src


def start_session(
    kind: str, peers: Peers, tmp: Path, relays: RelaySet, name: str, *, stopped: bool
) -> tuple[Any, Path, Path, subprocess.Popen[bytes], OtherLoad, Any, subprocess.Popen[bytes],
           int]:
    """A fresh server of ``kind`` behind relay ``name`` and QEMU started against the
    relay: (relay, QEMU's trace log, QMP socket, server, load meter, relay CPU, QEMU,
    wall ns at QEMU's exec)."""
    relay = relays.relays[name]
    log = qemu_log(tmp)
    qmp_path = tmp / "qmp.sock"
    for path in (log, qmp_path):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    server = start_server(kind, peers, relays.servers[name], tmp / f"{kind}-server.log")
    load = OtherLoad()
    cpu0 = relay.cpu()
    t_exec = time.time_ns()
    proc = SPAWNED.spawn(client_argv(peers, relay.listen, qmp_path, log, stopped=stopped),
                         tmp / "qemu-stderr.log")
    return relay, log, qmp_path, server, load, cpu0, proc, t_exec


def realize_session(peers: Peers, tmp: Path, relays: RelaySet, name: str,
                    timeout: float) -> dict[str, Any]:
    """QEMU -S realizes the device through ``name``, answers QMP, quits: the realize span
    from its trace events, the relay's CPU time, the messages."""
    relay, log, qmp_path, server, load, cpu0, proc, t_exec = start_session(
        "lvu", peers, tmp, relays, name, stopped=True)
    qmp = None
    try:
        qmp = QMP(qmp_path, proc, timeout)
        answered_ns, greeted_ns = qmp.answered_wall_ns, qmp.greeting_wall_ns
        pci = pci_id(qmp.call("query-pci"))
    finally:
        rc, src = finish(proc, server, qmp, timeout)
    cpu1 = settled_cpu(relay)
    other = load.cpus(cpu1[0] - cpu0[0])
    relay.truncate_trace()
    if pci is None:
        raise RuntimeError(f"QEMU has no device vu0 through {name}: "
                           f"{tail(tmp / 'qemu-stderr.log')}")
    trace = read_trace_log(log)
    if not trace.sent_us or not trace.received_us or trace.received_cmds[0] != 1:
        raise RuntimeError(f"{name}: QEMU's trace has no VERSION exchange ({log})")
    start, end = trace.sent_us[0], trace.received_us[-1]
    answered_us = answered_ns // 1000
    return {
        "span_ms": (end - start) / 1000,
        # VERSION's round trip: through a relay, it includes the relay's session start
        # (accept, connect to the server, its threads or tasks)
        "version_rtt_ms": (trace.received_us[0] - start) / 1000,
        "exec_to_qmp_ms": (answered_ns - t_exec) / 1e6,
        "exec_to_greeting_ms": (greeted_ns - t_exec) / 1e6,
        "c2s": len(trace.sent_us),
        "s2c": len(trace.received_us),
        "after_qmp": sum(t > answered_us for t in (*trace.sent_us, *trace.received_us)),
        # QEMU 10.2 greets on QMP from its monitor thread, before realize: 0 here
        "before_greeting": sum(t < greeted_ns // 1000
                               for t in (*trace.sent_us, *trace.received_us)),
        "pci": pci,
        "other_load_cpus": other,
        "qemu_exit": rc,
        "server_exit": src,
        "cpu": [cpu1[i] - cpu0[i] for i in range(3)],
    }


def io_session(peers: Peers, tmp: Path, relays: RelaySet, name: str, window_start: float,
               window: float, timeout: float) -> dict[str, Any]:
    """QEMU boots its firmware against the e1000e of QEMU's vfio-user server through
    ``name``: the client's messages in [VERSION + window_start, + window)."""
    relay, log, qmp_path, server, load, cpu0, proc, _ = start_session(
        "qemu", peers, tmp, relays, name, stopped=False)
    qmp = None
    try:
        t0_us = first_sent_us(log, proc, timeout)
        # the window closes at t0 + start + window (wall clock, as the trace's stamps)
        until = (t0_us / 1e6) + window_start + window + 0.3
        while time.time() < until:
            if proc.poll() is not None:
                raise RuntimeError(f"QEMU exited with {proc.returncode} during the window: "
                                   f"{tail(tmp / 'qemu-stderr.log')}")
            if server.poll() is not None:
                raise RuntimeError(f"the device server exited with {server.returncode} during "
                                   f"the window: {tail(tmp / 'qemu-server.log')}")
            time.sleep(min(0.2, max(0.0, until - time.time())))
        qmp = QMP(qmp_path, proc, timeout)
    finally:
        rc, src = finish(proc, server, qmp, timeout)
    cpu1 = settled_cpu(relay)
    other = load.cpus(cpu1[0] - cpu0[0])
    relay.truncate_trace()
    trace = read_trace_log(log)
    log.unlink()
    if not trace.sent_us or trace.received_cmds[:1] != [1]:
        raise RuntimeError(f"{name}: QEMU's trace has no VERSION exchange")
    t0 = trace.sent_us[0]
    lo, hi = t0 + int(window_start * 1e6), t0 + int((window_start + window) * 1e6)
    in_window = sum(lo <= t < hi for t in trace.sent_us)
    # where the guest's device I/O starts: the first message after its firmware's pause
    io_start = None
    for a, b in zip(trace.sent_us, trace.sent_us[1:], strict=False):
        if b - a >= IO_PAUSE_S * 1e6:
            io_start = (b - t0) / 1e6
            break
    rom = [i for i, (c, s) in enumerate(zip(trace.received_cmds, trace.received_sizes,
                                            strict=True)) if c == 9 and s > 0x10000]
    return {
        "window_c2s": in_window,
        "window_rate": in_window / window,
        "io_start_s": io_start,
        "rom_read_s": (trace.received_us[rom[0]] - t0) / 1e6 if rom else None,
        "last_sent_s": (trace.sent_us[-1] - t0) / 1e6,
        "other_load_cpus": other,
        "c2s": len(trace.sent_us),
        "s2c": len(trace.received_us),
        "qemu_exit": rc,
        "server_exit": src,
        "cpu": [cpu1[i] - cpu0[i] for i in range(3)],
    }


# ----------------------------------------------------------------------------- other load


def system_busy_s() -> float:
    """CPU-seconds the whole machine spent busy so far (/proc/stat, all but idle/iowait)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return (sum(values) - values[3] - values[4]) / po.CLK_TCK


def own_cpu_s() -> float:
    """CPU-seconds of this process and of its reaped children (QEMU, servers, relays)."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass
class OtherLoad:
    """CPUs kept busy by anything but the benchmark and its processes while it measures:
    the machine's busy time minus our own and our reaped children's, over the wall time."""

    busy0: float = field(default_factory=system_busy_s)
    own0: float = field(default_factory=own_cpu_s)
    wall0: float = field(default_factory=time.monotonic)

    def cpus(self, also_ours_ns: int = 0) -> float:
        """Call once every process started since is reaped; ``also_ours_ns``: CPU time of
        our processes still running (a relay's, from its CPU clock)."""
        ours = own_cpu_s() - self.own0 + also_ours_ns / 1e9
        other = (system_busy_s() - self.busy0) - ours
        return max(0.0, other) / max(1e-9, time.monotonic() - self.wall0)


def wait_idle(limit: float, threshold: float = 0.2) -> float:
    """Up to ``limit`` s until something else keeps at most ``threshold`` CPUs busy (1-s
    samples); the last sample."""
    deadline = time.monotonic() + limit
    busy = po.background_busy_cpus()
    while busy > threshold and time.monotonic() < deadline:
        po.progress(f"waiting for the machine to be idle: {busy:.2f} CPUs busy")
        time.sleep(4.0)
        busy = po.background_busy_cpus()
    return busy


# ----------------------------------------------------------------------------- runs


def split(rounds: int, sets: int) -> list[int]:
    """``rounds`` over ``sets`` as evenly as possible."""
    return [rounds // sets + (i < rounds % sets) for i in range(sets)]


def round_orders(names: Sequence[str], rounds: int, seed: int) -> list[list[str]]:
    """Each round's order of the configurations, shuffled."""
    orders: list[list[str]] = [[] for _ in range(rounds)]
    for r, name in po.interleaved(names, rounds, seed):
        orders[r].append(name)
    return orders


def run_workload(workload: str, peers: Peers, tmp: Path, configs: Sequence[str], tree: Tree,
                 programs: dict[str, Path], rounds: int, sets: int, args: argparse.Namespace,
                 background: list[float], during: list[float],
                 discarded: list[Session]) -> list[Session]:
    """``rounds`` interleaved rounds over ``sets`` sets of fresh relay processes, each set
    after one unmeasured session through every configuration. A round in which a session
    ran with more than ``--max-other-load`` CPUs of other load goes to ``discarded`` and
    is run again (at most ``--max-redo`` times per set, default its rounds). ``background``:
    the other load sampled while idle before each set; ``during``: during each set."""
    sessions: list[Session] = []
    done = 0
    for set_index, share in enumerate(split(rounds, sets)):
        background.append(wait_idle(args.wait_idle))
        load = OtherLoad()
        relays = RelaySet(tmp, f"{workload[0]}{set_index}-", configs, tree, programs)
        redo = (share if args.max_redo is None else args.max_redo) if args.max_other_load else 0
        try:
            time.sleep(0.3)
            for name in configs:  # warm-up: a realize through each relay, not counted
                realize_or_boot(workload, peers, tmp, relays, name, args, warmup=True)
            orders = round_orders(configs, share, WORKLOADS.index(workload) * 100 + set_index)
            r = 0
            while r < share:
                if args.wait_idle:
                    wait_idle(args.wait_idle)
                this_round = []
                for name in orders[r]:
                    relays.check_alive()
                    out = realize_or_boot(workload, peers, tmp, relays, name, args)
                    s = Session(name, set_index, done + r)
                    s.cpu_ns, s.user_ns, s.sys_ns = out.pop("cpu")
                    s.messages = out["c2s"] + out["s2c"]
                    s.figures = out
                    this_round.append(s)
                    po.progress(f"{workload} set {set_index + 1}/{sets} round {r + 1}/{share} "
                                f"{name}: " + describe(workload, s))
                busy = [s for s in this_round
                        if s.figures["other_load_cpus"] > args.max_other_load]
                if busy and redo > 0:
                    redo -= 1
                    discarded.extend(this_round)
                    po.progress(f"{workload} round {r + 1} again: other load " + ", ".join(
                        f"{s.figures['other_load_cpus']:.2f} CPUs during {s.config}"
                        for s in busy))
                    continue
                sessions.extend(this_round)
                r += 1
        finally:
            relays.stop()
        during.append(load.cpus())
        po.progress(f"{workload} set {set_index + 1}/{sets}: other load {during[-1]:.2f} CPUs")
        done += share
    background.append(po.background_busy_cpus())
    return sessions


def realize_or_boot(workload: str, peers: Peers, tmp: Path, relays: RelaySet, name: str,
                    args: argparse.Namespace, warmup: bool = False) -> dict[str, Any]:
    if workload == "realize" or warmup:
        if workload == "io":  # a short session against the same server, no guest
            return warm_io(peers, tmp, relays, name, args.timeout)
        return realize_session(peers, tmp, relays, name, args.timeout)
    return io_session(peers, tmp, relays, name, args.window_start, args.window, args.timeout)


def warm_io(peers: Peers, tmp: Path, relays: RelaySet, name: str,
            timeout: float) -> dict[str, Any]:
    """A realize (-S) against the e1000e server through ``name``: warms the relay up."""
    relay = relays.relays[name]
    qmp_path = tmp / "qmp.sock"
    with contextlib.suppress(FileNotFoundError):
        qmp_path.unlink()
    server = start_server("qemu", peers, relays.servers[name], tmp / "qemu-server.log")
    proc = SPAWNED.spawn(client_argv(peers, relay.listen, qmp_path, qemu_log(tmp),
                                     stopped=True), tmp / "qemu-stderr.log")
    qmp = None
    try:
        qmp = QMP(qmp_path, proc, timeout)
    finally:
        finish(proc, server, qmp, timeout)
    relay.truncate_trace()
    return {}


def describe(workload: str, s: Session) -> str:
    f = s.figures
    cpu = f", relay {s.cpu_us_per_msg:.1f} us/msg" if s.cpu_us_per_msg else ""
    if workload == "realize":
        return f"span {f['span_ms']:.2f} ms, {s.messages} messages{cpu}"
    start = f"{f['io_start_s']:.2f}" if f["io_start_s"] is not None else "?"
    return (f"{f['window_c2s']} client messages in the window ({f['window_rate']:.0f}/s), "
            f"I/O from {start} s{cpu}")


# ----------------------------------------------------------------------------- summary


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (statistics.quantiles' 'inclusive' method)."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(workload: str, sessions: list[Session], configs: Sequence[str]) -> dict[str, Any]:
    key = "span_ms" if workload == "realize" else "window_c2s"
    rows: dict[str, dict[str, Any]] = {}
    by_round: dict[tuple[int, str], float] = {
        (s.round_index, s.config): float(s.figures[key]) for s in sessions}
    for name in configs:
        own = [s for s in sessions if s.config == name]
        if not own:
            continue
        values = [float(s.figures[key]) for s in own]
        row: dict[str, Any] = {
            "n": len(values),
            "p50": statistics.median(values),
            "p25": quantile(values, 0.25),
            "p75": quantile(values, 0.75),
            "min": min(values),
            "max": max(values),
            "values": values,
            "messages_per_session": statistics.median(s.messages for s in own),
        }
        if workload == "realize":
            row["version_rtt_p50_ms"] = statistics.median(
                s.figures["version_rtt_ms"] for s in own)
            row["rest_p50_ms"] = statistics.median(
                s.figures["span_ms"] - s.figures["version_rtt_ms"] for s in own)
            row["exec_to_qmp_p50_ms"] = statistics.median(s.figures["exec_to_qmp_ms"] for s in own)
            row["after_qmp_messages"] = sum(s.figures["after_qmp"] for s in own)
            row["pci"] = sorted({s.figures["pci"] for s in own})
        else:
            row["rate_p50"] = statistics.median(s.figures["window_rate"] for s in own)
            starts = [s.figures["io_start_s"] for s in own if s.figures["io_start_s"] is not None]
            row["io_start_p50_s"] = statistics.median(starts) if starts else None
            row["io_start_max_s"] = max(starts) if starts else None
            row["last_sent_min_s"] = min(s.figures["last_sent_s"] for s in own)
        loads = [s.figures["other_load_cpus"] for s in own]
        row["other_load_p50"] = statistics.median(loads)
        row["other_load_max"] = max(loads)
        row["disturbed_sessions"] = sum(x > 0.2 for x in loads)
        cpu = [s for s in own if s.cpu_ns]
        if cpu:
            msgs = sum(s.messages for s in cpu)
            per = [s.cpu_us_per_msg for s in cpu if s.cpu_us_per_msg is not None]
            row["cpu_us_per_msg"] = sum(s.cpu_ns for s in cpu) / msgs / 1000
            row["cpu_us_per_msg_p25"] = quantile(per, 0.25)
            row["cpu_us_per_msg_p75"] = quantile(per, 0.75)
            row["user_us_per_msg"] = sum(s.user_ns for s in cpu) / msgs / 1000
            row["sys_us_per_msg"] = sum(s.sys_ns for s in cpu) / msgs / 1000
        rows[name] = row
    for base, suffix in (("direct", "x_direct"), ("c-relay", "x_c")):
        if base not in rows:
            continue
        for name, row in rows.items():
            row[suffix] = row["p50"] / rows[base]["p50"]
            per_round = [v / by_round[(r, base)] for (r, n), v in by_round.items()
                         if n == name and (r, base) in by_round]
            row[f"{suffix}_rounds_p25"] = quantile(per_round, 0.25)
            row[f"{suffix}_rounds_p75"] = quantile(per_round, 0.75)
            by_set: dict[int, tuple[list[float], list[float]]] = {}
            for s in sessions:
                if s.config in (name, base):
                    pair = by_set.setdefault(s.set_index, ([], []))
                    pair[s.config != name].append(float(s.figures[key]))
            row[f"{suffix}_by_set"] = [round(statistics.median(a) / statistics.median(b), 3)
                                       for _, (a, b) in sorted(by_set.items()) if a and b]
    return rows


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_realize(rows: dict[str, dict[str, Any]]) -> None:
    print("\n### Realize + machine reset: QEMU 10.2 <-> libvfio-user samples/server\n")
    print("Span from QEMU's VERSION to its last reply, from its trace events (ms); ratios of "
          "the medians, in brackets the p25-p75 of the same-round ratios; the span's medians "
          "split into VERSION's round trip (with a relay's session start) and the rest.\n")
    print("| config | p50 ms | p25-p75 ms | / direct | / C relay | relay CPU us/msg "
          "(p25-p75) | msgs | VERSION rtt ms | rest ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['p50']:.2f} | {r['p25']:.2f}-{r['p75']:.2f} | "
              f"{ratio(r, 'x_direct')} | {ratio(r, 'x_c')} | {cpu_cell(r)} | "
              f"{r['messages_per_session']:.0f} | {fmt(r.get('version_rtt_p50_ms'), '.2f')} | "
              f"{fmt(r.get('rest_p50_ms'), '.2f')} |")
    sets: dict[str, list[float]] = {n: r["x_direct_by_set"] for n, r in rows.items()
                                    if n != "direct" and len(r.get("x_direct_by_set") or ()) > 1}
    if sets:
        print()
    for name, by_set in sets.items():
        print(f"- {name}: span / direct per set of relay processes: "
              + ", ".join(f"{x:.2f}" for x in by_set))


def print_io(rows: dict[str, dict[str, Any]], window_start: float, window: float) -> None:
    print("\n### Device I/O of a running guest: QEMU 10.2 <-> QEMU's vfio-user server (e1000e)"
          "\n")
    print(f"Client messages in [VERSION + {window_start:g} s, + {window:g} s) (iPXE polling "
          "the NIC); higher is better; ratios of the medians, in brackets the p25-p75 of the "
          "same-round ratios.\n")
    print("| config | p50 msgs | p25-p75 msgs | msgs/s | / direct | / C relay | relay CPU us/msg "
          "(p25-p75) | I/O from s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['p50']:.0f} | {r['p25']:.0f}-{r['p75']:.0f} | "
              f"{r['rate_p50']:.0f} | {ratio(r, 'x_direct')} | {ratio(r, 'x_c')} | "
              f"{cpu_cell(r)} | {fmt(r['io_start_p50_s'], '.2f')} |")


def ratio(row: dict[str, Any], suffix: str) -> str:
    if suffix not in row:
        return "-"
    return (f"{row[suffix]:.2f} ({row[f'{suffix}_rounds_p25']:.2f}-"
            f"{row[f'{suffix}_rounds_p75']:.2f})")


def cpu_cell(row: dict[str, Any]) -> str:
    if "cpu_us_per_msg" not in row:
        return "-"
    return (f"{row['cpu_us_per_msg']:.1f} ({row['cpu_us_per_msg_p25']:.1f}-"
            f"{row['cpu_us_per_msg_p75']:.1f})")


def compare(paths: Sequence[str]) -> None:
    """One row per configuration and saved run (``-o`` files): the ratios side by side."""
    runs = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        tree = data.get("vfioproxy_tree", {})
        label = (tree.get("commit") or "?")[:7] + ("+" if tree.get("dirty") else "")
        runs.append((label, Path(path).name, data))
    print("| config | code (run) | realize / direct | realize / C | realize CPU us/msg "
          "| io msgs / direct | io msgs / C | io CPU us/msg |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    names = [n for n in ALL_CONFIGS if any(n in d.get(w, {}) for _, _, d in runs
                                           for w in WORKLOADS)]
    for name in names:
        for label, file, data in runs:
            cells = []
            for w in WORKLOADS:
                row = data.get(w, {}).get(name)
                if row is None:
                    cells += ["-"] * 3
                    continue
                cells += [f"{row['x_direct']:.2f}" if "x_direct" in row else "-",
                          f"{row['x_c']:.2f}" if "x_c" in row else "-",
                          f"{row['cpu_us_per_msg']:.1f}" if "cpu_us_per_msg" in row else "-"]
            print(f"| {name} | {label} ({file}) | " + " | ".join(cells) + " |")


# ----------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (about 2 minutes)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help="of realize,io (default both)")
    parser.add_argument("--configs", help="configurations, of " + ",".join(ALL_CONFIGS)
                        + " (default: all for realize, all but record-inject for io)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 30 for "
                        "realize and 15 for io; --quick 3 and 2)")
    parser.add_argument("--sets", type=int, help="fresh sets of relay processes the rounds "
                        "are split over (default 3, --quick 1)")
    parser.add_argument("--window", type=float, default=6.0,
                        help="io: the window in which client messages are counted, s (6)")
    parser.add_argument("--window-start", type=float, default=3.0,
                        help="io: the window starts this long after QEMU's VERSION, s (3)")
    parser.add_argument("--qemu", help=f"QEMU with vfio-user-pci (else ${QEMU_VARIABLE})")
    parser.add_argument("--qemu-server", help="QEMU built with --enable-vfio-user-server "
                        f"(else ${QEMU_SERVER_VARIABLE}, else build-srv/ beside the client's "
                        "build)")
    parser.add_argument("--libvfio-user-build", help=f"libvfio-user's build directory "
                        f"(else ${LIBVFIO_USER_VARIABLE}, else .peers/libvfio-user/build)")
    parser.add_argument("--vfioproxy-tree", default=str(ROOT), help="checkout whose vfioproxy "
                        "the proxy configurations run (default: this one)")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                        help="before each set and each round, wait up to S s until something "
                        "else keeps at most 0.2 CPUs busy (default 0: do not wait)")
    parser.add_argument("--max-other-load", type=float, default=0.2, metavar="CPUS",
                        help="run a round again when something else kept more than CPUS busy "
                        "during one of its sessions (default 0.2; 0: never)")
    parser.add_argument("--max-redo", type=int, metavar="N", help="rounds run again at "
                        "most, per set (default: as many as the set has)")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="limit of every wait for a peer, s (30)")
    parser.add_argument("-o", "--output", default=str(BENCH / "results_real_peers.json"))
    parser.add_argument("--compare", nargs="+", metavar="JSON", help="measure nothing: the "
                        "ratios of saved runs (-o files) side by side, e.g. before and after")
    args = parser.parse_args()
    if args.compare:
        compare(args.compare)
        return 0

    workloads = [w for w in args.workloads.split(",") if w]
    if set(workloads) - set(WORKLOADS):
        parser.error(f"unknown --workloads (known: {', '.join(WORKLOADS)})")
    if args.configs:
        chosen = [c for c in args.configs.split(",") if c]
        if set(chosen) - set(ALL_CONFIGS):
            parser.error(f"unknown --configs (known: {', '.join(ALL_CONFIGS)})")
        configs = {w: [c for c in ALL_CONFIGS if c in chosen] for w in workloads}
    else:
        configs = {w: list(DEFAULT_CONFIGS[w]) for w in workloads}
    if args.sets is not None and args.sets < 1:
        parser.error("--sets must be at least 1")
    if args.window <= 0 or args.window_start < 0:
        parser.error("--window must be positive, --window-start not negative")
    full_rounds = {"realize": 30, "io": 15}  # a realize session takes 0.3 s, an io one 10 s
    rounds = {w: args.rounds or ((3 if w == "realize" else 2) if args.quick else full_rounds[w])
              for w in workloads}
    sets = {w: min(rounds[w], args.sets or (1 if args.quick else 3)) for w in workloads}

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started ignoring it
    peers = find_peers(args, workloads)
    for w in workloads:
        if w in peers.skip:
            print(f"skipped {w}: {peers.skip[w]}")
    runnable = [w for w in workloads if w not in peers.skip]
    if not runnable:
        return 0
    needs_proxy = any(c not in ("direct", "c-relay") for w in runnable for c in configs[w])
    tree = open_tree(Path(args.vfioproxy_tree)) if needs_proxy else Tree(
        Path(args.vfioproxy_tree), "", False, {})
    needs_c = any("c-relay" in configs[w] for w in runnable)
    if needs_c and shutil.which("cc") is None:
        print("skipped: the C relay needs cc (bench/c/vu_relay.c is compiled on first use)")
        return 0
    programs = po.build_c_programs() if needs_c else {}

    started = time.monotonic()
    results: dict[str, Any] = {
        "machine": po.machine_info(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "bench_commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                                       capture_output=True, text=True).stdout.strip(),
        "vfioproxy_tree": {"path": str(tree.path), "commit": tree.commit, "dirty": tree.dirty,
                           "imported": tree.imported},
        "qemu": str(peers.qemu), "qemu_version": peers.qemu_version,
        "qemu_server": str(peers.qemu_server) if peers.qemu_server else None,
        "libvfio_user_server": str(peers.lvu_server) if peers.lvu_server else None,
        "quick": args.quick, "rounds": rounds, "sets": sets, "configs": configs,
        "window_s": args.window, "window_start_s": args.window_start,
        "skipped": peers.skip,
    }
    print(f"vfioproxy from {tree.path} at {tree.commit[:12]}"
          + (" (with uncommitted changes in vfioproxy/ or recorder/)" if tree.dirty else "")
          + f"; plain messages take the {tree.imported.get('lane', '?')} lane",
          file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="vfioproxy-realpeers-"))
    global QEMU_LOG_DIR
    if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK):
        QEMU_LOG_DIR = Path(tempfile.mkdtemp(prefix="vfioproxy-realpeers-", dir="/dev/shm"))
    background = [results["machine"]["background_busy_cpus_at_start"]]
    during: dict[str, list[float]] = {}
    discarded: dict[str, list[Session]] = {}
    try:
        for w in runnable:
            sessions = run_workload(w, peers, tmp, configs[w], tree, programs, rounds[w],
                                    sets[w], args, background, during.setdefault(w, []),
                                    discarded.setdefault(w, []))
            results[w] = summarize(w, sessions, configs[w])
            for key, kept in (("sessions", sessions), ("discarded_sessions", discarded[w])):
                results[f"{w}_{key}"] = [
                    {"config": s.config, "set": s.set_index, "round": s.round_index,
                     "cpu_ns": s.cpu_ns, "user_ns": s.user_ns, "sys_ns": s.sys_ns,
                     "messages": s.messages, **s.figures} for s in kept]
    finally:
        SPAWNED.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
        if QEMU_LOG_DIR is not None:
            shutil.rmtree(QEMU_LOG_DIR, ignore_errors=True)
    results["background_busy_cpus"] = [round(x, 2) for x in background]
    results["other_load_cpus_during_sets"] = {w: [round(x, 2) for x in v]
                                              for w, v in during.items()}
    results["elapsed_s"] = round(time.monotonic() - started, 1)

    tree_note = f"{tree.commit[:12]}{' + uncommitted changes' if tree.dirty else ''}"
    print(f"\nvfioproxy: {tree.path} at {tree_note}; QEMU {peers.qemu_version}")
    if "realize" in results:
        print_realize(results["realize"])
        late = sum(r["after_qmp_messages"] for r in results["realize"].values())
        if late:
            print(f"\nnote: {late} messages came after QMP answered (not part of realize)")
    if "io" in results:
        print_io(results["io"], args.window_start, args.window)
        late_start = [n for n, r in results["io"].items()
                      if r["io_start_max_s"] is None or r["io_start_max_s"] > args.window_start]
        early_end = [n for n, r in results["io"].items()
                     if r["last_sent_min_s"] < args.window_start + args.window]
        if late_start:
            print(f"\nWARNING: in {', '.join(late_start)} the guest's I/O started after the "
                  "window opened in some session: raise --window-start")
        if early_end:
            print(f"\nWARNING: in {', '.join(early_end)} the client stopped sending before "
                  "the window closed in some session")
    busy = max(background)
    print(f"\nother load on the machine: {busy:.2f} CPUs busy (max of "
          f"{len(background)} 1-s idle samples before, between and after the sets)"
          + (" -- WARNING: the figures are disturbed" if busy > 0.2 else ""))
    for w in during:
        rows = results[w]
        disturbed = sum(r["disturbed_sessions"] for r in rows.values())
        total = sum(r["n"] for r in rows.values())
        print(f"{w}: {disturbed} of the {total} sessions kept ran while something else kept "
              "more than 0.2 CPUs busy; per configuration, median other load: " + ", ".join(
                  f"{n} {r['other_load_p50']:.2f}" for n, r in rows.items())
              + f"; {len(discarded.get(w, ())) // max(1, len(configs[w]))} rounds run again "
              f"for other load above {args.max_other_load:g} CPUs")
    for w, values in during.items():
        print(f"other load while measuring {w}: "
              + ", ".join(f"{x:.2f}" for x in values) + " CPUs (per set: the machine's busy "
              "time minus the benchmark's and its processes')"
              + (" -- WARNING: the figures are disturbed" if max(values) > 0.2 else ""))
    Path(args.output).write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {args.output} ({results['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        SPAWNED.stop_all()
        print("interrupted: every process of the run is stopped", file=sys.stderr)
        sys.exit(130)
    except SystemExit as stop:
        if stop.code not in (0, None) and isinstance(stop.code, int) and stop.code > 128:
            print(f"stopped by signal {stop.code - 128}: every process of the run is stopped",
                  file=sys.stderr)
        raise
