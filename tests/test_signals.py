"""Signals to serve on asyncio and uvloop: TERM/INT drain, HUP reopens logs and never stops, USR1.

Servers here start the way a background job of a non-interactive shell or a
careless parent would start them: INT, TERM and HUP ignored and all four
signals blocked (both survive ``execve``).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from pathlib import Path

import pytest

from delivery_executor import Maildir
from delivery_executor.testing import ServerProcess, send_message

from .helpers import children

pytestmark = pytest.mark.timeout(120)

_SUMMARY = re.compile(r"summary: delivered (\d+), failed (\d+)")
_OURS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)


def _hostile_inheritance() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, _OURS)


def _loop(name: str) -> str:
    if name == "uvloop":
        pytest.importorskip("uvloop")
    return name


def _deliver(port: int, n: int, start: int = 0) -> int:
    async def run() -> int:
        ok = 0
        for i in range(start, start + n):
            replies = await send_message(
                "127.0.0.1", port, mail_from="s@x.org", rcpts=["alice@example.org"],
                body=f"Subject: m{i}\r\n\r\nbody {i}\r\n".encode(),
            )  # fmt: skip
            ok += replies[0].code == 250
        return ok

    return asyncio.run(run())


def _wait_in_file(path: Path, text: str, count: int = 1, timeout: float = 15) -> str:
    """The file's text once ``text`` appears ``count`` times in it (bounded wait)."""
    deadline = time.monotonic() + timeout
    while True:
        data = path.read_text() if path.exists() else ""
        if data.count(text) >= count:
            return data
        assert time.monotonic() < deadline, f"{text!r} x{count} not in {path}: {data!r}"
        time.sleep(0.05)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_hup_reopens_log_usr1_reports_term_drains(tmp_path: Path, loop: str) -> None:
    """HUP after logrotate reopens the log and keeps serving; USR1 logs stats; TERM drains."""
    root, log = tmp_path / "mail", tmp_path / "serve.log"
    args = ["--loop", _loop(loop), "--log-file", str(log), "--hostname", "mx.test"]
    with ServerProcess(root, *args, preexec_fn=_hostile_inheritance) as srv:
        (helper,) = children(srv.pids[0])
        blocked = re.search(r"SigBlk:\s*(\w+)", Path(f"/proc/{helper}/status").read_text())
        assert blocked is not None
        assert int(blocked.group(1), 16) == 0, "the writer helper inherited blocked signals"
        assert _deliver(srv.port, 2) == 2
        log.rename(tmp_path / "serve.log.1")  # what logrotate does
        srv.proc.send_signal(signal.SIGHUP)
        _wait_in_file(log, "SIGHUP: reopened 1 log file(s)")
        assert srv.proc.poll() is None
        assert _deliver(srv.port, 1, start=2) == 1
        srv.proc.send_signal(signal.SIGUSR1)
        line = _wait_in_file(log, "stats: delivered 3, failed 0, batches ")
        assert "connections 0 (refused 0)" in line
        assert srv.stop(signal.SIGTERM) == 0
    (summary,) = [m for line in srv.lines if (m := _SUMMARY.search(line))]
    assert summary.groups() == ("3", "0")
    assert len(Maildir.open(root / "example.org" / "alice").scan_new()) == 3


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_sigint_drains_even_if_inherited_ignored(tmp_path: Path, loop: str) -> None:
    """SIGINT, inherited ignored and blocked, still drains and prints the summary."""
    root = tmp_path / "mail"
    with ServerProcess(root, "--loop", _loop(loop), preexec_fn=_hostile_inheritance) as srv:
        assert _deliver(srv.port, 1) == 1
        assert srv.stop(signal.SIGINT) == 0
    (summary,) = [m for line in srv.lines if (m := _SUMMARY.search(line))]
    assert summary.groups() == ("1", "0")


def test_workers_pass_hup_and_usr1_on_and_stop_together(tmp_path: Path) -> None:
    """--workers 2: HUP and USR1 to the parent reach both workers and stop none; TERM drains."""
    root, log = tmp_path / "mail", tmp_path / "serve.log"
    with ServerProcess(root, "--log-file", str(log), workers=2) as srv:
        srv.proc.send_signal(signal.SIGHUP)
        _wait_in_file(log, "SIGHUP: reopened 1 log file(s)", count=2)
        assert _deliver(srv.port, 4) == 4
        srv.proc.send_signal(signal.SIGUSR1)
        _wait_in_file(log, "stats: delivered", count=2)
        assert srv.proc.poll() is None
        assert srv.stop(signal.SIGTERM) == 0
    assert sum(int(m.group(1)) for line in srv.lines if (m := _SUMMARY.search(line))) == 4
    assert "workers exited: [0, 0]" in srv.lines


def test_a_dead_worker_stops_the_service(tmp_path: Path) -> None:
    """A worker killed from outside: the parent stops the other and exits non-zero."""
    with ServerProcess(tmp_path / "mail", workers=2) as srv:
        victim = srv.pids[0]
        os.kill(victim, signal.SIGKILL)
        srv.proc.wait(30)  # no signal from us: it must stop on its own
        code = srv.stop()  # collects the rest of its output
    assert code == 1
    (line,) = [x for x in srv.lines if x.startswith("workers exited:")]
    codes = sorted(int(c) for c in line.split("[")[1].rstrip("]").split(","))
    assert codes == [-9, 0]  # the victim, and the other one stopped cleanly
    assert any(_SUMMARY.search(x) for x in srv.lines)  # the survivor drained
