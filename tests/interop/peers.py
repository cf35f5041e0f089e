"""Real peer processes for the interop tests: start, wait, stop, and never leak one.

Every process is started in a session (and process group) of its own with
its output in log files (no pipe can fill up and stall it). ``close()``
SIGKILLs each process group, waits for it, then checks ``/proc`` that no
process of those groups is left: ``samples/client`` forks, and its original
process exec()s the destination server, so killing the pid we started is
not enough. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from vfioproxy.io.unix import is_listening

#: the vfioproxy program as the tests run it (the one installed in this venv)
VFIOPROXY = [sys.executable, "-m", "vfioproxy"]
#: runs a command as a child subreaper (see reaper.py)
REAPER = [sys.executable, str(Path(__file__).with_name("reaper.py"))]


class Deadline(Exception):
    """An interop test (or fixture) ran past its time limit."""


@contextlib.contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Raise :class:`Deadline` in the main thread after ``seconds`` (SIGALRM)."""

    def expired(signum: int, frame: Any) -> None:
        raise Deadline(f"{what}: still running after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Proc:
    """One started process (the leader of its own process group)."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], out: Path, err: Path,
                 started: float) -> None:
        self.name = name
        self.popen = popen
        self.out_path = out
        self.err_path = err
        self.started = started
        self.ended: float | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def out(self) -> str:
        return self.out_path.read_text(errors="replace")

    def err(self) -> str:
        return self.err_path.read_text(errors="replace")

    def poll(self) -> int | None:
        code = self.popen.poll()
        if code is not None and self.ended is None:
            self.ended = time.monotonic()
        return code

    def wait(self, timeout: float) -> int:
        """The exit code (negative: killed by that signal); fails after ``timeout``."""
        try:
            code = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} (pid {self.pid}) still running after {timeout:g} s\n"
                + self.describe()
            ) from None
        if self.ended is None:
            self.ended = time.monotonic()
        return code

    def stop(self, sig: int = signal.SIGINT, timeout: float = 15.0) -> int:
        """Send ``sig`` (if still running) and wait for the exit code."""
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
        return self.wait(timeout)

    @property
    def elapsed(self) -> float:
        end = self.ended if self.ended is not None else time.monotonic()
        return end - self.started

    def describe(self) -> str:
        return (f"--- {self.name} {self.popen.args!r}\n--- stdout:\n{self.out()[-4000:]}"
                f"\n--- stderr:\n{self.err()[-4000:]}")


class Peers:
    """Starts processes and guarantees they (and all they fork) are gone at close()."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.procs: list[Proc] = []

    def start(self, name: str, argv: Sequence[str | os.PathLike[str]], *,
              env: Mapping[str, str] | None = None,
              cwd: str | os.PathLike[str] | None = None) -> Proc:
        out = self.logdir / f"{name}.out"
        err = self.logdir / f"{name}.err"
        with open(out, "wb") as fout, open(err, "wb") as ferr:
            popen = subprocess.Popen(
                [os.fspath(a) for a in argv], stdin=subprocess.DEVNULL, stdout=fout,
                stderr=ferr, start_new_session=True, cwd=cwd,
                env=None if env is None else dict(env),
            )
        proc = Proc(name, popen, out, err, time.monotonic())
        self.procs.append(proc)
        return proc

    def vfioproxy(self, name: str, *args: str | os.PathLike[str]) -> Proc:
        return self.start(name, [*VFIOPROXY, *args])

    def wait_for_socket(self, path: Path, proc: Proc, timeout: float = 30.0) -> None:
        """Wait until a socket listens at ``path``; fail early if ``proc`` exits first.

        Listening, not only bound: a server's socket file appears at bind(), and a
        client that connects before its listen() is refused (libvfio-user's
        samples/client polls for the file and connects at once).
        """
        limit = time.monotonic() + timeout
        while not is_listening(path):
            if proc.poll() is not None:
                raise AssertionError(f"{proc.name} exited with {proc.popen.returncode} "
                                     f"before {path} appeared\n{proc.describe()}")
            if time.monotonic() > limit:
                raise AssertionError(f"{path} did not appear within {timeout:g} s\n"
                                     + proc.describe())
            time.sleep(0.005)

    def describe(self) -> str:
        return "\n".join(p.describe() for p in self.procs)

    def close(self) -> None:
        """SIGKILL every process group, reap, and fail if any process is left."""
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=10)
        left = _members_of({p.pid for p in self.procs})
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not left, f"processes left behind by the test: {left}"


def _members_of(groups: set[int]) -> list[int]:
    """Live (non-zombie) processes whose process group is one of ``groups``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        state, pgrp = fields[0], int(fields[2])
        if pgrp in groups and state != "Z":
            found.append(int(entry.name))
    return found


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
