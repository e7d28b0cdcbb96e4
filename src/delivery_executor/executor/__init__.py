"""``DeliveryExecutor``: group commit for concurrent delivery sessions, on any loop or thread.

Callers ``await executor.deliver(path, body)``. Requests are admitted under a
count and byte budget (:mod:`..budget`), queued, and taken in batches by one
collector task, which groups each batch by Maildir path and hands it to a
batch writer (:mod:`..writers`) under ``asyncio.Semaphore(max_concurrent_flushes)``.
Every caller awaits its own future, resolved only once its message is durable.

**Home loop.** The collector, the queue and the writer live on one event loop,
the executor's *home*: the loop that first enters ``async with``, calls
``start()`` or awaits ``deliver()``; or, for ``start_thread()``, ``with``
and ``deliver_sync()`` on an executor not yet started, a private loop in a
daemon thread the executor owns. A caller on any other loop or thread is
served through the home loop: its request is handed over with one
``call_soon_threadsafe``, made one iteration of the caller's loop later and
shared by every request that loop posts meanwhile (so its callers' requests
arrive together and batch as on the home loop), and its result comes back
the same way, one call per caller loop per batch. Neither loop blocks or
polls. The home loop must keep running until ``aclose()`` (or ``close()``)
returns.

Two batching policies:

``"eager"`` (default)
    Natural batching: as soon as a flush slot is free, flush everything that is
    queued (up to ``max_batch``). A lone caller is never held back; under load
    requests pile up while the slots are busy, so batches grow by themselves.
    When several slots are free, a backlog of small mail (at least twice
    :data:`~.collector.SPLIT_MIN` requests, at most
    :data:`~.collector.SPLIT_MAX_BYTES` of bodies) is shared between them, so
    that one batch's page-cache work overlaps another's wait for the disk (32
    callers on one Maildir: two batches of 16, about 6 % faster than one of
    32 here, BUDGETS.md). ``max_wait`` is then only an upper bound that is
    never waited out.
``"window"``
    The original's fixed window: after the first request, collect until
    ``max_batch`` requests or ``max_wait`` have passed, then wait for a slot.

The modules, one concept each: :mod:`.core` (the façade, ``DeliveryExecutor``),
:mod:`.config` (the settings, checked once, frozen), :mod:`.handoff` (the
cross-loop hand-off and the private home thread), :mod:`.collector` (the
home-loop queue, batches, flushes and the close), :mod:`.lifecycle` (the one
state value).
"""

from __future__ import annotations

from .config import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_CONCURRENT_FLUSHES,
    DEFAULT_MAX_QUEUED_BYTES,
    DEFAULT_MAX_WAIT,
    POLICIES,
    WRITERS,
    BatchPolicy,
    ExecutorConfig,
    WriterName,
)
from .core import DeliveryExecutor
from .lifecycle import Lifecycle

__all__ = [
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_CONCURRENT_FLUSHES",
    "DEFAULT_MAX_QUEUED_BYTES",
    "DEFAULT_MAX_WAIT",
    "POLICIES",
    "WRITERS",
    "BatchPolicy",
    "DeliveryExecutor",
    "ExecutorConfig",
    "Lifecycle",
    "WriterName",
]
