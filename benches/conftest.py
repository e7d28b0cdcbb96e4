"""Benchmark fixtures and a summary of throughput ratios measured in the same run."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from delivery_executor import Maildir

from .benchfs import bench_filesystem

_FS_DESCRIPTION: list[str] = []


@pytest.fixture(scope="session")
def bench_root() -> Iterator[Path]:
    """A fresh file system (loop-mounted ext4 when root) shared by the session."""
    with bench_filesystem() as (where, description):
        _FS_DESCRIPTION.append(description)
        # Warm-up: the first commits on a fresh file system are slower (journal, caches).
        warm = Maildir.create(where / "warm-up")
        until = time.monotonic() + 3.0
        while time.monotonic() < until:
            warm.deliver_batch([b"warm-up"] * 32)
            warm.deliver(b"warm-up")
        yield where


@pytest.fixture
def fresh_dir(bench_root: Path) -> Any:
    """A factory of new, never-used directories under ``bench_root``."""
    counter = itertools.count()

    def make() -> Path:
        p = bench_root / f"d{next(counter)}-{id(counter)}"
        p.mkdir()
        return p

    return make


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """Print msg/s per benchmark and its ratio to the group's baseline, same run."""
    session = getattr(config, "_benchmarksession", None)
    benches = getattr(session, "benchmarks", None)
    if not benches:
        return
    tr = terminalreporter
    tr.section("delivery-executor: msg/s and ratios (medians, this run)")
    if _FS_DESCRIPTION:
        tr.write_line(f"file system: {_FS_DESCRIPTION[0]}")
    groups: dict[str, list[Any]] = {}
    for b in benches:
        groups.setdefault(b.group or "", []).append(b)
    for group, items in groups.items():
        rate = {b.name: b.extra_info["messages"] / b.stats.median for b in items}
        tr.write_line(f"[{group}]")
        for b in items:
            line = (
                f"  {b.name:<48} {rate[b.name]:>9.0f} msg/s  median {b.stats.median * 1e3:8.3f} ms"
            )
            for label, other in sorted(b.extra_info.get("compare", {}).items()):
                match = [n for n in rate if other in n]
                if match:
                    line += f"  {rate[b.name] / rate[match[0]]:5.2f}x {label}"
            tr.write_line(line)
