"""Power loss on real ext4 and XFS: every crash state of a recorded device, checked for mail.

The device under the file system is recorded (``tests/powerloss.py``: a loop
device over a FUSE file that logs each write and cache flush). The store runs
its real code through an :class:`~delivery_executor.fsops.FsOps` that forces a
journal commit (an unrelated file's ``fsync``) after every write, writeback
wait and move, so that no step's metadata can wait for a later sync to be
committed. Each crash state (every flush, with all, none or some of the
writes since the one before) is mounted, its journal replayed, and checked:
every message acknowledged before that point is in ``new/``, and every file in
``new/`` is whole.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from delivery_executor import Maildir, commit_batch
from delivery_executor.fsops import FsOps, orders_writeback

from .helpers import mounted_tmpfs
from .powerloss import Recorder, Recording, cleanup, missing, mounted, recorder

pytestmark = pytest.mark.timeout(300)


class CommitEveryStep(FsOps):
    """The real calls, each write, writeback wait and move followed by a journal commit.

    ``but_moves_into``: no commit after a move into that directory (the
    store's own sync must then commit it).
    """

    __slots__ = ("_fd", "_n", "_skip", "calls")

    def __init__(self, forcer: Path, but_moves_into: Path | None = None) -> None:
        self._fd = os.open(forcer, os.O_WRONLY | os.O_CREAT, 0o600)
        self._n = 0
        self._skip = None if but_moves_into is None else str(but_moves_into)
        self.calls: list[str] = []

    def _commit(self) -> None:
        # A size change to fsync: ext4 and XFS commit their running transaction.
        self._n += 1
        os.pwrite(self._fd, b"x", self._n)
        os.fsync(self._fd)

    def write_all(self, fd: int, parts: Sequence[memoryview], path: str) -> None:
        super().write_all(fd, parts, path)
        self.calls.append("write")
        self._commit()

    def wait_writeback(self, fd: int, path: str) -> None:
        super().wait_writeback(fd, path)
        self.calls.append("wait_writeback")
        self._commit()

    def renameat2(self, src: str, dst: str) -> None:
        super().renameat2(src, dst)
        self.calls.append("rename")
        if os.path.dirname(dst) != self._skip:
            self._commit()

    def fsync_dir(self, path: str) -> None:
        super().fsync_dir(path)
        self.calls.append(f"fsync_dir {path}")

    def close_forcer(self) -> None:
        os.close(self._fd)


def _skip_unless(fs: str) -> None:
    why = missing(fs)
    if why is not None:
        pytest.skip(f"no recorded {fs} here: {why}")


def _check_states(
    recording: Recording, expected: dict[str, bytes], acked: dict[str, list[str]], tmp_path: Path
) -> tuple[int, list[str]]:
    """Mount every crash state; return how many, and what each got wrong."""
    problems: list[str] = []
    n = 0
    for name, end, writes in recording.states():
        n += 1
        must = [rel for label in recording.marks_before(end) for rel in acked.get(label, [])]
        with mounted(recording, writes, tmp_path) as where:
            for rel in must:
                if not (where / rel).exists():
                    problems.append(f"{name}: acknowledged {rel} missing")
            for new in where.glob("*/new"):
                for f in new.iterdir():
                    rel = str(f.relative_to(where))
                    if f.read_bytes() != expected.get(rel):
                        problems.append(f"{name}: {rel} has {f.stat().st_size} wrong bytes")
    return n, problems


@pytest.fixture
def recorded(request: pytest.FixtureRequest) -> Iterator[Recorder]:
    fs = request.param
    _skip_unless(fs)
    with recorder(fs) as rec:
        yield rec
    cleanup(rec)


@pytest.mark.parametrize("recorded", ["ext4", "xfs"], indirect=True)
@pytest.mark.parametrize("sync", ["auto", "syncfs", "fsync"])
def test_acknowledged_mail_survives_power_loss(
    recorded: Recorder, sync: str, tmp_path: Path
) -> None:
    """Two batches over two Maildirs, commits forced after every step: no crash state loses mail."""
    rec = recorded
    boxes = [Maildir.create(rec.root / f"u{i}") for i in range(2)]
    assert all(b.ordered for b in boxes)  # ext4 with a journal, XFS: auto's writeback form
    ops = CommitEveryStep(rec.root / "forcer")
    expected: dict[str, bytes] = {}
    acked: dict[str, list[str]] = {}
    for b in range(2):
        bodies = [
            [f"batch {b} box {j} message {i}\n".encode() * 30 for i in range(3)] for j in range(2)
        ]
        results = commit_batch(list(zip(boxes, bodies, strict=True)), sync=sync, ops=ops)  # type: ignore[arg-type]
        label = f"batch{b}"
        acked[label] = []
        for j, (res, sent) in enumerate(zip(results, bodies, strict=True)):
            assert isinstance(res, list), res
            for mid, body in zip(res, sent, strict=True):
                rel = f"u{j}/new/{mid.name}"
                expected[rel] = body
                acked[label].append(rel)
        rec.mark(label)
    ops.close_forcer()
    assert ("wait_writeback" in ops.calls) == (sync == "auto")
    recording = rec.stop()
    assert recording.marks_before(len(recording.log)) == ["batch0", "batch1"]
    n, problems = _check_states(recording, expected, acked, tmp_path)
    assert n > 20  # the forced commits gave many flush points to crash at
    assert problems == []


@pytest.mark.parametrize("recorded", ["ext4", "ext4-fast_commit", "xfs"], indirect=True)
def test_the_writeback_forms_one_fsync_commits_every_move(
    recorded: Recorder, tmp_path: Path
) -> None:
    """Moves into the last of three Maildirs left to the batch's own fsync: none lost, none torn."""
    rec = recorded
    boxes = [Maildir.create(rec.root / f"u{i}") for i in range(3)]
    ops = CommitEveryStep(rec.root / "forcer", but_moves_into=boxes[-1].path / "new")
    expected: dict[str, bytes] = {}
    acked: dict[str, list[str]] = {}
    for b in range(2):
        bodies = [
            [f"batch {b} box {j} message {i}\n".encode() * 40 for i in range(2)] for j in range(3)
        ]
        results = commit_batch(list(zip(boxes, bodies, strict=True)), ops=ops)
        acked[f"batch{b}"] = []
        for j, (res, sent) in enumerate(zip(results, bodies, strict=True)):
            assert isinstance(res, list), res
            for mid, body in zip(res, sent, strict=True):
                expected[f"u{j}/new/{mid.name}"] = body
                acked[f"batch{b}"].append(f"u{j}/new/{mid.name}")
        rec.mark(f"batch{b}")
    ops.close_forcer()
    n, problems = _check_states(rec.stop(), expected, acked, tmp_path)
    assert n > 20
    # Fsyncing u0/new/ instead loses moves into u2 on XFS (its log is forced up to
    # u0's last change); not on ext4, whose directory fsync commits everything.
    assert problems == []
    assert [c for c in ops.calls if c.startswith("fsync_dir")] == [
        f"fsync_dir {boxes[-1].new_prefix}"
    ] * 2


@pytest.mark.parametrize("recorded", ["ext4", "ext4-fast_commit", "xfs"], indirect=True)
def test_two_threads_committing_at_once_lose_nothing(recorded: Recorder, tmp_path: Path) -> None:
    """Two threads' writeback batches, their fsyncs overlapping, no forced commits: nothing lost."""
    rec = recorded
    expected: dict[str, bytes] = {}
    acked: dict[str, list[str]] = {}
    lock = threading.Lock()
    spans: dict[int, list[tuple[float, float]]] = {0: [], 1: []}
    start = threading.Barrier(2)

    def deliver(t: int) -> None:
        boxes = [Maildir.create(rec.root / f"t{t}u{i}") for i in range(2)]
        start.wait(30)
        for b in range(4):
            bodies = [
                [f"t{t} batch {b} box {j} msg {i}\n".encode() * 50 for i in range(3)]
                for j in range(2)
            ]
            began = time.monotonic()
            results = commit_batch(list(zip(boxes, bodies, strict=True)))
            spans[t].append((began, time.monotonic()))
            with lock:
                label = f"t{t}b{b}"
                acked[label] = []
                for j, (res, sent) in enumerate(zip(results, bodies, strict=True)):
                    assert isinstance(res, list), res
                    for mid, body in zip(res, sent, strict=True):
                        expected[f"t{t}u{j}/new/{mid.name}"] = body
                        acked[label].append(f"t{t}u{j}/new/{mid.name}")
                rec.mark(label)

    threads = [threading.Thread(target=deliver, args=(t,)) for t in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert len(acked) == 8  # both threads finished every batch
    assert any(a0 < b1 and b0 < a1 for a0, a1 in spans[0] for b0, b1 in spans[1])  # overlapped
    n, problems = _check_states(rec.stop(), expected, acked, tmp_path)
    assert n > 8
    assert problems == []


@pytest.mark.parametrize("recorded", ["ext4"], indirect=True)
def test_recording_catches_a_move_that_outruns_its_data(recorded: Recorder, tmp_path: Path) -> None:
    """Without a wait for the data, a commit holding the move leaves a torn file: caught."""
    rec = recorded
    box = Maildir.create(rec.root / "u0")
    ops = CommitEveryStep(rec.root / "forcer")
    expected: dict[str, bytes] = {}
    for i in range(3):  # write, close, move (a commit forced), no sync of the data first
        body = f"message {i}\n".encode() * 30
        tmp, rel = box.tmp_prefix + f"m{i}", f"u0/new/m{i}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, body)
        os.close(fd)
        ops.renameat2(tmp, str(rec.root / rel))
        expected[rel] = body
    ops.syncfs(str(rec.root))
    rec.mark("all")
    ops.close_forcer()
    recording = rec.stop()
    _, problems = _check_states(recording, expected, {"all": list(expected)}, tmp_path)
    assert any("wrong bytes" in p for p in problems)
    assert not any("missing" in p for p in problems)  # syncfs came before the mark


@contextlib.contextmanager
def _loop_mounted(tmp_path: Path, mkfs: list[str]) -> Iterator[Path]:
    img, where = tmp_path / "fs.img", tmp_path / "mnt"
    with open(img, "wb") as f:
        f.truncate(320 << 20)
    subprocess.run([*mkfs, str(img)], check=True, capture_output=True)
    where.mkdir()
    subprocess.run(["mount", "-o", "loop", str(img), str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)
        img.unlink()


@pytest.mark.parametrize(
    ("mkfs", "ordered"),
    [
        (["mkfs.ext4", "-q", "-F"], True),
        (["mkfs.ext4", "-q", "-F", "-O", "^has_journal"], False),
        (["mkfs.xfs", "-q", "-f"], True),
    ],
    ids=["ext4", "ext4-no-journal", "xfs"],
)
def test_orders_writeback_only_on_a_journal_that_orders_it(
    tmp_path: Path, mkfs: list[str], ordered: bool
) -> None:
    """ext4 with a journal and XFS take the writeback form; ext4 without a journal does not."""
    if os.geteuid() != 0 or shutil.which(mkfs[0]) is None:
        pytest.skip(f"loop mounts need root and {mkfs[0]}")
    with _loop_mounted(tmp_path, mkfs) as where:
        assert orders_writeback(str(where)) is ordered
        assert Maildir.create(where / "box").ordered is ordered


def test_tmpfs_and_a_missing_path_do_not_order_writeback(tmp_path: Path) -> None:
    """tmpfs has no journal, and a path that is not there gives False, not an error."""
    with mounted_tmpfs("1m") as where:
        assert orders_writeback(str(where)) is False
    assert orders_writeback(str(tmp_path / "absent")) is False
