"""Group commit as storage gets slower: throughput against sync latency, 1 and 3 hosts.

A network file system (NFS, CephFS) makes every sync a round trip to a
storage server, which commits one sync at a time. This benchmark models that
through the store's ``FsOps`` seam: every ``fdatasync``, directory ``fsync``
and ``syncfs`` of every host first takes one shared lock (``flock`` on a file
beside the mail root: the server) and holds it for a fixed latency. It
measures, for 0.1, 1, 5 and 20 ms per sync:

  executor      DeliveryExecutor (eager, writer "loop"), 32 callers per host
  per-message   32 threads per host, each Maildir.deliver (its own syncs) per message

with 1 host, and with 3 hosts: 3 processes delivering into one shared Maildir
root at once (as several `serve` hosts on shared storage would). Each cell runs
for a fixed time; msg/s is the sum over the hosts.

    .venv/bin/python -m benches.bench_latency [--seconds 4] [--json out.json] [--plot out.png]
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import multiprocessing
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from delivery_executor import DeliveryExecutor, LoopWriter, Maildir, commit_batch
from delivery_executor.fsops import FsOps

from .benchfs import bench_filesystem

LATENCIES_MS = (0.1, 1.0, 5.0, 20.0)
HOSTS = (1, 3)
CONTENDERS = ("executor", "per-message")
CALLERS = 32
MAILBOXES = 100
BODY = (b"From: bench@example.org\r\nSubject: x\r\n\r\n" + b"x" * 500)[:500]


class SlowSyncs(FsOps):
    """Real syscalls; each sync first holds the shared storage for ``delay`` seconds."""

    __slots__ = ("delay", "lock", "threads")

    def __init__(self, delay: float, lock_path: Path) -> None:
        self.delay = delay
        self.lock = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        # flock() holds per open file, not per thread: threads queue here first.
        self.threads = threading.Lock()

    def _serve(self) -> None:
        # One commit at a time on the storage server, whichever host and thread asks.
        with self.threads:
            fcntl.flock(self.lock, fcntl.LOCK_EX)
            try:
                time.sleep(self.delay)
            finally:
                fcntl.flock(self.lock, fcntl.LOCK_UN)

    def fdatasync(self, fd: int, path: str) -> None:
        self._serve()
        super().fdatasync(fd, path)

    def fsync_dir(self, path: str) -> None:
        self._serve()
        super().fsync_dir(path)

    def syncfs(self, path: str, fd: int = -1) -> None:
        self._serve()
        super().syncfs(path, fd)


def _lock_path(root: Path) -> Path:
    return root.parent / f"{root.name}.storage-lock"


def _boxes(root: Path) -> list[Path]:
    return [root / f"user{i:03d}" for i in range(MAILBOXES)]


async def _executor_host(root: Path, delay: float, seconds: float) -> int:
    boxes = _boxes(root)
    done = 0
    ops = SlowSyncs(delay, _lock_path(root))
    async with DeliveryExecutor(writer=LoopWriter(ops=ops)) as ex:
        end = time.monotonic() + seconds

        async def caller(n: int) -> None:
            nonlocal done
            i = n
            while time.monotonic() < end:
                await ex.deliver(boxes[i % MAILBOXES], BODY)
                done += 1
                i += CALLERS

        await asyncio.gather(*(caller(n) for n in range(CALLERS)))
    return done


def _per_message_host(root: Path, delay: float, seconds: float) -> int:
    boxes = [Maildir.create(b) for b in _boxes(root)]
    ops = SlowSyncs(delay, _lock_path(root))
    end = time.monotonic() + seconds
    counts = [0] * CALLERS
    lock = threading.Lock()

    def caller(n: int) -> None:
        i = n
        while time.monotonic() < end:
            commit_batch([(boxes[i % MAILBOXES], [BODY])], sync="fsync", ops=ops)
            with lock:
                counts[n] += 1
            i += CALLERS

    with ThreadPoolExecutor(CALLERS) as pool:
        list(pool.map(caller, range(CALLERS)))
    return sum(counts)


def _host(args: tuple[str, str, float, float]) -> int:
    contender, root, delay, seconds = args
    for box in _boxes(Path(root)):
        Maildir.create(box)  # not timed: every host sees the same ready Maildirs
    if contender == "executor":
        return asyncio.run(_executor_host(Path(root), delay, seconds))
    return _per_message_host(Path(root), delay, seconds)


def run_cell(root: Path, contender: str, hosts: int, latency_ms: float, seconds: float) -> float:
    """msg/s over ``hosts`` processes delivering into ``root`` at once."""
    args = [(contender, str(root), latency_ms / 1000, seconds)] * hosts
    with multiprocessing.get_context("spawn").Pool(hosts) as pool:
        counts = pool.map(_host, args)
    return sum(counts) / seconds


def run_all(base: Path, seconds: float) -> list[dict[str, Any]]:
    rows = []
    for hosts in HOSTS:
        for latency in LATENCIES_MS:
            for contender in CONTENDERS:
                root = base / f"{contender}-{hosts}-{latency}"
                rate = run_cell(root, contender, hosts, latency, seconds)
                row = {"hosts": hosts, "latency_ms": latency, "contender": contender, "msg_s": rate}
                print(f"{hosts} host(s)  {latency:5.1f} ms/sync  {contender:<12} {rate:8.0f} msg/s",
                      flush=True)  # fmt: skip
                rows.append(row)
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for hosts in HOSTS:
        for contender, style in zip(CONTENDERS, ("-o", "--s"), strict=True):
            pts = [r for r in rows if r["hosts"] == hosts and r["contender"] == contender]
            ax.plot([r["latency_ms"] for r in pts], [r["msg_s"] for r in pts], style,
                    label=f"{contender}, {hosts} host(s)")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("latency per sync (ms)")
    ax.set_ylabel("msg/s, all hosts")
    ax.set_title(f"one shared storage, a sync at a time; {CALLERS} callers per host")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benches.bench_latency", description=__doc__)
    p.add_argument("--seconds", type=float, default=4.0, help="measured seconds per cell")
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    a = p.parse_args(argv)
    with bench_filesystem() as (base, description):
        print(f"file system: {description}", flush=True)
        rows = run_all(base, a.seconds)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    if a.plot:
        plot(rows, a.plot)
    return 0


def test_latency_cells(bench_root: Path) -> None:
    """One short cell per contender (pytest entry for `python3 tasks.py bench`)."""
    for contender in CONTENDERS:
        rate = run_cell(bench_root / f"t-{contender}", contender, 1, 1.0, 1.0)
        print(f"{contender}: {rate:.0f} msg/s at 1 ms per sync")
        assert rate > 0


if __name__ == "__main__":
    sys.exit(main())
