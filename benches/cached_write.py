"""Writing and syncing new files with and without other files of the file system in the cache.

    .venv/bin/python -m benches.cached_write [--old-mib 1000] [--rounds 10]

On a fresh bench file system (:mod:`benches.benchfs`, as root): ten times, 16
new 1 MiB files written (buffered) and one ``syncfs``, then a second
``syncfs`` with nothing dirty; then the same after writing ``--old-mib`` of
other files (64 KiB and 500 B ones, as the smtp-source cells leave behind)
and syncing them; then again after ``echo 3 > /proc/sys/vm/drop_caches``.
Prints the medians per state: wall ms of the writes and of each ``syncfs``,
and the process's system CPU ms per round.

Why: the smtp-source bench used to keep every cell's mail, and its 1 MiB
cell then ran at half the rate with three times the system CPU per message;
dropping the caches, with the files kept, restored it (BUDGETS.md).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import time

from .benchfs import bench_filesystem

_libc = ctypes.CDLL(None, use_errno=True)


def _syncfs(fd: int) -> None:
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _round(directory: str, tag: str, data: bytes) -> tuple[float, float, float, float]:
    t0, c0 = time.perf_counter(), os.times()
    for i in range(16):
        with open(f"{directory}/{tag}-{i}", "wb") as f:
            f.write(data)
    t1 = time.perf_counter()
    fd = os.open(directory, os.O_RDONLY)
    try:
        _syncfs(fd)
        t2 = time.perf_counter()
        _syncfs(fd)
        t3 = time.perf_counter()
    finally:
        os.close(fd)
    c1 = os.times()
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3, (c1.system - c0.system) * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benches.cached_write", description=__doc__)
    p.add_argument("--old-mib", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=10)
    a = p.parse_args(argv)
    data = os.urandom(1 << 20)
    with bench_filesystem() as (base, description):
        print(f"file system: {description}")
        d = str(base)

        def state(label: str) -> None:
            rows = [_round(d, f"{label}{k}", data) for k in range(a.rounds)]
            w, s1, s2, sy = (statistics.median(col) for col in zip(*rows, strict=True))
            print(
                f"{label:<22} write 16 MiB {w:6.1f} ms  syncfs {s1:6.1f} ms"
                f"  syncfs (clean) {s2:4.1f} ms  system CPU {sy:5.1f} ms",
                flush=True,
            )

        state("fresh")
        os.mkdir(f"{d}/old")
        chunk = os.urandom(64 * 1024)
        for i in range(a.old_mib * 15):  # ~15 files of 64 KiB per MiB
            with open(f"{d}/old/{i}", "wb") as f:
                f.write(chunk)
        for i in range(a.old_mib * 40):  # and small ones, as the 500 B cells leave
            with open(f"{d}/old/s{i}", "wb") as f:
                f.write(chunk[:500])
        fd = os.open(d, os.O_RDONLY)
        _syncfs(fd)
        os.close(fd)
        state(f"{a.old_mib} MiB more cached")
        if os.geteuid() == 0:
            subprocess.run(["sync"], check=True)
            with open("/proc/sys/vm/drop_caches", "w") as knob:
                knob.write("3\n")
            state("caches dropped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
