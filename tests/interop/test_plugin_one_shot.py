"""The pytest plugin against a one-shot server: libvfio-user's ``samples/server``
serves one client and exits. Real pytest runs (pytester, in a subprocess) of a
generated project whose server fixture starts a fresh ``samples/server``."""

from __future__ import annotations

import pytest

from tests.interop.conftest import LvuBuild
from vfioproxy.replay.script import load_script

#: ``samples_server`` starts a fresh samples/server per call (logged to starts.txt);
#: ``one_server`` is one samples/server for the whole test, by its path
CONFTEST = '''
import contextlib
import os
import signal
import subprocess
import tempfile
import time

import pytest

from vfioproxy.io.unix import is_listening

SERVER = os.environ["SAMPLES_SERVER"]


@contextlib.contextmanager
def samples_server():
    with tempfile.TemporaryDirectory(prefix="lvu-", dir="/tmp") as tmp:
        path = os.path.join(tmp, "s.sock")
        proc = subprocess.Popen([SERVER, "-v", path], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            limit = time.monotonic() + 20
            while not is_listening(path):
                assert proc.poll() is None and time.monotonic() < limit, "no samples/server"
                time.sleep(0.005)
            with open(os.path.join(os.environ["RUN_DIR"], "starts.txt"), "a") as log:
                log.write(path + "\\n")
            yield path
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def fresh_server():
    return samples_server


@pytest.fixture
def one_server():
    with samples_server() as path:
        yield path
'''

TEST = '''
import pytest

@pytest.mark.vfioproxy_trace("traces/realize.trace")
def test_realize(vfioproxy_replay, {fixture}):
    vfioproxy_replay.check_sync({fixture})
'''


@pytest.fixture
def project(pytester, monkeypatch, lvu: LvuBuild):
    pytester.makeconftest(CONFTEST)
    monkeypatch.setenv("SAMPLES_SERVER", str(lvu.server))
    monkeypatch.setenv("RUN_DIR", str(pytester.path))
    return pytester


def test_recording_and_replaying_each_start_a_fresh_one_shot_server(project):
    project.makepyfile(test_device=TEST.format(fixture="fresh_server"))
    result = project.runpytest_subprocess("-p", "no:cacheprovider",
                                          "--vfioproxy-record-mode=once")
    result.assert_outcomes(passed=1)
    assert len((project.path / "starts.txt").read_text().splitlines()) == 2
    script = load_script(project.path / "traces" / "realize.trace")
    assert len(script.steps) > 80  # the whole realize and reset, replayed without divergence


def test_one_socket_for_both_fails_in_one_line_once_the_server_has_exited(project):
    project.makepyfile(test_device=TEST.format(fixture="one_server"))
    result = project.runpytest_subprocess("-p", "no:cacheprovider",
                                          "--vfioproxy-record-mode=once")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*/traces/realize.trace against /tmp/lvu-*/s.sock could not "
                                 "run: cannot connect to the server at *"])
    assert "Traceback" not in result.stdout.str()
