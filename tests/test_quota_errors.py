"""Quota when things go wrong: bad arguments, corrupt maildirsize, failed deliveries, recounts."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from delivery_executor import DeliveryExecutor, Maildir
from delivery_executor.errors import QuotaExceeded
from delivery_executor.quota import (
    QuotaDeliverer,
    Usage,
    parse_quota_rule,
    read_usage,
)

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]

LIMITS = parse_quota_rule("*:messages=2")


class Flaky:
    """Delivers through ``executor``; raises EIO instead while ``failing``."""

    def __init__(self, executor: DeliveryExecutor) -> None:
        self.executor = executor
        self.failing = False

    async def deliver(self, path: str, message: bytes) -> object:
        if self.failing:
            raise OSError(errno.EIO, "Input/output error")
        return await self.executor.deliver(path, message)


async def test_quota_deliverer_names_bad_arguments() -> None:
    """An inner without async deliver() is a TypeError naming it; a bad grace names the value."""
    with pytest.raises(TypeError, match="inner must have an async deliver\\(\\), not object"):
        QuotaDeliverer(object(), lambda md: LIMITS)
    for grace in (-0.1, 11):
        with pytest.raises(
            ValueError, match=f"grace must be a fraction between 0 and 10, not {grace}"
        ):
            QuotaDeliverer(DeliveryExecutor(), lambda md: LIMITS, grace=grace)


async def test_a_corrupt_maildirsize_is_recounted_from_the_files(tmp_path: Path) -> None:
    """A maildirsize line that is not numbers makes the next check count the Maildir again."""
    md = Maildir.create(tmp_path / "u")
    (md.path / "new" / "1.a.host").write_bytes(b"x" * 10)
    (md.path / "maildirsize").write_text(f"{LIMITS.header()}\n1 1\nten one\n")
    assert read_usage(str(md.path), LIMITS) is None  # refused: must be recalculated
    q = QuotaDeliverer(DeliveryExecutor(), lambda m: LIMITS)
    assert await q.usage(str(md.path), LIMITS) == Usage(10, 1)
    assert (md.path / "maildirsize").read_text() == f"{LIMITS.header()}\n10 1\n"


async def test_a_failed_delivery_does_not_count_against_the_quota(tmp_path: Path) -> None:
    """A copy whose delivery failed frees its reservation: the next two fit a 2-message quota."""
    md = str(tmp_path / "u")
    ex = DeliveryExecutor()
    inner = Flaky(ex)
    q = QuotaDeliverer(inner, lambda m: LIMITS)
    async with ex:
        inner.failing = True
        with pytest.raises(OSError, match="Input/output error"):
            await q.deliver(md, b"a\n")
        inner.failing = False
        await q.deliver(md, b"b\n")
        await q.deliver(md, b"c\n")
        with pytest.raises(QuotaExceeded):
            await q.deliver(md, b"d\n")
    assert len(Maildir.open(md).scan_new()) == 2
    assert read_usage(md, LIMITS) == Usage(4, 2)


async def test_a_recount_that_fails_fails_the_delivery_not_the_rcpt_check(tmp_path: Path) -> None:
    """maildirsize not replaceable: deliver() raises EISDIR, leaves no tmp file; check() passes."""
    md = Maildir.create(tmp_path / "u")
    (md.path / "maildirsize").mkdir()  # unreadable as a file, and cannot be renamed over
    ex = DeliveryExecutor()
    q = QuotaDeliverer(ex, lambda m: LIMITS)
    async with ex:
        with pytest.raises(IsADirectoryError, match="maildirsize"):
            await q.deliver(str(md.path), b"a\n")
        assert await q.check(str(md.path), 100) is None  # the delivery decides
    assert md.scan_new() == []  # nothing stored on a failed check
    assert list((md.path / "tmp").iterdir()) == []  # no half-made maildirsize left behind
    assert q.rejections == 0
