"""A simulated disk for the executor benches: syncs that sleep, and a timeline.

On a shared machine msg/s on a real disk is noise. Here every ``fdatasync``,
directory ``fsync`` and ``syncfs`` the store makes (through
:class:`~delivery_executor.fsops.FsOps`, :data:`OS_OPS` included) becomes a
sleep of ``ms`` milliseconds (``time.sleep``: the GIL is released, as in the
real call) on a tmpfs, so the shape of the pipeline shows as structure:
commits over time, idle gaps, syncs merged per commit, flushes in flight.

Two models of the device:

``journal`` (default; ext4/jbd2 as it behaves for fsync and syncfs)
    One commit at a time, each ``ms`` long. A sync that arrives while the
    device is idle starts a commit at once; one that arrives during a commit
    waits for it and is covered by the *next* commit, which starts as soon as
    the current one ends and covers every sync that arrived meanwhile. So
    concurrent syncs merge, but only those requested before a commit starts.
``parallel``
    Every sync sleeps ``ms`` on its own, whatever else is in flight (a device
    with a deep queue and no ordering): the optimistic bound.

:class:`Timeline` records the device's commits and, through
:class:`TimedWriter`, each flush of an executor (start, end, batch size);
:func:`summarise` turns both into a few figures.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, TypeAlias

from delivery_executor.fsops import FsOps
from delivery_executor.writers import BatchResult, BatchWriter, Group

DiskModel: TypeAlias = Literal["journal", "parallel"]
MODELS: tuple[DiskModel, ...] = ("journal", "parallel")


class Timeline:
    """Commits ``(start, end, syncs covered)`` and flushes ``(start, end, messages)``."""

    def __init__(self) -> None:
        self.commits: list[tuple[float, float, int]] = []
        self.flushes: list[tuple[float, float, int]] = []

    def clear(self) -> None:
        self.commits.clear()
        self.flushes.clear()


class SimDisk:
    """The device behind the fake syncs (see the module doc for the two models)."""

    def __init__(self, ms: float, model: DiskModel, timeline: Timeline) -> None:
        self.seconds = ms / 1000
        self.model = model
        self.timeline = timeline
        self._cond = threading.Condition()
        self._done = 0  # the last commit completed
        self._running: int | None = None  # the commit in progress
        self._requested = 0  # the highest commit someone waits for
        self._covers: dict[int, int] = {}  # commit -> syncs waiting for it

    def sync(self) -> None:
        """One sync: return once a commit that began after this call has ended."""
        if self.model == "parallel":
            t0 = time.perf_counter()
            time.sleep(self.seconds)
            self.timeline.commits.append((t0, time.perf_counter(), 1))  # list.append: atomic
            return
        cond = self._cond
        with cond:
            target = self._done + 1 if self._running is None else self._running + 1
            self._requested = max(self._requested, target)
            self._covers[target] = self._covers.get(target, 0) + 1
            while self._done < target:
                if self._running is None and self._requested > self._done:
                    # The device is free and a commit is wanted: this caller runs it.
                    self._running = gen = self._done + 1
                    cond.release()
                    try:
                        t0 = time.perf_counter()
                        time.sleep(self.seconds)
                        t1 = time.perf_counter()
                    finally:
                        cond.acquire()
                    self.timeline.commits.append((t0, t1, self._covers.pop(gen, 0)))
                    self._done, self._running = gen, None
                    cond.notify_all()
                else:
                    cond.wait()


@contextmanager
def fake_syncs(disk: SimDisk) -> Iterator[None]:
    """Route every ``FsOps`` sync (``OS_OPS`` included) to ``disk`` while inside."""
    names = ("fdatasync", "fsync_dir", "syncfs")
    saved = {n: FsOps.__dict__[n] for n in names}

    def fdatasync(self: FsOps, fd: int, path: str) -> None:
        disk.sync()

    def fsync_dir(self: FsOps, path: str) -> None:
        disk.sync()

    def syncfs(self: FsOps, path: str, fd: int = -1) -> None:
        disk.sync()

    for name, fn in zip(names, (fdatasync, fsync_dir, syncfs), strict=True):
        setattr(FsOps, name, fn)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(FsOps, name, fn)


class TimedWriter:
    """A :class:`BatchWriter` that records each batch's start, end and size, then delegates."""

    def __init__(self, inner: BatchWriter, timeline: Timeline) -> None:
        self.inner = inner
        self.timeline = timeline
        self.stores_flags = getattr(inner, "stores_flags", False)

    async def acommit(self, groups: Sequence[Group]) -> BatchResult:
        t0 = time.perf_counter()
        try:
            return await self.inner.acommit(groups)
        finally:
            n = sum(len(g[1]) for g in groups)
            self.timeline.flushes.append((t0, time.perf_counter(), n))

    async def aclose(self) -> None:
        await self.inner.aclose()


def _busy(intervals: list[tuple[float, float]]) -> tuple[float, list[float]]:
    """Total time covered by ``intervals`` and the gaps between their union's pieces."""
    busy, gaps = 0.0, []
    end: float | None = None
    for s, e in sorted(intervals):
        if end is None or s > end:
            if end is not None:
                gaps.append(s - end)
            busy += e - s
            end = e
        elif e > end:
            busy += e - end
            end = e
    return busy, gaps


def _in_flight(flushes: list[tuple[float, float, int]], span: tuple[float, float]) -> list[float]:
    """Share of ``span`` with 0, 1, 2, ... flushes in flight."""
    events = sorted([(s, 1) for s, _, _ in flushes] + [(e, -1) for _, e, _ in flushes])
    share: dict[int, float] = {}
    level, t = 0, span[0]
    for when, step in events:
        share[level] = share.get(level, 0.0) + max(0.0, when - t)
        level, t = level + step, when
    share[level] = share.get(level, 0.0) + max(0.0, span[1] - t)
    total = span[1] - span[0] or 1.0
    return [share.get(k, 0.0) / total for k in range(max(share) + 1)]


def summarise(timeline: Timeline, span: tuple[float, float]) -> dict[str, Any]:
    """The structure of one run over ``span`` (perf_counter start, end)."""
    commits = [c for c in timeline.commits if c[0] >= span[0]]
    elapsed = span[1] - span[0] or 1.0
    busy, gaps = _busy([(s, e) for s, e, _ in commits])
    out: dict[str, Any] = {
        "disk_busy": busy / elapsed,
        "commits": len(commits),
        "syncs_per_commit": statistics.fmean(n for _, _, n in commits) if commits else 0.0,
        "idle_gap_p50_ms": statistics.median(gaps) * 1e3 if gaps else 0.0,
    }
    flushes = [f for f in timeline.flushes if f[0] >= span[0]]
    if flushes:
        sizes = [n for _, _, n in flushes]
        out["batches"] = len(flushes)
        out["batch_mean"] = statistics.fmean(sizes)
        counts: dict[int, int] = {}
        for n in sizes:
            counts[n] = counts.get(n, 0) + 1
        out["batch_sizes"] = dict(sorted(counts.items(), key=lambda kv: -kv[1])[:4])
        out["in_flight"] = _in_flight(flushes, span)
        out["flush_p50_ms"] = statistics.median(e - s for s, e, _ in flushes) * 1e3
    return out


def format_structure(rows: dict[str, dict[str, Any]]) -> str:
    """One line per contender: disk busy, syncs per commit, gaps, batches, flushes in flight."""
    out = []
    for c, s in rows.items():
        line = (
            f"{c:<13} disk busy {s['disk_busy']:4.0%}  commits {s['commits']:>5}"
            f"  syncs/commit {s['syncs_per_commit']:4.2f}"
            f"  idle gap p50 {s['idle_gap_p50_ms']:5.2f} ms"
        )
        if "batches" in s:
            shares = " ".join(f"{k}:{v:.0%}" for k, v in enumerate(s["in_flight"]))
            line += (
                f"\n{'':<13} batches {s['batches']} mean {s['batch_mean']:.1f}"
                f" (most {s['batch_sizes']}), flush p50 {s['flush_p50_ms']:.2f} ms,"
                f" flushes in flight (share of time) {shares}"
            )
        out.append(line)
    return "\n".join(out)
