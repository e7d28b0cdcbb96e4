"""Counters and percentiles: what the executor reports through ``stats()``."""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["ExecutorStats", "StatsRecorder", "percentile"]

_LATENCY_SAMPLES = 4096


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ascending ``sorted_values`` (nearest rank); 0.0 if empty."""
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


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
    waiting: int = 0
    """Requests held back by backpressure (``max_queued``/``max_queued_bytes``)."""

    @property
    def mean_batch_size(self) -> float:
        """Messages per batch, over all batches so far (0.0 before the first)."""
        n = sum(self.batch_sizes.values())
        return sum(k * v for k, v in self.batch_sizes.items()) / n if n else 0.0


class StatsRecorder:
    """The executor's running counters; touched only on its home loop."""

    __slots__ = ("batch_sizes", "batches", "delivered", "failed", "flush_times", "syncs")

    def __init__(self) -> None:
        self.delivered = 0
        self.failed = 0
        self.batches = 0
        self.syncs = 0
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.flush_times: collections.deque[float] = collections.deque(maxlen=_LATENCY_SAMPLES)

    def batch(self, size: int) -> None:
        """Count one batch of ``size`` messages handed to the writer."""
        self.batches += 1
        self.batch_sizes[size] += 1

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
