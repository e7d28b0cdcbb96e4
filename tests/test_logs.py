"""``BlockFileHandler``: INFO lines written in blocks on the loop's timer, WARNING at once,
nothing lost on close or fork, nothing written twice."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from delivery_executor.logs import BlockFileHandler, TextFormatter
from delivery_executor.testing import ServerProcess

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def logger(tmp_path: Path) -> Iterator[tuple[logging.Logger, Path]]:
    log = logging.getLogger(f"test.blocklog.{os.urandom(4).hex()}")
    log.propagate = False
    log.setLevel(logging.INFO)
    yield log, tmp_path / "serve.log"
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


def attach(log: logging.Logger, path: Path, interval: float) -> BlockFileHandler:
    handler = BlockFileHandler(path, interval)
    handler.setFormatter(TextFormatter())
    log.addHandler(handler)
    return handler


def lines(path: Path) -> list[str]:
    return [line.rsplit(": ", 1)[1] for line in path.read_text().splitlines()]


@pytest.mark.asyncio
async def test_info_waits_for_the_timer_and_warning_writes_everything(
    logger: tuple[logging.Logger, Path],
) -> None:
    """On a loop, INFO stays buffered (an hour's interval); a WARNING writes it and itself."""
    log, path = logger
    attach(log, path, interval=3600)
    log.info("first")
    log.info("second")
    assert path.read_text() == ""
    log.warning("third")
    assert lines(path) == ["first", "second", "third"]


@pytest.mark.asyncio
async def test_the_loop_timer_writes_info_lines(logger: tuple[logging.Logger, Path]) -> None:
    """With a short interval the loop's timer writes the buffered lines, once each."""
    log, path = logger
    attach(log, path, interval=0.01)
    for i in range(3):
        log.info("line %d", i)
    for _ in range(1000):  # bounded: 10 s at most
        if path.read_text():
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    assert lines(path) == ["line 0", "line 1", "line 2"]


def test_outside_a_loop_lines_are_written_at_once(logger: tuple[logging.Logger, Path]) -> None:
    """A record from a thread with no running loop is written immediately."""
    log, path = logger
    attach(log, path, interval=3600)
    log.info("no loop here")
    assert lines(path) == ["no loop here"]


@pytest.mark.asyncio
async def test_close_writes_what_is_buffered_and_is_idempotent(
    logger: tuple[logging.Logger, Path],
) -> None:
    """close() writes buffered lines; a second close() does nothing."""
    log, path = logger
    handler = attach(log, path, interval=3600)
    log.info("buffered")
    handler.close()
    handler.close()
    assert lines(path) == ["buffered"]


@pytest.mark.asyncio
async def test_fork_writes_buffered_lines_once(logger: tuple[logging.Logger, Path]) -> None:
    """Lines buffered at fork() are written by the parent before it, never by both."""
    log, path = logger
    handler = attach(log, path, interval=3600)
    log.info("before fork")
    pid = os.fork()
    if pid == 0:  # the child: log, write, leave without the parent's cleanup
        code = 1
        try:
            log.info("in the child")
            handler.flush()
            code = 0
        finally:
            os._exit(code)
    _, status = await asyncio.to_thread(os.waitpid, pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    log.info("after fork")
    handler.flush()
    assert lines(path) == ["before fork", "in the child", "after fork"]


def test_interval_must_be_positive(tmp_path: Path) -> None:
    """A zero or negative interval is a ValueError naming the value."""
    with pytest.raises(ValueError, match="interval must be > 0 seconds, not 0"):
        BlockFileHandler(tmp_path / "log", 0)


def test_logging_after_close_reopens_the_file(logger: tuple[logging.Logger, Path]) -> None:
    """A record after close() reopens the file, as logging.FileHandler does."""
    log, path = logger
    handler = attach(log, path, interval=3600)
    log.warning("one")
    handler.close()
    log.warning("two")
    assert lines(path) == ["one", "two"]


@pytest.mark.asyncio
async def test_a_failed_timed_write_is_reported_on_stderr(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A log file that cannot be written (/dev/full) is reported; the loop is unharmed."""
    if not os.access("/dev/full", os.W_OK):
        pytest.skip("no writable /dev/full")
    handler = BlockFileHandler("/dev/full", interval=0.01)
    log = logging.getLogger(f"test.blocklog.{os.urandom(4).hex()}")
    log.propagate = False
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        log.info("lost")
        for _ in range(1000):  # bounded: 10 s at most
            await asyncio.sleep(0.01)
            if "cannot write the log file" in capfd.readouterr().err:
                break
        else:
            pytest.fail("the failed write was not reported")
    finally:
        log.removeHandler(handler)
        with pytest.raises(OSError, match="No space left"):
            handler.close()  # the line is still buffered, and still cannot be written


def test_log_file_gets_the_listening_and_summary_lines(tmp_path: Path) -> None:
    """serve --log-file writes 'listening on' and 'summary:' into the file, not only to stdout."""
    log = tmp_path / "serve.log"
    with ServerProcess(tmp_path / "mail", "--log-file", str(log)) as srv:
        assert srv.stop(signal.SIGTERM) == 0
    text = log.read_text()
    assert f"listening on 127.0.0.1:{srv.port} (LMTP, pid {srv.pids[0]})" in text
    assert "summary: delivered 0, failed 0" in text
    assert srv.summary is not None  # stdout still has it
    assert sum("listening on" in line for line in srv.lines) == 1  # and once only
