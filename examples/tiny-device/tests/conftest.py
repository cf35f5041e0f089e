import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tiny_device import open_tiny_device


@pytest.fixture
async def device_socket() -> AsyncIterator[str]:
    """The widget's socket (in a short temporary directory: UNIX socket paths are short)."""
    with tempfile.TemporaryDirectory(prefix="tiny-") as tmp:
        path = Path(tmp) / "device.sock"
        async with open_tiny_device(path):
            yield str(path)
