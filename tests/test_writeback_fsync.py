"""The writeback form's one directory fsync, and the eager policy's backlog split.

Each test probes one way either could acknowledge mail that a power loss
loses, fail the wrong callers, hang or mis-batch: flagged mail, groups failing
mid-moves, name collisions, duplicate records, several file systems, a failed
or unopenable directory, the crash model's own rule, tiny ``max_batch``
values. (Written as an adversarial review; two of its tests caught bugs.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from delivery_executor import DeliveryExecutor, Maildir, ThreadWriter, commit_batch
from delivery_executor.store import names as md_mod
from delivery_executor.store import seen

from .crashcheck import Op, TraceOps, violations
from .helpers import mounted_tmpfs, until
from .test_executor import FakeWriter

pytestmark = pytest.mark.timeout(120)


def _ordered(md: Maildir) -> Maildir:
    """``md`` as if on an ext4 with a journal or XFS (the writeback form applies)."""
    return Maildir(str(md.path), md.dev, md.owner, ordered=True)


def _acked(ops: TraceOps, box: Maildir, ids: object) -> None:
    assert isinstance(ids, list), ids
    for mid in ids:
        ops.ack(box.new_prefix + mid.name + box.info)


def _fsyncs(ops: TraceOps) -> list[tuple[str, str]]:
    return [(op.kind, op.path) for op in ops.log if op.kind in ("fsync_dir", "syncfs")]


# --------------------------------------------------------------------------
# Store: what the one fsync covers


@pytest.mark.parametrize("flagged_last", [True, False])
def test_a_flagged_group_moved_last_gets_its_cur_fsynced(
    tmp_path: Path, flagged_last: bool
) -> None:
    """Flagged (cur/) and plain (new/) mail in one batch: the dir moved into last is fsynced."""
    plain = _ordered(Maildir.create(tmp_path / "a"))
    flagged = _ordered(Maildir.create(tmp_path / "b")).with_flags("FS")
    assert flagged.ordered
    boxes = [plain, flagged] if flagged_last else [flagged, plain]
    ops = TraceOps()
    for b in range(2):
        results = commit_batch(
            [(box, [f"batch {b} {i}\r\n".encode() * 20 for i in range(2)]) for box in boxes],
            ops=ops,
        )
        for box, res in zip(boxes, results, strict=True):
            _acked(ops, box, res)
    assert _fsyncs(ops) == [("fsync_dir", boxes[-1].new_prefix.rstrip("/"))] * 2
    assert boxes[-1].new_prefix.endswith("/cur/") is flagged_last
    assert violations(ops.log, ordered=True) == []


def test_a_group_failing_mid_moves_leaves_the_fsync_to_the_last_good_move(tmp_path: Path) -> None:
    """The last group's second move fails: its new/ (changed last) is fsynced; no mail lost."""
    boxes = [_ordered(Maildir.create(tmp_path / f"u{i}")) for i in range(3)]

    class FailSecondMoveIntoLast(TraceOps):
        __slots__ = ("moves",)

        def __init__(self) -> None:
            super().__init__()
            self.moves = 0

        def renameat2(self, src: str, dst: str) -> None:
            if dst.startswith(boxes[-1].new_prefix):
                self.moves += 1
                if self.moves == 2:
                    raise OSError(errno.ENOSPC, "no space", src, None, dst)
            super().renameat2(src, dst)

    ops = FailSecondMoveIntoLast()
    results = commit_batch([(b, [b"m1\r\n" * 10, b"m2\r\n" * 10]) for b in boxes], ops=ops)
    assert isinstance(results[2], OSError) and results[2].errno == errno.ENOSPC
    for box, res in zip(boxes[:2], results[:2], strict=True):
        _acked(ops, box, res)
    assert _fsyncs(ops) == [("fsync_dir", boxes[-1].new_prefix.rstrip("/"))]
    assert violations(ops.log, ordered=True) == []
    assert os.listdir(boxes[-1].tmp_prefix) == []  # the unmoved one was removed


def test_a_group_whose_first_move_fails_leaves_the_fsync_to_the_previous_dir(
    tmp_path: Path,
) -> None:
    """The last group moves nothing: the previous group's new/ is fsynced, not the failed one's."""
    boxes = [_ordered(Maildir.create(tmp_path / f"u{i}")) for i in range(2)]

    class FailMovesIntoLast(TraceOps):
        __slots__ = ()

        def renameat2(self, src: str, dst: str) -> None:
            if dst.startswith(boxes[-1].new_prefix):
                raise OSError(errno.EIO, "io", src, None, dst)
            super().renameat2(src, dst)

    ops = FailMovesIntoLast()
    results = commit_batch([(b, [b"x\r\n" * 9, b"y\r\n" * 9]) for b in boxes], ops=ops)
    assert isinstance(results[1], OSError)
    _acked(ops, boxes[0], results[0])
    assert _fsyncs(ops) == [("fsync_dir", boxes[0].new_prefix.rstrip("/"))]
    assert violations(ops.log, ordered=True) == []


def test_a_name_collision_in_new_with_and_without_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A re-named move: with records the batch ends in syncfs, without them in the dir fsync."""
    for keep_records in (False, True):
        box = _ordered(Maildir.create(tmp_path / f"r{keep_records}"))
        other = _ordered(Maildir.create(tmp_path / f"o{keep_records}"))
        if keep_records:
            os.mkdir(box.path / seen.SEEN_DIR)
        seen.forget(str(box.path))
        fresh = iter(["c1", "c2", "c3", "c4", "c5", "c6"]).__next__
        monkeypatch.setattr(md_mod, "unique_name", fresh)
        monkeypatch.setattr("delivery_executor.store.commit.unique_name", fresh)
        # c1 and c2 are taken in new/: the first message is moved under another name.
        (box.path / "new" / "c1,S=60,W=63").write_bytes(b"older")
        bodies = [b"Message-ID: <%d@x>\r\n\r\n" % i + b"b" * 40 for i in range(2)]
        ops = TraceOps()
        results = commit_batch(
            [(other, [b"o\r\n" * 9]), (box, bodies)], ops=ops, size_in_names=True
        )
        _acked(ops, other, results[0])
        _acked(ops, box, results[1])
        assert isinstance(results[1], list) and results[1][0].name != "c1,S=60,W=63"
        want = (
            [("syncfs", str(other.path))]
            if keep_records
            else [("fsync_dir", box.new_prefix.rstrip("/"))]
        )
        assert _fsyncs(ops)[-1:] == want, _fsyncs(ops)
        keys = [seen.message_key((memoryview(b),)) or "-" for b in bodies]
        found = [v for v in violations(ops.log, ordered=True) if not any(k in v for k in keys)]
        assert found == []
        monkeypatch.undo()


def test_records_in_one_maildir_make_only_its_file_system_syncfs(tmp_path: Path) -> None:
    """Records on the ext4 Maildir: syncfs there; the tmpfs Maildir keeps its own two syncfs."""
    with mounted_tmpfs("4m") as where:
        ext = _ordered(Maildir.create(tmp_path / "ext"))
        tmpfs_box = Maildir.create(where / "t")
        plain = _ordered(Maildir.create(tmp_path / "plain"))
        os.mkdir(ext.path / seen.SEEN_DIR)
        seen.forget(str(ext.path))
        assert ext.ordered and not tmpfs_box.ordered and ext.dev != tmpfs_box.dev
        ops = TraceOps()
        bodies = [b"Message-ID: <%d@y>\r\n\r\nz" % i for i in range(2)]
        results = commit_batch(
            [(plain, [b"p" * 30, b"q" * 30]), (ext, bodies), (tmpfs_box, [b"t1", b"t2"])], ops=ops
        )
        assert all(isinstance(r, list) for r in results), results
        syncs = _fsyncs(ops)
        assert [k for k, _ in syncs].count("fsync_dir") == 0
        assert [k for k, _ in syncs].count("syncfs") == 3  # ext: one (after moves); tmpfs: two


def test_an_fsync_dir_failure_fails_every_group_on_that_file_system_only(tmp_path: Path) -> None:
    """The dir fsync fails (EIO): both ext4 groups fail with it; the tmpfs group lands."""
    with mounted_tmpfs("4m") as where:
        boxes = [_ordered(Maildir.create(tmp_path / f"u{i}")) for i in range(2)]
        tbox = Maildir.create(where / "t")

        class FailFsync(TraceOps):
            __slots__ = ()

            def fsync_dir(self, path: str) -> None:
                if path.startswith(str(tmp_path)):
                    raise OSError(errno.EIO, "Input/output error", path)
                super().fsync_dir(path)

        ops = FailFsync()
        results = commit_batch(
            [
                (boxes[0], [b"a" * 9, b"b" * 9]),
                (tbox, [b"t" * 9, b"u" * 9]),
                (boxes[1], [b"c" * 9]),
            ],
            ops=ops,
        )
        assert isinstance(results[0], OSError) and results[0].errno == errno.EIO
        assert isinstance(results[2], OSError) and results[2].errno == errno.EIO
        assert results[0] is results[2]
        assert isinstance(results[1], list) and len(results[1]) == 2
        for b in boxes:
            assert os.listdir(b.tmp_prefix) == []


def test_a_maildir_gone_after_its_move_fails_only_its_own_group(tmp_path: Path) -> None:
    """The last Maildir is moved away right after its move: its neighbour must still land.

    commit_batch promises that a Maildir that is gone, unreadable or no longer
    a directory never fails its neighbours; the step-4 syncfs ran on an open
    file, but the new fsync opens the last new/ by path.
    """
    good, doomed = (_ordered(Maildir.create(tmp_path / n)) for n in ("good", "doomed"))

    class UserMovesMaildirAway(TraceOps):
        __slots__ = ()

        def renameat2(self, src: str, dst: str) -> None:
            super().renameat2(src, dst)
            if dst.startswith(doomed.new_prefix):
                os.rename(doomed.path, str(doomed.path) + ".old")

    ops = UserMovesMaildirAway()
    results = commit_batch([(good, [b"g1\r\n" * 9, b"g2\r\n" * 9]), (doomed, [b"d\r\n"])], ops=ops)
    assert isinstance(results[0], list), f"the healthy Maildir's callers failed: {results[0]!r}"


def _as_nobody(code: dict[str, str]) -> dict[str, object]:
    """Run commit_batch in a forked child with uid/gid 65534; return what it reported."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest, just the store
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            good = Maildir.create(code["good"])
            odd = Maildir.create(code["odd"])
            os.chmod(odd.new_prefix, 0o300)  # a drop box: mail can be moved in, not listed
            res = commit_batch([(good, [b"g1" * 20, b"g2" * 20]), (odd, [b"o" * 20])])
            out = {
                "ordered": good.ordered,
                "results": [
                    [m.name for m in x] if isinstance(x, list) else f"errno {x.errno}" for x in res
                ],
            }
            os.write(w, json.dumps(out).encode())
        except BaseException as exc:  # reported to the parent
            os.write(w, json.dumps({"crash": repr(exc)}).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)  # type: ignore[no-any-return]


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A world-writable directory on a loop-mounted ext4 with a journal (an ordered one)."""
    if os.geteuid() != 0 or shutil.which("mkfs.ext4") is None:
        pytest.skip("needs root and mkfs.ext4 for a loop mount")
    top = Path(tempfile.mkdtemp(prefix="h9-nobody-", dir="/tmp"))
    top.chmod(0o755)
    img, mnt = top / "fs.img", top / "mnt"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True, capture_output=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    try:
        mnt.chmod(0o777)
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        shutil.rmtree(top, ignore_errors=True)


def test_a_maildir_whose_new_is_not_readable_fails_only_its_own_group(world_dir: Path) -> None:
    """Not root, a Maildir whose new/ is 0300 (moves work, open fails): the neighbour lands.

    Deterministic: every batch that moves into that Maildir last fails every
    caller on the file system (their mail is in new/: retried, duplicated).
    """
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another uid")
    got = _as_nobody({"good": str(world_dir / "good"), "odd": str(world_dir / "odd")})
    assert "crash" not in got, got
    assert got["ordered"] is True
    results = got["results"]
    assert isinstance(results, list)
    assert isinstance(results[0], list), f"healthy Maildir's callers failed: {results[0]}"


# --------------------------------------------------------------------------
# The crash model's new rule


@pytest.mark.parametrize("last", ["fsync_dir", "syncfs"])
def test_the_model_does_not_let_one_file_systems_sync_cover_another(last: str) -> None:
    """A move on one file system is not made durable by a directory fsync or syncfs on another."""
    log = [
        Op("create", "/ext/u/tmp/m", dev=1),
        Op("write", "/ext/u/tmp/m", data=b"x", dev=1),
        Op("wait_writeback", "/ext/u/tmp/m", dev=1),
        Op("rename", "/ext/u/tmp/m", "/ext/u/new/m", dev=1),
        Op("create", "/tmpfs/t/tmp/n", dev=2),  # a later change elsewhere...
        Op("rename", "/tmpfs/t/tmp/n", "/tmpfs/t/new/n", dev=2),
        Op(last, "/tmpfs/t/new", dev=2),  # ...whose sync says nothing of /ext
        Op("ack", "/ext/u/new/m"),
    ]
    assert any("missing" in v for v in violations(log, ordered=True))
    same = [dataclasses.replace(op, dev=1) for op in log]  # one file system: covered
    assert violations(same, ordered=True) == []


def test_trace_ops_records_each_ops_file_system(tmp_path: Path) -> None:
    """Ops on a tmpfs and on the test's own file system carry different devs."""
    with mounted_tmpfs("4m") as t:
        boxes = [_ordered(Maildir.create(tmp_path / "u")), Maildir.create(t / "v")]
        ops = TraceOps()
        commit_batch([(b, [b"a\n", b"b\n"]) for b in boxes], ops=ops)
    devs = {op.path.split(os.sep)[-3]: op.dev for op in ops.log if op.kind == "rename"}
    assert devs == {"u": boxes[0].dev, "v": boxes[1].dev} and boxes[0].dev != boxes[1].dev


def test_the_models_rule_needs_the_fsynced_dir_changed_after_the_move() -> None:
    """An fsync of a directory whose last change came before the move does not cover the move."""
    log = [
        Op("create", "/a/tmp/m"),
        Op("write", "/a/tmp/m", data=b"x"),
        Op("wait_writeback", "/a/tmp/m"),
        Op("create", "/b/tmp/n"),
        Op("rename", "/b/tmp/n", "/b/new/n"),
        Op("rename", "/a/tmp/m", "/a/new/m"),
        Op("fsync_dir", "/b/new"),
        Op("ack", "/a/new/m"),
    ]
    assert any("acknowledged m missing" in v for v in violations(log, ordered=True))


# --------------------------------------------------------------------------
# Executor: the eager split


@pytest.mark.asyncio
@pytest.mark.parametrize(("max_batch", "flushes"), [(1, 2), (2, 3), (3, 2)])
async def test_a_small_max_batch_with_a_backlog_does_not_crash_the_collector(
    max_batch: int, flushes: int
) -> None:
    """max_batch x free slots < SPLIT_MIN, 16+ queued: all delivered, no ZeroDivisionError."""
    gate = threading.Event()
    writer = FakeWriter(gate=gate)
    async with DeliveryExecutor(
        writer=ThreadWriter(writer), max_batch=max_batch, max_concurrent_flushes=flushes
    ) as ex:
        rest = [asyncio.ensure_future(ex.deliver("p", b"%d" % i)) for i in range(20)]
        await asyncio.sleep(0)  # every caller admitted before the collector takes a batch
        gate.set()
        done = await asyncio.wait_for(asyncio.gather(*rest, return_exceptions=True), 10)
    errors = [r for r in done if isinstance(r, BaseException)]
    assert errors == [], errors[:1]
    assert all(n <= max_batch for n in writer.batch_sizes)


@pytest.mark.asyncio
@pytest.mark.parametrize("queued", [16, 17, 31, 33, 100])
async def test_the_split_respects_max_batch_and_delivers_everyone(queued: int) -> None:
    """Backlogs around the split's edges, max_batch 12, 4 slots: no batch over 12, all land."""
    gate = threading.Event()
    writer = FakeWriter(gate=gate)
    async with DeliveryExecutor(
        writer=ThreadWriter(writer), max_batch=12, max_concurrent_flushes=4
    ) as ex:
        first = asyncio.ensure_future(ex.deliver("p", b"first"))
        await until(lambda: writer.active == 1, "first write holds one slot")
        rest = [asyncio.ensure_future(ex.deliver("p", b"%d" % i)) for i in range(queued)]
        await until(lambda: ex.stats().queued + writer.active - 1 >= 1, "queued")
        await asyncio.sleep(0.02)
        gate.set()
        ids = await asyncio.wait_for(asyncio.gather(first, *rest), 10)
        stats = ex.stats()
    assert len(set(ids)) == queued + 1
    assert max(writer.batch_sizes) <= 12
    assert sum(writer.batch_sizes) == queued + 1
    assert stats.delivered == queued + 1 and stats.batches == len(writer.batch_sizes)


@pytest.mark.asyncio
async def test_aclose_with_a_split_backlog_delivers_every_accepted_request() -> None:
    """Close while two split batches are blocked and more is queued: all accepted mail lands."""
    gate = threading.Event()
    writer = FakeWriter(gate=gate)
    ex = DeliveryExecutor(writer=ThreadWriter(writer), max_batch=16, max_concurrent_flushes=3)
    async with ex:
        rest = [asyncio.ensure_future(ex.deliver("p", b"%d" % i)) for i in range(60)]
        await until(lambda: writer.active >= 2, "the backlog split")
        closing = asyncio.ensure_future(ex.aclose())
        await asyncio.sleep(0.02)
        gate.set()
        await asyncio.wait_for(closing, 10)
    ids = await asyncio.wait_for(asyncio.gather(*rest), 10)
    assert len(set(ids)) == 60
    assert max(writer.batch_sizes) <= 16
