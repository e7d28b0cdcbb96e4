"""Port of mailrs-maildir's benches/deliver.rs: N x deliver against deliver_batch.

A 200-byte message, N = 1, 8 and 64, for each sync form, plus a no-sync
reference (benchmark only: it is not durable) as the ceiling. Each round
writes into a fresh Maildir so directory size does not drift between rounds.

    python3 tasks.py bench -k store
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from delivery_executor import Maildir, commit_batch
from delivery_executor.fsops import FsOps

BODY = (b"From: bench@example.org\r\nSubject: x\r\n\r\n" + b"x" * 200)[:200]
assert len(BODY) == 200
ROUNDS = 40


class NoSyncOps(FsOps):
    """The same file work with every sync skipped: the ceiling, never durable."""

    __slots__ = ()

    def fdatasync(self, fd: int, path: str) -> None:
        pass

    def fsync_dir(self, path: str) -> None:
        pass

    def syncfs(self, path: str, fd: int = -1) -> None:
        pass


NOSYNC = NoSyncOps()


def _run(benchmark: Any, fresh_dir: Callable[[], Path], fn: Callable[[Maildir], None]) -> None:
    def setup() -> tuple[tuple[Maildir], dict[str, Any]]:
        return (Maildir.create(fresh_dir() / "m"),), {}

    benchmark.pedantic(fn, setup=setup, rounds=ROUNDS, iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("n", [1, 8, 64])
@pytest.mark.parametrize("sync", ["auto", "fsync", "syncfs"])
def test_deliver_loop(benchmark: Any, fresh_dir: Callable[[], Path], n: int, sync: str) -> None:
    """N x Maildir.deliver: one durable commit per message."""
    benchmark.group = f"store N={n}"
    benchmark.extra_info["messages"] = n

    def loop(md: Maildir) -> None:
        for _ in range(n):
            md.deliver(BODY, sync=sync)  # type: ignore[arg-type]

    _run(benchmark, fresh_dir, loop)


@pytest.mark.parametrize("n", [1, 8, 64])
@pytest.mark.parametrize("sync", ["auto", "fsync", "syncfs"])
def test_deliver_batch(benchmark: Any, fresh_dir: Callable[[], Path], n: int, sync: str) -> None:
    """One Maildir.deliver_batch of N messages."""
    benchmark.group = f"store N={n}"
    benchmark.extra_info["messages"] = n
    benchmark.extra_info["compare"] = {
        "vs N x deliver (auto)": "test_deliver_loop[auto-",
        "of no-sync ceiling": "test_nosync_ceiling",
    }
    _run(benchmark, fresh_dir, lambda md: md.deliver_batch([BODY] * n, sync=sync))  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [1, 8, 64])
def test_nosync_ceiling(benchmark: Any, fresh_dir: Callable[[], Path], n: int) -> None:
    """The same file work with no sync at all (not durable): the ceiling."""
    benchmark.group = f"store N={n}"
    benchmark.extra_info["messages"] = n

    def nosync(md: Maildir) -> None:
        commit_batch([(md, [BODY] * n)], ops=NOSYNC)

    _run(benchmark, fresh_dir, nosync)
