"""One texthash file for Postfix's virtual_mailbox_maps and serve's --userdb: same answers.

A private Postfix (tests/postfix.py) with ``virtual_mailbox_maps =
texthash:FILE`` and ``virtual_mailbox_base = ROOT`` hands mail to ``serve
--userdb texthash:FILE --root ROOT`` over LMTP: unknown recipients are refused
by Postfix's smtpd (the first hop), known ones land where Postfix's own
virtual(8) would put them (ROOT + the map's result).
"""

from __future__ import annotations

import shutil
import smtplib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from delivery_executor.testing import ServerProcess

from .postfix import PrivatePostfix, wait_for

pytestmark = pytest.mark.timeout(150)

DOMAIN = "example.org"


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A directory Postfix's lmtp client can enter, for serve's socket."""
    where = Path(tempfile.mkdtemp(prefix="de-lmtp-", dir="/var/tmp"))
    where.chmod(0o755)
    try:
        yield where
    finally:
        shutil.rmtree(where, ignore_errors=True)


@pytest.mark.root
def test_postfix_and_serve_share_a_texthash_mailbox_map(tmp_path: Path, sock_dir: Path) -> None:
    """Unknown: 550 at Postfix's RCPT; known (and user+ext): delivered at base + result."""
    root = tmp_path / "vmail"
    vmap = tmp_path / "vmailbox"
    vmap.write_text(
        f"alice@{DOMAIN}  {DOMAIN}/alice-box/\n"
        f"bob@{DOMAIN}    users/bob/Maildir/\n"
        f"bob+lists@{DOMAIN} users/bob-lists/\n"
    )
    sock = sock_dir / "lmtp"
    settings = {
        "virtual_mailbox_maps": f"texthash:{vmap}",
        "virtual_mailbox_base": str(root),
        "recipient_delimiter": "+",
    }
    with (
        PrivatePostfix(
            virtual_transport=f"lmtp:unix:{sock}", domains=(DOMAIN,), settings=settings
        ) as pf,
        ServerProcess(
            root,
            "--userdb", f"texthash:{vmap}", "--recipient-delimiter", "+",
            "--socket-mode", "0666",
            listen=[f"unix:{sock}"],
        ) as srv,
    ):  # fmt: skip
        with smtplib.SMTP(pf.address, pf.smtp_port, timeout=30) as smtp:
            smtp.ehlo("client.test")
            assert smtp.mail(f"sender@{DOMAIN}")[0] == 250
            code, text = smtp.rcpt(f"carol@{DOMAIN}")
            assert (code, text[:5]) == (550, b"5.1.1"), text
            for rcpt in (f"alice@{DOMAIN}", f"bob+lists@{DOMAIN}", f"bob+other@{DOMAIN}"):
                assert smtp.rcpt(rcpt)[0] == 250, rcpt
            assert smtp.data(b"Subject: map\r\n\r\nhello\r\n")[0] == 250
        pf.wait_queue_empty(30)
        wait_for(lambda: pf.count_status("sent") >= 3, 10, "3 status=sent lines")
        assert srv.stop() == 0
    for where in (f"{DOMAIN}/alice-box", "users/bob-lists", "users/bob/Maildir"):
        new = root / where / "new"
        assert len(list(new.iterdir())) == 1, where
    assert not (root / DOMAIN / "carol").exists()
    assert pf.count_status("bounced") == 0
