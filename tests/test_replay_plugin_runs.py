"""The pytest plugin as a device-server project meets it: real pytest runs
(pytester, in a subprocess) of generated test files against the reference
device server."""

from __future__ import annotations

import shutil

import pytest

from tests.realdata import TRACES
from vfioproxy.replay.script import load_script

REALIZE = TRACES / "reference-realize-001.trace"  # the reference device, ids 1b36:1100

#: servers for the generated tests: ``device_server`` is an async factory, ``sync_server``
#: a sync one (the server in a thread); each start is logged to starts.txt
CONFTEST = '''
import os
import tempfile
import threading
from contextlib import asynccontextmanager, contextmanager

import pytest
import trio

from vfioproxy.peers.server import DeviceOptions, open_device_server

OPTIONS = DeviceOptions(device_id=int(os.environ.get("DEVICE_ID", "0x1100"), 0))


def log_start(path):
    with open(os.path.join(os.environ["RUN_DIR"], "starts.txt"), "a") as log:
        log.write(path + "\\n")


@pytest.fixture
def device_server():
    @asynccontextmanager
    async def start():
        with tempfile.TemporaryDirectory(prefix="dev-") as tmp:
            path = os.path.join(tmp, "device.sock")
            async with open_device_server(path, options=OPTIONS):
                log_start(path)
                yield path
    return start


@pytest.fixture
def sync_server():
    @contextmanager
    def start():
        with tempfile.TemporaryDirectory(prefix="dev-") as tmp:
            path = os.path.join(tmp, "device.sock")
            listening, stop = threading.Event(), threading.Event()

            async def serve():
                async with open_device_server(path, options=OPTIONS):
                    listening.set()
                    await trio.to_thread.run_sync(stop.wait)

            thread = threading.Thread(target=trio.run, args=(serve,))
            thread.start()
            try:
                assert listening.wait(10)
                log_start(path)
                yield path
            finally:
                stop.set()
                thread.join()
    return start
'''

ASYNC_TEST = '''
import pytest

@pytest.mark.vfioproxy_trace("traces/realize.trace")
async def test_realize(vfioproxy_replay, device_server):
    await vfioproxy_replay.check(device_server)
'''

SYNC_TEST = '''
import pytest

@pytest.mark.vfioproxy_trace("traces/realize.trace")
def test_realize(vfioproxy_replay, sync_server):
    vfioproxy_replay.check_sync(sync_server)
'''

DIVERGENCE = ("FIRST DIVERGENCE: message #29 REGION_READ reply (config space offset 0x0, "
              "4096 bytes): data[0x2:0x4] (device_id) 0x1101 != recorded 0x1100")


@pytest.fixture
def project(pytester, monkeypatch):
    """A device-server project: the servers' conftest, trio mode, the realize trace."""
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    (pytester.path / "traces").mkdir()
    shutil.copy(REALIZE, pytester.path / "traces" / "realize.trace")
    monkeypatch.setenv("RUN_DIR", str(pytester.path))
    return pytester


def starts(pytester) -> list[str]:
    log = pytester.path / "starts.txt"
    return log.read_text().splitlines() if log.exists() else []


def run(pytester, *args):
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)


@pytest.mark.parametrize("test", [ASYNC_TEST, SYNC_TEST], ids=["pytest-trio", "sync"])
def test_a_divergence_is_the_failure_message_without_a_traceback(project, monkeypatch, test):
    project.makepyfile(test_device=test)
    monkeypatch.setenv("DEVICE_ID", "0x1101")
    result = run(project)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    out = result.stdout.str()
    assert DIVERGENCE in out
    failure = out[out.index("_ test_realize _"):out.index("short test summary")]
    assert "Traceback" not in failure and "ExceptionGroup" not in failure
    assert "pytest_plugin.py" not in failure and "raise" not in failure
    result.stdout.fnmatch_lines(["FAILED test_device.py::test_realize - Failed: replay client of*"])


@pytest.mark.parametrize("test", [ASYNC_TEST, SYNC_TEST], ids=["pytest-trio", "sync"])
def test_a_device_that_answers_as_recorded_passes(project, test):
    project.makepyfile(test_device=test)
    result = run(project)
    result.assert_outcomes(passed=1)
    assert len(starts(project)) == 1  # replay only: one server


@pytest.mark.parametrize("test", [ASYNC_TEST, SYNC_TEST], ids=["pytest-trio", "sync"])
def test_recording_and_replaying_each_get_a_fresh_server_from_the_factory(project, test):
    (project.path / "traces" / "realize.trace").unlink()
    project.makepyfile(test_device=test)
    result = run(project, "--vfioproxy-record-mode=once")
    result.assert_outcomes(passed=1)
    first, second = starts(project)
    assert first != second  # two servers: one recorded, the other replayed
    assert load_script(project.path / "traces" / "realize.trace").steps[0].message.command == 1


def test_without_a_marker_the_trace_is_traces_module_test(project):
    project.makepyfile(test_device='''
        async def test_realize(vfioproxy_replay, device_server):
            await vfioproxy_replay.check(device_server)
            assert vfioproxy_replay.recorded
    ''')
    missing = run(project)
    assert missing.ret == pytest.ExitCode.TESTS_FAILED
    missing.stdout.fnmatch_lines(["*traces/test_device/test_realize.trace does not exist and the "
                                  "record mode is none; record it with "
                                  "--vfioproxy-record-mode=once*"])
    run(project, "--vfioproxy-record-mode=once").assert_outcomes(passed=1)
    assert (project.path / "traces" / "test_device" / "test_realize.trace").is_file()


def test_the_default_trace_path_is_set_in_the_ini(project):
    project.makeini("[pytest]\ntrio_mode = true\n"
                    "vfioproxy_trace_path = recorded/{module}-{test}.vtrace\n")
    project.makepyfile(test_device='''
        import pytest

        @pytest.mark.vfioproxy_trace(record_mode="once")
        async def test_realize(vfioproxy_replay, device_server):
            await vfioproxy_replay.check(device_server)
    ''')
    run(project).assert_outcomes(passed=1)
    assert (project.path / "recorded" / "test_device-test_realize.vtrace").is_file()


def test_rewrite_records_anew_although_the_trace_exists(project):
    project.makepyfile(test_device=ASYNC_TEST)
    trace = project.path / "traces" / "realize.trace"
    before = load_script(trace).steps[0].t_ns
    run(project, "--vfioproxy-record-mode=rewrite").assert_outcomes(passed=1)
    assert load_script(trace).steps[0].t_ns != before
    assert len(starts(project)) == 2
    once = load_script(trace).steps[0].t_ns
    run(project, "--vfioproxy-record-mode=once").assert_outcomes(passed=1)
    assert load_script(trace).steps[0].t_ns == once  # once: the trace exists, kept


@pytest.mark.parametrize(
    ("marker", "says"),
    [
        ('ignore=["REGION_RAED:data"]', "bad ignore rule 'REGION_RAED:data': unknown command "
                                        "'REGION_RAED' (did you mean REGION_READ?)"),
        ('ignore="REGION_READ:dtaa"', "unknown field 'dtaa' (did you mean data?)"),
        ('ignore=["data[0x2"]', "malformed field 'data[0x2'"),
        ('ignroe=["data"]', "unknown keyword ignroe=['data'] (did you mean ignore?)"),
        ('match_on="offset"', "unknown keyword match_on='offset'"),
        ('record_mode="onse"', "unknown record_mode 'onse' (did you mean once?)"),
        ('timing="fast"', "'timing' must be in ('asap', 'recorded')"),
    ],
)
def test_a_marker_mistake_stops_the_run_at_collection_with_the_nearest_name(
    project, marker, says
):
    project.makepyfile(test_device=f'''
        import pytest

        @pytest.mark.vfioproxy_trace("traces/realize.trace", {marker})
        async def test_realize(vfioproxy_replay, device_server):
            await vfioproxy_replay.check(device_server)
    ''')
    result = run(project)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    [line] = [line for line in result.stderr.lines if line]
    assert line.startswith("ERROR: test_device.py::test_realize: @pytest.mark.vfioproxy_trace: ")
    assert says in line
    assert "Traceback" not in result.stderr.str() + result.stdout.str()
    assert starts(project) == []


@pytest.mark.parametrize("test", [ASYNC_TEST.replace("check(device_server)", "check(SOCK)"),
                                  SYNC_TEST.replace("check_sync(sync_server)",
                                                    "check_sync(SOCK)")],
                         ids=["pytest-trio", "sync"])
def test_a_replay_that_cannot_run_fails_in_one_line(project, test):
    project.makepyfile(test_device='SOCK = "/nonexistent/device.sock"\n' + test)
    result = run(project)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    out = result.stdout.str()
    failure = out[out.index("_ test_realize _"):out.index("short test summary")]
    assert failure.splitlines()[1:-1] == [
        f"replaying {project.path / 'traces' / 'realize.trace'} against "
        "/nonexistent/device.sock could not run: cannot connect to the server at "
        "/nonexistent/device.sock: No such file or directory"]


@pytest.mark.parametrize(
    ("test", "says"),
    [
        (ASYNC_TEST.replace("await vfioproxy_replay.check(", "vfioproxy_replay.check_sync("),
         "vfioproxy_replay.check_sync() runs a trio loop of its own: in an async test, "
         "await vfioproxy_replay.check(...)"),
        (SYNC_TEST.replace("check_sync(sync_server)", "check_sync(lambda: 'dev.sock')"),
         "the server factory <function test_realize.<locals>.<lambda> at 0x*> returned "
         "'dev.sock', not a context manager (async or not) yielding a socket path"),
    ],
    ids=["check_sync in an async test", "a factory that is no context manager"],
)
def test_a_misused_fixture_fails_in_one_line_saying_what_to_do(project, test, says):
    project.makepyfile(test_device=test)
    result = run(project)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    out = result.stdout.str()
    failure = out[out.index("_ test_realize _"):out.index("short test summary")]
    assert len(failure.splitlines()) == 3, failure  # the title, the message, the rule
    result.stdout.fnmatch_lines([says])
