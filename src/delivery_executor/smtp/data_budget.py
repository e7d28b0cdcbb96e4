"""A server-wide budget for the bytes sessions hold in DATA: ordered, deadlock-free waits.

A DATA reader takes a :class:`DataHold` from the server's :class:`DataBudget`
for each transfer, reserves before it holds bytes, and closes the hold once
the message is answered::

    hold = budget.hold(cap=data_size_limit + 4096)   # the most it will ever hold
    try:
        async with asyncio.timeout(30):
            await hold.open(declared_size or 65536)  # before the 354; waits in line
    except TimeoutError:
        ...                                          # answer 451 4.3.1
    try:
        ...                                          # per chunk read:
        hold.used += len(chunk)
        if need := hold.shortfall():
            if not hold.try_grow(need):
                async with asyncio.timeout(30):      # stop reading meanwhile
                    await hold.grow(need)
    finally:
        hold.close()                                 # after the reply

Our protocol subclasses do this around aiosmtpd's own DATA reader (see
:mod:`.protocol`); a bulk reader calls the same methods.

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
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

__all__ = ["DataBudget", "DataHold"]

_ANONYMOUS_CAP = 0


class DataHold:
    """One transfer's reservation: opened with a first slice, grown as bytes arrive.

    Make it with :meth:`DataBudget.hold`. ``used`` is what the transfer holds
    (the reader keeps it up to date); ``reserved`` what it has reserved, never
    more than ``cap`` (past the size limit a reader discards, so it holds
    nothing more). :meth:`close` gives everything back and is idempotent.
    """

    __slots__ = ("budget", "cap", "closed", "reserved", "seq", "used")

    def __init__(self, budget: DataBudget, cap: int, seq: int) -> None:
        self.budget = budget
        self.cap = cap
        self.seq = seq  # age: lower is older
        self.reserved = 0
        self.used = 0
        self.closed = False

    def __repr__(self) -> str:
        return f"<DataHold #{self.seq} used={self.used} reserved={self.reserved}/{self.cap}>"

    async def open(self, first: int) -> None:
        """Reserve the first ``first`` bytes (clamped to ``cap``), waiting in line."""
        n = max(0, min(first, self.cap))
        await self.budget._acquire(self, n)
        self.reserved += n

    def shortfall(self) -> int:
        """Bytes to reserve so that ``used`` (up to ``cap``) is covered; 0 when it is.

        Asks for at least as much again as is reserved (doubling), so a large
        transfer makes O(log size) reservations.
        """
        need = min(self.used, self.cap) - self.reserved
        if need <= 0:
            return 0
        return min(max(need, self.reserved), self.cap - self.reserved)

    def try_grow(self, n: int) -> bool:
        """Reserve ``n`` more now if the rules allow it; never waits."""
        if self.closed or not self.budget._try(self, n):
            return False
        self.reserved += n
        return True

    async def grow(self, n: int) -> None:
        """Reserve ``n`` more, waiting in line (by the transfer's age)."""
        await self.budget._acquire(self, n)
        if self.closed:  # closed while it waited: nothing to hold any more
            self.budget._give(n)
        else:
            self.reserved += n

    def close(self) -> None:
        """Give every reserved byte back; the transfer is over."""
        if not self.closed:
            self.closed = True
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
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"max_bytes must be a positive int, not {max_bytes!r}")
        self.max_bytes = max_bytes
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

    def hold(self, cap: int) -> DataHold:
        """A new transfer that will hold at most ``cap`` bytes (clamped to the budget)."""
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
            raise ValueError(f"cap must be an int >= 0, not {cap!r}")
        return DataHold(self, min(cap, self.max_bytes), next(self._order))

    # -- plain reservations, for anything that is not a transfer

    def try_reserve(self, n: int) -> bool:
        """Reserve ``n`` bytes now, as the newest transfer would; never waits."""
        return self._try(self._anonymous(), n)

    async def reserve(self, n: int) -> None:
        """Reserve ``n`` bytes, waiting behind every transfer; bound it with asyncio.timeout()."""
        await self._acquire(self._anonymous(), n)

    def release(self, n: int) -> None:
        """Give back ``n`` bytes taken with :meth:`reserve`/:meth:`try_reserve`."""
        self._give(n)

    def _anonymous(self) -> DataHold:
        hold = DataHold(self, _ANONYMOUS_CAP, next(self._order))
        hold.closed = True  # never active: no headroom is kept for it
        return hold

    # -- the rules

    def _check(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"a reservation must be an int >= 0, not {n!r}")
        if n > self.max_bytes:
            raise ValueError(f"cannot reserve {n} bytes of a {self.max_bytes}-byte budget")

    def _fits(self, hold: DataHold, n: int) -> bool:
        if self.held + n > self.max_bytes:
            return False
        oldest = min(self._active, key=lambda h: h.seq, default=None)
        if oldest is None or oldest is hold or oldest.seq > hold.seq:
            return True  # no older transfer needs room kept for it
        return self.held + n <= self.max_bytes - (oldest.cap - oldest.reserved)

    def _older_waiting(self, hold: DataHold) -> bool:
        line = self._line
        while line and line[0][2].future.done():
            heapq.heappop(line)  # cancelled or timed out
        return bool(line) and line[0][0] < hold.seq

    def _try(self, hold: DataHold, n: int) -> bool:
        self._check(n)
        if self._older_waiting(hold) or not self._fits(hold, n):
            return False
        self._take(hold, n)
        return True

    async def _acquire(self, hold: DataHold, n: int) -> None:
        if self._try(hold, n):
            return
        waiter = _Waiter(hold, n, asyncio.get_running_loop().create_future())
        heapq.heappush(self._line, (hold.seq, next(self._order), waiter))
        try:
            await waiter.future
        except BaseException:
            if waiter.future.done() and not waiter.future.cancelled():
                self._give(n)  # granted in the same instant it gave up: give it back
            else:
                waiter.future.cancel()  # _grant drops it from the line
                self._grant()  # it may have been the head holding others back
            raise

    def _take(self, hold: DataHold, n: int) -> None:
        self.held += n
        self.peak = max(self.peak, self.held)
        if not hold.closed:
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
            if head.future.done():  # cancelled or timed out
                heapq.heappop(line)
                continue
            if not self._fits(head.hold, head.n):
                return  # strict order: nobody overtakes the oldest waiting transfer
            heapq.heappop(line)
            self._take(head.hold, head.n)
            head.future.set_result(None)
