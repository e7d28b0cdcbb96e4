"""Embedding: one executor shared by aiosmtpd Controllers, other loops, threads and scripts."""

from __future__ import annotations

import ast
import asyncio
import errno
import functools
import os
import smtplib
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

from delivery_executor import (
    DeliveryExecutor,
    DeliveryHandler,
    DeliverySMTP,
    ExecutorClosed,
    LoopWriter,
    MailboxResolver,
    MessageId,
    ThreadWriter,
)
from delivery_executor.fsops import FsOps
from delivery_executor.testing import free_port
from delivery_executor.writers import BatchResult, Group, write_batch

from .helpers import files_in

pytestmark = pytest.mark.timeout(90)


class SlowSyncOps(FsOps):
    """Real syscalls with 20 ms per sync: callers pile up while a commit is in flight."""

    __slots__ = ()

    def fdatasync(self, fd: int, path: str) -> None:
        time.sleep(0.02)
        super().fdatasync(fd, path)

    def fsync_dir(self, path: str) -> None:
        time.sleep(0.02)
        super().fsync_dir(path)

    def syncfs(self, path: str, fd: int = -1) -> None:
        time.sleep(0.02)
        super().syncfs(path, fd)


def bodies_in(path: Path) -> list[bytes]:
    return sorted((path / "new" / n).read_bytes() for n in files_in(path / "new"))


class FastController(Controller):
    def factory(self) -> SMTP:
        return DeliverySMTP(self.handler, **self.SMTP_kwargs)


# -- the Done-when test of the embedding issue


@pytest.mark.asyncio
async def test_controller_threads_and_a_third_loop_share_one_executor(tmp_path: Path) -> None:
    """Home loop in main; 200 messages from 8 threads via a Controller's loop; then a third loop."""
    async with DeliveryExecutor(writer=LoopWriter(ops=SlowSyncOps())) as ex:
        handler = DeliveryHandler(
            ex, MailboxResolver(tmp_path), add_headers=False, line_endings="crlf"
        )
        controller = FastController(handler, hostname="127.0.0.1", port=free_port())
        controller.start()
        try:

            def client(n: int) -> list[dict[str, tuple[int, bytes]]]:
                out = []
                with smtplib.SMTP("127.0.0.1", controller.port, timeout=30) as s:
                    for i in range(25):
                        body = f"Subject: {n}.{i}\r\n\r\nthread {n} message {i}\r\n"
                        out.append(s.sendmail("a@example.net", [f"u{n}@example.org"], body))
                return out

            with ThreadPoolExecutor(8) as pool:
                results = await asyncio.gather(
                    *(asyncio.get_running_loop().run_in_executor(pool, client, n) for n in range(8))
                )
        finally:
            controller.stop()
        assert all(r == {} for per_thread in results for r in per_thread)  # no refusals
        via_controller = ex.stats()

        def third_loop() -> list[MessageId]:
            async def go() -> list[MessageId]:
                return await asyncio.gather(
                    *(ex.deliver(tmp_path / "third", b"from loop 3, %d" % i) for i in range(20))
                )

            return asyncio.run(go())

        third = await asyncio.to_thread(third_loop)
    for n in range(8):
        got = bodies_in(tmp_path / "example.org" / f"u{n}")
        want = sorted(
            f"Subject: {n}.{i}\r\n\r\nthread {n} message {i}\r\n".encode() for i in range(25)
        )
        assert got == want
    assert via_controller.delivered == 200
    assert max(via_controller.batch_sizes) > 1  # sessions of another loop shared commits
    assert sorted(bodies_in(tmp_path / "third")) == sorted(
        b"from loop 3, %d" % i for i in range(20)
    )
    assert {m.name for m in third} == set(files_in(tmp_path / "third" / "new"))


def test_deliver_sync_from_16_threads_shares_commits(tmp_path: Path) -> None:
    """deliver_sync from 16 threads: every message lands and batches average more than one."""
    with DeliveryExecutor(writer=LoopWriter(ops=SlowSyncOps())) as ex:

        def work(i: int) -> MessageId:
            return ex.deliver_sync(tmp_path / f"box{i % 4}", b"message %d" % i)

        with ThreadPoolExecutor(16) as pool:
            ids = list(pool.map(work, range(320)))
        stats = ex.stats()
    assert "home=thread" in repr(ex) and "closed" in repr(ex)
    assert len(set(ids)) == 320
    assert sum(len(files_in(tmp_path / f"box{k}" / "new")) for k in range(4)) == 320
    assert stats.mean_batch_size > 1


def _first_call_together(
    ex: DeliveryExecutor, start: threading.Barrier, box: Path, i: int
) -> MessageId:
    start.wait(10)
    return ex.deliver_sync(box, b"thread %d" % i, timeout=30)


def test_deliver_sync_from_16_threads_at_once_on_a_fresh_executor(tmp_path: Path) -> None:
    """16 threads whose first call is deliver_sync at once: one home thread, every call lands."""
    for trial in range(10):
        ex = DeliveryExecutor()
        start = threading.Barrier(16)
        box = tmp_path / f"t{trial}"
        first = functools.partial(_first_call_together, ex, start, box)
        try:
            with ThreadPoolExecutor(16) as pool:
                ids = list(pool.map(first, range(16)))
        finally:
            ex.close()
        assert sorted(files_in(box / "new")) == sorted(m.name for m in ids)
        assert sorted((box / "new" / m.name).read_bytes() for m in ids) == sorted(
            b"thread %d" % i for i in range(16)
        )
        assert "home=thread" in repr(ex)


# -- the same guarantees across loops


def _in_other_loop(coro_fn: object) -> object:
    """Run ``coro_fn()`` on a fresh loop in a new thread and return its result."""
    out: list[object] = []

    def run() -> None:
        out.append(asyncio.run(coro_fn()))  # type: ignore[operator]

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    assert not t.is_alive()
    return out[0]


@pytest.mark.asyncio
async def test_an_oserror_reaches_a_caller_on_another_loop_unchanged(tmp_path: Path) -> None:
    """ENOTDIR from the store reaches a caller on another loop as the same type, errno, path."""
    (tmp_path / "file").write_bytes(b"")
    async with DeliveryExecutor() as ex:

        async def other() -> object:
            try:
                return await ex.deliver(tmp_path / "file" / "box", b"x")
            except OSError as exc:
                return exc

        exc = await asyncio.to_thread(_in_other_loop, other)
    assert isinstance(exc, NotADirectoryError)
    assert exc.errno == errno.ENOTDIR
    assert str(tmp_path / "file") in str(exc.filename)


@pytest.mark.asyncio
async def test_a_cancelled_caller_on_another_loop_leaves_the_write_to_finish(
    tmp_path: Path,
) -> None:
    """A foreign caller cancelled while its batch is written: the message still lands."""
    gate = threading.Event()
    started = threading.Event()

    def gated(groups: Sequence[Group]) -> BatchResult:
        started.set()
        gate.wait(20)
        return write_batch(groups)

    async with DeliveryExecutor(writer=ThreadWriter(gated)) as ex:

        async def other() -> str:
            task = asyncio.ensure_future(ex.deliver(tmp_path / "m", b"written anyway"))
            await asyncio.to_thread(started.wait, 20)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                return "cancelled"
            return "not cancelled"

        outcome = await asyncio.to_thread(_in_other_loop, other)
        gate.set()
        after = await ex.deliver(tmp_path / "m", b"after")
    assert outcome == "cancelled"
    assert bodies_in(tmp_path / "m") == [b"after", b"written anyway"]
    assert after.name in files_in(tmp_path / "m" / "new")


@pytest.mark.asyncio
async def test_callers_on_another_loop_are_handed_over_together(tmp_path: Path) -> None:
    """32 callers on another loop, 5 rounds: every batch holds all 32, as on the home loop.

    One flush slot: with two, the eager policy would share the 32 between them.
    """
    sizes: list[int] = []

    def recording(groups: Sequence[Group]) -> BatchResult:
        sizes.append(sum(len(messages) for _, messages in groups))
        return write_batch(groups)

    async with DeliveryExecutor(
        writer=ThreadWriter(recording), max_batch=64, max_concurrent_flushes=1
    ) as ex:

        async def callers() -> int:
            async def one(i: int) -> None:
                for r in range(5):
                    await ex.deliver(tmp_path / "m", f"caller {i} round {r}".encode())

            await asyncio.gather(*(one(i) for i in range(32)))
            return 0

        await asyncio.to_thread(_in_other_loop, callers)
    assert sizes == [32] * 5
    assert len(files_in(tmp_path / "m" / "new")) == 160


@pytest.mark.asyncio
async def test_one_wake_of_home_carries_a_whole_iteration_of_callers(tmp_path: Path) -> None:
    """8 callers started together on another loop: home is woken once, with all 8 waiting."""
    async with DeliveryExecutor() as ex:
        at_wake: list[int] = []
        wake = ex._handoff.wake

        def counting() -> None:
            at_wake.append(len(ex._handoff.inbox))
            wake()

        ex._handoff.wake = counting  # type: ignore[method-assign]

        async def other() -> int:
            calls = [ex.deliver(tmp_path / "m", b"caller %d" % i) for i in range(8)]
            return len(await asyncio.gather(*calls))

        assert await asyncio.to_thread(_in_other_loop, other) == 8
    assert at_wake == [8]
    assert len(files_in(tmp_path / "m" / "new")) == 8


@pytest.mark.asyncio
async def test_a_caller_cancelled_before_the_hand_off_still_has_its_mail_written(
    tmp_path: Path,
) -> None:
    """Cancelled in its one-iteration wait before waking home: the message lands anyway."""
    async with DeliveryExecutor() as ex:

        async def other() -> str:
            task = asyncio.ensure_future(ex.deliver(tmp_path / "m", b"queued, then cancelled"))
            await asyncio.sleep(0)  # the task has posted and waits one iteration to wake home
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            else:
                return "not cancelled"
            mid = await ex.deliver(tmp_path / "m", b"next")  # this loop can hand over again
            return mid.name

        name = await asyncio.to_thread(_in_other_loop, other)
        await ex.aclose()  # drains: the cancelled caller's write completes
    assert bodies_in(tmp_path / "m") == [b"next", b"queued, then cancelled"]
    assert name in files_in(tmp_path / "m" / "new")


@pytest.mark.asyncio
async def test_a_stalled_caller_loop_never_holds_up_other_callers(tmp_path: Path) -> None:
    """A loop blocked between posting and waking home: a thread's deliver_sync still lands."""
    async with DeliveryExecutor() as ex:

        async def other() -> bool:
            task = asyncio.ensure_future(ex.deliver(tmp_path / "m", b"from the stalled loop"))
            await asyncio.sleep(0)  # posted; its wake-up of home waits for this loop
            thread = threading.Thread(target=ex.deliver_sync, args=(tmp_path / "m", b"thread"))
            thread.start()
            thread.join(20)  # blocks this loop on purpose
            done = not thread.is_alive()
            await task
            return done

        assert await asyncio.to_thread(_in_other_loop, other) is True
    assert bodies_in(tmp_path / "m") == [b"from the stalled loop", b"thread"]


def test_a_caller_loop_that_stops_after_posting_does_not_block_close(tmp_path: Path) -> None:
    """A loop that stops (and closes) before its caller woke home: close() still returns,
    and the accepted message is written."""
    ex = DeliveryExecutor().start_thread()
    kept: list[asyncio.Task[MessageId]] = []

    async def post_and_return() -> None:
        kept.append(asyncio.get_running_loop().create_task(ex.deliver(tmp_path / "m", b"late")))

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(post_and_return())  # the task posted; its wake never runs
    finally:
        loop.close()
    closer = threading.Thread(target=ex.close)
    closer.start()
    closer.join(20)
    assert not closer.is_alive(), f"close() still blocked: {ex!r}"
    assert bodies_in(tmp_path / "m") == [b"late"]
    kept[0].cancel()  # never to run again: a pending task of a closed loop
    kept.clear()


@pytest.mark.asyncio
async def test_aclose_from_another_loop_drains_and_closes(tmp_path: Path) -> None:
    """aclose() awaited on a foreign loop delivers what was accepted, then refuses more."""
    ex = DeliveryExecutor()
    await ex.start()
    pending = [asyncio.ensure_future(ex.deliver(tmp_path / "m", b"%d" % i)) for i in range(10)]
    await asyncio.sleep(0)

    async def close_there() -> None:
        await ex.aclose()

    await asyncio.gather(asyncio.to_thread(_in_other_loop, close_there), *pending)
    assert all(isinstance(p.result(), MessageId) for p in pending)
    assert len(files_in(tmp_path / "m" / "new")) == 10
    with pytest.raises(ExecutorClosed):
        await ex.deliver(tmp_path / "m", b"late")


# -- clear errors


@pytest.mark.asyncio
async def test_deliver_sync_on_the_home_loop_is_a_clear_error(tmp_path: Path) -> None:
    """deliver_sync() from the executor's own loop thread raises RuntimeError, not a deadlock."""
    async with DeliveryExecutor() as ex:
        with pytest.raises(RuntimeError, match="executor's own event loop thread"):
            ex.deliver_sync(tmp_path / "m", b"x")
        with pytest.raises(RuntimeError, match="await aclose"):
            ex.close()


def test_a_second_asyncio_run_gets_executor_closed_not_a_crash(tmp_path: Path) -> None:
    """After the home loop's asyncio.run() ends, the next run gets ExecutorClosed saying why."""
    ex = DeliveryExecutor()

    async def use() -> MessageId:
        return await ex.deliver(tmp_path / "m", b"first run")

    first = asyncio.run(use())
    with pytest.raises(ExecutorClosed, match="event loop ended before aclose"):
        asyncio.run(use())
    assert bodies_in(tmp_path / "m") == [b"first run"]
    assert first.name in files_in(tmp_path / "m" / "new")
    assert "closed" in repr(ex)


# -- the handler for embedders


@pytest.mark.asyncio
async def test_controller_with_decode_data_delivers_the_raw_bytes(tmp_path: Path) -> None:
    """aiosmtpd's Controller with decode_data=True: our handler delivers, no 500 per message."""
    async with DeliveryExecutor() as ex:
        handler = DeliveryHandler(ex, MailboxResolver(tmp_path), add_headers=False)  # LF on disk
        controller = Controller(handler, hostname="127.0.0.1", port=free_port(), decode_data=True)
        controller.start()
        try:

            def send() -> dict[str, tuple[int, bytes]]:
                with smtplib.SMTP("127.0.0.1", controller.port, timeout=30) as s:
                    return s.sendmail(
                        "a@example.net", ["bob@example.org"], "Subject: d\r\n\r\nok\r\n"
                    )

            assert await asyncio.to_thread(send) == {}
        finally:
            controller.stop()
    assert bodies_in(tmp_path / "example.org" / "bob") == [b"Subject: d\n\nok\n"]


class ListDeliverer:
    """Any object with an async deliver(path, body): here, a list in memory."""

    def __init__(self) -> None:
        self.got: list[tuple[str, bytes]] = []

    async def deliver(self, path: str, body: bytes) -> str:
        self.got.append((path, body))
        return f"stored-{len(self.got)}"


@pytest.mark.asyncio
async def test_handler_accepts_any_async_deliver(tmp_path: Path) -> None:
    """DeliveryHandler works with any object that has an async deliver(path, body)."""
    sink = ListDeliverer()
    handler = DeliveryHandler(sink, MailboxResolver(tmp_path))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: DeliverySMTP(handler), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    def send() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            return s.sendmail(
                "a@example.net", ["x@example.org", "y@example.org"], "S: 1\r\n\r\nb\r\n"
            )

    async with server:
        assert await asyncio.to_thread(send) == {}
    assert [p for p, _ in sink.got] == [str(tmp_path / "example.org" / u) for u in ("x", "y")]
    assert all(isinstance(b, bytes) and b.endswith(b"S: 1\n\nb\n") for _, b in sink.got)
    with pytest.raises(TypeError, match="async deliver"):
        DeliveryHandler(object(), MailboxResolver(tmp_path))  # type: ignore[arg-type]


class FailingDeliverer:
    async def deliver(self, path: str, body: bytes) -> str:
        raise OSError(errno.EIO, "Input/output error", path)


# asyncio names deprecated in Python 3.14 (removal planned for 3.16); the suite
# runs with warnings as errors, so any of them fails every test on 3.14.
DEPRECATED_IN_314 = {
    "iscoroutinefunction",
    "get_event_loop_policy",
    "set_event_loop_policy",
    "AbstractEventLoopPolicy",
    "DefaultEventLoopPolicy",
    "WindowsSelectorEventLoopPolicy",
    "WindowsProactorEventLoopPolicy",
}


def test_no_asyncio_api_deprecated_in_python_3_14(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The handler checks deliver() with inspect (3.14 warns on asyncio's); src uses none."""
    real = asyncio.iscoroutinefunction

    def deprecated(fn: object) -> bool:
        warnings.warn("asyncio.iscoroutinefunction is deprecated", DeprecationWarning, 2)
        return real(fn)

    monkeypatch.setattr(asyncio, "iscoroutinefunction", deprecated)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DeliveryHandler(ListDeliverer(), MailboxResolver(tmp_path))
        with pytest.raises(TypeError, match="async deliver"):
            DeliveryHandler(object(), MailboxResolver(tmp_path))  # type: ignore[arg-type]
    src = Path(__file__).resolve().parent.parent / "src"
    used = [
        f"{py.relative_to(src)}:{node.lineno} asyncio.{node.attr}"
        for py in sorted(src.rglob("*.py"))
        for node in ast.walk(ast.parse(py.read_text()))
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "asyncio"
        and node.attr in DEPRECATED_IN_314
    ]
    assert used == []


@pytest.mark.asyncio
async def test_smtp_reply_does_not_say_some_when_every_recipient_failed(tmp_path: Path) -> None:
    """SMTP: all copies failed gives '451 4.3.0 Delivery failed', without 'some'."""
    handler = DeliveryHandler(FailingDeliverer(), MailboxResolver(tmp_path))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: DeliverySMTP(handler), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    def send() -> str:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            try:
                s.sendmail("a@example.net", ["x@example.org", "y@example.org"], "S\r\n\r\nb\r\n")
            except smtplib.SMTPDataError as exc:
                err = exc.smtp_error
                return f"{exc.smtp_code} {err.decode() if isinstance(err, bytes) else err}"
        return "accepted"

    async with server:
        reply = await asyncio.to_thread(send)
    assert reply.startswith("451 4.3.0 Delivery failed")
    assert "some" not in reply


def test_aiosmtpd_cli_runs_our_handler(tmp_path: Path) -> None:
    """python -m aiosmtpd -c delivery_executor.DeliveryHandler ROOT delivers durably."""
    port = free_port()
    cmd = [sys.executable, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{port}"]
    cmd += ["-c", "delivery_executor.DeliveryHandler", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                s = smtplib.SMTP("127.0.0.1", port, timeout=10)
                break
            except OSError:
                assert time.monotonic() < deadline, "aiosmtpd did not start"
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else b""
                time.sleep(0.1)
        with s:
            assert s.sendmail("a@example.net", ["carol@example.org"], "S: cli\r\n\r\nhi\r\n") == {}
    finally:
        proc.terminate()
        proc.wait(20)
        if proc.stdout is not None:
            proc.stdout.close()
    (body,) = bodies_in(tmp_path / "example.org" / "carol")
    assert body.endswith(b"S: cli\n\nhi\n")
    assert b"Delivered-To: carol@example.org" in body


def test_relative_paths_are_resolved_once_at_the_boundary(tmp_path: Path) -> None:
    """A relative path is resolved when deliver() is called, not later in another directory."""
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        with DeliveryExecutor() as ex:
            mid = ex.deliver_sync("rel/box", b"where?")
            os.chdir("/")
            mid2 = ex.deliver_sync(tmp_path / "rel" / "box", b"same box")
    finally:
        os.chdir(old)
    assert set(files_in(tmp_path / "rel" / "box" / "new")) == {mid.name, mid2.name}
