"""FsOps.writeback: one C call for the stock ops, the per-file calls for any override.

The C call (``_speedups.writeback``) makes every ``sync_file_range`` of a
batch with the GIL released once; the same errno and path as the per-file
path on a failure; hostile input cannot crash it; and a tracing or failing
override, wherever it is made, is never bypassed (the crash model and the
fault tests rely on it). Whether the writeback really leaves nothing dirty:
``tests/test_writeback_cache.py``.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest

from delivery_executor import _native, fsops
from delivery_executor.fsops import FsOps

from .helpers import spy_c_writeback

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not fsops.HAVE_WRITEBACK, reason="no sync_file_range here"),
]

speedups = _native.speedups
needs_c = pytest.mark.skipif(
    getattr(speedups, "writeback", None) is None, reason="C helpers off (DELIVERY_EXECUTOR_PURE)"
)


@contextmanager
def _dirty_files(tmp_path: Path, n: int) -> Iterator[tuple[list[int], list[str]]]:
    """``n`` files with 5,000 unsynced bytes each, open for writing; closed on the way out."""
    paths = [str(tmp_path / f"f{i}") for i in range(n)]
    fds: list[int] = []
    try:
        for p in paths:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o600)
            fds.append(fd)
            os.write(fd, b"x" * 5000)
        yield fds, paths
    finally:
        for fd in fds:
            os.close(fd)


def _refuse_c(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fsops, "_WRITEBACK_ALL", lambda fds: pytest.fail("took the C call"))


def _inject(fd: int, path: str) -> None:
    raise OSError(errno.EIO, "injected", path)


# -- the stock ops: one C call


@needs_c
def test_stock_ops_write_a_batch_back_in_one_c_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FsOps().writeback hands every fd to the C helper at once, and succeeds on real files."""
    calls = spy_c_writeback(monkeypatch)
    with _dirty_files(tmp_path, 3) as (fds, paths):
        FsOps().writeback(tuple(fds), tuple(paths))
    assert calls == [tuple(fds)]


@pytest.mark.parametrize("path", ["c", "python"])
def test_writeback_failures_name_their_file_with_the_errno(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """A bad fd fails with its own errno and path, in the C call as in the per-file fallback."""
    spy_c_writeback(monkeypatch, path)
    read_end, write_end = os.pipe()
    try:
        with _dirty_files(tmp_path, 1) as (fds, paths):
            with pytest.raises(OSError, match="Bad file descriptor") as bad:
                FsOps().writeback((fds[0], -1), (paths[0], "/m/tmp/closed"))
            assert bad.value.errno == errno.EBADF and bad.value.filename == "/m/tmp/closed"
            with pytest.raises(OSError, match="Illegal seek") as pipe:
                FsOps().writeback((write_end, fds[0]), ("/m/tmp/pipe", paths[0]))
            assert pipe.value.errno == errno.ESPIPE and pipe.value.filename == "/m/tmp/pipe"
            FsOps().writeback((), ())
    finally:
        os.close(read_end)
        os.close(write_end)


@needs_c
def test_c_writeback_refuses_what_is_not_a_list_of_fds() -> None:
    """Not a sequence, not an int, or out of an int's range: TypeError or OverflowError."""
    assert speedups is not None
    with pytest.raises(TypeError, match="sequence of ints"):
        speedups.writeback(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        speedups.writeback(["3"])  # type: ignore[list-item]
    for huge in (2**31, -(2**31) - 1, 2**70):
        with pytest.raises(OverflowError, match="out of range"):
            speedups.writeback([huge])
    assert speedups.writeback([]) is None


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


# -- overrides: the per-file calls, wherever the override is made


@pytest.mark.parametrize("override", ["start_writeback", "wait_writeback"])
def test_an_override_of_either_per_file_call_is_made_per_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, override: str
) -> None:
    """A subclass that traces one per-file call gets every call one by one, starts before waits."""
    _refuse_c(monkeypatch)
    seen: list[tuple[str, str]] = []

    class Tracing(FsOps):
        __slots__ = ()

    def traced(kind: str) -> Callable[[FsOps, int, str], None]:
        real = getattr(FsOps, kind)

        def call(self: FsOps, fd: int, path: str) -> None:
            seen.append((kind, path))
            real(self, fd, path)

        return call

    setattr(Tracing, override, traced(override))
    with _dirty_files(tmp_path, 2) as (fds, paths):
        Tracing().writeback(tuple(fds), tuple(paths))
    assert seen == [(override, p) for p in paths]


def test_a_patch_on_fsops_itself_is_honoured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """monkeypatch.setattr(FsOps, "wait_writeback", ...) reaches the stock ops too: no C call."""
    _refuse_c(monkeypatch)
    waited: list[str] = []
    real = FsOps.wait_writeback

    def traced(self: FsOps, fd: int, path: str) -> None:
        waited.append(path)
        real(self, fd, path)

    monkeypatch.setattr(FsOps, "wait_writeback", traced)
    with _dirty_files(tmp_path, 2) as (fds, paths):
        fsops.OS_OPS.writeback(tuple(fds), tuple(paths))
    assert waited == paths


@pytest.mark.parametrize("method", ["start_writeback", "wait_writeback"])
def test_an_override_on_the_instance_is_honoured(tmp_path: Path, method: str) -> None:
    """mock.patch.object(ops, "wait_writeback", fail) on an instance with a __dict__: it fails."""

    class Plain(FsOps):  # no __slots__, as tests/test_maildir.py's _OpenFiles
        pass

    ops = Plain()
    with (
        _dirty_files(tmp_path, 1) as (fds, _),
        mock.patch.object(ops, method, _inject),
        pytest.raises(OSError, match="injected") as failed,
    ):
        ops.writeback((fds[0],), ("/m/tmp/f",))
    assert failed.value.errno == errno.EIO and failed.value.filename == "/m/tmp/f"


def test_an_override_of_the_one_syscall_wrapper_is_honoured(tmp_path: Path) -> None:
    """A subclass failing _sync_file_range (both per-file calls go through it) gets its EIO."""

    class FailingSyscall(FsOps):
        __slots__ = ()

        @staticmethod
        def _sync_file_range(fd: int, flags: int, path: str) -> None:
            raise OSError(errno.EIO, "injected", path)

    with (
        _dirty_files(tmp_path, 1) as (fds, _),
        pytest.raises(OSError, match="injected") as failed,
    ):
        FailingSyscall().writeback((fds[0],), ("/m/tmp/f",))
    assert failed.value.errno == errno.EIO and failed.value.filename == "/m/tmp/f"
