"""Which plain-message lane the threaded forwarding uses: C or Python.

:mod:`vfioproxy._fastpath` (``vfioproxy/_fastpath.c``, built by ``pip
install``) forwards and records the plain messages of a session (no fds,
not VERSION, at most 64 KiB) without the GIL, and hands everything
else back to :mod:`vfioproxy.proxy.relay`; its :class:`Appender` is the lock
and shared state of a trace file, which the :class:`~recorder.writer.TraceWriter`
uses either way. Where the extension was not built, or with
``VFIOPROXY_PURE_PYTHON=1`` in the environment, :data:`lane` is None
(:data:`without` says why) and every message takes the Python path, which
behaves the same and costs more CPU (the proxy's tests run both); without
the extension :class:`Appender` is the Python class below.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

__all__ = ["Appender", "lane", "without"]


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
#: why there is no C lane (None: there is one)
without: str | None = None
try:
    from vfioproxy import _fastpath
except ImportError as exc:  # not built: the Python path only
    Appender, lane = PyAppender, None
    without = (f"vfioproxy._fastpath is not built ({exc}; `pip install -e .` builds it with a "
               "C compiler and Python's headers)")
else:
    Appender = _fastpath.Appender  # type: ignore[assignment]
    lane = _fastpath.relay
    if os.environ.get("VFIOPROXY_PURE_PYTHON") == "1":
        lane, without = None, "VFIOPROXY_PURE_PYTHON=1"
