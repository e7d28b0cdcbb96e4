"""``delivery-executor serve`` as a real process: start, deliver, drain, workers, SIGKILL."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from delivery_executor import Maildir
from delivery_executor.testing import ServerProcess, SMTPClientError, free_port, send_message

pytestmark = pytest.mark.timeout(120)

_SUMMARY = re.compile(r"summary: delivered (\d+), failed (\d+), batches (\d+)")


def body_for(token: str) -> bytes:
    return f"Subject: {token}\r\n\r\ntoken {token}\r\n".encode() + b"x" * 400 + b"\r\nEND\r\n"


async def _send_many(port: int, n: int, rcpt: str = "alice@example.org", lmtp: bool = True) -> int:
    ok = 0
    for i in range(n):
        replies = await send_message(
            "127.0.0.1", port, mail_from="s@x.org", rcpts=[rcpt], body=body_for(f"m{i}"), lmtp=lmtp
        )
        ok += all(r.code == 250 for r in replies)
    return ok


def test_serve_delivers_and_drains_on_sigterm(tmp_path: Path) -> None:
    """serve announces its address, delivers, and on SIGTERM exits 0 with a summary."""
    with ServerProcess(tmp_path / "mail") as srv:
        assert asyncio.run(_send_many(srv.port, 10)) == 10
        assert srv.stop(signal.SIGTERM) == 0
    (summary,) = [m for line in srv.lines if (m := _SUMMARY.search(line))]
    assert summary.group(1) == "10"
    assert any(f"delivering into {tmp_path / 'mail'}" in line for line in srv.lines)
    assert len(Maildir.open(tmp_path / "mail" / "example.org" / "alice").scan_new()) == 10


def test_serve_smtp_mode_and_sigint(tmp_path: Path) -> None:
    """--smtp speaks SMTP; SIGINT drains like SIGTERM."""
    with ServerProcess(tmp_path / "mail", "--smtp") as srv:
        assert asyncio.run(_send_many(srv.port, 3, lmtp=False)) == 3
        assert srv.stop(signal.SIGINT) == 0
    assert any("(SMTP," in line for line in srv.lines)


def test_serve_rejects_a_bad_listen_address(tmp_path: Path) -> None:
    """A malformed --listen exits 2 with one line that names the value."""
    res = subprocess.run(
        [sys.executable, "-m", "delivery_executor", "serve", "--listen", "nonsense"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 2
    assert "expected HOST:PORT, [IPv6]:PORT, unix:PATH or fd:N, got 'nonsense'" in res.stderr
    assert res.stderr.count("\n") == 1


def test_two_workers_share_the_port_and_both_drain(tmp_path: Path) -> None:
    """--workers 2 starts two listeners on one port; SIGTERM to the parent drains both."""
    port = free_port()
    with ServerProcess(tmp_path / "mail", port=port, workers=2) as srv:
        assert srv.ports == [port, port]
        assert len(set(srv.pids)) == 2

        async def load() -> int:
            counts = await asyncio.gather(
                *(_send_many(port, 10, f"u{k}@example.org") for k in range(8))
            )
            return sum(counts)

        assert asyncio.run(load()) == 80
        assert srv.stop(signal.SIGTERM) == 0
    summaries = [m for line in srv.lines if (m := _SUMMARY.search(line))]
    assert len(summaries) == 2
    assert sum(int(m.group(1)) for m in summaries) == 80
    total = sum(
        len(Maildir.open(p).scan_new()) for p in (tmp_path / "mail" / "example.org").iterdir()
    )
    assert total == 80


def test_sigkill_under_load_loses_no_acknowledged_message(tmp_path: Path) -> None:
    """SIGKILL mid-load: every 250-acknowledged message is in new/ whole; nothing partial."""
    root = tmp_path / "mail"
    acked: dict[str, str] = {}  # token -> recipient

    async def session(port: int, n: int, stop: asyncio.Event) -> None:
        i = 0
        while not stop.is_set() and i < 2000:
            token = f"s{n}m{i}"
            rcpt = f"user{(n + i) % 8}@example.org"
            try:
                replies = await send_message(
                    "127.0.0.1", port, mail_from="s@x.org", rcpts=[rcpt], body=body_for(token)
                )
            except (OSError, SMTPClientError):
                return  # the server is gone
            if replies[0].code == 250:
                acked[token] = rcpt
            i += 1

    with ServerProcess(root) as srv:

        async def load() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()

            def kill() -> None:
                srv.kill()
                stop.set()

            loop.call_later(1.5, kill)
            await asyncio.gather(*(session(srv.port, n, stop) for n in range(32)))

        asyncio.run(load())
    assert len(acked) > 50, "the load never got going"

    found: dict[str, bytes] = {}
    for box in (root / "example.org").iterdir():
        for entry in Maildir.open(box).scan_new():
            data = entry.path.read_bytes()
            m = re.search(rb"\ntoken (s\d+m\d+)\n", data)
            assert m, f"partial or foreign file in new/: {entry.path}"
            token = m.group(1).decode()
            stored = body_for(token).replace(b"\r\n", b"\n")  # serve stores LF by default
            assert data.endswith(stored), f"incomplete message {entry.path}"
            found[token] = data
    missing = sorted(set(acked) - set(found))
    assert not missing, f"acknowledged but lost: {missing[:10]}"
    # A restart's cleanup_tmp leaves a clean Maildir and keeps every message.
    for box in (root / "example.org").iterdir():
        md = Maildir.open(box)
        md.cleanup_tmp(0)
        assert list((box / "tmp").iterdir()) == []
    assert sum(len(Maildir.open(b).scan_new()) for b in (root / "example.org").iterdir()) == len(
        found
    )
