"""Crash-state enumeration: no acknowledged message lost, nothing partial, in any state."""

from __future__ import annotations

import asyncio
import errno
import io
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from delivery_executor import LoopWriter, Maildir, commit_batch
from delivery_executor.store import StepDriver, commit_steps, run_sync_call, seen
from delivery_executor.store import names as md_mod
from delivery_executor.store.commit import Parts
from delivery_executor.writers import AnyGroup, BatchResult, write_batch
from delivery_executor.writers.base import open_maildirs
from delivery_executor.writers.process import decode_reply, encode_request, serve_batches

from .crashcheck import Op, TraceOps, violations

pytestmark = pytest.mark.timeout(120)


def run_batches(boxes: list[Maildir], batches: list[int], sync: str, ops: TraceOps) -> None:
    """Commit each batch (messages spread round-robin over ``boxes``), acking its ids."""
    for b, n in enumerate(batches):
        groups: dict[int, list[bytes]] = {}
        for i in range(n):
            groups.setdefault(i % len(boxes), []).append(f"batch {b} message {i}\r\n".encode())
        order = sorted(groups)
        results = commit_batch([(boxes[j], groups[j]) for j in order], sync=sync, ops=ops)  # type: ignore[arg-type]
        for j, res in zip(order, results, strict=True):
            assert isinstance(res, list)
            for mid in res:
                ops.ack(str(boxes[j].path / "new" / mid.name))


@pytest.mark.parametrize("sync", ["fsync", "syncfs", "auto"])
@pytest.mark.parametrize("mailboxes", [1, 2, 3])
@pytest.mark.parametrize("n", range(1, 9))
def test_store_protocol_survives_every_crash_state(
    tmp_path: Path, sync: str, mailboxes: int, n: int
) -> None:
    """Two batches of n messages over 1-3 Maildirs: no crash state loses or tears mail."""
    boxes = [Maildir.create(tmp_path / f"u{i}") for i in range(mailboxes)]
    ops = TraceOps()
    run_batches(boxes, [n, n], sync, ops)
    assert sum(op.kind == "ack" for op in ops.log) == 2 * n
    assert violations(ops.log) == []


def _ordered(md: Maildir) -> Maildir:
    """``md`` as if on an ext4 with a journal or XFS (the writeback form applies)."""
    return Maildir(str(md.path), md.dev, md.owner, ordered=True)


@pytest.mark.parametrize("mailboxes", [1, 3])
@pytest.mark.parametrize("n", [2, 5])
def test_writeback_form_survives_every_crash_state_on_an_ordered_journal(
    tmp_path: Path, mailboxes: int, n: int
) -> None:
    """auto on an ordered journal: write, wait for writeback, move, one fsync; nothing lost."""
    boxes = [_ordered(Maildir.create(tmp_path / f"u{i}")) for i in range(mailboxes)]
    ops = TraceOps()
    run_batches(boxes, [n, n], "auto", ops)
    kinds = [op.kind for op in ops.log]
    assert kinds.count("syncfs") == 0 and kinds.count("wait_writeback") == 2 * n
    # One directory fsync per batch: the new/ of the last Maildir given mail, changed last.
    last_new = str(boxes[min(n, mailboxes) - 1].path / "new")
    assert [op.path for op in ops.log if op.kind == "fsync_dir"] == [last_new, last_new]
    assert violations(ops.log, ordered=True) == []
    # The form leans on the journal's order: without it, a move may outlive its data.
    assert any("partial" in v for v in violations(ops.log))


def test_a_writeback_batch_that_wrote_duplicate_records_ends_with_syncfs(tmp_path: Path) -> None:
    """Records' data is never waited for: their batch ends with a syncfs, not a directory fsync."""
    box = _ordered(Maildir.create(tmp_path / "u"))
    os.mkdir(box.path / seen.SEEN_DIR)
    seen.forget(str(box.path))
    for with_id, want in ((True, ["syncfs"]), (False, ["fsync_dir"])):
        bodies = [
            (b"Message-ID: <%d@example.org>\r\n" % i if with_id else b"") + b"\r\nbody\r\n"
            for i in range(2)
        ]
        ops = TraceOps()
        commit_batch([(box, bodies)], ops=ops)
        kinds = [op.kind for op in ops.log]
        assert kinds.count("wait_writeback") == 2
        assert [k for k in kinds if k in ("syncfs", "fsync_dir")] == want
        # The checker takes every rename for a message's; a record may be torn
        # by a crash before the syncfs (seen.find rejects it: a duplicate at most).
        keys = [seen.message_key((memoryview(b),)) or "-" for b in bodies]
        assert [v for v in violations(ops.log, ordered=True) if not any(k in v for k in keys)] == []
    assert len(os.listdir(box.path / seen.SEEN_DIR)) == 2


def test_the_writeback_forms_fsync_must_be_of_the_directory_changed_last(tmp_path: Path) -> None:
    """An fsync of the first Maildir's new/ would leave later moves unsynced: the model sees it."""
    boxes = [_ordered(Maildir.create(tmp_path / f"u{i}")) for i in range(2)]
    ops = TraceOps()
    run_batches(boxes, [2, 2], "auto", ops)
    first_new = str(boxes[0].path / "new")
    wrong = [Op("fsync_dir", first_new) if op.kind == "fsync_dir" else op for op in ops.log]
    found = violations(wrong, ordered=True)
    assert found and all("acknowledged" in v and "missing" in v for v in found)
    assert violations(ops.log, ordered=True) == []


def test_writeback_form_waits_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past WRITEBACK_CHUNK files the batch waits for those first: few files open, none lost."""
    monkeypatch.setattr("delivery_executor.store.commit.WRITEBACK_CHUNK", 3)
    box = _ordered(Maildir.create(tmp_path / "u"))
    ops = TraceOps()
    run_batches([box], [7], "auto", ops)
    kinds = [op.kind for op in ops.log]
    first_wait = kinds.index("wait_writeback")
    assert kinds[:first_wait].count("create") == 3  # the first chunk, waited for before file 4
    assert kinds.count("wait_writeback") == 7 and kinds.count("fsync_dir") == 1
    assert violations(ops.log, ordered=True) == []
    assert len(os.listdir(box.path / "new")) == 7


def test_a_big_batch_takes_two_syncfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past WRITEBACK_MAX_BYTES on one file system, auto syncs twice instead of waiting."""
    monkeypatch.setattr("delivery_executor.store.commit.WRITEBACK_MAX_BYTES", 40)
    small, big = (_ordered(Maildir.create(tmp_path / u)) for u in ("small", "big"))
    for box, n, want in ((small, 2, 1), (big, 3, 2)):  # 2 x 19 bytes fit in 40, 3 x 19 do not
        ops = TraceOps()
        run_batches([box], [n], "auto", ops)
        kinds = [op.kind for op in ops.log]
        assert kinds.count("syncfs") == (0 if want == 1 else 2)
        assert kinds.count("fsync_dir") == (1 if want == 1 else 0)
        assert ("wait_writeback" in kinds) is (want == 1)
        assert violations(ops.log, ordered=True) == []


@pytest.mark.parametrize("sync", ["syncfs", "fsync"])
def test_explicit_sync_modes_ignore_the_writeback_form(tmp_path: Path, sync: str) -> None:
    """sync="syncfs" and "fsync" keep their own steps on an ordered journal too."""
    box = _ordered(Maildir.create(tmp_path / "u"))
    ops = TraceOps()
    run_batches([box], [4], sync, ops)
    kinds = [op.kind for op in ops.log]
    assert "wait_writeback" not in kinds
    assert kinds.count("syncfs") == (2 if sync == "syncfs" else 0)
    assert violations(ops.log) == []


def test_checker_rejects_the_original_batch_protocol(tmp_path: Path) -> None:
    """mailrs-maildir 1.2's batch (no file sync; fsync tmp/, rename, fsync new/) tears mail."""
    md = Maildir.create(tmp_path / "m")
    ops = TraceOps()
    names = [md_mod.unique_name() for _ in range(3)]
    for name in names:
        path = str(md.path / "tmp" / name)
        fd = ops.create(path)
        ops.write_all(fd, (memoryview(b"body of " + name.encode()),), path)
        ops.close(fd)
    ops.fsync_dir(str(md.path / "tmp"))
    for name in names:
        ops.rename(str(md.path / "tmp" / name), str(md.path / "new" / name))
    ops.fsync_dir(str(md.path / "new"))
    for name in names:
        ops.ack(str(md.path / "new" / name))
    problems = violations(ops.log)
    assert any("partial" in p for p in problems)
    # Even after its final fsync(new/), an acknowledged message may be empty.
    assert [p for p in problems if p.startswith(f"crash after op {len(ops.log)}:")] == [
        f"crash after op {len(ops.log)}: partial {n} in new/" for n in sorted(names)
    ]


def test_checker_rejects_fsync_then_rename_without_directory_fsync(tmp_path: Path) -> None:
    """qmail/Postfix-style 'fsync file, rename, no dir fsync' can lose an acked message."""
    md = Maildir.create(tmp_path / "m")
    ops = TraceOps()
    name = md_mod.unique_name()
    tmp = str(md.path / "tmp" / name)
    fd = ops.create(tmp)
    ops.write_all(fd, (memoryview(b"hello"),), tmp)
    ops.fdatasync(fd, tmp)
    ops.close(fd)
    ops.rename(tmp, str(md.path / "new" / name))
    ops.ack(str(md.path / "new" / name))
    assert (
        violations(ops.log)[-1]
        == f"crash after op {len(ops.log)}: acknowledged {name} missing from new/"
    )
    assert not any("partial" in p for p in violations(ops.log))


def test_a_failed_batch_leaves_no_state_with_partial_mail(tmp_path: Path) -> None:
    """A batch failing at its second sync is unacknowledged and never partial in any state."""
    md = Maildir.create(tmp_path / "m")

    class FailSecondSync(TraceOps):
        seen = 0

        def syncfs(self, path: str, fd: int = -1) -> None:
            self.seen += 1
            if self.seen == 2:
                raise OSError(5, "Input/output error", path)
            super().syncfs(path, fd)

    ops = FailSecondSync()
    (res,) = commit_batch([(md, [b"a", b"b", b"c"])], sync="syncfs", ops=ops)
    assert isinstance(res, OSError)
    assert not any(op.kind == "ack" for op in ops.log)
    assert violations(ops.log) == []
    assert len(os.listdir(md.path / "new")) == 3  # complete, unacknowledged: may duplicate


# -- first delivery into a brand-new Maildir (Maildir.create through the seam)


def _deliver_fresh(tmp_path: Path, sync: str, ops: TraceOps, n: int) -> list[str]:
    """Deliver n messages into brand-new Maildirs (and new parents) the way the executor does."""
    paths = [str(tmp_path / "new-domain" / "sub" / f"user{i}") for i in range(2)]
    groups = [(p, [(memoryview(b"first %d to %s\r\n" % (i, p.encode())),) for i in range(n)])
              for p in paths]  # fmt: skip
    results, _ = write_batch(groups, sync=sync, ops=ops)  # type: ignore[arg-type]
    for path, res in zip(paths, results, strict=True):
        assert isinstance(res, list)
        for mid in res:
            ops.ack(os.path.join(path, "new", mid.name))
    return paths


@pytest.mark.parametrize("sync", ["fsync", "syncfs", "auto"])
@pytest.mark.parametrize("n", [1, 2])
def test_first_delivery_into_a_brand_new_maildir_survives_every_crash_state(
    tmp_path: Path, sync: str, n: int
) -> None:
    """Every directory Maildir.create makes goes through FsOps and is durable before the ack."""
    ops = TraceOps()
    paths = _deliver_fresh(tmp_path, sync, ops, n)
    made = {op.path for op in ops.log if op.kind == "mkdir"}
    want = {str(tmp_path / "new-domain"), str(tmp_path / "new-domain" / "sub")}
    for p in paths:
        want |= {p, p + "/tmp", p + "/new", p + "/cur"}
    assert made == want  # the seam saw every directory made: the checker models them all
    assert violations(ops.log) == []


def test_checker_loses_mail_in_a_maildir_whose_parent_was_not_fsynced(tmp_path: Path) -> None:
    """Without fsyncing the parents of new directories, the first acked message may vanish."""
    ops = TraceOps()
    root = tmp_path / "fresh"
    for d in (root, root / "tmp", root / "new", root / "cur"):
        ops.mkdir(str(d))  # and no fsync of tmp_path or root
    (res,) = commit_batch([(Maildir.open(root), [b"hello"])], sync="fsync", ops=ops)
    assert isinstance(res, list)
    ops.ack(str(root / "new" / res[0].name))
    assert violations(ops.log)[-1] == (
        f"crash after op {len(ops.log)}: acknowledged {res[0].name} missing from new/"
    )


# -- the link + unlink fallback of rename_noreplace


class NoRenameat2Trace(TraceOps):
    """A file system without RENAME_NOREPLACE: the store falls back to link + unlink."""

    def renameat2(self, src: str, dst: str) -> None:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), src, None, dst)


@pytest.mark.parametrize("sync", ["fsync", "syncfs", "auto"])
@pytest.mark.parametrize("n", [1, 3])
def test_link_unlink_fallback_survives_every_crash_state(tmp_path: Path, sync: str, n: int) -> None:
    """Moving by link + unlink instead of renameat2 leaves no crash state losing or tearing mail."""
    boxes = [Maildir.create(tmp_path / f"u{i}") for i in range(2)]
    ops = NoRenameat2Trace()
    run_batches(boxes, [n, n], sync, ops)
    kinds = [op.kind for op in ops.log]
    assert kinds.count("link") == 2 * n and "rename" not in kinds
    assert violations(ops.log) == []


# -- the executor's own commit paths, not only commit_batch


def _groups(b: int, n: int, boxes: list[Path]) -> list[tuple[str, list[Parts]]]:
    groups: dict[str, list[Parts]] = {}
    for i in range(n):
        path = str(boxes[i % len(boxes)])
        groups.setdefault(path, []).append((memoryview(b"batch %d message %d\r\n" % (b, i)),))
    return list(groups.items())


def _ack(ops: TraceOps, groups: list[tuple[str, list[Parts]]], results: list[Any]) -> None:
    for (path, _), res in zip(groups, results, strict=True):
        assert isinstance(res, list), res
        for mid in res:
            ops.ack(os.path.join(path, "new", mid.name))


@pytest.mark.parametrize("sync", ["fsync", "syncfs", "auto"])
@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.asyncio
async def test_loop_writer_acommit_survives_every_crash_state(
    tmp_path: Path, sync: str, n: int
) -> None:
    """LoopWriter.acommit (the library's default path): no crash state loses or tears mail."""
    ops = TraceOps()
    writer = LoopWriter(sync, ops)  # type: ignore[arg-type]
    boxes = [tmp_path / f"u{i}" for i in range(3)]  # made by the first batch
    try:
        for b in range(2):
            groups = _groups(b, n, boxes)
            results, _ = await writer.acommit(groups)
            _ack(ops, groups, results)
    finally:
        await writer.aclose()
    assert sum(op.kind == "ack" for op in ops.log) == 2 * n
    assert violations(ops.log) == []


@pytest.mark.parametrize("sync", ["fsync", "syncfs", "auto"])
@pytest.mark.parametrize("n", [1, 4])
def test_helper_process_writer_survives_every_crash_state(
    tmp_path: Path, sync: str, n: int
) -> None:
    """The helper's loop (decode frame, write_batch, reply) traced in-process: no bad state."""
    ops = TraceOps()
    boxes = [tmp_path / f"u{i}" for i in range(2)]
    for b in range(2):
        groups = _groups(b, n, boxes)
        frame = b"".join(bytes(x) for x in encode_request(b + 1, groups))
        out = io.BytesIO()
        assert serve_batches(io.BytesIO(frame), out, sync, ops=ops) == 0  # type: ignore[arg-type]
        reply = out.getvalue()
        batch, (results, _) = decode_reply(reply[4:])
        assert batch == b + 1
        _ack(ops, groups, results)
    assert sum(op.kind == "ack" for op in ops.log) == 2 * n
    assert violations(ops.log) == []


class GatedTrace(TraceOps):
    """Syncs wait for ``gate``: a sync nobody awaits then lands after the acknowledgement."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def fdatasync(self, fd: int, path: str) -> None:
        self.gate.wait(10)
        super().fdatasync(fd, path)

    def fsync_dir(self, path: str) -> None:
        self.gate.wait(10)
        super().fsync_dir(path)

    def syncfs(self, path: str, fd: int = -1) -> None:
        self.gate.wait(10)
        super().syncfs(path, fd)


class ForgetfulWriter(LoopWriter):
    """LoopWriter with a bug: it starts each sync in a thread but never awaits it."""

    pending: list[asyncio.Future[OSError | None]]

    async def acommit(self, groups: Sequence[AnyGroup]) -> BatchResult:
        opened = open_maildirs(groups, lambda p: Maildir.cached(p, ops=self.ops))
        driver = StepDriver(commit_steps(opened.live, sync=self.sync, ops=self.ops))
        self.pending = []
        while (call := driver.next_call(None)) is not None:
            self.pending.append(self._threads.run(run_sync_call, self.ops, call))  # not awaited
        return opened.merge(driver.results), driver.syncs


@pytest.mark.parametrize("sync", ["fsync", "syncfs"])
@pytest.mark.asyncio
async def test_enumeration_catches_a_writer_that_does_not_await_its_syncs(
    tmp_path: Path, sync: str
) -> None:
    """A writer acknowledging before its syncs ran is flagged; the real one, same set-up, is not."""
    for cls, flagged in ((ForgetfulWriter, True), (LoopWriter, False)):
        ops = GatedTrace()
        writer = cls(sync, ops)  # type: ignore[arg-type]
        if not flagged:
            ops.gate.set()  # the real writer waits for its syncs: let them run
        groups = _groups(0, 3, [tmp_path / cls.__name__ / f"u{i}" for i in range(2)])
        for path, _ in groups:
            Maildir.create(path)
        results, _ = await writer.acommit(groups)
        _ack(ops, groups, results)
        ops.gate.set()
        await asyncio.gather(*getattr(writer, "pending", []))
        await writer.aclose()
        problems = violations(ops.log)
        assert bool(problems) == flagged, (cls.__name__, problems)
