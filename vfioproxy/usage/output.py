"""What ``-o`` means, the same for every command.

``DIR/`` (a trailing slash) or an existing directory is a directory: the
command writes one file (or folder) per session or run into it. Any other
path is a file. An output that exists is never replaced or mixed with new
results without ``--force``; for a directory, ``--force`` clears only what
the command itself writes there, never other files.
"""

from __future__ import annotations

import errno
import os
import select
import shutil
from collections.abc import Iterable
from pathlib import Path

from vfioproxy.errors import UsageError

__all__ = ["check_reader", "claim_directory", "claim_file", "fresh_file", "is_directory"]


def is_directory(text: str | os.PathLike[str]) -> bool:
    """Whether the output ``text`` names a directory: ``DIR/`` or an existing directory."""
    text = os.fspath(text)
    return text.endswith("/") or os.path.isdir(text)


def claim_file(path: str | os.PathLike[str], *, force: bool) -> None:
    """Check that the output file ``path`` may be written: it does not exist,
    or ``force`` (the file is then replaced when written); :class:`UsageError`
    saying which, and how to replace it, otherwise."""
    if os.path.lexists(path) and not force:
        raise UsageError(f"{os.fspath(path)} already exists (--force replaces it)")


def fresh_file(directory: str | os.PathLike[str], name: str) -> Path:
    """A file in ``directory`` (created if missing) that does not exist yet:
    ``name``, else ``name`` with ``-2``, ``-3``... before its suffix."""
    root = Path(directory)
    if os.path.lexists(root) and not root.is_dir():
        raise UsageError(f"{root} exists and is not a directory")
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    first = root / name
    candidate, number = first, 1
    while os.path.lexists(candidate):
        number += 1
        candidate = first.with_stem(f"{first.stem}-{number}")
    return candidate


def claim_directory(
    path: str | os.PathLike[str], names: Iterable[str], *, force: bool
) -> None:
    """Check the output directory ``path`` of a run that writes ``names``
    (files or folders) into it: :class:`UsageError` if it is no directory,
    or if it holds any of ``names`` from an earlier run and not ``force``.
    With ``force`` those (and only those) are removed. A missing directory
    is left for the run to create."""
    root = Path(path)
    if os.path.lexists(root) and not root.is_dir():
        raise UsageError(f"{root} exists and is not a directory")
    earlier = [name for name in names if os.path.lexists(root / name)]
    if earlier and not force:
        raise UsageError(f"{root} holds the output of an earlier run ({', '.join(earlier)}); "
                         "--force replaces it")
    for name in earlier:
        target = root / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()


def check_reader(fd: int) -> None:
    """Raise :class:`BrokenPipeError` when the reader of the pipe or socket
    ``fd`` writes to has gone (what a write would find, known without one:
    a follower waiting for more to write ends at once). A file or terminal
    never has."""
    poller = select.poll()
    poller.register(fd, 0)  # POLLERR and POLLHUP are always reported
    for _, events in poller.poll(0):
        if events & (select.POLLERR | select.POLLHUP):
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))
