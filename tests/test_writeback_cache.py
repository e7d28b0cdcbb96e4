"""The batch writeback really writes back: after it, no page of its files is dirty or in flight.

``cachestat(2)`` (Linux 6.5+) counts a file's dirty pages and pages under
writeback. After ``sync_file_range(WRITE)`` alone the data is in flight; only
the wait pass makes both counts zero. These tests run on ``tmp_path`` (skipped
where its file system keeps no such state, e.g. tmpfs) and need no root, so a
C ``writeback`` that skips the wait, or makes no call at all, fails here and
not only in the power-loss recordings.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

import pytest

from delivery_executor import Maildir, commit_batch, fsops
from delivery_executor.fsops import FsOps

from .helpers import spy_c_writeback

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not fsops.HAVE_WRITEBACK, reason="no sync_file_range here"),
]

_NR_CACHESTAT = 451  # the same number in every Linux syscall table that has it


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_uint64) for n in ("cache", "dirty", "writeback", "evicted", "recently_evicted")
    ]


_LIBC = ctypes.CDLL(None, use_errno=True)


def _unclean(path_or_fd: str | int) -> tuple[int, int]:
    """(dirty pages, pages under writeback) of a whole file."""
    fd = os.open(path_or_fd, os.O_RDONLY) if isinstance(path_or_fd, str) else path_or_fd
    try:
        rng, st = _Range(0, 0), _Stat()
        if _LIBC.syscall(_NR_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(st), 0) != 0:
            err = ctypes.get_errno()
            if err in (errno.ENOSYS, errno.EPERM):
                pytest.skip("no cachestat(2) here (Linux 6.5+)")
            raise OSError(err, os.strerror(err))
        return st.dirty, st.writeback
    finally:
        if isinstance(path_or_fd, str):
            os.close(fd)


def _needs_page_state(where: Path) -> None:
    """Skip unless a write leaves dirty pages there and fdatasync cleans them."""
    p = where / "calibrate"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"c" * 65536)
        dirty = _unclean(fd)[0]
        os.fdatasync(fd)
        if dirty == 0 or _unclean(fd) != (0, 0):
            pytest.skip(f"{where}'s file system keeps no dirty/writeback page state")
    finally:
        os.close(fd)
        p.unlink()


@pytest.fixture(params=["c", "python"])
def writeback_path(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, list[tuple[int, ...]]]:
    """Each test twice, on a tmp_path that keeps page state: ("c", the C calls' fds), with
    FsOps.writeback through its C call, and ("python", []) through the per-file calls."""
    _needs_page_state(tmp_path)
    return request.param, spy_c_writeback(monkeypatch, request.param)


def test_writeback_leaves_no_page_dirty_or_in_flight(
    tmp_path: Path, writeback_path: tuple[str, list[tuple[int, ...]]]
) -> None:
    """FsOps().writeback on 16 dirty 256 KiB files: every page clean and on the device after."""
    path, calls = writeback_path
    for trial in range(5):
        fds, paths = [], []
        try:
            for i in range(16):
                p = str(tmp_path / f"t{trial}f{i}")
                fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o600)
                fds.append(fd)
                paths.append(p)
                os.write(fd, os.urandom(256 << 10))
            assert any(_unclean(fd)[0] for fd in fds)  # there was something to write back
            FsOps().writeback(tuple(fds), tuple(paths))
            assert [_unclean(fd) for fd in fds] == [(0, 0)] * 16, f"trial {trial}"
        finally:
            for fd in fds:
                os.close(fd)
    assert [len(c) for c in calls] == ([16] * 5 if path == "c" else [])


def test_a_writeback_form_batch_returns_with_its_mail_written_back(
    tmp_path: Path, writeback_path: tuple[str, list[tuple[int, ...]]]
) -> None:
    """commit_batch, stock ops, writeback form: every delivered file clean when it returns."""
    path, calls = writeback_path
    boxes = [
        Maildir(str(m.path), m.dev, m.owner, ordered=True)  # as on ext4+journal or XFS
        for m in (Maildir.create(tmp_path / f"u{i}") for i in range(2))
    ]
    bodies = [[os.urandom(200 << 10) for _ in range(4)] for _ in boxes]
    results = commit_batch(list(zip(boxes, bodies, strict=True)))
    files: list[str] = []
    for box, res in zip(boxes, results, strict=True):
        assert isinstance(res, list), res
        files += [box.new_prefix + mid.name + box.info for mid in res]
    assert len(files) == 8
    assert [_unclean(f) for f in files] == [(0, 0)] * 8
    assert [len(c) for c in calls] == ([8] if path == "c" else [])
