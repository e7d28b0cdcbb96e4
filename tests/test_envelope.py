"""Envelope conventions: DSN, X-Original-To, SMTPUTF8 headers, LMTPS, one copy per mailbox."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from delivery_executor import DeliveryExecutor, MailboxResolver, Maildir
from delivery_executor._native import speedups
from delivery_executor.smtp import DeliveryHandler, SessionFactory
from delivery_executor.smtp.dsn import DsnSyntaxError, original_recipient, xtext_decode
from delivery_executor.smtp.reader import (
    LINE_ENDS,
    NO_BARE_LF,
    BulkEnvelope,
    _Body,
    lf_body,
    raw_body_size,
)

from .helpers import listening
from .test_conventions import Client

pytestmark = pytest.mark.timeout(60)


@contextlib.asynccontextmanager
async def server(
    root: Path,
    *,
    lmtp: bool = True,
    resolver_kwargs: dict[str, Any] | None = None,
    **smtp_kwargs: Any,
) -> AsyncIterator[int]:
    """Our protocol, handler and executor on 127.0.0.1:<ephemeral>, SMTPUTF8 enabled."""
    loop = asyncio.get_running_loop()
    ex = DeliveryExecutor()
    handler = DeliveryHandler(
        ex, MailboxResolver(root, **(resolver_kwargs or {})), hostname="mx.test"
    )
    factory = SessionFactory(
        handler, lmtp=lmtp, max_connections=8, loop=loop, enable_SMTPUTF8=True, **smtp_kwargs
    )
    async with listening(factory, ex) as port:
        yield port


def stored(root: Path, *parts: str) -> list[bytes]:
    """The bytes of every message in ``new/`` of the Maildir ``root/parts``."""
    box = root.joinpath(*parts)
    if not (box / "new").exists():
        return []
    return [Path(e.path).read_bytes() for e in Maildir.open(box).scan_new()]


def header_block(msg: bytes) -> list[bytes]:
    """The header lines of ``msg`` (LF line ends), folded lines kept apart."""
    return msg.split(b"\n\n", 1)[0].split(b"\n")


async def transaction(
    c: Client, mail: str, rcpts: list[str], lmtp: bool = True
) -> tuple[list[str], list[str]]:
    """MAIL, each RCPT, DATA and a body: (the MAIL+RCPT first lines, the DATA replies)."""
    first = [(await c.command(mail))[0]]
    first += [(await c.command(r))[0] for r in rcpts]
    if not all(r.startswith("250") for r in first[1:]) or not first[0].startswith("250"):
        return first, []
    assert (await c.command("DATA"))[0].startswith("354")
    await c.send("Subject: t\r\n\r\nhi\r\n.\r\n")
    return first, [(await c.reply())[0] for _ in (rcpts if lmtp else rcpts[:1])]


# -- DSN ---------------------------------------------------------------------


def test_xtext_and_orcpt_decoding() -> None:
    """xtext +XX decodes to bytes; ORCPT gives the address, rfc822 or utf-8 (RFC 6533)."""
    assert xtext_decode("a+2Bb+3D") == b"a+b="
    assert original_recipient("rfc822;Alias+2Bx@example.org") == "Alias+x@example.org"
    assert original_recipient("rfc822;j+C3+B6rg@example.org") == "jörg@example.org"
    assert original_recipient("utf-8;j\\x{F6}rg@example.org") == "jörg@example.org"
    assert original_recipient("utf-8;jörg@example.org", utf8=True) == "jörg@example.org"
    for bad in ("alias@example.org", "rfc822;", ";a@b", "rfc822;a b", "rfc822;a=b",
                "rfc822;a+4", "rfc822;a+ZZ", "rfc822;a+00b", "rfc822;+FF",
                "utf-8;jörg@example.org", "utf-8;a\\x{110000}"):  # fmt: skip
        with pytest.raises(DsnSyntaxError):
            original_recipient(bad)


@pytest.mark.asyncio
@pytest.mark.parametrize("lmtp", [True, False])
async def test_dsn_is_advertised_and_its_parameters_accepted(tmp_path: Path, lmtp: bool) -> None:
    """LHLO/EHLO lists DSN; RET, ENVID, NOTIFY and ORCPT as Postfix sends them get 250."""
    async with server(tmp_path, lmtp=lmtp) as port, Client.connect(port) as c:
        await c.reply()
        hello = await c.command(f"{'LHLO' if lmtp else 'EHLO'} client.example")
        assert "250-DSN" in hello
        first, data = await transaction(
            c, "MAIL FROM:<s@example.net> SIZE=40 RET=HDRS ENVID=QQ+2B1",
            ["RCPT TO:<a@example.org> ORCPT=rfc822;Alias@example.org NOTIFY=SUCCESS,FAILURE",
             "RCPT TO:<b@example.org> notify=never orcpt=RFC822;b+2Bx@example.org"], lmtp,
        )  # fmt: skip
    assert [r[:9] for r in first] == ["250 2.1.0", "250 2.1.5", "250 2.1.5"]
    assert all(r.startswith("250 2.0.0") for r in data), data
    (a,) = stored(tmp_path, "example.org", "a")
    (b,) = stored(tmp_path, "example.org", "b")
    assert b"\nX-Original-To: Alias@example.org\nDelivered-To: a@example.org\n" in a
    assert b"\nX-Original-To: b+x@example.org\nDelivered-To: b@example.org\n" in b


@pytest.mark.asyncio
@pytest.mark.parametrize("lmtp", [True, False])
async def test_no_dsn_leaves_dsn_unadvertised_and_refuses_its_parameters(
    tmp_path: Path, lmtp: bool
) -> None:
    """dsn=False: no 250-DSN, DSN parameters get 555, plain mail is delivered as before."""
    async with server(tmp_path, lmtp=lmtp, dsn=False) as port, Client.connect(port) as c:
        await c.reply()
        hello = await c.command(f"{'LHLO' if lmtp else 'EHLO'} client.example")
        assert not any("DSN" in line for line in hello), hello
        assert any(line.startswith("250-PIPELINING") for line in hello), hello
        assert (await c.command("MAIL FROM:<s@example.net> RET=HDRS"))[0].startswith("555")
        assert (await c.command("MAIL FROM:<s@example.net>"))[0].startswith("250")
        refused = await c.command("RCPT TO:<a@example.org> NOTIFY=SUCCESS")
        accepted = await c.command("RCPT TO:<a@example.org>")
        assert refused[0].startswith("555") and accepted[0].startswith("250 2.1.5")
        assert (await c.command("DATA"))[0].startswith("354")
        await c.send("Subject: t\r\n\r\nhi\r\n.\r\n")
        assert (await c.reply())[0].startswith("250 2.0.0")
    (a,) = stored(tmp_path, "example.org", "a")
    assert b"\nX-Original-To: a@example.org\nDelivered-To: a@example.org\n" in a


BAD_PARAMS = [
    "MAIL FROM:<s@example.net> RET=BODY",
    "MAIL FROM:<s@example.net> RET=",
    "MAIL FROM:<s@example.net> RET=FULL RET=HDRS",
    "MAIL FROM:<s@example.net> ENVID=a=b",
    f"MAIL FROM:<s@example.net> ENVID={'x' * 101}",
    "RCPT TO:<a@example.org> NOTIFY=NEVER,SUCCESS",
    "RCPT TO:<a@example.org> NOTIFY=SOMETIMES",
    "RCPT TO:<a@example.org> NOTIFY",
    "RCPT TO:<a@example.org> ORCPT=a@example.org",
    "RCPT TO:<a@example.org> ORCPT=rfc822;a+4",
    "RCPT TO:<a@example.org> ORCPT=rfc822;a+00@example.org",
    f"RCPT TO:<a@example.org> ORCPT=rfc822;{'x' * 500}@example.org",
    "RCPT TO:<a@example.org> ORCPT=rfc822;a@example.org ORCPT=rfc822;b@example.org",
]


@pytest.mark.asyncio
@pytest.mark.parametrize("lmtp", [True, False])
async def test_malformed_dsn_parameters_get_501_and_unknown_ones_555(
    tmp_path: Path, lmtp: bool
) -> None:
    """Each malformed DSN parameter: 501 5.5.4, the session goes on; unknown ones: 555 5.5.4."""
    async with server(tmp_path, lmtp=lmtp) as port, Client.connect(port) as c:
        await c.reply()
        await c.command(f"{'LHLO' if lmtp else 'EHLO'} client.example")
        for line in BAD_PARAMS:
            if line.startswith("RCPT"):
                assert (await c.command("MAIL FROM:<s@example.net>"))[0].startswith("250")
            reply = (await c.command(line))[0]
            assert reply.startswith("501 5.5.4 Syntax error in "), (line, reply)
            assert (await c.command("RSET"))[0].startswith("250")
        assert (await c.command("MAIL FROM:<s@example.net> BOGUS=1"))[0][:9] == "555 5.5.4"
        assert (await c.command("MAIL FROM:<s@example.net> NOTIFY=NEVER"))[0][:9] == "555 5.5.4"
        assert (await c.command("MAIL FROM:<s@example.net> RET=FULL"))[0][:9] == "250 2.1.0"
        assert (await c.command("RCPT TO:<a@example.org> RET=FULL"))[0][:9] == "555 5.5.4"
        assert (await c.command("RCPT TO:<a@example.org> X=1 NOTIFY=NEVER"))[0][:9] == "555 5.5.4"
        _, data = await transaction(c, "RSET", ["RCPT TO:<a@example.org> NOTIFY=DELAY"], lmtp)
        assert data == []  # RSET cleared the MAIL: this RCPT got 503
        assert (await c.command("QUIT"))[0].startswith("221")
    assert stored(tmp_path, "example.org", "a") == []


@pytest.mark.asyncio
async def test_headers_order_and_per_recipient_values_in_a_multi_recipient_transaction(
    tmp_path: Path,
) -> None:
    """3 recipients: each copy has Return-Path, X-Original-To, Delivered-To, Received, in order."""
    async with server(tmp_path) as port, Client.connect(port) as c:
        await c.reply()
        await c.command("LHLO client.example")
        rcpts = ["RCPT TO:<a@example.org> ORCPT=rfc822;list@example.org",
                 "RCPT TO:<b@example.org>",
                 "RCPT TO:<c@example.org> ORCPT=rfc822;list@example.org"]  # fmt: skip
        _, data = await transaction(c, "MAIL FROM:<s@example.net>", rcpts)
    assert all(r.startswith("250 2.0.0") for r in data)
    for user, original in (("a", "list"), ("b", "b"), ("c", "list")):
        (msg,) = stored(tmp_path, "example.org", user)
        head = header_block(msg)
        assert head[:4] == [
            b"Return-Path: <s@example.net>",
            f"X-Original-To: {original}@example.org".encode(),
            f"Delivered-To: {user}@example.org".encode(),
            b"Received: from client.example ([127.0.0.1])",
        ], head
        assert head[4].startswith(b"\tby mx.test (delivery-executor) with LMTP id ")
        assert head[5] == f"\tfor <{user}@example.org>;".encode()
        assert head[7] == b"Subject: t"
        assert msg.count(b"@example.org>;") == 1  # no other recipient is named


# -- SMTPUTF8 ----------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("lmtp", [True, False])
async def test_utf8_recipient_lands_in_its_maildir_named_in_our_headers(
    tmp_path: Path, lmtp: bool
) -> None:
    """SMTPUTF8: jörg@ is stored in example.org/jörg and our headers name jörg, in UTF-8."""
    async with server(tmp_path, lmtp=lmtp) as port, Client.connect(port) as c:
        await c.reply()
        await c.command(f"{'LHLO' if lmtp else 'EHLO'} client.example")
        _, data = await transaction(
            c, "MAIL FROM:<sénder@example.net> SMTPUTF8",
            ["RCPT TO:<jörg@example.org> ORCPT=utf-8;J\\x{F6}rg@example.org"], lmtp,
        )  # fmt: skip
    assert data[0].startswith("250 2.0.0"), data
    assert stored(tmp_path, "example.org", "jrg") == []
    (msg,) = stored(tmp_path, "example.org", "jörg")
    head = header_block(msg)
    assert head[:3] == [
        "Return-Path: <sénder@example.net>".encode(),
        "X-Original-To: Jörg@example.org".encode(),
        "Delivered-To: jörg@example.org".encode(),
    ]
    assert "\tfor <jörg@example.org>;".encode() in head
    proto = "UTF8LMTP" if lmtp else "UTF8SMTP"
    assert any(line.endswith(f" with {proto} id".encode()) or f" with {proto} id ".encode() in line
               for line in head), head  # fmt: skip
    msg.decode("utf-8")  # valid UTF-8 throughout (RFC 6532)


@pytest.mark.asyncio
async def test_without_smtputf8_headers_stay_ascii(tmp_path: Path) -> None:
    """No SMTPUTF8: non-ASCII ORCPT gives X-Original-To = the RCPT (never 'jrg@'); jörg refused."""
    async with server(tmp_path) as port, Client.connect(port) as c:
        await c.reply()
        await c.command("LHLO client.example")
        _, data = await transaction(
            c, "MAIL FROM:<s@example.net>",
            ["RCPT TO:<a@example.org> ORCPT=rfc822;j+C3+B6rg@example.org"],
        )  # fmt: skip
        await c.command("MAIL FROM:<s@example.net>")
        refused = await c.command("RCPT TO:<jörg@example.org>")
    assert data[0].startswith("250 2.0.0")
    assert refused[0].startswith("553 5.6.7")
    (msg,) = stored(tmp_path, "example.org", "a")
    assert header_block(msg)[1] == b"X-Original-To: a@example.org"
    assert msg.isascii()


# -- STARTTLS: LMTPS / ESMTPS ------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("lmtp", [True, False])
async def test_received_says_lmtps_or_esmtps_after_starttls(
    tmp_path: Path, lmtp: bool, tls_files: tuple[Path, Path]
) -> None:
    """After STARTTLS our Received line says 'with LMTPS' / 'ESMTPS' (RFC 3848); before, not."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*tls_files)
    client_ctx = ssl.create_default_context(cafile=str(tls_files[0]))
    client_ctx.check_hostname = False
    hello = "LHLO" if lmtp else "EHLO"
    async with server(tmp_path, lmtp=lmtp, tls_context=ctx) as port:
        async with Client.connect(port) as c:
            await c.reply()
            await c.command(f"{hello} client.example")
            await transaction(c, "MAIL FROM:<s@example.net>", ["RCPT TO:<plain@example.org>"], lmtp)
        async with Client.connect(port) as c:
            await c.reply()
            await c.command(f"{hello} client.example")
            assert (await c.command("STARTTLS"))[0].startswith("220")
            await c.writer.start_tls(client_ctx)
            await c.command(f"{hello} client.example")
            _, data = await transaction(
                c, "MAIL FROM:<s@example.net>", ["RCPT TO:<tls@example.org>"], lmtp
            )
    assert data[0].startswith("250 2.0.0")
    (plain,) = stored(tmp_path, "example.org", "plain")
    (tls,) = stored(tmp_path, "example.org", "tls")
    base = "LMTP" if lmtp else "ESMTP"
    assert f" with {base} id ".encode() in plain
    assert f" with {base}S id ".encode() in tls


# -- one copy per mailbox ----------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("lmtp", [True, False])
async def test_same_mailbox_named_four_ways_is_stored_once(tmp_path: Path, lmtp: bool) -> None:
    """carol, carol, Carol, carol+x (no .x folder): one copy; every RCPT answered (LMTP: each)."""
    names = ["carol", "carol", "Carol", "carol+x"]
    async with (
        server(tmp_path, lmtp=lmtp, resolver_kwargs={"recipient_delimiter": "+",
               "detail_to_folder": True}) as port,
        Client.connect(port) as c,
    ):  # fmt: skip
        await c.reply()
        await c.command(f"{'LHLO' if lmtp else 'EHLO'} client.example")
        rcpts = [f"RCPT TO:<{n}@example.org>" for n in names] + ["RCPT TO:<dave@example.org>"]
        first, data = await transaction(c, "MAIL FROM:<s@example.net>", rcpts, lmtp)
    assert all(r.startswith("250") for r in first)
    if lmtp:
        assert len(data) == 5
        assert all(r.startswith("250 2.0.0") for r in data), data
        assert [r.split(">")[0] for r in data] == [
            f"250 2.0.0 <{n}@example.org" for n in [*names, "dave"]
        ]
        assert len({r.rsplit(" ", 1)[1] for r in data[:4]}) == 1  # one stored name
    else:
        assert data[0].startswith("250 2.0.0 Ok: delivered to 5 mailbox(es)")
    (copy,) = stored(tmp_path, "example.org", "carol")
    assert b"\nDelivered-To: carol@example.org\n" in copy
    assert len(stored(tmp_path, "example.org", "dave")) == 1


def _held(data: bytes) -> BulkEnvelope:
    """A fresh BulkEnvelope holding the raw body read from ``data`` (DATA's bytes)."""
    body = _Body(None, 1000)
    assert body.feed(data) == len(data) and body.done
    env = BulkEnvelope()
    env.hold(body)
    return env


def test_bulk_envelope_makes_its_content_once_on_first_read() -> None:
    """A held raw body becomes content and original_content on first read; writes still win."""
    assert raw_body_size(BulkEnvelope()) == -1 and lf_body(BulkEnvelope()) is None
    env = _held(b"a\r\n..b\r\n.\r\n")
    assert raw_body_size(env) == len(b"a\r\n.b\r\n")
    if speedups is not None:  # with the C helpers: straight from the raw buffer
        assert lf_body(env) == (b"a\n.b\n", 2)
    assert env.original_content == b"a\r\n.b\r\n"
    assert env.content is env.original_content
    assert getattr(env, NO_BARE_LF) is env.original_content and getattr(env, LINE_ENDS) == 2
    assert raw_body_size(env) == -1 and lf_body(env) is None  # made: the raw buffer is gone
    env.content = b"replaced"
    assert env.content == b"replaced" and env.original_content == b"a\r\n.b\r\n"
    other = _held(b"x\r\n.\r\n")
    other.original_content = b"set by a handler"  # a write while held makes the body first
    assert other.original_content == b"set by a handler" and other.content == b"x\r\n"


def test_a_shallow_copy_of_a_held_envelope_has_the_same_body() -> None:
    """copy.copy shares the held raw body: each copy, read in any order, gets the whole body,
    and the handler's sizing and LF path give up rather than read a buffer already made."""
    import copy

    for first_copy in (False, True):
        env = _held(b"a\r\n..b\r\nc\r\n.\r\n")
        snap = copy.copy(env)
        first, second = (snap, env) if first_copy else (env, snap)
        assert first.original_content == b"a\r\n.b\r\nc\r\n"
        assert raw_body_size(second) == -1 and lf_body(second) is None
        assert second.original_content == b"a\r\n.b\r\nc\r\n"
        assert second.content is second.original_content


def test_threads_reading_a_held_envelope_get_the_body() -> None:
    """Two threads making the content at once: neither sees None nor an empty body."""
    import sys
    import threading

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(300):
            env = _held(b"x" * 10 + b"\r\n..y\r\n.\r\n")
            out: list[object] = []

            def read(env: BulkEnvelope = env, out: list[object] = out) -> None:
                out.append(env.original_content)

            threads = [threading.Thread(target=read) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert out == [b"x" * 10 + b"\r\n.y\r\n"] * 2
    finally:
        sys.setswitchinterval(old)
