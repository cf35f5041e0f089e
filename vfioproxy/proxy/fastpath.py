"""Which plain-message lane the threaded forwarding uses: C or Python.

:mod:`vfioproxy.proxy._fastpath` (``vfioproxy/proxy/_fastpath.c``, built by ``pip
install``) forwards and records the plain messages of a session (no fds,
not VERSION, at most 64 KiB) without the GIL, and hands everything else back
to :mod:`vfioproxy.proxy.relay`. Its :class:`Appender` is the lock and
shared state of a trace file: importing this module makes every
:class:`~recorder.writer.TraceWriter` created afterwards use it, so that the
lane and the Python writer append to one file one record after the other.

Where the extension was not built, or with ``VFIOPROXY_PURE_PYTHON=1`` in
the environment, :data:`lane` is None (:data:`without` says why) and every
message takes the Python path, which behaves the same and costs more CPU
(the proxy's tests run both).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any

from recorder import writer

__all__ = ["Appender", "lane", "without"]

#: the trace files' shared state: the C class where it was built
Appender: type[writer.Appender]
#: the C lane's ``relay`` function (see ``vfioproxy/proxy/_fastpath.c``), or None
lane: Callable[..., tuple[Any, ...]] | None
#: why there is no C lane (None: there is one)
without: str | None = None
try:
    # by name: the extension is no Python module of the package's import graph
    _fastpath = importlib.import_module("vfioproxy.proxy._fastpath")
except ImportError as exc:  # not built: the Python path only
    Appender, lane = writer.Appender, None
    without = (f"vfioproxy.proxy._fastpath is not built ({exc}; `pip install -e .` builds it "
               "with a C compiler and Python's headers)")
else:
    Appender = _fastpath.Appender
    writer.use_appender(Appender)
    lane = _fastpath.relay
    if os.environ.get("VFIOPROXY_PURE_PYTHON") == "1":
        lane, without = None, "VFIOPROXY_PURE_PYTHON=1"
