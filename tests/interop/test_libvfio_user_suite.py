"""(4) libvfio-user's own python test suite, direct and through `vfioproxy record`.

``test/py`` (run by the system ``python3``, with Debian's python3-pytest that
build-libvfio-user.sh installs; it needs nothing from our venv) drives an
in-process, non-blocking libvfio-user server through ctypes and talks to it
as a client over a real socket. The proxied run loads ``lvu_relay_plugin``
(see there): the client sockets go to a ``vfioproxy record`` whose server is
the suite's own socket, and ``vfu_attach_ctx``/``vfu_run_ctx`` are retried
for a bounded time while they find nothing to do. Nothing else changes.

Left out of both runs:

- ``test_request_errors.py::test_reply_fail_quiesce_busy``: it closes the
  client socket inside a server callback and needs the server's very next
  write to fail. Through any relay that write goes to the relay, which is
  still connected, so it succeeds: a race no relay can win.
- ``test_shadow_ioeventfd.py``: libvfio-user's own meson runs it only when
  the library is built with ``-Dshadow-ioeventfd=true``, and
  build-libvfio-user.sh builds the default (off); run anyway, it fails
  direct, at ``vfu_create_ioeventfd``.

The proxied run must pass exactly the tests the direct run passes (and skip
the ones it skips).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.interop.conftest import SUMMARY, LvuBuild
from tests.interop.peers import Peers, read_json
from tests.interop.tracecheck import read_recording
from vfioproxy.protocol.bodies import RawBody

HERE = Path(__file__).resolve().parent
SYSTEM_PYTHON = "/usr/bin/python3"
LEFT_OUT_TEST = "test/py/test_request_errors.py::test_reply_fail_quiesce_busy"
LEFT_OUT_FILE = "test/py/test_shadow_ioeventfd.py"


@attrs.frozen
class SuiteRun:
    outcomes: dict[str, str]  # test id -> passed / failed / skipped
    exit_code: int
    plugin: dict[str, Any] | None

    def counts(self) -> Counter[str]:
        return Counter(self.outcomes.values())

    def text(self) -> str:
        c = self.counts()
        return f"{c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped"


def junit_outcomes(path: Path) -> dict[str, str]:
    outcomes = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            outcomes[name] = "failed"
        elif case.find("skipped") is not None:
            outcomes[name] = "skipped"
        else:
            outcomes[name] = "passed"
    return outcomes


def run_suite(lvu: LvuBuild, peers: Peers, workdir: Path, name: str,
              relay: str | None = None) -> SuiteRun:
    junit, stats = workdir / f"{name}.xml", workdir / f"{name}-plugin.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "PYTHON"))}
    env["LIBVFIO_SO_DIR"] = str(lvu.lib)
    # -c /dev/null --rootdir: the source tree may lie inside this checkout (.peers/), whose
    # pyproject.toml would otherwise be the suite's configuration and rootdir
    argv = [SYSTEM_PYTHON, "-m", "pytest", "-c", "/dev/null", "--rootdir", str(lvu.source),
            "-p", "no:cacheprovider", "-q",
            f"--junitxml={junit}", "--ignore", LEFT_OUT_FILE, "--deselect", LEFT_OUT_TEST]
    if relay is not None:
        env.update(PYTHONPATH=str(HERE), VFIOPROXY_LVU_RELAY=relay,
                   VFIOPROXY_LVU_SUITE=str(lvu.suite), VFIOPROXY_LVU_STATS=str(stats))
        argv += ["-p", "lvu_relay_plugin"]
    proc = peers.start(name, [*argv, "test/py"], env=env, cwd=lvu.source)
    code = proc.wait(timeout=240)
    assert code in (0, 1), f"the suite did not run: exit {code}\n{proc.describe()}"
    outcomes = junit_outcomes(junit)
    assert len(outcomes) > 200, proc.describe()
    left_out = [t for t in outcomes if "reply_fail_quiesce_busy" in t or "shadow_ioeventfd" in t]
    assert left_out == [], "the left-out tests ran"
    return SuiteRun(outcomes, code, read_json(stats) if relay is not None else None)


@pytest.fixture(scope="module")
def system_pytest(lvu: LvuBuild) -> None:
    found = subprocess.run([SYSTEM_PYTHON, "-c", "import pytest"], capture_output=True,
                           timeout=60)
    if found.returncode != 0:
        pytest.fail(f"{SYSTEM_PYTHON} has no pytest: install python3-pytest "
                    "(build-libvfio-user.sh does)")


@pytest.mark.interop_timeout(300)
@pytest.mark.usefixtures("system_pytest")
def test_libvfio_user_suite_passes_through_the_proxy_as_it_passes_direct(
    lvu: LvuBuild, peers: Peers, tmp_path: Path
) -> None:
    direct = run_suite(lvu, peers, tmp_path, "direct")
    trace = tmp_path / "suite.trace"
    relay = shlex.join([sys.executable, "-m", "vfioproxy", "record", "-o", str(trace),
                        "--client-desc", "libvfio-user test/py",
                        "--server-desc", "libvfio-user test/py (in-process server)"])
    proxied = run_suite(lvu, peers, tmp_path, "proxied", relay)

    assert direct.counts()["failed"] == 0, direct.outcomes
    assert proxied.outcomes == direct.outcomes
    assert proxied.exit_code == direct.exit_code == 0
    plugin = proxied.plugin
    assert plugin is not None and plugin["relay_exit"] == 0

    recording = read_recording(trace)
    assert recording.truncation is None
    # every message that does not decode is one of the suite's deliberately bad ones
    flagged = {m.record.seq for m in recording.messages if m.observation.violations}
    raw = [m for m in recording.messages if isinstance(m.observation.message.body, RawBody)]
    assert all(m.record.seq in flagged for m in raw)
    SUMMARY.append(
        f"libvfio-user test/py: direct {direct.text()}; through `vfioproxy record` "
        f"{proxied.text()} (left out of both: {LEFT_OUT_TEST.split('/')[-1]}, "
        f"{LEFT_OUT_FILE.split('/')[-1]})"
    )
    sessions = sum(e.kind == "session_open" for e in recording.events)
    SUMMARY.append(
        f"  proxied run: {sessions} sessions, {len(recording.messages)} messages, "
        f"{len(raw)} undecodable and {len(recording.violations())} violations (the suite's "
        f"bad input); {plugin['run_found_nothing']} vfu_run_ctx calls found nothing to do "
        f"within the retry time (1 s each; direct, such calls return 0 at once)"
    )
