"""The pytest plugin, through the example project under examples/tiny-device."""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from tests.realdata import ROOT
from vfioproxy.replay.script import Script, load_script
from vfioproxy.side import Direction

EXAMPLE = ROOT / "examples" / "tiny-device"
TRACE = Path("tests") / "traces" / "tiny-device-realize.trace"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the example project, free to change."""
    return Path(shutil.copytree(EXAMPLE, tmp_path / "tiny-device"))


def run_pytest(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
        cwd=project, capture_output=True, text=True, timeout=60, check=False,
    )


def c2s(script: Script) -> list[bytes]:
    return [s.data for s in script.of_direction(Direction.C2S)]


def test_the_plugin_is_registered_as_a_pytest11_entry_point():
    plugins = {e.name: e.value for e in entry_points(group="pytest11")}
    assert plugins.get("vfioproxy_replay") == "vfioproxy.replay.pytest_plugin"


def test_the_example_project_passes_against_its_recorded_trace(project):
    result = run_pytest(project)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
    assert load_script(project / TRACE).steps[0].message.command == 1  # VERSION first


def test_a_changed_device_fails_the_example_with_the_divergence_report(project):
    source = project / "tiny_device.py"
    source.write_text(source.read_text().replace("DEVICE_ID = 0x11E9", "DEVICE_ID = 0x11EA"))
    result = run_pytest(project)
    assert result.returncode == 1
    assert ("FIRST DIVERGENCE: message #29 REGION_READ reply (config space offset 0x0, "
            "4096 bytes): data[0x2:0x4] (device_id) 0x11ea != recorded 0x11e9") in result.stdout


def test_record_mode_none_fails_when_the_trace_is_missing(project):
    (project / TRACE).unlink()
    result = run_pytest(project)
    assert result.returncode == 1
    assert "does not exist and the record mode is none" in result.stdout
    assert not (project / TRACE).exists()


def test_record_mode_once_records_a_missing_trace_and_all_records_it_again(project):
    (project / TRACE).unlink()
    once = run_pytest(project, "--vfioproxy-record-mode=once")
    assert once.returncode == 0, once.stdout + once.stderr
    first = load_script(project / TRACE)
    assert c2s(first) == c2s(load_script(EXAMPLE / TRACE))  # the same client, recorded anew
    again = run_pytest(project, "--vfioproxy-record-mode=all")
    assert again.returncode == 0, again.stdout + again.stderr
    assert load_script(project / TRACE).steps[0].t_ns != first.steps[0].t_ns  # a new recording
