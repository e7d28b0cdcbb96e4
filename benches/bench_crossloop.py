"""What sharing an executor across loops costs: same-loop callers against callers elsewhere.

Contenders, 32 callers each, 500-byte messages, one run, rounds interleaved:
  same-loop    32 tasks on the executor's home loop
  other-loop   32 tasks on another event loop, in another thread (aiosmtpd Controller style)
  threads      32 threads calling deliver_sync

Three writers: one that stores nothing (``no-disk``: the hand-off's own CPU
cost, alone), and the real store on the bench file system written on the
home loop (``loop``, the library's default) or by a helper process
(``process``, what ``serve`` uses).

    .venv/bin/python -m benches.bench_crossloop [--messages 6000] [--rounds 3] [--json out.json]
        [--switch-interval SECONDS]

``--switch-interval`` sets ``sys.setswitchinterval`` (CPython's default is
0.005 s): how long a thread that wants the GIL waits before it asks the
running one to hand it over, which bounds each cross-thread hop.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from delivery_executor import DeliveryExecutor, MessageId
from delivery_executor.writers import BatchResult, BatchWriter, Group, LoopWriter, ProcessWriter

from .benchfs import bench_filesystem

BODY = (b"From: bench@example.org\r\nSubject: x\r\n\r\n" + b"x" * 500)[:500]
CALLERS = 32
CONTENDERS = ("same-loop", "other-loop", "threads")


class NoDisk:
    """A batch writer that stores nothing: the executor's own costs, alone."""

    def __init__(self) -> None:
        self._seq = itertools.count()

    async def acommit(self, groups: Sequence[Group]) -> BatchResult:
        return [[MessageId(f"n{next(self._seq)}") for _ in msgs] for _, msgs in groups], 0

    async def aclose(self) -> None:
        return None


WRITERS: dict[str, type[BatchWriter]] = {
    "no-disk": NoDisk,
    "loop": LoopWriter,
    "process": ProcessWriter,
}


async def _callers(ex: DeliveryExecutor, path: Path, per_caller: int) -> None:
    async def one() -> None:
        for _ in range(per_caller):
            await ex.deliver(path, BODY)

    await asyncio.gather(*(one() for _ in range(CALLERS)))


def _run_elsewhere(ex: DeliveryExecutor, path: Path, per_caller: int) -> None:
    asyncio.run(_callers(ex, path, per_caller))


async def run_one(contender: str, writer: BatchWriter, path: Path, messages: int) -> float:
    """msg/s of one contender with ``writer``, the executor's home being this loop."""
    per_caller = messages // CALLERS
    async with DeliveryExecutor(writer=writer) as ex:
        await ex.deliver(path, BODY)  # Maildir created and cached before timing
        t0 = time.perf_counter()
        if contender == "same-loop":
            await _callers(ex, path, per_caller)
        elif contender == "other-loop":
            thread = threading.Thread(target=_run_elsewhere, args=(ex, path, per_caller))
            thread.start()
            await asyncio.to_thread(thread.join)
        else:
            with ThreadPoolExecutor(CALLERS) as pool:
                await asyncio.gather(
                    *(
                        asyncio.wrap_future(pool.submit(ex.deliver_sync, path, BODY))
                        for _ in range(per_caller * CALLERS)
                    )
                )
        elapsed = time.perf_counter() - t0
    return per_caller * CALLERS / elapsed


async def run_all(root: Path, messages: int, rounds: int) -> list[dict[str, Any]]:
    rows = []
    for kind in WRITERS:
        samples: dict[str, list[float]] = {c: [] for c in CONTENDERS}
        for r in range(rounds):
            for c in CONTENDERS:
                writer: BatchWriter = WRITERS[kind]()
                samples[c].append(await run_one(c, writer, root / f"{kind}-{c}-{r}", messages))
        base = statistics.median(samples["same-loop"])
        for c in CONTENDERS:
            rate = statistics.median(samples[c])
            rows.append({"writer": kind, "contender": c, "msg_s": rate, "ratio": rate / base})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benches.bench_crossloop", description=__doc__)
    p.add_argument("--messages", type=int, default=6000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path)
    p.add_argument("--switch-interval", type=float, help="sys.setswitchinterval(SECONDS) first")
    a = p.parse_args(argv)
    if a.switch_interval is not None:
        sys.setswitchinterval(a.switch_interval)
    with bench_filesystem() as (root, description):
        rows = asyncio.run(run_all(root, a.messages, a.rounds))
    print(
        f"file system: {description}; {CALLERS} callers, {a.messages} messages, medians,"
        f" switch interval {sys.getswitchinterval() * 1000:g} ms"
    )
    for row in rows:
        print(
            f"{row['writer']:<8} {row['contender']:<11} {row['msg_s']:>9.0f} msg/s"
            f"  {row['ratio']:5.2f}x same-loop"
        )
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0


def test_crossloop_contenders(bench_root: Path) -> None:
    """One short round of every contender (pytest entry for `python3 tasks.py bench`)."""
    rows = asyncio.run(run_all(bench_root, 640, 1))
    assert {r["contender"] for r in rows} == set(CONTENDERS)
    for row in rows:
        print(f"{row['writer']:<8} {row['contender']:<11} {row['msg_s']:>9.0f} msg/s"
              f"  {row['ratio']:5.2f}x same-loop")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
