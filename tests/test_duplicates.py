"""--duplicate-window: a Message-ID already in the mailbox is answered 250 and not stored again."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from delivery_executor import DeliveryExecutor, FsOps, MailboxResolver, Maildir, commit_batch
from delivery_executor.smtp import DeliveryHandler, SessionFactory
from delivery_executor.store import seen
from delivery_executor.testing import ServerProcess, SMTPClientError, send_message

from .crashcheck import TraceOps, violations
from .helpers import listening

pytestmark = pytest.mark.timeout(60)

MSG = b"From: a@example.net\r\nMessage-ID: <one@example.net>\r\nSubject: x\r\n\r\nbody\r\n"
OTHER = b"From: a@example.net\r\nMessage-ID: <two@example.net>\r\nSubject: y\r\n\r\nbody\r\n"
NO_ID = b"From: a@example.net\r\nSubject: none\r\n\r\nbody\r\n"


def files(root: Path, user: str) -> list[str]:
    """Names in ``new/`` and ``cur/`` of ``<root>/example.org/<user>``."""
    box = root / "example.org" / user
    return sorted(p.name for d in ("new", "cur") if (box / d).is_dir() for p in (box / d).iterdir())


# -- the records -------------------------------------------------------------


def test_message_key_is_the_message_id_whatever_the_line_ends_or_folding() -> None:
    """One key for CRLF/LF, header case and folding; none without a Message-ID; ids differ."""
    key = seen.message_key((MSG,))
    assert key is not None and len(key) == 32
    assert seen.message_key((MSG.replace(b"\r\n", b"\n"),)) == key
    assert (
        seen.message_key((b"Return-Path: <x>\n", b"message-id:\n  <one@example.net>\n\nb")) == key
    )
    assert seen.message_key((OTHER,)) != key
    assert seen.message_key((NO_ID,)) is None
    assert seen.message_key((b"Subject: x\n\nMessage-ID: <in-body@x>\n",)) is None
    assert seen.message_key((b"Message-ID:   \n\nbody",)) is None


@pytest.mark.parametrize("sync", ["fsync", "syncfs"])
def test_commit_writes_a_record_only_where_records_are_kept(tmp_path: Path, sync: str) -> None:
    """The commit records each Message-ID (naming its file) in a Maildir with a records dir."""
    kept, plain = Maildir.create(tmp_path / "kept"), Maildir.create(tmp_path / "plain")
    (kept.path / seen.SEEN_DIR).mkdir()
    seen.forget(str(kept.path))
    res = commit_batch([(kept, [MSG, NO_ID, OTHER]), (plain, [MSG])], sync=sync)  # type: ignore[arg-type]
    ids = res[0]
    assert isinstance(ids, list)
    records = sorted(os.listdir(kept.path / seen.SEEN_DIR))
    assert records == sorted(k for k in (seen.message_key((MSG,)), seen.message_key((OTHER,))) if k)
    assert seen.find(str(kept.path), seen.message_key((MSG,)) or "", 60) == ids[0].name
    assert seen.find(str(kept.path), seen.message_key((OTHER,)) or "", 60) == ids[2].name
    assert not (plain.path / seen.SEEN_DIR).exists()


@pytest.mark.parametrize("sync", ["fsync", "syncfs"])
def test_records_are_durable_in_the_messages_commit_and_precede_its_move(
    tmp_path: Path, sync: str
) -> None:
    """A record follows its message's data sync, precedes its move and the last sync; mail whole."""
    md = Maildir.create(tmp_path / "box")
    where = md.path / seen.SEEN_DIR
    where.mkdir()
    seen.forget(str(md.path))
    ops = TraceOps()
    (res,) = commit_batch([(md, [MSG, OTHER])], sync=sync, ops=ops)  # type: ignore[arg-type]
    assert isinstance(res, list)
    for mid in res:
        ops.ack(str(md.path / "new" / mid.name))
    # The checker models every rename as a message's: under syncfs a record may
    # be torn by a crash (renamed before its data is synced), which seen.find
    # rejects (at most a duplicate). Every other state keeps the mail whole.
    keys = [seen.message_key((m,)) or "" for m in (MSG, OTHER)]
    assert [p for p in violations(ops.log) if not any(k in p for k in keys)] == []
    log = ops.log
    first_ack = next(i for i, op in enumerate(log) if op.kind == "ack")
    for mid, key in zip(res, keys, strict=True):
        record = str(where / key)
        (put,) = [i for i, op in enumerate(log) if op.kind == "rename" and op.path2 == record]
        (moved,) = [i for i, op in enumerate(log) if op.path2.endswith("/new/" + mid.name)]
        data_synced = [
            i for i, op in enumerate(log)
            if op.kind == "syncfs" or (op.kind == "fdatasync" and op.path.endswith(mid.name))
        ]  # fmt: skip
        assert data_synced[0] < put < moved < first_ack
        (wrote,) = [op for op in log if op.kind == "write" and op.path == log[put].path]
        assert wrote.data == mid.name.encode() + b"\n"
        if sync == "syncfs":
            assert any(op.kind == "syncfs" for op in log[moved:first_ack])
        else:
            synced = [
                i for i, op in enumerate(log) if op.kind == "fdatasync" and op.path == log[put].path
            ]
            assert synced and synced[0] < put
            assert any(
                op.kind == "fsync_dir" and op.path == str(where) for op in log[put:first_ack]
            )


def test_a_record_naming_another_message_or_a_collision_never_suppresses(tmp_path: Path) -> None:
    """A record whose file holds another Message-ID is ignored; a name taken in new/ re-records."""
    md = Maildir.create(tmp_path / "box")
    (md.path / seen.SEEN_DIR).mkdir()
    seen.forget(str(md.path))
    (res,) = commit_batch([(md, [OTHER])])
    assert isinstance(res, list)
    key = seen.message_key((MSG,)) or ""
    (md.path / seen.SEEN_DIR / key).write_bytes(res[0].name.encode() + b"\n")
    assert seen.find(str(md.path), key, 60) is None  # names OTHER's file, not MSG's

    class TakenOnce(FsOps):
        """The first move into new/ finds its name taken, as a collision would."""

        __slots__ = ("taken",)

        def __init__(self) -> None:
            self.taken = False

        def rename_noreplace(self, src: str, dst: str) -> None:
            if not self.taken:
                self.taken = True
                raise FileExistsError(17, "taken", dst)
            super().rename_noreplace(src, dst)

    (moved,) = commit_batch([(md, [MSG])], ops=TakenOnce())
    assert isinstance(moved, list)
    assert seen.find(str(md.path), key, 60) == moved[0].name  # recorded again, under its name


def test_a_record_counts_only_while_its_file_is_there_and_young(tmp_path: Path) -> None:
    """Moved to cur/ with flags: found; deleted, corrupt, or past the window: not found; swept."""
    md = Maildir.create(tmp_path / "box")
    (md.path / seen.SEEN_DIR).mkdir()
    seen.forget(str(md.path))
    (res,) = commit_batch([(md, [MSG])])
    assert isinstance(res, list)
    name, key, box = res[0].name, seen.message_key((MSG,)) or "", str(md.path)
    os.rename(md.path / "new" / name, md.path / "cur" / f"{name}:2,S")
    assert seen.find(box, key, 60) == f"{name}:2,S"
    record = md.path / seen.SEEN_DIR / key
    old = time.time() - 120
    os.utime(record, (old, old))
    assert seen.find(box, key, 60) is None  # past the window
    assert seen.sweep(box, 60) == 1 and not record.exists()
    for garbage in (b"", b"../../etc/passwd\n", b"\xff\xfe\n", b"nonexistent-name\n"):
        record.write_bytes(garbage)
        assert seen.find(box, key, 60) is None, garbage
    record.write_bytes(name.encode() + b"\n")
    os.unlink(md.path / "cur" / f"{name}:2,S")  # the user deleted it: deliver it again
    assert seen.find(box, key, 60) is None


# -- through the handler -----------------------------------------------------


@contextlib.asynccontextmanager
async def server(root: Path, **handler_kwargs: Any) -> AsyncIterator[tuple[int, DeliveryHandler]]:
    """Our LMTP server on 127.0.0.1:<ephemeral> with ``handler_kwargs``."""
    loop = asyncio.get_running_loop()
    ex = DeliveryExecutor()
    handler = DeliveryHandler(ex, MailboxResolver(root), **handler_kwargs)
    factory = SessionFactory(handler, lmtp=True, max_connections=8, loop=loop)
    async with listening(factory, ex) as port:
        yield port, handler


async def send(port: int, rcpts: list[str], body: bytes) -> list[tuple[int, str]]:
    replies = await send_message(
        "127.0.0.1", port, mail_from="s@example.net", rcpts=rcpts, body=body
    )
    return [(r.code, r.text) for r in replies]


@pytest.mark.asyncio
async def test_a_resent_message_is_acknowledged_and_not_stored_again(tmp_path: Path) -> None:
    """Same Message-ID again: 250 'already delivered as <its name>', one file; others stored."""
    async with server(tmp_path, duplicate_window=60) as (port, handler):
        first = await send(port, ["a@example.org"], MSG)
        again = await send(port, ["a@example.org", "b@example.org"], MSG)
        other = await send(port, ["a@example.org"], OTHER)
        bare = [await send(port, ["a@example.org"], NO_ID) for _ in range(2)]
        assert handler.duplicates is not None and handler.duplicates.suppressed == 1
    (stored,) = [n for n in files(tmp_path, "a") if n in first[0][1]]
    assert again[0] == (250, f"2.0.0 <a@example.org> Ok: already delivered as {stored}")
    assert again[1][0] == 250 and "Ok: delivered as" in again[1][1]
    assert other[0][0] == 250 and all(r[0][0] == 250 for r in bare)
    assert len(files(tmp_path, "a")) == 4  # MSG once, OTHER, and NO_ID twice
    assert len(files(tmp_path, "b")) == 1


@pytest.mark.asyncio
async def test_off_by_default_and_a_lost_record_costs_a_duplicate_only(tmp_path: Path) -> None:
    """Window 0 stores every resend; with the window on, a corrupt record means one more copy."""
    async with server(tmp_path / "off") as (port, handler):
        for _ in range(2):
            assert (await send(port, ["a@example.org"], MSG))[0][0] == 250
        assert handler.duplicates is None
    assert len(files(tmp_path / "off", "a")) == 2
    assert not (tmp_path / "off" / "example.org" / "a" / seen.SEEN_DIR).exists()
    root = tmp_path / "on"
    async with server(root, duplicate_window=60) as (port, _):
        await send(port, ["a@example.org"], MSG)
        (record,) = (root / "example.org" / "a" / seen.SEEN_DIR).iterdir()
        record.write_bytes(b"\x00garbage")
        second = await send(port, ["a@example.org"], MSG)
        assert second[0][0] == 250 and "Ok: delivered as" in second[0][1]  # stored again
        third = await send(port, ["a@example.org"], MSG)
    assert len(files(root, "a")) == 2
    assert third[0][1].endswith("already delivered as " + second[0][1].rsplit(" ", 1)[1])


def test_duplicate_window_is_checked() -> None:
    """A negative, infinite or non-number window is refused up front."""
    for bad, exc in ((-1, ValueError), (float("inf"), ValueError), ("60", TypeError)):
        with pytest.raises(exc):
            DeliveryHandler(DeliveryExecutor(), MailboxResolver("/tmp"), duplicate_window=bad)  # type: ignore[arg-type]


# -- a crash between the commit and the reply --------------------------------


def test_sigkill_between_commit_and_reply_then_the_resend_is_suppressed(tmp_path: Path) -> None:
    """Killed after the commit, before its 250: the resend to a new serve gets 250, no copy."""
    root = tmp_path / "mail"
    with subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("dupchild.py")), str(root), "600"],
        stdout=subprocess.PIPE, text=True,
    ) as child:  # fmt: skip
        try:
            assert child.stdout is not None
            port = int(child.stdout.readline())
            with pytest.raises(SMTPClientError, match="connection closed"):
                asyncio.run(send(port, ["a@example.org"], MSG))
            assert child.wait(30) == -9  # SIGKILL, by its own hand, after the commit
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    (name,) = files(root, "a")  # committed, never acknowledged
    with ServerProcess(root, "--lmtp", "--duplicate-window", "600") as srv:
        replies = asyncio.run(send(srv.port, ["a@example.org"], MSG))
        assert srv.stop() == 0
    assert replies == [(250, f"2.0.0 <a@example.org> Ok: already delivered as {name}")]
    assert files(root, "a") == [name]
