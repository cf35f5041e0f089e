from collections.abc import Iterator

import pytest

from vfioproxy.io.fds import count_open_fds

#: pytester: the pytest plugin is tested by real runs of pytest on generated test files
pytest_plugins = ["pytester"]

#: module marks for tests that pass real fds: leaks and unclosed fds fail the test
FD_HYGIENE = [
    pytest.mark.usefixtures("no_fd_leaks"),
    pytest.mark.filterwarnings(
        "error::ResourceWarning", "error::pytest.PytestUnraisableExceptionWarning"
    ),
]


@pytest.fixture
def no_fd_leaks() -> Iterator[None]:
    """Fail the test if it leaves more (or fewer) fds open than it found."""
    before = count_open_fds()
    yield
    assert count_open_fds() == before, "the test leaked file descriptors"


@pytest.fixture
async def raw_server(nursery, tmp_path):
    """A scripted vfio-user server on a real socket (``tests.test_proxy_inject.RawServer``),
    serving for the test's duration."""
    from tests.test_proxy_inject import RawServer

    server = RawServer(tmp_path / "server.sock")
    await nursery.start(server.serve)
    return server
