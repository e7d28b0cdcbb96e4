"""DeliveryExecutor: batching, durability hand-off, failures, cancellation and shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import functools
import itertools
import logging
import os
import random
import threading
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from delivery_executor import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_CONCURRENT_FLUSHES,
    DEFAULT_MAX_WAIT,
    INLINE_WRITE_LIMIT,
    DeliveryExecutor,
    ExecutorClosed,
    ExecutorCrashed,
    InvalidMaildirPath,
    LoopWriter,
    MessageId,
    MessageTooLarge,
    ThreadWriter,
    TooManyParts,
    WriterName,
)
from delivery_executor.budget import Budget
from delivery_executor.executor import ExecutorConfig, Lifecycle
from delivery_executor.executor.collector import SPLIT_MAX_BYTES, SPLIT_MIN
from delivery_executor.executor.handoff import Request as _Request
from delivery_executor.writers import BatchResult, Group, write_batch
from delivery_executor.writers import local as writers_local

from .helpers import RecordingOps, files_in, mounted_tmpfs, until

pytestmark = pytest.mark.timeout(60)


class FakeWriter:
    """A batch writer that records its calls, can block on a gate and can fail groups."""

    def __init__(
        self,
        *,
        gate: threading.Event | None = None,
        fail_paths: dict[str, BaseException] | None = None,
        raise_exc: BaseException | None = None,
    ) -> None:
        self.gate = gate
        self.fail_paths = fail_paths or {}
        self.raise_exc = raise_exc
        self.calls: list[list[tuple[str, list[bytes]]]] = []
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()
        self._seq = itertools.count()

    def __call__(self, groups: Sequence[Group]) -> BatchResult:
        with self._lock:
            # Paths by their last part: the executor hands over absolute paths.
            self.calls.append(
                [(os.path.basename(p), [b"".join(m) for m in msgs]) for p, msgs in groups]
            )
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if self.gate is not None and not self.gate.wait(20):
                raise TimeoutError("test gate never opened")
            if self.raise_exc is not None:
                raise self.raise_exc
            out: list[list[MessageId] | BaseException] = []
            for path, bodies in groups:
                if os.path.basename(path) in self.fail_paths:
                    out.append(self.fail_paths[os.path.basename(path)])
                else:
                    out.append([MessageId(f"fake{next(self._seq)}") for _ in bodies])
            return out, 1
        finally:
            with self._lock:
                self.active -= 1

    @property
    def batch_sizes(self) -> list[int]:
        return [sum(len(b) for _, b in call) for call in self.calls]


def read_new(path: Path) -> dict[str, bytes]:
    return {n: (path / "new" / n).read_bytes() for n in files_in(path / "new")}


# -- configuration


def test_defaults_match_the_original() -> None:
    """The defaults are the original's: 64 per batch, 10 ms, 2 concurrent flushes."""
    assert (DEFAULT_MAX_BATCH, DEFAULT_MAX_WAIT, DEFAULT_MAX_CONCURRENT_FLUSHES) == (64, 0.010, 2)
    ex = DeliveryExecutor()
    assert (ex.max_batch, ex.max_wait, ex.max_concurrent_flushes) == (64, 0.010, 2)
    assert ex.max_queued == 64 * 16


@pytest.mark.parametrize(
    ("kwargs", "exc", "text"),
    [
        ({"max_batch": 0}, ValueError, "max_batch must be >= 1, not 0"),
        ({"max_batch": 2.5}, TypeError, "max_batch must be an int, not float"),
        ({"max_batch": True}, TypeError, "max_batch must be an int, not bool"),
        ({"max_wait": -1}, ValueError, "max_wait must be a finite number of seconds >= 0, not -1"),
        ({"max_wait": "10ms"}, TypeError, "max_wait must be seconds"),
        ({"max_concurrent_flushes": 0}, ValueError, "max_concurrent_flushes must be >= 1"),
        ({"policy": "lazy"}, ValueError, "policy must be one of"),
        ({"sync": "never"}, ValueError, "sync must be one of"),
        ({"max_queued": 0}, ValueError, "max_queued must be >= 1"),
        ({"max_queued_bytes": -5}, ValueError, "max_queued_bytes must be >= 1, not -5"),
        ({"max_message_size": 10, "max_queued_bytes": 5}, ValueError, "must not exceed"),
        ({"writer": 42}, TypeError, "writer must be one of .* not int"),
        ({"max_wait": float("inf")}, ValueError, "max_wait must be a finite number"),
    ],
)
def test_bad_configuration_names_the_value(kwargs: dict[str, Any], exc: type, text: str) -> None:
    """Each bad knob raises TypeError/ValueError naming the knob and its value."""
    with pytest.raises(exc, match=text.replace("(", r"\(")):
        DeliveryExecutor(**kwargs)


def test_original_constructors_and_timedelta() -> None:
    """with_config/with_full_config set the knobs; max_wait accepts a timedelta."""
    a = DeliveryExecutor.with_config(128, timedelta(milliseconds=5))
    assert (a.max_batch, a.max_wait, a.max_concurrent_flushes) == (128, 0.005, 2)
    b = DeliveryExecutor.with_full_config(64, 0.01, 3)
    assert b.max_concurrent_flushes == 3


def test_construction_outside_a_loop_is_lazy_and_spawn_needs_a_loop() -> None:
    """An executor builds without a loop; spawn() outside one raises RuntimeError."""
    ex = DeliveryExecutor()
    assert "idle" in repr(ex)
    with pytest.raises(RuntimeError):
        DeliveryExecutor.spawn()


# -- the original's behaviour, ported


@pytest.mark.uvloop
@pytest.mark.asyncio
async def test_single_delivery_is_durable_in_new(tmp_path: Path) -> None:
    """One deliver() returns an id naming a file in new/ with the exact bytes."""
    async with DeliveryExecutor.spawn() as ex:
        mid = await ex.deliver(tmp_path / "alice", b"From: a@b\r\n\r\nhello\r\n")
    assert read_new(tmp_path / "alice") == {mid.name: b"From: a@b\r\n\r\nhello\r\n"}
    assert files_in(tmp_path / "alice" / "tmp") == []


@pytest.mark.uvloop
@pytest.mark.asyncio
async def test_concurrent_callers_share_batches(tmp_path: Path) -> None:
    """32 concurrent callers to one path all land, with mean batch size above 4."""
    async with DeliveryExecutor() as ex:
        bodies = [f"msg {i}".encode() for i in range(32)]
        ids = await asyncio.gather(*(ex.deliver(tmp_path / "box", b) for b in bodies))
        stats = ex.stats()
    on_disk = read_new(tmp_path / "box")
    assert {i.name: b for i, b in zip(ids, bodies, strict=True)} == on_disk
    assert stats.delivered == 32
    assert stats.mean_batch_size > 4
    assert stats.syncs < 32


@pytest.mark.parametrize("writer", ["loop", "thread", "process"])
@pytest.mark.asyncio
async def test_every_named_writer_delivers_and_confines_failures(
    tmp_path: Path, writer: WriterName
) -> None:
    """On the loop, in a thread or in a helper process: same files, same errors."""
    (tmp_path / "file").write_bytes(b"")
    async with DeliveryExecutor(writer=writer) as ex:
        jobs = [(tmp_path / f"u{i % 3}", b"m%d" % i) for i in range(30)]
        ids = await asyncio.gather(*(ex.deliver(p, b) for p, b in jobs))
        with pytest.raises(NotADirectoryError) as ei:
            await ex.deliver(tmp_path / "file" / "x", b"y")
        stats = ex.stats()
    assert ei.value.errno == errno.ENOTDIR
    for mid, (path, body) in zip(ids, jobs, strict=True):
        assert (path / "new" / mid.name).read_bytes() == body
    assert stats.syncs >= 2
    assert (stats.delivered, stats.failed) == (30, 1)


@pytest.mark.asyncio
async def test_big_batches_are_written_in_a_thread_not_on_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LoopWriter writes a batch over INLINE_WRITE_LIMIT bytes whole in a thread."""
    threads: list[str] = []
    real_write_batch = writers_local.write_batch

    def watching(groups: Sequence[Group], **kwargs: Any) -> BatchResult:
        threads.append(threading.current_thread().name)
        return real_write_batch(groups, **kwargs)

    monkeypatch.setattr(writers_local, "write_batch", watching)
    async with DeliveryExecutor(writer="loop") as ex:
        small = await ex.deliver(tmp_path / "m", b"small")
        assert threads == []  # written on the loop: the thread path never ran
        big_body = b"x" * (INLINE_WRITE_LIMIT + 1)
        big = await ex.deliver(tmp_path / "m", big_body)
    assert len(threads) == 1
    assert threads[0].startswith("delivery-sync")
    assert (tmp_path / "m" / "new" / small.name).read_bytes() == b"small"
    assert (tmp_path / "m" / "new" / big.name).read_bytes() == big_body


@pytest.mark.asyncio
async def test_loop_writer_counts_a_shared_body_once_towards_thread_above(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20 copies of one 100 KiB body (2 MB of copies, 100 KiB distinct) stay on the loop."""
    from delivery_executor.writers import LoopWriter

    threads: list[str] = []
    real_write_batch = writers_local.write_batch

    def watching(groups: Sequence[Group], **kwargs: Any) -> BatchResult:
        threads.append(threading.current_thread().name)
        return real_write_batch(groups, **kwargs)

    monkeypatch.setattr(writers_local, "write_batch", watching)
    body = os.urandom(100 * 1024)
    boxes = [str(tmp_path / f"u{i}") for i in range(20)]
    writer = LoopWriter()
    try:
        results, _ = await writer.acommit([(box, [(memoryview(body),)]) for box in boxes])
        assert threads == []  # the loop path: 100 KiB distinct is under 256 KiB
        copies = [(box, [(memoryview(bytes(bytearray(body))),)]) for box in boxes[:3]]  # 3 bodies
        more, _ = await writer.acommit(copies)
        assert len(threads) == 1  # 300 KiB distinct: written whole in a thread
    finally:
        await writer.aclose()
    for box, ids in zip(boxes + boxes[:3], results + more, strict=True):
        assert not isinstance(ids, BaseException), ids
        assert (Path(box) / "new" / ids[0].name).read_bytes() == body


def test_thread_above_is_one_concept_for_both_writers() -> None:
    """Both writers take thread_above (None: never), checked alike; inline_limit is an alias."""
    from delivery_executor.writers import LoopWriter, ProcessWriter
    from delivery_executor.writers.base import (
        LOOP_THREAD_ABOVE,
        PROCESS_THREAD_ABOVE,
        goes_to_thread,
    )

    assert INLINE_WRITE_LIMIT == LOOP_THREAD_ABOVE == LoopWriter().thread_above
    assert ProcessWriter().thread_above == PROCESS_THREAD_ABOVE
    assert (
        LoopWriter(inline_limit=10).thread_above == 10 == LoopWriter(inline_limit=10).inline_limit
    )
    assert LoopWriter(thread_above=None).thread_above is None
    for make in (LoopWriter, ProcessWriter):
        with pytest.raises(TypeError, match="thread_above must be an int, not bool"):
            make(thread_above=True)
        with pytest.raises(ValueError, match="thread_above must be >= 0, not -1"):
            make(thread_above=-1)
    with pytest.raises(TypeError, match="not both"):
        LoopWriter(thread_above=5, inline_limit=10)
    body = memoryview(b"x" * 10)
    shared = [("a", [(body,)]), ("b", [(body,)])]
    assert not goes_to_thread(shared, 10)  # one body, counted once
    assert goes_to_thread(shared, 9)
    two = [("a", [(memoryview(bytes(bytearray(10))),), (memoryview(bytes(bytearray(10))),)])]
    assert goes_to_thread(two, 19)  # two bodies of equal bytes: two bodies
    assert not goes_to_thread(shared, None)


class LimitedWriter(ThreadWriter):
    """A ThreadWriter that declares a max_parts, as any custom writer may."""

    def __init__(self, writer: FakeWriter, max_parts: object) -> None:
        super().__init__(writer)
        self.max_parts = max_parts


def test_a_writer_max_parts_is_checked_up_front() -> None:
    """A writer's max_parts must be an int >= 1 (or absent): named in the error at construction."""
    for bad, exc in (("255", TypeError), (0, ValueError), (True, TypeError)):
        with pytest.raises(exc, match=r"writer\.max_parts"):
            DeliveryExecutor(writer=LimitedWriter(FakeWriter(), bad))


@pytest.mark.asyncio
async def test_any_writer_may_declare_max_parts(tmp_path: Path) -> None:
    """A custom writer's max_parts is honoured: 3 parts pass, 4 raise TooManyParts unqueued."""
    fake = FakeWriter()
    async with DeliveryExecutor(writer=LimitedWriter(fake, 3)) as ex:
        await ex.deliver("p", (b"a", b"b", b"c"))
        with pytest.raises(TooManyParts, match="4 parts; the LimitedWriter takes 3 at most"):
            await ex.deliver("p", (b"a", b"b", b"c", b"d"))
    assert [bodies for call in fake.calls for _, bodies in call] == [[b"abc"]]


def test_bad_writer_name_is_rejected() -> None:
    """An unknown writer name raises ValueError naming it."""
    with pytest.raises(ValueError, match=r"writer must be one of .* not 'gpu'"):
        DeliveryExecutor(writer="gpu")  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_batch_spanning_paths_shares_its_syncs(tmp_path: Path) -> None:
    """Three paths in one batch each get their own mail, for two syncfs in all."""
    async with DeliveryExecutor(sync="syncfs") as ex:
        jobs = [(tmp_path / f"u{i % 3}", f"to u{i % 3} #{i}".encode()) for i in range(12)]
        ids = await asyncio.gather(*(ex.deliver(p, b) for p, b in jobs))
        stats = ex.stats()
    assert stats.batches == 1
    assert stats.syncs == 2
    for mid, (path, body) in zip(ids, jobs, strict=True):
        assert (path / "new" / mid.name).read_bytes() == body


@pytest.mark.asyncio
async def test_max_batch_is_respected(tmp_path: Path) -> None:
    """With max_batch=8, 40 concurrent requests go out in batches of at most 8."""
    writer = FakeWriter()
    async with DeliveryExecutor(max_batch=8, writer=ThreadWriter(writer)) as ex:
        await asyncio.gather(*(ex.deliver("p", b"x") for _ in range(40)))
    assert max(writer.batch_sizes) == 8
    assert sum(writer.batch_sizes) == 40


@pytest.mark.asyncio
async def test_window_policy_flushes_a_full_batch_without_waiting() -> None:
    """Window policy flushes as soon as max_batch arrive, even with an hour-long max_wait."""
    writer = FakeWriter()
    async with DeliveryExecutor(
        max_batch=4, max_wait=3600, policy="window", writer=ThreadWriter(writer)
    ) as ex:
        await asyncio.gather(*(ex.deliver("p", b"x") for _ in range(4)))
    assert writer.batch_sizes == [4]


@pytest.mark.asyncio
async def test_window_policy_holds_a_lone_caller_until_max_wait() -> None:
    """Window policy holds a lone request for max_wait; aclose() flushes it at once."""
    writer = FakeWriter()
    ex = DeliveryExecutor(max_wait=3600, policy="window", writer=ThreadWriter(writer))
    task = asyncio.ensure_future(ex.deliver("p", b"x"))
    done, _ = await asyncio.wait([task], timeout=0.2)
    assert not done  # held by the window: nothing reached the writer
    assert writer.calls == []
    await ex.aclose()
    assert (await task).name.startswith("fake")
    assert writer.batch_sizes == [1]


@pytest.mark.uvloop
@pytest.mark.asyncio
async def test_eager_policy_never_holds_a_lone_caller(tmp_path: Path) -> None:
    """Eager policy delivers a lone caller at once, in a batch of 1, despite max_wait=1h."""
    async with DeliveryExecutor(max_wait=3600) as ex:
        for i in range(5):
            await ex.deliver(tmp_path / "m", b"%d" % i)
        assert ex.stats().batch_sizes == {1: 5}


@pytest.mark.asyncio
async def test_flushes_pipeline_up_to_max_concurrent_flushes() -> None:
    """With 2 slots, two batches are written at once and the rest queue behind them."""
    gate = threading.Event()
    writer = FakeWriter(gate=gate)
    async with DeliveryExecutor(max_concurrent_flushes=2, writer=ThreadWriter(writer)) as ex:
        first = asyncio.ensure_future(ex.deliver("p", b"1"))
        await until(lambda: len(writer.calls) == 1, "first flush")
        second = asyncio.ensure_future(ex.deliver("p", b"2"))
        await until(lambda: len(writer.calls) == 2, "second flush")
        rest = [asyncio.ensure_future(ex.deliver("p", b"r")) for _ in range(10)]
        await until(lambda: ex.stats().queued == 10, "queued behind the slots")
        assert ex.stats().in_flight == 2
        assert "in_flight=2" in repr(ex)
        gate.set()
        await asyncio.gather(first, second, *rest)
    assert writer.max_active == 2
    assert writer.batch_sizes[:2] == [1, 1]
    assert sum(writer.batch_sizes[2:]) == 10
    assert len(writer.batch_sizes) <= 4  # the ten that waited went out together


@pytest.mark.asyncio
async def test_eager_shares_a_backlog_between_free_flush_slots(tmp_path: Path) -> None:
    """32 requests and two free slots: two batches of 16, written side by side, all delivered."""
    gate = threading.Event()
    writer = FakeWriter(gate=gate)
    async with DeliveryExecutor(max_concurrent_flushes=3, writer=ThreadWriter(writer)) as ex:
        first = asyncio.ensure_future(ex.deliver("p", b"first"))
        await until(lambda: writer.active == 1, "first write holds one slot")
        rest = [asyncio.ensure_future(ex.deliver("p", b"%d" % i)) for i in range(32)]
        await until(lambda: writer.active == 3, "the backlog fills both free slots")
        assert ex.stats().queued == 0
        gate.set()
        ids = await asyncio.gather(first, *rest)
    assert writer.batch_sizes == [1, 16, 16]
    assert len(set(ids)) == 33
    sent = sorted(b for call in writer.calls[1:] for _, bodies in call for b in bodies)
    assert sent == sorted(b"%d" % i for i in range(32))


@pytest.mark.asyncio
async def test_eager_does_not_split_small_or_big_backlogs_one_slot_or_the_window_policy() -> None:
    """Under 2 x SPLIT_MIN queued, over SPLIT_MAX_BYTES, one free slot, or "window": one batch."""
    assert SPLIT_MIN == 8

    async def batches_behind_a_held_flush(queued: int, body: int = 1, **config: Any) -> list[int]:
        gate = threading.Event()
        writer = FakeWriter(gate=gate)
        async with DeliveryExecutor(writer=ThreadWriter(writer), **config) as ex:
            first = asyncio.ensure_future(ex.deliver("p", b"first"))
            await until(lambda: writer.active == 1, "first write holds one slot")
            rest = [asyncio.ensure_future(ex.deliver("p", b"r" * body)) for _ in range(queued)]
            await until(lambda: writer.active >= 2 or ex.stats().queued == queued, "queued")
            await asyncio.sleep(0.05)  # a (wrong) third flush gets every chance to start
            gate.set()
            await asyncio.gather(first, *rest)
        return writer.batch_sizes[1:]

    assert await batches_behind_a_held_flush(15, max_concurrent_flushes=3) == [15]
    # The held flush leaves one slot free.
    assert await batches_behind_a_held_flush(32, max_concurrent_flushes=2) == [32]
    window: dict[str, Any] = {"policy": "window", "max_wait": 0.01}
    assert await batches_behind_a_held_flush(32, max_concurrent_flushes=3, **window) == [32]
    # Big mail: past SPLIT_MAX_BYTES the backlog goes out whole.
    big = SPLIT_MAX_BYTES // 16 + 1
    assert await batches_behind_a_held_flush(16, max_concurrent_flushes=3, body=big) == [16]
    small = SPLIT_MAX_BYTES // 16
    assert await batches_behind_a_held_flush(16, max_concurrent_flushes=3, body=small) == [8, 8]


@pytest.mark.asyncio
async def test_one_slot_means_strictly_serial_flushes() -> None:
    """max_concurrent_flushes=1: while one write is blocked, no second write starts."""
    gate = threading.Event()
    writer = FakeWriter(gate=gate)
    async with DeliveryExecutor(
        max_concurrent_flushes=1, max_batch=4, writer=ThreadWriter(writer)
    ) as ex:
        first = asyncio.ensure_future(ex.deliver("p", b"1"))
        await until(lambda: writer.active == 1, "first write started")
        rest = [asyncio.ensure_future(ex.deliver("p", b"r")) for _ in range(12)]
        await until(lambda: ex.stats().queued == 12, "the rest queued")
        await asyncio.sleep(0.05)  # give a (wrong) second flush every chance to start
        assert len(writer.calls) == 1
        gate.set()
        await asyncio.gather(first, *rest)
    assert writer.max_active == 1
    assert writer.batch_sizes == [1, 4, 4, 4]


# -- failures reach exactly the callers they concern


@pytest.mark.asyncio
async def test_a_failing_path_fails_only_its_callers(tmp_path: Path) -> None:
    """In one batch, a path under a regular file fails its callers with ENOTDIR; the others land."""
    (tmp_path / "file").write_bytes(b"")
    bad = tmp_path / "file" / "box"
    async with DeliveryExecutor(max_concurrent_flushes=1) as ex:  # one slot: one batch
        results = await asyncio.gather(
            *(ex.deliver(bad if i % 4 == 0 else tmp_path / "ok", b"%d" % i) for i in range(16)),
            return_exceptions=True,
        )
        stats = ex.stats()
    assert stats.batches == 1
    for i, r in enumerate(results):
        if i % 4 == 0:
            assert isinstance(r, NotADirectoryError)
            assert r.errno == errno.ENOTDIR
            assert str(tmp_path / "file") in str(r.filename)
        else:
            assert isinstance(r, MessageId)
    assert len(files_in(tmp_path / "ok" / "new")) == 12
    assert (stats.delivered, stats.failed) == (12, 4)


@pytest.mark.asyncio
async def test_sync_failure_fails_every_covered_message_and_is_not_retried(tmp_path: Path) -> None:
    """EIO from syncfs fails every caller in the batch; the next batch is fresh."""
    calls = [0]

    def fail(op: str, path: str) -> OSError | None:
        if op == "syncfs":
            calls[0] += 1
            if calls[0] == 1:
                return OSError(errno.EIO, "Input/output error", path)
        return None

    ops = RecordingOps(fail)
    async with DeliveryExecutor(writer=LoopWriter("syncfs", ops)) as ex:
        results = await asyncio.gather(
            *(ex.deliver(tmp_path / f"u{i % 2}", b"x") for i in range(6)), return_exceptions=True
        )
        assert all(isinstance(r, OSError) and r.errno == errno.EIO for r in results)
        assert len({id(r) for r in results}) == 1  # the one original exception
        assert ex.stats().delivered == 0
        later = await ex.deliver(tmp_path / "u0", b"later")
    assert [c[0] for c in ops.calls].count("syncfs") == 3  # failed once, never retried
    assert read_new(tmp_path / "u0") == {later.name: b"later"}


@pytest.mark.asyncio
async def test_writer_failing_mid_batch_fails_only_that_group() -> None:
    """A writer that fails one group resolves the other groups' callers normally."""
    boom = PermissionError(errno.EACCES, "Permission denied", "/m/b/tmp/x")
    writer = FakeWriter(fail_paths={"b": boom})
    async with DeliveryExecutor(writer=ThreadWriter(writer)) as ex:
        res = await asyncio.gather(*(ex.deliver(p, b"x") for p in "abcab"), return_exceptions=True)
    assert [type(r) for r in res] == [MessageId, PermissionError, MessageId, MessageId, type(boom)]
    assert res[1] is boom
    assert res[4] is boom


@pytest.mark.asyncio
async def test_writer_bug_fails_its_batch_and_the_executor_goes_on() -> None:
    """A writer raising a non-OSError fails that batch's callers; later batches work."""
    writer = FakeWriter(raise_exc=ZeroDivisionError("bug"))
    async with DeliveryExecutor(writer=ThreadWriter(writer)) as ex:
        with pytest.raises(ZeroDivisionError, match="bug"):
            await ex.deliver("p", b"x")
        writer.raise_exc = None
        assert (await ex.deliver("p", b"y")).name.startswith("fake")


@pytest.mark.asyncio
async def test_writer_returning_the_wrong_count_is_an_error() -> None:
    """A writer returning too few results fails its callers with RuntimeError."""

    def short(groups: Sequence[Group]) -> BatchResult:
        return [], 0

    async with DeliveryExecutor(writer=ThreadWriter(short)) as ex:
        with pytest.raises(RuntimeError, match="0 results for 1 groups"):
            await ex.deliver("p", b"x")


# -- bad input is rejected at deliver(), before queuing


@pytest.mark.parametrize(
    ("path", "body", "exc", "text"),
    [
        ("p", "text", TypeError, "body must be bytes"),
        ("p", None, TypeError, "not NoneType"),
        ("", b"x", InvalidMaildirPath, "empty"),
        ("a\0b", b"x", ValueError, "NUL"),
        (b"/p", b"x", TypeError, "Maildir path must be str"),
        ("p", b"x" * 101, MessageTooLarge, "101 bytes exceeds max_message_size=100"),
    ],
)
@pytest.mark.asyncio
async def test_bad_input_is_rejected_without_poisoning_the_batch(
    tmp_path: Path, path: Any, body: Any, exc: type, text: str
) -> None:
    """A bad request raises at deliver() while concurrent good ones in its batch land."""
    writer = FakeWriter()
    async with DeliveryExecutor(writer=ThreadWriter(writer), max_message_size=100) as ex:
        results = await asyncio.gather(
            ex.deliver("good", b"1"),
            ex.deliver(path, body),
            ex.deliver("good", b"2"),
            return_exceptions=True,
        )
    assert isinstance(results[1], exc)
    assert text in str(results[1])
    assert isinstance(results[0], MessageId)
    assert isinstance(results[2], MessageId)
    assert [p for call in writer.calls for p, _ in call] == ["good"]


@pytest.mark.asyncio
async def test_max_message_size_is_inclusive(tmp_path: Path) -> None:
    """Exactly max_message_size bytes (one part or several) land; one byte more is refused."""
    async with DeliveryExecutor(max_message_size=100) as ex:
        whole = await ex.deliver(tmp_path / "m", b"x" * 100)
        parts = await ex.deliver(tmp_path / "m", (b"h" * 30, b"b" * 70))
        with pytest.raises(MessageTooLarge, match="101 bytes exceeds max_message_size=100"):
            await ex.deliver(tmp_path / "m", b"x" * 101)
        with pytest.raises(MessageTooLarge, match="101 bytes"):
            await ex.deliver(tmp_path / "m", (b"h" * 30, b"b" * 71))
    assert read_new(tmp_path / "m") == {whole.name: b"x" * 100, parts.name: b"h" * 30 + b"b" * 70}


# -- cancellation


@pytest.mark.uvloop
@pytest.mark.asyncio
async def test_cancelled_caller_does_not_cancel_the_write(tmp_path: Path) -> None:
    """A caller cancelled mid-flush leaves the write to complete, with no loop error."""
    gate = threading.Event()

    def gated(groups: Sequence[Group]) -> BatchResult:
        gate.wait(20)
        return write_batch(groups)

    async with DeliveryExecutor(writer=ThreadWriter(gated)) as ex:
        task = asyncio.ensure_future(ex.deliver(tmp_path / "m", b"still written"))
        await until(lambda: ex.stats().in_flight == 1, "flush started")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.set()
        after = await ex.deliver(tmp_path / "m", b"after")
    on_disk = sorted(read_new(tmp_path / "m").values())
    assert on_disk == [b"after", b"still written"]
    assert after.name in read_new(tmp_path / "m")


@pytest.mark.asyncio
async def test_cancelled_caller_of_a_failing_write_logs_nothing() -> None:
    """A failure for a cancelled caller is counted but raises nowhere: no 'never retrieved'."""
    gate = threading.Event()
    writer = FakeWriter(gate=gate, raise_exc=OSError(errno.EIO, "Input/output error"))
    async with DeliveryExecutor(writer=ThreadWriter(writer)) as ex:
        task = asyncio.ensure_future(ex.deliver("p", b"x"))
        await until(lambda: len(writer.calls) == 1, "flush started")
        task.cancel()
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        await until(lambda: ex.stats().in_flight == 0, "flush finished")
        # The failure was counted, and its caller, gone, was not told: the loop's
        # exception handler (checked by the _no_loop_errors fixture) saw nothing.
        assert ex.stats().failed == 1


# -- shutdown


@pytest.mark.asyncio
async def test_aclose_drains_queued_and_in_flight_work(tmp_path: Path) -> None:
    """aclose() completes every accepted delivery before it returns."""
    gate = threading.Event()
    writer = FakeWriter(gate=gate)
    ex = DeliveryExecutor(max_batch=4, writer=ThreadWriter(writer))
    tasks = [asyncio.ensure_future(ex.deliver("p", b"x")) for _ in range(30)]
    await until(lambda: writer.active == 2, "both slots busy")
    closing = asyncio.ensure_future(ex.aclose())
    await asyncio.sleep(0.01)
    assert not closing.done()
    assert "closing" in repr(ex)
    gate.set()
    await closing
    assert all(t.done() and not t.exception() for t in tasks)
    assert sum(writer.batch_sizes) == 30
    assert "closed" in repr(ex)


@pytest.mark.asyncio
async def test_deliver_after_close_raises_and_close_is_idempotent() -> None:
    """After aclose(), deliver() raises ExecutorClosed; aclose() may be called again."""
    ex = DeliveryExecutor(writer=ThreadWriter(FakeWriter()))
    await ex.deliver("p", b"x")
    await asyncio.gather(ex.aclose(), ex.aclose())
    await ex.aclose()
    with pytest.raises(ExecutorClosed, match="closed"):
        await ex.deliver("p", b"x")
    assert ex.closed


@pytest.mark.asyncio
async def test_close_of_an_unused_executor_is_instant() -> None:
    """aclose() on an executor that never ran starts nothing and returns."""
    ex = DeliveryExecutor()
    await ex.aclose()
    assert "closed" in repr(ex)


@pytest.mark.asyncio
async def test_aclose_waits_for_callers_blocked_on_a_full_queue() -> None:
    """Callers blocked by backpressure before aclose() are still delivered."""
    gate = threading.Event()
    writer = FakeWriter(gate=gate)
    ex = DeliveryExecutor(max_batch=2, max_queued=2, writer=ThreadWriter(writer))
    tasks = [asyncio.ensure_future(ex.deliver("p", b"x")) for _ in range(20)]
    # Both slots busy, two requests queued, the rest waiting for room.
    await until(
        lambda: writer.active == 2 and ex.stats().queued == 2 and ex.stats().waiting > 0,
        "queue full",
    )
    closing = asyncio.ensure_future(ex.aclose())
    await asyncio.sleep(0)
    gate.set()
    await closing
    assert all(t.done() and isinstance(t.result(), MessageId) for t in tasks)
    assert sum(writer.batch_sizes) == 20


# -- a collector crash releases everyone


@pytest.mark.asyncio
async def test_collector_crash_fails_waiters_fast_and_later_calls(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the collector dies, queued callers get ExecutorCrashed at once; none hang."""
    gate = threading.Event()
    writer = FakeWriter(gate=gate)
    ex = DeliveryExecutor(max_batch=4, max_queued=4, writer=ThreadWriter(writer))
    in_flight = []
    for n in (1, 2):
        in_flight.append(asyncio.ensure_future(ex.deliver("p", b"f")))
        await until(functools.partial(lambda k: writer.active == k, n), f"{n} slots busy")
    queued = [asyncio.ensure_future(ex.deliver("p", b"q")) for _ in range(10)]
    await until(lambda: ex.stats().queued == 4, "queue full, six callers waiting for room")
    assert ex.stats().waiting == 6

    def broken() -> list[object]:
        raise RuntimeError("collector bug")

    monkeypatch.setattr(ex._collector, "_take", broken)
    with caplog.at_level(logging.ERROR, logger="delivery_executor"):
        gate.set()  # frees a slot: the collector wakes, drains, and dies
        results = await asyncio.gather(*queued, return_exceptions=True)
    assert all(isinstance(r, ExecutorCrashed) for r in results)
    assert isinstance(results[0], ExecutorCrashed)
    assert isinstance(results[0].__cause__, RuntimeError)
    assert "collector crashed" in caplog.text
    assert all(isinstance(r, MessageId) for r in await asyncio.gather(*in_flight))
    with pytest.raises(ExecutorCrashed, match="collector bug"):
        await ex.deliver("p", b"late")
    assert "crashed" in repr(ex)
    await ex.aclose()


# -- backpressure


@pytest.mark.asyncio
async def test_queued_bytes_stay_under_the_limit() -> None:
    """With max_queued_bytes=1000, at most 1000 body bytes are ever accepted at once."""
    seen: list[int] = []
    ex: DeliveryExecutor

    def watching(groups: Sequence[Group]) -> BatchResult:
        seen.append(ex.stats().queued_bytes)
        return [[MessageId(f"m{i}") for i, _ in enumerate(b)] for _, b in groups], 0

    ex = DeliveryExecutor(max_queued_bytes=1000, writer=ThreadWriter(watching))
    async with ex:
        await asyncio.gather(*(ex.deliver("p", b"x" * 300) for _ in range(20)))
        assert ex.stats().delivered == 20
        assert ex.stats().queued_bytes == 0
    assert seen
    assert max(seen) <= 1000
    with pytest.raises(MessageTooLarge):
        await DeliveryExecutor(max_queued_bytes=10).deliver("p", b"x" * 11)


# -- stats and repr


@pytest.mark.asyncio
async def test_stats_snapshot(tmp_path: Path) -> None:
    """stats() counts deliveries, batches, syncs and gives flush-latency percentiles."""
    async with DeliveryExecutor() as ex:
        assert ex.stats().delivered == 0
        assert ex.stats().mean_batch_size == 0.0
        await ex.deliver(tmp_path / "m", b"x")
        s = ex.stats()
    assert (s.delivered, s.failed, s.batches, s.queued, s.in_flight) == (1, 0, 1, 0, 0)
    assert s.syncs == 2  # fdatasync + fsync(new/) for a lone message
    assert set(s.flush_latency) == {"p50", "p90", "p99", "max"}
    assert s.batch_sizes == {1: 1}


# -- stress on real files


@pytest.mark.root
@pytest.mark.timeout(300)
@pytest.mark.asyncio
async def test_stress_20000_deliveries_from_200_tasks(tmp_path: Path) -> None:
    """20,000 deliveries to 1-500 paths: each id holds its bytes, and no file is extra."""
    rng = random.Random(7)
    with mounted_tmpfs("512m") as root:
        expected: dict[tuple[str, str], bytes] = {}

        async def session(n: int, ex: DeliveryExecutor) -> None:
            for i in range(100):
                path = root / f"user{rng.randrange(1 + (n * 5) % 500)}"
                body = f"session {n} message {i}\r\n".encode() * rng.randrange(1, 20)
                mid = await ex.deliver(path, body)
                expected[(str(path), mid.name)] = body

        async with DeliveryExecutor() as ex:
            await asyncio.gather(*(session(n, ex) for n in range(200)))
            stats = ex.stats()
        found = {}
        for box in os.listdir(root):
            for name in os.listdir(root / box / "new"):
                found[(str(root / box), name)] = (root / box / "new" / name).read_bytes()
            assert os.listdir(root / box / "tmp") == []
        assert len(expected) == 20_000
        assert found == expected
        assert stats.delivered == 20_000
        assert stats.mean_batch_size > 4


# -- admission order, bounded close, fatal writer errors


class _Item:
    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self.cancelled = False

    def abandoned(self) -> bool:
        return self.cancelled


def test_budget_admits_waiters_in_fifo_order_one_per_freed_room() -> None:
    """Budget: waiters enter oldest first, only as room frees, cancelled ones skipped."""
    budget: Budget[_Item] = Budget(max_count=2, max_bytes=100)
    a, b, c, d, e = (_Item(n, s) for n, s in zip("abcde", (40, 40, 10, 10, 90), strict=True))
    assert budget.offer(a) and budget.offer(b)
    assert not budget.offer(c)  # count full
    assert not budget.offer(d)
    assert not budget.offer(e)
    assert [i.name for i in budget.taken(1)] == ["c"]  # one slot freed: exactly one in
    d.cancelled = True
    assert [i.name for i in budget.taken(2)] == []  # e (90 bytes) does not fit: 90 held
    assert [i.name for i in budget.done(40)] == []  # d was dropped; e needs 90, 50 held
    assert [i.name for i in budget.done(40)] == ["e"]  # 10 held: e fits
    assert (budget.count, budget.nbytes, len(budget.room)) == (1, 100, 0)


@pytest.mark.asyncio
async def test_callers_waiting_for_room_are_admitted_in_arrival_order() -> None:
    """Under backpressure, requests reach the writer in the order their callers arrived."""
    gate = threading.Event()
    writer = FakeWriter(gate=gate)
    ex = DeliveryExecutor(max_batch=1, max_queued=1, max_concurrent_flushes=1,
                          writer=ThreadWriter(writer))  # fmt: skip
    tasks = []
    for i in range(40):
        tasks.append(asyncio.ensure_future(ex.deliver("p", b"%02d" % i)))
        await asyncio.sleep(0)  # arrival order is creation order
    await until(lambda: writer.active == 1 and ex.stats().waiting == 38, "backlog")
    gate.set()
    await asyncio.gather(*tasks)
    await ex.aclose()
    order = [body for call in writer.calls for _, bodies in call for body in bodies]
    assert order == [b"%02d" % i for i in range(40)]


def test_budget_never_admits_a_newcomer_ahead_of_a_waiter() -> None:
    """Budget: a small request that fits waits behind an older one that does not (bytes)."""
    budget: Budget[_Item] = Budget(max_count=10, max_bytes=100)
    a, b, big, small = (_Item(n, s) for n, s in (("a", 30), ("b", 30), ("big", 80), ("small", 10)))
    assert budget.offer(a) and budget.offer(b)
    assert not budget.offer(big)  # 60 + 80 > 100
    assert not budget.offer(small)  # 60 + 10 fits, but big came first
    assert budget.done(30) == []  # 30 + 80 > 100: big still waits, so small does too
    assert [i.name for i in budget.done(30)] == ["big", "small"]
    assert (budget.count, budget.nbytes) == (4, 90)


@pytest.mark.asyncio
async def test_executor_byte_budget_serves_waiters_first_come_first_served() -> None:
    """max_queued_bytes=100: 60 in flight, 60 waits; a 10-byte newcomer is written after it."""
    gate = threading.Event()
    writer = FakeWriter(gate=gate)
    ex = DeliveryExecutor(max_queued_bytes=100, max_concurrent_flushes=1,
                          writer=ThreadWriter(writer))  # fmt: skip
    first = asyncio.ensure_future(ex.deliver("p", b"1" * 60))
    await until(lambda: writer.active == 1, "first batch in the writer")
    second = asyncio.ensure_future(ex.deliver("p", b"2" * 60))
    await until(lambda: ex.stats().waiting == 1, "second waits for bytes")
    third = asyncio.ensure_future(ex.deliver("p", b"3" * 10))
    await asyncio.sleep(0.01)
    assert ex.stats().waiting == 2  # fits in the bytes left, yet waits its turn
    assert ex.stats().queued_bytes == 60
    gate.set()
    await asyncio.gather(first, second, third)
    await ex.aclose()
    order = [body[:1] for call in writer.calls for _, bodies in call for body in bodies]
    assert order == [b"1", b"2", b"3"]


@pytest.mark.asyncio
async def test_5000_waiters_cost_constant_work_per_admission() -> None:
    """Freeing room wakes one waiter, not all: 5,000 waiters cost O(1) checks per message."""
    checks = [0]
    original = _Request.abandoned

    def counting(self: _Request) -> bool:
        checks[0] += 1
        return original(self)

    writer = FakeWriter()
    ex = DeliveryExecutor(max_batch=8, max_queued=8, writer=ThreadWriter(writer))
    _Request.abandoned = counting  # type: ignore[method-assign]
    try:
        async with ex:
            await asyncio.gather(*(ex.deliver("p", b"x") for _ in range(5000)))
    finally:
        _Request.abandoned = original  # type: ignore[method-assign]
    assert ex.stats().delivered == 5000
    assert checks[0] <= 2 * 5000  # a wake-all design makes about 5000²/16 checks


@pytest.mark.asyncio
async def test_aclose_with_timeout_fails_what_is_left_and_returns() -> None:
    """aclose(timeout) on a stuck writer: queued callers get ExecutorClosed, in-flight Crashed."""
    gate = threading.Event()
    writer = FakeWriter(gate=gate)
    ex = DeliveryExecutor(max_batch=1, max_concurrent_flushes=1, writer=ThreadWriter(writer))
    tasks = [asyncio.ensure_future(ex.deliver("p", b"%d" % i)) for i in range(5)]
    await until(lambda: writer.active == 1, "one batch stuck in the writer")
    await ex.aclose(timeout=0.2)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    gate.set()
    assert isinstance(results[0], ExecutorCrashed)
    assert "may or may not be durable" in str(results[0])
    assert all(isinstance(r, ExecutorClosed) for r in results[1:])
    assert "aclose(timeout=0.2) expired" in str(results[1])
    assert "closed" in repr(ex)


@pytest.mark.asyncio
async def test_a_cancelled_aclose_only_stops_waiting_the_close_goes_on() -> None:
    """aclose() under the caller's own timeout: the close still delivers every queued
    request, and a later aclose() waits for it instead of returning early."""
    gate = threading.Event()
    writer = FakeWriter(gate=gate)
    ex = DeliveryExecutor(writer=ThreadWriter(writer), max_batch=4, max_concurrent_flushes=2)
    tasks = [asyncio.ensure_future(ex.deliver("p", b"%d" % i)) for i in range(8)]
    await until(lambda: writer.active == 2, "two batches in the writer, none queued")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await ex.aclose()  # waiting on the two flushes when it is cancelled
    gate.set()
    await asyncio.wait_for(ex.aclose(), 10)
    assert all(t.done() for t in tasks), repr(ex)  # the second aclose waited for the close
    results = [t.result() for t in tasks]
    assert all(isinstance(r, MessageId) for r in results), results
    assert ex.stats().delivered == 8
    assert "in_flight=0" in repr(ex)


@pytest.mark.asyncio
async def test_a_bounded_aclose_applies_its_timeout_while_another_close_waits() -> None:
    """aclose() waiting on a stuck write, then aclose(timeout=0.1): the second aborts the
    write (its caller gets ExecutorCrashed) instead of waiting as long as the first."""
    gate = threading.Event()
    writer = FakeWriter(gate=gate)
    ex = DeliveryExecutor(writer=ThreadWriter(writer), max_batch=1, max_concurrent_flushes=1)
    tasks = [asyncio.ensure_future(ex.deliver("p", b"%d" % i)) for i in range(3)]
    await until(lambda: writer.active == 1, "one batch stuck in the writer")
    first = asyncio.ensure_future(ex.aclose())
    await asyncio.sleep(0)
    try:
        await asyncio.wait_for(ex.aclose(timeout=0.1), 10)
        await asyncio.wait_for(first, 10)
    finally:
        gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[0], ExecutorCrashed)
    assert all(isinstance(r, ExecutorClosed) for r in results[1:])
    assert ex.stats().failed == 3  # every failure a caller saw is counted


@pytest.mark.asyncio
async def test_a_flush_cancelled_before_it_begins_still_answers_its_callers() -> None:
    """A flush task cancelled before its first step (aclose(timeout) right after the
    launch): its callers get ExecutorClosed, and its slot and bytes are released."""
    writer = FakeWriter()
    ex = DeliveryExecutor(writer=ThreadWriter(writer), max_concurrent_flushes=1)
    await ex.start()
    launch = ex._collector._launch

    def launch_then_cancel(batch: list[Any]) -> None:
        launch(batch)
        for task in list(ex._collector.flushes):
            task.cancel()  # before the loop ever runs it

    ex._collector._launch = launch_then_cancel  # type: ignore[method-assign]
    results = await asyncio.wait_for(
        asyncio.gather(*(ex.deliver("p", b"%d" % i) for i in range(3)), return_exceptions=True),
        10,
    )
    assert all(isinstance(r, ExecutorClosed) for r in results), results
    assert "nothing was written" in str(results[0])
    assert writer.calls == []
    ex._collector._launch = launch  # type: ignore[method-assign]
    assert (await asyncio.wait_for(ex.deliver("p", b"after"), 10)).name  # slot released
    await ex.aclose()
    assert ex.stats().failed == 3


def test_keyboard_interrupt_in_a_writer_settles_every_caller_then_propagates() -> None:
    """A writer raising KeyboardInterrupt: callers get ExecutorCrashed, the interrupt goes on."""
    writer = FakeWriter(raise_exc=KeyboardInterrupt())
    ex = DeliveryExecutor(writer=ThreadWriter(writer))
    loop = asyncio.new_event_loop()
    tasks: list[asyncio.Future[MessageId]] = []

    async def main() -> None:
        await ex.start()
        tasks.extend(asyncio.ensure_future(ex.deliver("p", b"x")) for _ in range(3))
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(3600)  # the interrupt ends this

    main_task = loop.create_task(main())
    try:
        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(main_task)
        # Settled before the interrupt left the loop: each caller knows.
        results = loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        assert all(isinstance(r, ExecutorCrashed) for r in results)
        assert all(isinstance(r.__cause__, KeyboardInterrupt) for r in results)  # type: ignore[union-attr]
        writer.raise_exc = None
        loop.run_until_complete(ex.aclose())
        main_task.cancel()
        loop.run_until_complete(asyncio.gather(main_task, return_exceptions=True))
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


# -- the subpackage's parts: lifecycle, configuration, the writer's start, the flush's release


def test_the_lifecycle_moves_forward_and_a_crash_stays_visible() -> None:
    """Lifecycle: closing never goes back, a crash wins over a close, closed says if one began."""
    assert Lifecycle.IDLE.closing(Lifecycle.CLOSED) is Lifecycle.CLOSED
    assert Lifecycle.CLOSED.closing(Lifecycle.CLOSING) is Lifecycle.CLOSED
    assert Lifecycle.OPEN.closing(Lifecycle.CLOSING) is Lifecycle.CLOSING
    assert Lifecycle.OPEN.crashed() is Lifecycle.CRASHED
    assert not Lifecycle.CRASHED.closed
    assert Lifecycle.CRASHED.closing(Lifecycle.CLOSING) is Lifecycle.CRASHED_CLOSED
    assert Lifecycle.CLOSING.crashed() is Lifecycle.CRASHED_CLOSED
    assert Lifecycle.CRASHED_CLOSED.closed and Lifecycle.CLOSING.closed
    assert not Lifecycle.OPEN.closed and not Lifecycle.IDLE.closed
    labels = [s.label for s in Lifecycle]
    assert labels == ["idle", "open", "closing", "closed", "crashed", "crashed"]


@pytest.mark.asyncio
async def test_a_crashed_executor_is_closed_only_once_a_close_begins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a collector crash: `closed` is False until aclose(), then True; repr says crashed."""
    ex = DeliveryExecutor(writer=ThreadWriter(FakeWriter()))
    await ex.start()

    def broken() -> list[object]:
        raise RuntimeError("collector bug")

    monkeypatch.setattr(ex._collector, "_take", broken)
    with pytest.raises(ExecutorCrashed):
        await asyncio.wait_for(ex.deliver("p", b"x"), 10)
    assert not ex.closed
    assert "crashed" in repr(ex)
    await ex.aclose()
    assert ex.closed
    assert "crashed" in repr(ex)
    with pytest.raises(ExecutorCrashed, match="collector bug"):
        await ex.deliver("p", b"late")


def test_the_settings_are_checked_once_and_frozen() -> None:
    """The executor's settings are an ExecutorConfig: read-only, and the same on the executor."""
    ex = DeliveryExecutor(max_batch=8, max_wait=timedelta(milliseconds=5), policy="window")
    assert isinstance(ex.config, ExecutorConfig)
    assert (ex.max_batch, ex.max_wait, ex.policy, ex.max_queued) == (8, 0.005, "window", 128)
    assert ex.writer is ex.config.writer
    with pytest.raises(dataclasses.FrozenInstanceError):
        ex.config.max_batch = 9  # type: ignore[misc]
    with pytest.raises(AttributeError):
        ex.max_batch = 9  # type: ignore[misc]


class StartingWriter(FakeWriter):
    """A writer with the optional async start(): records that it ran, or fails."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.fail = fail
        self.started = 0

    async def acommit(self, groups: Sequence[Group]) -> BatchResult:
        return self(groups)

    async def aclose(self) -> None:
        pass

    async def start(self) -> None:
        self.started += 1
        if self.fail:
            raise OSError(errno.ECHILD, "the helper did not start")


@pytest.mark.asyncio
async def test_start_awaits_a_writers_optional_start() -> None:
    """executor.start() awaits writer.start() when the writer has one; its failure shows there."""
    writer = StartingWriter()
    async with DeliveryExecutor(writer=writer) as ex:
        assert writer.started == 1
        assert (await ex.deliver("p", b"x")).name
    broken = DeliveryExecutor(writer=StartingWriter(fail=True))
    with pytest.raises(OSError, match="did not start"):
        await broken.start()
    await broken.aclose()


@pytest.mark.asyncio
async def test_an_aborted_flush_releases_its_slot_bytes_and_count() -> None:
    """aclose(timeout) cancels a write mid-flush: its callers are answered, nothing stays held."""
    gate = threading.Event()
    writer = FakeWriter(gate=gate)
    ex = DeliveryExecutor(max_batch=2, max_concurrent_flushes=1, writer=ThreadWriter(writer))
    tasks = [asyncio.ensure_future(ex.deliver("p", b"12345")) for _ in range(2)]
    await until(lambda: writer.active == 1, "one batch stuck in the writer")
    assert ex.stats().queued_bytes == 10 and ex.stats().in_flight == 1
    try:
        await ex.aclose(timeout=0.05)
        results = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        gate.set()
    assert all(isinstance(r, ExecutorCrashed) for r in results), results
    stats = ex.stats()
    assert (stats.in_flight, stats.queued_bytes, stats.failed) == (0, 0, 2)
