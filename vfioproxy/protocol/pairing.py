"""Commands waiting for their replies: the one pairing table.

A reply names its command by ``msg_id`` alone (protocol.md §1.3), and a
sender may reuse an id before the first command with it was answered (a
violation, but receivers answer in order): :class:`Outstanding` keeps the
waiting commands of one direction by id, first sent first answered, and
bounds what a peer can make it keep. Every place that pairs replies with
commands uses it: the session state, the reference peers' endpoint, the
replay client and the fault injector (which pairs region-access replies
with their requests).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

__all__ = ["MAX_OUTSTANDING", "Outstanding"]

T = TypeVar("T")

#: how many commands per direction may wait for their reply before the oldest
#: is forgotten (the session state reports it as ``outstanding_overflow``):
#: bounds what one session can make a reader or the proxy keep
MAX_OUTSTANDING = 4096


class Outstanding(Generic[T]):
    """Items (commands, or what a caller keeps of them) waiting by ``msg_id``.

    ``limit`` bounds how many wait in all: adding one more forgets the oldest
    (returned by :meth:`add`). ``per_id`` bounds how many wait with one id:
    one more forgets that id's oldest. None: no bound.
    """

    __slots__ = ("_by_id", "_count", "_order", "_serial", "limit", "per_id")

    def __init__(self, limit: int | None = None, *, per_id: int | None = None) -> None:
        if (limit is not None and limit < 1) or (per_id is not None and per_id < 1):
            raise ValueError(f"bounds must be at least 1 (got limit={limit}, per_id={per_id})")
        self.limit = limit
        self.per_id = per_id
        self._by_id: dict[int, deque[tuple[int, T]]] = {}
        # (serial, msg_id) in the order added, for forgetting the oldest;
        # entries of items taken since are skipped (and pruned) lazily
        self._order: deque[tuple[int, int]] = deque()
        self._serial = 0
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[T]:
        """Every waiting item (by id, then in the order added)."""
        for queue in self._by_id.values():
            for _, item in queue:
                yield item

    def add(self, msg_id: int, item: T) -> T | None:
        """Make ``item`` wait for the reply to ``msg_id``; returns the item a
        bound made it forget (None: nothing was forgotten)."""
        forgotten = None
        queue = self._by_id.get(msg_id)
        if queue is None:
            queue = self._by_id[msg_id] = deque()
        elif self.per_id is not None and len(queue) >= self.per_id:
            forgotten = queue.popleft()[1]
            self._count -= 1
        if self.limit is not None and self._count >= self.limit and forgotten is None:
            forgotten = self._forget_oldest()
            queue = self._by_id.setdefault(msg_id, queue)
        self._serial += 1
        queue.append((self._serial, item))
        self._count += 1
        if self.limit is not None:
            self._order.append((self._serial, msg_id))
            if len(self._order) > 2 * max(self.limit, 1):
                self._prune()
        return forgotten

    def first(self, msg_id: int) -> T | None:
        """The oldest item waiting for ``msg_id`` (it stays), or None."""
        queue = self._by_id.get(msg_id)
        return queue[0][1] if queue else None

    def take(self, msg_id: int, match: Callable[[T], bool] | None = None) -> T | None:
        """Take out the oldest item waiting for ``msg_id`` (the oldest ``match``
        accepts, when given), or None when there is none."""
        queue = self._by_id.get(msg_id)
        if not queue:
            return None
        if match is None:
            _, item = queue.popleft()
        else:
            for entry in queue:
                if match(entry[1]):
                    queue.remove(entry)
                    item = entry[1]
                    break
            else:
                return None
        if not queue:
            del self._by_id[msg_id]
        self._count -= 1
        return item

    def discard(self, msg_id: int, item: T) -> None:
        """Take ``item`` out if it waits for ``msg_id`` (it was given up on)."""
        self.take(msg_id, lambda waiting: waiting is item)

    def clear(self) -> list[T]:
        """Take every item out; returns them."""
        items = list(self)
        self._by_id.clear()
        self._order.clear()
        self._count = 0
        return items

    def _forget_oldest(self) -> T:
        while True:
            serial, msg_id = self._order.popleft()
            queue = self._by_id.get(msg_id)
            if queue and queue[0][0] == serial:
                break
        _, item = queue.popleft()
        if not queue:
            del self._by_id[msg_id]
        self._count -= 1
        return item

    def _prune(self) -> None:
        waiting = {serial for queue in self._by_id.values() for serial, _ in queue}
        self._order = deque(entry for entry in self._order if entry[0] in waiting)
