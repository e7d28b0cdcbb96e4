"""Large freed buffers kept in the heap for the next message (glibc ``mallopt``).

A big message passes through a few buffers of its size: the transport's
reads, the reader's buffer, the unstuffed body, its LF form, the helper's
copy. glibc serves each request of 128 KiB or more (a threshold it raises
only as far as the largest block freed so far) with a fresh ``mmap`` and
unmaps it at ``free``, so every such buffer costs the kernel a zeroed page
and a page fault per 4 KiB it writes, each message again: about 500 faults
per 1 MiB message on the DATA path alone. :func:`keep_heap` raises
``M_MMAP_THRESHOLD`` to :data:`MMAP_THRESHOLD` and ``M_TRIM_THRESHOLD`` to
:data:`TRIM_THRESHOLD`, so buffers up to 32 MiB come from the heap and a freed
one is reused by the next message without a fault.

Cost: the process keeps up to :data:`TRIM_THRESHOLD` bytes of freed heap at
its top instead of returning them (its RSS stays near its busiest moment's,
which the DATA budget bounds). ``serve`` calls it at start-up (its workers
inherit it) and so does the writer helper; a library embedding the executor
decides for itself.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_heap"]

MMAP_THRESHOLD = 32 << 20
"""Blocks below this come from the heap (glibc's largest allowed value on 64-bit)."""
TRIM_THRESHOLD = 64 << 20
"""Free bytes the heap keeps at its top before giving memory back to the kernel."""

_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_THRESHOLD = -3


def keep_heap() -> bool:
    """Set both thresholds in this process; False where there is no glibc ``mallopt``.

    Idempotent; fixed values also turn off glibc's own threshold adjustment.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 for a value it refuses (musl: always 0).
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
