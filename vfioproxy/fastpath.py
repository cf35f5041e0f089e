"""Which plain-message lane the threaded forwarding uses: C or Python.

:mod:`vfioproxy._fastpath` (``vfioproxy/_fastpath.c``, built by ``pip
install``) forwards and records the plain messages of a session (no fds,
not VERSION, within the buffer limit) without the GIL, and hands everything
else back to :mod:`vfioproxy.proxy.relay`; its :class:`Appender` is the lock
and shared state of a trace file, which the :class:`~recorder.writer.TraceWriter`
uses either way. Where the extension was not built, or with
``VFIOPROXY_PURE_PYTHON=1`` in the environment, :data:`lane` is None and
:class:`Appender` is the Python class below: every message then takes the
Python path, which behaves the same (the proxy's tests run both).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

__all__ = ["Appender", "lane", "lane_name"]


class PyAppender:
    """A trace file's lock and the state its writers share, in Python."""

    def __init__(self) -> None:
        self.fd = -1
        self.seq = 0
        self.size = 0
        self.reserved_end = 0
        self.reserve = 0
        self.fast = 0
        self.inline_max = 0
        self._lock = threading.Lock()

    def acquire(self) -> bool:
        return self._lock.acquire()

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> PyAppender:
        self._lock.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._lock.release()


#: the C class where it was built (the same attributes and methods)
Appender: type[PyAppender]
#: the C lane's ``relay`` function (see ``vfioproxy/_fastpath.c``), or None
lane: Callable[..., tuple[Any, ...]] | None
try:
    from vfioproxy import _fastpath
except ImportError:  # not built: the Python path only
    Appender, lane = PyAppender, None
else:
    Appender = _fastpath.Appender  # type: ignore[assignment]
    lane = None if os.environ.get("VFIOPROXY_PURE_PYTHON") == "1" else _fastpath.relay


def lane_name() -> str:
    """``"C"`` or ``"Python"``: which lane forwards plain messages in this process."""
    return "Python" if lane is None else "C"
