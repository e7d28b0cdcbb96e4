"""Postfix end to end: a private Postfix hands mail to ``serve`` over LMTP, as it would to Dovecot.

One ``serve --lmtp`` on 127.0.0.1 behind a private Postfix instance
(``virtual_transport = lmtp:inet:127.0.0.1:PORT``, tests/postfix.py). Mail goes
into Postfix's smtpd with swaks and smtp-source; every message is identified
in the Maildirs by the queue id in Postfix's own Received header, and checked
against Postfix's log line for that recipient.
"""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from delivery_executor.testing import ServerProcess

from .postfix import (
    Delivered,
    PrivatePostfix,
    alive,
    free_port_on,
    need,
    read_maildirs,
    run_tool,
    wait_for,
)

pytestmark = pytest.mark.timeout(150)

DOMAIN = "example.org"
OTHER = "other.example"  # Postfix takes it, serve (--domain example.org) refuses it
SENDER = f"sender@{DOMAIN}"  # so that bounces come back through serve too


@pytest.fixture
def serve_port() -> int:
    """The port serve listens on (and Postfix's LMTP client connects to)."""
    return free_port_on("127.0.0.1")


@pytest.fixture
def serve_socket() -> Iterator[Path]:
    """Where serve's UNIX socket goes: a directory Postfix's lmtp client can enter."""
    where = Path(tempfile.mkdtemp(prefix="de-lmtp-", dir="/var/tmp"))
    where.chmod(0o755)
    try:
        yield where / "lmtp"
    finally:
        shutil.rmtree(where, ignore_errors=True)


@pytest.fixture
def postfix(serve_socket: Path) -> Iterator[PrivatePostfix]:
    """A private Postfix whose virtual domains go to serve's LMTP socket, as admins set it up."""
    with PrivatePostfix(
        virtual_transport=f"lmtp:unix:{serve_socket}", domains=(DOMAIN, OTHER)
    ) as pf:
        yield pf


def start_serve(root: Path, socket: Path) -> ServerProcess:
    return ServerProcess(
        root, "--lmtp", "--domain", DOMAIN, "--socket-mode", "0666", listen=[f"unix:{socket}"]
    )


def swaks(pf: PrivatePostfix, to: list[str], case: str) -> str:
    """Send one message with swaks into Postfix's smtpd; Postfix's queue id for it."""
    res = run_tool(
        [need("swaks"), "--server", pf.address, "--port", str(pf.smtp_port),
         "--from", SENDER, "--to", ",".join(to),
         "--header", f"Subject: {case}", "--body", f"body of {case}\n"],
        timeout=60,
    )  # fmt: skip
    m = re.search(r"<-  250 2\.0\.0 Ok: queued as (\w+)", res.stdout)
    assert m, res.stdout
    return m.group(1)


def by_queue_id(files: list[Delivered]) -> Counter[tuple[str | None, str]]:
    """How many copies of each (queue id, mailbox) are in the Maildirs."""
    return Counter((f.queue_id, f.mailbox) for f in files)


@pytest.mark.root
def test_swaks_single_multi_and_refused_recipients(
    tmp_path: Path, postfix: PrivatePostfix, serve_socket: Path
) -> None:
    """1, 3 and 3-with-2-refused recipients via Postfix: each copy lands once, refusals bounce."""
    root = tmp_path / "mail"
    with start_serve(root, serve_socket) as srv:
        q1 = swaks(postfix, [f"a@{DOMAIN}"], "case one")
        q2 = swaks(postfix, [f"b@{DOMAIN}", f"c@{DOMAIN}", f"d@{DOMAIN}"], "case three")
        q3 = swaks(postfix, [f"e@{DOMAIN}", f".hidden@{DOMAIN}", f"x@{OTHER}"], "case refused")
        postfix.wait_queue_empty(30)
        # postlogd writes asynchronously: wait for the last lines to be there.
        wait_for(lambda: postfix.count_status("sent") >= 6, 10, "6 status=sent lines")
        assert srv.stop() == 0
    files = read_maildirs(root)
    log = postfix.deliveries()

    # The bounce for q3 is a new message from Postfix, to our sender, through serve.
    bounce_ids = re.findall(rf"{q3}: sender non-delivery notification: (\w+)", postfix.maillog())
    assert len(bounce_ids) == 1, postfix.maillog()
    q4 = bounce_ids[0]
    expected = {
        (q1, f"a@{DOMAIN}"),
        (q2, f"b@{DOMAIN}"),
        (q2, f"c@{DOMAIN}"),
        (q2, f"d@{DOMAIN}"),
        (q3, f"e@{DOMAIN}"),
        (q4, SENDER),
    }
    copies = by_queue_id(files)
    assert set(copies) == expected, copies
    assert all(n == 1 for n in copies.values()), copies  # each copy exactly once
    assert len(files) == 6

    # Read back: each copy is its message, addressed to its own mailbox.
    bodies = {q1: b"body of case one", q2: b"body of case three", q3: b"body of case refused"}
    for f in files:
        assert f.header("Delivered-To") == f.mailbox
        if f.queue_id in bodies:
            assert f.body.startswith(bodies[f.queue_id]), f.data
            assert f.header("Return-Path") == f"<{SENDER}>"
    (bounce,) = [f for f in files if f.queue_id == q4]
    assert bounce.header("Subject") == "Undelivered Mail Returned to Sender"
    assert b"553 5.1.3" in bounce.data and b"550 5.7.1" in bounce.data, bounce.data

    # Postfix's log: status=sent for each delivered copy, relayed by serve ...
    sent = {(d.queue_id, d.recipient) for d in log if d.status == "sent"}
    assert sent == expected
    for d in log:
        if d.status == "sent":
            assert str(serve_socket) in d.relay, d
            assert d.text.startswith(f"250 2.0.0 <{d.recipient}> Ok: delivered as ")
    # ... and status=bounced with serve's 5xx for the two refused recipients.
    bounced = {(d.queue_id, d.recipient, d.dsn) for d in log if d.status == "bounced"}
    assert bounced == {(q3, f'".hidden"@{DOMAIN}', "5.1.3"), (q3, f"x@{OTHER}", "5.7.1")}
    assert not [d for d in log if d.status == "deferred"]
    # Each "delivered as NAME" in the log is a file of that mailbox.
    names = {f.name for f in files}
    for d in log:
        if d.status == "sent":
            assert d.text.rsplit(" ", 1)[1] in names


def smtp_source(pf: PrivatePostfix, to: str, messages: int, sessions: int) -> None:
    """Postfix's smtp-source: ``messages`` of 300 bytes to ``to`` over ``sessions`` sessions."""
    run_tool(
        [need("smtp-source"), "-s", str(sessions), "-m", str(messages), "-l", "300",
         "-f", SENDER, "-t", to, f"{pf.address}:{pf.smtp_port}"],
        timeout=120,
    )  # fmt: skip


def check_exactly_once(
    pf: PrivatePostfix, files: list[Delivered], mailbox: str, accepted: set[str]
) -> None:
    """Every accepted message is in ``mailbox`` exactly once, whole, and logged as sent once."""
    mine = [f for f in files if f.mailbox == mailbox]
    per_id = Counter(f.queue_id for f in mine)
    assert set(per_id) == accepted, (len(per_id), len(accepted))
    dups = {q: n for q, n in per_id.items() if n > 1}
    assert not dups, f"delivered more than once: {dups}"
    # Whole: every copy carries the same 300-byte smtp-source body as the others.
    reference = mine[0].body
    # LF on disk (serve's default); 300 bytes as sent, with CRLF.
    assert reference.startswith(b"1XXXX") and len(reference.replace(b"\n", b"\r\n")) >= 300
    assert all(f.body == reference for f in mine)
    sent = Counter(
        d.queue_id for d in pf.deliveries() if d.status == "sent" and d.queue_id in accepted
    )
    assert sent == Counter(dict.fromkeys(accepted, 1))


@pytest.mark.root
def test_smtp_source_then_outage_then_flush(
    tmp_path: Path, postfix: PrivatePostfix, serve_socket: Path
) -> None:
    """500 messages, 8 sessions, land once; 300 sent while serve is down defer, then land once."""
    root = tmp_path / "mail"
    srv = start_serve(root, serve_socket)
    with srv:
        smtp_source(postfix, f"load@{DOMAIN}", 500, 8)
        postfix.wait_queue_empty(60)
        wait_for(lambda: postfix.count_status("sent") >= 500, 10, "500 status=sent lines")
        assert srv.stop() == 0
    assert srv.delivered() == 500, srv.summary
    first = set(postfix.accepted_ids())
    assert len(first) == 500
    check_exactly_once(postfix, read_maildirs(root), f"load@{DOMAIN}", first)

    # serve is down: Postfix accepts, tries, and defers every one of them.
    smtp_source(postfix, f"later@{DOMAIN}", 300, 4)
    # postlogd writes the log after smtp-source has its replies: wait for the lines.
    wait_for(lambda: len(set(postfix.accepted_ids()) - first) >= 300, 10, "300 client= lines")
    second = set(postfix.accepted_ids()) - first
    assert len(second) == 300

    def deferred_ids() -> set[str]:
        return {d.queue_id for d in postfix.deliveries() if d.status == "deferred"}

    wait_for(lambda: second <= deferred_ids(), 30, "all 300 to be deferred")
    assert deferred_ids() <= second
    assert not (root / DOMAIN / "later").exists()
    # (showq can miss a message moving between queue directories: ask again.)
    wait_for(lambda: {q["queue_id"] for q in postfix.queue()} == second, 10, "300 queued")

    # serve again, on the same port; a flush delivers the lot.
    with start_serve(root, serve_socket) as srv2:
        postfix.flush()
        postfix.wait_queue_empty(60, flush_every=2)
        wait_for(lambda: postfix.count_status("sent") >= 800, 10, "800 status=sent lines")
        assert srv2.stop() == 0
    assert srv2.delivered() == 300, srv2.summary
    files = read_maildirs(root)
    assert len(files) == 800
    check_exactly_once(postfix, files, f"later@{DOMAIN}", second)
    check_exactly_once(postfix, files, f"load@{DOMAIN}", first)
    assert postfix.count_status("bounced") == 0
    deferred_lines = postfix.count_status("deferred")
    print(
        f"outage: {len(second)} deferred ({deferred_lines} status=deferred lines), all landed once"
    )


def _snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, _dirs, names in os.walk(directory):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.join(dirpath, name)] = (st.st_mtime_ns, st.st_size)
    return out


@pytest.mark.root
def test_fixture_cleans_up_after_itself(serve_port: int) -> None:
    """The instance leaves no process and no directory behind, and /etc/postfix is untouched."""
    system = _snapshot(Path("/etc/postfix"))
    with PrivatePostfix(virtual_transport=f"lmtp:inet:127.0.0.1:{serve_port}") as pf:
        pids = pf.instance_pids()
        assert pf.master_pid in pids
        assert len(pids) >= 3  # master, qmgr, postlogd at least
    assert not pf.instance_pids()
    assert not pf.base.exists()
    for pid in pids:
        assert not alive(pid)
    assert _snapshot(Path("/etc/postfix")) == system


def test_null_sender_is_stored_with_an_empty_return_path(tmp_path: Path, serve_port: int) -> None:
    """A bounce (MAIL FROM:<>, as Postfix sends it over LMTP) is stored with 'Return-Path: <>'."""
    root = tmp_path / "mail"
    with ServerProcess(root, "--lmtp", "--domain", DOMAIN, port=serve_port) as srv:
        run_tool(
            [need("swaks"), "--server", "127.0.0.1", "--port", str(serve_port),
             "--protocol", "LMTP", "--from", "<>", "--to", SENDER],
            timeout=60,
        )  # fmt: skip
        assert srv.stop() == 0
    (bounce,) = read_maildirs(root)
    assert bounce.header("Return-Path") == "<>"


@pytest.mark.root
def test_alias_expansion_gives_each_copy_x_original_to_and_utf8_lands(
    tmp_path: Path, serve_socket: Path
) -> None:
    """Alias@ -> a@, b@ in one LMTP transaction: X-Original-To: Alias@ on each; jörg@ in jörg/."""
    # Postfix sends ORCPT (the address before alias expansion) because we
    # advertise DSN; lmtp_destination_recipient_limit stays at its default.
    aliases = serve_socket.parent / "virtual"
    aliases.write_text(f"Alias@{DOMAIN} a@{DOMAIN}, b@{DOMAIN}\n")
    aliases.chmod(0o644)
    root = tmp_path / "mail"
    with (
        PrivatePostfix(
            virtual_transport=f"lmtp:unix:{serve_socket}",
            domains=(DOMAIN,),
            settings={"virtual_alias_maps": f"texthash:{aliases}"},
        ) as pf,
        start_serve(root, serve_socket) as srv,
    ):
        postconf = [need("postconf"), "-c", str(pf.conf)]
        limit = "lmtp_destination_recipient_limit"
        assert run_tool([*postconf, "-n", limit]).stdout == ""  # not set: Postfix's default
        assert int(run_tool([*postconf, "-xh", limit]).stdout) > 1
        q1 = swaks(pf, [f"Alias@{DOMAIN}"], "via alias")
        with smtplib.SMTP(pf.address, pf.smtp_port, timeout=30) as client:
            client.sendmail(
                SENDER, [f"jörg@{DOMAIN}"],
                b"Subject: utf8\r\n\r\nhallo\r\n", mail_options=["SMTPUTF8"],
            )  # fmt: skip
        pf.wait_queue_empty(30)
        wait_for(lambda: pf.count_status("sent") >= 3, 10, "3 status=sent lines")
        assert srv.stop() == 0
    files = read_maildirs(root)
    assert sorted(f.mailbox for f in files) == [f"a@{DOMAIN}", f"b@{DOMAIN}", f"jörg@{DOMAIN}"]
    copies = [f for f in files if f.queue_id == q1]
    assert sorted(f.mailbox for f in copies) == [f"a@{DOMAIN}", f"b@{DOMAIN}"]
    ids = set()
    for f in copies:
        head = f.data.split(b"\n\n", 1)[0].split(b"\n")
        assert head[:3] == [
            f"Return-Path: <{SENDER}>".encode(),
            f"X-Original-To: Alias@{DOMAIN}".encode(),
            f"Delivered-To: {f.mailbox}".encode(),
        ], head
        received = f.header("Received") or ""
        assert received.endswith(f"for <{f.mailbox}>; " + received.rsplit("; ", 1)[1])
        ids.add(received.split(" id ", 1)[1].split()[0])
        assert f.body.startswith(b"body of via alias")
    assert len(ids) == 1  # both copies came in one LMTP transaction
    (utf8,) = [f for f in files if f.mailbox == f"jörg@{DOMAIN}"]
    text = utf8.data.split(b"\n\n", 1)[0].decode("utf-8")
    assert f"\nX-Original-To: jörg@{DOMAIN}\nDelivered-To: jörg@{DOMAIN}\n" in text, text
    assert " with UTF8LMTP id " in text
