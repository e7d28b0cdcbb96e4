"""``DeliveryExecutor``: group commit for concurrent asyncio delivery sessions.

Callers ``await executor.deliver(path, body)``. Requests go into one bounded
``asyncio.Queue``; one collector task takes them in batches, groups each batch
by Maildir path and hands it to a batch writer (by default
:class:`~delivery_executor.writer.MaildirWriter`) under
``asyncio.Semaphore(max_concurrent_flushes)``. The blocking work runs in the
executor's own thread pool (``run_in_executor``), never the loop's default
one: by default only the syncs go there (``offload="syncs"``), while the
microsecond page-cache work stays on the loop; ``offload="all"`` sends the
whole batch. :class:`~delivery_executor.offproc.ProcessWriter` writes in a
helper process instead. Every caller awaits its own future, resolved only
once its message is durable.

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
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType
from typing import Literal, Self, TypeAlias, TypeVar

from .errors import ExecutorClosed, ExecutorCrashed, MessageTooLarge
from .maildir import Body, MessageId, SyncMode, check_body, check_maildir_path
from .writer import BatchWriter, MaildirWriter

__all__ = [
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_CONCURRENT_FLUSHES",
    "DEFAULT_MAX_QUEUED_BYTES",
    "DEFAULT_MAX_WAIT",
    "INLINE_WRITE_LIMIT",
    "BatchPolicy",
    "DeliveryExecutor",
    "ExecutorStats",
]

DEFAULT_MAX_BATCH = 64
"""Requests per batch at most (the original's microbench sweet spot)."""
DEFAULT_MAX_WAIT = 0.010
"""Seconds a request may wait for its batch to fill (``"window"`` policy)."""
DEFAULT_MAX_CONCURRENT_FLUSHES = 2
"""Batches being written at once: 2 hides one batch's sync behind the next's collection."""
INLINE_WRITE_LIMIT = 256 * 1024
"""With ``offload="syncs"``, a batch with more body bytes than this is written
in a thread instead: on the loop it would stall every other session."""
DEFAULT_MAX_QUEUED_BYTES = 64 * 1024 * 1024
"""Body bytes accepted but not yet durable, at most; ``deliver`` waits for room past it."""

BatchPolicy: TypeAlias = Literal["eager", "window"]
_POLICIES = ("eager", "window")
Offloading: TypeAlias = Literal["syncs", "all"]
_OFFLOADS = ("syncs", "all")
_LATENCY_SAMPLES = 4096
_log = logging.getLogger("delivery_executor")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ExecutorStats:
    """A snapshot of an executor's counters (see :meth:`DeliveryExecutor.stats`)."""

    delivered: int
    """Messages made durable and acknowledged."""
    failed: int
    """Messages whose delivery raised (to their caller)."""
    batches: int
    """Batches handed to the writer."""
    syncs: int
    """fdatasync/fsync/syncfs calls the writer made."""
    batch_sizes: dict[int, int]
    """Batch size → how many batches had it."""
    queued: int
    """Requests accepted and waiting for a flush slot."""
    queued_bytes: int
    """Body bytes accepted and not yet durable (queued or being flushed)."""
    in_flight: int
    """Batches being written right now."""
    flush_latency: dict[str, float] = field(default_factory=dict)
    """Seconds per batch write over recent batches: ``p50``, ``p90``, ``p99``, ``max``."""

    @property
    def mean_batch_size(self) -> float:
        """Messages per batch, over all batches so far (0.0 before the first)."""
        n = sum(self.batch_sizes.values())
        return sum(k * v for k, v in self.batch_sizes.items()) / n if n else 0.0


class _Request:
    __slots__ = ("body", "future", "path", "size")

    def __init__(self, path: str, body: memoryview, future: asyncio.Future[MessageId]) -> None:
        self.path = path
        self.body = body
        self.size = body.nbytes
        self.future = future


_STOP = object()


def _seconds(name: str, value: float | timedelta) -> float:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = type(value).__name__
        raise TypeError(f"{name} must be seconds (float) or a timedelta, not {kind}")
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0 seconds, not {value!r}")
    return float(value)


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, not {value!r}")
    return value


class DeliveryExecutor:
    """Group-commits concurrent Maildir deliveries; each caller awaits its own result.

    Construction needs no event loop: the executor binds to the running loop at
    the first :meth:`deliver` (or ``async with``), and must then only be used
    from that loop. Close it with :meth:`aclose` or ``async with``.

    Parameters:
        max_batch: requests per batch at most.
        max_wait: seconds (or timedelta) a request may wait for its batch to
            fill; only the ``"window"`` policy waits it out.
        max_concurrent_flushes: batches written at once, each in its own thread.
        policy: ``"eager"`` (default) or ``"window"`` (the original); see the
            module docstring.
        sync: the store's sync form, ``"auto"``, ``"syncfs"`` or ``"fsync"``.
        max_queued: requests queued at most (default ``max_batch * 16``);
            ``deliver`` waits for room beyond it.
        max_queued_bytes: body bytes accepted and not yet durable, at most;
            ``deliver`` waits for room beyond it.
        max_message_size: larger bodies raise :class:`MessageTooLarge`
            (default and upper bound: ``max_queued_bytes``).
        writer: the batch writer (default :class:`MaildirWriter` with ``sync``).
        offload: what runs in the executor's threads. ``"syncs"`` (default,
            for writers with an ``acommit`` method such as
            :class:`MaildirWriter`): only the syncs; the page-cache work runs on
            the loop, unless the batch holds more than
            :data:`INLINE_WRITE_LIMIT` body bytes. ``"all"``: the whole batch,
            in one thread call.
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
        writer: BatchWriter | None = None,
        offload: Offloading = "syncs",
    ) -> None:
        self.max_batch = _positive_int("max_batch", max_batch)
        self.max_wait = _seconds("max_wait", max_wait)
        self.max_concurrent_flushes = _positive_int(
            "max_concurrent_flushes", max_concurrent_flushes
        )
        if policy not in _POLICIES:
            raise ValueError(f"policy must be one of {_POLICIES}, not {policy!r}")
        self.policy: BatchPolicy = policy
        self.max_queued = _positive_int(
            "max_queued", max_batch * 16 if max_queued is None else max_queued
        )
        self.max_queued_bytes = _positive_int("max_queued_bytes", max_queued_bytes)
        size = max_queued_bytes if max_message_size is None else max_message_size
        self.max_message_size = _positive_int("max_message_size", size)
        if self.max_message_size > self.max_queued_bytes:
            raise ValueError(
                f"max_message_size ({size}) must not exceed max_queued_bytes ({max_queued_bytes})"
            )
        if offload not in _OFFLOADS:
            raise ValueError(f"offload must be one of {_OFFLOADS}, not {offload!r}")
        self.offload: Offloading = offload
        if writer is not None and not callable(writer):
            raise TypeError(f"writer must be callable, not {type(writer).__name__}")
        self._writer: BatchWriter = writer if writer is not None else MaildirWriter(sync)

        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[_Request | object] = asyncio.Queue(self.max_queued)
        self._slots = asyncio.Semaphore(self.max_concurrent_flushes)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._collector: asyncio.Task[None] | None = None
        self._flushes: set[asyncio.Task[None]] = set()
        self._collecting: list[_Request] = []  # taken from the queue, not yet in a flush
        self._putters = 0
        self._in_flight = 0
        self._room_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closing = False
        self._closed: asyncio.Future[None] | None = None
        self._crash: BaseException | None = None

        self._queued_bytes = 0
        self._delivered = 0
        self._failed = 0
        self._batches = 0
        self._syncs = 0
        self._batch_sizes: collections.Counter[int] = collections.Counter()
        self._flush_times: collections.deque[float] = collections.deque(maxlen=_LATENCY_SAMPLES)

    # -- the original's constructors --------------------------------------

    @classmethod
    def spawn(cls) -> Self:
        """Defaults, with the collector started now; needs a running loop."""
        ex = cls()
        ex._start(asyncio.get_running_loop())
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

    # -- public API --------------------------------------------------------

    async def deliver(self, path: str | os.PathLike[str], body: Body) -> MessageId:
        """Deliver ``body`` durably into the Maildir at ``path``; return its id.

        ``path`` is a str or PathLike naming a Maildir root, created on first
        use. Returns once the message's bytes and its name in ``new/`` are
        durable. Waits for room when the queue is full (backpressure). The body
        is not copied: a ``bytearray`` must not change until this returns.

        Raises, before anything is queued: ``TypeError`` (wrong types),
        :class:`InvalidMaildirPath` (empty path, NUL byte),
        :class:`MessageTooLarge`, :class:`ExecutorClosed` and
        :class:`ExecutorCrashed`. A storage failure raises the original
        ``OSError`` (type, errno, filename). If the caller is cancelled, the
        write goes on and may still complete: at least once, never lost.
        """
        p = check_maildir_path(path)
        view = check_body(body)
        if view.nbytes > self.max_message_size:
            raise MessageTooLarge(
                f"message of {view.nbytes} bytes exceeds max_message_size={self.max_message_size}"
            )
        self._check_open()
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._start(loop)

        req = _Request(p, view, loop.create_future())
        # Counted from here, so that a closing collector waits for this request.
        self._putters += 1
        try:
            # Backpressure on both count and bytes. Our own waiters (not Queue.put)
            # so that a crash or a flush can wake every one of them.
            while self._queue.full() or self._queued_bytes + req.size > self.max_queued_bytes:
                waiter = loop.create_future()
                self._room_waiters.append(waiter)
                await waiter
                self._check_alive()
            self._queued_bytes += req.size
            self._queue.put_nowait(req)
        finally:
            self._putters -= 1
            if self._closing and self._putters == 0 and self._queue.empty():
                self._queue.put_nowait(_STOP)  # wake a collector waiting for us

        try:
            return await req.future
        except asyncio.CancelledError:
            if req.future.done() and not req.future.cancelled():
                req.future.exception()  # retrieved: no "never retrieved" warning
            raise

    async def aclose(self) -> None:
        """Stop accepting, flush everything already accepted, wait for in-flight flushes.

        Idempotent and safe to call concurrently. Later :meth:`deliver` calls
        raise :class:`ExecutorClosed`.
        """
        if self._closed is not None:
            await asyncio.shield(self._closed)
            return
        self._closing = True
        loop = asyncio.get_running_loop()
        self._closed = loop.create_future()
        try:
            if self._collector is not None:
                if not self._collector.done():
                    await self._queue.put(_STOP)
                with contextlib.suppress(BaseException):
                    await asyncio.shield(self._collector)
            while self._flushes:
                await asyncio.gather(*self._flushes, return_exceptions=True)
            closer = getattr(self._writer, "aclose", None)
            if closer is not None:
                await closer()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=False)
            self._closed.set_result(None)

    async def __aenter__(self) -> Self:
        self._check_open()
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._start(loop)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def stats(self) -> ExecutorStats:
        """A consistent snapshot of the counters; O(samples) for the percentiles."""
        times = sorted(self._flush_times)
        lat: dict[str, float] = {}
        if times:
            last = len(times) - 1
            for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
                lat[name] = times[min(last, int(q * len(times)))]
            lat["max"] = times[-1]
        return ExecutorStats(
            delivered=self._delivered,
            failed=self._failed,
            batches=self._batches,
            syncs=self._syncs,
            batch_sizes=dict(sorted(self._batch_sizes.items())),
            queued=self._queued(),
            queued_bytes=self._queued_bytes,
            in_flight=self._in_flight,
            flush_latency=lat,
        )

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` has begun."""
        return self._closing

    def __repr__(self) -> str:
        if self._crash is not None:
            state = "crashed"
        elif self._closed is not None and self._closed.done():
            state = "closed"
        elif self._closing:
            state = "closing"
        else:
            state = "open" if self._collector is not None else "idle"
        return (
            f"<DeliveryExecutor {state} policy={self.policy}"
            f" queued={self._queued()}"
            f" in_flight={self._in_flight} delivered={self._delivered}"
            f" failed={self._failed} batches={self._batches}>"
        )

    # -- internals ---------------------------------------------------------

    def _queued(self) -> int:
        # The collector holds the requests it took while it waits for a slot.
        return self._queue.qsize() + len(self._collecting)

    def _check_open(self) -> None:
        self._check_alive()
        if self._closing:
            raise ExecutorClosed("the DeliveryExecutor is closed; nothing was queued")

    def _check_alive(self) -> None:
        if self._crash is not None:
            raise self._crashed_error()

    def _crashed_error(self) -> ExecutorCrashed:
        err = ExecutorCrashed(f"the executor's collector died: {self._crash!r}")
        err.__cause__ = self._crash
        return err

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is not None:
            raise RuntimeError(
                "this DeliveryExecutor is bound to another event loop; create one per loop"
            )
        self._loop = loop
        self._pool = concurrent.futures.ThreadPoolExecutor(
            self.max_concurrent_flushes, thread_name_prefix="delivery-flush"
        )
        self._collector = loop.create_task(self._run_collector(), name="delivery-collector")

    def _release_bytes(self, n: int) -> None:
        self._queued_bytes -= n
        self._wake_room()

    def _wake_room(self) -> None:
        while self._room_waiters:
            w = self._room_waiters.popleft()
            if not w.done():
                w.set_result(None)

    async def _run_collector(self) -> None:
        try:
            await self._collect()
        except BaseException as exc:
            # Every waiter learns of it through ExecutorCrashed; log the bug once here.
            self._crash = exc
            self._fail_pending()
            if not isinstance(exc, asyncio.CancelledError):
                _log.error("delivery collector crashed", exc_info=exc)
        finally:
            self._collecting = []

    def _fail_pending(self) -> None:
        """Fail everything accepted but not handed to a flush; wake every waiter."""
        err = self._crashed_error()
        pending = self._collecting
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, _Request):
                pending.append(item)
        for req in pending:
            self._failed += 1
            self._release_bytes(req.size)
            if not req.future.done():
                req.future.set_exception(err)
        self._release_bytes(0)

    async def _collect(self) -> None:
        stopping = False
        while True:
            if stopping and self._queue.empty() and self._putters == 0:
                return
            first = await self._queue.get()
            self._wake_room()
            if first is _STOP:
                stopping = True
                continue
            assert isinstance(first, _Request)
            batch = self._collecting = [first]
            if self.policy == "window":
                stopping = await self._fill_window(batch) or stopping
                await self._slots.acquire()
            else:
                # Natural batching: take everything that piled up while the slots were busy.
                await self._slots.acquire()
                stopping = self._drain(batch) or stopping
            self._collecting = []
            self._wake_room()
            self._launch(batch)

    def _drain(self, batch: list[_Request]) -> bool:
        """Move queued requests into ``batch`` up to max_batch; True if _STOP was taken."""
        while len(batch) < self.max_batch and not self._queue.empty():
            item = self._queue.get_nowait()
            if item is _STOP:
                return True
            assert isinstance(item, _Request)
            batch.append(item)
        return False

    async def _fill_window(self, batch: list[_Request]) -> bool:
        """Collect until max_batch or max_wait after the first; True if _STOP was taken."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        saw_stop = False
        while len(batch) < self.max_batch:
            saw_stop = self._drain(batch) or saw_stop
            timeout = deadline - loop.time()
            if saw_stop or len(batch) >= self.max_batch or timeout <= 0:
                break
            try:
                item = await asyncio.wait_for(self._queue.get(), timeout)
            except TimeoutError:
                break
            self._wake_room()
            if item is _STOP:
                return True
            assert isinstance(item, _Request)
            batch.append(item)
        return saw_stop

    def _launch(self, batch: list[_Request]) -> None:
        assert self._loop is not None
        self._in_flight += 1
        task = self._loop.create_task(self._flush(batch), name="delivery-flush")
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _flush(self, batch: list[_Request]) -> None:
        """Write one batch in the pool and resolve each caller's future."""
        assert self._loop is not None
        groups: dict[str, list[_Request]] = {}
        for req in batch:
            groups.setdefault(req.path, []).append(req)
        payload = [(path, [r.body for r in reqs]) for path, reqs in groups.items()]
        nbytes = sum(r.size for r in batch)
        self._batches += 1
        self._batch_sizes[len(batch)] += 1
        started = time.perf_counter()
        try:
            acommit = getattr(self._writer, "acommit", None)
            inline = self.offload == "syncs" and acommit is not None
            if inline and isinstance(self._writer, MaildirWriter):
                # Big bodies written on the loop would stall every other session.
                inline = nbytes <= INLINE_WRITE_LIMIT
            if inline:
                assert acommit is not None
                results, syncs = await acommit(payload, self._offload)
            else:
                results, syncs = await self._offload(self._writer, payload)
            self._syncs += syncs
            if len(results) != len(payload):
                raise RuntimeError(
                    f"batch writer returned {len(results)} results for {len(payload)} groups"
                )
            for reqs, result in zip(groups.values(), results, strict=True):
                if isinstance(result, BaseException):
                    self._settle_error(reqs, result)
                    continue
                if len(result) != len(reqs):
                    raise RuntimeError(
                        f"batch writer returned {len(result)} ids for {len(reqs)} messages"
                    )
                for req, mid in zip(reqs, result, strict=True):
                    self._delivered += 1
                    if not req.future.done():
                        req.future.set_result(mid)
        except asyncio.CancelledError:
            # Only loop teardown cancels a flush; the write itself may still finish.
            self._settle_error(
                batch, ExecutorCrashed("flush cancelled; the write may or may not be durable")
            )
            raise
        except BaseException as exc:
            self._settle_error([r for r in batch if not r.future.done()], exc)
        finally:
            self._flush_times.append(time.perf_counter() - started)
            self._in_flight -= 1
            self._slots.release()
            self._release_bytes(nbytes)

    def _offload(self, fn: Callable[..., T], *args: object) -> asyncio.Future[T]:
        assert self._loop is not None
        return self._loop.run_in_executor(self._pool, fn, *args)

    def _settle_error(self, reqs: Sequence[_Request], exc: BaseException) -> None:
        for req in reqs:
            if req.future.done():
                continue
            self._failed += 1
            req.future.set_exception(exc)
