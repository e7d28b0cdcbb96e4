"""Where a durable batch of 32 small messages spends its time, phase by phase.

On the bench file system (a fresh journaled ext4 image), the store's
``Maildir.deliver_batch(32)`` and ``Maildir.deliver`` are timed as they are,
then the same work by hand, each phase timed apart: 32 files written into
``tmp/``, the first ``syncfs`` (their data), 32 renames into ``new/``, the
second ``syncfs`` (the renames). Medians of ``--rounds`` batches.

    .venv/bin/python -m benches.batch_phases [--rounds 100] [--size 500]

The executor's batches cannot go faster than the store's (``bench_executor_ratio``);
this says which part of the store's batch is the disk and which is the CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

from delivery_executor import Maildir
from delivery_executor.fsops import FsOps

from .benchfs import bench_filesystem


def _ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def _timed(fn: Callable[[], object], rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benches.batch_phases", description=__doc__)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--size", type=int, default=500)
    a = p.parse_args(argv)
    body = b"x" * a.size
    ops = FsOps()
    with bench_filesystem() as (root, desc):
        print(f"file system: {desc}")
        box = Maildir.create(root / "box")
        for _ in range(20):  # warm: directories grown, journal busy
            box.deliver_batch([body] * 32)
        batch = _timed(lambda: box.deliver_batch([body] * 32), a.rounds)
        single = _timed(lambda: box.deliver(body), a.rounds * 3)
        fd = os.open(root, os.O_RDONLY)
        try:
            idle = _timed(lambda: ops.syncfs(str(root), fd), 50)
            tmp, new = root / "box" / "tmp", root / "box" / "new"
            phases: dict[str, list[float]] = {"write 32": [], "syncfs": [], "rename 32": []}
            phases["syncfs again"] = []
            for k in range(a.rounds):
                t0 = time.perf_counter()
                names = []
                for i in range(32):
                    name = f"phase{k}.{i}"
                    f = os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    os.write(f, body)
                    os.close(f)
                    names.append(name)
                t1 = time.perf_counter()
                ops.syncfs(str(root), fd)
                t2 = time.perf_counter()
                for name in names:
                    os.rename(tmp / name, new / name)
                t3 = time.perf_counter()
                ops.syncfs(str(root), fd)
                t4 = time.perf_counter()
                for key, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                    phases[key].append(dt)
        finally:
            os.close(fd)
    print(
        f"deliver_batch(32): {_ms(batch):.2f} ms ({32 / statistics.median(batch):,.0f} msg/s);"
        f" deliver(1): {_ms(single):.2f} ms; syncfs with nothing dirty: {_ms(idle):.2f} ms"
    )
    print("by hand: " + ", ".join(f"{k} {_ms(v):.2f} ms" for k, v in phases.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
