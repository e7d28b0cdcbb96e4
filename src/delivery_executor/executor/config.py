"""The executor's configuration: checked once, then frozen.

:meth:`ExecutorConfig.create` takes ``DeliveryExecutor``'s keywords, checks
every value with :mod:`delivery_executor.validate` (``TypeError`` or
``ValueError`` naming the bad value) and builds the writer a name stands for.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, TypeAlias

from ..store import StoreOptions, SyncMode
from ..validate import count, seconds
from ..writers import BatchWriter, LoopWriter, ProcessWriter, ThreadWriter

__all__ = [
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_CONCURRENT_FLUSHES",
    "DEFAULT_MAX_QUEUED_BYTES",
    "DEFAULT_MAX_WAIT",
    "POLICIES",
    "WRITERS",
    "BatchPolicy",
    "ExecutorConfig",
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


@dataclass(frozen=True, slots=True)
class ExecutorConfig:
    """``DeliveryExecutor``'s settings, each checked (see :meth:`create`)."""

    max_batch: int
    max_wait: float
    max_concurrent_flushes: int
    policy: BatchPolicy
    max_queued: int
    max_queued_bytes: int
    max_message_size: int
    writer: BatchWriter
    max_parts: int | None
    """The writer's own limit on parts per message, checked at ``deliver()``."""

    @classmethod
    def create(
        cls,
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
    ) -> ExecutorConfig:
        """Check the values in order (the first bad one raises); build a named writer last."""
        batch = count("max_batch", max_batch)
        wait = seconds("max_wait", max_wait)
        flushes = count("max_concurrent_flushes", max_concurrent_flushes)
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, not {policy!r}")
        queued = count("max_queued", batch * 16 if max_queued is None else max_queued)
        queued_bytes = count("max_queued_bytes", max_queued_bytes)
        size = queued_bytes if max_message_size is None else max_message_size
        message_size = count("max_message_size", size)
        if message_size > queued_bytes:
            raise ValueError(
                f"max_message_size ({size}) must not exceed max_queued_bytes ({max_queued_bytes})"
            )
        made = _make_writer(writer, StoreOptions.of(None, sync, size_in_names=size_in_names))
        # The writer's own limit, checked at deliver(): in a batch it would fail everyone.
        limit = getattr(made, "max_parts", None)
        parts = None if limit is None else count("writer.max_parts", limit)
        return cls(batch, wait, flushes, policy, queued, queued_bytes, message_size, made, parts)


def _make_writer(writer: BatchWriter | WriterName, options: StoreOptions) -> BatchWriter:
    if isinstance(writer, str):
        if writer == "loop":
            return LoopWriter(options=options)
        if writer == "thread":
            return ThreadWriter(options=options)
        if writer == "process":
            return ProcessWriter(options=options)
        raise ValueError(f"writer must be one of {WRITERS} or a BatchWriter, not {writer!r}")
    if not callable(getattr(writer, "acommit", None)) or not callable(
        getattr(writer, "aclose", None)
    ):
        raise TypeError(
            f"writer must be one of {WRITERS} or a BatchWriter (async acommit and aclose),"
            f" not {type(writer).__name__}"
        )
    return writer
