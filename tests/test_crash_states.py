"""Crash-state enumeration: no acknowledged message lost, nothing partial, in any state."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from delivery_executor import Maildir, commit_batch
from delivery_executor.store import names as md_mod

from .crashcheck import TraceOps, violations


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
