"""The cross-loop hand-off: requests from any loop or thread reach the home loop.

In the spirit of anyio's ``BlockingPortal``: the executor's collector lives
on one event loop, its *home*, and :class:`HandOff` carries requests there
from other loops and threads, and results back. A request from another loop
goes into a locked inbox; the first one per caller loop *arms* the hand-off
and wakes home with one ``call_soon_threadsafe`` (made by the caller one
iteration of its own loop later, so every request its loop posts meanwhile
rides along). Home takes the whole inbox at once. Results go back the same
way, one call per caller loop per batch (:func:`settle`). Neither loop
blocks or polls. :class:`HandOff` also owns the lifecycle state and, for
``start_thread()``, the private home loop in a daemon thread.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeAlias

from ..errors import ExecutorClosed
from ..store import MessageId
from ..store.commit import Parts
from .lifecycle import Lifecycle

__all__ = ["AnyFuture", "HandOff", "Outcome", "Request", "settle"]

AnyFuture: TypeAlias = "asyncio.Future[MessageId] | concurrent.futures.Future[MessageId]"
Outcome: TypeAlias = "MessageId | BaseException"


class Request:
    """One ``deliver()`` call: where, what, how big, and the future its caller awaits.

    ``info``: checked Maildir info letters (``""``: none, delivered into
    ``new/``); ``key``: what a batch groups by, the path, or ``path NUL info``.
    """

    __slots__ = ("future", "info", "key", "loop", "parts", "path", "size")

    def __init__(
        self,
        path: str,
        parts: Parts,
        size: int,
        future: AnyFuture,
        loop: asyncio.AbstractEventLoop | None,
        info: str = "",
    ) -> None:
        self.path = path
        self.info = info
        self.key = f"{path}\0{info}" if info else path  # no path holds a NUL
        self.parts = parts
        self.size = size
        self.future = future
        self.loop = loop  # the caller's loop when it is not home; None: settle directly

    def abandoned(self) -> bool:
        return self.future.cancelled()


Outcomes: TypeAlias = "list[tuple[Request, Outcome]]"


def _resolve(future: AnyFuture, outcome: Outcome) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _resolve_all(items: list[tuple[AnyFuture, Outcome]]) -> None:
    for future, outcome in items:
        _resolve(future, outcome)


def settle(outcomes: Iterable[tuple[Request, Outcome]]) -> None:
    """Resolve each future with its outcome, on the loop that owns it."""
    remote: dict[asyncio.AbstractEventLoop, list[tuple[AnyFuture, Outcome]]] = {}
    for req, outcome in outcomes:
        if req.loop is None:
            _resolve(req.future, outcome)
        else:
            remote.setdefault(req.loop, []).append((req.future, outcome))
    for loop, items in remote.items():
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
            loop.call_soon_threadsafe(_resolve_all, items)


class HandOff:
    """The home loop, its inbox and the lifecycle; the only state shared across threads.

    ``admit`` takes a request on home; ``refuse`` settles (and counts)
    requests that will not be delivered; ``start`` starts the collector on
    home, in home's thread.
    """

    def __init__(
        self,
        admit: Callable[[Request], None],
        refuse: Callable[[Outcomes], None],
        start: Callable[[asyncio.AbstractEventLoop], None],
    ) -> None:
        self._admit = admit
        self._refuse = refuse
        self._start = start
        self.lock = threading.Lock()  # guards binding, the inbox and the state
        self.home: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None  # the private home loop's, if any
        self.inbox: collections.deque[Request] = collections.deque()
        # Caller loops (None: threads) whose hand-off to home is pending: each
        # wakes home once per hand-off, so a stalled loop never holds up another.
        self.armed: set[asyncio.AbstractEventLoop | None] = set()
        self.ended: ExecutorClosed | None = None  # set when the home loop ends before aclose
        self.state = Lifecycle.IDLE

    def closing(self, to: Lifecycle) -> None:
        """Move the lifecycle toward ``to`` (``CLOSING`` or ``CLOSED``)."""
        with self.lock:
            self.state = self.state.closing(to)

    def crashed(self) -> None:
        """The collector died: the lifecycle says so from now on."""
        with self.lock:
            self.state = self.state.crashed()

    # -- the home loop ------------------------------------------------------

    def bind(self, loop: asyncio.AbstractEventLoop) -> asyncio.AbstractEventLoop:
        """Make ``loop`` (running in this thread) home unless there is one; return home."""
        with self.lock:
            if self.home is not None:
                return self.home
            self.home = loop
            self.state = max(self.state, Lifecycle.OPEN)
        self._start(loop)
        return loop

    def start_thread(self, *, exist_ok: bool) -> None:
        """Make a new loop in a daemon thread home, unless there is a home already."""
        # The home check and the binding under one lock: of concurrent first
        # callers exactly one starts the thread, the others use it.
        with self.lock:
            if self.home is not None:
                if exist_ok:
                    return
                raise RuntimeError("this DeliveryExecutor already has a home loop")
            loop = asyncio.new_event_loop()
            self.home = loop
            self.state = max(self.state, Lifecycle.OPEN)
            self.thread = threading.Thread(
                target=self._run_home_thread, args=(loop,), name="delivery-executor", daemon=True
            )
            # Queued before any hand-off can be: the collector exists before the first request.
            loop.call_soon(self._start, loop)
            self.thread.start()

    @staticmethod
    def _run_home_thread(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    def stop_thread(self, *, join: bool) -> None:
        """Stop the private home loop, if there is one; ``join``: wait for its thread."""
        thread, home = self.thread, self.home
        if thread is None or home is None:
            return
        with contextlib.suppress(RuntimeError):
            home.call_soon_threadsafe(home.stop)
        if join and thread is not threading.current_thread():
            thread.join()

    async def close_from_loop(self, closing: Coroutine[Any, Any, None]) -> None:
        """Run the close ``closing`` on home from another loop; then stop a private home thread.

        If home is closed already, ``closing`` never runs and this returns at once.
        """
        home = self.home
        assert home is not None
        try:
            done = asyncio.run_coroutine_threadsafe(closing, home)
        except RuntimeError:  # the home loop is already closed
            closing.close()  # never to run: no "never awaited" warning
            self.closing(Lifecycle.CLOSING)
            return
        # Stopped by the close itself, whether or not this caller still waits.
        done.add_done_callback(lambda _: self.stop_thread(join=False))
        await asyncio.shield(asyncio.wrap_future(done))

    def close_from_thread(self, closing: Coroutine[Any, Any, None]) -> None:
        """:meth:`close_from_loop` for a thread with no running loop: blocks until closed."""
        home = self.home
        assert home is not None
        try:
            asyncio.run_coroutine_threadsafe(closing, home).result()
        except RuntimeError:  # the home loop is already closed
            closing.close()  # never to run: no "never awaited" warning
            self.closing(Lifecycle.CLOSING)
        self.stop_thread(join=True)

    # -- requests from other loops and threads ----------------------------

    def post(self, req: Request) -> bool:
        """Put ``req`` in the home loop's inbox from another thread; never blocks.

        Returns True if this call armed the hand-off for its loop (or for
        threads): the caller must then :meth:`wake` home; until home takes
        the inbox, later requests from the same loop join that hand-off. If
        the executor has ended, settles ``req`` with the reason instead.
        """
        with self.lock:
            ended = self.ended
            if ended is None and self.home is not None:
                self.inbox.append(req)
                if req.loop in self.armed:
                    return False
                self.armed.add(req.loop)
                return True
        self._refuse([(req, ended or ExecutorClosed("the executor is closed"))])
        return False

    def wake(self) -> None:
        """Have the home loop take the inbox: one ``call_soon_threadsafe`` per arming."""
        home = self.home
        try:
            if home is None:
                raise RuntimeError("no home loop")
            home.call_soon_threadsafe(self.take)
        except RuntimeError:  # closed without our collector noticing (loop.stop + close)
            self.end(ExecutorClosed("the executor's home event loop is closed; nothing was queued"))

    def take(self) -> None:
        """On home: admit every request in the inbox."""
        for req in self.take_all():
            self._admit(req)

    def take_all(self) -> list[Request]:
        """Empty the inbox and disarm every caller loop; return the requests it held."""
        with self.lock:
            posted = list(self.inbox)
            self.inbox.clear()
            self.armed.clear()
        return posted

    def end(self, err: ExecutorClosed) -> ExecutorClosed:
        """The home loop is going away: refuse new requests, fail the inbox."""
        with self.lock:
            if self.ended is None:
                self.ended = err
            self.state = self.state.closing(Lifecycle.CLOSED)
            items = list(self.inbox)
            self.inbox.clear()
        self._refuse([(r, err) for r in items])
        return self.ended
