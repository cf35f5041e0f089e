"""Reading traces back as vfio-user sessions (the home of trace analysis).

:mod:`recorder` is the trace format alone; here its records become protocol
messages again: :mod:`~vfioproxy.trace.decoded` runs the sans-IO session
state over them (decoded bodies, request/reply pairing, the violations
derived on read), :mod:`~vfioproxy.trace.show` and
:mod:`~vfioproxy.trace.stats` are ``vfioproxy trace show`` and ``stats``,
and :mod:`~vfioproxy.trace.rawcap` imports libvfio-user-style rawcap
captures (``vfioproxy trace import``).
"""

from vfioproxy.trace.rawcap import ImportResult, import_rawcap

__all__ = ["ImportResult", "import_rawcap"]
