"""The one ``with`` protocol of the objects that own something to close."""

from __future__ import annotations

from typing import Self

__all__ = ["Closing"]


class Closing:
    """A context manager whose exit calls :meth:`close` (the subclass's).

    Used by the trace reader, writer and sink here and by
    :class:`vfioproxy.io.fds.OwnedFd`; it adds no instance state.
    """

    __slots__ = ()

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
