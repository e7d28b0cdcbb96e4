"""The blocking side of the executor: turn one batch into durable Maildir files.

A *batch writer* is any callable that takes ``[(path, [body, ...]), ...]`` and
returns, per group and in order, its message ids or the exception that failed
it, plus how many syncs it made. :class:`MaildirWriter` is the real one; tests
plug in slow or failing fakes.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from .fsops import OS_OPS, FsOps
from .maildir import (
    Maildir,
    MessageId,
    SyncCall,
    SyncMode,
    _check_sync,
    commit_steps,
    run_steps,
    run_sync_call,
)

__all__ = ["BatchResult", "BatchWriter", "MaildirWriter", "Offload"]

Offload = Callable[..., Awaitable[Any]]
"""``offload(fn, *args)``: run ``fn(*args)`` off the event loop and await its result."""

GroupResult = list[MessageId] | BaseException
BatchResult = tuple[list[GroupResult], int]


class BatchWriter(Protocol):
    """Writes a batch; runs in a worker thread and may block."""

    def __call__(self, groups: Sequence[tuple[str, Sequence[memoryview]]]) -> BatchResult:
        """Return one result per group, in order, and the number of syncs made."""
        ...


class MaildirWriter:
    """The default batch writer: :meth:`Maildir.cached` + :func:`commit_batch`.

    Each path is created on first use. A path that cannot be created fails only
    its own group. When a group fails with ``ENOENT`` or ``ENOTDIR`` the path is
    dropped from the Maildir cache, so a Maildir removed at run time is created
    again on the next delivery instead of failing forever.
    """

    __slots__ = ("ops", "sync")

    def __init__(self, sync: SyncMode = "auto", ops: FsOps = OS_OPS) -> None:
        _check_sync(sync)
        self.sync: SyncMode = sync
        self.ops = ops

    def __repr__(self) -> str:
        return f"MaildirWriter(sync={self.sync!r})"

    def __call__(self, groups: Sequence[tuple[str, Sequence[memoryview]]]) -> BatchResult:
        """Write the batch, blocking (all of it in the calling thread)."""
        results, where, live = _plan(groups, Maildir.cached)
        committed, syncs = run_steps(commit_steps(live, sync=self.sync, ops=self.ops), self.ops)
        return self._merge(groups, results, where, committed), syncs

    async def acommit(
        self, groups: Sequence[tuple[str, Sequence[memoryview]]], offload: Offload
    ) -> BatchResult:
        """Write the batch from the event loop, sending only the syncs to ``offload``.

        The page-cache work (open, write, close, rename: microseconds each)
        runs on the loop thread; each sync, and the first ``Maildir.create`` of
        a path, runs through ``offload``. Measured here this costs the loop less
        than running everything in a thread, whose every syscall return has to
        win the GIL back from the busy loop (see BUDGETS.md).
        """
        opened: dict[str, Maildir | OSError] = {}
        for path, _ in groups:
            if path not in opened and Maildir.peek_cached(path) is None:
                try:
                    opened[path] = await offload(Maildir.cached, path)
                except OSError as exc:
                    opened[path] = exc

        def lookup(path: str) -> Maildir:
            md = opened.get(path) or Maildir.peek_cached(path)
            if isinstance(md, OSError):
                raise md
            return md if md is not None else Maildir.cached(path)

        results, where, live = _plan(groups, lookup)
        syncs = 0
        steps = commit_steps(live, sync=self.sync, ops=self.ops)
        try:
            call: SyncCall = next(steps)
            while True:
                err = await offload(run_sync_call, self.ops, call)
                syncs += 1
                call = steps.send(err)
        except StopIteration as done:
            committed: list[list[MessageId] | OSError] = done.value
        return self._merge(groups, results, where, committed), syncs

    @staticmethod
    def _merge(
        groups: Sequence[tuple[str, Sequence[memoryview]]],
        results: list[GroupResult | None],
        where: list[int],
        committed: list[list[MessageId] | OSError],
    ) -> list[GroupResult]:
        for i, res in zip(where, committed, strict=True):
            results[i] = res
            if isinstance(res, OSError) and res.errno in (errno.ENOENT, errno.ENOTDIR):
                Maildir.forget(groups[i][0])
        return [r for r in results if r is not None]


def _plan(
    groups: Sequence[tuple[str, Sequence[memoryview]]], lookup: Callable[[str], Maildir]
) -> tuple[list[GroupResult | None], list[int], list[tuple[Maildir, Sequence[memoryview]]]]:
    """Open each group's Maildir: per-group errors, the indexes that opened, and those."""
    results: list[GroupResult | None] = [None] * len(groups)
    where: list[int] = []
    live: list[tuple[Maildir, Sequence[memoryview]]] = []
    for i, (path, bodies) in enumerate(groups):
        try:
            live.append((lookup(path), bodies))
            where.append(i)
        except OSError as exc:
            results[i] = exc
    return results, where, live
