"""The batch-writer contract between the executor and the store.

The executor hands a writer one batch at a time: ``[(path, [message, ...]), ...]``
with each message a tuple of byte views; a group of messages delivered with
flags has a third item, their Maildir info letters (``(path, messages, "FS")``),
and goes to ``cur/<name>:2,<letters>`` (only to writers with ``stores_flags``).
The writer makes every message durable and returns, per group and in order,
its ids or the exception that failed it, plus the number of syncs it made.

Two forms:

- :class:`BatchWriter` (async): what the executor awaits. ``acommit(groups)``
  on the executor's event loop, ``aclose()`` once at shutdown.
- :class:`BlockingWriter` (sync): a plain callable that blocks, such as
  :func:`write_batch`. :class:`~delivery_executor.writers.ThreadWriter` runs
  one in a thread; the helper process runs :func:`write_batch` too.
"""

from __future__ import annotations

import asyncio
import errno
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeAlias, TypeVar

from ..fsops import OS_OPS, FsOps
from ..store import Maildir, MessageId, StepDriver, StoreOptions, SyncMode, commit_steps
from ..store.commit import Parts
from ..validate import count

__all__ = [
    "LOOP_THREAD_ABOVE",
    "PROCESS_THREAD_ABOVE",
    "AnyGroup",
    "BatchResult",
    "BatchWriter",
    "BlockingWriter",
    "FlaggedGroup",
    "Group",
    "GroupResult",
    "body_key",
    "check_thread_above",
    "goes_to_thread",
    "group_info",
    "write_batch",
]

Group: TypeAlias = tuple[str, Sequence[Parts]]
"""One Maildir path and its messages, each a tuple of byte views."""
FlaggedGroup: TypeAlias = tuple[str, Sequence[Parts], str]
"""A group of messages delivered with flags: path, messages and their checked
info letters (never ``""``); they land in ``cur/<name>:2,<letters>``. Only a
writer with ``stores_flags = True`` is given these."""
AnyGroup: TypeAlias = Group | FlaggedGroup
"""What the built-in writers take."""
GroupResult: TypeAlias = "list[MessageId] | BaseException"
BatchResult: TypeAlias = tuple[list[GroupResult], int]
"""Per group its ids or the exception that failed it; and the syncs made."""
T = TypeVar("T")


class BatchWriter(Protocol):
    """Makes batches durable for a :class:`~delivery_executor.DeliveryExecutor`.

    A writer that cannot take any number of parts per message says so with
    an int attribute ``max_parts`` (optional, as :class:`ProcessWriter` does):
    the executor then refuses a message with more parts at ``deliver()``,
    before it can share a batch with other callers' mail.

    A writer that can deliver flagged messages (groups of three items, see
    :data:`Group`) says so with ``stores_flags = True``; the executor refuses
    ``deliver(..., flags=...)`` with any other writer, before queueing.

    A writer that has work to do before its first batch may also define
    ``async start()`` (optional, as :class:`ProcessWriter` does: it starts its
    helper): the executor's ``start()`` awaits it, so that a failure to start
    shows there rather than in the first delivery.
    """

    async def acommit(self, groups: Sequence[Group]) -> BatchResult:
        """Write ``groups`` durably; one result per group, in order, and the syncs made.

        Runs on the executor's loop; may be awaited for up to
        ``max_concurrent_flushes`` batches at once. A failure that concerns
        one group is returned as that group's result; an exception raised
        fails the whole batch.
        """
        ...

    async def aclose(self) -> None:
        """Release what the writer holds (threads, processes); called once, at close."""
        ...


class BlockingWriter(Protocol):
    """The synchronous form: ``writer(groups)`` blocks until the batch is durable."""

    def __call__(self, groups: Sequence[Group]) -> BatchResult:
        """Return one result per group, in order, and the number of syncs made."""
        ...


def write_batch(
    groups: Sequence[AnyGroup],
    *,
    sync: SyncMode = "auto",
    ops: FsOps = OS_OPS,
    size_in_names: bool = True,
    options: StoreOptions | None = None,
) -> BatchResult:
    """The blocking writer: :meth:`Maildir.cached` + :func:`commit_batch`, in this thread.

    ``options`` (a :class:`~delivery_executor.store.StoreOptions`) may stand
    for the three keywords. A path that cannot be opened or created fails only
    its own group. A group that fails with ``ENOENT``, ``ENOTDIR`` or
    ``ESTALE`` drops its path from the Maildir cache, so a Maildir removed (or
    mounted over) at run time is opened or created again next time.
    """
    opts = StoreOptions.of(options, sync, ops, size_in_names)
    opened = open_maildirs(groups, lambda path: Maildir.cached(path, ops=opts.ops))
    driver = StepDriver(commit_steps(opened.live, options=opts)).run_here(opts.ops)
    return opened.merge(driver.results), driver.syncs


# --------------------------------------------------------------------------
# A big batch is written whole in a thread of this process


LOOP_THREAD_ABOVE = 256 * 1024
""":class:`~delivery_executor.writers.LoopWriter`'s ``thread_above``: past it a
batch is written in a thread rather than on the loop, so that copying its
bodies into the page cache never holds the loop for long. A bound on the loop's
stall, not a measured optimum (BUDGETS.md)."""
PROCESS_THREAD_ABOVE = 1 << 20
""":class:`~delivery_executor.writers.ProcessWriter`'s ``thread_above``: past
it a batch is written in a thread rather than sent through the helper's pipe:
big bodies are mostly syscalls that release the GIL, and the pipe copy cost
more than it saved (the A/B is in BUDGETS.md). Higher than the loop writer's
because its alternative (the helper) costs the loop almost nothing."""


def body_key(part: memoryview) -> int:
    """The identity of a part's bytes: one key per body, however many copies carry it.

    A view of a whole ``bytes`` object is keyed by that object, so the
    recipients' copies of one body share a key; any other view (a slice) is
    its own.
    """
    whole = isinstance(part.obj, bytes) and len(part.obj) == part.nbytes
    return id(part.obj) if whole else id(part)


def check_thread_above(value: int | None) -> int | None:
    """A writer's ``thread_above``: ``None`` (never) or an int ``>= 0`` (:func:`count`)."""
    return None if value is None else count("thread_above", value, minimum=0)


def goes_to_thread(groups: Sequence[AnyGroup], thread_above: int | None) -> bool:
    """Whether the batch has more than ``thread_above`` body bytes (``None``: never).

    The one counting rule of both writers: a body shared by several copies
    counts once (by :func:`body_key`), as it crosses the helper's pipe. A
    batch whose plain total is within the limit is decided without a set.
    """
    if thread_above is None:
        return False
    total = sum([part.nbytes for group in groups for parts in group[1] for part in parts])
    if total <= thread_above:
        return False
    seen: set[int] = set()
    distinct = 0
    for group in groups:
        for parts in group[1]:
            for part in parts:
                key = body_key(part)
                if key not in seen:
                    seen.add(key)
                    distinct += part.nbytes
    return distinct > thread_above


_REOPEN = (errno.ENOENT, errno.ENOTDIR, errno.ESTALE)
"""Group errors after which the cached Maildir is dropped, to be opened afresh
next time: it is gone, no longer a directory, or on another file system."""


class OpenedGroups:
    """A batch's Maildirs, opened: per-group errors kept aside, the rest ready to commit."""

    __slots__ = ("groups", "live", "results", "where")

    def __init__(self, groups: Sequence[AnyGroup]) -> None:
        self.groups = groups
        self.results: list[GroupResult | None] = [None] * len(groups)
        self.where: list[int] = []
        self.live: list[tuple[Maildir, Sequence[Parts]]] = []

    def merge(self, committed: Sequence[list[MessageId] | OSError]) -> list[GroupResult]:
        """All groups' results, in order: the open errors and ``committed`` for the rest."""
        for i, res in zip(self.where, committed, strict=True):
            self.results[i] = res
            if isinstance(res, OSError) and res.errno in _REOPEN:
                Maildir.forget(self.groups[i][0])
        return [r for r in self.results if r is not None]


def group_info(group: AnyGroup) -> str:
    """A group's Maildir info letters; ``""`` for a plain group (delivered into ``new/``)."""
    return group[2] if len(group) == 3 else ""


def open_maildirs(groups: Sequence[AnyGroup], lookup: Callable[[str], Maildir]) -> OpenedGroups:
    """Open each group's Maildir with ``lookup``; an ``OSError`` fails only its group."""
    opened = OpenedGroups(groups)
    for i, group in enumerate(groups):
        try:
            md = lookup(group[0])
            if len(group) == 3:  # flagged: delivered into cur/ with its info
                md = md.with_flags(group[2])
            opened.live.append((md, group[1]))
            opened.where.append(i)
        except OSError as exc:
            opened.results[i] = exc
    return opened


class _Workers:
    """One generation of a :class:`ThreadPool`'s threads, their queue and their count."""

    __slots__ = ("busy", "name", "queue", "threads")

    def __init__(self, name: str) -> None:
        self.name = name
        self.queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self.threads = 0
        self.busy = 0  # calls handed over and not yet answered; changed on the loop only

    def start(self) -> None:
        self.threads += 1
        threading.Thread(
            target=_work, args=(self,), name=f"{self.name}_{self.threads - 1}", daemon=True
        ).start()

    def answer(
        self, future: asyncio.Future[Any], result: object, exc: BaseException | None
    ) -> None:
        """On the caller's loop: one call came back; resolve its future unless cancelled."""
        self.busy -= 1
        if future.done():
            return
        if exc is None:
            future.set_result(result)
        else:
            future.set_exception(exc)


_Call: TypeAlias = (
    "tuple[asyncio.AbstractEventLoop, asyncio.Future[Any], Callable[..., Any], tuple[Any, ...]]"
)


def _work(workers: _Workers) -> None:
    get = workers.queue.get
    while (call := get()) is not None:
        loop, future, fn, args = call
        del call
        if future.cancelled():  # its caller stopped waiting before it began: skip it
            result: object = None
            exc: BaseException | None = None
        else:
            try:
                result, exc = fn(*args), None
            except BaseException as e:  # returned to the caller, as run_in_executor does
                result, exc = None, e
        try:
            loop.call_soon_threadsafe(workers.answer, future, result, exc)
        except RuntimeError:  # that loop is closed: nobody waits
            pass
        del loop, future, fn, args, result, exc


class ThreadPool:
    """A lazily started pool of threads whose calls are awaited from the running loop.

    Lighter than ``run_in_executor``: a call is one ``SimpleQueue.put`` and its
    answer one ``call_soon_threadsafe``, without a ``concurrent.futures.Future``
    chained to the loop's (the instruction counts are in BUDGETS.md). A thread
    (a daemon) starts when every running one is busy, up to ``size``. A call
    whose future is cancelled before a thread takes it is skipped.
    """

    __slots__ = ("_name", "_size", "_workers")

    def __init__(self, size: int, name: str) -> None:
        self._size = size
        self._name = name
        self._workers: _Workers | None = None

    def run(self, fn: Callable[..., T], *args: object) -> asyncio.Future[T]:
        """``fn(*args)`` in a pool thread, as a future of the running loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        workers = self._workers
        if workers is None:
            workers = self._workers = _Workers(self._name)
        if workers.busy >= workers.threads < self._size:
            workers.start()
        workers.busy += 1
        workers.queue.put((loop, future, fn, args))
        return future

    def close(self) -> None:
        """Stop the threads once their queued calls return; the pool can start again."""
        workers, self._workers = self._workers, None
        if workers is not None:
            for _ in range(workers.threads):
                workers.queue.put(None)
