"""A Sieve hook that fails never costs a message: the copy goes to INBOX, the reply is 250."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from delivery_executor import DeliveryExecutor, MailboxResolver, Maildir
from delivery_executor.sieve.hook import Route, SieveFilter
from delivery_executor.sieve.message import MessageView
from delivery_executor.smtp import DeliveryHandler, SessionFactory
from delivery_executor.testing import send_message

from .helpers import files_in, listening

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]

BODY = b"From: s@example.net\r\nSubject: hi\r\n\r\nHello.\r\n"


class Raising(SieveFilter):
    """A filter with a bug: every route() raises."""

    def route(
        self, maildir: str, message: bytes | MessageView, sender: str, recipient: str
    ) -> list[Route]:
        raise RuntimeError("a bug in the filter")


class NoScript(SieveFilter):
    """No script applies to anyone: deliver as usual."""

    def route(
        self, maildir: str, message: bytes | MessageView, sender: str, recipient: str
    ) -> None:
        return None


class FlagsLost(SieveFilter):
    """Asks for the \\Seen flag in a Maildir whose cur/ has gone, so the flag move fails."""

    def route(
        self, maildir: str, message: bytes | MessageView, sender: str, recipient: str
    ) -> list[Route]:
        Maildir.cached(maildir)  # made now, so the delivery does not make cur/ again
        shutil.rmtree(Path(maildir) / "cur")
        return [Route(maildir, "S")]


@contextlib.asynccontextmanager
async def lmtp(root: Path, sieve: SieveFilter) -> AsyncIterator[int]:
    """An LMTP server on 127.0.0.1 with ``sieve``; yields the port."""
    ex = DeliveryExecutor()
    handler = DeliveryHandler(ex, MailboxResolver(root), sieve=sieve)
    factory = SessionFactory(handler, lmtp=True, max_connections=4, loop=asyncio.get_running_loop())
    async with listening(factory, ex) as port:
        yield port


@pytest.mark.parametrize("sieve", [Raising, NoScript])
async def test_a_failing_or_absent_filter_delivers_to_inbox(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, sieve: type[SieveFilter]
) -> None:
    """route() raising or answering None: 250 and the message in INBOX's new/ (logged if raised)."""
    with caplog.at_level(logging.ERROR, "delivery_executor.smtp"):
        async with lmtp(tmp_path, sieve(user_scripts=False)) as port:
            replies = await send_message(
                "127.0.0.1",
                port,
                mail_from="s@example.net",
                rcpts=["a@x.org"],
                body=BODY,
                lmtp=True,
            )
    assert [r.code for r in replies] == [250]
    (name,) = files_in(tmp_path / "x.org" / "a" / "new")
    assert (tmp_path / "x.org" / "a" / "new" / name).read_bytes().endswith(b"\n\nHello.\n")
    logged = [r.getMessage() for r in caplog.records]
    assert logged == (
        ["sieve failed for <a@x.org>; delivering to INBOX"] if sieve is Raising else []
    )


async def test_a_flagged_copy_whose_cur_is_gone_is_refused_for_a_retry(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A flagged copy goes straight into cur/ in the commit: with cur/ gone it gets 451, no file."""
    with caplog.at_level(logging.ERROR, "delivery_executor.smtp"):
        async with lmtp(tmp_path, FlagsLost(user_scripts=False)) as port:
            replies = await send_message(
                "127.0.0.1",
                port,
                mail_from="s@example.net",
                rcpts=["a@x.org"],
                body=BODY,
                lmtp=True,
            )
    box = tmp_path / "x.org" / "a"
    assert [r.code for r in replies] == [451]
    assert files_in(box / "new") == [] and not (box / "cur").exists()
    (logged,) = [r.getMessage() for r in caplog.records]
    assert logged.startswith("delivery to <a@x.org> failed: [Errno 2]")
