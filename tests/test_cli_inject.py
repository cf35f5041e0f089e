"""Fault injection from the command line: --rule/--rules/--seed, the control socket, ctl."""

import json
import re
import signal
import subprocess

import pytest

from recorder.reader import TraceReader
from recorder.records import EventRecord
from tests.test_cli_live import VFIOPROXY, spawn, wait_for_socket  # noqa: F401 (fixture)


def run(*args, timeout=60):
    return subprocess.run([*VFIOPROXY, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def events(path, kind):
    with TraceReader(path) as reader:
        return [r for r in reader if isinstance(r, EventRecord) and r.kind == kind]


@pytest.fixture
def device(tmp_path, spawn):  # noqa: F811
    sock = tmp_path / "dev.sock"
    server = spawn("serve-device", "--socket", sock)
    wait_for_socket(sock, server)
    return sock


def test_record_with_rules_from_the_command_line_and_a_file(tmp_path, spawn, device):  # noqa: F811
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nrule = "c2s DEVICE_GET_IRQ_INFO delay 2ms"\n'
                     '[[rule]]\ndirection = "s2c"\ncommand = "DEVICE_RESET"\n'
                     'action = "delay"\ndistribution = "uniform(1ms,2ms)"\n')
    listen, trace = tmp_path / "p.sock", tmp_path / "t.trace"
    proxy = spawn("record", "--listen", listen, "--server", device, "-o", trace,
                  "--rules", rules, "--rule", "c2s DEVICE_GET_REGION_INFO error EINVAL",
                  "--seed", 42)
    wait_for_socket(listen, proxy)
    result = run("realize", "--socket", listen)
    assert result.returncode == 1
    assert "region info" in result.stderr and "errno 22 (EINVAL)" in result.stderr, result.stderr
    proxy.send_signal(signal.SIGINT)
    _, err = proxy.communicate(timeout=10)
    assert proxy.returncode == 0, err
    assert "rule 3: c2s DEVICE_GET_REGION_INFO error EINVAL" in err
    opened, = events(trace, "session_open")
    assert opened.data["inject"]["seed"] == 42
    assert [r["id"] for r in opened.data["inject"]["rules"]] == [1, 2, 3]
    injected = events(trace, "inject")
    assert [e.data["applied"][0]["action"] for e in injected][-1] == "error"
    shown = run("trace", "show", trace).stdout
    assert re.search(r"inject #\d+ c2s\[\d+\]: rule 3 error EINVAL\n", shown), shown


def test_bad_rules_are_refused_with_the_token_named(tmp_path, device):
    result = run("proxy", "--listen", tmp_path / "p.sock", "--server", device,
                 "--rule", "c2s REGION_REED delay 1ms")
    assert result.returncode != 0
    assert "REGION_REED" in result.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rule]]\naction = "delay"\ndistribution = "fixed(1parsec)"\n')
    result = run("proxy", "--listen", tmp_path / "p.sock", "--server", device, "--rules", bad)
    assert result.returncode != 0 and "bad.toml" in result.stderr, result.stderr
    assert not (tmp_path / "p.sock").exists()


def test_ctl_lists_adds_and_removes_rules_of_a_running_proxy(tmp_path, spawn, device):  # noqa: F811
    listen, ctl, trace = tmp_path / "p.sock", tmp_path / "ctl.sock", tmp_path / "t.trace"
    proxy = spawn("record", "--listen", listen, "--server", device, "-o", trace,
                  "--control", ctl, "--rule", "s2c * delay 1us")
    wait_for_socket(ctl, proxy)
    listed = run("ctl", "--control", ctl, "list")
    assert listed.returncode == 0, listed
    seed, header, line, rule, *rest = listed.stdout.splitlines()
    assert seed == "seed 0" and header.split() == ["id", "rule"] and not rest, listed.stdout
    assert set(line.strip()) == {"─"}, listed.stdout
    assert rule.split(maxsplit=1) == ["1", "s2c * delay 1us"], listed.stdout
    added = run("ctl", "--control", ctl, "add", "c2s DEVICE_RESET error EIO")
    assert added.returncode == 0 and "added rule 2" in added.stdout, added
    result = run("realize", "--socket", listen)
    assert result.returncode == 1 and "errno 5 (EIO)" in result.stderr, result.stderr
    table = run("ctl", "--control", ctl, "stats").stdout.splitlines()
    assert table[1].split() == ["id", "matched", "applied", "delay", "s", "rule"], table
    assert [line.split()[:3] for line in table[3:]] == [["1", "34", "34"], ["2", "1", "1"]], table
    stats = json.loads(run("ctl", "--control", ctl, "--json", "stats").stdout)
    assert stats["ok"] and stats["inject"]["rules"][1]["applied"] == 1
    assert stats["proxy"]["sessions_total"] == 1
    assert run("ctl", "--control", ctl, "remove", "2").returncode == 0
    assert run("realize", "--socket", listen).returncode == 0
    missing = run("ctl", "--control", ctl, "remove", "2")
    assert missing.returncode == 2 and "no rule with id 2" in missing.stderr
    garbage = run("ctl", "--control", ctl, "add", "c2s * frobnicate")
    assert garbage.returncode == 2 and "frobnicate" in garbage.stderr
    proxy.send_signal(signal.SIGINT)
    proxy.communicate(timeout=10)
    assert proxy.returncode == 0
    assert not ctl.exists()
    changes = [e.data for e in events(trace, "rules_changed")]
    assert [list(c) for c in changes] == [["added"], ["removed"]]
    assert changes[0]["added"]["text"] == "c2s DEVICE_RESET error EIO"


def test_ctl_without_a_proxy_says_so(tmp_path):
    result = run("ctl", "--control", tmp_path / "none.sock", "list")
    assert result.returncode == 2 and "none.sock" in result.stderr
