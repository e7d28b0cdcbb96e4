"""Sieve in the server: scripts per recipient, recompiled on change, broken ones logged once,
flagged copies in cur/, folders riding the same executor."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path

import pytest

from delivery_executor import DeliveryExecutor, MailboxResolver, Maildir
from delivery_executor.server.checks import StartupError
from delivery_executor.server.config import add_arguments
from delivery_executor.server.core import ServerConfig, _sieve
from delivery_executor.sieve.hook import Route, SieveFilter
from delivery_executor.smtp import DeliveryHandler, SessionFactory
from delivery_executor.testing import send_message

from .helpers import listening
from .sieve_oracle import IMAP, DovecotLDA

pytestmark = pytest.mark.timeout(60)

SPAM_RULE = (
    'require ["fileinto", "imap4flags"];\n'
    'if header :contains "X-Spam-Flag" "YES" { addflag "\\\\Seen"; fileinto "Junk"; stop; }\n'
)
USER = (
    'require ["fileinto", "imap4flags", "mailbox", "variables"];\n'
    'if header :matches "List-Id" "*<*.*>" { fileinto :create :flags "$List" "Lists/${2}"; }\n'
    'elsif header :contains "subject" "boss" { addflag "\\\\Flagged"; }\n'
    'elsif header :contains "subject" "trash" { discard; }\n'
)


def files(*parts: Path | str) -> list[str]:
    """Names in a directory, sorted ([] if it does not exist)."""
    p = Path(*parts)
    return sorted(os.listdir(p)) if p.is_dir() else []


def test_filter_compiles_once_recompiles_on_change_and_logs_errors_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Compiled once per version; a broken script is logged once (line:col) and keeps;
    with recheck=0 a change is seen at the next delivery."""
    md = tmp_path / "bob"
    Maildir.create(md)
    script = md / ".dovecot.sieve"
    script.write_text('require "fileinto";\nfileinto "A"\n')
    f = SieveFilter(recheck=0)
    msg = b"Subject: x\n\nbody\n"
    with caplog.at_level(logging.ERROR, logger="delivery_executor.sieve"):
        assert f.route(str(md), msg, "a@b.c", "bob@x") == [Route(str(md))]
        assert f.route(str(md), msg, "a@b.c", "bob@x") == [Route(str(md))]
    errors = [r.getMessage() for r in caplog.records]
    assert len(errors) == 1 and "line 3, column 1" in errors[0], errors
    Maildir.create(md / ".A")
    script.write_text('require "fileinto";\nfileinto "A";\n# changed\n')
    assert f.route(str(md), msg, "a@b.c", "bob@x") == [Route(str(md / ".A"))]
    first = f.cache.get(str(script))
    assert f.cache.get(str(script)) is first
    script.unlink()
    assert f.route(str(md), msg, "a@b.c", "bob@x") is None


@pytest.mark.asyncio
async def test_serve_filters_per_recipient_with_before_and_user_scripts(tmp_path: Path) -> None:
    """LMTP delivery: before-script spam rule, user list sorting with :create and keywords,
    flags into cur/, discard, and a recipient without a script untouched."""
    root = tmp_path / "mail"
    bob = root / "example.org" / "bob"
    Maildir.create(bob)
    Maildir.create(bob / ".Junk")
    (bob / ".dovecot.sieve").write_text(USER)
    before = tmp_path / "spam.sieve"
    before.write_text(SPAM_RULE)
    loop = asyncio.get_running_loop()
    ex = DeliveryExecutor()
    handler = DeliveryHandler(
        ex, MailboxResolver(root, recipient_delimiter="+"), sieve=SieveFilter(before=[before])
    )
    factory = SessionFactory(handler, lmtp=True, max_connections=8, loop=loop)
    bodies = {
        "spam": b"Subject: win\r\nX-Spam-Flag: YES\r\n\r\nx\r\n",
        "list": b"Subject: py\r\nList-Id: Python <python-list.python.org>\r\n\r\nx\r\n",
        "boss": b"Subject: from the boss\r\n\r\nx\r\n",
        "trash": b"Subject: trash me\r\n\r\nx\r\n",
        "plain": b"Subject: hello\r\n\r\nx\r\n",
    }
    async with listening(factory, ex) as port:
        for body in bodies.values():
            replies = await send_message(
                "127.0.0.1",
                port,
                mail_from="s@example.net",
                rcpts=["bob+x@example.org", "carol@example.org"],
                body=body,
            )
            assert [r.code for r in replies] == [250, 250], replies
    junk = files(bob, ".Junk", "cur")
    assert len(junk) == 1 and junk[0].endswith(":2,S")
    (listed,) = files(bob, ".Lists.python-list", "cur")
    assert listed.endswith(":2,a")
    assert (bob / ".Lists.python-list" / "dovecot-keywords").read_text() == "0 $List\n"
    assert (bob / ".Lists.python-list" / "maildirfolder").exists()
    (boss,) = files(bob, "cur")
    assert boss.endswith(":2,F") and b"from the boss" in (bob / "cur" / boss).read_bytes()
    (plain,) = files(bob, "new")
    assert b"hello" in (bob / "new" / plain).read_bytes()
    assert len(files(root, "example.org", "carol", "new")) == 5  # no script: all in INBOX


def test_serve_config_and_cli_wire_the_filter(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No Sieve option: no filter (no cost); options build one; a missing script is refused,
    a broken one is logged at start-up with its line and column."""
    assert _sieve(ServerConfig(root=tmp_path)) is None
    s = tmp_path / "b.sieve"
    s.write_text("keep;\n")
    f = _sieve(ServerConfig(root=tmp_path, sieve_before=(s,), recipient_delimiter="-"))
    assert f is not None and f.before == [str(s)] and f.delimiter == "-"
    bad = tmp_path / "bad.sieve"
    bad.write_text("keep\n")
    with caplog.at_level(logging.ERROR, logger="delivery_executor.sieve"):
        assert _sieve(ServerConfig(root=tmp_path, sieve_after=(bad,))) is not None
    assert "bad.sieve: line 2, column 1" in caplog.text
    with pytest.raises(StartupError, match="does not exist"):
        _sieve(ServerConfig(root=tmp_path, sieve_after=(tmp_path / "nope.sieve",)))
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--sieve-before", "a", "--sieve-before", "b", "--sieve-default", "d"])
    assert args.sieve_before == [Path("a"), Path("b")] and args.sieve_default == Path("d")


@pytest.mark.asyncio
@pytest.mark.skipif(
    not os.access(IMAP, os.X_OK) and os.environ.get("CI") != "true",
    reason="Dovecot's imap binary is not installed",
)
async def test_dovecot_imap_sees_sieve_folders_flags_and_keywords(tmp_path: Path) -> None:
    """After LMTP delivery through serve's Sieve, Dovecot IMAP lists the folders and
    FETCH shows the flags and keywords the scripts set."""
    lda = DovecotLDA()
    try:
        Maildir.create(lda.maildir)
        Maildir.create(lda.maildir / ".Junk")
        (lda.maildir / ".dovecot.sieve").write_text(USER)
        before = tmp_path / "spam.sieve"
        before.write_text(SPAM_RULE)
        ex = DeliveryExecutor()
        resolver = MailboxResolver(lda.home, mapper=lambda local, domain: "Maildir")
        handler = DeliveryHandler(ex, resolver, sieve=SieveFilter(before=[before]))
        factory = SessionFactory(
            handler, lmtp=True, max_connections=4, loop=asyncio.get_running_loop()
        )
        async with listening(factory, ex) as port:
            for body in (
                b"Subject: win\r\nX-Spam-Flag: YES\r\n\r\nx\r\n",
                b"Subject: py\r\nList-Id: Python <python-list.python.org>\r\n\r\nx\r\n",
                b"Subject: from the boss\r\n\r\nx\r\n",
            ):
                (reply,) = await send_message(
                    "127.0.0.1",
                    port,
                    mail_from="s@example.net",
                    rcpts=["bob@example.org"],
                    body=body,
                )
                assert reply.code == 250, reply
        out = await asyncio.to_thread(
            lda.imap,
            [
                'LIST "" "*"',
                "SELECT Junk",
                "FETCH 1:* FLAGS",
                'SELECT "Lists/python-list"',
                "FETCH 1:* FLAGS",
                "SELECT INBOX",
                "FETCH 1:* FLAGS",
            ],
        )
    finally:
        lda.close()
    assert '"/" Lists/python-list' in out and '"/" Junk' in out, out
    fetched = [line for line in out.splitlines() if " FETCH (FLAGS" in line]
    assert len(fetched) == 3, out
    assert "\\Seen" in fetched[0] and "$List" in fetched[1] and "\\Flagged" in fetched[2], out
