"""The fds the proxy keeps in place of the ones it interposes on.

An interposition mode (:mod:`vfioproxy.interpose`) may plan an fd as
``INTERPOSE``: the proxy keeps the fd that arrived and forwards a
substitute it owns in its place (``interpose-irqs``: an eventfd the proxy
watches, signalling the client's own when it fires). A session's
:class:`Substitutes` makes and owns those substitutes; the relay
(:mod:`vfioproxy.proxy.relay`) calls it and never closes what it handed
over.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from vfioproxy.interpose import FdPlan
from vfioproxy.io.fds import OwnedFd

if TYPE_CHECKING:
    from vfioproxy.proxy.ledger import SessionLedger

__all__ = ["Substitutes", "SubstitutesFactory"]


class Substitutes(Protocol):
    """What one session keeps in place of the fds it interposes on."""

    def interpose(self, fd: OwnedFd, plan: FdPlan) -> OwnedFd:
        """Take ``fd`` (now its owner) and return the substitute to forward in
        its place (the relay forwards it and closes its copy after the send,
        as with any fd). An error is raised only when no substitute can be
        made (out of fds): the relay then forwards ``fd`` itself, unchanged."""
        ...

    def release(self, irqs: Sequence[tuple[int, int]]) -> None:
        """The interposed IRQ vectors (index, vector) a message ended: close
        what is kept for them."""
        ...

    def close(self) -> None:
        """The session ended: close everything kept; idempotent."""
        ...


#: makes a session's :class:`Substitutes` (None: the session interposes on no fd)
SubstitutesFactory = Callable[["SessionLedger"], Substitutes | None]
