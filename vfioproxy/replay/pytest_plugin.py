"""pytest plugin: replay a recorded vfio-user session against your device server.

Installed with vfioproxy (entry point ``pytest11``). A device-server project
writes::

    @pytest.mark.vfioproxy_trace("traces/realize.trace")
    async def test_the_device_realizes_as_recorded(vfioproxy_replay, device_socket):
        await vfioproxy_replay.check(device_socket)

``check`` replays the trace's recorded client against the server listening
at ``device_socket`` and fails the test with the divergence report when the
server answers differently. The trace path is relative to the test file.

Record modes, as in vcrpy: ``none`` (the default) only replays and fails
when the trace is missing; ``once`` records the trace when it is missing —
running the marker's ``client`` (default: the reference realize client)
against the server through the recording proxy — and then replays it;
``all`` records it again every time. The mode comes from
``--vfioproxy-record-mode`` when given, else from the marker's
``record_mode``, else ``none``.

Marker keywords: ``record_mode``, ``client`` (an async callable taking the
socket path to connect to), ``session``, ``ignore`` (ignore rules, added to
the defaults), ``timeout``, ``timing`` and ``speed``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import attrs
import pytest

from vfioproxy.replay.client import ClientReplayOptions, replay_client
from vfioproxy.replay.match import DEFAULT_IGNORES, IgnoreRule
from vfioproxy.replay.record import ClientRun, record_session
from vfioproxy.replay.report import ReplayReport

__all__ = ["RECORD_MODES", "TraceReplay"]

RECORD_MODES = ("none", "once", "all")
MARKER = "vfioproxy_trace"
OPTION = "--vfioproxy-record-mode"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vfioproxy", "vfio-user session replay")
    group.addoption(
        OPTION, choices=RECORD_MODES, default=None, dest="vfioproxy_record_mode",
        help="none: replay only; once: record missing traces; all: record every trace again "
             "(overrides the markers' record_mode)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(path, *, record_mode=None, client=None, session=None, ignore=(), "
        "timeout=5.0, timing='asap', speed=1.0): the vfio-user trace the vfioproxy_replay "
        "fixture replays (path relative to the test file)",
    )


@attrs.define
class TraceReplay:
    """What the ``vfioproxy_replay`` fixture gives a test: one trace and how to use it.

    ``recorded`` becomes True when :meth:`check` or :meth:`replay` recorded
    the trace first (record modes ``once`` and ``all``).
    """

    trace: Path
    record_mode: str
    client: ClientRun | None
    options: ClientReplayOptions
    recorded: bool = False

    async def replay(self, server: str | os.PathLike[str]) -> ReplayReport:
        """Record if the mode asks for it, then replay against ``server``; never fails the test."""
        if self.record_mode == "all" or (self.record_mode == "once" and not self.trace.exists()):
            self.trace.parent.mkdir(parents=True, exist_ok=True)
            await record_session(self.trace, server, self.client)
            self.recorded = True
        elif not self.trace.exists():
            pytest.fail(
                f"{self.trace} does not exist and the record mode is none; record it with "
                f"{OPTION}=once", pytrace=False,
            )
        return await replay_client(self.trace, server, self.options)

    async def check(self, server: str | os.PathLike[str]) -> ReplayReport:
        """:meth:`replay`, failing the test with the report if anything diverged."""
        report = await self.replay(server)
        if not report.ok:
            pytest.fail(report.text(), pytrace=False)
        return report


@pytest.fixture
def vfioproxy_replay(request: pytest.FixtureRequest) -> TraceReplay:
    """The trace named by the test's ``vfioproxy_trace`` marker, ready to replay."""
    marker = request.node.get_closest_marker(MARKER)
    if marker is None or not marker.args:
        pytest.fail(f"vfioproxy_replay needs @pytest.mark.{MARKER}(path)", pytrace=False)
    kwargs: dict[str, Any] = dict(marker.kwargs)
    mode = request.config.getoption("vfioproxy_record_mode") or kwargs.get("record_mode")
    mode = mode or "none"
    if mode not in RECORD_MODES:
        pytest.fail(f"record_mode must be one of {', '.join(RECORD_MODES)}, not {mode!r}",
                    pytrace=False)
    extra = tuple(rule if isinstance(rule, IgnoreRule) else IgnoreRule.parse(rule)
                  for rule in kwargs.get("ignore", ()))
    options = ClientReplayOptions(
        session=kwargs.get("session"),
        timing=kwargs.get("timing", "asap"),
        speed=kwargs.get("speed", 1.0),
        timeout=kwargs.get("timeout", 5.0),
        ignore=(*DEFAULT_IGNORES, *extra),
    )
    trace = Path(request.path).parent / Path(marker.args[0])
    return TraceReplay(trace, mode, kwargs.get("client"), options)
