"""The aiosmtpd handler over real loopback connections: replies, headers, caps, faults."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from delivery_executor import (
    DeliveryExecutor,
    MailboxResolver,
    ThreadWriter,
    write_batch,
)
from delivery_executor.smtp import DeliveryHandler, SessionFactory
from delivery_executor.smtp.data_budget import DataBudget
from delivery_executor.testing import Reply, send_message
from delivery_executor.writers import BatchResult, Group

from .helpers import files_in

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]

BODY = b"From: s@example.net\r\nSubject: hi\r\n\r\nHello.\r\n.leading dot\r\n"
LF_BODY = BODY.replace(b"\r\n", b"\n")  # as stored by default (line_endings="lf")


@contextlib.asynccontextmanager
async def server(
    root: Path,
    *,
    lmtp: bool = True,
    executor: DeliveryExecutor | None = None,
    max_connections: int = 64,
    resolver_kwargs: dict[str, Any] | None = None,
    **handler_kwargs: Any,
) -> AsyncIterator[tuple[int, DeliveryHandler, SessionFactory]]:
    """An SMTP/LMTP server on 127.0.0.1:<ephemeral> delivering under ``root``."""
    loop = asyncio.get_running_loop()
    ex = executor or DeliveryExecutor()
    handler = DeliveryHandler(
        ex, MailboxResolver(root, **(resolver_kwargs or {})), **handler_kwargs
    )
    factory = SessionFactory(
        handler,
        lmtp=lmtp,
        max_connections=max_connections,
        loop=loop,
        data_size_limit=handler.max_message_size,
        enable_SMTPUTF8=True,
    )
    srv = await loop.create_server(factory, "127.0.0.1", 0)
    try:
        yield srv.sockets[0].getsockname()[1], handler, factory
    finally:
        srv.close()
        await srv.wait_closed()
        await ex.aclose()


def mailbox(root: Path, domain: str, local: str) -> list[bytes]:
    d = root / domain / local / "new"
    return [(d / n).read_bytes() for n in files_in(d)] if d.exists() else []


async def send(port: int, rcpts: list[str], body: bytes = BODY, lmtp: bool = True) -> list[Reply]:
    return await send_message(
        "127.0.0.1", port, mail_from="s@example.net", rcpts=rcpts, body=body, lmtp=lmtp
    )


async def test_lmtp_one_reply_per_recipient_in_order_with_duplicates(tmp_path: Path) -> None:
    """LMTP: one 250 per recipient, duplicates included; a mailbox named twice gets one copy."""
    async with server(tmp_path) as (port, _, _):
        replies = await send(port, ["alice@example.org", "bob@example.org", "alice@example.org"])
    assert [r.code for r in replies] == [250, 250, 250]
    assert [r.rcpt for r in replies] == [
        "alice@example.org",
        "bob@example.org",
        "alice@example.org",
    ]
    assert all("delivered as" in r.text for r in replies)
    assert len(mailbox(tmp_path, "example.org", "alice")) == 1
    assert len(mailbox(tmp_path, "example.org", "bob")) == 1
    assert replies[0].text == replies[2].text  # both answered by the one stored copy


async def test_headers_are_prepended_and_the_body_kept_exact(tmp_path: Path) -> None:
    """With line_endings="crlf", each copy is our headers, then the body byte for byte."""
    async with server(tmp_path, line_endings="crlf") as (port, _, _):
        await send(port, ["Alice@Example.org"])
    (msg,) = mailbox(tmp_path, "example.org", "alice")
    assert msg.startswith(
        b"Return-Path: <s@example.net>\r\nX-Original-To: Alice@Example.org\r\n"
        b"Delivered-To: Alice@Example.org\r\n"
    )
    assert b"\r\nReceived: from client.invalid ([127.0.0.1])\r\n\tby " in msg
    assert b"with LMTP id" in msg
    assert b"for <Alice@Example.org>;" in msg
    assert msg.endswith(BODY)  # dot-stuffing undone, nothing else changed


async def test_lf_is_the_default_in_headers_and_body(tmp_path: Path) -> None:
    """By default every stored line ends in LF alone, our headers' included, as in Dovecot."""
    async with server(tmp_path) as (port, _, _):
        await send(port, ["Alice@Example.org", "bob@example.org"])
    (alice,) = mailbox(tmp_path, "example.org", "alice")
    (bob,) = mailbox(tmp_path, "example.org", "bob")
    for msg in (alice, bob):
        assert b"\r" not in msg
        assert msg.endswith(LF_BODY)
        assert b"\nReceived: from client.invalid ([127.0.0.1])\n\tby " in msg
    assert alice.startswith(
        b"Return-Path: <s@example.net>\nX-Original-To: Alice@Example.org\n"
        b"Delivered-To: Alice@Example.org\n"
    )


async def test_lf_conversion_touches_only_crlf_pairs(tmp_path: Path) -> None:
    """A bare CR or bare LF inside a line is kept; only CRLF pairs become LF."""
    body = b"Subject: odd\r\n\r\na\rb\r\nc\nd\r\n\r\r\n"
    async with server(tmp_path, add_headers=False) as (port, _, _):
        await send(port, ["a@example.org"], body)
    assert mailbox(tmp_path, "example.org", "a") == [b"Subject: odd\n\na\rb\nc\nd\n\r\n"]


async def test_headers_can_be_turned_off(tmp_path: Path) -> None:
    """add_headers=False with line_endings="crlf" stores exactly what the client sent."""
    async with server(tmp_path, add_headers=False, line_endings="crlf") as (port, _, _):
        await send(port, ["a@example.org"])
    assert mailbox(tmp_path, "example.org", "a") == [BODY]


async def test_lmtp_failure_concerns_only_its_recipient(tmp_path: Path) -> None:
    """A recipient whose Maildir cannot be created gets 451 4.3.0; the others 250."""
    (tmp_path / "example.org").mkdir()
    (tmp_path / "example.org" / "broken").write_bytes(b"a file, not a Maildir")
    async with server(tmp_path) as (port, _, _):
        replies = await send(port, ["ok@example.org", "broken@example.org", "ok2@example.org"])
    assert [r.code for r in replies] == [250, 451, 250]
    assert replies[1].text.startswith("4.3.0 <broken@example.org>")
    assert "Not a directory" in replies[1].text
    assert len(mailbox(tmp_path, "example.org", "ok")) == 1
    assert len(mailbox(tmp_path, "example.org", "ok2")) == 1


async def test_smtp_250_only_when_every_copy_is_durable(tmp_path: Path) -> None:
    """SMTP answers one 250 when all copies land, and one 451 if any fails."""
    (tmp_path / "example.org").mkdir()
    (tmp_path / "example.org" / "broken").write_bytes(b"")
    async with server(tmp_path, lmtp=False) as (port, _, _):
        good = await send(port, ["a@example.org", "b@example.org"], lmtp=False)
        bad = await send(port, ["c@example.org", "broken@example.org"], lmtp=False)
    assert {r.code for r in good} == {250}
    assert "delivered to 2 mailbox(es)" in good[0].text
    assert {r.code for r in bad} == {451}
    assert bad[0].text.startswith("4.3.0")
    assert len(mailbox(tmp_path, "example.org", "c")) == 1  # landed: a retry may duplicate it


@pytest.mark.parametrize("lmtp", [True, False])
async def test_oversized_message_gets_552_per_recipient(tmp_path: Path, lmtp: bool) -> None:
    """A body over max_message_size gets 552 5.3.4 (once per recipient in LMTP)."""
    async with server(tmp_path, lmtp=lmtp, max_message_size=1000) as (port, _, _):
        big = b"x" * 70 + b"\r\n"
        replies = await send(port, ["a@example.org", "b@example.org"], big * 80, lmtp=lmtp)
        long_line = await send(port, ["a@example.org", "b@example.org"], b"y" * 5000, lmtp=lmtp)
        after = await send(port, ["a@example.org"], b"small\r\n", lmtp=lmtp)
    assert [r.code for r in replies] == [552, 552]
    assert all(r.text.startswith("5.3.4") for r in replies)
    assert [r.code for r in long_line] == [500, 500]
    assert long_line[0].text.startswith("5.6.0 Line too long")
    assert after[0].code == 250
    assert len(mailbox(tmp_path, "example.org", "a")) == 1


@pytest.mark.uvloop
async def test_handler_limit_holds_when_the_protocol_allows_more(tmp_path: Path) -> None:
    """The reader's body, held unmade, is still sized against the handler's max_message_size."""
    ex = DeliveryExecutor()
    handler = DeliveryHandler(ex, MailboxResolver(tmp_path), max_message_size=1000)
    loop = asyncio.get_running_loop()
    factory = SessionFactory(handler, lmtp=True, loop=loop, max_connections=4)  # 32 MiB limit
    srv = await loop.create_server(factory, "127.0.0.1", 0)
    try:
        port = srv.sockets[0].getsockname()[1]
        big = await send(port, ["a@example.org", "b@example.org"], (b"x" * 70 + b"\r\n") * 80)
        small = await send(port, ["a@example.org"], b"..small\r\n")
    finally:
        srv.close()
        await srv.wait_closed()
        await ex.aclose()
    assert [r.code for r in big] == [552, 552] and big[0].text.startswith("5.3.4")
    assert small[0].code == 250
    (stored,) = mailbox(tmp_path, "example.org", "a")
    assert stored.endswith(b"\n..small\n")  # send_message stuffs, the reader unstuffs; LF ends


async def test_rcpt_rejections_carry_their_reason(tmp_path: Path) -> None:
    """Hostile, foreign-domain and unknown recipients are refused at RCPT with a reason."""
    kwargs = {"domains": ["example.org"], "existing_only": True}
    async with server(tmp_path, resolver_kwargs=kwargs) as (port, _, _):
        from delivery_executor import Maildir

        Maildir.create(tmp_path / "example.org" / "known")
        replies = await send(
            port,
            ["../../etc@example.org", "a@elsewhere.net", "ghost@example.org", "known@example.org"],
        )
    assert [r.code for r in replies] == [553, 550, 550, 250]
    assert "'/'" in replies[0].text
    assert replies[1].text.startswith("5.7.1")
    assert replies[2].text.startswith("5.1.1")
    assert files_in(tmp_path) == ["example.org"]


async def test_too_many_recipients_get_452(tmp_path: Path) -> None:
    """RCPTs past max_recipients get 452 4.5.3; the accepted ones are delivered."""
    async with server(tmp_path, max_recipients=2) as (port, _, _):
        replies = await send(port, ["a@example.org", "b@example.org", "c@example.org"])
    assert [r.code for r in replies] == [250, 250, 452]


async def test_connection_cap_answers_421(tmp_path: Path) -> None:
    """Past max_connections a new connection gets 421 4.3.2 and is closed."""
    async with server(tmp_path, max_connections=1) as (port, _, factory):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await reader.readline()).startswith(b"220")
        r2, w2 = await asyncio.open_connection("127.0.0.1", port)
        assert await r2.readline() == b"421 4.3.2 Too many connections, try again later\r\n"
        assert await r2.read() == b""
        w2.close()
        writer.close()
        await writer.wait_closed()
        await asyncio.wait_for(factory.idle.wait(), 5)
        assert factory.refused == 1
        replies = await send(port, ["a@example.org"])  # the slot is free again
    assert replies[0].code == 250


async def test_client_disconnect_during_delivery_does_not_lose_or_crash(tmp_path: Path) -> None:
    """A client that hangs up while its copy is being written leaves it written, no errors."""
    gate = threading.Event()

    def gated(groups: Sequence[Group]) -> BatchResult:
        gate.wait(20)
        return write_batch(groups)

    ex = DeliveryExecutor(writer=ThreadWriter(gated))
    async with server(tmp_path, executor=ex) as (port, _, factory):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        for line in (b"LHLO c\r\n", b"MAIL FROM:<s@x.org>\r\n", b"RCPT TO:<a@example.org>\r\n"):
            writer.write(line)
        writer.write(b"DATA\r\nSubject: x\r\n\r\nbye\r\n.\r\n")
        while ex.stats().in_flight == 0:  # noqa: ASYNC110 - state changes in a thread
            await asyncio.sleep(0.005)
        writer.close()  # hang up before the reply
        await asyncio.wait_for(factory.idle.wait(), 5)
        gate.set()
        replies = await send(port, ["b@example.org"])
    assert replies[0].code == 250
    (msg,) = mailbox(tmp_path, "example.org", "a")
    assert msg.endswith(b"Subject: x\n\nbye\n")


async def test_executor_closed_gives_451_not_an_exception(tmp_path: Path) -> None:
    """If the executor is already closed, DATA gets 451 for each recipient."""
    ex = DeliveryExecutor()
    await ex.aclose()
    async with server(tmp_path, executor=ex) as (port, _, _):
        replies = await send(port, ["a@example.org", "b@example.org"])
    assert [r.code for r in replies] == [451, 451]
    assert "service shutting down" in replies[0].text  # not the class name: ExecutorClosed
    assert "ExecutorClosed" not in replies[0].text


async def test_many_concurrent_sessions_share_batches(tmp_path: Path) -> None:
    """32 concurrent LMTP sessions × 5 messages all land, in batches larger than 1."""
    async with server(tmp_path) as (port, handler, _):

        async def session(n: int) -> list[int]:
            codes = []
            for i in range(5):
                rs = await send(port, [f"user{n % 4}@example.org"], b"msg %d %d\r\n" % (n, i))
                codes += [r.code for r in rs]
            return codes

        codes = await asyncio.gather(*(session(n) for n in range(32)))
        assert isinstance(handler.executor, DeliveryExecutor)
        stats = handler.executor.stats()
    assert {c for cs in codes for c in cs} == {250}
    total = sum(len(mailbox(tmp_path, "example.org", f"user{k}")) for k in range(4))
    assert total == 160
    assert stats.delivered == 160
    assert stats.mean_batch_size > 1


async def test_handler_rejects_bad_configuration(tmp_path: Path) -> None:
    """Wrong types or sizes for the handler raise at construction, naming the value."""
    ex = DeliveryExecutor()
    res = MailboxResolver(tmp_path)
    with pytest.raises(TypeError, match="executor must be a DeliveryExecutor"):
        DeliveryHandler(object(), res)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="resolver must be a MailboxResolver"):
        DeliveryHandler(ex, "root")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_message_size must be >= 1, not 0"):
        DeliveryHandler(ex, res, max_message_size=0)
    with pytest.raises(ValueError, match="max_connections must be >= 1"):
        SessionFactory(DeliveryHandler(ex, res), lmtp=True, max_connections=0, loop=None)  # type: ignore[arg-type]


async def test_smtp_limits_refuse_bools_and_strings_with_type_error(tmp_path: Path) -> None:
    """Handler, sessions and DATA budget check numbers as validate does: bool is a TypeError."""
    handler = DeliveryHandler(DeliveryExecutor(), MailboxResolver(tmp_path))
    loop = asyncio.get_running_loop()
    with pytest.raises(TypeError, match="max_recipients must be an int, not bool"):
        DeliveryHandler(DeliveryExecutor(), MailboxResolver(tmp_path), max_recipients=True)
    with pytest.raises(TypeError, match="min_rate must be an int, not bool"):
        SessionFactory(handler, lmtp=True, max_connections=1, loop=loop, min_rate=True)
    for name in ("session_timeout", "rate_grace", "evict_idle", "data_wait", "write_stall"):
        for bad, exc, says in (
            (True, TypeError, ""),
            ("5", TypeError, ""),
            (0, ValueError, " > 0"),
        ):
            kwargs: dict[str, Any] = {name: bad}
            with pytest.raises(exc, match=f"{name} must be seconds{says}"):
                SessionFactory(handler, lmtp=True, max_connections=1, loop=loop, **kwargs)
    with pytest.raises(TypeError, match="max_bytes must be an int, not bool"):
        DataBudget(True)
    with pytest.raises(ValueError, match="cap must be >= 0, not -1"):
        DataBudget(10).hold(-1)


async def test_each_recipient_is_resolved_once(tmp_path: Path) -> None:
    """The path resolved at RCPT is reused at DATA: the mapper runs once per address
    of the transaction (an address named twice is resolved once)."""
    calls: list[str] = []

    def mapper(local: str, domain: str) -> str:
        calls.append(local)
        return f"{domain}/{local}"

    async with server(tmp_path, resolver_kwargs={"mapper": mapper}) as (port, _, _):
        replies = await send(port, ["a@example.org", "b@example.org", "a@example.org"])
    assert [r.code for r in replies] == [250, 250, 250]
    assert calls == ["a", "b"]
    assert len(mailbox(tmp_path, "example.org", "a")) == 1  # one mailbox, one copy
