"""``DeliveryExecutor``: group commit for concurrent delivery sessions, on any loop or thread.

Callers ``await executor.deliver(path, body)``. Requests are admitted under a
count and byte budget (:mod:`.budget`), queued, and taken in batches by one
collector task, which groups each batch by Maildir path and hands it to a
batch writer (:mod:`.writers`) under ``asyncio.Semaphore(max_concurrent_flushes)``.
Every caller awaits its own future, resolved only once its message is durable.

**Home loop.** The collector, the queue and the writer live on one event loop,
the executor's *home*: the loop that first enters ``async with``, calls
:meth:`start` or awaits :meth:`deliver`; or, for :meth:`start_thread`, ``with``
and :meth:`deliver_sync` on an executor not yet started, a private loop in a
daemon thread the executor owns. A caller on any other loop or thread is
served through the home loop: its request is handed over with one
``call_soon_threadsafe``, made one iteration of the caller's loop later and
shared by every request that loop posts meanwhile (so its callers' requests
arrive together and batch as on the home loop), and its result comes back
the same way, one call per caller loop per batch. Neither loop blocks or
polls. The home loop must keep
running until :meth:`aclose` (or :meth:`close`) returns.

Two batching policies:

``"eager"`` (default)
    Natural batching: as soon as a flush slot is free, flush everything that is
    queued (up to ``max_batch``). A lone caller is never held back; under load
    requests pile up while the slots are busy, so batches grow by themselves.
    ``max_wait`` is then only an upper bound that is never waited out.
``"window"``
    The original's fixed window: after the first request, collect until
    ``max_batch`` requests or ``max_wait`` have passed, then wait for a slot.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Iterable
from datetime import timedelta
from types import TracebackType
from typing import Literal, Self, TypeAlias

from .budget import Budget
from .errors import ExecutorClosed, ExecutorCrashed, MessageTooLarge, TooManyParts
from .stats import ExecutorStats, StatsRecorder
from .store import Message, MessageId, SyncMode, check_maildir_path, check_message, check_sync
from .store.commit import Parts
from .validate import count, seconds
from .writers import BatchWriter, LoopWriter, ProcessWriter, ThreadWriter

__all__ = [
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_CONCURRENT_FLUSHES",
    "DEFAULT_MAX_QUEUED_BYTES",
    "DEFAULT_MAX_WAIT",
    "BatchPolicy",
    "DeliveryExecutor",
    "WriterName",
]

DEFAULT_MAX_BATCH = 64
"""Requests per batch at most (the original's microbench sweet spot)."""
DEFAULT_MAX_WAIT = 0.010
"""Seconds a request may wait for its batch to fill (``"window"`` policy)."""
DEFAULT_MAX_CONCURRENT_FLUSHES = 2
"""Batches being written at once: 2 hides one batch's sync behind the next's collection."""
DEFAULT_MAX_QUEUED_BYTES = 64 * 1024 * 1024
"""Body bytes accepted but not yet durable, at most; past it requests wait for room."""

BatchPolicy: TypeAlias = Literal["eager", "window"]
WriterName: TypeAlias = Literal["loop", "thread", "process"]
POLICIES: tuple[BatchPolicy, ...] = ("eager", "window")
WRITERS: tuple[WriterName, ...] = ("loop", "thread", "process")
_log = logging.getLogger("delivery_executor")

AnyFuture: TypeAlias = "asyncio.Future[MessageId] | concurrent.futures.Future[MessageId]"
Outcome: TypeAlias = "MessageId | BaseException"


class _Request:
    __slots__ = ("future", "loop", "parts", "path", "size")

    def __init__(
        self,
        path: str,
        parts: Parts,
        size: int,
        future: AnyFuture,
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        self.path = path
        self.parts = parts
        self.size = size
        self.future = future
        self.loop = loop  # the caller's loop when it is not home; None: settle directly

    def abandoned(self) -> bool:
        return self.future.cancelled()


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


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _make_writer(writer: BatchWriter | WriterName, sync: SyncMode, sizes: bool) -> BatchWriter:
    check_sync(sync)
    if isinstance(writer, str):
        if writer == "loop":
            return LoopWriter(sync, size_in_names=sizes)
        if writer == "thread":
            return ThreadWriter(sync=sync, size_in_names=sizes)
        if writer == "process":
            return ProcessWriter(sync, size_in_names=sizes)
        raise ValueError(f"writer must be one of {WRITERS} or a BatchWriter, not {writer!r}")
    if not callable(getattr(writer, "acommit", None)) or not callable(
        getattr(writer, "aclose", None)
    ):
        raise TypeError(
            f"writer must be one of {WRITERS} or a BatchWriter (async acommit and aclose),"
            f" not {type(writer).__name__}"
        )
    return writer


class DeliveryExecutor:
    """Group-commits concurrent Maildir deliveries; each caller awaits its own result.

    Build it with keywords and use it with ``async with`` (or ``with`` from
    threads); ``spawn``, ``with_config`` and ``with_full_config`` are the
    original's constructors. It can be shared by every session, loop and
    thread of a process (see the module doc for the home loop).

    Parameters:
        max_batch: requests per batch at most.
        max_wait: seconds (or timedelta) a request may wait for its batch to
            fill; only the ``"window"`` policy waits it out.
        max_concurrent_flushes: batches being written at once.
        policy: ``"eager"`` (default) or ``"window"`` (the original).
        sync: the store's sync form for a named writer: ``"auto"``,
            ``"syncfs"`` or ``"fsync"``.
        max_queued: requests queued at most (default ``max_batch * 16``);
            further requests wait for room, oldest first.
        max_queued_bytes: body bytes accepted and not yet durable, at most;
            further requests wait for room, oldest first.
        max_message_size: larger bodies raise :class:`MessageTooLarge`
            (default and upper bound: ``max_queued_bytes``).
        writer: where batches are written: ``"loop"`` (default: page-cache
            work on the loop, syncs in a thread), ``"thread"``, ``"process"``
            (a helper process), or any :class:`~delivery_executor.writers.BatchWriter`.
        size_in_names: for a named writer, end each file name with
            ``,S=<size>,W=<size with CRLF>`` as Dovecot does (default).

    Raises ``TypeError``/``ValueError`` naming the bad value. Costs nothing
    until started: no loop, thread or process is needed to construct it.
    """

    def __init__(
        self,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_wait: float | timedelta = DEFAULT_MAX_WAIT,
        max_concurrent_flushes: int = DEFAULT_MAX_CONCURRENT_FLUSHES,
        *,
        policy: BatchPolicy = "eager",
        sync: SyncMode = "auto",
        max_queued: int | None = None,
        max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
        max_message_size: int | None = None,
        writer: BatchWriter | WriterName = "loop",
        size_in_names: bool = True,
    ) -> None:
        self.max_batch = count("max_batch", max_batch)
        self.max_wait = seconds("max_wait", max_wait)
        self.max_concurrent_flushes = count("max_concurrent_flushes", max_concurrent_flushes)
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, not {policy!r}")
        self.policy: BatchPolicy = policy
        self.max_queued = count("max_queued", max_batch * 16 if max_queued is None else max_queued)
        self.max_queued_bytes = count("max_queued_bytes", max_queued_bytes)
        size = max_queued_bytes if max_message_size is None else max_message_size
        self.max_message_size = count("max_message_size", size)
        if self.max_message_size > self.max_queued_bytes:
            raise ValueError(
                f"max_message_size ({size}) must not exceed max_queued_bytes ({max_queued_bytes})"
            )
        self.writer: BatchWriter = _make_writer(writer, sync, size_in_names)
        # The writer's own limit, checked at deliver(): in a batch it would fail everyone.
        limit = getattr(self.writer, "max_parts", None)
        self._max_parts = None if limit is None else count("writer.max_parts", limit)

        self._lock = threading.Lock()  # guards binding and the inbox, the only shared state
        self._home: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._inbox: collections.deque[_Request] = collections.deque()
        # Caller loops (None: threads) whose hand-off to home is pending: each
        # wakes home once per hand-off, so a stalled loop never holds up another.
        self._armed: set[asyncio.AbstractEventLoop | None] = set()
        self._ended: ExecutorClosed | None = None  # set when the home loop ends before aclose

        # Home-loop state from here on.
        self._budget: Budget[_Request] = Budget(self.max_queued, self.max_queued_bytes)
        self._queue: collections.deque[_Request] = collections.deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._slots: asyncio.Semaphore | None = None
        self._collector: asyncio.Task[None] | None = None
        self._flushes: set[asyncio.Task[None]] = set()
        self._in_flight = 0
        self._closing = False
        self._closed: asyncio.Future[None] | None = None
        self._crash: BaseException | None = None
        self._abort: ExecutorClosed | None = None
        self._closer: asyncio.Task[None] | None = None  # the close, once begun (_drain)
        self._stats = StatsRecorder()

    # -- the original's constructors --------------------------------------

    @classmethod
    def spawn(cls) -> Self:
        """Defaults, with the collector started now on the running loop (needs one)."""
        ex = cls()
        ex._bind(asyncio.get_running_loop())
        return ex

    @classmethod
    def with_config(cls, max_batch: int, max_wait: float | timedelta) -> Self:
        """The original's ``with_config(max_batch, max_wait)``."""
        return cls(max_batch, max_wait)

    @classmethod
    def with_full_config(
        cls, max_batch: int, max_wait: float | timedelta, max_concurrent_flushes: int
    ) -> Self:
        """The original's ``with_full_config(max_batch, max_wait, max_concurrent_flushes)``."""
        return cls(max_batch, max_wait, max_concurrent_flushes)

    # -- delivering --------------------------------------------------------

    async def deliver(self, path: str | os.PathLike[str], body: Message) -> MessageId:
        """Deliver ``body`` durably into the Maildir at ``path``; return its id.

        ``path`` names a Maildir root (str or PathLike; a relative path is
        resolved against the working directory now), created on first use.
        ``body`` is bytes-like, or a tuple of bytes-like parts written in
        order; it is not copied, so a ``bytearray`` must not change until this
        returns. Returns once the message's bytes and its name in ``new/`` are
        durable. Waits for room under backpressure. Works from any event loop
        and thread (see the module doc); the first caller's loop becomes home
        if the executor is not started yet.

        Raises, before anything is queued: ``TypeError`` (wrong types),
        :class:`InvalidMaildirPath` (empty path, NUL byte, too long),
        :class:`MessageTooLarge`, :class:`TooManyParts` (more than the
        writer's ``max_parts``: 255 for ``"process"``), :class:`ExecutorClosed` and
        :class:`ExecutorCrashed`. A storage failure raises the original
        ``OSError`` (type, errno, filename). If the caller is cancelled once
        its request is queued, the write goes on and may complete: at least
        once, never lost.
        """
        p, parts, size = self._check(path, body)
        loop = asyncio.get_running_loop()
        home = self._home
        if home is None:
            home = self._bind(loop)
        future: asyncio.Future[MessageId] = loop.create_future()
        if home is loop:
            self._admit(_Request(p, parts, size, future, None))
        elif self._post(_Request(p, parts, size, future, loop)):
            try:
                # One loop iteration for this loop's other callers to post too:
                # woken at once, the home loop would flush the first few alone
                # (eager batching), and batches came out a third of same-loop's.
                await asyncio.sleep(0)
            except asyncio.CancelledError:
                future.cancel()  # queued: the write goes on, nobody waits for it
                self._wake_home()
                raise
            except GeneratorExit:
                # Closed unresumed (its loop stopped for good, then GC): no wake
                # from a finalizer. The next hand-off or aclose() takes it.
                raise
            self._wake_home()
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: no "never retrieved" warning
            raise

    def deliver_sync(
        self, path: str | os.PathLike[str], body: Message, *, timeout: float | None = None
    ) -> MessageId:
        """:meth:`deliver` for threads: block until the message is durable; return its id.

        For threaded servers and scripts. Starts a private home loop thread if
        the executor has no home yet. Raises ``RuntimeError`` when called
        from a thread that runs an event loop (on the home loop it would
        deadlock; on another it would stall that loop: ``await deliver()``
        there). ``TimeoutError`` after ``timeout`` seconds, in which case the
        write may still complete. Other errors as :meth:`deliver`.
        """
        running = _running_loop()
        if running is not None:
            which = "the executor's own" if running is self._home else "an"
            raise RuntimeError(
                f"deliver_sync() called from {which} event loop thread, which it would block;"
                " use 'await executor.deliver(...)' there"
            )
        p, parts, size = self._check(path, body)
        if self._home is None:
            self._start_thread(exist_ok=True)  # racing first calls: one starts it
        future: concurrent.futures.Future[MessageId] = concurrent.futures.Future()
        if self._post(_Request(p, parts, size, future, None)):
            self._wake_home()
        return future.result(timeout)

    def _check(self, path: str | os.PathLike[str], body: Message) -> tuple[str, Parts, int]:
        p = check_maildir_path(path)
        parts = check_message(body)
        size = parts[0].nbytes if len(parts) == 1 else sum(v.nbytes for v in parts)
        if size > self.max_message_size:
            raise MessageTooLarge(
                f"message of {size} bytes exceeds max_message_size={self.max_message_size}"
            )
        if self._max_parts is not None and len(parts) > self._max_parts:
            raise TooManyParts(
                f"message of {len(parts)} parts; the {type(self.writer).__name__}"
                f" takes {self._max_parts} at most"
            )
        self._check_open()
        return p, parts, size

    # -- starting and closing ----------------------------------------------

    async def start(self) -> Self:
        """Make the running loop the executor's home and start the collector now."""
        self._check_open()
        loop = asyncio.get_running_loop()
        if self._bind(loop) is not loop:
            raise RuntimeError("this DeliveryExecutor already has another home loop")
        if isinstance(self.writer, ProcessWriter):
            await self.writer.start()
        return self

    def start_thread(self) -> Self:
        """Give the executor a private home loop in a daemon thread, started now.

        For executors shared by several loops that may stop independently
        (aiosmtpd ``Controller`` threads) and for threaded code. Close it with
        :meth:`close` or :meth:`aclose` from anywhere.
        """
        self._start_thread(exist_ok=False)
        return self

    def _start_thread(self, *, exist_ok: bool) -> None:
        # The home check and the binding under one lock: of concurrent first
        # callers exactly one starts the thread, the others use it.
        self._check_open()
        with self._lock:
            if self._home is not None:
                if exist_ok:
                    return
                raise RuntimeError("this DeliveryExecutor already has a home loop")
            loop = asyncio.new_event_loop()
            self._home = loop
            self._thread = threading.Thread(
                target=self._run_home_thread, args=(loop,), name="delivery-executor", daemon=True
            )
            # Queued before any hand-off can be: the collector exists before the first request.
            loop.call_soon(self._start_collector, loop)
            self._thread.start()

    @staticmethod
    def _run_home_thread(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    # A caller's own asyncio.timeout() would only stop waiting; this one fails what is left.
    async def aclose(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Stop accepting, deliver everything accepted, wait for in-flight writes; from any loop.

        Idempotent and safe to call concurrently. Later :meth:`deliver` calls
        raise :class:`ExecutorClosed`. With ``timeout`` (seconds), whatever is
        not written by then fails with :class:`ExecutorClosed` (queued
        requests) or :class:`ExecutorCrashed` (batches being written, which may
        or may not be durable), and ``aclose`` returns.
        """
        if timeout is not None:
            seconds("timeout", timeout)
        loop = asyncio.get_running_loop()
        home = self._home
        if home is None or self._ended is not None:
            self._closing = True
            await self.writer.aclose()
            return
        if home is loop:
            await self._aclose_home(timeout)
            return
        closing = self._aclose_home(timeout)
        try:
            done = asyncio.run_coroutine_threadsafe(closing, home)
        except RuntimeError:  # the home loop is already closed
            closing.close()  # never to run: no "never awaited" warning
            self._closing = True
            return
        # Stopped by the close itself, whether or not this caller still waits.
        done.add_done_callback(lambda _: self._stop_private_thread(join=False))
        await asyncio.shield(asyncio.wrap_future(done))

    def close(self, timeout: float | None = None) -> None:
        """:meth:`aclose` for threads and scripts: blocks until closed.

        ``RuntimeError`` if called from the home loop's own thread (it would
        deadlock there: use ``await aclose()``).
        """
        home = self._home
        if home is None or self._ended is not None:
            self._closing = True
            return
        if _running_loop() is home:
            raise RuntimeError("close() would block the executor's own loop; await aclose()")
        closing = self._aclose_home(timeout)
        try:
            asyncio.run_coroutine_threadsafe(closing, home).result()
        except RuntimeError:  # the home loop is already closed
            closing.close()  # never to run: no "never awaited" warning
            self._closing = True
        self._stop_private_thread(join=True)

    def _stop_private_thread(self, *, join: bool) -> None:
        thread, home = self._thread, self._home
        if thread is None or home is None:
            return
        with contextlib.suppress(RuntimeError):
            home.call_soon_threadsafe(home.stop)
        if join and thread is not threading.current_thread():
            thread.join()

    async def __aenter__(self) -> Self:
        self._check_open()
        loop = asyncio.get_running_loop()
        if self._home is None:
            await self.start()
        elif self._home is not loop and self._thread is None:
            raise RuntimeError("async with: this DeliveryExecutor has another home loop")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __enter__(self) -> Self:
        if self._home is None:
            self._start_thread(exist_ok=True)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- state -------------------------------------------------------------

    def stats(self) -> ExecutorStats:
        """A snapshot of the counters; O(samples) for the percentiles."""
        s = self._stats
        return ExecutorStats(
            delivered=s.delivered,
            failed=s.failed,
            batches=s.batches,
            syncs=s.syncs,
            batch_sizes=dict(sorted(s.batch_sizes.items())),
            queued=len(self._queue),
            queued_bytes=self._budget.nbytes,
            in_flight=self._in_flight,
            flush_latency=s.flush_latency(),
            waiting=len(self._budget.room) + len(self._inbox),
            flush_seconds=s.flush_hist.snapshot(),
        )

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` has begun (or the home loop ended)."""
        return self._closing or self._ended is not None

    def __repr__(self) -> str:
        if self._crash is not None:
            state = "crashed"
        elif (
            self._ended is not None
            or (self._closed is not None and self._closed.done())
            or (self._closing and self._home is None)
        ):
            state = "closed"
        elif self._closing:
            state = "closing"
        else:
            state = "idle" if self._home is None else "open"
        home = "thread" if self._thread is not None else ("loop" if self._home else "none")
        return (
            f"<DeliveryExecutor {state} home={home} policy={self.policy}"
            f" writer={type(self.writer).__name__} queued={len(self._queue)}"
            f" waiting={len(self._budget.room) + len(self._inbox)}"
            f" in_flight={self._in_flight} delivered={self._stats.delivered}"
            f" failed={self._stats.failed} batches={self._stats.batches}>"
        )

    # -- internals: binding and hand-off -----------------------------------

    def _check_open(self) -> None:
        if self._crash is not None:
            raise self._crashed_error()
        if self._ended is not None:
            raise self._ended
        if self._closing:
            raise ExecutorClosed("the DeliveryExecutor is closed; nothing was queued")

    def _crashed_error(self) -> ExecutorCrashed:
        err = ExecutorCrashed(f"the executor's collector died: {self._crash!r}")
        err.__cause__ = self._crash
        return err

    def _bind(self, loop: asyncio.AbstractEventLoop) -> asyncio.AbstractEventLoop:
        """Make ``loop`` (running in this thread) home unless there is one; return home."""
        with self._lock:
            if self._home is not None:
                return self._home
            self._home = loop
        self._start_collector(loop)
        return loop

    def _start_collector(self, loop: asyncio.AbstractEventLoop) -> None:
        self._slots = asyncio.Semaphore(self.max_concurrent_flushes)
        self._collector = loop.create_task(self._run_collector(), name="delivery-collector")

    def _post(self, req: _Request) -> bool:
        """Put ``req`` in the home loop's inbox from another thread; never blocks.

        Returns True if this call armed the hand-off for its loop (or for
        threads): the caller must then :meth:`_wake_home`; until home takes
        the inbox, later requests from the same loop join that hand-off. If
        the executor has ended, settles ``req`` with the reason instead.
        """
        with self._lock:
            ended = self._ended
            if ended is None and self._home is not None:
                self._inbox.append(req)
                if req.loop in self._armed:
                    return False
                self._armed.add(req.loop)
                return True
        self._settle_counted([(req, ended or ExecutorClosed("the executor is closed"))])
        return False

    def _wake_home(self) -> None:
        """Have the home loop take the inbox: one ``call_soon_threadsafe`` per arming."""
        home = self._home
        try:
            if home is None:
                raise RuntimeError("no home loop")
            home.call_soon_threadsafe(self._take_inbox)
        except RuntimeError:  # closed without our collector noticing (loop.stop + close)
            self._end_home(
                ExecutorClosed("the executor's home event loop is closed; nothing was queued")
            )

    def _take_inbox(self) -> None:
        with self._lock:
            items = list(self._inbox)
            self._inbox.clear()
            self._armed.clear()
        for req in items:
            self._admit(req)

    def _end_home(self, err: ExecutorClosed) -> ExecutorClosed:
        """The home loop is going away: refuse new requests, fail the inbox."""
        with self._lock:
            if self._ended is None:
                self._ended = err
            items = list(self._inbox)
            self._inbox.clear()
        self._settle_counted([(r, err) for r in items])
        return self._ended

    # -- internals: the collector -------------------------------------------

    def _admit(self, req: _Request) -> None:
        if self._collector is None or self._collector.done():
            self._settle_counted([(req, self._ended or ExecutorClosed("the executor is closed"))])
        elif self._budget.offer(req):
            self._queue.append(req)
            self._notify()

    def _enqueue(self, admitted: Iterable[_Request]) -> None:
        self._queue.extend(admitted)
        self._notify()

    def _notify(self) -> None:
        w = self._wakeup
        if w is not None and not w.done():
            w.set_result(None)

    async def _wait_for_work(self, within: float | None = None) -> bool:
        """Sleep until a request or close arrives; False if ``within`` seconds passed first."""
        self._wakeup = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(within):
                await self._wakeup
        except TimeoutError:
            return False
        finally:
            self._wakeup = None
        return True

    async def _run_collector(self) -> None:
        try:
            await self._collect()
        except asyncio.CancelledError:
            # aclose(timeout) expired, or the loop is being torn down (asyncio.run's end).
            err = self._abort or ExecutorClosed(
                "the executor's event loop ended before aclose(); an executor lives as long"
                " as its home loop: create a new one, or use 'async with' / start_thread()"
            )
            self._fail_pending(self._end_home(err) if self._abort is None else err)
            raise
        except BaseException as exc:
            self._crash = exc
            self._fail_pending(self._crashed_error())
            if not isinstance(exc, Exception):
                raise
            _log.error("delivery collector crashed", exc_info=exc)

    def _fail_pending(self, err: BaseException) -> None:
        """Fail everything accepted but not handed to a flush (the inbox included)."""
        with self._lock:
            posted = list(self._inbox)
            self._inbox.clear()
            self._armed.clear()
        pending = list(self._queue) + list(self._budget.room) + posted
        self._queue.clear()
        self._budget.room.clear()
        self._settle_counted([(req, err) for req in pending])

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._slots is not None
        while True:
            if not self._queue:
                if self._closing and self._inbox:
                    # Posted from a loop that stopped (or stalls) before it woke
                    # home: accepted all the same, so delivered before closing.
                    self._take_inbox()
                    continue
                if self._closing and not self._budget.room:
                    return
                await self._wait_for_work()
                continue
            if self.policy == "window":
                deadline = loop.time() + self.max_wait
                while len(self._queue) < self.max_batch and not self._closing:
                    if not await self._wait_for_work(deadline - loop.time()):
                        break
            # Eager: while every slot is busy, requests keep piling up in the queue.
            await self._slots.acquire()
            batch = self._take()
            self._launch(batch)

    def _take(self) -> list[_Request]:
        """Move up to max_batch requests from the queue into a batch."""
        queue = self._queue
        n = min(len(queue), self.max_batch)
        batch = [queue.popleft() for _ in range(n)]
        self._enqueue(self._budget.taken(n))
        return batch

    def _launch(self, batch: list[_Request]) -> None:
        self._in_flight += 1
        begun: list[bool] = []
        flush = self._flush(batch, begun)
        task = asyncio.get_running_loop().create_task(flush, name="delivery-flush")
        self._flushes.add(task)
        task.add_done_callback(functools.partial(self._flush_done, batch, begun))

    def _flush_done(
        self, batch: list[_Request], begun: list[bool], task: asyncio.Task[None]
    ) -> None:
        self._flushes.discard(task)
        if begun:
            return
        # Cancelled before its first step (aclose(timeout) right after the
        # launch): _flush's own handlers never ran, so settle and release here.
        assert self._slots is not None
        self._in_flight -= 1
        self._slots.release()
        self._enqueue(self._budget.done(sum(r.size for r in batch)))
        err = ExecutorClosed("the flush was cancelled before it began; nothing was written")
        self._settle_counted([(r, err) for r in batch])

    async def _flush(self, batch: list[_Request], begun: list[bool]) -> None:
        """Write one batch through the writer and settle each caller's future."""
        begun.append(True)
        assert self._slots is not None
        groups: dict[str, list[_Request]] = {}
        for req in batch:
            groups.setdefault(req.path, []).append(req)
        payload = [(path, [r.parts for r in reqs]) for path, reqs in groups.items()]
        nbytes = sum(r.size for r in batch)
        self._stats.batch(len(batch))
        started = time.perf_counter()
        outcomes: list[tuple[_Request, Outcome]] = []
        fatal: BaseException | None = None
        try:
            results, syncs = await self.writer.acommit(payload)
            self._stats.syncs += syncs
            if len(results) != len(payload):
                raise RuntimeError(
                    f"batch writer returned {len(results)} results for {len(payload)} groups"
                )
            for reqs, result in zip(groups.values(), results, strict=True):
                if isinstance(result, BaseException):
                    outcomes.extend((r, result) for r in reqs)
                elif len(result) != len(reqs):
                    raise RuntimeError(
                        f"batch writer returned {len(result)} ids for {len(reqs)} messages"
                    )
                else:
                    outcomes.extend(zip(reqs, result, strict=True))
        except asyncio.CancelledError:
            # Only aclose(timeout) or loop teardown cancels a flush; the write may finish.
            self._settle_counted(
                [(r, ExecutorCrashed("flush cancelled; the write may or may not be durable"))
                 for r in batch]
            )  # fmt: skip
            raise
        except Exception as exc:
            outcomes = [(r, exc) for r in batch]
        except BaseException as exc:  # KeyboardInterrupt, SystemExit: settle, then re-raise
            fatal = exc
            err = ExecutorCrashed(f"the batch writer raised {type(exc).__name__}")
            err.__cause__ = exc
            outcomes = [(r, err) for r in batch]
        finally:
            self._stats.flushed(time.perf_counter() - started)
            self._in_flight -= 1
            self._slots.release()
            self._enqueue(self._budget.done(nbytes))
        self._settle_counted(outcomes)
        if fatal is not None:
            raise fatal

    def _settle_counted(self, outcomes: list[tuple[_Request, Outcome]]) -> None:
        failed = sum(1 for _, o in outcomes if isinstance(o, BaseException))
        self._stats.failed += failed
        self._stats.delivered += len(outcomes) - failed
        self._settle(outcomes)

    @staticmethod
    def _settle(outcomes: Iterable[tuple[_Request, Outcome]]) -> None:
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

    async def _aclose_home(self, limit: float | None) -> None:
        """On home: start the close (once), then wait for it; past ``limit`` seconds, abort.

        The close runs in a task of its own (:meth:`_drain`), so a waiter that
        is cancelled only stops waiting; every waiter's ``limit`` applies,
        including a second caller's while a first, unbounded one waits.
        """
        closed = self._closed
        if closed is None:
            self._closing = True
            closed = self._closed = asyncio.get_running_loop().create_future()
            self._notify()
            self._closer = asyncio.get_running_loop().create_task(
                self._drain(closed), name="delivery-close"
            )
        try:
            async with asyncio.timeout(limit):
                await asyncio.shield(closed)
        except TimeoutError:
            self._abort_writes(limit)
            await asyncio.shield(closed)

    def _abort_writes(self, limit: float | None) -> None:
        """aclose(timeout) expired: fail what is queued, cancel what is being written."""
        if self._abort is None:
            self._abort = ExecutorClosed(f"aclose(timeout={limit}) expired before delivery")
        for task in (self._collector, *self._flushes):
            if task is not None:
                task.cancel()

    async def _drain(self, closed: asyncio.Future[None]) -> None:
        """The close: let the collector deliver what was accepted, wait for the flushes."""
        try:
            if self._collector is not None:
                try:
                    await asyncio.shield(self._collector)
                except asyncio.CancelledError:
                    if self._abort is None:
                        raise  # this task's own: the home loop is being torn down
                except Exception:  # a crash already reached every caller
                    pass
            while self._flushes:
                await asyncio.gather(*self._flushes, return_exceptions=True)
            await self.writer.aclose()
        finally:
            # From now on a hand-off from another loop is refused at once, and
            # one posted after the collector's last look is failed, not left in
            # an inbox that no one will take (the home loop may close next).
            self._end_home(ExecutorClosed("the DeliveryExecutor is closed; nothing was queued"))
            if not closed.done():
                closed.set_result(None)
