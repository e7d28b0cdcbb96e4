"""The durable Maildir store: layout, names, delivery, scans, flags and failures."""

from __future__ import annotations

import errno
import mailbox
import os
import re
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from delivery_executor import (
    AUTO_SYNCFS_MIN_FILES,
    Flag,
    InvalidMaildirPath,
    InvalidMessageId,
    Maildir,
    MessageId,
    add_flag,
    commit_batch,
    parse_flags,
    serialize_flags,
)
from delivery_executor.store import StoreOptions, check_maildir_path, commit_steps
from delivery_executor.store import names as md_mod

from .helpers import RecordingOps, files_in

NAME_RE = re.compile(r"^(\d+)\.M(\d{1,6})P(\d+)Q(\d+)\.(.+)$")


def _read_new(md: Maildir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (md.path / "new").iterdir()}


# -- creation


def test_create_makes_tmp_new_cur_with_mode_0700(tmp_path: Path) -> None:
    """create() makes the three subdirectories, and missing parents, with mode 0700."""
    md = Maildir.create(tmp_path / "a" / "b")
    for sub in ("tmp", "new", "cur"):
        st_ = os.stat(md.path / sub)
        assert stat.S_ISDIR(st_.st_mode)
        assert stat.S_IMODE(st_.st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o700


def test_create_is_idempotent_and_keeps_mail(tmp_path: Path) -> None:
    """create() on an existing Maildir keeps its messages."""
    md = Maildir.create(tmp_path / "m")
    mid = md.deliver(b"x")
    md2 = Maildir.create(tmp_path / "m")
    assert md2 == md
    assert [e.id for e in md2.scan_new()] == [mid]


def test_open_requires_an_existing_maildir(tmp_path: Path) -> None:
    """open() raises FileNotFoundError for a missing Maildir and ENOTDIR for a file."""
    with pytest.raises(FileNotFoundError):
        Maildir.open(tmp_path / "missing")
    Maildir.create(tmp_path / "m")
    (tmp_path / "m" / "new").rmdir()
    (tmp_path / "m" / "new").write_bytes(b"")
    with pytest.raises(NotADirectoryError) as ei:
        Maildir.open(tmp_path / "m")
    assert ei.value.errno == errno.ENOTDIR
    assert ei.value.filename == str(tmp_path / "m" / "new")


def test_create_under_a_file_raises_enotdir_with_path(tmp_path: Path) -> None:
    """create() below a regular file fails with ENOTDIR and names the path."""
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(NotADirectoryError) as ei:
        Maildir.create(tmp_path / "f" / "box")
    assert ei.value.errno == errno.ENOTDIR
    assert str(tmp_path / "f") in str(ei.value.filename)


@pytest.mark.parametrize(
    ("bad", "exc"),
    [
        ("", InvalidMaildirPath),
        ("a\0b", InvalidMaildirPath),
        ("/" + "x" * 4095, InvalidMaildirPath),
        (b"/tmp/x", TypeError),
        (3, TypeError),
    ],
)
def test_bad_paths_are_rejected_with_a_clear_error(bad: object, exc: type[Exception]) -> None:
    """Empty, NUL-holding and non-str paths raise ValueError/TypeError before any syscall."""
    with pytest.raises(exc, match="Maildir path"):
        Maildir.create(bad)  # type: ignore[arg-type]


def test_concurrent_create_of_one_new_path_succeeds_everywhere(tmp_path: Path) -> None:
    """16 threads creating the same nested Maildir at once all succeed (no EEXIST)."""
    target = tmp_path / "a" / "b" / "c" / "box"
    errors: list[BaseException] = []
    start = threading.Barrier(16)

    def work() -> None:
        start.wait()
        try:
            Maildir.create(target)
        except BaseException as exc:
            errors.append(exc)

    for _ in range(20):
        threads = [threading.Thread(target=work) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        Maildir.open(target)
        subprocess.run(["rm", "-rf", str(tmp_path / "a")], check=True)


def test_cached_returns_the_same_object_and_forget_recreates(tmp_path: Path) -> None:
    """cached() skips the syscalls on a hit; forget() makes the next call create again."""
    p = tmp_path / "c"
    a = Maildir.cached(p)
    assert Maildir.cached(str(p)) is a
    (p / "new").rmdir()
    assert Maildir.cached(p) is a  # a hit does not look at the disk
    Maildir.forget(p)
    b = Maildir.cached(p)
    assert b is not a
    assert (p / "new").is_dir()


# -- names


def test_names_follow_the_maildir_convention_and_are_distinct() -> None:
    """Names are {secs}.M{usec}P{pid}Q{seq}.{host} with our pid and growing seq."""
    a, b = md_mod.unique_name(), md_mod.unique_name()
    ma, mb = NAME_RE.match(a), NAME_RE.match(b)
    assert ma and mb
    assert int(ma.group(3)) == os.getpid()
    assert int(mb.group(4)) > int(ma.group(4))
    assert abs(int(ma.group(1)) - time.time()) < 60
    assert ":" not in a and "/" not in a


def test_host_is_sanitized() -> None:
    """'/' and ':' in the host name become \\057 and \\072."""
    assert md_mod.sanitize_host("a/b:c") == "a\\057b\\072c"
    assert md_mod.sanitize_host("") == "localhost"
    assert md_mod.sanitize_host("a\\057b") == "a\\134057b"  # never the same as "a/b"


def test_names_are_unique_across_threads() -> None:
    """8 threads × 2,000 names never collide."""
    out: list[list[str]] = [[] for _ in range(8)]

    def work(i: int) -> None:
        out[i].extend(md_mod.unique_name() for _ in range(2000))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    names = [n for chunk in out for n in chunk]
    assert len(set(names)) == 16000


def test_deliveries_are_unique_across_forked_processes(tmp_path: Path) -> None:
    """4 forked children delivering 200 messages each into one Maildir leave 800 files."""
    md = Maildir.create(tmp_path / "m")
    pids = []
    for child in range(4):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 0
            try:
                for i in range(200):
                    md.deliver(f"child {child} msg {i}".encode())
            except BaseException:
                code = 1
            os._exit(code)
        pids.append(pid)
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    bodies = sorted(_read_new(md).values())
    assert len(bodies) == 800
    assert bodies == sorted(f"child {c} msg {i}".encode() for c in range(4) for i in range(200))
    pids_seen = {NAME_RE.match(n).group(3) for n in files_in(md.path / "new")}  # type: ignore[union-attr]
    assert len(pids_seen) == 4


def test_message_id_is_a_hashable_str_able_value() -> None:
    """MessageId compares and hashes by name and str() gives the file name."""
    a, b = MessageId("1.M2P3Q4.h"), MessageId("1.M2P3Q4.h")
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert str(a) == "1.M2P3Q4.h"


# -- delivery


def test_deliver_writes_the_exact_bytes_into_new_with_mode_0600(tmp_path: Path) -> None:
    """deliver() leaves one 0600 file in new/ holding the body, and tmp/ empty."""
    md = Maildir.create(tmp_path / "m")
    body = b"From: a@b\r\n\r\nhello\r\n"
    mid = md.deliver(body)
    path = md.path / "new" / mid.name
    assert path.read_bytes() == body
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert files_in(md.path / "tmp") == []
    assert files_in(md.path / "new") == [mid.name]


def test_deliver_batch_ids_are_positional(tmp_path: Path) -> None:
    """deliver_batch() returns ids in input order; each names its own body."""
    md = Maildir.create(tmp_path / "m")
    bodies = [f"message {i}".encode() for i in range(50)]
    ids = md.deliver_batch(bodies)
    assert len(set(ids)) == 50
    for mid, body in zip(ids, bodies, strict=True):
        assert (md.path / "new" / mid.name).read_bytes() == body


def test_empty_batch_touches_nothing(tmp_path: Path) -> None:
    """deliver_batch([]) returns [] without a syscall, even if the Maildir vanished."""
    md = Maildir.create(tmp_path / "m")
    for sub in ("tmp", "new", "cur"):
        (md.path / sub).rmdir()
    assert md.deliver_batch([]) == []
    assert files_in(md.path) == []


def test_accepts_bytearray_and_memoryview(tmp_path: Path) -> None:
    """bytearray and (multi-byte format) memoryview bodies are written byte for byte."""
    md = Maildir.create(tmp_path / "m")
    arr = memoryview(bytearray(b"abcdefgh")).cast("I")
    ids = md.deliver_batch([bytearray(b"ba"), memoryview(b"mv"), arr])
    got = [(md.path / "new" / i.name).read_bytes() for i in ids]
    assert got == [b"ba", b"mv", b"abcdefgh"]


def test_strided_memoryview_is_rejected(tmp_path: Path) -> None:
    """A non-contiguous memoryview body raises TypeError instead of writing garbage."""
    md = Maildir.create(tmp_path / "m")
    with pytest.raises(TypeError, match="C-contiguous"):
        md.deliver(memoryview(b"abcdef")[::2])
    assert files_in(md.path / "tmp") == []


def test_wrong_body_type_raises_before_any_file_is_touched(tmp_path: Path) -> None:
    """A str body in a batch raises TypeError naming the type; no file is created."""
    md = Maildir.create(tmp_path / "m")
    with pytest.raises(TypeError, match="not str"):
        md.deliver_batch([b"ok", "not bytes"])  # type: ignore[list-item]
    assert files_in(md.path / "tmp") == [] and files_in(md.path / "new") == []


def test_bad_sync_mode_is_rejected(tmp_path: Path) -> None:
    """An unknown sync mode raises ValueError that names it."""
    md = Maildir.create(tmp_path / "m")
    with pytest.raises(ValueError, match="'sometimes'"):
        md.deliver(b"x", sync="sometimes")  # type: ignore[arg-type]


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    bodies=st.lists(
        st.one_of(
            st.binary(max_size=2000),
            st.builds(lambda n: b"line\r\n" * n, st.integers(0, 3000)),
            st.just(b""),
            st.just(b"\r\n.\r\n\x00\xff" * 7),
        ),
        min_size=1,
        max_size=200,
    ),
    sync=st.sampled_from(["auto", "fsync", "syncfs"]),
)
def test_property_batches_read_back_identical(
    tmp_path_factory: pytest.TempPathFactory, bodies: list[bytes], sync: str
) -> None:
    """Any batch of 1-200 binary/CRLF/empty bodies reads back byte-identical, in order."""
    md = Maildir.create(tmp_path_factory.mktemp("prop"))
    ids = md.deliver_batch(bodies, sync=sync)  # type: ignore[arg-type]
    assert [(md.path / "new" / i.name).read_bytes() for i in ids] == bodies
    assert len(files_in(md.path / "new")) == len(bodies)
    assert files_in(md.path / "tmp") == []


def test_multi_megabyte_body_round_trips(tmp_path: Path) -> None:
    """A 12 MiB body is written whole."""
    md = Maildir.create(tmp_path / "m")
    body = os.urandom(12 * 1024 * 1024)
    (mid,) = md.deliver_batch([body])
    assert (md.path / "new" / mid.name).read_bytes() == body


def test_stdlib_mailbox_reads_our_messages_byte_identical(tmp_path: Path) -> None:
    """mailbox.Maildir lists our ids as keys and returns the same bytes."""
    md = Maildir.create(tmp_path / "m")
    bodies = [b"From: a@b\r\nSubject: %d\r\n\r\nbody\r\n" % i for i in range(5)]
    ids = md.deliver_batch(bodies)
    box = mailbox.Maildir(str(md.path), factory=None, create=False)
    assert sorted(box.keys()) == sorted(i.name for i in ids)
    for mid, body in zip(ids, bodies, strict=True):
        assert box.get_bytes(mid.name) == body


# -- scans, flags, cleanup


def test_flags_parse_serialize_and_add() -> None:
    """:2, suffixes parse to Flag sets, serialize sorted, and add_flag merges."""
    assert parse_flags("1.M1P1Q1.h:2,SR") == {Flag.SEEN, Flag.REPLIED}
    assert parse_flags("1.M1P1Q1.h") == frozenset()
    assert parse_flags("x:2,Sa") == {Flag.SEEN}
    assert serialize_flags([Flag.SEEN, Flag.DRAFT, Flag.SEEN]) == ":2,DS"
    assert add_flag("x", Flag.FLAGGED) == "x:2,F"
    assert add_flag("x:2,S", Flag.REPLIED) == "x:2,RS"


def test_add_flag_keeps_dovecot_keyword_letters(tmp_path: Path) -> None:
    """A Dovecot-flagged file (:2,FSab: Junk and $Label1 as keywords) keeps every letter."""
    dovecot_name = "1764000000.M123456P789.mx.example.org,S=5,W=5:2,FSab"
    assert add_flag(dovecot_name, Flag.REPLIED) == dovecot_name.replace(":2,FSab", ":2,FRSab")
    assert add_flag(dovecot_name, Flag.SEEN) == dovecot_name  # already there: unchanged
    md = Maildir.create(tmp_path / "m")
    (md.path / "cur" / dovecot_name).write_bytes(b"hello")
    entry = md.add_flag(MessageId(dovecot_name.partition(":")[0]), Flag.REPLIED)
    assert entry.path.name.endswith(":2,FRSab")
    assert entry.path.read_bytes() == b"hello"
    assert files_in(md.path / "cur") == [entry.path.name]


def test_names_carry_dovecot_sizes_and_can_leave_them_out(tmp_path: Path) -> None:
    """,S= is the size and ,W= the size with CRLF line ends; size_in_names=False drops both."""
    md = Maildir.create(tmp_path / "m")
    lf, crlf, split = b"a\nbb\n", b"a\r\nbb\r\n", (b"x\r", b"\ny\n")
    (r_lf, r_crlf, r_split) = commit_batch([(md, [lf, crlf, split])])[0]  # type: ignore[misc]
    assert r_lf.name.endswith(",S=5,W=7")
    assert r_crlf.name.endswith(",S=7,W=7")
    assert r_split.name.endswith(",S=5,W=6")  # the CRLF split across two parts counts once
    for mid in (r_lf, r_crlf, r_split):
        size = int(mid.name.rpartition(",S=")[2].partition(",")[0])
        assert (md.path / "new" / mid.name).stat().st_size == size
    (plain,) = commit_batch([(md, [b"z"])], size_in_names=False)[0]  # type: ignore[misc]
    assert ",S=" not in plain.name and NAME_RE.match(plain.name)


def test_scans_and_add_flag_move_new_to_cur(tmp_path: Path) -> None:
    """add_flag moves a message from new/ to cur/ with its flags; scans see it there."""
    md = Maildir.create(tmp_path / "m")
    a, b = md.deliver_batch([b"a", b"b"])
    assert {e.id for e in md.scan_new()} == {a, b}
    entry = md.add_flag(a, Flag.SEEN)
    assert entry.path == md.path / "cur" / f"{a.name}:2,S"
    entry = md.add_flag(a, Flag.REPLIED)
    assert entry.flags == {Flag.SEEN, Flag.REPLIED}
    assert [e.id for e in md.scan_new()] == [b]
    (cur,) = md.scan_cur()
    assert cur.id == a and cur.flags == {Flag.SEEN, Flag.REPLIED}
    assert cur.path.read_bytes() == b"a"
    with pytest.raises(FileNotFoundError):
        md.add_flag(MessageId("nope"), Flag.SEEN)


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root``: a file's bytes, ``None`` for a directory."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in filenames:
            out[os.path.relpath(os.path.join(dirpath, f), root)] = Path(dirpath, f).read_bytes()
    return out


BAD_IDS = ["", ".", "..", ":2,S", "..:2,S", ".hidden", "../outside", "../../outside",
           "a/b", "/etc/passwd", "x\0y", "../new", "..\0"]  # fmt: skip


@pytest.mark.parametrize("bad", BAD_IDS)
def test_add_flag_refuses_an_id_that_is_not_one_files_name(tmp_path: Path, bad: str) -> None:
    """Empty, dot, '/' or NUL ids raise InvalidMessageId (a ValueError); nothing on disk moves."""
    md = Maildir.create(tmp_path / "box" / "m")
    md.deliver(b"in new")
    md.add_flag(md.deliver(b"in cur"), Flag.SEEN)
    (tmp_path / "box" / "outside").write_bytes(b"not mail")
    (tmp_path / "outside").write_bytes(b"not mail either")
    before = _tree(tmp_path)
    for message in (bad, MessageId(bad)):
        with pytest.raises(InvalidMessageId, match="not a Maildir file name") as ei:
            md.add_flag(message, Flag.SEEN)
        assert isinstance(ei.value, ValueError)
        with pytest.raises(InvalidMessageId):
            add_flag(bad, Flag.SEEN)
    assert _tree(tmp_path) == before
    assert (md.path / "new" / md.deliver(b"still works").name).read_bytes() == b"still works"


def test_add_flag_refuses_a_bad_flag_or_id_type_before_touching_anything(tmp_path: Path) -> None:
    """A flag that is not a Flag letter, or an id that is not str/MessageId, moves nothing."""
    md = Maildir.create(tmp_path / "m")
    mid = md.deliver(b"x")
    before = _tree(tmp_path)
    with pytest.raises(ValueError, match="'Q' is not a valid Flag"):
        md.add_flag(mid, "Q")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not bytes"):
        md.add_flag(mid.name.encode(), Flag.SEEN)  # type: ignore[arg-type]
    assert _tree(tmp_path) == before


def test_cleanup_tmp_removes_only_stale_files(tmp_path: Path) -> None:
    """cleanup_tmp(max_age) unlinks this host's old tmp files, not fresh ones nor new/."""
    md = Maildir.create(tmp_path / "m")
    md.deliver(b"kept")
    old, fresh = (md.path / "tmp" / md_mod.unique_name() for _ in range(2))
    old.write_bytes(b"o")
    fresh.write_bytes(b"f")
    past = time.time() - 7200
    os.utime(old, (past, past))
    assert md.cleanup_tmp(3600) == 1
    assert files_in(md.path / "tmp") == [fresh.name]
    assert len(files_in(md.path / "new")) == 1
    with pytest.raises(ValueError, match="max_age"):
        md.cleanup_tmp(-1)
    with pytest.raises(ValueError, match="other_hosts_max_age"):
        md.cleanup_tmp(0, other_hosts_max_age=-1)


def test_cleanup_tmp_leaves_another_hosts_files_to_their_own_age(tmp_path: Path) -> None:
    """On a shared Maildir, cleanup_tmp(0) keeps another host's in-flight files."""
    md = Maildir.create(tmp_path / "m")
    mine = md.path / "tmp" / (md_mod.unique_name() + ",S=1,W=1")
    theirs = md.path / "tmp" / "1795000000.M1P42Q7.mx-b.example.org,S=1,W=1"
    dovecot = md.path / "tmp" / "1795000000.M1P42.imap-c,S=1,W=1"
    junk = md.path / "tmp" / "core"
    for f in (mine, theirs, dovecot, junk):
        f.write_bytes(b"x")
    hour_ago = time.time() - 3600
    for f in (mine, theirs, dovecot, junk):
        os.utime(f, (hour_ago, hour_ago))
    assert md_mod.host_of(theirs.name) == "mx-b.example.org"
    assert md_mod.host_of(dovecot.name) == "imap-c"
    assert md_mod.host_of(junk.name) is None
    assert md.cleanup_tmp(0) == 1  # only ours: the others may be mid-delivery elsewhere
    assert sorted(files_in(md.path / "tmp")) == sorted([theirs.name, dovecot.name, junk.name])
    assert md.cleanup_tmp(0, other_hosts_max_age=7200) == 0  # an hour old is not stale yet
    assert md.cleanup_tmp(0, other_hosts_max_age=1800) == 3
    assert files_in(md.path / "tmp") == []


# -- the sync protocol, as recorded through the FsOps seam


def _order_violations(calls: list[tuple[str, ...]]) -> list[str]:
    """Check a trace against the durability rules; return what it breaks.

    Each renamed file needs its data synced (fdatasync of it, or a syncfs after
    its last write) before its rename, and after the last rename each new/
    directory needs an fsync of itself or a syncfs.
    """
    problems = []
    last_write: dict[str, int] = {}
    data_synced: set[str] = set()
    last_rename = -1
    new_dirs: set[str] = set()
    for i, call in enumerate(calls):
        op = call[0]
        if op == "write":
            last_write[call[1]] = i
            data_synced.discard(call[1])
        elif op == "fdatasync":
            data_synced.add(call[1])
        elif op == "syncfs":
            data_synced.update(last_write)
        elif op in ("rename", "link"):
            if call[1] not in data_synced:
                problems.append(f"rename of {os.path.basename(call[1])} before its data sync")
            last_rename = i
            new_dirs.add(os.path.dirname(call[2]))
    for d in new_dirs:
        after = calls[last_rename + 1 :]
        if not any(
            c[0] == "syncfs" or (c[0] == "fsync_dir" and c[1].rstrip("/") == d) for c in after
        ):
            problems.append(f"no sync of {d} after the last rename")
    return problems


def _original_protocol(md: Maildir, bodies: list[bytes], ops: RecordingOps) -> None:
    """mailrs-maildir 1.2's deliver_batch: no file sync, fsync(tmp/), rename, fsync(new/)."""
    names = [md_mod.unique_name() for _ in bodies]
    for name, body in zip(names, bodies, strict=True):
        fd = ops.create(str(md.path / "tmp" / name))
        ops.write_all(fd, (memoryview(body),), name)
        ops.close(fd)
    ops.fsync_dir(str(md.path / "tmp"))
    for name in names:
        ops.rename(str(md.path / "tmp" / name), str(md.path / "new" / name))
    ops.fsync_dir(str(md.path / "new"))


@pytest.mark.parametrize("sync", ["fsync", "syncfs", "auto"])
@pytest.mark.parametrize("n", [1, 2, 17])
def test_syscall_order_is_durable(tmp_path: Path, sync: str, n: int) -> None:
    """Every data sync precedes its rename and a dir/fs sync follows the last rename."""
    ops = RecordingOps()
    md = Maildir.create(tmp_path / "m")
    (res,) = commit_batch([(md, [b"x" * 10] * n)], sync=sync, ops=ops)  # type: ignore[arg-type]
    assert isinstance(res, list) and len(res) == n
    assert _order_violations(ops.calls) == []
    assert ops.calls[-1][0] in ("fsync_dir", "syncfs")


def test_order_checker_catches_the_original_protocol(tmp_path: Path) -> None:
    """The checker rejects the original's no-file-sync batch protocol (it has teeth)."""
    ops = RecordingOps()
    _original_protocol(Maildir.create(tmp_path / "m"), [b"a", b"b"], ops)
    problems = _order_violations(ops.calls)
    assert len(problems) == 2 and all("before its data sync" in p for p in problems)


def test_order_checker_catches_a_missing_directory_sync(tmp_path: Path) -> None:
    """The checker rejects fdatasync + rename with no directory sync afterwards."""
    ops = RecordingOps()
    md = Maildir.create(tmp_path / "m")
    fd = ops.create(str(md.path / "tmp" / "x"))
    ops.write_all(fd, (memoryview(b"x"),), "x")
    ops.fdatasync(fd, str(md.path / "tmp" / "x"))
    ops.close(fd)
    ops.rename(str(md.path / "tmp" / "x"), str(md.path / "new" / "x"))
    assert _order_violations(ops.calls) == [f"no sync of {md.path / 'new'} after the last rename"]


def test_auto_uses_fdatasync_for_one_message_and_syncfs_for_more(tmp_path: Path) -> None:
    """sync='auto' makes 1 fdatasync + 1 dir fsync for N=1, and exactly 2 syncfs for N=20."""
    md = Maildir.create(tmp_path / "m")
    one = RecordingOps()
    commit_batch([(md, [b"x"])], ops=one)
    ops1 = [c[0] for c in one.calls]
    assert ops1.count("fdatasync") == 1 and ops1.count("fsync_dir") == 1
    assert "syncfs" not in ops1
    many = RecordingOps()
    commit_batch([(md, [b"x"] * 20)], ops=many)
    opsn = [c[0] for c in many.calls]
    assert opsn.count("syncfs") == 2 and "fdatasync" not in opsn and "fsync_dir" not in opsn


def test_auto_switches_to_syncfs_at_exactly_auto_syncfs_min_files(tmp_path: Path) -> None:
    """sync='auto': 1 file on a file system gets fdatasync; 2 (the documented threshold) syncfs."""
    assert AUTO_SYNCFS_MIN_FILES == 2
    a, b = Maildir.create(tmp_path / "a"), Maildir.create(tmp_path / "b")
    for groups, want_syncfs in (
        ([(a, [b"1"])], False),
        ([(a, [b"1", b"2"])], True),
        ([(a, [b"1"]), (b, [b"2"])], True),  # counted per file system, not per Maildir
    ):
        ops = RecordingOps()
        results = commit_batch(groups, ops=ops)
        kinds = [c[0] for c in ops.calls]
        if want_syncfs:
            assert kinds.count("syncfs") == 2 and "fdatasync" not in kinds, groups
        else:
            assert "syncfs" not in kinds and kinds.count("fdatasync") == 1, groups
        for (md, bodies), res in zip(groups, results, strict=True):
            assert isinstance(res, list)
            assert [(md.path / "new" / m.name).read_bytes() for m in res] == bodies


@pytest.mark.parametrize(
    ("given", "want"),
    [
        ("/srv/mail/u", "/srv/mail/u"),
        ("/srv/mail/../mail2/u", "/srv/mail2/u"),
        ("/srv/./mail/u", "/srv/mail/u"),
        ("/srv//mail/u", "/srv/mail/u"),
        ("/srv/mail/u/", "/srv/mail/u"),
        ("/srv/mail/u/.", "/srv/mail/u"),
        ("/srv/.mail/u", "/srv/.mail/u"),  # a dot directory is a name, kept
        ("rel/../box", "{cwd}/box"),
        (Path("rel/box"), "{cwd}/rel/box"),
    ],
)
def test_maildir_paths_are_normalised_as_documented(given: str | Path, want: str) -> None:
    """check_maildir_path: absolute, '.', '..', '//' and a trailing '/' resolved, once."""
    assert check_maildir_path(given) == want.format(cwd=os.getcwd())


def test_many_mailboxes_share_two_syncfs(tmp_path: Path) -> None:
    """One commit over 10 Maildirs on one file system makes exactly two syncfs calls."""
    ops = RecordingOps()
    boxes = [Maildir.create(tmp_path / f"u{i}") for i in range(10)]
    results = commit_batch([(b, [f"to {i}".encode()]) for i, b in enumerate(boxes)], ops=ops)
    assert [c[0] for c in ops.calls].count("syncfs") == 2
    for i, (box, res) in enumerate(zip(boxes, results, strict=True)):
        assert isinstance(res, list)
        assert (box.path / "new" / res[0].name).read_bytes() == f"to {i}".encode()


def test_portable_form_fsyncs_each_new_dir_once(tmp_path: Path) -> None:
    """sync='fsync' over 3 Maildirs (2 messages each) makes 6 fdatasync and 3 dir fsyncs."""
    ops = RecordingOps()
    boxes = [Maildir.create(tmp_path / f"u{i}") for i in range(3)]
    commit_batch([(b, [b"1", b"2"]) for b in boxes], sync="fsync", ops=ops)
    names = [c[0] for c in ops.calls]
    assert names.count("fdatasync") == 6
    assert sorted(c[1] for c in ops.calls if c[0] == "fsync_dir") == sorted(
        str(b.path / "new") + os.sep for b in boxes
    )


# -- failures: the error reaches the caller, nothing partial in new/


def _eio(when_op: str, nth: int = 1) -> RecordingOps:
    seen = [0]

    def fail(op: str, path: str) -> OSError | None:
        if op == when_op:
            seen[0] += 1
            if seen[0] == nth:
                return OSError(errno.EIO, os.strerror(errno.EIO), path)
        return None

    return RecordingOps(fail)


@pytest.mark.parametrize(
    ("op", "sync"), [("fdatasync", "fsync"), ("syncfs", "syncfs"), ("write", "auto")]
)
def test_data_sync_error_fails_the_batch_and_cleans_tmp(tmp_path: Path, op: str, sync: str) -> None:
    """EIO before the renames fails every message, removes tmp files and leaves new/ empty."""
    md = Maildir.create(tmp_path / "m")
    ops = _eio(op)
    (res,) = commit_batch([(md, [b"a", b"b", b"c"])], sync=sync, ops=ops)  # type: ignore[arg-type]
    assert isinstance(res, OSError) and res.errno == errno.EIO
    assert "rename" not in [c[0] for c in ops.calls]
    assert files_in(md.path / "tmp") == [] and files_in(md.path / "new") == []


def test_sync_error_results_carry_errno_and_path(tmp_path: Path) -> None:
    """A failed fdatasync is returned as OSError(EIO) with the tmp file's path; no retry."""
    md = Maildir.create(tmp_path / "m")
    ops = _eio("fdatasync")
    (res,) = commit_batch([(md, [b"a", b"b"])], sync="fsync", ops=ops)
    assert isinstance(res, OSError)
    assert res.errno == errno.EIO
    assert str(res.filename).startswith(str(md.path / "tmp"))
    assert [c[0] for c in ops.calls].count("fdatasync") == 1
    assert files_in(md.path / "tmp") == [] and files_in(md.path / "new") == []


def test_second_syncfs_error_fails_every_group_on_that_fs(tmp_path: Path) -> None:
    """EIO on the post-rename syncfs fails all groups; their complete files stay in new/."""
    a, b = Maildir.create(tmp_path / "a"), Maildir.create(tmp_path / "b")
    ops = _eio("syncfs", nth=2)
    ra, rb = commit_batch([(a, [b"1", b"2"]), (b, [b"3"])], sync="syncfs", ops=ops)
    assert isinstance(ra, OSError) and isinstance(rb, OSError)
    assert ra.errno == errno.EIO
    assert [c[0] for c in ops.calls].count("syncfs") == 2
    # Renamed before the failure: whole, never partial; a retry may duplicate them.
    assert sorted(_read_new(a).values()) == [b"1", b"2"]
    assert files_in(a.path / "tmp") == []


@pytest.mark.parametrize("nth", [1, 3])
def test_writeback_error_fails_every_group_on_that_fs_before_any_move(
    tmp_path: Path, nth: int
) -> None:
    """EIO waiting for writeback (writeback form) fails both groups, moves nothing, cleans tmp/."""
    a = Maildir.create(tmp_path / "a")
    b = Maildir.create(tmp_path / "b")
    a, b = (Maildir(str(m.path), m.dev, m.owner, ordered=True) for m in (a, b))
    ops = _eio("wait_writeback", nth=nth)
    ra, rb = commit_batch([(a, [b"1", b"2"]), (b, [b"3"])], ops=ops)
    assert isinstance(ra, OSError) and isinstance(rb, OSError)
    assert ra.errno == errno.EIO and rb is ra
    waited = [c[1] for c in ops.calls if c[0] == "wait_writeback"]
    assert ra.filename == waited[-1]  # the file whose wait failed: a's first, or b's
    assert str(ra.filename).startswith(str((a if nth == 1 else b).path / "tmp"))
    names = [c[0] for c in ops.calls]
    assert "rename" not in names and "syncfs" not in names
    assert names.count("start_writeback") == 3  # every write queued before the first wait
    for m in (a, b):
        assert files_in(m.path / "tmp") == [] and files_in(m.path / "new") == []


def test_a_failed_chunk_wait_fails_the_rest_of_that_fs_and_leaves_no_tmp_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writeback wait failing mid-batch stops writing there: all groups there fail, tmp/ empty."""
    monkeypatch.setattr("delivery_executor.store.commit.WRITEBACK_CHUNK", 2)
    boxes = [Maildir.create(tmp_path / u) for u in ("a", "b", "c")]
    a, b, c = (Maildir(str(m.path), m.dev, m.owner, ordered=True) for m in boxes)
    ops = _eio("wait_writeback", nth=1)
    results = commit_batch([(a, [b"1", b"2", b"3", b"4", b"5"]), (b, [b"6"]), (c, [b"7"])], ops=ops)
    assert all(isinstance(r, OSError) and r.errno == errno.EIO for r in results)
    names = [c[0] for c in ops.calls]
    assert names.count("create") == 2  # nothing written after the failed wait
    assert "rename" not in names
    for m in (a, b, c):
        assert files_in(m.path / "tmp") == [] and files_in(m.path / "new") == []


class _OpenFiles(RecordingOps):
    """Counts the files the store has open, and the most at once."""

    def __init__(self) -> None:
        super().__init__()
        self.open = self.most = 0

    def create(self, path: str) -> int:
        fd = super().create(path)
        self.open += 1
        self.most = max(self.most, self.open)
        return fd

    def close(self, fd: int) -> None:
        super().close(fd)
        self.open -= 1


def test_writeback_form_holds_at_most_a_chunk_open_over_all_file_systems(
    tmp_path: Path, small_tmpfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two file systems in one batch share WRITEBACK_CHUNK: at most that many files open."""
    monkeypatch.setattr("delivery_executor.store.commit.WRITEBACK_CHUNK", 4)
    here, there = Maildir.create(tmp_path / "a"), Maildir.create(small_tmpfs / "b")
    a, b = (Maildir(str(m.path), m.dev, m.owner, ordered=True) for m in (here, there))
    ops = _OpenFiles()
    ra, rb = commit_batch([(a, [b"x"] * 7), (b, [b"y"] * 7)], ops=ops)
    assert isinstance(ra, list) and isinstance(rb, list)
    assert ops.most <= 4 + 2 and ops.open == 0  # the chunk, and each file system's syncfs handle
    assert len(files_in(a.path / "new")) == 7 and len(files_in(b.path / "new")) == 7


def test_a_broken_maildir_fails_only_its_own_group(tmp_path: Path) -> None:
    """A group whose tmp/ vanished fails with ENOENT; the other group is delivered."""
    good, bad = Maildir.create(tmp_path / "good"), Maildir.create(tmp_path / "bad")
    (bad.path / "tmp").rmdir()
    rg, rb = commit_batch([(good, [b"g1", b"g2"]), (bad, [b"b1"])])
    assert isinstance(rb, FileNotFoundError) and rb.errno == errno.ENOENT
    assert str(rb.filename).startswith(str(bad.path / "tmp"))
    assert isinstance(rg, list)
    assert sorted(_read_new(good).values()) == [b"g1", b"g2"]


def test_new_replaced_by_a_file_gives_enotdir_and_cleans_tmp(tmp_path: Path) -> None:
    """If new/ is a file, the rename fails with ENOTDIR and no tmp file is left."""
    md = Maildir.create(tmp_path / "m")
    (md.path / "new").rmdir()
    (md.path / "new").write_bytes(b"")
    with pytest.raises(NotADirectoryError) as ei:
        md.deliver_batch([b"a", b"b"])
    assert ei.value.errno == errno.ENOTDIR
    assert files_in(md.path / "tmp") == []


@pytest.mark.root
def test_enospc_on_a_full_tmpfs(small_tmpfs: Path) -> None:
    """A batch that does not fit a 1 MiB tmpfs raises ENOSPC; new/ and tmp/ stay empty."""
    md = Maildir.create(small_tmpfs / "m")
    with pytest.raises(OSError, match="No space") as ei:
        md.deliver_batch([b"x" * 300_000] * 5)
    assert ei.value.errno == errno.ENOSPC
    assert str(ei.value.filename).startswith(str(md.path / "tmp"))
    assert files_in(md.path / "new") == [] and files_in(md.path / "tmp") == []
    # The space came back: the next delivery fits.
    (mid,) = md.deliver_batch([b"fits"])
    assert (md.path / "new" / mid.name).read_bytes() == b"fits"


@pytest.mark.root
def test_erofs_on_a_read_only_file_system(small_tmpfs: Path) -> None:
    """Delivering into a Maildir on a file system remounted read-only raises EROFS."""
    md = Maildir.create(small_tmpfs / "m")
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    with pytest.raises(OSError, match="Read-only") as ei:
        md.deliver(b"x")
    assert ei.value.errno == errno.EROFS
    assert files_in(md.path / "new") == []


def test_eacces_on_an_unwritable_directory(tmp_path: Path) -> None:
    """A Maildir the caller may not write fails with EACCES (as root: in a setuid child)."""
    md = Maildir.create(tmp_path / "m")
    os.chmod(md.path / "tmp", 0o500)
    if os.geteuid() != 0:
        with pytest.raises(PermissionError) as ei:
            md.deliver(b"x")
        assert ei.value.errno == errno.EACCES
    else:
        # Root ignores mode bits: try again as 'nobody' in a child process.
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 0
            try:
                os.setgid(65534)
                os.setuid(65534)
                md.deliver(b"x")
            except OSError as exc:
                code = exc.errno or 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == errno.EACCES
    assert files_in(md.path / "new") == []
    assert files_in(md.path / "tmp") == []


def test_store_options_is_one_value_for_the_three_store_flags(tmp_path: Path) -> None:
    """StoreOptions stands for sync/ops/size_in_names in commit_batch and the writers."""
    from delivery_executor.store import StoreOptions, commit_batch
    from delivery_executor.store.commit import DEFAULT_STORE_OPTIONS
    from delivery_executor.writers import LoopWriter, ProcessWriter, ThreadWriter, write_batch

    ops = RecordingOps()
    opts = StoreOptions(sync="fsync", size_in_names=False, ops=ops)
    md = Maildir.create(tmp_path / "m")
    [ids] = commit_batch([(md, [b"one\n"])], options=opts)
    assert isinstance(ids, list)
    assert "," not in ids[0].name  # size_in_names=False: no ,S=/,W=
    assert (md.path / "new" / ids[0].name).read_bytes() == b"one\n"
    assert any(call[0] == "fdatasync" for call in ops.calls)  # the given ops and sync
    ([ids2], _) = write_batch([(str(md.path), [(memoryview(b"two\n"),)])], options=opts)
    assert isinstance(ids2, list) and "," not in ids2[0].name
    # The keywords build the same value; the defaults are one shared value.
    assert LoopWriter("fsync", ops, size_in_names=False).options == opts
    assert LoopWriter(options=opts).sync == "fsync"
    assert LoopWriter().options is DEFAULT_STORE_OPTIONS
    assert StoreOptions.of(None, "fsync") is StoreOptions.of(None, "fsync")  # no per-call value
    with pytest.raises(ValueError, match="sync must be one of"):
        LoopWriter("sometimes")  # type: ignore[arg-type]
    assert ProcessWriter(size_in_names=False).options == StoreOptions(size_in_names=False)
    with pytest.raises(TypeError, match="not both"):
        commit_batch([(md, [b"x"])], sync="fsync", options=opts)
    with pytest.raises(TypeError, match="not both"):
        ThreadWriter(size_in_names=False, options=opts)
    with pytest.raises(TypeError, match="must be a StoreOptions"):
        LoopWriter(options="fsync")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sync must be one of"):
        StoreOptions(sync="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be OS_OPS"):
        ProcessWriter(options=opts)  # the helper process cannot use a tracing ops


@pytest.mark.parametrize("ordered", [False, True])
def test_an_abandoned_batch_leaves_no_tmp_files_and_no_open_files(
    tmp_path: Path, ordered: bool
) -> None:
    """A driver that stops at the first sync (generator closed) leaves tmp/ empty, no fd open."""
    box = Maildir.create(tmp_path / "a")
    box = Maildir(str(box.path), box.dev, box.owner, ordered=ordered)
    ops = _OpenFiles()
    steps = commit_steps([(box, [b"1", b"2", b"3"])], options=StoreOptions(ops=ops))
    first = next(steps)
    assert first[0] == ("writeback" if ordered else "syncfs")
    steps.close()
    assert ops.open == 0
    assert files_in(box.path / "tmp") == [] and files_in(box.path / "new") == []
