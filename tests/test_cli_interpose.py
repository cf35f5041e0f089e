"""Interposition from the command line: ``--trap-mmap`` and a rules file's
``[interpose]`` table turn modes on (recorded in ``session_open``); a bad
table is one error line naming the file and the key."""

import signal

from recorder.reader import TraceReader
from recorder.records import EventRecord
from tests.test_cli_errors import one_error_line, run
from tests.test_cli_inject import device  # noqa: F401 (a fixture)
from tests.test_cli_inject import run as run_cli
from tests.test_cli_live import spawn, wait_for_socket  # noqa: F401 (a fixture)


def opened(path):
    with TraceReader(path) as reader:
        return [r for r in reader if isinstance(r, EventRecord) and r.kind == "session_open"]


def test_an_interpose_table_turns_modes_on(tmp_path, spawn, device):  # noqa: F811
    rules = tmp_path / "rules.toml"
    rules.write_text('[interpose]\ntrap-mmap = true\n')
    listen, trace = tmp_path / "p.sock", tmp_path / "t.trace"
    proxy = spawn("record", "--listen", listen, "--server", device, "-o", trace,
                  "--rules", rules)
    wait_for_socket(listen, proxy)
    result = run_cli("realize", "--socket", listen)
    assert result.returncode == 0, result.stderr
    proxy.send_signal(signal.SIGINT)
    _, err = proxy.communicate(timeout=10)
    assert proxy.returncode == 0, err
    (session,) = opened(trace)
    assert session.data["interpose"] == {"trap-mmap": True}
    assert "inject" not in session.data  # a table of modes alone turns no injection on


def test_without_modes_session_open_says_nothing_of_them(tmp_path, spawn, device):  # noqa: F811
    listen, trace = tmp_path / "p.sock", tmp_path / "t.trace"
    proxy = spawn("record", "--listen", listen, "--server", device, "-o", trace)
    wait_for_socket(listen, proxy)
    assert run_cli("realize", "--socket", listen).returncode == 0
    proxy.send_signal(signal.SIGINT)
    proxy.communicate(timeout=10)
    (session,) = opened(trace)
    assert "interpose" not in session.data


def test_a_bad_interpose_table_is_one_line(capsys, tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text('[interpose]\ntrap-mmapp = true\n')
    code, _, err = run(capsys, "record", "--listen", tmp_path / "p.sock", "--server",
                       tmp_path / "s.sock", "-o", tmp_path / "t.trace", "--rules", rules)
    assert code == 2
    assert one_error_line(err) == (
        f"vfioproxy record: {rules}: [interpose]: unknown key 'trap-mmapp' "
        "(known: trap-mmap, trap-dma, interpose-irqs)")
    rules.write_text('[interpose]\ntrap-mmap = "yes"\n')
    code, _, err = run(capsys, "proxy", "--listen", tmp_path / "p.sock", "--server",
                       tmp_path / "s.sock", "--rules", rules)
    assert code == 2
    assert one_error_line(err) == (
        f"vfioproxy proxy: {rules}: [interpose]: trap-mmap must be true or false")
    assert not (tmp_path / "p.sock").exists()
