"""Run a command as a child subreaper; report how each of its processes ended.

Usage: python reaper.py REPORT.json COMMAND [ARG...]

libvfio-user's ``samples/client`` forks at migration and its *original*
process exec()s the destination server, so the process that goes on as the
client is a grandchild of whoever started it and its exit status is lost.
This wrapper makes itself a child subreaper (``PR_SET_CHILD_SUBREAPER``):
every descendant that is orphaned is reparented to it and reaped here. When
the last one has ended it writes ``{"launched": {...}, "forked": [...]}``
(pid, exit code: negative for a signal) to REPORT.json and exits 0 if every
process exited 0, else 1. Stdlib only.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys

PR_SET_CHILD_SUBREAPER = 36


def main() -> int:
    report, argv = sys.argv[1], sys.argv[2:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    launched = os.fork()
    if launched == 0:
        try:
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    ended: list[dict[str, int]] = []
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        ended.append({"pid": pid, "exit": os.waitstatus_to_exitcode(status)})
    first = next(e for e in ended if e["pid"] == launched)
    result = {"launched": first, "forked": [e for e in ended if e["pid"] != launched]}
    with open(report, "w") as f:
        json.dump(result, f)
    return 0 if all(e["exit"] == 0 for e in ended) else 1


if __name__ == "__main__":
    sys.exit(main())
