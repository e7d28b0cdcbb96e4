"""Every script in examples/ runs against a real client and leaves its mail on disk."""

from __future__ import annotations

import asyncio
import re
import signal
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from delivery_executor.testing import free_port, send_message

from .helpers import files_in

pytestmark = pytest.mark.timeout(90)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@contextmanager
def example(name: str, *args: str) -> Iterator[tuple[int, list[str]]]:
    """Run examples/<name> with --port; yield the port and, after the block, its output."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / name), "--port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        first = proc.stdout.readline()
        assert first.startswith(f"listening on 127.0.0.1:{port}"), first + proc.stdout.read()
        yield port, lines
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        lines.extend(out.splitlines())
        assert proc.returncode == 0, lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def bodies(box: Path) -> list[bytes]:
    return [(box / "new" / n).read_bytes() for n in files_in(box / "new")]


def test_controller_smtp_example(tmp_path: Path) -> None:
    """controller_smtp.py: 30 messages over SMTP through a Controller thread all land."""
    with (
        example("controller_smtp.py", "--root", str(tmp_path)) as (port, out),
        smtplib.SMTP("127.0.0.1", port, timeout=30) as s,
    ):
        for i in range(30):
            s.sendmail("a@example.net", [f"user{i % 3}@example.org"], f"S: {i}\r\n\r\nx\r\n")
    assert out[-1] == "delivered 30"
    got = [b for u in range(3) for b in bodies(tmp_path / "example.org" / f"user{u}")]
    assert len(got) == 30
    assert {b.rpartition(b"S: ")[2] for b in got} == {b"%d\n\nx\n" % i for i in range(30)}


def test_create_server_lmtp_example(tmp_path: Path) -> None:
    """create_server_lmtp.py: LMTP with a + detail; each recipient gets its own copy."""
    rcpts = ["ann+news@example.org", "bo@example.org"]
    with example("create_server_lmtp.py", "--root", str(tmp_path)) as (port, out):
        # smtplib.LMTP reads one reply after DATA; LMTP sends one per recipient.
        replies = asyncio.run(
            send_message("127.0.0.1", port, mail_from="a@example.net", rcpts=rcpts, body=b"hi")
        )
    assert [r.code for r in replies] == [250, 250]
    assert out[-1] == "delivered 2"
    for user in ("ann", "bo"):
        (body,) = bodies(tmp_path / "example.org" / user)
        assert body.endswith(b"hi\n")


def test_own_handler_example(tmp_path: Path) -> None:
    """own_handler.py: a custom handler files one copy per domain; other domains are refused."""
    with (
        example("own_handler.py", "--root", str(tmp_path)) as (port, out),
        smtplib.SMTP("127.0.0.1", port, timeout=30) as s,
    ):
        s.sendmail("a@example.net", ["x@example.org", "y@example.org"], "S: one\r\n\r\n1\r\n")
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            s.sendmail("a@example.net", ["../../etc@evil.test"], "no")
    assert out[-1] == "delivered 1"
    assert bodies(tmp_path / "example.org") == [b"S: one\r\n\r\n1\r\n"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["example.org"]


def test_threaded_example(tmp_path: Path) -> None:
    """threaded.py: 400 messages from 16 threads with deliver_sync, all on disk, batched."""
    out = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "threaded.py"),
            "--root",
            str(tmp_path),
            "--messages",
            "400",
            "--threads",
            "16",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert out.startswith("delivered 400 messages in ")
    assert sum(len(bodies(tmp_path / f"user{u}")) for u in range(10)) == 400


def _code(line: str) -> str:
    """A line without indentation and trailing comment (README aligns its comments)."""
    return line.split("  #", 1)[0].strip()


def test_readme_snippets_are_the_examples_code() -> None:
    """Each README snippet under "`examples/X.py`:" is X's own lines, in order."""
    readme = (EXAMPLES.parent / "README.md").read_text()
    found = re.findall(r"`examples/(\w+\.py)`:\n\n```python\n(.*?)```", readme, re.S)
    assert {name for name, _ in found} == {p.name for p in EXAMPLES.glob("*.py")}
    for name, snippet in found:
        source = [_code(line) for line in (EXAMPLES / name).read_text().splitlines()]
        at = 0
        for line in filter(None, map(_code, snippet.splitlines())):
            assert line in source[at:], f"README's {name} snippet: {line!r} not in the file"
            at = source.index(line, at) + 1
