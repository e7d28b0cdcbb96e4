"""Sieve behind a real Postfix: serve --sieve-before with a spam rule, plus a user script."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from delivery_executor.store import Maildir
from delivery_executor.testing import ServerProcess

from .postfix import PrivatePostfix, need, run_tool, wait_for

pytestmark = pytest.mark.timeout(150)

DOMAIN = "example.org"


@pytest.fixture
def lmtp_socket() -> Iterator[Path]:
    """A socket path Postfix's lmtp client can reach."""
    where = Path(tempfile.mkdtemp(prefix="de-sieve-", dir="/var/tmp"))
    where.chmod(0o755)
    try:
        yield where / "lmtp"
    finally:
        shutil.rmtree(where, ignore_errors=True)


def swaks(pf: PrivatePostfix, to: str, headers: list[str]) -> None:
    """One message into Postfix's smtpd with these extra headers."""
    args = [need("swaks"), "--server", pf.address, "--port", str(pf.smtp_port)]
    args += ["--from", f"sender@{DOMAIN}", "--to", to, "--body", "body\n"]
    for h in headers:
        args += ["--header", h]
    run_tool(args, timeout=60)


@pytest.mark.root
def test_postfix_to_serve_with_sieve_before_and_user_script(
    tmp_path: Path, lmtp_socket: Path
) -> None:
    """Spam goes to Junk (seen) by the admin rule, lists to a created folder with a keyword,
    the rest to INBOX; every copy is acknowledged to Postfix as sent."""
    root = tmp_path / "mail"
    bob = root / DOMAIN / "bob"
    Maildir.create(bob)
    Maildir.create(bob / ".Junk")
    (bob / ".dovecot.sieve").write_text(
        'require ["fileinto", "mailbox", "imap4flags", "variables"];\n'
        'if header :matches "List-Id" "*<*.*>" { fileinto :create :flags "$List" "Lists/${2}"; }\n'
    )
    spam = tmp_path / "spam.sieve"
    spam.write_text(
        'require ["fileinto", "imap4flags"];\n'
        'if header :contains "X-Spam-Flag" "YES" { addflag "\\\\Seen"; fileinto "Junk"; }\n'
    )
    with PrivatePostfix(virtual_transport=f"lmtp:unix:{lmtp_socket}", domains=(DOMAIN,)) as pf:
        args = ("--lmtp", "--domain", DOMAIN, "--socket-mode", "0666", "--sieve-before", str(spam))
        with ServerProcess(root, *args, listen=[f"unix:{lmtp_socket}"]) as srv:
            swaks(pf, f"bob@{DOMAIN}", ["Subject: win", "X-Spam-Flag: YES"])
            swaks(pf, f"bob@{DOMAIN}", ["Subject: py", "List-Id: Python <python-list.python.org>"])
            swaks(pf, f"bob@{DOMAIN}", ["Subject: hello"])
            pf.wait_queue_empty(30)
            wait_for(lambda: pf.count_status("sent") >= 3, 10, "3 status=sent lines")
            assert srv.stop() == 0
    (junk,) = os.listdir(bob / ".Junk" / "cur")
    assert (
        junk.endswith(":2,S") and b"X-Spam-Flag: YES" in (bob / ".Junk" / "cur" / junk).read_bytes()
    )
    (listed,) = os.listdir(bob / ".Lists.python-list" / "cur")
    assert listed.endswith(":2,a")
    assert (bob / ".Lists.python-list" / "dovecot-keywords").read_text() == "0 $List\n"
    (inbox,) = os.listdir(bob / "new")
    assert b"Subject: hello" in (bob / "new" / inbox).read_bytes()
    assert os.listdir(bob / "cur") == []
