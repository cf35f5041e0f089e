"""Fixtures of the interop suite: where the real peers are, processes, time limits.

The real libvfio-user build is found through ``LIBVFIO_USER_BUILD`` (its meson
build directory; the source tree is its parent, as
``../shared/peers/build-libvfio-user.sh`` lays it out). ``./run-tests`` sets
it when it builds the peers (CI, or ``VFIOPROXY_BUILD_PEERS=1``); without it
every test here skips, naming the variable and the build command.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.interop.peers import Peers, deadline

BUILD_VARIABLE = "LIBVFIO_USER_BUILD"
BUILD_HINT = (
    f"{BUILD_VARIABLE} is not set: build the real peers with "
    "`VFIOPROXY_BUILD_PEERS=1 ./run-tests` (or `bash ../shared/peers/build-libvfio-user.sh "
    "SRC DEST` and `LIBVFIO_USER_BUILD=DEST/build ./run-tests`)"
)
#: seconds a test may take unless it says otherwise with @pytest.mark.interop_timeout(N)
DEFAULT_TIMEOUT = 60.0

#: lines for the end of the pytest run (pytest_terminal_summary): what the real peers did
SUMMARY: list[str] = []


@attrs.frozen
class LvuBuild:
    """A libvfio-user build: its samples, its library and its python test suite."""

    build: Path

    @property
    def source(self) -> Path:
        return self.build.parent

    @property
    def server(self) -> Path:
        return self.build / "samples" / "server"

    @property
    def client(self) -> Path:
        return self.build / "samples" / "client"

    @property
    def gpio(self) -> Path:
        return self.build / "samples" / "gpio-pci-idio-16"

    @property
    def lib(self) -> Path:
        return self.build / "lib"

    @property
    def suite(self) -> Path:
        return self.source / "test" / "py"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "interop_timeout(seconds): time limit of an interop test (default 60 s)"
    )


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if SUMMARY:
        terminalreporter.section("interop with real peers")
        for line in SUMMARY:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def lvu() -> LvuBuild:
    value = os.environ.get(BUILD_VARIABLE)
    if not value:
        pytest.skip(BUILD_HINT)
    build = LvuBuild(Path(value).resolve())
    missing = [p for p in (build.server, build.client, build.gpio, build.lib / "libvfio-user.so")
               if not p.exists()]
    if missing:
        pytest.fail(f"{BUILD_VARIABLE}={value} is not a libvfio-user build: no {missing[0]}")
    return build


@pytest.fixture(autouse=True)
def interop_deadline(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every interop test is bounded (SIGALRM), besides each wait's own timeout."""
    marker = request.node.get_closest_marker("interop_timeout")
    seconds = float(marker.args[0]) if marker else DEFAULT_TIMEOUT
    with deadline(seconds, request.node.nodeid):
        yield


def short_dir(prefix: str) -> Path:
    """A fresh directory with a short path (UNIX socket paths are limited to 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix=f"vfioproxy-{prefix}-", dir="/tmp"))


@pytest.fixture
def sockdir(tmp_path: Path) -> Iterator[Path]:
    path = short_dir("interop")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[Peers]:
    """Processes of one test; all killed, reaped and checked gone at teardown."""
    group = Peers(tmp_path / "logs")
    try:
        yield group
    finally:
        group.close()

