"""Memory held by ``serve`` under hostile DATA: bounded by the message size, not the line count."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from delivery_executor.testing import ServerProcess

from .helpers import children, files_in

pytestmark = pytest.mark.timeout(180)

MiB = 1024 * 1024


def peak_rss(pid: int) -> int:
    """VmHWM (peak resident set) of ``pid``, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def lmtp(port: int, rcpts: list[str], body_chunks: list[bytes]) -> list[bytes]:
    """One LMTP transaction over a raw socket; the replies after DATA, one per line."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"LHLO c\r\n")
        while f.readline()[3:4] == b"-":
            pass
        s.sendall(b"MAIL FROM:<s@example.net>\r\n")
        assert f.readline().startswith(b"250")
        for r in rcpts:
            s.sendall(f"RCPT TO:<{r}>\r\n".encode())
            assert f.readline().startswith(b"250")
        s.sendall(b"DATA\r\n")
        assert f.readline().startswith(b"354")
        for chunk in body_chunks:
            s.sendall(chunk)
        s.sendall(b".\r\n")
        return [f.readline() for _ in rcpts]


def warm(port: int) -> None:
    for _ in range(20):
        assert lmtp(port, ["warm@example.org"], [b"Subject: w\r\n\r\nwarm\r\n"])[0][:3] == b"250"


def test_thirty_mib_of_empty_lines_costs_about_its_size(tmp_path: Path) -> None:
    """A 30 MiB body of empty lines: serve's peak RSS grows by under 3 x 32 MiB (was 2.5 GiB)."""
    with ServerProcess(tmp_path / "m", "--max-size", str(32 * MiB)) as srv:
        warm(srv.port)
        before = peak_rss(srv.pids[0])
        chunk = b"\r\n" * (MiB // 2)  # 1 MiB of empty lines
        replies = lmtp(srv.port, ["alice@example.org"], [chunk] * 30)
        after = peak_rss(srv.pids[0])
        assert srv.stop() == 0
    assert replies[0].startswith(b"250"), replies
    grew = after - before
    print(f"\npeak RSS {before / MiB:.0f} -> {after / MiB:.0f} MiB (+{grew / MiB:.0f} MiB)")
    assert grew < 3 * 32 * MiB
    (name,) = files_in(tmp_path / "m" / "example.org" / "alice" / "new")
    assert os.path.getsize(tmp_path / "m" / "example.org" / "alice" / "new" / name) > 15 * MiB


def test_a_ten_mib_message_to_100_recipients_is_held_once(tmp_path: Path) -> None:
    """10 MiB to 100 recipients: 100 copies on disk, serve grows by under 3 x 10 MiB.

    A batch of over 1 MiB of distinct bodies is written in a thread of serve
    (``THREAD_ABOVE``), so the helper never holds this one: it grows by
    less than 10 MiB. (The pipe path's sharing is in test_process_writer.)
    """
    rcpts = [f"user{i}@example.org" for i in range(100)]
    line = b"x" * 998 + b"\r\n"
    body = b"Subject: big\r\n\r\n" + line * (10 * MiB // len(line) - 1)
    with ServerProcess(tmp_path / "m", "--max-size", str(11 * MiB)) as srv:
        warm(srv.port)
        (helper,) = children(srv.pids[0])
        before = peak_rss(srv.pids[0]), peak_rss(helper)
        replies = lmtp(srv.port, rcpts, [body])
        after = peak_rss(srv.pids[0]), peak_rss(helper)
        assert srv.stop() == 0
    assert all(r.startswith(b"250") for r in replies), replies[:3]
    grew = [(a - b) / MiB for a, b in zip(after, before, strict=True)]
    print(f"\nserver +{grew[0]:.0f} MiB, helper +{grew[1]:.0f} MiB")
    assert after[0] - before[0] < 3 * 10 * MiB
    assert after[1] - before[1] < 10 * MiB
    for r in rcpts[::33]:
        box = tmp_path / "m" / "example.org" / r.partition("@")[0] / "new"
        (name,) = files_in(box)
        assert (box / name).read_bytes().endswith(body.replace(b"\r\n", b"\n"))
    total = sum(
        len(files_in(tmp_path / "m" / "example.org" / f"user{i}" / "new")) for i in range(100)
    )
    assert total == 100
