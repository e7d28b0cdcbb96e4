"""``serve --metrics HOST:PORT``: Prometheus metrics, sampled when scraped.

Nothing here runs per message. The executor, the handler and the session
factory already keep plain counters and cheap histograms (:class:`~.stats.Buckets`);
a scrape takes a :class:`Snapshot` of them on the event loop and renders it
with ``prometheus_client``'s metric families. Exposed (prefix ``delivery_executor_``):

- counters ``delivered_total``, ``failed_total``, ``rcpt_rejected_total``,
  ``quota_rejected_total``, ``syncs_total``, ``refused_connections_total``,
  ``tmp_cleaned_total``, ``duplicates_total``;
- histograms ``batch_size`` (messages per batch), ``flush_seconds`` (per batch
  write), ``delivery_seconds`` (per copy, end of DATA to durable);
- gauges ``connections``, ``queue_depth`` (requests accepted and not yet being
  written, plus those held back by backpressure), ``queued_bytes``,
  ``flushes_in_flight``, ``workers``;
- ``delivery_executor_info{version=...,line_endings=...,...} 1``: version and settings.

**Several workers** (``--workers N``): the parent serves the endpoint. Each
worker writes its snapshot to ``<dir>/<pid>.json`` once a second (and once
more when it stops); the parent sums them when scraped. Counters and
histograms add up over every worker that ever ran, so they never go back when
one exits; gauges add up over the live workers only (prometheus_client's
``livesum``). This is what prometheus_client's multiprocess mode does, without
its per-event cost (each counter increment and histogram observation written
to mmap files; figures in BUDGETS.md) and with the same output whether one
process runs or several.

``prometheus_client`` is needed only to serve (the ``metrics`` extra:
``pip install '/path/to/checkout[metrics]'``); workers write plain JSON.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from .._version import __version__
from ..stats import LATENCY_BOUNDS, HistogramCounts

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import Collector

    from ..executor import DeliveryExecutor

__all__ = [
    "BATCH_BOUNDS",
    "WORKER_DIR_ENV",
    "MetricsUnavailable",
    "ServerMetrics",
    "Snapshot",
    "WorkerMetrics",
    "failed_copies",
    "parse_address",
    "start_metrics",
    "start_worker_metrics",
    "take_snapshot",
]

_log = logging.getLogger("delivery_executor.metrics")

WORKER_DIR_ENV = "DELIVERY_EXECUTOR_WORKER_METRICS_DIR"
"""Set by the parent of ``--workers N`` for its workers: where they write snapshots."""
BATCH_BOUNDS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
PUBLISH_INTERVAL = 1.0
"""Seconds between a worker's snapshots: how stale a multi-worker scrape can be."""
_SCRAPE_TIMEOUT = 5.0
_PREFIX = "delivery_executor"


class MetricsUnavailable(ValueError):
    """``--metrics`` was asked for but ``prometheus_client`` is not installed."""


def parse_address(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` → ``(host, port)``; ``ValueError`` otherwise."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _check_prometheus() -> None:
    try:
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        raise MetricsUnavailable(
            "--metrics needs prometheus_client: pip install '/path/to/checkout[metrics]'"
            " (from a checkout of delivery-executor: pip install '.[metrics]')"
        ) from exc


# -- what a process reports ------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """One process's counters at one moment; round-trips through JSON."""

    pid: int = 0
    delivered: int = 0
    failed: int = 0
    rcpt_rejected: int = 0
    quota_rejected: int = 0
    syncs: int = 0
    refused_connections: int = 0
    tmp_cleaned: int = 0
    duplicates: int = 0
    batch_size: HistogramCounts = field(default_factory=lambda: _empty(BATCH_BOUNDS))
    flush_seconds: HistogramCounts = field(default_factory=HistogramCounts)
    delivery_seconds: HistogramCounts = field(default_factory=HistogramCounts)
    connections: int = 0
    queue_depth: int = 0
    queued_bytes: int = 0
    flushes_in_flight: int = 0

    def to_json(self) -> str:
        """This snapshot as one line of JSON."""
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Snapshot:
        """The snapshot :meth:`to_json` wrote; ``ValueError`` if it is not one."""
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("snapshot is not a JSON object")
        hist = {
            k: HistogramCounts(tuple(v["bounds"]), tuple(v["counts"]), float(v["sum"]))
            for k, v in raw.items()
            if isinstance(v, dict)
        }
        return cls(**{**raw, **hist})


def _empty(bounds: tuple[float, ...]) -> HistogramCounts:
    return HistogramCounts(bounds, (0,) * (len(bounds) + 1), 0.0)


def _bucketize(sizes: dict[int, int]) -> HistogramCounts:
    """Exact batch sizes (size → batches) as counts over :data:`BATCH_BOUNDS`."""
    counts = [0] * (len(BATCH_BOUNDS) + 1)
    total = 0.0
    for size, n in sizes.items():
        i = next((i for i, b in enumerate(BATCH_BOUNDS) if size <= b), len(BATCH_BOUNDS))
        counts[i] += n
        total += size * n
    return HistogramCounts(BATCH_BOUNDS, tuple(counts), total)


def failed_copies(executor_failed: int, handler: object) -> int:
    """Copies answered 4xx after DATA: the handler's count (``failed``) if it keeps one.

    A :class:`~.smtp.DeliveryHandler` counts every copy it answers ``451``,
    also those the executor refused before queueing (a stop under way); any
    other handler falls back on the executor's failed writes.
    """
    failed = getattr(handler, "failed", None)
    return failed if isinstance(failed, int) else executor_failed


def take_snapshot(executor: DeliveryExecutor, handler: object, factory: object) -> Snapshot:
    """Read the executor's, handler's and session factory's counters (on the home loop).

    Any handler works: one without :class:`DeliveryHandler`'s counters reports 0.
    """
    stats = executor.stats()
    delivery = getattr(handler, "delivery_seconds", None)
    return Snapshot(
        pid=os.getpid(),
        delivered=stats.delivered,
        failed=failed_copies(stats.failed, handler),
        rcpt_rejected=int(getattr(handler, "rcpt_rejected", 0)),
        quota_rejected=int(getattr(handler, "quota_rejected", 0)),
        syncs=stats.syncs,
        refused_connections=int(getattr(factory, "refused", 0)),
        tmp_cleaned=int(getattr(getattr(handler, "watcher", None), "removed", 0)),
        duplicates=int(getattr(getattr(handler, "duplicates", None), "suppressed", 0)),
        batch_size=_bucketize(stats.batch_sizes),
        flush_seconds=stats.flush_seconds,
        delivery_seconds=delivery.snapshot() if delivery is not None else HistogramCounts(),
        connections=int(getattr(factory, "live", 0)),
        queue_depth=stats.queued + stats.waiting,
        queued_bytes=stats.queued_bytes,
        flushes_in_flight=stats.in_flight,
    )


# -- rendering ---------------------------------------------------------------


def _add(a: HistogramCounts, b: HistogramCounts) -> HistogramCounts:
    if not b.bounds and not any(b.counts):
        return a
    if not a.bounds and not any(a.counts):
        return b
    if a.bounds != b.bounds:
        raise ValueError("cannot add histograms with different buckets")
    counts = tuple(x + y for x, y in zip(a.counts, b.counts, strict=True))
    return HistogramCounts(a.bounds, counts, a.sum + b.sum)


class DeliveryCollector:
    """A ``prometheus_client`` collector over snapshots from one or more processes.

    ``source()`` returns ``(snapshot, live)`` pairs: counters and histograms
    add up over all of them, gauges over the live ones.
    """

    def __init__(
        self, source: Callable[[], Sequence[tuple[Snapshot, bool]]], info: dict[str, str]
    ) -> None:
        self.source = source
        self.info = info

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            InfoMetricFamily,
        )

        snaps = list(self.source())
        live = [s for s, alive in snaps if alive]
        every = [s for s, _ in snaps]
        yield InfoMetricFamily(_PREFIX, "Version and settings of this server.", value=self.info)

        counters = (
            ("delivered", "Copies made durable and acknowledged."),
            ("failed", "Copies whose delivery failed (answered 451)."),
            ("rcpt_rejected", "Recipients refused at RCPT."),
            ("quota_rejected", "Recipients refused because their mailbox is full."),
            ("syncs", "fdatasync/fsync/syncfs calls and writeback waits made."),
            ("refused_connections", "Connections refused over --max-connections."),
            ("tmp_cleaned", "Stale files (over 36 h old) removed from Maildirs' tmp/."),
            ("duplicates", "Copies answered 250 and not stored again (--duplicate-window)."),
        )
        for name, doc in counters:
            total = sum(getattr(s, name) for s in every)
            yield CounterMetricFamily(f"{_PREFIX}_{name}", doc, value=total)

        histograms = (
            ("batch_size", "Messages per batch written.", BATCH_BOUNDS),
            ("flush_seconds", "Seconds per batch write (write, sync, rename, sync).", None),
            ("delivery_seconds", "Seconds per copy from the end of DATA until durable.", None),
        )
        for name, doc, bounds in histograms:
            hist = HistogramCounts() if bounds is None else _empty(bounds)
            for s in every:
                hist = _add(hist, getattr(s, name))
            if not hist.bounds:
                hist = _empty(LATENCY_BOUNDS)
            buckets: list[tuple[str, float]] = []
            running = 0
            for bound, n in zip(hist.bounds, hist.counts, strict=False):
                running += n
                buckets.append((repr(float(bound)), running))  # as prometheus_client writes le
            buckets.append(("+Inf", running + hist.counts[-1]))
            yield HistogramMetricFamily(f"{_PREFIX}_{name}", doc, buckets, hist.sum)

        gauges = (
            ("connections", "Open SMTP/LMTP sessions."),
            ("queue_depth", "Requests accepted and not yet being written."),
            ("queued_bytes", "Body bytes accepted and not yet durable."),
            ("flushes_in_flight", "Batches being written now."),
        )
        for name, doc in gauges:
            total = sum(getattr(s, name) for s in live)
            yield GaugeMetricFamily(f"{_PREFIX}_{name}", doc, value=total)
        yield GaugeMetricFamily(f"{_PREFIX}_workers", "Server processes running.", len(live))


def _serve_http(collector: DeliveryCollector, host: str, port: int) -> tuple[Any, threading.Thread]:
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(cast("Collector", collector))
    httpd, thread = start_http_server(port, host, registry=registry)
    bound = httpd.server_address
    _log.info("metrics on http://%s:%d/metrics", host, bound[1])
    return httpd, thread


def _stop_http(httpd: Any, thread: threading.Thread) -> None:
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


# -- one process: serve; or, as a worker, publish ---------------------------


class ServerMetrics:
    """Metrics of one ``serve`` process: an HTTP endpoint, or snapshots for a parent."""

    def __init__(
        self,
        take: Callable[[], Snapshot],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._take = take
        self._loop = loop
        self._last = Snapshot(pid=os.getpid())
        self._http: tuple[Any, threading.Thread] | None = None
        self._task: asyncio.Task[None] | None = None
        self._dir: Path | None = None

    def _snapshot_from_thread(self) -> Sequence[tuple[Snapshot, bool]]:
        """For the HTTP thread: a snapshot taken on the loop (the last one if it is gone)."""
        fut: concurrent.futures.Future[Snapshot] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(self._take())
            except BaseException as exc:  # handed to the waiting thread
                fut.set_exception(exc)

        try:
            self._loop.call_soon_threadsafe(run)
            self._last = fut.result(_SCRAPE_TIMEOUT)
        except (RuntimeError, concurrent.futures.TimeoutError):
            pass  # the loop is closed or stuck: report what we last saw
        return [(self._last, True)]

    def serve(self, collector_info: dict[str, str], host: str, port: int) -> None:
        """Serve the endpoint from a daemon thread; ``OSError`` if it cannot bind."""
        collector = DeliveryCollector(self._snapshot_from_thread, collector_info)
        self._http = _serve_http(collector, host, port)

    def publish(self, directory: Path, interval: float = PUBLISH_INTERVAL) -> None:
        """Write a snapshot into ``directory`` every ``interval`` seconds, on the loop."""
        self._dir = directory
        self._write(self._take())
        self._task = self._loop.create_task(self._publisher(interval), name="metrics-publisher")

    async def _publisher(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            snap = self._take()
            if snap != self._last:  # idle workers write nothing
                self._write(snap)

    def _write(self, snap: Snapshot) -> None:
        assert self._dir is not None
        self._last = snap
        final = self._dir / f"{snap.pid}.json"
        tmp = self._dir / f".{snap.pid}.json.tmp"
        try:
            tmp.write_text(snap.to_json())
            os.replace(tmp, final)  # a reader sees the old snapshot or the new one
        except OSError as exc:
            _log.warning("cannot write metrics snapshot %s: %s", final, exc)

    async def aclose(self) -> None:
        """Stop serving or publishing; a worker writes its final snapshot."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._write(self._take())
        if self._http is not None:
            http, self._http = self._http, None
            await asyncio.to_thread(_stop_http, *http)


async def start_metrics(
    address: tuple[str, int] | None,
    settings: Mapping[str, str],
    executor: DeliveryExecutor,
    handler: object,
    factory: object,
) -> ServerMetrics | None:
    """What ``serve`` calls: ``None`` without an ``address`` (``--metrics``) to serve on.

    ``settings`` become labels of the info metric, after the version.
    A worker of ``--workers N`` (``$DELIVERY_EXECUTOR_WORKER_METRICS_DIR`` set)
    publishes snapshots for its parent; a lone server serves the endpoint.
    """
    if address is None:
        return None
    metrics = ServerMetrics(
        lambda: take_snapshot(executor, handler, factory), asyncio.get_running_loop()
    )
    directory = os.environ.get(WORKER_DIR_ENV)
    if directory:
        metrics.publish(Path(directory))
    else:
        _check_prometheus()
        metrics.serve(_labels(settings), *address)
    return metrics


# -- the parent of several workers -------------------------------------------


class WorkerMetrics:
    """The parent's side of ``--workers N --metrics``: sums the workers' snapshots.

    Create it before starting the workers (it sets :data:`WORKER_DIR_ENV` for
    them to inherit), :meth:`start` it once they run, and :meth:`close` it
    when they have exited.
    """

    def __init__(self, address: tuple[str, int], settings: Mapping[str, str]) -> None:
        _check_prometheus()
        self._address = address
        self._settings = _labels(settings)
        self._http: tuple[Any, threading.Thread] | None = None
        self._live: Collection[int] = ()
        self.directory = Path(tempfile.mkdtemp(prefix="delivery-executor-metrics-"))
        os.environ[WORKER_DIR_ENV] = str(self.directory)

    def start(self, live: Collection[int]) -> None:
        """Serve the summed metrics; ``live`` holds the running workers' pids (kept current).

        Called after the workers are forked, so that they inherit no thread
        and no listening socket of ours.
        """
        self._live = live
        collector = DeliveryCollector(self._snapshots, self._settings)
        try:
            self._http = _serve_http(collector, *self._address)
        except BaseException:
            self.close()
            raise

    def _snapshots(self) -> list[tuple[Snapshot, bool]]:
        running = set(self._live)
        out = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                snap = Snapshot.from_json(path.read_text())
            except (OSError, ValueError, TypeError, KeyError) as exc:
                _log.warning("skipping metrics snapshot %s: %s", path, exc)
                continue
            out.append((snap, snap.pid in running))
        return out

    def close(self) -> None:
        """Stop serving, forget the directory (and the environment variable)."""
        if self._http is not None:
            http, self._http = self._http, None
            _stop_http(*http)
        os.environ.pop(WORKER_DIR_ENV, None)
        shutil.rmtree(self.directory, ignore_errors=True)


def start_worker_metrics(
    address: tuple[str, int] | None, settings: Mapping[str, str]
) -> WorkerMetrics | None:
    """What the parent of ``--workers N`` calls before starting them; ``None`` without metrics."""
    return None if address is None else WorkerMetrics(address, settings)


def _labels(settings: Mapping[str, str]) -> dict[str, str]:
    """The info metric's labels: the version, then ``settings``."""
    return {"version": __version__, **settings}
