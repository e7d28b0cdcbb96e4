"""Writers that run in the executor's own process: on the loop, or in a thread.

:class:`LoopWriter` (``writer="loop"``, the library's default)
    The page-cache work of a batch (open, write, close, rename: none of them
    waits for the disk) runs on the event loop; each sync, and the first
    creation of a Maildir, runs in a thread. A batch with more than ``thread_above``
    (:data:`~delivery_executor.writers.base.LOOP_THREAD_ABOVE`) body bytes is
    written whole in a thread instead: copying megabytes on the loop would
    stall every other session.
:class:`ThreadWriter` (``writer="thread"``)
    The whole batch in a thread, by a :class:`BlockingWriter` (default
    :func:`write_batch`).

Why the loop: a thread that makes a syscall must win the GIL back from the
busy loop thread when it returns, so a flush thread costs the loop a GIL
hand-off per syscall; on the loop the syscalls cost it only their own time,
which is less (BUDGETS.md). :class:`~delivery_executor.writers.ProcessWriter`
avoids both.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from ..fsops import OS_OPS, FsOps
from ..store import Maildir, StepDriver, StoreOptions, SyncMode, commit_steps, run_sync_call
from .base import (
    LOOP_THREAD_ABOVE,
    AnyGroup,
    BatchResult,
    BlockingWriter,
    ThreadPool,
    check_thread_above,
    goes_to_thread,
    open_maildirs,
    write_batch,
)

__all__ = ["INLINE_WRITE_LIMIT", "LoopWriter", "ThreadWriter", "write_batch"]

INLINE_WRITE_LIMIT = LOOP_THREAD_ABOVE
"""The former name of :data:`~delivery_executor.writers.base.LOOP_THREAD_ABOVE`."""

_THREADS = 8  # upper bound; threads start only as concurrent flushes need them


class ThreadWriter:
    """Writes each batch in a thread with a blocking writer (see the module doc).

    ``ThreadWriter()`` uses :func:`write_batch` with ``sync``, ``ops`` and
    ``size_in_names`` (or one ``options`` value standing for them);
    ``ThreadWriter(fn)`` runs any :class:`BlockingWriter` instead (tests use
    slow or failing fakes this way; such a writer is not given flagged groups:
    ``stores_flags`` is then False).
    """

    __slots__ = ("_threads", "stores_flags", "write")

    def __init__(
        self,
        write: BlockingWriter | None = None,
        *,
        sync: SyncMode = "auto",
        ops: FsOps = OS_OPS,
        size_in_names: bool = True,
        options: StoreOptions | None = None,
    ) -> None:
        self.stores_flags = write is None  # write_batch takes flagged groups
        if write is None:
            opts = StoreOptions.of(options, sync, ops, size_in_names)
            write = functools.partial(write_batch, options=opts)
        elif not callable(write):
            raise TypeError(f"write must be callable, not {type(write).__name__}")
        self.write: BlockingWriter = write
        self._threads = ThreadPool(_THREADS, "delivery-write")

    def __repr__(self) -> str:
        return f"ThreadWriter({self.write!r})"

    async def acommit(self, groups: Sequence[AnyGroup]) -> BatchResult:
        """Run the blocking writer on ``groups`` in a thread and await it."""
        return await self._threads.run(self.write, groups)

    async def aclose(self) -> None:
        """Stop the threads (a call still running finishes first)."""
        self._threads.close()


class LoopWriter:
    """Writes on the loop, syncs in a thread (see the module doc). Costs nothing idle.

    ``options`` (a :class:`~delivery_executor.store.StoreOptions`) may stand
    for ``sync``, ``ops`` and ``size_in_names``. A batch of more than
    ``thread_above`` body bytes (counted as
    :func:`~delivery_executor.writers.base.goes_to_thread` does, ``None`` for
    never) is written whole in a thread; ``inline_limit`` is its former name.
    """

    __slots__ = ("_threads", "options", "thread_above")

    stores_flags = True
    """Takes flagged groups (see :data:`~delivery_executor.writers.base.FlaggedGroup`)."""

    def __init__(
        self,
        sync: SyncMode = "auto",
        ops: FsOps = OS_OPS,
        *,
        thread_above: int | None = LOOP_THREAD_ABOVE,
        inline_limit: int | None = None,
        size_in_names: bool = True,
        options: StoreOptions | None = None,
    ) -> None:
        self.options = StoreOptions.of(options, sync, ops, size_in_names)
        if inline_limit is not None:
            if thread_above != LOOP_THREAD_ABOVE:
                raise TypeError("pass thread_above= or its former name inline_limit=, not both")
            thread_above = inline_limit
        self.thread_above = check_thread_above(thread_above)
        self._threads = ThreadPool(_THREADS, "delivery-sync")

    @property
    def inline_limit(self) -> int | None:
        """The former name of :attr:`thread_above`."""
        return self.thread_above

    @property
    def sync(self) -> SyncMode:
        """The sync form (``options.sync``)."""
        return self.options.sync

    @property
    def ops(self) -> FsOps:
        """The file-system calls (``options.ops``)."""
        return self.options.ops

    @property
    def size_in_names(self) -> bool:
        """Whether names carry ``,S=``/``,W=`` (``options.size_in_names``)."""
        return self.options.size_in_names

    def __repr__(self) -> str:
        return f"LoopWriter(sync={self.sync!r})"

    async def acommit(self, groups: Sequence[AnyGroup]) -> BatchResult:
        """Write ``groups``: page-cache work here, syncs and Maildir creation in a thread."""
        if goes_to_thread(groups, self.thread_above):
            whole = functools.partial(write_batch, options=self.options)
            return await self._threads.run(whole, groups)
        created: dict[str, Maildir | OSError] = {}
        for group in groups:
            path = group[0]
            if path not in created and Maildir.peek_cached(path) is None:
                try:
                    created[path] = await self._threads.run(self._create, path)
                except OSError as exc:
                    created[path] = exc

        def lookup(path: str) -> Maildir:
            md = Maildir.peek_cached(path) or created.get(path) or self._create(path)
            if isinstance(md, OSError):
                raise md
            return md

        opened = open_maildirs(groups, lookup)
        driver = StepDriver(commit_steps(opened.live, options=self.options))
        err: OSError | None = None
        while (call := driver.next_call(err)) is not None:
            err = await self._threads.run(run_sync_call, self.ops, call)
        return opened.merge(driver.results), driver.syncs

    def _create(self, path: str) -> Maildir:
        return Maildir.cached(path, ops=self.ops)

    async def aclose(self) -> None:
        """Stop the sync threads (a sync still running finishes first)."""
        self._threads.close()
