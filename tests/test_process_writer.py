"""ProcessWriter: the wire format, delivery through a helper process, and its failures."""

from __future__ import annotations

import asyncio
import errno
import io
import os
import signal
from pathlib import Path

import pytest

from delivery_executor import DeliveryExecutor, Maildir, MessageId, TooManyParts
from delivery_executor.store import names
from delivery_executor.writers import Group
from delivery_executor.writers.process import (
    ProcessWriter,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
    serve_batches,
)

from .helpers import files_in

pytestmark = pytest.mark.timeout(60)

PIPE_MAX = int(Path("/proc/sys/fs/pipe-max-size").read_text())


def _frame(batch: int, groups: list[Group]) -> bytes:
    return b"".join(encode_request(batch, groups))


def test_request_round_trip() -> None:
    """A framed batch decodes to the same paths and messages, parts, binary and empty included."""
    shared = b"shared body"
    groups: list[Group] = [
        ("/m/é", [(memoryview(b""),), (memoryview(b"\x00\xff\r\n."),)]),
        (
            "/x",
            [(memoryview(b"head 1"), memoryview(shared)), (memoryview(b"h2"), memoryview(shared))],
        ),
    ]
    frame = _frame(7, groups)
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    assert frame.count(shared) == 1  # a body shared by two copies crosses the pipe once
    batch, decoded = decode_request(frame[4:])
    assert batch == 7
    assert [(g[0], [[bytes(v) for v in m] for m in g[1]]) for g in decoded] == [
        (p, [[bytes(v) for v in m] for m in ms]) for p, ms in groups
    ]


def test_helper_takes_the_known_line_end_count_from_the_frame(tmp_path: Path) -> None:
    """A body whose count the sender knows is not counted again in the helper: ,W= is the sent."""
    body = b"a\nb\nc\n" * 100  # 300 LFs: counting gives W = S + 300
    head = b"H: x\n"
    groups: list[Group] = [(str(tmp_path / "m"), [(memoryview(head), memoryview(body))])]
    with names.known_line_ends(body, 7):  # deliberately wrong: only a taken count gives 7
        frame = _frame(1, groups)
    counted = _frame(2, groups)  # the same batch with nothing known
    out = io.BytesIO()
    assert serve_batches(io.BytesIO(frame + counted), out, "fsync") == 0
    assert not names._KNOWN
    size = len(head) + len(body)
    got = sorted(n for n in files_in(tmp_path / "m" / "new"))
    assert sorted(n.partition(",")[2] for n in got) == sorted(
        [f"S={size},W={size + 1 + 7}", f"S={size},W={size + 1 + 300}"]
    )


def test_more_than_65535_groups_and_a_too_many_parts_message() -> None:
    """70,000 Maildirs in one batch frame fine; a message of 256 parts is a clear ValueError."""
    groups: list[Group] = [(f"/m/{i}", [(memoryview(b"x"),)]) for i in range(70_000)]
    _, decoded = decode_request(_frame(1, groups)[4:])
    assert len(decoded) == 70_000
    assert decoded[-1][0] == "/m/69999"
    with pytest.raises(ValueError, match="256 parts; the helper takes 255"):
        encode_request(1, [("/m", [tuple(memoryview(b"x") for _ in range(256))])])


@pytest.mark.asyncio
async def test_a_message_of_too_many_parts_is_refused_at_deliver_not_in_the_batch(
    tmp_path: Path,
) -> None:
    """256 parts under the process writer: TooManyParts at deliver(); 10 callers beside it land."""
    assert ProcessWriter.max_parts == 255
    good = [(b"Subject: %d\r\n" % i, b"\r\nbody %d\r\n" % i) for i in range(9)]
    widest = tuple(b"%c" % (65 + i % 26) for i in range(255))  # the limit itself is fine
    bad = tuple(b"x" for _ in range(256))
    async with DeliveryExecutor(writer="process") as ex:
        res = await asyncio.gather(
            *(ex.deliver(tmp_path / "ok", m) for m in good[:5]),
            ex.deliver(tmp_path / "bad", bad),
            *(ex.deliver(tmp_path / "ok", m) for m in good[5:]),
            ex.deliver(tmp_path / "ok", widest),
            return_exceptions=True,
        )
    err = res.pop(5)
    assert isinstance(err, TooManyParts) and isinstance(err, ValueError)
    assert "256 parts; the ProcessWriter takes 255 at most" in str(err)
    assert all(isinstance(mid, MessageId) for mid in res), res
    got = [(tmp_path / "ok" / "new" / mid.name).read_bytes() for mid in res]  # type: ignore[union-attr]
    assert got == [b"".join(m) for m in (*good, widest)]
    assert len(files_in(tmp_path / "ok" / "new")) == 10
    assert not (tmp_path / "bad").exists()


@pytest.mark.asyncio
async def test_slices_of_one_buffer_are_separate_parts_through_the_helper(tmp_path: Path) -> None:
    """Parts that are slices of one bytes object cross the pipe as their own bytes, in order."""
    buf = bytes(range(256)) * 4
    view = memoryview(buf)
    messages = [
        (view[:300], view[300:]),  # the whole buffer, in two slices
        (view[512:], view[:512]),  # its halves swapped
        (view[10:20], view[10:20], memoryview(buf)),  # a slice twice, then the whole buffer
        (bytearray(b"head\r\n"), view[1000:]),
    ]
    writer = ProcessWriter()
    async with DeliveryExecutor(writer=writer) as ex:
        ids = await asyncio.gather(*(ex.deliver(tmp_path / "m", m) for m in messages))
        assert writer.pids[0] is not None  # written by the helper, not in a thread
    got = [(tmp_path / "m" / "new" / mid.name).read_bytes() for mid in ids]
    assert got == [b"".join(bytes(p) for p in m) for m in messages]
    assert got[0] == buf and got[1] == buf[512:] + buf[:512]


def test_reply_round_trip_keeps_error_type_errno_and_filename() -> None:
    """Ids, OSErrors (subclass, errno, filename) and other errors survive the pipe."""
    results: list[list[MessageId] | BaseException] = [
        [MessageId("1.M2P3Q4.h"), MessageId("1.M2P3Q5.h")],
        FileNotFoundError(errno.ENOENT, "No such file or directory", "/m/tmp/x"),
        OSError(errno.EIO, "Input/output error", None),
        ZeroDivisionError("bug"),
    ]
    frame = encode_reply(9, results, 4)
    batch, (decoded, syncs) = decode_reply(frame[4:])
    assert (batch, syncs) == (9, 4)
    assert decoded[0] == results[0]
    err = decoded[1]
    assert type(err) is FileNotFoundError
    assert isinstance(err, OSError)
    assert (err.errno, err.filename) == (errno.ENOENT, "/m/tmp/x")
    assert isinstance(decoded[2], OSError)
    assert decoded[2].errno == errno.EIO
    assert decoded[2].filename is None
    assert isinstance(decoded[3], RuntimeError)
    assert "ZeroDivisionError: bug" in str(decoded[3])


@pytest.mark.asyncio
async def test_delivers_through_the_helper_and_stops_it_on_close(tmp_path: Path) -> None:
    """200 deliveries to 3 Maildirs land byte for byte; aclose ends the helper cleanly."""
    writer = ProcessWriter()
    async with DeliveryExecutor(writer=writer) as ex:
        jobs = [(tmp_path / f"u{i % 3}", b"message %d\r\n" % i) for i in range(200)]
        ids = await asyncio.gather(*(ex.deliver(p, b) for p, b in jobs))
        proc = writer._helpers[0].proc
        assert proc is not None
        assert ex.stats().syncs > 0
    for mid, (path, body) in zip(ids, jobs, strict=True):
        assert (path / "new" / mid.name).read_bytes() == body
    assert proc.returncode == 0
    assert sum(len(files_in(tmp_path / f"u{i}" / "new")) for i in range(3)) == 200


@pytest.mark.asyncio
async def test_a_failing_path_fails_only_its_callers(tmp_path: Path) -> None:
    """ENOTDIR from the helper reaches only that path's callers, as NotADirectoryError."""
    (tmp_path / "file").write_bytes(b"")
    async with DeliveryExecutor(writer=ProcessWriter()) as ex:
        res = await asyncio.gather(
            ex.deliver(tmp_path / "file" / "box", b"x"),
            ex.deliver(tmp_path / "ok", b"y"),
            return_exceptions=True,
        )
    assert isinstance(res[0], NotADirectoryError)
    assert res[0].errno == errno.ENOTDIR
    assert str(tmp_path / "file") in str(res[0].filename)
    assert isinstance(res[1], MessageId)


@pytest.mark.asyncio
async def test_helper_death_fails_its_batch_and_the_next_batch_restarts_it(tmp_path: Path) -> None:
    """Killing the helper mid-batch gives BrokenPipeError; later deliveries succeed."""
    writer = ProcessWriter()
    async with DeliveryExecutor(writer=writer) as ex:
        await ex.deliver(tmp_path / "m", b"first")
        proc = writer._helpers[0].proc
        assert proc is not None
        os.kill(proc.pid, signal.SIGSTOP)  # the next batch is sent but never answered
        pending = asyncio.ensure_future(ex.deliver(tmp_path / "m", b"lost?"))
        while ex.stats().in_flight == 0:  # noqa: ASYNC110 - waiting for the send
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        assert not pending.done()
        os.kill(proc.pid, signal.SIGKILL)
        with pytest.raises(BrokenPipeError, match="writer process"):
            await pending
        after = await ex.deliver(tmp_path / "m", b"after")
        assert writer.restarts == 1
    assert (tmp_path / "m" / "new" / after.name).read_bytes() == b"after"


@pytest.mark.asyncio
async def test_helper_ignores_sigint_and_sigterm_mid_batch(tmp_path: Path) -> None:
    """SIGINT and SIGTERM reaching the helper while it holds a batch do not lose it."""
    writer = ProcessWriter()
    async with DeliveryExecutor(writer=writer) as ex:
        await ex.deliver(tmp_path / "m", b"one")
        proc = writer._helpers[0].proc
        assert proc is not None
        os.kill(proc.pid, signal.SIGSTOP)  # the batch below is sent and held, unanswered
        pending = asyncio.ensure_future(ex.deliver(tmp_path / "m", b"two"))
        while ex.stats().in_flight == 0:  # noqa: ASYNC110 - waiting for the send
            await asyncio.sleep(0.005)
        os.kill(proc.pid, signal.SIGINT)  # what a Ctrl-C or a service stop sends the group
        os.kill(proc.pid, signal.SIGTERM)
        os.kill(proc.pid, signal.SIGCONT)
        two = await pending
        assert writer.restarts == 0
        assert proc.returncode is None
    assert (tmp_path / "m" / "new" / two.name).read_bytes() == b"two"


@pytest.mark.asyncio
async def test_start_fails_fast_when_the_helper_cannot_run(tmp_path: Path) -> None:
    """An interpreter that cannot run makes start() raise OSError naming it, at once."""
    writer = ProcessWriter(python=str(tmp_path / "no-python"))
    with pytest.raises(OSError, match=r"writer helper .*no-python.* did not start"):
        await writer.start()
    ex = DeliveryExecutor(writer=writer)
    with pytest.raises(OSError, match="did not start"):
        await ex.__aenter__()


def test_bad_sync_is_rejected_before_any_process_starts() -> None:
    """ProcessWriter(sync=...) validates in the caller, not in the helper."""
    with pytest.raises(ValueError, match="sync must be one of"):
        ProcessWriter("sometimes")  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_two_helpers_share_the_batches_and_both_stop(tmp_path: Path) -> None:
    """helpers=2: concurrent batches go to both helpers; every message lands; both exit."""
    writer = ProcessWriter(helpers=2)
    async with DeliveryExecutor(writer=writer, max_batch=4) as ex:
        jobs = [(tmp_path / f"u{i % 5}", b"m %d\r\n" % i) for i in range(120)]
        ids = await asyncio.gather(*(ex.deliver(p, b) for p, b in jobs))
        procs = [h.proc for h in writer._helpers]
        assert all(p is not None for p in procs)
        assert len(set(writer.pids)) == 2
        assert all(h.batches > 1 for h in writer._helpers)  # start()'s ping is one each
    for mid, (path, body) in zip(ids, jobs, strict=True):
        assert (path / "new" / mid.name).read_bytes() == body
    assert all(p is not None and p.returncode == 0 for p in procs)
    with pytest.raises(ValueError, match="helpers must be >= 1, not 0"):
        ProcessWriter(helpers=0)
    with pytest.raises(TypeError, match="helpers must be an int, not bool"):
        ProcessWriter(helpers=True)  # a bool is not a count, as everywhere else


@pytest.mark.asyncio
async def test_the_pipe_to_the_helper_is_widened() -> None:
    """The request pipe holds 1 MiB (Linux's default cap), not 64 KiB: few writes per batch."""
    import fcntl

    writer = ProcessWriter()
    await writer.start()
    try:
        proc = writer._helpers[0].proc
        assert proc is not None and proc.stdin is not None
        pipe = proc.stdin.get_extra_info("pipe")
        assert fcntl.fcntl(pipe.fileno(), fcntl.F_GETPIPE_SZ) == min(PIPE_MAX, 1 << 20)
    finally:
        await writer.aclose()


@pytest.mark.asyncio
async def test_a_big_batch_is_written_in_a_thread_not_through_the_pipe(tmp_path: Path) -> None:
    """Past thread_above bytes a batch skips the helper (no pipe copy); small ones still use it."""
    writer = ProcessWriter(thread_above=64 * 1024)
    async with DeliveryExecutor(writer=writer) as ex:
        helper = writer._helpers[0]
        before = helper.batches
        big = b"x" * (200 * 1024)
        mid = await ex.deliver(tmp_path / "m", big)
        assert helper.batches == before  # the helper never saw it
        small = await ex.deliver(tmp_path / "m", b"small")
        assert helper.batches == before + 1
    assert (tmp_path / "m" / "new" / mid.name).read_bytes() == big
    assert (tmp_path / "m" / "new" / small.name).read_bytes() == b"small"
    assert mid.name.endswith(f",S={len(big)},W={len(big)}")


@pytest.mark.asyncio
async def test_a_body_shared_by_many_copies_counts_once_towards_thread_above(
    tmp_path: Path,
) -> None:
    """20 copies of one 100 KiB body (2 MB of copies, 100 KiB on the wire) go to the helper."""
    body = os.urandom(100 * 1024)
    boxes = [str(Maildir.create(tmp_path / f"u{i}").path) for i in range(20)]
    writer = ProcessWriter(thread_above=1 << 20)
    await writer.start()
    try:
        helper = writer._helpers[0]
        before = helper.batches
        results, _ = await writer.acommit([(box, [(memoryview(body),)]) for box in boxes])
        assert helper.batches == before + 1  # one frame through the pipe, not a thread
    finally:
        await writer.aclose()
    for box, ids in zip(boxes, results, strict=True):
        assert not isinstance(ids, BaseException), ids
        (mid,) = ids
        assert (Path(box) / "new" / mid.name).read_bytes() == body
