"""Stopping ``serve``: the grace, ``421 4.3.2`` at MAIL and at the end, failures counted plainly."""

from __future__ import annotations

import asyncio
import builtins
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from delivery_executor import DeliveryExecutor, MailboxResolver, Maildir, errors
from delivery_executor.server import ServerConfig
from delivery_executor.server import core as server_core
from delivery_executor.server.core import serve
from delivery_executor.server.listeners import ListenSpec
from delivery_executor.server.metrics import start_metrics, take_snapshot
from delivery_executor.server.signals import Running
from delivery_executor.smtp import DeliveryHandler
from delivery_executor.testing import ServerProcess, free_port

pytestmark = pytest.mark.timeout(90)

SHUTTING_DOWN = "421 4.3.2 Service shutting down"
BODY = b"Subject: s\r\n\r\nbody\r\n.\r\n"
# Every exception class a reply could leak: ours and Python's.
CLASS_NAMES = re.compile(
    r"\b("
    + "|".join(
        sorted(
            {*errors.__all__}
            | {
                n
                for n, v in vars(builtins).items()
                if isinstance(v, type) and issubclass(v, BaseException)
            }
        )
    )
    + r")\b"
)


class Line:
    """A bare SMTP/LMTP client: one command, one reply (the last line of it)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> Line:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        line = cls(reader, writer)
        assert (await line.reply()).startswith("220")
        assert (await line.command("LHLO client.example")).startswith("250")
        return line

    async def reply(self) -> str:
        """The next reply's last line ('' at EOF)."""
        while True:
            raw = await self.reader.readline()
            if not raw:
                return ""
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            if len(text) < 4 or text[3] != "-":
                return text

    async def command(self, line: str | bytes) -> str:
        self.writer.write(line if isinstance(line, bytes) else line.encode() + b"\r\n")
        return await self.reply()

    async def at_eof(self) -> bool:
        """True once the server has closed the connection (nothing more to read)."""
        return await self.reader.read() == b""

    def close(self) -> None:
        self.writer.close()


async def _started(config: ServerConfig) -> tuple[asyncio.Task[Any], Running, asyncio.Event]:
    """``serve(config)`` as a task in this loop, once it listens."""
    stop = asyncio.Event()
    ready: asyncio.Future[Running] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(config, stop, on_ready=ready.set_result))
    async with asyncio.timeout(20):
        running = await asyncio.shield(ready)
    return task, running, stop


def _port(running: Running) -> int:
    port: int = running.listeners[0].sock.getsockname()[1]
    return port


def _config(root: Path, **kw: Any) -> ServerConfig:
    return ServerConfig(
        root=root, listen=[ListenSpec.parse("127.0.0.1:0")], writer="loop", hostname="mx.test", **kw
    )


@pytest.mark.asyncio
@pytest.mark.uvloop
async def test_stop_waits_grace_then_says_421_and_refuses_new_mail(tmp_path: Path) -> None:
    """After a stop: a started DATA finishes, MAIL gets 421, an idle session 421 after --grace."""
    grace = 1.5
    task, running, stop = await _started(_config(tmp_path, grace=grace))
    port = _port(running)
    busy = await Line.connect(port)
    idle = await Line.connect(port)
    try:
        assert (await busy.command("MAIL FROM:<s@x.org>")).startswith("250")
        assert (await busy.command("RCPT TO:<alice@example.org>")).startswith("250")
        assert (await busy.command("DATA")).startswith("354")
        stop.set()
        stopped = time.monotonic()
        await asyncio.sleep(0.3)  # inside the grace: the transfer goes on
        assert (await busy.command(BODY)).startswith("250 2.0.0")
        assert await busy.command("MAIL FROM:<s@x.org>") == SHUTTING_DOWN
        assert await busy.at_eof()
        async with asyncio.timeout(grace + 10):
            last = await idle.reply()
        waited = time.monotonic() - stopped
        assert last == SHUTTING_DOWN
        assert waited >= grace - 0.1, f"closed {waited:.2f} s after the stop, grace {grace}"
        assert await idle.at_eof()
        summary = await asyncio.wait_for(task, 20)
    finally:
        busy.close()
        idle.close()
        stop.set()
    assert summary.delivered == 1
    assert len(Maildir.open(tmp_path / "example.org" / "alice").scan_new()) == 1


@pytest.mark.asyncio
@pytest.mark.uvloop
async def test_a_session_delivering_at_the_end_of_grace_gets_its_reply_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy still being written when --grace ends is answered 250, then 421: no duplicate."""
    task, running, stop = await _started(_config(tmp_path, grace=0.2))
    executor = running.executor
    real = executor.deliver

    async def slow(path: str, body: Any) -> Any:
        await asyncio.sleep(1.0)  # still writing when the grace is over
        return await real(path, body)

    monkeypatch.setattr(executor, "deliver", slow)
    line = await Line.connect(_port(running))
    try:
        await line.command("MAIL FROM:<s@x.org>")
        await line.command("RCPT TO:<alice@example.org>")
        assert (await line.command("DATA")).startswith("354")
        line.writer.write(BODY)
        await asyncio.sleep(0.1)  # the body is in; the DATA hook is running
        stop.set()
        assert (await line.reply()).startswith("250 2.0.0")
        assert await line.reply() == SHUTTING_DOWN
        await asyncio.wait_for(task, 20)
    finally:
        line.close()
        stop.set()


@pytest.mark.asyncio
async def test_failed_copies_are_counted_and_named_plainly(tmp_path: Path) -> None:
    """A failed copy's 451 counts in the snapshot and the summary alike, and names no class."""
    (tmp_path / "example.org").mkdir()
    (tmp_path / "example.org" / "bad").write_bytes(b"a file where a Maildir should be")
    task, running, stop = await _started(_config(tmp_path, grace=1.0))
    handler = running.sessions.handler
    assert isinstance(handler, DeliveryHandler)
    line = await Line.connect(_port(running))
    try:
        await line.command("MAIL FROM:<s@x.org>")
        await line.command("RCPT TO:<alice@example.org>")
        await line.command("RCPT TO:<bad@example.org>")
        line.writer.write(b"DATA\r\n")
        assert (await line.reply()).startswith("354")
        first = await line.command(BODY)
        second = await line.reply()
        assert first.startswith("250 2.0.0") and second.startswith("451 4.3.0 <bad@example.org>")
        assert "Not a directory" in second and not CLASS_NAMES.search(second)
        snap = take_snapshot(running.executor, handler, running.sessions)
        assert snap.failed == handler.failed == 1
    finally:
        line.close()
        stop.set()
    summary = await asyncio.wait_for(task, 20)
    assert summary.failed == 1 and summary.delivered == 1


@pytest.mark.asyncio
async def test_executor_closed_is_a_counted_451_without_its_class_name(tmp_path: Path) -> None:
    """A handler whose executor has closed answers 451 'service shutting down' and counts it."""
    from aiosmtpd.smtp import Envelope, Session

    executor = DeliveryExecutor()
    await executor.aclose()
    handler = DeliveryHandler(executor, MailboxResolver(tmp_path), hostname="mx.test")
    env = Envelope()
    env.mail_from = "s@x.org"
    env.original_content = b"Subject: s\r\n\r\nbody\r\n"
    session = Session(asyncio.get_running_loop())
    for rcpt in ("a@example.org", "b@example.org"):
        assert (await handler.handle_RCPT(None, session, env, rcpt, [])).startswith("250")  # type: ignore[arg-type]
    reply = await handler.handle_DATA(None, session, env)  # type: ignore[arg-type]
    assert reply == "451 4.3.0 Delivery failed; try again later"
    assert handler.failed == 2
    snap = take_snapshot(executor, handler, None)
    assert snap.failed == 2  # the executor itself never saw them
    for exc in (OSError("no errno"), errors.InvalidMaildirPath("x"), KeyError("x")):
        text = handler._failure("a@example.org", exc)
        assert text.startswith("451 4.3.0 <a@example.org> Temporary local failure: ")
        assert not CLASS_NAMES.search(text), text


@pytest.mark.asyncio
async def test_a_listener_that_fails_to_start_closes_the_metrics_endpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If start_serving fails, serve closes the metrics HTTP server it started before raising."""
    pytest.importorskip("prometheus_client")
    started: list[Any] = []

    async def spy(*args: Any) -> Any:
        metrics = await start_metrics(*args)
        started.append(metrics)
        return metrics

    async def broken(*_args: Any) -> Any:
        raise OSError(98, "cannot serve")

    monkeypatch.setattr(server_core, "start_metrics", spy)
    monkeypatch.setattr(server_core, "start_serving", broken)
    port = free_port()
    config = _config(tmp_path, metrics=("127.0.0.1", port))
    with pytest.raises(OSError, match="cannot serve"):
        await serve(config, asyncio.Event())
    (metrics,) = started
    assert metrics._http is None  # stopped: its thread joined, its socket closed
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)


def test_sigterm_under_load_refuses_mail_with_421_and_counts_every_451(tmp_path: Path) -> None:
    """SIGTERM, --grace 1, 8 busy LMTP sessions: MAIL 250 or 421, every session ends on 421,
    no class name on the wire, summary delivered/failed equal what the clients were told."""
    root = tmp_path / "mail"
    (root / "example.org").mkdir(parents=True)
    (root / "example.org" / "bad").write_bytes(b"not a Maildir")
    replies: list[tuple[str, str]] = []
    ends: list[str] = []

    async def client(port: int, begun: asyncio.Event, count: list[int]) -> None:
        line = await Line.connect(port)
        last = ""
        try:
            for _ in range(300):
                last = await line.command("MAIL FROM:<s@x.org>")
                replies.append(("MAIL", last))
                if not last.startswith("250"):
                    break
                for rcpt in ("alice@example.org", "bad@example.org"):
                    last = await line.command(f"RCPT TO:<{rcpt}>")
                    replies.append(("RCPT", last))
                last = await line.command("DATA")
                if not last.startswith("354"):
                    replies.append(("DATA", last))
                    break
                for i in range(2):
                    last = await (line.command(BODY) if i == 0 else line.reply())
                    replies.append(("COPY", last))
                count[0] += 1
                if count[0] >= 40:
                    begun.set()
            ends.append(last)
            assert await line.at_eof()
        finally:
            line.close()

    async def load(srv: ServerProcess) -> None:
        begun = asyncio.Event()
        count = [0]
        async with asyncio.timeout(30):
            tasks = [asyncio.create_task(client(srv.port, begun, count)) for _ in range(8)]
            await begun.wait()
            os.kill(srv.proc.pid, signal.SIGTERM)
            await asyncio.gather(*tasks)

    with ServerProcess(root, "--grace", "1") as srv:
        asyncio.run(load(srv))
        assert srv.stop(signal.SIGTERM) == 0
    assert len(ends) == 8 and all(e == SHUTTING_DOWN for e in ends), ends
    leaked = [text for _, text in replies if CLASS_NAMES.search(text)]
    assert not leaked, leaked[:3]
    mail = [text for kind, text in replies if kind == "MAIL"]
    assert all(t.startswith("250") or t == SHUTTING_DOWN for t in mail)
    copies = [text for kind, text in replies if kind == "COPY"]
    ok = sum(t.startswith("250") for t in copies)
    failed = sum(t.startswith("4") for t in copies)
    assert failed >= 40 and ok >= 40
    m = re.search(r"summary: delivered (\d+), failed (\d+)", srv.summary or "")
    assert m, srv.lines[-5:]
    assert (int(m.group(1)), int(m.group(2))) == (ok, failed)
    assert len(Maildir.open(root / "example.org" / "alice").scan_new()) == ok
