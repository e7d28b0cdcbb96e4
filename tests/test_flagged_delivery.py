"""Deliveries with flags (``deliver(..., flags=...)``): straight into ``cur/<id>:2,<letters>``
in the batch's one commit, checked at the boundary, through every built-in writer."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from pathlib import Path

import pytest

from delivery_executor import DeliveryExecutor, LoopWriter, MailboxResolver, Maildir, ThreadWriter
from delivery_executor.quota import QuotaDeliverer
from delivery_executor.sieve.hook import SieveFilter
from delivery_executor.smtp import DeliveryHandler, SessionFactory
from delivery_executor.store import check_info_letters
from delivery_executor.testing import send_message
from delivery_executor.writers import BatchResult, Group
from delivery_executor.writers.base import group_info
from delivery_executor.writers.process import decode_request, encode_request

from .helpers import RecordingOps, files_in, listening

pytestmark = pytest.mark.timeout(30)


def renames(ops: RecordingOps) -> list[tuple[str, ...]]:
    """The recorded renames (renameat2 and plain) as (op, src, dst)."""
    return [c for c in ops.calls if c[0] == "rename"]


@pytest.mark.asyncio
async def test_flagged_delivery_is_one_rename_into_cur_never_new(tmp_path: Path) -> None:
    """flags="SFS" lands as cur/<id>:2,FS with its bytes; new/ stays empty; one rename;
    cur/ is the directory synced."""
    ops = RecordingOps()
    md = tmp_path / "m"
    async with DeliveryExecutor(writer=LoopWriter(sync="fsync", ops=ops)) as ex:
        mid = await ex.deliver(md, b"hello\n", flags="SFS")
    assert files_in(md / "new") == []
    assert files_in(md / "cur") == [f"{mid}:2,FS"]
    assert (md / "cur" / f"{mid}:2,FS").read_bytes() == b"hello\n"
    (move,) = renames(ops)
    assert move[1].startswith(str(md / "tmp")) and move[2] == str(md / "cur" / f"{mid}:2,FS")
    assert ("fsync_dir", str(md / "cur") + "/") in ops.calls
    assert not any(c[0] == "fsync_dir" and c[1].startswith(str(md / "new")) for c in ops.calls)


@pytest.mark.asyncio
async def test_mixed_batch_is_one_commit_with_one_rename_per_message(tmp_path: Path) -> None:
    """Flagged + unflagged in INBOX + a flagged folder copy: one batch, three renames, each
    to its place; the syncs are one per directory touched (fsync form)."""
    ops = RecordingOps()
    inbox, folder = tmp_path / "m", tmp_path / "m" / ".Junk"
    Maildir.create(inbox)
    Maildir.create(folder)
    ex = DeliveryExecutor(
        max_batch=3, max_wait=5, policy="window", writer=LoopWriter(sync="fsync", ops=ops)
    )
    async with ex:
        a, b, c = await asyncio.gather(
            ex.deliver(inbox, b"flagged\n", flags="S"),
            ex.deliver(inbox, b"plain\n"),
            ex.deliver(folder, b"junk\n", flags="aS"),
        )
        stats = ex.stats()
    assert stats.batches == 1 and stats.batch_sizes == {3: 1}
    assert files_in(inbox / "cur") == [f"{a}:2,S"]
    assert files_in(inbox / "new") == [str(b)]
    assert files_in(folder / "cur") == [f"{c}:2,Sa"] and files_in(folder / "new") == []
    assert (folder / "cur" / f"{c}:2,Sa").read_bytes() == b"junk\n"
    assert len(renames(ops)) == 3
    dirs = sorted(c[1] for c in ops.calls if c[0] == "fsync_dir")
    assert dirs == sorted([f"{inbox}/cur/", f"{inbox}/new/", f"{folder}/cur/"])


@pytest.mark.asyncio
async def test_bad_flags_are_refused_at_the_boundary_and_poison_nothing(tmp_path: Path) -> None:
    """Bad letters raise ValueError (a non-str TypeError) before queueing; the good
    deliveries of the same moment all land, and nothing of the refused ones is on disk."""
    md = tmp_path / "m"
    async with DeliveryExecutor(max_batch=8, max_wait=0.2, policy="window") as ex:
        good = [asyncio.ensure_future(ex.deliver(md, b"ok %d\n" % i)) for i in range(3)]
        for bad in ("S:", "X", "s f", "S,", "\\Seen", "1"):
            with pytest.raises(ValueError, match="flags"):
                await ex.deliver(md, b"bad\n", flags=bad)
        with pytest.raises(TypeError):
            await ex.deliver(md, b"bad\n", flags=3)  # type: ignore[arg-type]
        flagged = await ex.deliver(md, b"fine\n", flags="T")
        ids = await asyncio.gather(*good)
    assert files_in(md / "new") == sorted(str(i) for i in ids)
    assert files_in(md / "cur") == [f"{flagged}:2,T"]
    assert files_in(md / "tmp") == []


def test_check_info_letters_normalises_and_refuses() -> None:
    """Any order and repeats give sorted unique letters; only DFPRST and a-z pass."""
    assert check_info_letters("zSaFSz") == "FSaz"
    assert check_info_letters("") == ""
    for bad in ("A", "S ", "é", "S\0"):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            check_info_letters(bad)


@pytest.mark.asyncio
async def test_a_writer_without_stores_flags_refuses_flags_before_queueing(tmp_path: Path) -> None:
    """A custom blocking writer never sees a 3-item group: flags raise ValueError at deliver."""
    seen: list[Sequence[Group]] = []

    def write(groups: Sequence[Group]) -> BatchResult:
        seen.append(groups)
        return [[] for _ in groups], 0

    async with DeliveryExecutor(writer=ThreadWriter(write)) as ex:
        assert not ex.stores_flags
        with pytest.raises(ValueError, match="does not store flags"):
            await ex.deliver(tmp_path / "m", b"x\n", flags="S")
    assert seen == []


@pytest.mark.asyncio
async def test_process_writer_delivers_flagged_groups_into_cur(tmp_path: Path) -> None:
    """Through the helper process: the flags cross the pipe and the message lands in cur/."""
    md = tmp_path / "m"
    async with DeliveryExecutor(writer="process") as ex:
        assert ex.stores_flags
        a, b = await asyncio.gather(ex.deliver(md, b"one\n", flags="RS"), ex.deliver(md, b"two\n"))
    assert files_in(md / "cur") == [f"{a}:2,RS"] and files_in(md / "new") == [str(b)]
    frame = encode_request(1, [("/p", [(memoryview(b"x"),)], "S"), ("/q", [(memoryview(b"y"),)])])
    _, groups = decode_request(b"".join(bytes(p) for p in frame)[4:])
    assert [(g[0], group_info(g)) for g in groups] == [("/p", "S"), ("/q", "")]
    assert [len(g) for g in groups] == [3, 2]


def test_deliver_sync_takes_flags(tmp_path: Path) -> None:
    """The thread API takes the same keyword."""
    md = tmp_path / "m"
    with DeliveryExecutor() as ex:
        mid = ex.deliver_sync(md, b"x\n", flags="D", timeout=10)
    assert files_in(md / "cur") == [f"{mid}:2,D"]


@pytest.mark.asyncio
async def test_quota_deliverer_passes_flags_on(tmp_path: Path) -> None:
    """QuotaDeliverer says stores_flags as its inner executor does and passes the flags on."""
    md = tmp_path / "m"
    async with DeliveryExecutor() as ex:
        q = QuotaDeliverer(ex, lambda _m: None)
        assert q.stores_flags
        mid = await q.deliver(str(md), b"x\n", flags="F")
    assert files_in(md / "cur") == [f"{mid}:2,F"]


@pytest.mark.asyncio
async def test_sieve_flags_are_committed_into_cur_by_the_handler(tmp_path: Path) -> None:
    """LMTP + a flagging script: the executor's one rename puts the copy in cur/ (no
    detour through new/), with the reply naming it with its flags."""
    root = tmp_path / "mail"
    bob = root / "example.org" / "bob"
    Maildir.create(bob)
    (bob / ".dovecot.sieve").write_text('require "imap4flags";\naddflag "\\\\Flagged";\n')
    ops = RecordingOps()
    ex = DeliveryExecutor(writer=LoopWriter(ops=ops))
    handler = DeliveryHandler(ex, MailboxResolver(root), sieve=SieveFilter())
    factory = SessionFactory(handler, lmtp=True, max_connections=4, loop=asyncio.get_running_loop())
    async with listening(factory, ex) as port:
        (reply,) = await send_message(
            "127.0.0.1",
            port,
            mail_from="s@example.net",
            rcpts=["bob@example.org"],
            body=b"Subject: hi\r\n\r\nx\r\n",
        )
    assert reply.code == 250, reply
    (name,) = files_in(bob / "cur")
    assert name.endswith(":2,F") and name in reply.text
    assert files_in(bob / "new") == []
    (move,) = renames(ops)
    assert move[2] == str(bob / "cur" / name)
