"""Hostile input at the SMTP layer: control characters, header injection, hidden paths."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import Envelope, Session

from delivery_executor import DeliveryExecutor, MailboxResolver, ThreadWriter, write_batch
from delivery_executor.errors import RecipientRejected
from delivery_executor.smtp import DeliveryHandler, SessionFactory
from delivery_executor.writers import BatchResult, Group

from .helpers import files_in, listening

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]


@contextlib.asynccontextmanager
async def lmtp_server(root: Path, executor: DeliveryExecutor) -> AsyncIterator[int]:
    loop = asyncio.get_running_loop()
    handler = DeliveryHandler(executor, MailboxResolver(root), line_endings="crlf")
    factory = SessionFactory(handler, lmtp=True, max_connections=8, loop=loop, enable_SMTPUTF8=True)
    async with listening(factory, executor) as port:
        yield port


async def dialogue(port: int, lines: Sequence[bytes]) -> list[bytes]:
    """Send each line, read one reply line for each (greeting first); then QUIT."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        replies = [await reader.readline()]
        for line in lines:
            writer.write(line)
            reply = await reader.readline()
            while reply[3:4] == b"-":  # multi-line (LHLO)
                reply = await reader.readline()
            replies.append(reply)
        writer.write(b"QUIT\r\n")
        await reader.readline()
        return replies
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def headers(message: bytes) -> list[bytes]:
    return message.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


@pytest.mark.parametrize(
    "sender", [b"a\x00b@example.net", b"a\x01b@example.net", b"a\x7fb@example.net",
               b'"a\rX-Injected: 1"@example.net', "a\x85b@example.net".encode()],
    ids=["nul", "soh", "del", "quoted-cr", "c1-nel"],
)  # fmt: skip
async def test_control_characters_in_mail_from_get_553(tmp_path: Path, sender: bytes) -> None:
    """MAIL FROM with NUL/control characters gets 553 5.1.7; a clean MAIL after it works."""
    async with lmtp_server(tmp_path, DeliveryExecutor()) as port:
        replies = await dialogue(
            port,
            [
                b"LHLO client.example\r\n",
                b"MAIL FROM:<" + sender + b">\r\n",
                b"RCPT TO:<a@example.org>\r\n",  # no sender yet: refused
                b"MAIL FROM:<s@example.net>\r\n",
                b"RCPT TO:<a@example.org>\r\n",
                b"DATA\r\n",
                b"Subject: hi\r\n\r\nbody\r\n.\r\n",
            ],
        )
    codes = [r[:3] for r in replies]
    assert codes == [b"220", b"250", b"553", b"503", b"250", b"250", b"354", b"250"]
    assert replies[2].startswith(b"553 5.1.7 ")
    (name,) = files_in(tmp_path / "example.org" / "a" / "new")
    message = (tmp_path / "example.org" / "a" / "new" / name).read_bytes()
    assert headers(message)[0] == b"Return-Path: <s@example.net>"


async def test_the_null_sender_is_accepted(tmp_path: Path) -> None:
    """MAIL FROM:<> (the sender of bounces) is accepted with 250 2.1.0."""
    async with lmtp_server(tmp_path, DeliveryExecutor()) as port:
        replies = await dialogue(
            port,
            [b"LHLO c\r\n", b"MAIL FROM:<>\r\n", b"RCPT TO:<a@example.org>\r\n", b"DATA\r\n",
             b"Subject: bounce\r\n\r\nx\r\n.\r\n"],
        )  # fmt: skip
    assert [r[:3] for r in replies] == [b"220", b"250", b"250", b"250", b"354", b"250"]
    assert replies[2] == b"250 2.1.0 Ok\r\n"


async def test_a_bare_cr_in_lhlo_cannot_inject_a_header(tmp_path: Path) -> None:
    """LHLO 'x<CR>X-Injected: 1': the Received line keeps no CR and no X-Injected header."""
    async with lmtp_server(tmp_path, DeliveryExecutor()) as port:
        replies = await dialogue(
            port,
            [b"LHLO evil\rX-Injected: 1\x0b\r\n", b"MAIL FROM:<s@example.net>\r\n",
             b"RCPT TO:<a@example.org>\r\n", b"DATA\r\n", b"Subject: hi\r\n\r\nbody\r\n.\r\n"],
        )  # fmt: skip
    assert replies[-1].startswith(b"250")
    (name,) = files_in(tmp_path / "example.org" / "a" / "new")
    message = (tmp_path / "example.org" / "a" / "new" / name).read_bytes()
    ours = message[: message.index(b"Subject: hi")]
    assert b"\r" not in ours.replace(b"\r\n", b"") and b"\x0b" not in ours
    assert not any(line.lstrip().startswith(b"X-Injected") for line in headers(message))
    assert b"from evilX-Injected: 1 (" in ours.replace(b"\r\n\t", b" ")


async def test_handler_strips_crlf_from_every_client_value_it_writes(tmp_path: Path) -> None:
    """Sender, recipient and HELO with CRLF in them (another front end) inject no header."""
    loop = asyncio.get_running_loop()
    async with DeliveryExecutor() as ex:
        handler = DeliveryHandler(ex, MailboxResolver(tmp_path), line_endings="crlf")
        server = LMTP(handler, loop=loop)
        session = Session(loop)
        session.peer = ("192.0.2.1", 25)  # type: ignore[assignment]
        session.host_name = "helo\r\nX-Helo: 1"
        env = Envelope()
        env.mail_from = "s@x\r\nX-From: 1"
        assert await handler.handle_RCPT(server, session, env, "a@example.org", []) == (
            "250 2.1.5 Ok"
        )
        env.rcpt_tos[0] = "a@example.org\r\nX-Rcpt: 1"
        env.original_content = b"Subject: s\r\n\r\nb\r\n"
        reply = await handler.handle_DATA(server, session, env)
    assert reply.startswith("250")
    (name,) = files_in(tmp_path / "example.org" / "a" / "new")
    message = (tmp_path / "example.org" / "a" / "new" / name).read_bytes()
    lines = headers(message)
    assert not any(line.startswith((b"X-Helo", b"X-From", b"X-Rcpt")) for line in lines)
    assert lines[0] == b"Return-Path: <s@xX-From: 1>"
    assert b"\r" not in message.replace(b"\r\n", b"")


async def test_a_multi_recipient_message_is_held_once(tmp_path: Path) -> None:
    """Three LMTP recipients: three (headers, body) copies sharing ONE body object."""
    seen: list[Group] = []

    def spy(groups: Sequence[Group]) -> BatchResult:
        seen.extend(groups)
        return write_batch(groups)

    body = b"Subject: big\r\n\r\n" + (b"x" * 98 + b"\r\n") * 1000
    async with lmtp_server(tmp_path, DeliveryExecutor(writer=ThreadWriter(spy))) as port:
        replies = await dialogue(
            port,
            [b"LHLO c\r\n", b"MAIL FROM:<s@example.net>\r\n", b"RCPT TO:<a@example.org>\r\n",
             b"RCPT TO:<b@example.org>\r\n", b"RCPT TO:<c@example.org>\r\n", b"DATA\r\n",
             body + b".\r\n"],
        )  # fmt: skip
        assert replies[-1].startswith(b"250")
    messages = [parts for _, msgs in seen for parts in msgs]
    assert len(messages) == 3 and all(len(parts) == 2 for parts in messages)
    assert len({id(parts[1].obj) for parts in messages}) == 1  # one body for all three
    for user in "abc":
        (name,) = files_in(tmp_path / "example.org" / user / "new")
        assert (tmp_path / "example.org" / user / "new" / name).read_bytes().endswith(body)


@pytest.mark.parametrize("mapped", [".hidden", "a/.b", "sub/../.x", ".", ""], ids=repr)
async def test_a_mapper_answer_with_a_hidden_or_empty_part_is_refused(
    tmp_path: Path, mapped: str
) -> None:
    """A mapper returning '.hidden', 'a/.b' or the root itself is refused with 553 5.1.3."""
    resolver = MailboxResolver(tmp_path, mapper=lambda local, domain: mapped)
    with pytest.raises(RecipientRejected) as ei:
        resolver.resolve("a@example.org")
    assert ei.value.reply.startswith("553 5.1.3")
    assert not os.listdir(tmp_path)
