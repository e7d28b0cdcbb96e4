"""A server-wide budget for the bytes sessions hold in DATA: ordered, deadlock-free waits.

A DATA reader takes a :class:`DataHold` from the server's :class:`DataBudget`
for each transfer and uses it as an async context manager, so that it is
given back on every exit path (a reply, an error, a cancellation)::

    async with budget.hold(cap=data_size_limit + 4096) as hold:  # the most it will hold
        try:
            async with asyncio.timeout(30):
                await hold.open(4096)            # a small first slice, waits in line
        except TimeoutError:
            ...                                  # answer 451 4.3.1 (the hold is released)
        ...                                      # per chunk received:
        hold.used += len(chunk)
        if not hold.try_cover():
            async with asyncio.timeout(30):      # stop reading meanwhile
                await hold.grow(hold.shortfall())
    # every reserved byte is back here

**Bytes that have arrived.** A transfer reserves a small first slice, then
grows only as bytes are received (what it received, plus at most
:data:`GROW_AHEAD` when that fits, so that a fast transfer does not reserve
per read). A
client that has sent little holds little, however large its message will be:
slow clients cannot fill the budget with bytes they have not sent.

**Order and deadlock.** Requests are served strictly by the age of their
transfer (the oldest first; nobody overtakes a waiting older transfer, so a
large one cannot starve). Transfers that each hold part of the budget and all
need more could wait on each other forever; so the budget always keeps enough
free for the *oldest* transfer to reach its ``cap``: a request from any other
transfer is granted only if that room stays free. The oldest can therefore
always finish, and when it does the next oldest can (provided every ``cap`` is
at most the budget, which :meth:`DataBudget.hold` ensures by clamping). A wait
is then only as long as older transfers take; bound it anyway (the protocols
answer ``451 4.3.1`` before DATA, and close with ``421 4.3.1`` mid-transfer).

**Ownership.** A grant is added to the hold's ``reserved`` at the instant it
is made, so bytes granted to a request that gives up in the same loop
iteration (a timeout, a cancellation) belong to the hold and go back with it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import operator
from types import TracebackType

from .. import validate

__all__ = ["GROW_AHEAD", "DataBudget", "DataHold"]

_age = operator.attrgetter("seq")  # a transfer's age (lower is older), looked up in C

GROW_AHEAD = 64 * 1024
"""Bytes a growing transfer reserves past what it has received, at most."""


class DataHold:
    """One transfer's reservation: opened with a first slice, grown as bytes arrive.

    Make it with :meth:`DataBudget.hold` and use it as ``async with``: leaving
    the block closes it. ``used`` is what the transfer holds (the reader keeps
    it up to date); ``reserved`` what it has reserved, never more than
    ``cap`` (past the size limit a reader discards, so it holds nothing
    more). :meth:`close` gives everything back and is idempotent; a request
    waiting when it is closed returns having reserved nothing.
    """

    __slots__ = ("_waiter", "budget", "cap", "closed", "reserved", "seq", "used")

    def __init__(self, budget: DataBudget, cap: int, seq: int) -> None:
        self.budget = budget
        self.cap = cap
        self.seq = seq  # age: lower is older
        self.reserved = 0
        self.used = 0
        self.closed = False
        self._waiter: _Waiter | None = None

    def __repr__(self) -> str:
        return f"<DataHold #{self.seq} used={self.used} reserved={self.reserved}/{self.cap}>"

    async def __aenter__(self) -> DataHold:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def open(self, first: int) -> None:
        """Reserve the first ``first`` bytes (clamped to ``cap``), waiting in line."""
        await self.budget._acquire(self, max(0, min(first, self.cap)))

    def shortfall(self) -> int:
        """Bytes to reserve so that ``used`` (up to ``cap``) is covered; 0 when it is."""
        return max(0, min(self.used, self.cap) - self.reserved)

    def try_cover(self) -> bool:
        """Cover ``used`` now, with up to :data:`GROW_AHEAD` more if that fits too; never waits.

        False if even the :meth:`shortfall` does not fit (then :meth:`grow` by it).
        """
        need = self.shortfall()
        if not need:
            return True
        ahead = min(need + GROW_AHEAD, self.cap - self.reserved)
        return self.try_grow(ahead) or self.try_grow(need)

    def try_grow(self, n: int) -> bool:
        """Reserve ``n`` more now if the rules allow it; never waits."""
        return not self.closed and self.budget._try(self, n)

    async def grow(self, n: int) -> None:
        """Reserve ``n`` more, waiting in line (by the transfer's age)."""
        if not self.closed:
            await self.budget._acquire(self, n)

    def close(self) -> None:
        """Give every reserved byte back; the transfer is over."""
        if self.closed:
            return
        self.closed = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.future.done():
            waiter.future.set_result(None)  # not granted: it returns holding nothing
        reserved, self.reserved = self.reserved, 0
        self.budget._active.pop(self, None)
        self.budget._give(reserved)


class _Waiter:
    __slots__ = ("future", "hold", "n")

    def __init__(self, hold: DataHold, n: int, future: asyncio.Future[None]) -> None:
        self.hold = hold
        self.n = n
        self.future = future


class DataBudget:
    """At most ``max_bytes`` reserved at once, across all sessions (see the module doc).

    ``held`` is reserved now, ``peak`` the most ever reserved at once,
    ``waiting`` the requests in line. A grant costs O(active transfers) to
    find the oldest, a wait O(log waiting). Not thread-safe: use it from the
    server's event loop.
    """

    __slots__ = ("_active", "_line", "_order", "held", "max_bytes", "peak")

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = validate.count("max_bytes", max_bytes)
        self.held = 0
        self.peak = 0
        self._order = itertools.count()
        self._active: dict[DataHold, None] = {}  # transfers holding a reservation
        self._line: list[tuple[int, int, _Waiter]] = []  # heap by (age, arrival)

    def __repr__(self) -> str:
        return f"<DataBudget held={self.held}/{self.max_bytes} waiting={self.waiting}>"

    @property
    def waiting(self) -> int:
        """Requests waiting for room."""
        return sum(1 for _, _, w in self._line if not w.future.done())

    @property
    def transfers(self) -> int:
        """Open transfers holding a reservation."""
        return len(self._active)

    def hold(self, cap: int) -> DataHold:
        """A new transfer that will hold at most ``cap`` bytes (clamped to the budget)."""
        validate.count("cap", cap, minimum=0)
        return DataHold(self, min(cap, self.max_bytes), next(self._order))

    # -- the rules

    def _check(self, n: int) -> None:
        validate.count("a reservation", n, minimum=0)
        if n > self.max_bytes:
            raise ValueError(f"cannot reserve {n} bytes of a {self.max_bytes}-byte budget")

    def _fits(self, hold: DataHold, n: int) -> bool:
        if self.held + n > self.max_bytes:
            return False
        oldest = min(self._active, key=_age, default=None)
        if oldest is None or oldest is hold or oldest.seq > hold.seq:
            return True  # no older transfer needs room kept for it
        return self.held + n <= self.max_bytes - (oldest.cap - oldest.reserved)

    def _older_waiting(self, hold: DataHold) -> bool:
        line = self._line
        while line and line[0][2].future.done():
            heapq.heappop(line)  # cancelled, timed out or closed
        return bool(line) and line[0][0] < hold.seq

    def _try(self, hold: DataHold, n: int) -> bool:
        self._check(n)
        if self._older_waiting(hold) or not self._fits(hold, n):
            return False
        self._take(hold, n)
        return True

    async def _acquire(self, hold: DataHold, n: int) -> None:
        if hold.closed or self._try(hold, n):
            return
        waiter = _Waiter(hold, n, asyncio.get_running_loop().create_future())
        heapq.heappush(self._line, (hold.seq, next(self._order), waiter))
        hold._waiter = waiter
        try:
            await waiter.future
        except BaseException:
            # Granted in the same instant it gave up: the bytes are already the
            # hold's (``reserved``), and go back when it closes. Else leave the line.
            if not waiter.future.done() or waiter.future.cancelled():
                waiter.future.cancel()  # _grant drops it from the line
                self._grant()  # it may have been the head holding others back
            raise
        finally:
            if hold._waiter is waiter:
                hold._waiter = None

    def _take(self, hold: DataHold, n: int) -> None:
        self.held += n
        self.peak = max(self.peak, self.held)
        hold.reserved += n
        self._active[hold] = None

    def _give(self, n: int) -> None:
        if n < 0 or n > self.held:
            raise ValueError(f"cannot release {n} of {self.held} reserved bytes")
        self.held -= n
        self._grant()

    def _grant(self) -> None:
        line = self._line
        while line:
            _, _, head = line[0]
            if head.future.done():  # cancelled, timed out or closed
                heapq.heappop(line)
                continue
            if not self._fits(head.hold, head.n):
                return  # strict order: nobody overtakes the oldest waiting transfer
            heapq.heappop(line)
            self._take(head.hold, head.n)
            head.future.set_result(None)
