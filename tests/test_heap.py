"""keep_heap: big buffers freed by one message are reused by the next, without page faults."""

from __future__ import annotations

import subprocess
import sys

import pytest

from delivery_executor import heap

pytestmark = pytest.mark.timeout(60)

_PROBE = """
import resource, sys
from delivery_executor.heap import keep_heap
ok = keep_heap() if sys.argv[1] == "keep" else None
chunk = b"x" * 65536

def message():  # what the reader does: a buffer grown by reads, copied out
    buf = bytearray()
    for _ in range(16):
        buf += chunk
    return bytes(buf)

def sessions():  # 8 of them at once, then all freed
    bodies = [message() for _ in range(8)]
    del bodies

for _ in range(3):  # settle: the first rounds may grow the heap
    sessions()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    sessions()
print(ok, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_kept_heap_reuses_freed_megabytes_without_faults() -> None:
    """8 sessions' 1 MiB bodies at a time, freed together: hundreds of faults a message by
    default (the heap is trimmed, then grown again), next to none once kept."""
    ok, kept = _faults("keep")
    if ok != "True":
        pytest.skip("no glibc mallopt here")
    _, default = _faults("default")
    assert kept < 100, kept
    assert default > 40 * 100, default  # the cost keep_heap removes is there without it


def test_thresholds_are_within_glibc_limits() -> None:
    """The values are ones glibc accepts on 64-bit (mmap threshold at most 32 MiB)."""
    assert 1 << 20 < heap.MMAP_THRESHOLD <= 32 << 20
    assert heap.TRIM_THRESHOLD >= heap.MMAP_THRESHOLD
