"""The trace headers the handler prepends: client text is capped and kept to printable ASCII."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import Envelope, Session

from delivery_executor import MailboxResolver
from delivery_executor.smtp import DeliveryHandler

pytestmark = pytest.mark.timeout(30)


class Capture:
    """A deliverer that keeps each copy's bytes."""

    def __init__(self) -> None:
        self.copies: list[bytes] = []

    async def deliver(self, path: str, body: bytes, /) -> object:
        self.copies.append(body)
        return f"id{len(self.copies)}"


BODY = b"Subject: s\r\n\r\nbody\r\n"


async def _headers(tmp_path: Path, *, helo: str, sender: str) -> list[bytes]:
    """The lines our handler put in front of BODY for a client that said ``helo``, ``sender``."""
    sink = Capture()
    handler = DeliveryHandler(sink, MailboxResolver(tmp_path), hostname="mx.test")
    session = Session(asyncio.get_running_loop())
    session.host_name = helo
    session.peer = ("127.0.0.1", 4000)  # type: ignore[assignment]  # aiosmtpd types it as str
    env = Envelope()
    env.mail_from = sender
    env.original_content = BODY
    rcpt = "alice@example.org"
    assert (await handler.handle_RCPT(None, session, env, rcpt, [])).startswith("250")  # type: ignore[arg-type]
    server = LMTP.__new__(LMTP)  # only its class matters to handle_DATA (one reply per rcpt)
    reply = await handler.handle_DATA(server, session, env)
    assert reply.startswith("250"), reply
    (copy,) = sink.copies
    assert copy.endswith(b"Subject: s\n\nbody\n")
    return copy[: -len(b"Subject: s\n\nbody\n")].split(b"\n")[:-1]


@pytest.mark.asyncio
async def test_a_huge_helo_and_sender_stay_under_the_998_octet_line_limit(tmp_path: Path) -> None:
    """A 5,000-character HELO and sender are cut: every header line <= 998 octets (RFC 5322)."""
    lines = await _headers(tmp_path, helo="h" * 5000, sender="s" * 5000 + "@x.org")
    assert lines, "no headers"
    assert max(len(line) for line in lines) <= 998, [len(line) for line in lines]
    assert any(line.startswith(b"Received: from hhhh") for line in lines)


@pytest.mark.asyncio
async def test_non_ascii_and_control_characters_never_reach_a_header(tmp_path: Path) -> None:
    """A HELO with non-ASCII, NUL, CR/LF (a header injection) becomes plain printable ASCII."""
    helo = "caf\u00e9.example\r\nX-Injected: 1\x00\u2028end"
    lines = await _headers(tmp_path, helo=helo, sender="s\u00e9@x.org")
    for line in lines:
        assert line.isascii(), line
        text = line.decode("ascii")
        assert text.lstrip("\t").isprintable(), line
    assert not any(line.startswith(b"X-Injected") for line in lines)
    received = b"\n".join(lines)
    assert b"Received: from caf.exampleX-Injected: 1end" in received
    assert b"Return-Path: <s@x.org>" in received
