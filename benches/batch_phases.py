"""Where a durable batch of 32 small messages spends its time, phase by phase.

On the bench file system (a fresh journaled ext4 image), the store's
``Maildir.deliver_batch(32)`` (``sync="auto"``: the writeback form where the
file system orders it, and ``sync="syncfs"``, in alternate rounds) and
``Maildir.deliver`` are timed as they are, then the same work by hand, each
phase timed apart: 32 files written into ``tmp/``, the data step (the first
``syncfs``, or the writeback form's ``sync_file_range`` write then wait on
each file), 32 renames into ``new/``, the sync after them (``syncfs``, or the
writeback form's ``fsync`` of ``new/``). Medians of ``--rounds`` batches.

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
        batch: list[float] = []
        two_syncfs: list[float] = []
        for _ in range(a.rounds):
            batch += _timed(lambda: box.deliver_batch([body] * 32), 1)
            two_syncfs += _timed(lambda: box.deliver_batch([body] * 32, sync="syncfs"), 1)
        single = _timed(lambda: box.deliver(body), a.rounds * 3)
        fd = os.open(root, os.O_RDONLY)
        try:
            idle = _timed(lambda: ops.syncfs(str(root), fd), 50)
            tmp, new = root / "box" / "tmp", root / "box" / "new"
            two = ("write 32", "syncfs", "rename 32", "syncfs again")
            one = ("writeback form: write 32", "wait writeback", "rename 32 ", "fsync new/")
            # The writeback form's last step as it was: a syncfs instead of the fsync.
            old = ("write 32  ", "wait writeback ", "rename 32  ", "or a syncfs there")
            forms = {"syncfs": two, "writeback": one, "writeback+syncfs": old}
            phases: dict[str, list[float]] = {k: [] for keys in forms.values() for k in keys}
            for k in range(a.rounds):
                for form, keys in forms.items():
                    t0 = time.perf_counter()
                    names, fds = [], []
                    for i in range(32):
                        name = f"phase{k}.{form}.{i}"
                        f = os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                        os.write(f, body)
                        if form == "syncfs":
                            os.close(f)
                        else:
                            fds.append(f)
                        names.append(name)
                    t1 = time.perf_counter()
                    if form == "syncfs":
                        ops.syncfs(str(root), fd)
                    else:
                        for f in fds:
                            ops.start_writeback(f, name)
                        for f in fds:
                            ops.wait_writeback(f, name)
                            os.close(f)
                    t2 = time.perf_counter()
                    for name in names:
                        os.rename(tmp / name, new / name)
                    t3 = time.perf_counter()
                    if form == "writeback":
                        ops.fsync_dir(str(new))
                    else:
                        ops.syncfs(str(root), fd)
                    t4 = time.perf_counter()
                    for key, dt in zip(keys, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                        phases[key].append(dt)
        finally:
            os.close(fd)
    print(
        f"deliver_batch(32): {_ms(batch):.2f} ms ({32 / statistics.median(batch):,.0f} msg/s,"
        f" writeback form: {box.ordered}); with sync='syncfs': {_ms(two_syncfs):.2f} ms;"
        f" deliver(1): {_ms(single):.2f} ms; syncfs with nothing dirty: {_ms(idle):.2f} ms"
    )
    print("by hand: " + ", ".join(f"{k} {_ms(v):.2f} ms" for k, v in phases.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
