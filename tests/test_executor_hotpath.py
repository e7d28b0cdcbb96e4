"""The executor's hot-path shortcuts keep their contracts: paths, settling, the thread hand-off."""

from __future__ import annotations

import asyncio
import errno
import threading
from pathlib import Path

import pytest

from delivery_executor import DeliveryExecutor, MessageId
from delivery_executor.executor import core
from delivery_executor.writers.base import ThreadPool

from .helpers import files_in

pytestmark = pytest.mark.timeout(60)


@pytest.mark.asyncio
async def test_a_relative_path_is_resolved_at_each_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same relative path after a chdir goes to the new directory: it is never remembered."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with DeliveryExecutor() as ex:
        monkeypatch.chdir(tmp_path / "a")
        first = await ex.deliver("box", b"one")
        monkeypatch.chdir(tmp_path / "b")
        second = await ex.deliver("box", b"two")
    assert (tmp_path / "a" / "box" / "new" / first.name).read_bytes() == b"one"
    assert (tmp_path / "b" / "box" / "new" / second.name).read_bytes() == b"two"


@pytest.mark.asyncio
async def test_remembered_paths_are_bounded_and_still_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the bound the set starts over; a bad path is refused however often it comes."""
    monkeypatch.setattr(core, "_PATHS_KEPT", 2)
    async with DeliveryExecutor() as ex:
        for i in range(5):
            await ex.deliver(str(tmp_path / f"u{i}"), b"x")
            assert len(ex._paths) <= 2
        for _ in range(2):
            with pytest.raises(ValueError, match="NUL"):
                await ex.deliver(str(tmp_path / "bad\0"), b"x")
    assert all(len(files_in(tmp_path / f"u{i}" / "new")) == 1 for i in range(5))


@pytest.mark.asyncio
async def test_a_failed_group_reaches_exactly_its_callers_on_every_loop(tmp_path: Path) -> None:
    """One batch, two paths, callers on home and on another loop: ENOTDIR only where it belongs."""
    (tmp_path / "file").write_bytes(b"")
    bad, good = tmp_path / "file" / "box", tmp_path / "ok"
    gate = threading.Event()
    results: list[object] = []

    def other_loop(ex: DeliveryExecutor) -> None:
        async def go() -> None:
            got = await asyncio.gather(
                ex.deliver(bad, b"far-bad"), ex.deliver(good, b"far-ok"), return_exceptions=True
            )
            results.extend(got)

        gate.wait(10)
        asyncio.run(go())

    async with DeliveryExecutor(max_concurrent_flushes=1) as ex:
        thread = threading.Thread(target=other_loop, args=(ex,))
        thread.start()
        gate.set()
        home = await asyncio.gather(
            *(ex.deliver(bad if i % 2 else good, b"home%d" % i) for i in range(8)),
            return_exceptions=True,
        )
        await asyncio.to_thread(thread.join, 10)
        stats = ex.stats()
    for i, r in enumerate(home):
        if i % 2:
            assert isinstance(r, NotADirectoryError) and r.errno == errno.ENOTDIR
        else:
            assert isinstance(r, MessageId)
            assert (good / "new" / r.name).read_bytes() == b"home%d" % i
    assert isinstance(results[0], NotADirectoryError) and results[0].errno == errno.ENOTDIR
    assert isinstance(results[1], MessageId)
    assert (good / "new" / results[1].name).read_bytes() == b"far-ok"
    assert (stats.delivered, stats.failed) == (5, 5)
    assert len(files_in(good / "new")) == 5


@pytest.mark.asyncio
async def test_thread_pool_returns_results_and_errors_and_grows_only_when_busy() -> None:
    """Results and errors come back to the loop; a second thread starts only for an overlap."""
    pool = ThreadPool(4, "hot-test")
    release = threading.Event()

    def wait_named() -> str:
        release.wait(10)
        return threading.current_thread().name

    try:
        assert await pool.run(int, "7") == 7
        with pytest.raises(ValueError, match="invalid literal"):
            await pool.run(int, "x")
        names = {await pool.run(lambda: threading.current_thread().name) for _ in range(5)}
        assert names == {"hot-test_0"}  # sequential calls: one thread is enough
        blocked = pool.run(wait_named)
        other = await pool.run(lambda: threading.current_thread().name)
        assert not blocked.done()  # answered while the first call still blocks a thread
        release.set()
        assert {await blocked, other} == {"hot-test_0", "hot-test_1"}
    finally:
        release.set()
        pool.close()


@pytest.mark.asyncio
async def test_thread_pool_skips_a_call_cancelled_before_it_began() -> None:
    """With its one thread busy, a queued call whose caller gave up never runs."""
    pool = ThreadPool(1, "hot-skip")
    ran: list[str] = []
    release = threading.Event()
    try:
        busy = pool.run(release.wait, 10)
        queued = pool.run(ran.append, "queued")
        queued.cancel()
        release.set()
        await busy
        await pool.run(ran.append, "later")
        assert ran == ["later"]
    finally:
        pool.close()


def test_thread_pool_close_stops_its_threads_and_it_can_start_again() -> None:
    """close() ends the threads once their calls return; a later call starts a new one."""

    async def one(pool: ThreadPool) -> int:
        return await pool.run(threading.get_ident)

    pool = ThreadPool(2, "hot-close")
    before = set(threading.enumerate())
    asyncio.run(one(pool))
    started = [t for t in threading.enumerate() if t not in before]
    assert [t.name for t in started] == ["hot-close_0"]
    pool.close()
    started[0].join(10)
    assert not started[0].is_alive()
    asyncio.run(one(pool))
    pool.close()
