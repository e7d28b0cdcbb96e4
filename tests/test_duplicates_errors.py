"""Duplicate records when things go wrong: unreadable copies, failed syncs, bounded memory."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from pathlib import Path

import pytest

from delivery_executor import Maildir, commit_batch
from delivery_executor.smtp import duplicates
from delivery_executor.smtp.duplicates import DuplicateFilter
from delivery_executor.store import seen

pytestmark = pytest.mark.timeout(60)

MSG = b"From: a@example.net\r\nMessage-ID: <one@example.net>\r\nSubject: x\r\n\r\nbody\r\n"
KEY = seen.message_key((MSG,)) or ""


def recorded(tmp_path: Path, name: str = "box") -> tuple[Maildir, str]:
    """A Maildir that keeps records, holding MSG (committed with its record); its file name."""
    md = Maildir.create(tmp_path / name)
    (md.path / seen.SEEN_DIR).mkdir()
    seen.forget(str(md.path))
    (res,) = commit_batch([(md, [MSG])])
    assert isinstance(res, list)
    assert (md.path / seen.SEEN_DIR / KEY).read_bytes() == res[0].name.encode() + b"\n"
    return md, res[0].name


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_only_the_first_16_kib_of_headers_are_searched() -> None:
    """A Message-ID within 16 KiB (across parts) counts; one after 16 KiB of headers does not."""
    filler = b"X-Filler: " + b"a" * 1000 + b"\r\n"
    near = (filler * 8, filler * 6, MSG)  # about 14 KiB before the Message-ID
    far = (filler * 9, filler * 8, MSG)  # about 16.8 KiB before it
    assert seen.message_key(near) == KEY
    assert seen.message_key(far) is None


def test_a_record_whose_copy_cannot_be_read_never_suppresses(tmp_path: Path) -> None:
    """A record naming a directory, or a copy gone with cur/ missing, is not found."""
    md, name = recorded(tmp_path)
    box = str(md.path)
    assert seen.find(box, KEY, 60) == name
    os.rename(md.path / "new" / name, tmp_path / "moved")
    (md.path / "new" / name).mkdir()  # the name now is a directory: cannot be read as a message
    assert seen.find(box, KEY, 60) is None
    (md.path / "new" / name).rmdir()
    (md.path / "cur").rmdir()  # not in new/, and cur/ cannot be listed
    assert seen.find(box, KEY, 60) is None
    (md.path / "cur").mkdir()
    os.rename(tmp_path / "moved", md.path / "cur" / f"{name}:2,S")
    assert seen.find(box, KEY, 60) == f"{name}:2,S"


def test_make_durable_finds_the_copy_and_reports_failed_syncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """True for a copy in new/ or cur/; False when absent, unopenable or its fsync fails (EIO)."""
    md, name = recorded(tmp_path)
    box = str(md.path)
    assert seen.make_durable(box, name)
    os.rename(md.path / "new" / name, md.path / "cur" / name)
    assert seen.make_durable(box, name)  # found in cur/ after missing in new/
    assert not seen.make_durable(box, "not-there")
    assert not seen.make_durable(box, "n" * 300)  # ENAMETOOLONG: not a copy we can sync
    before = open_fds()
    synced: list[int] = []

    def failing_fsync(fd: int) -> None:
        synced.append(fd)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    assert not seen.make_durable(box, name)  # never acknowledged on the strength of a failed sync
    assert len(synced) == 1
    assert open_fds() == before  # the file's descriptor was closed all the same


def test_sweep_skips_what_it_cannot_remove(tmp_path: Path) -> None:
    """Expired records go; an expired entry that is a directory stays and is not counted."""
    md, _ = recorded(tmp_path)
    records = md.path / seen.SEEN_DIR
    (records / "stray").mkdir()
    old = 1_000_000_000.0
    for entry in records.iterdir():
        os.utime(entry, (old, old))
    assert seen.sweep(str(md.path), 60) == 1
    assert [p.name for p in records.iterdir()] == ["stray"]
    assert seen.sweep(str(tmp_path / "no-such-box"), 60) == 0


def test_records_dir_memory_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past its cap the table of known record directories is emptied; answers stay right."""
    monkeypatch.setattr(seen, "_dirs", {})
    monkeypatch.setattr(seen, "_CACHE_MAX", 2)
    boxes = [Maildir.create(tmp_path / f"b{i}") for i in range(3)]
    (boxes[2].path / seen.SEEN_DIR).mkdir()
    answers = [seen.records_dir(str(md.path)) for md in boxes]
    assert answers == [None, None, os.path.join(boxes[2].path, seen.SEEN_DIR, "")]
    assert len(seen._dirs) <= 2


@pytest.mark.asyncio
async def test_filter_finds_a_durable_copy_and_refuses_an_unsyncable_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """find() names the stored copy; if that copy cannot be fsynced, None (store it again)."""
    md, name = recorded(tmp_path)
    dup = DuplicateFilter(60)
    assert await dup.find(str(md.path), KEY) == name

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    assert await dup.find(str(md.path), KEY) is None


@pytest.mark.asyncio
async def test_filter_without_records_delivers_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A Maildir whose records cannot be set up: prepare() False, find() None, reason logged."""
    (tmp_path / "file").write_text("not a directory")
    path = str(tmp_path / "file" / "box")
    dup = DuplicateFilter(60)
    with caplog.at_level(logging.WARNING, "delivery_executor.smtp"):
        assert not dup.prepare(path)
        assert await dup.find(path, KEY) is None
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        f"duplicate records unavailable in {path}"
    ] * 2
    assert not (tmp_path / "file").is_dir()


@pytest.mark.asyncio
async def test_filter_memory_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the cap, the Maildirs remembered as set up and swept are forgotten, not grown."""
    monkeypatch.setattr(duplicates, "_MEMORY", 2)
    dup = DuplicateFilter(60)
    paths = [str(tmp_path / f"b{i}") for i in range(3)]
    for path in paths:
        assert await dup.find(path, KEY) is None
        assert (Path(path) / seen.SEEN_DIR).is_dir()
    assert len(dup._ready) <= 2 and len(dup._swept) <= 2
    assert paths[2] in dup._ready and paths[2] in dup._swept
    # The sweeps run in threads: they finish (nothing expired) before the loop closes.
    sweeps = list(dup._sweeps)
    assert await asyncio.gather(*sweeps) == [0] * len(sweeps)
