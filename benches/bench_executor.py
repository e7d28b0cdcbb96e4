"""In-process executor benchmark (no SMTP): throughput and latency per contender.

Contenders, all durable, on the same file system in one run:
  per-message  each caller runs Maildir.deliver in a thread (run_in_executor)
  window       DeliveryExecutor with the original's fixed 10 ms window
  eager        DeliveryExecutor with our default natural batching

Workloads: 1 caller or 32 callers; one Maildir or 1,000 Maildirs.

    .venv/bin/python -m benches.bench_executor [--messages 3000] [--rounds 3] [--json out.json]

or through pytest (one short round, for `python3 tasks.py bench`).

``--fake-sync-ms N [--fake-disk journal|parallel]``: on /dev/shm with every
sync a simulated commit of N ms (``benches/simdisk.py``), so that the batching
policies compare without a real disk's noise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from delivery_executor import BatchPolicy, DeliveryExecutor, Maildir, MessageId
from delivery_executor.stats import percentile

from .benchfs import bench_filesystem
from .simdisk import MODELS, SimDisk, Timeline, fake_syncs

BODY = (b"From: bench@example.org\r\nSubject: x\r\n\r\n" + b"x" * 500)[:500]
CONTENDERS = ("per-message", "window", "eager")
WORKLOADS = (
    ("1 caller, 1 path", 1, 1),
    ("32 callers, 1 path", 32, 1),
    ("32 callers, 1000 paths", 32, 1000),
)


async def _drive(
    deliver: Callable[[Path, bytes], Awaitable[MessageId]],
    paths: list[Path],
    callers: int,
    messages: int,
) -> tuple[float, list[float]]:
    latencies: list[float] = []
    per_caller = max(1, messages // callers)

    async def caller(n: int) -> None:
        for i in range(per_caller):
            path = paths[(n * 7919 + i * 104729) % len(paths)]
            t0 = time.perf_counter()
            await deliver(path, BODY)
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(caller(n) for n in range(callers)))
    return time.perf_counter() - t0, latencies


async def run_one(
    contender: str, root: Path, callers: int, npaths: int, messages: int
) -> dict[str, Any]:
    """One measurement: msg/s, latency percentiles (ms), mean batch size."""
    paths = [root / f"user{i:04d}" for i in range(npaths)]
    for p in paths:  # created up front: the figure is delivery, not mkdir
        Maildir.cached(p)
    os.sync()  # and their metadata flushed, so the first batch does not pay for it
    mean_batch = 1.0
    if contender == "per-message":
        loop = asyncio.get_running_loop()

        async def deliver(path: Path, body: bytes) -> MessageId:
            return await loop.run_in_executor(None, Maildir.cached(path).deliver, body)

        elapsed, lat = await _drive(deliver, paths, callers, messages)
    else:
        policy: BatchPolicy = "window" if contender == "window" else "eager"
        async with DeliveryExecutor(policy=policy) as ex:
            elapsed, lat = await _drive(ex.deliver, paths, callers, messages)
            mean_batch = ex.stats().mean_batch_size
    lat.sort()

    def pct(q: float) -> float:
        return percentile(lat, q) * 1e3

    return {
        "msg_s": len(lat) / elapsed,
        "p50_ms": pct(0.5),
        "p99_ms": pct(0.99),
        "max_ms": lat[-1] * 1e3,
        "mean_batch": mean_batch,
        "messages": len(lat),
    }


async def run_all(root: Path, messages: int, rounds: int) -> list[dict[str, Any]]:
    """Every workload x contender, ``rounds`` times each, interleaved; medians kept."""
    rows = []
    for title, callers, npaths in WORKLOADS:
        n = messages if callers > 1 else max(200, messages // 10)
        samples: dict[str, list[dict[str, Any]]] = {c: [] for c in CONTENDERS}
        for r in range(rounds):
            for c in CONTENDERS:
                where = root / f"{c}-{callers}-{npaths}-{r}"
                where.mkdir()
                samples[c].append(await run_one(c, where, callers, npaths, n))
        base = statistics.median(s["msg_s"] for s in samples["per-message"])
        base_p50 = statistics.median(s["p50_ms"] for s in samples["per-message"])
        for c in CONTENDERS:
            row = {"workload": title, "contender": c}
            for key in samples[c][0]:
                row[key] = statistics.median(s[key] for s in samples[c])
            row["x_per_message"] = row["msg_s"] / base
            row["p50_minus_per_message_ms"] = row["p50_ms"] - base_p50
            rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    out = [
        f"{'workload':<24} {'contender':<12} {'msg/s':>8} {'x per-msg':>9} {'p50 ms':>7}"
        f" {'p99 ms':>7} {'max ms':>7} {'batch':>6}"
    ]
    for r in rows:
        out.append(
            f"{r['workload']:<24} {r['contender']:<12} {r['msg_s']:>8.0f}"
            f" {r['x_per_message']:>9.2f} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f}"
            f" {r['max_ms']:>7.2f} {r['mean_batch']:>6.1f}"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=3000, help="messages per 32-caller run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--fake-sync-ms", type=float, help="simulated syncs on /dev/shm")
    parser.add_argument("--fake-disk", choices=MODELS, default="journal")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.fake_sync_ms is not None:
            disk = SimDisk(args.fake_sync_ms, args.fake_disk, Timeline())
            stack.enter_context(fake_syncs(disk))
            where = stack.enter_context(tempfile.TemporaryDirectory(dir="/dev/shm"))
            root = Path(where)
            description = f"tmpfs, simulated syncs: {args.fake_disk}, {args.fake_sync_ms:g} ms"
        else:
            root, description = stack.enter_context(bench_filesystem())
        print(f"file system: {description}", flush=True)
        rows = asyncio.run(run_all(root, args.messages, args.rounds))
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps({"filesystem": description, "rows": rows}, indent=2))
    return 0


def test_executor_contenders(bench_root: Path) -> None:
    """One short round of every contender and workload, printed as a table."""
    rows = asyncio.run(run_all(bench_root, 1000, 1))
    print("\n" + format_table(rows))
    assert all(r["messages"] > 0 for r in rows)


if __name__ == "__main__":
    sys.exit(main())
