"""FsOps.writeback's C call: hostile input cannot crash it, and no override is bypassed.

Written as an adversarial review of the one-C-call writeback (commits after
a8fd3ba). Each test fails on that change as reviewed: a list emptied by an
item's ``__index__`` during conversion crashed the interpreter, and an
override on the instance, or of ``_sync_file_range``, was silently skipped.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from delivery_executor import _native, fsops
from delivery_executor.fsops import FsOps

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not fsops.HAVE_WRITEBACK, reason="no sync_file_range here"),
]

needs_c = pytest.mark.skipif(
    getattr(_native.speedups, "writeback", None) is None, reason="C helpers off"
)

_MUTATED_DURING_CONVERSION = """
from delivery_executor import _speedups

class Clears:
    def __init__(self, fds):
        self.fds = fds
    def __index__(self):
        self.fds.clear()  # frees this item, the others and the list's array
        return 1

class Two:
    def __index__(self):
        return 2

fds = []
fds.append(Clears(fds))
fds.extend(Two() for _ in range(1000))
for _ in range(20):
    try:
        _speedups.writeback(fds)
    except Exception:
        pass
    fds[:] = [Clears(fds), *(Two() for _ in range(1000))]
print("survived")
"""


@needs_c
def test_c_writeback_survives_a_list_emptied_by_an_items_index() -> None:
    """A list cleared by its first item's __index__ mid-conversion: no crash, no stale reads."""
    env = {**os.environ, "PYTHONMALLOC": "debug"}  # freed memory is poisoned: a stale read shows
    res = subprocess.run(
        [sys.executable, "-c", _MUTATED_DURING_CONVERSION],
        capture_output=True,
        text=True,
        env=env,
        timeout=50,
    )
    assert res.returncode == 0, (res.returncode, res.stderr[-2000:])
    assert res.stdout.strip() == "survived"


def _a_file(tmp_path: Path) -> int:
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"x" * 5000)
    return fd


def _inject(fd: int, path: str) -> None:
    raise OSError(errno.EIO, "injected", path)


@pytest.mark.parametrize("method", ["start_writeback", "wait_writeback"])
def test_an_override_on_the_instance_is_honoured(tmp_path: Path, method: str) -> None:
    """mock.patch.object(ops, "wait_writeback", fail) on an instance with a __dict__: it fails."""

    class Plain(FsOps):  # no __slots__, as tests/test_maildir.py's _OpenFiles
        pass

    ops = Plain()
    fd = _a_file(tmp_path)
    try:
        with (
            mock.patch.object(ops, method, _inject),
            pytest.raises(OSError, match="injected") as failed,
        ):
            ops.writeback((fd,), ("/m/tmp/f",))
    finally:
        os.close(fd)
    assert failed.value.errno == errno.EIO and failed.value.filename == "/m/tmp/f"


def test_an_override_of_the_one_syscall_wrapper_is_honoured(tmp_path: Path) -> None:
    """A subclass failing _sync_file_range (both per-file calls go through it) gets its EIO."""

    class FailingSyscall(FsOps):
        __slots__ = ()

        @staticmethod
        def _sync_file_range(fd: int, flags: int, path: str) -> None:
            raise OSError(errno.EIO, "injected", path)

    fd = _a_file(tmp_path)
    try:
        with pytest.raises(OSError, match="injected") as failed:
            FailingSyscall().writeback((fd,), ("/m/tmp/f",))
    finally:
        os.close(fd)
    assert failed.value.errno == errno.EIO and failed.value.filename == "/m/tmp/f"
