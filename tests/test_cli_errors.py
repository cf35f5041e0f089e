"""Bad input to every verb: one line naming the verb, what was wrong and the
path or value (with the OS's words), exit 2; no traceback, no exception class."""

import json
import os
import re
import signal
import socket
import subprocess
import time

import pytest

from tests.realdata import TRACES
from tests.test_cli_live import VFIOPROXY, spawn, wait_for_socket  # noqa: F401 (a fixture)
from vfioproxy.cli import main

REALIZE = TRACES / "reference-realize-001.trace"

#: what must never reach a user: a traceback, an exception class, an errno number
LEAKS = re.compile(r"Traceback|\b[A-Z]\w*(Error|Exception|Group)\b|\[Errno")


def run(capsys, *argv):
    """``vfioproxy ARGV`` in this process: (exit code, stdout, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exited:  # argparse refuses a value
        code = exited.code
    out, err = capsys.readouterr()
    assert not LEAKS.search(err), err
    return code, out, err


def one_error_line(err):
    """The one line of stderr that is the error (argparse puts its usage above it)."""
    lines = [line for line in err.splitlines() if line.startswith("vfioproxy ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(("where", "words"), [
    ("nodir/d.sock", "No such file or directory"),
    ("afile/d.sock", "Not a directory"),
    ("a" * 120 + ".sock", "AF_UNIX path too long"),
])
def test_serve_device_names_a_socket_it_cannot_listen_on(capsys, tmp_path, where, words):
    (tmp_path / "afile").write_text("")
    path = tmp_path / where
    code, _, err = run(capsys, "serve-device", "--socket", path)
    assert code == 2
    assert one_error_line(err) == f"vfioproxy serve-device: cannot listen on {path}: {words}"


@pytest.mark.parametrize(("argv", "line"), [
    (["proxy", "--listen", "p.sock", "--server", "s.sock", "--mode", "999"],
     "vfioproxy proxy: error: argument --mode: expected an octal permission mode from 000 to "
     "777 such as 0600, got '999'"),
    (["serve-device", "--socket", "d.sock", "--vendor-id", "zz"],
     "vfioproxy serve-device: error: argument --vendor-id: expected a 16-bit PCI id from "
     "0x0000 to 0xffff such as 0x1b36, got 'zz'"),
    (["serve-device", "--socket", "d.sock", "--device-id", "0x12345"],
     "vfioproxy serve-device: error: argument --device-id: expected a 16-bit PCI id from "
     "0x0000 to 0xffff such as 0x1b36, got '0x12345'"),
    (["realize", "--socket", "d.sock", "--workload", "-3"],
     "vfioproxy realize: error: argument --workload: expected an integer >= 0, got -3"),
    (["realize", "--socket", "d.sock", "--timeout", "0"],
     "vfioproxy realize: error: argument --timeout: expected seconds > 0, got 0"),
    (["realize", "--socket", "d.sock", "--timeout", "nan"],
     "vfioproxy realize: error: argument --timeout: expected seconds > 0, got nan"),
    (["demo", "--workload", "-1"],
     "vfioproxy demo: error: argument --workload: expected an integer >= 0, got -1"),
    (["experiment", "--workload", "-1", "-o", "out/"],
     "vfioproxy experiment: error: argument --workload: expected an integer >= 0, got -1"),
    (["experiment", "--runs", "0", "-o", "out/"],
     "vfioproxy experiment: error: argument --runs: expected an integer >= 1, got 0"),
    (["record", "--listen", "p.sock", "--server", "s.sock", "-o", "t.trace",
      "--capture-fd-contents", "64q"],
     "vfioproxy record: error: argument --capture-fd-contents: expected a size in bytes such "
     "as 64k or 16M, got '64q'"),
    (["proxy", "--listen", "p.sock", "--server", "s.sock", "--grace", "-1"],
     "vfioproxy proxy: error: argument --grace: expected seconds >= 0, got -1"),
    (["replay", "client", "t.trace", "--server", "s.sock", "--speed", "0"],
     "vfioproxy replay client: error: argument --speed: expected a speed factor > 0, got 0"),
    (["ctl", "--control", "c.sock", "remove", "0"],
     "vfioproxy ctl remove: error: argument ID: expected an integer >= 1, got 0"),
])
def test_a_bad_value_is_refused_where_it_is_parsed_with_the_accepted_range(
        capsys, tmp_path, monkeypatch, argv, line):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert one_error_line(err) == line
    assert os.listdir(tmp_path) == []  # nothing was started, nothing written


def test_record_refuses_an_existing_trace_and_says_how_to_replace_it(capsys, tmp_path):
    existing = tmp_path / "old.trace"
    existing.write_bytes(b"an earlier recording")
    code, _, err = run(capsys, "record", "--listen", tmp_path / "p.sock",
                       "--server", tmp_path / "s.sock", "-o", existing)
    assert code == 2
    assert one_error_line(err) == (f"vfioproxy record: {existing} already exists "
                                   "(--force replaces it)")
    assert existing.read_bytes() == b"an earlier recording"
    assert not (tmp_path / "p.sock").exists()  # refused before listening


def test_record_that_cannot_listen_leaves_no_empty_trace_behind(capsys, tmp_path):
    trace = tmp_path / "t.trace"
    code, _, err = run(capsys, "record", "--listen", tmp_path / "nodir" / "p.sock",
                       "--server", tmp_path / "s.sock", "-o", trace)
    assert code == 2
    assert one_error_line(err).startswith(f"vfioproxy record: cannot listen on {tmp_path}")
    assert not trace.exists()  # a second try is not refused for a trace holding nothing


def test_record_force_that_cannot_listen_keeps_the_earlier_trace(capsys, tmp_path):
    existing = tmp_path / "old.trace"
    existing.write_bytes(b"an earlier recording")
    code, _, err = run(capsys, "record", "--listen", tmp_path / "nodir" / "p.sock",
                       "--server", tmp_path / "s.sock", "-o", existing, "--force")
    assert code == 2
    assert one_error_line(err).startswith(f"vfioproxy record: cannot listen on {tmp_path}")
    assert existing.read_bytes() == b"an earlier recording"  # opened only once listening


def test_record_names_a_rules_file_it_cannot_read(capsys, tmp_path):
    code, _, err = run(capsys, "record", "--listen", tmp_path / "p.sock", "--server",
                       tmp_path / "s.sock", "-o", tmp_path / "t.trace", "--rules", tmp_path)
    assert code == 2
    assert one_error_line(err) == (f"vfioproxy record: {tmp_path}: cannot read rules: "
                                   "Is a directory")


def test_a_rawcap_capture_given_to_trace_show_is_named_with_the_import_command(capsys, tmp_path):
    capture = tmp_path / "cap.jsonl"
    capture.write_text('{"format": "vfio-user-rawcap"}\n')
    code, out, err = run(capsys, "trace", "show", capture)
    assert code == 2 and out == ""
    assert one_error_line(err).endswith(
        f"it looks like a rawcap JSON-lines capture: `vfioproxy trace import {capture} TRACE` "
        "converts it")


@pytest.mark.parametrize("verb", [["trace", "show"], ["trace", "stats"],
                                  ["replay", "client", "--server", "s.sock"],
                                  ["replay", "server", "--listen", "r.sock"]])
def test_a_missing_or_wrong_trace_exits_2_in_every_verb(capsys, tmp_path, verb):
    missing, directory, junk = tmp_path / "none.trace", tmp_path / "dir", tmp_path / "junk.trace"
    directory.mkdir()
    junk.write_bytes(b"junk")
    name = " ".join(verb[:2])
    for path, words in ((missing, "No such file or directory"), (directory, "Is a directory"),
                        (junk, "not a vfioproxy trace")):
        code, _, err = run(capsys, *verb[:2], path, *verb[2:])
        assert code == 2
        assert one_error_line(err).startswith(f"vfioproxy {name}: {path}: {words}")


def test_replay_against_no_server_says_so_in_the_os_words(capsys, tmp_path):
    code, _, err = run(capsys, "replay", "client", REALIZE, "--server", tmp_path / "none.sock")
    assert code == 2
    assert one_error_line(err) == (f"vfioproxy replay client: cannot connect to the server at "
                                   f"{tmp_path / 'none.sock'}: No such file or directory")


def test_ctl_errors_are_one_line_and_exit_2(capsys, tmp_path):
    code, _, err = run(capsys, "ctl", "--control", tmp_path / "none.sock", "list")
    assert code == 2
    assert one_error_line(err) == (f"vfioproxy ctl list: cannot talk to the control socket "
                                   f"{tmp_path / 'none.sock'}: No such file or directory")


def test_experiment_output_that_is_a_file_is_refused(capsys, tmp_path):
    (tmp_path / "out").write_text("mine")
    code, _, err = run(capsys, "experiment", "--runs", "1", "-o", tmp_path / "out")
    assert code == 2
    assert one_error_line(err) == (f"vfioproxy experiment: {tmp_path / 'out'} exists and is "
                                   "not a directory")
    assert (tmp_path / "out").read_text() == "mine"


def test_a_failed_realize_exits_1_naming_the_step(capsys, tmp_path):
    code, _, err = run(capsys, "realize", "--socket", tmp_path / "none.sock")
    assert code == 1
    assert one_error_line(err) == (f"vfioproxy realize: the realize failed: R0 connect to "
                                   f"{tmp_path / 'none.sock'}: No such file or directory")


def test_control_socket_replies_name_no_exception_class(tmp_path, spawn):  # noqa: F811
    ctl = tmp_path / "ctl.sock"
    proxy = spawn("proxy", "--listen", tmp_path / "p.sock", "--server", tmp_path / "s.sock",
                  "--control", ctl)
    wait_for_socket(ctl, proxy)
    with socket.socket(socket.AF_UNIX) as sock:
        # the path appears at bind(), a moment before listen(): refused until then
        for _ in range(500):
            try:
                sock.connect(str(ctl))
                break
            except ConnectionRefusedError:
                time.sleep(0.01)
        else:
            raise AssertionError(f"nothing listens on {ctl}")
        lines = sock.makefile("rwb")
        for request in (b'{"op": "add", "rule": "c2s * frobnicate"}',
                        b'{"op": "remove", "id": 9}', b"[1e999]", b"{", b'{"op": 1}'):
            lines.write(request + b"\n")
            lines.flush()
            reply = json.loads(lines.readline())
            assert reply["ok"] is False and not LEAKS.search(reply["error"]), reply
    proxy.send_signal(signal.SIGINT)
    assert proxy.wait(timeout=10) == 0


def test_ctrl_c_exits_130_without_a_traceback(tmp_path, spawn):  # noqa: F811
    listen = tmp_path / "r.sock"
    replay = spawn("replay", "server", REALIZE, "--listen", listen)
    wait_for_socket(listen, replay)
    replay.send_signal(signal.SIGINT)
    _, err = replay.communicate(timeout=10)
    assert replay.returncode == 130
    assert err.splitlines()[-1] == "vfioproxy replay server: interrupted"
    assert not LEAKS.search(err), err


def test_python_dash_m_gives_the_same_one_line(tmp_path):
    path = tmp_path / "x" / "d.sock"
    result = subprocess.run([*VFIOPROXY, "serve-device", "--socket", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr == (f"vfioproxy serve-device: cannot listen on {path}: "
                             "No such file or directory\n")
