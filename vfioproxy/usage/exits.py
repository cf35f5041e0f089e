"""The exit codes of every ``vfioproxy`` command, and the ``--help`` text listing them."""

from __future__ import annotations

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_STATUS_HELP", "EXIT_USAGE"]

#: the command did what it was asked and what it checked held
EXIT_OK = 0
#: the thing checked failed: a replay diverged, a realize or demo run failed
EXIT_FAILED = 1
#: usage or input error: a bad option value, a missing or unreadable file, a
#: path that cannot be listened on, an output that exists (argparse uses 2 too)
EXIT_USAGE = 2
#: interrupted (Ctrl-C) where SIGINT is not the documented way to stop
EXIT_INTERRUPTED = 130

#: the exit-code paragraph of every command's ``--help``
EXIT_STATUS_HELP = f"""\
exit status:
  {EXIT_OK:<4} ok
  {EXIT_FAILED:<4} the thing checked failed (a divergence, a failed run)
  {EXIT_USAGE:<4} usage or input error (a bad value, a missing file, an existing output)
  {EXIT_INTERRUPTED:<4} interrupted (Ctrl-C)"""
