"""The blocking side of the executor: turn one batch into durable Maildir files.

A *batch writer* is any callable that takes ``[(path, [body, ...]), ...]`` and
returns, per group and in order, its message ids or the exception that failed
it, plus how many syncs it made. :class:`MaildirWriter` is the real one; tests
plug in slow or failing fakes.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import Protocol

from .fsops import OS_OPS, FsOps
from .maildir import Maildir, MessageId, SyncMode, _check_sync, commit_batch

__all__ = ["BatchResult", "BatchWriter", "MaildirWriter"]

GroupResult = list[MessageId] | BaseException
BatchResult = tuple[list[GroupResult], int]


class BatchWriter(Protocol):
    """Writes a batch; runs in a worker thread and may block."""

    def __call__(self, groups: Sequence[tuple[str, Sequence[memoryview]]]) -> BatchResult:
        """Return one result per group, in order, and the number of syncs made."""
        ...


class _CountingOps(FsOps):
    # One per batch, so counting needs no lock across flush threads.
    __slots__ = ("inner", "syncs")

    def __init__(self, inner: FsOps) -> None:
        self.inner = inner
        self.syncs = 0

    def create(self, path: str) -> int:
        return self.inner.create(path)

    def write_all(self, fd: int, data: memoryview, path: str) -> None:
        self.inner.write_all(fd, data, path)

    def fdatasync(self, fd: int, path: str) -> None:
        self.syncs += 1
        self.inner.fdatasync(fd, path)

    def close(self, fd: int) -> None:
        self.inner.close(fd)

    def rename(self, src: str, dst: str) -> None:
        self.inner.rename(src, dst)

    def unlink(self, path: str) -> None:
        self.inner.unlink(path)

    def fsync_dir(self, path: str) -> None:
        self.syncs += 1
        self.inner.fsync_dir(path)

    def syncfs(self, path: str) -> None:
        self.syncs += 1
        self.inner.syncfs(path)


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
        results: list[GroupResult | None] = [None] * len(groups)
        live: list[tuple[Maildir, Sequence[memoryview]]] = []
        where: list[int] = []
        for i, (path, bodies) in enumerate(groups):
            try:
                live.append((Maildir.cached(path), bodies))
                where.append(i)
            except OSError as exc:
                results[i] = exc
        ops = _CountingOps(self.ops)
        for i, res in zip(where, commit_batch(live, sync=self.sync, ops=ops), strict=True):
            results[i] = res
            if isinstance(res, OSError) and res.errno in (errno.ENOENT, errno.ENOTDIR):
                Maildir.forget(groups[i][0])
        return [r for r in results if r is not None], ops.syncs
