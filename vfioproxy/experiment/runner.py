"""Running an experiment: every setting's runs through a recording, injecting proxy."""

from __future__ import annotations

import gc
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs
import trio

from recorder.sink import TraceSink
from vfioproxy.errors import VfioProxyError, os_error_text
from vfioproxy.experiment.analysis import TraceFacts, analyse_trace, expected_delay
from vfioproxy.experiment.errors import ExperimentError
from vfioproxy.experiment.model import (
    RESULTS_CSV,
    RESULTS_JSON,
    TRACES_DIR,
    ExperimentConfig,
    ExperimentResults,
    ResultRow,
    summarize,
    write_csv,
    write_json,
)
from vfioproxy.experiment.plot import write_plots
from vfioproxy.experiment.sweep import Setting
from vfioproxy.inject import Injector
from vfioproxy.peers.client import RealizeError, RealizeOptions, Timings, open_realize_client
from vfioproxy.peers.endpoint import ReplyTimeoutError
from vfioproxy.peers.server import serve_device
from vfioproxy.proxy import ProxyOptions, open_proxy

__all__ = ["Progress", "command_argv", "run_experiment"]

#: called before each run with (runs done, runs in all, what runs next), and once at the end
Progress = Callable[[int, int, str], None]

#: seconds the proxy's sessions get to end after the client is done
SESSION_GRACE = 2.0
#: bytes at the head of a command's stderr searched for its first line
STDERR_HEAD = 4096
#: characters of that line kept as the run's error text
ERROR_WIDTH = 500


@attrs.frozen
class _Outcome:
    status: str
    error: str = ""
    exit_code: int | None = None
    realize_s: float | None = None
    reset_s: float | None = None
    total_s: float | None = None
    messages: int | None = None
    #: the file holding the client's stderr (None: none kept)
    stderr: Path | None = None


def command_argv(template: Sequence[str], socket: str) -> list[str]:
    """The argv of one run: ``{socket}`` replaced wherever it occurs in an argument."""
    return [arg.replace("{socket}", socket) for arg in template]


async def _run_builtin(target: str, options: RealizeOptions) -> _Outcome:
    """The built-in realize client: realize, reset, workload; timings even when it fails."""
    timings = Timings()
    start = time.perf_counter()
    try:
        async with open_realize_client(target, options) as client:
            try:
                await client.realize()
                if options.reset:
                    await client.reset()
                if options.workload:
                    await client.run_workload(options.workload)
            finally:
                timings = client.timings
            result = client.result()
    except RealizeError as exc:
        status = "timeout" if isinstance(exc.__cause__, ReplyTimeoutError) else "error"
        return _Outcome(
            status, str(exc), None, timings.realize, timings.reset, time.perf_counter() - start
        )
    total = time.perf_counter() - start
    messages = sum(result.sent.values()) + sum(result.received.values())
    return _Outcome("ok", "", None, timings.realize, timings.reset, total, messages)


def _first_line(path: Path) -> str:
    """The first non-blank line of a client's stderr file ("" when it wrote nothing)."""
    with open(path, "rb") as f:
        head = f.read(STDERR_HEAD)
    for line in head.decode(errors="replace").splitlines():
        if line.strip():
            return line.strip()[:ERROR_WIDTH]
    return ""


def _exit_error(code: int) -> str:
    """The error text of a command that failed without a word on stderr."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}, nothing on stderr"
        except ValueError:
            return f"killed by signal {-code}, nothing on stderr"
    return f"exit status {code}, nothing on stderr"


async def _run_command(argv: list[str], timeout: float, stderr_path: Path) -> _Outcome:
    """An external client: its wall time, exit status and the first line of its stderr.

    The whole stderr goes to ``stderr_path`` (removed again when the client
    wrote nothing there). On cancellation the client is killed and waited for.
    """
    start = time.perf_counter()
    with open(stderr_path, "wb") as stderr:
        try:
            process = await trio.lowlevel.open_process(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
            )
        except OSError as exc:
            stderr_path.unlink()
            return _Outcome("error", f"cannot start {argv[0]!r}: {os_error_text(exc)}")
    code: int | None = None
    try:
        with trio.move_on_after(timeout):
            code = await process.wait()
        total = time.perf_counter() - start
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
    first = _first_line(stderr_path)
    kept = stderr_path if stderr_path.stat().st_size else None
    if kept is None:
        stderr_path.unlink()
    if code is None:
        error = f"no exit within {timeout:g} s" + (f": {first}" if first else "")
        return _Outcome("timeout", error, total_s=total, stderr=kept)
    if code == 0:
        return _Outcome("ok", "", code, total_s=total, stderr=kept)
    return _Outcome(f"exit {code}", first or _exit_error(code), code, total_s=total, stderr=kept)


def _check_server(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ExperimentError(f"device server socket {path}: {exc.strerror}") from exc
    if not stat.S_ISSOCK(mode):
        raise ExperimentError(f"device server socket {path}: not a socket")


class _Runner:
    def __init__(
        self, config: ExperimentConfig, server: str, tmp: Path, traces: Path
    ) -> None:
        self.config = config
        self.server = server
        self.tmp = tmp
        self.traces = traces
        self.realize = attrs.evolve(config.realize, reply_timeout=config.client_timeout)
        self._sockets = 0

    def _proxy_options(self) -> ProxyOptions:
        """The proxy forwards on trio tasks when a peer runs in this process (the
        built-in server or client): a forwarding thread would trade the GIL with
        them at every message. With both peers outside, on its threads."""
        in_process = self.config.server is None or self.config.command is None
        return attrs.evolve(self.config.proxy_options, threads=not in_process)

    def run_file(self, setting: Setting, run: int, suffix: str) -> Path:
        """A file of one run in the traces directory: ``03-200us-2.trace``, ``.stderr``."""
        return self.traces / f"{setting.slug}-{run}{suffix}"

    async def client(self, socket: str, setting: Setting, run: int) -> _Outcome:
        if self.config.command is None:
            return await _run_builtin(socket, self.realize)
        argv = command_argv(self.config.command, socket)
        stderr = self.run_file(setting, run, ".stderr")
        return await _run_command(argv, self.config.client_timeout, stderr)

    async def run(self, setting: Setting, run: int) -> ResultRow:
        seed = self.config.seed + run - 1
        facts: TraceFacts | None = None
        trace: Path | None = None
        if not setting.proxy:
            outcome = await self.client(self.server, setting, run)
        else:
            self._sockets += 1
            socket = str(self.tmp / f"proxy{self._sockets}.sock")
            trace = self.run_file(setting, run, ".trace")
            info = {
                "client": " ".join(self.config.command or ["vfioproxy realize (built-in)"]),
                "server": self.config.server or "vfioproxy serve-device (built-in)",
                "listen_path": socket,
                "server_path": self.server,
                "options": {"experiment": {"setting": setting.label, "run": run, "seed": seed}},
            }
            injector = Injector(setting.rules, seed=seed)
            with TraceSink(trace, info=info, overwrite=True) as sink:
                async with open_proxy(
                    socket,
                    self.server,
                    sink=sink,
                    options=self._proxy_options(),
                    injector=injector,
                ) as proxy:
                    outcome = await self.client(socket, setting, run)
                    with trio.move_on_after(SESSION_GRACE):
                        await proxy.wait_sessions()
            facts = analyse_trace(trace)
        return self._row(setting, run, seed, outcome, facts, trace)

    def _relative(self, path: Path | None) -> str | None:
        return None if path is None else os.path.relpath(path, self.config.output)

    def _row(
        self,
        setting: Setting,
        run: int,
        seed: int,
        outcome: _Outcome,
        facts: TraceFacts | None,
        trace: Path | None,
    ) -> ResultRow:
        row = ResultRow(
            setting=setting.label,
            setting_index=setting.index,
            rule=setting.rule,
            value=setting.value,
            value_s=setting.value_s,
            run=run,
            seed=seed,
            proxy=setting.proxy,
            status=outcome.status,
            error=outcome.error,
            exit_code=outcome.exit_code,
            realize_s=outcome.realize_s,
            reset_s=outcome.reset_s,
            total_s=outcome.total_s,
            messages=outcome.messages,
            trace=self._relative(trace),
            stderr=self._relative(outcome.stderr),
        )
        if facts is None:
            return row
        return attrs.evolve(
            row,
            messages=facts.messages,
            session_s=facts.span_s,
            injected=sum(facts.actions.values()),
            actions=facts.actions,
            injected_delay_s=facts.injected_delay_s,
            expected_delay_s=expected_delay(setting.rules, facts),
            expected_turns_delay_s=expected_delay(setting.rules, facts, turns=True),
            latency=facts.latency,
        )


async def run_experiment(
    config: ExperimentConfig, *, progress: Progress | None = None
) -> ExperimentResults:
    """Run every setting ``config.runs`` times; write traces, CSV, JSON and plots.

    Plots are drawn when ``config.plot`` and matplotlib is importable
    (``results.plots`` lists them).

    Runs go round-robin (run 1 of every setting, then run 2...) so that a
    drift of the machine spreads over all settings. A run that fails is a
    row with its status, not an exception; a bad sweep or rule
    (:class:`SweepError`), a command without ``{socket}`` or not found, a
    missing server socket or an unwritable output directory raise
    :class:`ExperimentError` before any run.
    """
    settings = config.settings()
    if config.command is not None and not config.command:
        raise ExperimentError("the command is empty")
    if config.command is not None and not any("{socket}" in arg for arg in config.command):
        raise ExperimentError("the command must contain {socket} (the socket to connect to)")
    if config.command is not None and shutil.which(config.command[0]) is None:
        raise ExperimentError(f"command not found: {config.command[0]!r}")
    if config.server is not None:
        _check_server(config.server)
    traces = config.output / TRACES_DIR
    try:
        traces.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExperimentError(f"output directory {config.output}: {exc.strerror}") from exc
    plan = [(setting, run) for run in range(1, config.runs + 1) for setting in settings]
    rows: list[ResultRow] = []
    with tempfile.TemporaryDirectory(prefix="vfioproxy-exp-") as tmp:
        async with trio.open_nursery() as nursery:
            server = config.server
            if server is None:
                server = str(Path(tmp) / "device.sock")
                await nursery.start(serve_device, server)
            runner = _Runner(config, server, Path(tmp), traces)
            for done, (setting, run) in enumerate(plan):
                if progress is not None:
                    progress(done, len(plan), f"{setting.label} run {run}")
                # what earlier runs left is collected here, not in a run's measured time
                gc.collect()
                try:
                    rows.append(await runner.run(setting, run))
                except (VfioProxyError, OSError) as exc:  # the proxy itself failed
                    text = os_error_text(exc) if isinstance(exc, OSError) else str(exc)
                    raise ExperimentError(f"{setting.label} run {run}: {text}") from exc
            nursery.cancel_scope.cancel()
    if progress is not None:
        progress(len(plan), len(plan), "done")
    ordered = tuple(sorted(rows, key=lambda r: (r.setting_index, r.run)))
    results = ExperimentResults(
        config=config,
        settings=settings,
        rows=ordered,
        summary=summarize(settings, ordered),
        csv_path=config.output / RESULTS_CSV,
        json_path=config.output / RESULTS_JSON,
    )
    write_csv(results.csv_path, results.rows, results.commands())
    write_json(results.json_path, results.to_json())
    if config.plot:
        results = attrs.evolve(results, plots=write_plots(results))
    return results
