"""``record --interpose-irqs`` as a user runs it: real processes, the reference
device and client; the flag, a rules file's ``[interpose]`` table with an irq
rule, and what ``trace show`` / ``trace stats`` say of the interrupts."""

import signal
import subprocess

import pytest

from recorder.reader import TraceReader
from recorder.records import EventRecord
from tests.test_cli_live import VFIOPROXY, wait_for_socket


@pytest.fixture
def start():
    """Start a vfioproxy command in the background; each is killed at the end."""
    procs = []

    def run(*args):
        proc = subprocess.Popen([*VFIOPROXY, *map(str, args)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        return proc

    yield run
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()



def record_workload(tmp_path, start, *proxy_args):
    dev, prox, trace = tmp_path / "dev.sock", tmp_path / "p.sock", tmp_path / "t.trace"
    server = start("serve-device", "--socket", dev)
    wait_for_socket(dev, server)
    proxy = start("record", "--listen", prox, "--server", dev, "-o", trace, *proxy_args)
    wait_for_socket(prox, proxy)
    result = subprocess.run([*VFIOPROXY, "realize", "--socket", str(prox), "--workload", "4",
                             "--irq", "msix"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "doorbells: 4" in result.stdout
    proxy.send_signal(signal.SIGINT)
    assert proxy.wait(timeout=10) == 0
    server.send_signal(signal.SIGINT)
    assert server.wait(timeout=10) == 0
    with TraceReader(trace) as reader:
        irqs = [r for r in reader if isinstance(r, EventRecord) and r.kind == "irq"]
    return trace, irqs


def vfioproxy(*args):
    result = subprocess.run([*VFIOPROXY, *map(str, args)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_record_interpose_irqs_records_every_interrupt(tmp_path, start):
    trace, irqs = record_workload(tmp_path, start, "--interpose-irqs")
    assert [(e.data["index"], e.data["vector"], e.data["fate"]) for e in irqs] == [
        (2, 0, "signalled")] * 4
    shown = vfioproxy("trace", "show", trace)
    assert shown.count(" irq MSIX[0] count=1\n") == 4
    stats = vfioproxy("trace", "stats", trace)
    assert "interrupts (--interpose-irqs)" in stats
    assert any(line.startswith("MSIX[0]") and line.split()[1:3] == ["4", "4"]
               for line in stats.splitlines()), stats


def test_a_rules_file_turns_it_on_with_an_irq_rule(tmp_path, start):
    rules = tmp_path / "rules.toml"
    rules.write_text('[interpose]\ninterpose-irqs = true\n\n'
                     '[[rule]]\nrule = "irq MSIX[0] delay fixed(5ms)"\n')
    trace, irqs = record_workload(tmp_path, start, "--rules", rules)
    assert [e.data["fate"] for e in irqs] == ["delayed"] * 4
    assert all(e.data["applied"][0]["text"] == "delay fixed(5ms)" for e in irqs)
    assert "delayed 5000.0 us: rule 1 delay fixed(5ms)" in vfioproxy("trace", "show", trace)
