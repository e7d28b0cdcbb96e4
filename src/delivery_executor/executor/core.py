"""``DeliveryExecutor``: the public face of the executor.

It checks each request at the boundary, then hands it to the collector: on
the home loop directly, from any other loop or thread through the
:class:`~.handoff.HandOff`. Starting and closing are translated here into
the collector's close and the hand-off's private thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from datetime import timedelta
from types import TracebackType
from typing import Self

from ..errors import ExecutorClosed, MessageTooLarge, TooManyParts
from ..stats import ExecutorStats
from ..store import (
    Message,
    MessageId,
    SyncMode,
    check_info_letters,
    check_maildir_path,
    check_message,
)
from ..store.commit import Parts
from ..validate import seconds
from ..writers import BatchWriter
from .collector import Collector
from .config import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_CONCURRENT_FLUSHES,
    DEFAULT_MAX_QUEUED_BYTES,
    DEFAULT_MAX_WAIT,
    BatchPolicy,
    ExecutorConfig,
    WriterName,
)
from .handoff import Request
from .lifecycle import Lifecycle

__all__ = ["DeliveryExecutor"]

_CLOSING = Lifecycle.CLOSING
_PATHS_KEPT = 4096  # checked Maildir paths remembered (then forgotten all at once)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class DeliveryExecutor:
    """Group-commits concurrent Maildir deliveries; each caller awaits its own result.

    Build it with keywords and use it with ``async with`` (or ``with`` from
    threads); ``spawn``, ``with_config`` and ``with_full_config`` are the
    original's constructors. It can be shared by every session, loop and
    thread of a process (see the package doc for the home loop).

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
    The checked settings are ``config`` (an :class:`ExecutorConfig`, frozen);
    ``max_batch``, ``policy``, ``writer`` and the others read it.
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
        self.config = ExecutorConfig.create(
            max_batch,
            max_wait,
            max_concurrent_flushes,
            policy=policy,
            sync=sync,
            max_queued=max_queued,
            max_queued_bytes=max_queued_bytes,
            max_message_size=max_message_size,
            writer=writer,
            size_in_names=size_in_names,
        )
        self._max_size = self.config.max_message_size  # read per request: no property call
        self._max_parts = self.config.max_parts
        self._collector = Collector(self.config)
        self._handoff = self._collector.handoff
        self._admit = self._collector.admit
        # Paths that check_maildir_path returned unchanged: the same str again
        # needs no check. Shared by every caller thread (set ops are atomic).
        self._paths: set[str] = set()

    # -- the settings (read-only; see the class doc) ---------------------------

    @property
    def max_batch(self) -> int:
        return self.config.max_batch

    @property
    def max_wait(self) -> float:
        return self.config.max_wait

    @property
    def max_concurrent_flushes(self) -> int:
        return self.config.max_concurrent_flushes

    @property
    def policy(self) -> BatchPolicy:
        return self.config.policy

    @property
    def max_queued(self) -> int:
        return self.config.max_queued

    @property
    def max_queued_bytes(self) -> int:
        return self.config.max_queued_bytes

    @property
    def max_message_size(self) -> int:
        return self.config.max_message_size

    @property
    def writer(self) -> BatchWriter:
        return self.config.writer

    @property
    def stores_flags(self) -> bool:
        """Whether ``deliver(..., flags=...)`` works: the writer has ``stores_flags = True``."""
        return getattr(self.config.writer, "stores_flags", False) is True

    # -- the original's constructors --------------------------------------

    @classmethod
    def spawn(cls) -> Self:
        """Defaults, with the collector started now on the running loop (needs one)."""
        ex = cls()
        ex._handoff.bind(asyncio.get_running_loop())
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

    async def deliver(
        self, path: str | os.PathLike[str], body: Message, *, flags: str = ""
    ) -> MessageId:
        """Deliver ``body`` durably into the Maildir at ``path``; return its id.

        ``path`` names a Maildir root (str or PathLike; a relative path is
        resolved against the working directory now), created on first use.
        ``body`` is bytes-like, or a tuple of bytes-like parts written in
        order; it is not copied, so a ``bytearray`` must not change until this
        returns. Returns once the message's bytes and its name in ``new/`` are
        durable. Waits for room under backpressure. Works from any event loop
        and thread (see the package doc); the first caller's loop becomes home
        if the executor is not started yet.

        ``flags``: Maildir info letters (``DFPRST``, keywords ``a``-``z``; any
        order, stored sorted and once each). A flagged message is renamed
        straight into ``cur/<id>:2,<flags>`` (never ``new/``) in the same
        batch and commit as the rest, as Dovecot's LDA saves a message with
        flags; the returned id is the name without ``:2,<flags>``.

        Raises, before anything is queued: ``TypeError`` (wrong types),
        ``ValueError`` (a flag letter outside that set, or ``flags`` with a
        writer lacking ``stores_flags``),
        :class:`InvalidMaildirPath` (empty path, NUL byte, too long),
        :class:`MessageTooLarge`, :class:`TooManyParts` (more than the
        writer's ``max_parts``: 255 for ``"process"``), :class:`ExecutorClosed` and
        :class:`ExecutorCrashed`. A storage failure raises the original
        ``OSError`` (type, errno, filename). If the caller is cancelled once
        its request is queued, the write goes on and may complete: at least
        once, never lost.
        """
        p, parts, size = self._check(path, body)
        info = self._info(flags) if flags else ""
        loop = asyncio.get_running_loop()
        handoff = self._handoff
        home = handoff.home
        if home is None:
            home = handoff.bind(loop)
        future: asyncio.Future[MessageId] = loop.create_future()
        if home is loop:
            self._admit(Request(p, parts, size, future, None, info))
        elif handoff.post(Request(p, parts, size, future, loop, info)):
            try:
                # One loop iteration for this loop's other callers to post too:
                # woken at once, the home loop would flush the first few alone
                # (eager batching), and batches came out smaller than same-loop's.
                await asyncio.sleep(0)
            except asyncio.CancelledError:
                future.cancel()  # queued: the write goes on, nobody waits for it
                handoff.wake()
                raise
            except GeneratorExit:
                # Closed unresumed (its loop stopped for good, then GC): no wake
                # from a finalizer. The next hand-off or aclose() takes it.
                raise
            handoff.wake()
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: no "never retrieved" warning
            raise

    def deliver_sync(
        self,
        path: str | os.PathLike[str],
        body: Message,
        *,
        timeout: float | None = None,
        flags: str = "",
    ) -> MessageId:
        """:meth:`deliver` for threads: block until the message is durable; return its id.

        For threaded servers and scripts. Starts a private home loop thread if
        the executor has no home yet. Raises ``RuntimeError`` when called
        from a thread that runs an event loop (on the home loop it would
        deadlock; on another it would stall that loop: ``await deliver()``
        there). ``flags`` as for :meth:`deliver`. ``TimeoutError`` after
        ``timeout`` seconds, in which case the write may still complete.
        Other errors as :meth:`deliver`.
        """
        running = _running_loop()
        if running is not None:
            which = "the executor's own" if running is self._handoff.home else "an"
            raise RuntimeError(
                f"deliver_sync() called from {which} event loop thread, which it would block;"
                " use 'await executor.deliver(...)' there"
            )
        p, parts, size = self._check(path, body)
        info = self._info(flags) if flags else ""
        if self._handoff.home is None:
            self._start_thread(exist_ok=True)  # racing first calls: one starts it
        future: concurrent.futures.Future[MessageId] = concurrent.futures.Future()
        if self._handoff.post(Request(p, parts, size, future, None, info)):
            self._handoff.wake()
        return future.result(timeout)

    def _check(self, path: str | os.PathLike[str], body: Message) -> tuple[str, Parts, int]:
        # The common case checked with a set lookup and two type tests: a path
        # already seen in its final (absolute, normal) form, and a bytes body.
        seen = self._paths
        if type(path) is str and path in seen:
            p = path
        else:
            p = check_maildir_path(path)
            if p == path:  # a relative path is resolved per call (against the cwd of then)
                if len(seen) >= _PATHS_KEPT:
                    seen.clear()
                seen.add(p)
        if type(body) is bytes:
            parts: Parts = (memoryview(body),)
            size = len(body)
        else:
            parts = check_message(body)
            size = parts[0].nbytes if len(parts) == 1 else sum(v.nbytes for v in parts)
        if size > self._max_size:
            raise MessageTooLarge(
                f"message of {size} bytes exceeds max_message_size={self._max_size}"
            )
        if self._max_parts is not None and len(parts) > self._max_parts:
            raise TooManyParts(
                f"message of {len(parts)} parts; the {type(self.writer).__name__}"
                f" takes {self._max_parts} at most"
            )
        if self._handoff.state >= _CLOSING:
            raise self._refusal()
        return p, parts, size

    def _info(self, flags: str) -> str:
        """``flags`` checked and normalised; ``ValueError`` if this writer cannot store them."""
        info = check_info_letters(flags)
        if info and not self.stores_flags:
            raise ValueError(
                f"flags={flags!r}: the {type(self.writer).__name__} does not store flags"
                " (no stores_flags = True)"
            )
        return info

    def _check_open(self) -> None:
        if self._handoff.state >= _CLOSING:
            raise self._refusal()

    def _refusal(self) -> Exception:
        """Why a closed or crashed executor takes no request."""
        if self._handoff.state >= Lifecycle.CRASHED:
            return self._collector.crashed_error()
        if self._handoff.ended is not None:
            return self._handoff.ended
        return ExecutorClosed("the DeliveryExecutor is closed; nothing was queued")

    # -- starting and closing ----------------------------------------------

    async def start(self) -> Self:
        """Make the running loop the executor's home and start the collector now.

        Also starts the writer if it has an ``async start()`` (the process
        writer's helper), so that a failure to start shows here.
        """
        self._check_open()
        loop = asyncio.get_running_loop()
        if self._handoff.bind(loop) is not loop:
            raise RuntimeError("this DeliveryExecutor already has another home loop")
        start = getattr(self.writer, "start", None)
        if start is not None:
            await start()
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
        self._check_open()
        self._handoff.start_thread(exist_ok=exist_ok)

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
        handoff = self._handoff
        home = handoff.home
        if home is None or handoff.ended is not None:
            handoff.closing(Lifecycle.CLOSED if home is None else Lifecycle.CLOSING)
            await self.writer.aclose()
            return
        if home is loop:
            await self._collector.aclose_home(timeout)
            return
        await handoff.close_from_loop(self._collector.aclose_home(timeout))

    def close(self, timeout: float | None = None) -> None:
        """:meth:`aclose` for threads and scripts: blocks until closed.

        ``RuntimeError`` if called from the home loop's own thread (it would
        deadlock there: use ``await aclose()``).
        """
        handoff = self._handoff
        home = handoff.home
        if home is None or handoff.ended is not None:
            handoff.closing(Lifecycle.CLOSED if home is None else Lifecycle.CLOSING)
            return
        if _running_loop() is home:
            raise RuntimeError("close() would block the executor's own loop; await aclose()")
        handoff.close_from_thread(self._collector.aclose_home(timeout))

    async def __aenter__(self) -> Self:
        self._check_open()
        loop = asyncio.get_running_loop()
        home = self._handoff.home
        if home is None:
            await self.start()
        elif home is not loop and self._handoff.thread is None:
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
        if self._handoff.home is None:
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
        return self._collector.snapshot()

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` has begun (or the home loop ended)."""
        return self._handoff.state.closed

    def __repr__(self) -> str:
        c, h, s = self._collector, self._handoff, self._collector.stats
        home = "thread" if h.thread is not None else ("loop" if h.home else "none")
        return (
            f"<DeliveryExecutor {h.state.label} home={home} policy={self.policy}"
            f" writer={type(self.writer).__name__} queued={len(c.queue)}"
            f" waiting={c.waiting} in_flight={c.in_flight} delivered={s.delivered}"
            f" failed={s.failed} batches={s.batches}>"
        )
