"""The executor's backpressure: a count and a byte budget, with a FIFO waiting room.

A request is *admitted* when the queue has room for one more request and the
bytes not yet durable leave room for its body; otherwise it waits in a FIFO
room. Freed room admits waiters from the head, one at a time, for as long as
the head fits: O(1) per admitted request, whatever the number waiting, and
never a newer request ahead of an older one.
"""

from __future__ import annotations

import collections
from typing import Generic, Protocol, TypeVar

__all__ = ["Budget"]


class _Admittable(Protocol):
    size: int

    def abandoned(self) -> bool: ...


R = TypeVar("R", bound=_Admittable)


class Budget(Generic[R]):
    """Admission for at most ``max_count`` queued requests and ``max_bytes`` undurable bytes.

    ``count`` is held from admission until the collector takes the request into
    a batch (:meth:`taken`); ``nbytes`` until its batch is done (:meth:`done`).
    Not thread-safe: the executor uses it on its home loop only.
    """

    __slots__ = ("count", "max_bytes", "max_count", "nbytes", "room")

    def __init__(self, max_count: int, max_bytes: int) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.count = 0
        self.nbytes = 0
        self.room: collections.deque[R] = collections.deque()

    def offer(self, item: R) -> bool:
        """Admit ``item`` now (True) or put it at the back of the room (False)."""
        if not self.room and self._fits(item.size):
            self.count += 1
            self.nbytes += item.size
            return True
        self.room.append(item)
        return False

    def taken(self, n: int) -> list[R]:
        """``n`` admitted requests left the queue; the waiters admitted in their place."""
        self.count -= n
        return self._admit()

    def done(self, nbytes: int) -> list[R]:
        """A batch holding ``nbytes`` is durable (or failed); the waiters admitted now."""
        self.nbytes -= nbytes
        return self._admit()

    def _fits(self, size: int) -> bool:
        return self.count < self.max_count and self.nbytes + size <= self.max_bytes

    def _admit(self) -> list[R]:
        admitted: list[R] = []
        room = self.room
        while room:
            head = room[0]
            if head.abandoned():  # its caller was cancelled before it got in: drop it
                room.popleft()
                continue
            if not self._fits(head.size):
                break
            room.popleft()
            self.count += 1
            self.nbytes += head.size
            admitted.append(head)
        return admitted
