import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest
from tiny_device import open_tiny_device


@pytest.fixture
def device_server() -> Callable[[], AbstractAsyncContextManager[str]]:
    """A factory of fresh widgets, each yielding its socket path (in a short temporary
    directory: UNIX socket paths are short). The replay plugin starts one to record
    a trace and another to replay it."""

    @asynccontextmanager
    async def start() -> AsyncIterator[str]:
        with tempfile.TemporaryDirectory(prefix="tiny-") as tmp:
            path = Path(tmp) / "device.sock"
            async with open_tiny_device(path):
                yield str(path)

    return start
