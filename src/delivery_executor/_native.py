"""The optional C helpers (``_speedups.c``), or ``None``.

``pip install`` builds them when a C compiler is present and goes on without
one; the pure-Python paths they replace give the same results. The DATA
path's byte loops take about 2.2 times the user CPU of ``serve`` per 1 MiB
message without them (1.2 times at 64 KiB); the batch writeback
(:meth:`~delivery_executor.fsops.FsOps.writeback`) makes its 2N
``sync_file_range`` calls through ctypes instead (BUDGETS.md has both).
``DELIVERY_EXECUTOR_PURE=1`` in the environment turns them off: for A/B
benchmarks and tests of the fallback.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

__all__ = ["Speedups", "speedups"]


class Speedups(Protocol):
    """What ``_speedups`` offers (its stub says the same)."""

    def find_dot_or_bare_lf_counted(
        self, buf: bytes | bytearray | memoryview, pos: int, /
    ) -> tuple[int, int]: ...
    def to_lf_counted(self, body: bytes, crlf: int = -1, /) -> tuple[bytes, int]: ...
    def judge_lines(
        self, buf: bytes | bytearray | memoryview, start: int, end: int, width: int, /
    ) -> tuple[int, bool]: ...
    def unstuff_to_lf(
        self, buf: bytes | bytearray | memoryview, start: int, dots: list[int], crlf: int, /
    ) -> tuple[bytes, int] | None: ...
    def writeback(self, fds: Sequence[int], /) -> tuple[int, int] | None: ...


def _load() -> Speedups | None:
    if os.environ.get("DELIVERY_EXECUTOR_PURE", "") not in ("", "0"):
        return None
    try:
        from . import _speedups
    except ImportError:
        return None
    return _speedups


speedups = _load()
