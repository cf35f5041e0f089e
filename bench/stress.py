"""Long stress runs of the proxy, outside the test suite (figures in README).

    .venv/bin/python bench/stress.py frames   [--frames 100000] [--forwarding threads|trio]
    .venv/bin/python bench/stress.py sessions [--sessions 10000] [--concurrency 100]
    .venv/bin/python bench/stress.py kills    [--kills 20]
    .venv/bin/python bench/stress.py huge     [--size 600M]
    .venv/bin/python bench/stress.py outstanding [--commands 1000000]
    .venv/bin/python bench/stress.py all      (each with its defaults, a table at the end)

Each runs `vfioproxy record` as a separate process, as a user does, and checks
what the issue of the forwarding path asks: the proxy survives (it still
serves a new session at the end), its fds and threads return to what it had
before the load, and nothing is lost: every byte each side sent is in the
trace in order, and what each receiver got is what the trace says it got.

- ``frames``: hostile frames both ways at once on one session: random
  headers (sizes below 16, above the limit, at the limit, fds-only
  messages, unknown commands and flags), random splits of the byte stream
  into writes, fds on random writes (some beyond one sendmsg's 253), torn
  ends; the server side reads everything and sends its own hostile frames.
- ``sessions``: many short sessions (VERSION and two REGION_READs each)
  against ``vfioproxy serve-device``, ``--concurrency`` at a time, through
  the proxy and directly; failures of each are counted.
- ``kills``: a client keeps a realize-like stream going and the recorder is
  SIGKILLed at a random moment, again and again: every message the client
  got a reply to must be in the trace, at most the record being written is
  lost, and the trace reads back.
- ``huge``: a VERSION offering 1 GiB transfers, then one message of
  ``--size``: it is forwarded whole, recorded truncated, and the recorder's
  peak RSS stays near its buffer limit.
- ``outstanding``: ``--commands`` REGION_READs the server never answers,
  through ``record --check-live`` (the path that pairs requests): the
  recorder's RSS stays bounded, and drops back when the client leaves.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from recorder.reader import TraceReader  # noqa: E402
from recorder.records import EventRecord, MessageRecord  # noqa: E402
from vfioproxy.io.unix import is_listening  # noqa: E402
from vfioproxy.protocol.bodies import RegionAccessBody, VersionBody  # noqa: E402
from vfioproxy.protocol.capabilities import Capabilities  # noqa: E402
from vfioproxy.protocol.codec import build_command, build_reply, encode  # noqa: E402
from vfioproxy.protocol.header import HEADER_STRUCT, Command  # noqa: E402

VFIOPROXY = [sys.executable, "-m", "vfioproxy"]
SCM = (socket.SOL_SOCKET, socket.SCM_RIGHTS)


# --------------------------------------------------------------------- processes


class Recorder:
    """A `vfioproxy record` process in front of ``server``."""

    def __init__(self, tmp: Path, server: Path, *extra: str, name: str = "p") -> None:
        self.listen = tmp / f"{name}.sock"
        self.trace = tmp / f"{name}.trace"
        self.log = open(tmp / f"{name}.log", "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [*VFIOPROXY, "record", "--listen", str(self.listen), "--server", str(server),
             "-o", str(self.trace), "--force", *extra],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
        )
        wait_for(self.listen, self.proc)
        self.base_fds = fd_count(self.proc.pid)
        self.base_threads = thread_count(self.proc.pid)

    def stop(self, sig: int = signal.SIGINT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=60)
        self.log.close()
        return code


def wait_for(path: Path, proc: subprocess.Popen[Any], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not is_listening(path):  # not only bound: a connect before listen() is refused
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[2:4]} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{path} did not appear")
        time.sleep(0.02)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def settle(rec: Recorder, timeout: float = 30.0) -> tuple[int, int]:
    """Wait until the recorder's fds and threads are back to their baseline;
    returns how far above it they stayed."""
    deadline = time.monotonic() + timeout
    while True:
        fds = fd_count(rec.proc.pid) - rec.base_fds
        threads = thread_count(rec.proc.pid) - rec.base_threads
        if (fds <= 0 and threads <= 0) or time.monotonic() > deadline:
            return fds, threads
        time.sleep(0.05)


@contextlib.contextmanager
def device_server(tmp: Path) -> Iterator[Path]:
    """`vfioproxy serve-device` on a socket in ``tmp`` for the body of the ``with``."""
    device = tmp / "dev.sock"
    server = subprocess.Popen([*VFIOPROXY, "serve-device", "--socket", str(device)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        wait_for(device, server)
        yield device
    finally:
        server.kill()
        server.wait()


def raw_server(tmp: Path) -> tuple[Path, socket.socket]:
    """A listening socket in ``tmp`` for a server this script plays itself."""
    path = tmp / "server.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)
    return path, listener


def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    return sock


def read_all(sock: socket.socket, out: bytearray, fds: list[int]) -> None:
    """Read ``sock`` to EOF into ``out``, counting (and closing) fds."""
    while True:
        try:
            data, anc, _, _ = sock.recvmsg(1 << 16, socket.CMSG_LEN(253 * 4))
        except ConnectionResetError:
            return
        for level, kind, blob in anc:
            if (level, kind) == SCM:
                numbers = array("i")
                numbers.frombytes(blob[: len(blob) - len(blob) % 4])
                fds.append(len(numbers))
                for fd in numbers:
                    os.close(fd)
        if not data:
            return
        out += data


def trace_bytes(path: Path, session: int | None = None) -> dict[str, Any]:
    """Per direction: the bytes recorded, and the seqs of undelivered messages."""
    out: dict[str, Any] = {"c2s": bytearray(), "s2c": bytearray(), "undelivered": {},
                           "records": {}, "messages": 0}
    with TraceReader(path) as reader:
        for record in reader:
            if session is not None and record.session != session:
                continue
            if isinstance(record, MessageRecord):
                out[record.direction.value] += record.data
                out["records"][record.seq] = record
                out["messages"] += 1
            elif isinstance(record, EventRecord) and record.kind == "undelivered":
                out["undelivered"][record.data["seq"]] = record.data
        out["truncation"] = reader.truncation
    return out


def delivered(trace: dict[str, Any], direction: str) -> bytes:
    """What the trace says the receiver of ``direction`` got."""
    got = bytearray()
    for seq, record in trace["records"].items():
        if record.direction.value != direction:
            continue
        lost = trace["undelivered"].get(seq)
        got += record.data if lost is None else record.data[: lost["delivered"]]
    return bytes(got)


def new_session_works(rec: Recorder, server_sock: socket.socket | None = None) -> bool:
    """A fresh client gets through (the proxy survived)."""
    try:
        with connect(rec.listen) as sock:
            sock.settimeout(5)
            sock.sendall(encode(build_command(Command.VERSION, 0,
                                              VersionBody.build(0, 0, None)))[0])
            if server_sock is not None:
                return True
            return len(sock.recv(4096)) >= 16
    except OSError:
        return False


# --------------------------------------------------------------------- frames


def hostile_stream(rng: random.Random, frames: int) -> list[tuple[bytes, int]]:
    """(bytes, fds to attach) writes of ``frames`` hostile frames."""
    writes: list[tuple[bytes, int]] = []
    pending = bytearray()
    for i in range(frames):
        kind = rng.random()
        if kind < 0.5:
            body = rng.randbytes(rng.choice((0, 4, 16, 40, 300)))
            size = 16 + len(body)
        elif kind < 0.65:
            body, size = b"", rng.choice((0, 1, 8, 15))  # below 16: a header alone
        elif kind < 0.75:
            body, size = b"", rng.choice((0xFFFFFFFF, 64 << 20, (1 << 20) + 33))  # too large
        else:
            body = rng.randbytes(rng.randrange(0, 64))
            size = 16 + len(body)
        command = rng.choice((*map(int, Command), 0, 14, 19, 0xFFFF))
        flags = rng.choice((0, 1, 0x10, 0x21, 0x40, 0xF))
        pending += HEADER_STRUCT.pack(i & 0xFFFF, command, size, flags, 0) + body
        if rng.random() < 0.3 or i == frames - 1:
            while pending:  # split the stream at random points
                cut = rng.randrange(1, min(len(pending), 512) + 1)
                fds = rng.choice((0, 0, 0, 0, 1, 3, 40)) if rng.random() < 0.05 else 0
                writes.append((bytes(pending[:cut]), fds))
                del pending[:cut]
    return writes


def send_writes(sock: socket.socket, writes: list[tuple[bytes, int]], sent: bytearray) -> None:
    for data, nfds in writes:
        fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nfds)]
        try:
            anc = [(*SCM, array("i", fds))] if fds else []
            n = sock.sendmsg([data], anc)
            while n < len(data):
                n += sock.send(data[n:])
            sent += data
        except OSError:
            return
        finally:
            for fd in fds:
                os.close(fd)


def run_frames(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="vfioproxy-stress-") as tmp_text:
        tmp = Path(tmp_text)
        server_path, listener = raw_server(tmp)
        rec = Recorder(tmp, server_path, "--forwarding", args.forwarding)
        c2s_writes = hostile_stream(rng, args.frames)
        s2c_writes = hostile_stream(rng, args.frames)
        client = connect(rec.listen)
        server, _ = listener.accept()
        sent = {"c2s": bytearray(), "s2c": bytearray()}
        got = {"c2s": bytearray(), "s2c": bytearray()}
        fds_got: dict[str, list[int]] = {"c2s": [], "s2c": []}
        started = time.monotonic()
        threads = [
            threading.Thread(target=send_writes, args=(client, c2s_writes, sent["c2s"])),
            threading.Thread(target=send_writes, args=(server, s2c_writes, sent["s2c"])),
            threading.Thread(target=read_all, args=(server, got["c2s"], fds_got["c2s"])),
            threading.Thread(target=read_all, args=(client, got["s2c"], fds_got["s2c"])),
        ]
        for thread in threads:
            thread.start()
        for thread in threads[:2]:
            thread.join()
        client.shutdown(socket.SHUT_WR)
        server.shutdown(socket.SHUT_WR)
        for thread in threads[2:]:
            thread.join(timeout=120)
        elapsed = time.monotonic() - started
        client.close()
        server.close()
        leaked_fds, leaked_threads = settle(rec)
        alive = rec.proc.poll() is None
        probe = threading.Thread(target=lambda: listener.accept()[0].close())
        probe.start()
        works = new_session_works(rec, listener)
        probe.join(timeout=10)
        code = rec.stop()
        listener.close()
        trace = trace_bytes(rec.trace, session=1)
        result = {
            "frames per direction": args.frames,
            "forwarding": args.forwarding,
            "seconds": round(elapsed, 1),
            "proxy survived": alive and works and code == 0,
            "fds left over": leaked_fds,
            "threads left over": leaked_threads,
        }
        for direction in ("c2s", "s2c"):
            recorded = bytes(trace[direction])
            result[f"{direction} bytes sent"] = len(sent[direction])
            result[f"{direction} bytes lost (sent, not in the trace)"] = (
                len(sent[direction]) - len(recorded) if sent[direction].startswith(recorded)
                else f"MISMATCH at {_first_difference(sent[direction], recorded)}")
            result[f"{direction} receiver got what the trace says"] = (
                bytes(got[direction]) == delivered(trace, direction))
        result["trace torn"] = trace["truncation"]
        return result


def _first_difference(a: bytes | bytearray, b: bytes | bytearray) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


# --------------------------------------------------------------------- sessions


def session_client(path: Path, rounds: int) -> bool:
    try:
        with connect(path) as sock:
            sock.settimeout(10)
            sock.sendall(encode(build_command(Command.VERSION, 0,
                                              VersionBody.build(0, 0, None)))[0])
            _recv_message(sock)
            for msg_id in range(1, rounds + 1):
                sock.sendall(encode(build_command(Command.REGION_READ, msg_id,
                                                  RegionAccessBody(0, 7, 4)))[0])
                _recv_message(sock)
        return True
    except OSError:
        return False


def _recv_message(sock: socket.socket) -> bytes:
    header = _recv_exactly(sock, 16)
    size = struct.unpack_from("<I", header, 4)[0]
    return header + _recv_exactly(sock, max(0, size - 16))


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionResetError("EOF")
        data += chunk
    return data


def run_many(path: Path, sessions: int, concurrency: int) -> tuple[int, float]:
    failures = 0
    lock = threading.Lock()
    left = [sessions]

    def worker() -> None:
        nonlocal failures
        while True:
            with lock:
                if not left[0]:
                    return
                left[0] -= 1
            if not session_client(path, 2):
                with lock:
                    failures += 1

    started = time.monotonic()
    workers = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    return failures, time.monotonic() - started


def run_sessions(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vfioproxy-stress-") as tmp_text:
        tmp = Path(tmp_text)
        with device_server(tmp) as device:
            rec = Recorder(tmp, device, "--forwarding", args.forwarding)
            direct_failures, direct_s = run_many(device, args.sessions, args.concurrency)
            proxy_failures, proxy_s = run_many(rec.listen, args.sessions, args.concurrency)
            leaked_fds, leaked_threads = settle(rec)
            works = session_client(rec.listen, 1)
            code = rec.stop()
        with TraceReader(rec.trace) as reader:
            closes = sum(1 for r in reader if isinstance(r, EventRecord)
                         and r.kind == "session_close")
        return {
            "sessions": args.sessions,
            "concurrency": args.concurrency,
            "forwarding": args.forwarding,
            "direct failures": direct_failures,
            "proxied failures": proxy_failures,
            "direct seconds": round(direct_s, 1),
            "proxied seconds": round(proxy_s, 1),
            "sessions closed in the trace": closes,
            "proxy survived": works and code == 0,
            "fds left over": leaked_fds,
            "threads left over": leaked_threads,
        }


# --------------------------------------------------------------------- kills


def run_kills(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    lost_total = 0
    worst = 0
    replied_total = 0
    unreadable = 0
    with tempfile.TemporaryDirectory(prefix="vfioproxy-stress-") as tmp_text:
        tmp = Path(tmp_text)
        with device_server(tmp) as device:
            for kill in range(args.kills):
                rec = Recorder(tmp, device, name=f"k{kill}")
                replied: list[bytes] = []  # commands and their replies the client got
                stop = threading.Event()

                def client(path: Path = rec.listen, out: list[bytes] = replied,
                           done: threading.Event = stop) -> None:
                    try:
                        with connect(path) as sock:
                            sock.settimeout(5)
                            sock.sendall(encode(build_command(
                                Command.VERSION, 0, VersionBody.build(0, 0, None)))[0])
                            _recv_message(sock)
                            msg_id = 1
                            while not done.is_set():
                                command = encode(build_command(
                                    Command.REGION_READ, msg_id & 0xFFFF,
                                    RegionAccessBody(msg_id, 7, 4)))[0]
                                sock.sendall(command)
                                reply = _recv_message(sock)
                                out += (command, reply)  # both forwarded for sure
                                msg_id += 1
                    except OSError:
                        return

                thread = threading.Thread(target=client)
                thread.start()
                time.sleep(rng.uniform(0.05, 0.5))
                os.kill(rec.proc.pid, signal.SIGKILL)
                rec.proc.wait()
                stop.set()
                thread.join()
                rec.log.close()
                try:
                    trace = trace_bytes(rec.trace)
                except Exception:
                    unreadable += 1
                    continue
                recorded = {bytes(r.data) for r in trace["records"].values()}
                lost = sum(1 for message in replied if message not in recorded)
                lost_total += lost
                worst = max(worst, lost)
                replied_total += len(replied)
    return {
        "kills": args.kills,
        "commands and replies forwarded before the kills": replied_total,
        "of them missing from the traces": lost_total,
        "most missing in one kill": worst,
        "traces that did not read back": unreadable,
    }


# --------------------------------------------------------------------- huge


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.lower().removesuffix("b")
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def run_huge(args: argparse.Namespace) -> dict[str, Any]:
    size = parse_size(args.size)
    caps = Capabilities(max_data_xfer_size=1 << 30)
    with tempfile.TemporaryDirectory(prefix="vfioproxy-stress-") as tmp_text:
        tmp = Path(tmp_text)
        server_path, listener = raw_server(tmp)
        rec = Recorder(tmp, server_path)
        base_rss = peak_rss_kib(rec.proc.pid)
        client = connect(rec.listen)
        server, _ = listener.accept()
        client.sendall(encode(build_command(Command.VERSION, 0, VersionBody.build(0, 0, caps)))[0])
        _recv_message(server)
        server.sendall(encode(build_reply(build_command(Command.VERSION, 0),
                                          VersionBody.build(0, 0, caps)))[0])
        _recv_message(client)
        head = HEADER_STRUCT.pack(1, Command.REGION_WRITE, size, 0, 0)
        head += struct.pack("<QII", 0, 2, size - 32)
        got = bytearray()
        fds: list[int] = []
        reader = threading.Thread(target=read_all, args=(server, got, fds))
        reader.start()
        started = time.monotonic()
        client.sendall(head)
        chunk = bytes(1 << 20)
        left = size - len(head)
        while left:
            n = min(left, len(chunk))
            client.sendall(chunk[:n])
            left -= n
        client.close()
        reader.join(timeout=300)
        elapsed = time.monotonic() - started
        peak = peak_rss_kib(rec.proc.pid)
        server.close()
        code = rec.stop()
        listener.close()
        records = [r for r in TraceReader(rec.trace) if isinstance(r, MessageRecord)]
        big = records[-1]
    return {
        "message bytes": size,
        "forwarded whole": len(got) == size and bytes(got[:len(head)]) == head,
        "MiB/s": round(size / elapsed / (1 << 20)),
        "recorded bytes": len(big.data),
        "recorded length": big.length,
        "recorder RSS before, KiB": base_rss,
        "recorder peak RSS, KiB": peak,
        "proxy exit status": code,
    }


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def run_outstanding(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vfioproxy-stress-") as tmp_text:
        tmp = Path(tmp_text)
        server_path, listener = raw_server(tmp)
        rec = Recorder(tmp, server_path, "--check-live")
        before = rss_kib(rec.proc.pid)
        client = connect(rec.listen)
        server, _ = listener.accept()
        got = bytearray()
        reader = threading.Thread(target=read_all, args=(server, got, []))
        reader.start()  # the server reads everything and answers nothing
        client.sendall(encode(build_command(Command.VERSION, 0, VersionBody.build(0, 0, None)))[0])
        batch = b"".join(encode(build_command(Command.REGION_READ, i & 0xFFFF,
                                              RegionAccessBody(i, 7, 4)))[0]
                         for i in range(1000))
        started = time.monotonic()
        for _ in range(args.commands // 1000):
            client.sendall(batch)
        expected = 1 + 1000 * (args.commands // 1000)
        deadline = time.monotonic() + 600
        while len(got) < len(batch) * (args.commands // 1000) and time.monotonic() < deadline:
            time.sleep(0.1)
        elapsed = time.monotonic() - started
        during = rss_kib(rec.proc.pid)
        peak = peak_rss_kib(rec.proc.pid)
        client.close()
        server.close()
        reader.join(timeout=60)
        settle(rec)
        time.sleep(0.5)
        after = rss_kib(rec.proc.pid)
        code = rec.stop()
        listener.close()
        with TraceReader(rec.trace) as trace:
            kinds: dict[str, int] = {}
            for record in trace:
                if isinstance(record, EventRecord):
                    kinds[record.kind] = kinds.get(record.kind, 0) + 1
        return {
            "unanswered commands": expected - 1,
            "seconds": round(elapsed, 1),
            "recorder RSS before, KiB": before,
            "recorder RSS with them outstanding, KiB": during,
            "recorder peak RSS, KiB": peak,
            "recorder RSS after the client left, KiB": after,
            "events recorded": kinds,
            "proxy exit status": code,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("frames", "sessions", "kills", "huge", "outstanding",
                                         "all"))
    parser.add_argument("--commands", type=int, default=1_000_000)
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--size", default="600M")
    parser.add_argument("--forwarding", choices=("threads", "trio"), default="threads")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    runs = {"frames": run_frames, "sessions": run_sessions, "kills": run_kills,
            "huge": run_huge, "outstanding": run_outstanding}
    chosen = list(runs) if args.what == "all" else [args.what]
    for name in chosen:
        result = runs[name](args)
        print(f"== {name}")
        for key, value in result.items():
            print(f"  {key:<48} {value}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
