"""The command line's one error boundary: whatever a command raises becomes
one line on stderr naming the command, and an exit code.

Bad input (a :class:`~vfioproxy.errors.VfioProxyError` or an ``OSError``,
also inside trio's exception groups) prints ``vfioproxy VERB: what was
wrong`` and exits 2; a realize that failed exits 1; Ctrl-C exits 130 with no
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from vfioproxy.errors import VfioProxyError, os_error_text
from vfioproxy.peers.client import RealizeError
from vfioproxy.usage.exits import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE

__all__ = ["run_command"]


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _expected(exc: BaseException) -> bool:
    return isinstance(exc, (VfioProxyError, OSError, KeyboardInterrupt))


def run_command(verb: str, func: Callable[[argparse.Namespace], int],
                args: argparse.Namespace) -> int:
    """Run ``func(args)`` (the command ``verb``, e.g. ``vfioproxy trace show``) and
    return its exit code, turning the errors a user can cause into one line."""
    try:
        return func(args)
    except BaseException as raised:  # SystemExit and bugs are raised again below
        leaves = _leaves(raised)
        if not all(_expected(leaf) for leaf in leaves):
            raise
        exc = leaves[0]
    if any(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
        print(f"\n{verb}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if isinstance(exc, BrokenPipeError):  # stdout went away (`| head`): nothing to say
        return EXIT_OK
    if isinstance(exc, RealizeError):
        print(f"{verb}: the realize failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    text = os_error_text(exc) if isinstance(exc, OSError) else str(exc)
    print(f"{verb}: {text}", file=sys.stderr)
    return EXIT_USAGE
