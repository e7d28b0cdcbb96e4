"""The store under hostile conditions: name collisions, short writes, host names, stale caches."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from delivery_executor import DeliveryExecutor, Maildir, commit_batch
from delivery_executor import fsops as fsops_mod
from delivery_executor.executor import WriterName
from delivery_executor.fsops import OS_OPS, FsOps
from delivery_executor.store import commit as commit_mod
from delivery_executor.store import names as names_mod
from delivery_executor.writers import write_batch

from .helpers import RecordingOps, files_in

pytestmark = pytest.mark.timeout(60)


class NoRenameat2(RecordingOps):
    """A file system without RENAME_NOREPLACE: renameat2 fails with EINVAL."""

    def renameat2(self, src: str, dst: str) -> None:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), src, None, dst)


def _names(monkeypatch: pytest.MonkeyPatch, first: Sequence[str]) -> list[str]:
    """Make the store's name generator return ``first``, then fresh names; returns all given."""
    real = names_mod.unique_name
    queue = list(first)
    given: list[str] = []

    def fake() -> str:
        name = queue.pop(0) if queue else real()
        given.append(name)
        return name

    monkeypatch.setattr(commit_mod, "unique_name", fake)
    return given


# -- never replace an acknowledged message


@pytest.mark.parametrize("sync", ["fsync", "syncfs", "auto"])
@pytest.mark.parametrize("fallback", [False, True], ids=["renameat2", "link-unlink"])
def test_a_name_collision_in_new_never_replaces_a_delivered_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sync: str, fallback: bool
) -> None:
    """A new message whose name is already in new/ lands under another; the old one is intact."""
    md = Maildir.create(tmp_path / "m")
    (old,) = md.deliver_batch([b"the acknowledged message\r\n"])
    taken = old.name  # size_in_names is off below, so names are the bare unique part
    given = _names(monkeypatch, [taken])
    ops: RecordingOps = NoRenameat2() if fallback else RecordingOps()
    (res,) = commit_batch(
        [(md, [b"a later message\r\n", b"and another\r\n"])],
        sync=sync,  # type: ignore[arg-type]
        ops=ops,
        size_in_names=False,
    )
    assert isinstance(res, list)
    assert taken not in [mid.name for mid in res]
    assert given[0] == taken  # the collision really was attempted
    assert (md.path / "new" / taken).read_bytes() == b"the acknowledged message\r\n"
    assert [(md.path / "new" / mid.name).read_bytes() for mid in res] == [
        b"a later message\r\n",
        b"and another\r\n",
    ]
    assert len(files_in(md.path / "new")) == 3
    assert files_in(md.path / "tmp") == []
    kinds = [c[0] for c in ops.calls]
    assert ("link" in kinds) == fallback


def test_rename_noreplace_refuses_an_existing_name_with_both_paths(tmp_path: Path) -> None:
    """rename_noreplace onto an existing file: FileExistsError naming both; nothing moved."""
    for ops in (OS_OPS, NoRenameat2()):
        src, dst = tmp_path / "src", tmp_path / "dst"
        src.write_bytes(b"new")
        dst.write_bytes(b"old")
        with pytest.raises(FileExistsError) as ei:
            ops.rename_noreplace(str(src), str(dst))
        assert (ei.value.errno, ei.value.filename, ei.value.filename2) == (
            errno.EEXIST,
            str(src),
            str(dst),
        )
        assert (src.read_bytes(), dst.read_bytes()) == (b"new", b"old")
        dst.unlink()
        ops.rename_noreplace(str(src), str(dst))
        assert dst.read_bytes() == b"new" and not src.exists()


def test_a_renamed_message_keeps_its_size_suffix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A move into new/ retried under a new name after a collision keeps ',S=<n>,W=<n>'."""
    md = Maildir.create(tmp_path / "m")
    body = b"line\nline\n"
    (old,) = md.deliver_batch([body])
    base, sep, suffix = old.name.partition(",")
    assert sep and suffix == "S=10,W=12"
    given = _names(monkeypatch, [base])
    (res,) = commit_batch([(md, [body])])
    assert isinstance(res, list)
    (mid,) = res
    assert given[0] == base and mid.name != old.name  # it really collided in new/
    assert mid.name.endswith(",S=10,W=12")
    assert (md.path / "new" / mid.name).read_bytes() == body
    assert (md.path / "new" / old.name).read_bytes() == body
    assert files_in(md.path / "tmp") == []


# -- syncfs: the kernel's answer is the batch's answer


@pytest.fixture
def failing_syncfs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """libc's syncfs replaced by one that fails as the kernel does: -1 with errno EIO."""
    if not fsops_mod.HAVE_SYNCFS:
        pytest.skip("no syncfs here")
    calls: list[int] = []

    def syncfs(fd: int) -> int:
        calls.append(fd)
        ctypes.set_errno(errno.EIO)
        return -1

    monkeypatch.setattr(fsops_mod, "_SYNCFS", syncfs)
    return calls


def test_a_failed_syncfs_fails_the_batch_not_acknowledged(
    tmp_path: Path, failing_syncfs: list[int]
) -> None:
    """syncfs returning -1/EIO fails every group on that file system; nothing is in new/."""
    a, b = Maildir.create(tmp_path / "a"), Maildir.create(tmp_path / "b")
    ra, rb = commit_batch([(a, [b"1", b"2"]), (b, [b"3"])], sync="syncfs")
    for res, md in ((ra, a), (rb, b)):
        assert isinstance(res, OSError) and res.errno == errno.EIO, res
        assert files_in(md.path / "new") == [] and files_in(md.path / "tmp") == []
    assert len(failing_syncfs) == 1  # a sync error is final: never retried
    with pytest.raises(OSError, match="Input/output error") as ei:
        OS_OPS.syncfs(str(tmp_path))
    assert (ei.value.errno, ei.value.filename) == (errno.EIO, str(tmp_path))


@pytest.mark.parametrize("writer", ["loop", "thread"])
@pytest.mark.asyncio
async def test_a_failed_syncfs_reaches_every_caller_of_the_batch(
    tmp_path: Path, failing_syncfs: list[int], writer: WriterName
) -> None:
    """Under the executor (sync='auto', 3 callers batched), syncfs -1/EIO fails each caller."""
    async with DeliveryExecutor(writer=writer) as ex:
        res = await asyncio.gather(
            *(ex.deliver(tmp_path / f"u{i % 2}", b"m%d" % i) for i in range(3)),
            return_exceptions=True,
        )
    assert failing_syncfs
    assert all(isinstance(r, OSError) and r.errno == errno.EIO for r in res), res
    assert files_in(tmp_path / "u0" / "new") == files_in(tmp_path / "u1" / "new") == []


# -- the host part of names: a ',' would start the sizes


def test_a_comma_in_the_host_name_is_escaped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Host 'mx,S=1,W=1' is written as 'mx\\054S=1...': the sizes and host_of() still parse."""
    host = names_mod.sanitize_host("mx,S=1,W=1")
    assert host == "mx\\054S=1\\054W=1"
    assert names_mod.sanitize_host("a,b") != names_mod.sanitize_host("a")
    monkeypatch.setattr(names_mod, "_HOST", host)
    md = Maildir.create(tmp_path / "m")
    mid = md.deliver(b"12345")
    assert mid.name.count(",") == 2 and mid.name.endswith(",S=5,W=5")
    assert int(mid.name.partition(",S=")[2].partition(",")[0]) == 5
    assert names_mod.host_of(mid.name) == host == names_mod.this_host()
    assert (md.path / "new" / mid.name).read_bytes() == b"12345"


# -- O_EXCL: a tmp file of another delivery is never opened


def test_create_never_opens_an_existing_file(tmp_path: Path) -> None:
    """FsOps.create on an existing path raises FileExistsError and leaves the file alone."""
    p = tmp_path / "x"
    p.write_bytes(b"someone else's")
    with pytest.raises(FileExistsError):
        OS_OPS.create(str(p))
    assert p.read_bytes() == b"someone else's"


def test_a_name_taken_in_tmp_is_skipped_not_overwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another delivery's tmp file under our next name stays as it was; ours goes elsewhere."""
    md = Maildir.create(tmp_path / "m")
    (md.path / "tmp" / "busy").write_bytes(b"another delivery in progress, longer than ours")
    given = _names(monkeypatch, ["busy"])
    (res,) = commit_batch([(md, [b"ours"])], size_in_names=False)
    assert isinstance(res, list) and res[0].name != "busy"
    assert given[0] == "busy"
    assert (
        md.path / "tmp" / "busy"
    ).read_bytes() == b"another delivery in progress, longer than ours"
    assert (md.path / "new" / res[0].name).read_bytes() == b"ours"
    assert files_in(md.path / "new") == [res[0].name]


# -- the host part of names


def test_names_carry_this_hosts_name(tmp_path: Path) -> None:
    """A delivered name ends in '.' + the sanitized host name, before the size suffix."""
    md = Maildir.create(tmp_path / "m")
    mid = md.deliver(b"x")
    host = names_mod.sanitize_host(socket.gethostname())
    assert mid.name.partition(",")[0].endswith("." + host)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root")
def test_names_follow_the_host_name_they_run_under() -> None:
    """Under another host name (own UTS namespace) names carry it, '/' and ':' escaped."""
    code = (
        "import socket; socket.sethostname('de-test/host:1');"
        "from delivery_executor.store.names import unique_name; print(unique_name())"
    )
    out = subprocess.run(
        ["unshare", "--uts", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()
    assert out.endswith(".de-test\\057host\\0721"), out


# -- short writes are retried


@pytest.fixture
def short_writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """os.write/os.writev write at most 7 bytes per call on the files the store creates."""
    ours: set[int] = set()
    calls: list[int] = []
    real_create, real_write, real_writev = FsOps.create, os.write, os.writev

    def create(self: FsOps, path: str) -> int:
        fd = real_create(self, path)
        ours.add(fd)
        return fd

    def write(fd: int, data: bytes) -> int:
        if fd in ours:
            calls.append(fd)
            return real_write(fd, memoryview(data)[:7])
        return real_write(fd, data)

    def writev(fd: int, buffers: Sequence[bytes]) -> int:
        if fd in ours:
            calls.append(fd)
            return real_write(fd, memoryview(buffers[0])[:7])
        return real_writev(fd, buffers)

    monkeypatch.setattr(FsOps, "create", create)
    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "writev", writev)
    return calls


@pytest.mark.parametrize("sync", ["fsync", "syncfs"])
def test_short_writes_are_continued_until_every_byte_is_written(
    tmp_path: Path, short_writes: list[int], sync: str
) -> None:
    """With 7-byte writes, one-part and two-part messages still land byte for byte."""
    md = Maildir.create(tmp_path / "m")
    head, body = b"Delivered-To: a@b\r\n", b"From: x\r\n\r\n" + bytes(range(256)) * 4
    (res,) = commit_batch([(md, [body, (head, body), (b"", head)])], sync=sync)  # type: ignore[arg-type]
    assert isinstance(res, list)
    assert [(md.path / "new" / m.name).read_bytes() for m in res] == [body, head + body, head]
    assert len(short_writes) >= (len(body) + len(head + body) + len(head)) // 7


# -- a Maildir removed or replaced at run time is created again


@pytest.mark.parametrize("writer", ["loop", "thread", "process"])
@pytest.mark.asyncio
async def test_a_maildir_removed_or_replaced_is_recreated_on_the_next_delivery(
    tmp_path: Path, writer: WriterName
) -> None:
    """After ENOENT (removed) or ENOTDIR (now a file) the cached Maildir is dropped and rebuilt."""
    box = tmp_path / "box"
    async with DeliveryExecutor(writer=writer) as ex:
        await ex.deliver(box, b"first")
        shutil.rmtree(box)
        with pytest.raises(FileNotFoundError):
            await ex.deliver(box, b"lost: the Maildir is gone")
        again = await ex.deliver(box, b"second")
        assert (box / "new" / again.name).read_bytes() == b"second"
        shutil.rmtree(box)
        box.write_bytes(b"")
        with pytest.raises(NotADirectoryError):
            await ex.deliver(box, b"refused: the path is a file")
        box.unlink()
        third = await ex.deliver(box, b"third")
    assert files_in(box / "new") == [third.name]
    assert (box / "new" / third.name).read_bytes() == b"third"


def test_write_batch_forgets_a_cached_maildir_that_failed_enoent(tmp_path: Path) -> None:
    """write_batch drops a path from the Maildir cache when its group fails with ENOENT."""
    path = str(tmp_path / "box")
    write_batch([(path, [(memoryview(b"x"),)])])
    assert Maildir.peek_cached(path) is not None
    shutil.rmtree(path)
    ([err], _) = write_batch([(path, [(memoryview(b"y"),)])])
    assert isinstance(err, FileNotFoundError)
    assert Maildir.peek_cached(path) is None
    ([ids], _) = write_batch([(path, [(memoryview(b"z"),)])])
    assert isinstance(ids, list)
    assert (Path(path) / "new" / ids[0].name).read_bytes() == b"z"


@pytest.mark.parametrize("sync", ["auto", "syncfs", "fsync"])
def test_a_file_system_mounted_over_a_cached_maildir_fails_estale_then_reopens(
    tmp_path: Path, sync: str
) -> None:
    """A mount over a cached Maildir: ESTALE for that group alone, then reopened and delivered."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    home, other = str(tmp_path / "home"), str(tmp_path / "other")
    write_batch([(home, [(memoryview(b"w"),)]), (other, [(memoryview(b"w"),)])])
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", other], check=True)
    try:
        Maildir.create(other)  # provisioned on the new file system; the cache still says the old
        stale = Maildir.peek_cached(other)
        assert stale is not None and stale.dev != os.stat(other).st_dev
        ([ok, err], _) = write_batch(
            [(home, [(memoryview(b"a"),)]), (other, [(memoryview(b"b"),)])],
            sync=sync,  # type: ignore[arg-type]
        )
        assert isinstance(ok, list) and (Path(home) / "new" / ok[0].name).read_bytes() == b"a"
        assert isinstance(err, OSError) and err.errno == errno.ESTALE
        assert str(err.filename).startswith(other + "/tmp/") and "mount" in str(err)
        assert files_in(Path(other) / "tmp") == [] and files_in(Path(other) / "new") == []
        assert Maildir.peek_cached(other) is None  # forgotten: the next batch reopens it
        ([ids], _) = write_batch([(other, [(memoryview(b"c"),)])], sync=sync)  # type: ignore[arg-type]
        assert isinstance(ids, list)
        assert (Path(other) / "new" / ids[0].name).read_bytes() == b"c"
    finally:
        Maildir.forget(other)
        subprocess.run(["umount", other], check=False)
