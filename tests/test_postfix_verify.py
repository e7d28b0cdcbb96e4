"""The README's recipient validation, tried: Postfix's reject_unverified_recipient asks serve.

With ``serve --existing-only`` behind a private Postfix whose smtpd has
``reject_unverified_recipient`` and ``unverified_recipient_reject_code = 550``
(the README's main.cf), mail for a user without a Maildir is refused at
Postfix's own RCPT: no message accepted, no bounce to a forged sender.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from delivery_executor import Maildir
from delivery_executor.testing import ServerProcess

from .postfix import PrivatePostfix, need, read_maildirs, wait_for
from .test_postfix import DOMAIN, SENDER, serve_socket  # noqa: F401  # a fixture

pytestmark = pytest.mark.timeout(150)


@pytest.fixture
def verifying_postfix(serve_socket: Path) -> Iterator[PrivatePostfix]:  # noqa: F811
    """A private Postfix with the README's recipient validation, delivering to serve's socket."""
    settings = {
        "smtpd_recipient_restrictions": "permit_sasl_authenticated,"
        " reject_unauth_destination, reject_unverified_recipient",
        "unverified_recipient_reject_code": "550",
        "address_verify_poll_delay": "1s",
    }
    with PrivatePostfix(
        virtual_transport=f"lmtp:unix:{serve_socket}", domains=(DOMAIN,), settings=settings
    ) as pf:
        yield pf


def _swaks(pf: PrivatePostfix, to: str) -> str:
    res = subprocess.run(
        [need("swaks"), "--server", pf.address, "--port", str(pf.smtp_port),
         "--from", SENDER, "--to", to, "--body", "verify me\n"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return res.stdout


@pytest.mark.root
def test_unknown_recipient_is_refused_at_postfixs_rcpt(
    tmp_path: Path,
    verifying_postfix: PrivatePostfix,
    serve_socket: Path,  # noqa: F811
) -> None:
    """An unknown user gets 550 5.1.1 from Postfix at RCPT; a known one is delivered."""
    root = tmp_path / "mail"
    Maildir.create(root / DOMAIN / "alice")
    with ServerProcess(
        root, "--existing-only", "--domain", DOMAIN, "--socket-mode", "0666",
        listen=[f"unix:{serve_socket}"],
    ) as srv:  # fmt: skip
        refused = _swaks(verifying_postfix, f"nobody@{DOMAIN}")
        accepted = _swaks(verifying_postfix, f"alice@{DOMAIN}")
        verifying_postfix.wait_queue_empty(30)
        wait_for(lambda: len(read_maildirs(root)) >= 1, 10, "alice's copy")
        assert srv.stop() == 0
    assert "RCPT TO:<nobody@" in refused
    assert "<** 550 5.1.1" in refused, refused
    assert "<-  250 2.0.0 Ok: queued" in accepted, accepted
    assert [f.mailbox for f in read_maildirs(root)] == [f"alice@{DOMAIN}"]
    assert "non-delivery notification" not in verifying_postfix.maillog()  # no backscatter
