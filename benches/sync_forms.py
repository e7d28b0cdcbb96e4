"""The store's sync forms for small batches, idle and beside a busy neighbour.

On the bench file system (a fresh journaled ext4 image: the writeback form
applies), ms per ``deliver_batch`` of N 500-byte files in each form, medians
of ``--rounds`` alternating rounds: ``auto`` (the writeback form from two
files), ``fsync`` (portable), ``syncfs`` (two syncfs), and ``writeback-1``
(``auto`` with the writeback form from one file, a trial of
``AUTO_SYNCFS_MIN_FILES = 1``). Then one message at a time, portable against
writeback form, idle and while another thread writes 64 KiB every half
millisecond to the same file system without syncing (what a ``syncfs`` per
lone message would also have to flush).

    .venv/bin/python -m benches.sync_forms [--rounds 60] [--sizes 1,2,3,4]

This is the measurement behind ``auto``'s choice for a lone message
(BUDGETS.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from delivery_executor import Maildir
from delivery_executor.store import commit

from .benchfs import bench_filesystem

_BODY = b"x" * 500


def _batch(box: Maildir, n: int, form: str) -> Callable[[], object]:
    def run() -> object:
        commit.AUTO_SYNCFS_MIN_FILES = 1 if form == "writeback-1" else 2
        try:
            sync = "auto" if form == "writeback-1" else form
            return box.deliver_batch([_BODY] * n, sync=sync)  # type: ignore[arg-type]
        finally:
            commit.AUTO_SYNCFS_MIN_FILES = 2

    return run


def _medians(runs: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            t = time.perf_counter()
            run()
            out[name].append(time.perf_counter() - t)
    return out


def _ms(samples: list[float]) -> str:
    p90 = sorted(samples)[int(len(samples) * 0.9)]
    return f"{statistics.median(samples) * 1e3:.2f} (p90 {p90 * 1e3:.2f})"


def _noise(where: Path, stop: threading.Event) -> None:
    fd = os.open(where, os.O_WRONLY | os.O_CREAT, 0o600)
    chunk, off = b"n" * 65536, 0
    try:
        while not stop.is_set():
            os.pwrite(fd, chunk, off)
            off = (off + len(chunk)) % (256 << 20)
            time.sleep(0.0005)
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benches.sync_forms", description=__doc__)
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--sizes", default="1,2,3,4")
    a = p.parse_args(argv)
    with bench_filesystem() as (root, desc):
        box = Maildir.create(root / "box")
        print(f"file system: {desc}; writeback form applies: {box.ordered}")
        forms = ("auto", "fsync", "syncfs", "writeback-1")
        for n in (int(x) for x in a.sizes.split(",")):
            runs = {f: _batch(box, n, f) for f in forms}
            _medians(runs, 5)  # warm
            res = _medians(runs, a.rounds)
            cells = ", ".join(f"{f} {statistics.median(v) * 1e3:.2f}" for f, v in res.items())
            print(f"N = {n}: ms per batch: {cells}")
        lone = {"portable": _batch(box, 1, "auto"), "writeback": _batch(box, 1, "writeback-1")}
        for busy in (False, True):
            stop = threading.Event()
            noisy = threading.Thread(target=_noise, args=(root / "noise", stop))
            if busy:
                noisy.start()
                time.sleep(1)
            try:
                res = _medians(lone, a.rounds)
            finally:
                stop.set()
                if busy:
                    noisy.join()
            cells = ", ".join(f"{f} {_ms(v)}" for f, v in res.items())
            print(f"one message, {'busy neighbour' if busy else 'idle'}: ms {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
