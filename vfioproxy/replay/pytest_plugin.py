"""pytest plugin: replay a recorded vfio-user session against your device server.

Installed with vfioproxy (entry point ``pytest11``). A device-server project
writes::

    @pytest.mark.vfioproxy_trace("traces/realize.trace")      # optional
    async def test_the_device_realizes_as_recorded(vfioproxy_replay, device_server):
        await vfioproxy_replay.check(device_server)

``check`` replays the trace's recorded client against the server and fails
the test with the divergence report (the report is the failure message, also
under pytest-trio, whose nursery would otherwise wrap it in an exception
group) when the server answers differently. ``check_sync`` does the same from
a test that is not async. The server is a socket path, or a factory: a
callable returning a context manager (async or not) that starts a fresh
server and yields its socket path; recording and replaying then each get a
server of their own, as one-shot servers (libvfio-user's samples exit after
one client) need.

The trace path is relative to the test file; without a marker (or a path in
it) it is the ``vfioproxy_trace_path`` ini value, by default
``traces/{module}/{test}.trace``.

Record modes, as in vcrpy and pytest-recording: ``none`` (the default) only
replays and fails when the trace is missing; ``once`` records the trace when
it is missing — running the marker's ``client`` (default: the reference
realize client) against the server through the recording proxy — and then
replays it; ``all`` records it again every time, and so does ``rewrite``
(pytest-recording's name for it). The mode comes from
``--vfioproxy-record-mode`` when given, else from the marker's
``record_mode``, else ``none``.

Marker keywords: ``record_mode``, ``client`` (an async callable taking the
socket path to connect to), ``session``, ``ignore`` (ignore rules, added to
the defaults), ``timeout``, ``timing`` and ``speed``. They are checked when
the tests are collected: an unknown keyword, record mode or ignore rule
stops the run with the nearest valid name.
"""

from __future__ import annotations

import contextlib
import difflib
import os
from collections.abc import AsyncIterator, Callable, Generator
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from pathlib import Path
from typing import Any, NoReturn

import attrs
import pytest
import trio

from vfioproxy.errors import VfioProxyError
from vfioproxy.replay.client import ClientReplayOptions, replay_client
from vfioproxy.replay.match import DEFAULT_IGNORES, IgnoreRule
from vfioproxy.replay.record import ClientRun, record_session
from vfioproxy.replay.report import ReplayReport

__all__ = ["DEFAULT_TRACE_PATH", "RECORD_MODES", "ServerArg", "TraceReplay"]

RECORD_MODES = ("none", "once", "all", "rewrite")
#: the modes that record even when the trace exists
_RECORD_ALWAYS = frozenset({"all", "rewrite"})
MARKER = "vfioproxy_trace"
OPTION = "--vfioproxy-record-mode"
PATH_INI = "vfioproxy_trace_path"
DEFAULT_TRACE_PATH = "traces/{module}/{test}.trace"
_KEYWORDS = ("record_mode", "client", "session", "ignore", "timeout", "timing", "speed")

_Path = str | os.PathLike[str]
#: a server's socket path, or a factory of fresh servers (a context manager,
#: async or not, yielding the socket path)
ServerArg = (
    _Path
    | Callable[[], AbstractAsyncContextManager[_Path]]
    | Callable[[], AbstractContextManager[_Path]]
)
#: the attribute that marks a test failure as a replay's (its report is the message)
_MARK = "vfioproxy_replay_failure"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vfioproxy", "vfio-user session replay")
    group.addoption(
        OPTION, choices=RECORD_MODES, default=None, dest="vfioproxy_record_mode",
        help="none: replay only; once: record missing traces; all or rewrite: record every "
             "trace again (overrides the markers' record_mode)",
    )
    parser.addini(PATH_INI, default=DEFAULT_TRACE_PATH,
                  help="trace of a test without a path in its vfioproxy_trace marker, relative "
                       "to the test file; {module} and {test} are replaced "
                       f"(default {DEFAULT_TRACE_PATH})")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(path=None, *, record_mode=None, client=None, session=None, ignore=(), "
        "timeout=5.0, timing='asap', speed=1.0): the vfio-user trace the vfioproxy_replay "
        f"fixture replays (path relative to the test file; default from the {PATH_INI} ini)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Check every test's marker before anything runs: a mistake stops the run
    in one line naming the test and the nearest valid name."""
    for item in items:
        marker = item.get_closest_marker(MARKER)
        if marker is not None:
            try:
                _settings(item, config)
            except ValueError as exc:
                raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.{MARKER}: {exc}") from None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """A replay's failure raised inside a trio nursery (pytest-trio runs async
    tests in one) reaches pytest as an exception group: unwrap it, so that the
    report is the failure message and no traceback is shown."""
    try:
        return (yield)
    except BaseExceptionGroup as group:
        failure = _only_replay_failure(group)
        if failure is None:
            raise
        raise failure from None


def _is_replay_failure(exc: BaseException) -> bool:
    return getattr(exc, _MARK, False) is True


def _only_replay_failure(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The first replay failure of ``group`` when that is all it holds."""
    matched, rest = group.split(_is_replay_failure)
    if matched is None or rest is not None:
        return None
    leaf: BaseException = matched
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf


def _fail(text: str) -> NoReturn:
    """Fail the test with ``text`` as the whole message (pytest.fail, no traceback)."""
    failure = pytest.fail.Exception(text, pytrace=False)
    setattr(failure, _MARK, True)
    failure.__suppress_context__ = True  # the text says it all: no chain of errors shown
    raise failure


@attrs.define
class TraceReplay:
    """What the ``vfioproxy_replay`` fixture gives a test: one trace and how to use it.

    ``recorded`` becomes True when :meth:`check` or :meth:`replay` recorded
    the trace first (record modes ``once``, ``all`` and ``rewrite``).
    """

    trace: Path
    record_mode: str
    client: ClientRun | None
    options: ClientReplayOptions
    recorded: bool = False

    @property
    def records(self) -> bool:
        """Whether the next replay records the trace first."""
        return self.record_mode in _RECORD_ALWAYS or (
            self.record_mode == "once" and not self.trace.exists())

    async def replay(self, server: ServerArg) -> ReplayReport:
        """Record if the mode asks for it, then replay against ``server`` (a path,
        or a factory: a fresh server for recording and another for replaying);
        fails the test (one line, no traceback) only when the trace is missing in
        mode ``none`` or the recording or the replay cannot run (no server there,
        not a trace, no such session).
        Cancellation stops the recording or the replay (a partial trace stays)."""
        if self.records:
            self.trace.parent.mkdir(parents=True, exist_ok=True)
            async with _server(server) as path:
                try:
                    await record_session(self.trace, path, self.client)
                except (VfioProxyError, OSError) as exc:
                    _fail(f"recording {self.trace} against {path} failed: {exc}")
            self.recorded = True
        elif not self.trace.exists():
            _fail(f"{self.trace} does not exist and the record mode is none; record it with "
                  f"{OPTION}=once")
        async with _server(server) as path:
            try:
                return await replay_client(self.trace, path, self.options)
            except (VfioProxyError, OSError) as exc:
                _fail(f"replaying {self.trace} against {path} could not run: {exc}")

    async def check(self, server: ServerArg) -> ReplayReport:
        """:meth:`replay`, failing the test with the report if anything diverged."""
        report = await self.replay(server)
        if not report.ok:
            _fail(report.text())
        return report

    def replay_sync(self, server: ServerArg) -> ReplayReport:
        """:meth:`replay` from a test that is not async (runs its own trio loop)."""
        _not_in_trio("replay_sync", "replay")
        report: ReplayReport = trio.run(self.replay, server)
        return report

    def check_sync(self, server: ServerArg) -> ReplayReport:
        """:meth:`check` from a test that is not async (runs its own trio loop)."""
        _not_in_trio("check_sync", "check")
        report: ReplayReport = trio.run(self.check, server)
        return report


def _not_in_trio(name: str, instead: str) -> None:
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        return
    _fail(f"vfioproxy_replay.{name}() runs a trio loop of its own: in an async test, "
          f"await vfioproxy_replay.{instead}(...)")


@contextlib.asynccontextmanager
async def _server(server: ServerArg) -> AsyncIterator[str]:
    """The socket path of ``server``: the path itself, or a fresh server's."""
    if not callable(server):
        yield os.fspath(server)
        return
    made = server()
    if isinstance(made, AbstractAsyncContextManager):
        async with made as path:
            yield os.fspath(path)
    elif isinstance(made, AbstractContextManager):
        with made as path:
            yield os.fspath(path)
    else:
        _fail(f"the server factory {server!r} returned {made!r}, not a context manager "
              "(async or not) yielding a socket path")


def _nearest(word: str, names: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, names, n=1, cutoff=0.5)
    return f" (did you mean {close[0]}?)" if close else ""


def _settings(item: pytest.Item, config: pytest.Config) -> TraceReplay:
    """The trace, mode and options of ``item``; ValueError naming what is wrong."""
    marker = item.get_closest_marker(MARKER)
    args = marker.args if marker is not None else ()
    kwargs: dict[str, Any] = dict(marker.kwargs) if marker is not None else {}
    for key in kwargs:
        if key not in _KEYWORDS:
            raise ValueError(f"unknown keyword {key}={kwargs[key]!r}{_nearest(key, _KEYWORDS)}; "
                             f"keywords: {', '.join(_KEYWORDS)}")
    if len(args) > 1:
        raise ValueError(f"one trace path, not {len(args)}: {args!r}")
    mode = config.getoption("vfioproxy_record_mode") or kwargs.get("record_mode") or "none"
    if mode not in RECORD_MODES:
        raise ValueError(f"unknown record_mode {mode!r}{_nearest(str(mode), RECORD_MODES)}; "
                         f"modes: {', '.join(RECORD_MODES)}")
    ignore = kwargs.get("ignore", ())
    if isinstance(ignore, str | IgnoreRule):
        ignore = (ignore,)
    extra = tuple(rule if isinstance(rule, IgnoreRule) else IgnoreRule.parse(rule)
                  for rule in ignore)
    try:
        options = ClientReplayOptions(
            session=kwargs.get("session"),
            timing=kwargs.get("timing", "asap"),
            speed=kwargs.get("speed", 1.0),
            timeout=kwargs.get("timeout", 5.0),
            ignore=(*DEFAULT_IGNORES, *extra),
        )
    except (TypeError, ValueError) as exc:  # attrs validators: timing, speed, timeout
        raise ValueError(str(exc.args[0] if exc.args else exc)) from None
    if args:
        relative = Path(args[0])
    else:
        module = Path(str(item.path)).stem
        relative = Path(str(config.getini(PATH_INI)).format(module=module, test=item.name))
    trace = Path(str(item.path)).parent / relative
    return TraceReplay(trace, mode, kwargs.get("client"), options)


@pytest.fixture
def vfioproxy_replay(request: pytest.FixtureRequest) -> TraceReplay:
    """The trace of the test (its ``vfioproxy_trace`` marker, or the default
    path), ready to replay."""
    try:
        return _settings(request.node, request.config)
    except ValueError as exc:  # checked at collection already; a fixture used alone
        _fail(f"@pytest.mark.{MARKER}: {exc}")
