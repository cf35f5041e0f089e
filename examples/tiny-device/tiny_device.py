"""A tiny vfio-user device server: the reference device of vfioproxy as "TinyCo widget".

A stand-in for a real device-server project. It configures vfioproxy's
reference device with its own PCI ids and serves it on a UNIX socket::

    python tiny_device.py /tmp/tiny.sock

Its tests (``tests/``) check it against a recorded realize session with the
vfioproxy pytest plugin.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from vfioproxy.peers.server import DeviceOptions, DeviceServer, open_device_server, serve_device

VENDOR_ID = 0x1234
DEVICE_ID = 0x11E9
OPTIONS = DeviceOptions(vendor_id=VENDOR_ID, device_id=DEVICE_ID)


@asynccontextmanager
async def open_tiny_device(path: str | os.PathLike[str]) -> AsyncIterator[DeviceServer]:
    """The widget, listening on ``path`` for the duration of the ``async with``."""
    async with open_device_server(path, options=OPTIONS) as server:
        yield server


if __name__ == "__main__":
    trio.run(lambda: serve_device(sys.argv[1], options=OPTIONS))
