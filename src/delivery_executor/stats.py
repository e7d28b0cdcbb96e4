"""Counters and percentiles: what the executor reports through ``stats()``."""

from __future__ import annotations

import bisect
import collections
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = [
    "LATENCY_BOUNDS",
    "Buckets",
    "ExecutorStats",
    "HistogramCounts",
    "StatsRecorder",
    "percentile",
]

_LATENCY_SAMPLES = 4096

LATENCY_BOUNDS: tuple[float, ...] = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0
)  # fmt: skip
"""Upper bounds (seconds) of the flush and delivery latency histograms; +Inf is implied."""


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ascending ``sorted_values`` (nearest rank); 0.0 if empty."""
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


@dataclass(frozen=True, slots=True)
class HistogramCounts:
    """A histogram since start: ``counts[i]`` values fell in ``(bounds[i-1], bounds[i]]``.

    ``counts`` has one more entry than ``bounds``: the last counts values above
    every bound (Prometheus' ``+Inf``). Not cumulative; ``sum`` is the total.
    """

    bounds: tuple[float, ...] = ()
    counts: tuple[int, ...] = (0,)
    sum: float = 0.0

    @property
    def count(self) -> int:
        """How many values were recorded."""
        return sum(self.counts)


class Buckets:
    """A histogram recorder cheap enough for the event loop: a bisect and two adds.

    Observing costs a fraction of a ``prometheus_client`` ``Histogram``
    observation (figures in BUDGETS.md); exporters read :meth:`snapshot` when asked.
    """

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float] = LATENCY_BOUNDS) -> None:
        self.bounds = tuple(bounds)
        if list(self.bounds) != sorted(set(self.bounds)):
            raise ValueError("bucket bounds must be ascending and distinct")
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        """Record one value (``le`` semantics: a value equal to a bound falls in it)."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def snapshot(self) -> HistogramCounts:
        """The counts so far, as an immutable value."""
        return HistogramCounts(self.bounds, tuple(self.counts), self.total)


@dataclass(frozen=True, slots=True)
class ExecutorStats:
    """A snapshot of an executor's counters (see :meth:`DeliveryExecutor.stats`)."""

    delivered: int
    """Messages made durable and acknowledged."""
    failed: int
    """Messages accepted (past :meth:`deliver`'s argument checks) whose delivery then
    raised to their caller: storage errors, and ``ExecutorClosed``/``ExecutorCrashed``
    from a close."""
    batches: int
    """Batches handed to the writer."""
    syncs: int
    """fdatasync/fsync/syncfs calls the writer made, and writeback waits (one per
    file system and batch in the writeback form)."""
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
    waiting: int = 0
    """Requests held back by backpressure (``max_queued``/``max_queued_bytes``)."""
    flush_seconds: HistogramCounts = field(default_factory=HistogramCounts)
    """Seconds per batch write, every batch since start (for exporters)."""

    @property
    def mean_batch_size(self) -> float:
        """Messages per batch, over all batches so far (0.0 before the first)."""
        n = sum(self.batch_sizes.values())
        return sum(k * v for k, v in self.batch_sizes.items()) / n if n else 0.0


class StatsRecorder:
    """The executor's running counters.

    Written only on the executor's home loop (its flushes); read without a lock
    by ``stats()`` and ``repr()`` from callers' loops and threads, so a reading
    may miss the batch being counted at that moment.
    """

    __slots__ = (
        "batch_sizes",
        "batches",
        "delivered",
        "failed",
        "flush_hist",
        "flush_times",
        "syncs",
    )

    def __init__(self) -> None:
        self.delivered = 0
        self.failed = 0
        self.batches = 0
        self.syncs = 0
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.flush_times: collections.deque[float] = collections.deque(maxlen=_LATENCY_SAMPLES)
        self.flush_hist = Buckets(LATENCY_BOUNDS)

    def batch(self, size: int) -> None:
        """Count one batch of ``size`` messages handed to the writer."""
        self.batches += 1
        self.batch_sizes[size] += 1

    def flushed(self, seconds: float) -> None:
        """Record one batch write that took ``seconds``."""
        self.flush_times.append(seconds)
        self.flush_hist.observe(seconds)

    def flush_latency(self) -> dict[str, float]:
        """``p50``/``p90``/``p99``/``max`` seconds of the recent flushes; O(samples)."""
        times = sorted(self.flush_times)
        if not times:
            return {}
        out = {
            name: percentile(times, q) for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
        }
        out["max"] = times[-1]
        return out
