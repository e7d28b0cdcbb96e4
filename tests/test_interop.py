"""Interop with real peers: Postfix's smtp-source and swaks send, Dovecot IMAP reads back.

Outside CI these skip (with the reason) only when the binaries are missing; in
CI (CI=true) a missing binary is a failure, since .ci/run installs them.
"""

from __future__ import annotations

import asyncio
import imaplib
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from delivery_executor import Maildir
from delivery_executor.testing import ServerProcess, free_port, send_message

pytestmark = pytest.mark.timeout(180)


def need(binary: str) -> str:
    path = shutil.which(binary) or next(
        (p for p in (f"/usr/sbin/{binary}", f"/usr/bin/{binary}") if os.path.exists(p)), None
    )
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{binary} is missing in CI: .ci/run should have installed it")
        pytest.skip(f"{binary} not installed (Debian: postfix, swaks, dovecot-imapd)")
    return path


def count_new(root: Path, domain: str, local: str) -> int:
    return len(Maildir.open(root / domain / local).scan_new())


@pytest.mark.parametrize("mode", ["lmtp", "smtp"])
def test_smtp_source_many_sessions(tmp_path: Path, mode: str) -> None:
    """Postfix smtp-source, 16 sessions, 400 messages of 498 bytes: all 400 land."""
    tool = need("smtp-source")
    with ServerProcess(tmp_path / "mail", f"--{mode}") as srv:
        args = [tool, "-s", "16", "-m", "400", "-l", "498", "-f", "from@example.net"]
        args += ["-t", "alice@example.org", f"127.0.0.1:{srv.port}"]
        if mode == "lmtp":
            args.insert(1, "-L")
        res = subprocess.run(args, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert srv.stop() == 0
    assert count_new(tmp_path / "mail", "example.org", "alice") == 400
    assert any("summary: delivered 400, failed 0" in line for line in srv.lines)


def test_smtp_source_32_sessions_right_after_a_readiness_probe(tmp_path: Path) -> None:
    """Default serve, a probe (connect + close), then smtp-source -s 32: all 200 land, no 421."""
    tool = need("smtp-source")
    with ServerProcess(tmp_path / "mail") as srv:
        with socket.create_connection(("127.0.0.1", srv.port)):
            pass  # what a readiness check does; its session must not hold a slot
        args = [tool, "-L", "-s", "32", "-m", "200", "-l", "498", "-f", "from@example.net"]
        args += ["-t", "alice@example.org", f"127.0.0.1:{srv.port}"]
        res = subprocess.run(args, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert srv.stop() == 0
    assert count_new(tmp_path / "mail", "example.org", "alice") == 200
    assert any("refused connections 0" in line for line in srv.lines)


def test_swaks_lmtp_gets_one_reply_per_recipient(tmp_path: Path) -> None:
    """swaks over LMTP with a duplicate and a hostile recipient sees each reply; one copy each."""
    tool = need("swaks")
    with ServerProcess(tmp_path / "mail") as srv:
        res = subprocess.run(
            [tool, "--server", "127.0.0.1", "--port", str(srv.port), "--protocol", "LMTP",
             "--from", "s@example.net",
             "--to", "alice@example.org,bob@example.org,alice@example.org,../x@example.org"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert srv.stop() == 0
    out = res.stdout + res.stderr
    assert out.count("553 5.1.3") == 1
    assert len(re.findall(r"<-  250 2\.0\.0 <(alice|bob)@example\.org> Ok: delivered as", out)) == 3
    assert count_new(tmp_path / "mail", "example.org", "alice") == 1  # named twice, stored once
    assert count_new(tmp_path / "mail", "example.org", "bob") == 1


@pytest.fixture
def dovecot() -> Iterator[tuple[Path, int]]:
    """A Dovecot IMAP server on 127.0.0.1 reading Maildirs under the yielded root."""
    binary = need("dovecot")
    # Dovecot's auth and mail processes run unprivileged: pytest's 0700 tmp_path
    # is out of their reach, so this fixture has its own world-traversable folder.
    base = Path(tempfile.mkdtemp(prefix="de-dovecot-"))
    base.chmod(0o755)
    mail = base / "mail"
    mail.mkdir()
    conf_dir = base / "dovecot"
    for sub in ("run", "state", "home"):
        (conf_dir / sub).mkdir(parents=True)
    port = free_port()
    # Dovecot refuses uid 0 for mail processes: it reads as the 'mail' user.
    user = pwd.getpwnam("mail")
    (conf_dir / "passwd").write_text("alice@example.org:{PLAIN}secret\n")
    (conf_dir / "dovecot.conf").write_text(
        f"""
protocols = imap
listen = 127.0.0.1
base_dir = {conf_dir}/run
state_dir = {conf_dir}/state
log_path = {conf_dir}/dovecot.log
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
first_valid_uid = 1
mail_location = maildir:{mail}/%d/%n
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {conf_dir}/passwd
}}
userdb {{
  driver = static
  args = uid={user.pw_uid} gid={user.pw_gid} home={conf_dir}/home/%d/%n
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
"""
    )
    os.chown(conf_dir / "home", user.pw_uid, user.pw_gid)
    proc = subprocess.Popen(
        [binary, "-F", "-c", str(conf_dir / "dovecot.conf")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                imaplib.IMAP4("127.0.0.1", port).logout()
                break
            except OSError:
                output = proc.stdout.read() if proc.poll() is not None and proc.stdout else b""
                assert proc.poll() is None, f"dovecot exited: {output!r}"
                assert time.monotonic() < deadline, "dovecot did not start"
                time.sleep(0.1)
        yield mail, port
    finally:
        proc.terminate()
        proc.wait(20)
        if proc.stdout is not None:
            proc.stdout.close()
        shutil.rmtree(base, ignore_errors=True)


def test_dovecot_imap_reads_back_what_we_delivered(dovecot: tuple[Path, int]) -> None:
    """Mail delivered through serve reads back over Dovecot IMAP, bytes intact."""
    mail, imap_port = dovecot
    bodies = [f"Subject: m{i}\r\n\r\nbody {i}\r\n.dot line\r\n".encode() for i in range(5)]
    with ServerProcess(mail) as srv:

        async def send_all() -> list[int]:
            codes = []
            for body in bodies:
                replies = await send_message(
                    "127.0.0.1", srv.port, mail_from="s@example.net",
                    rcpts=["alice@example.org"], body=body,
                )  # fmt: skip
                codes += [r.code for r in replies]
            return codes

        assert asyncio.run(send_all()) == [250] * 5
        assert srv.stop() == 0
    user = pwd.getpwnam("mail")
    for dirpath, dirnames, filenames in os.walk(mail):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), user.pw_uid, user.pw_gid)
    imap = imaplib.IMAP4("127.0.0.1", imap_port)
    try:
        imap.login("alice@example.org", "secret")
        typ, data = imap.select("INBOX", readonly=True)
        assert typ == "OK"
        assert data == [b"5"]
        got = []
        for seq in range(1, 6):
            typ, fetched = imap.fetch(str(seq), "(BODY.PEEK[])")
            assert typ == "OK"
            item = fetched[0]
            assert isinstance(item, tuple)
            got.append(item[1])
    finally:
        imap.logout()
    for msg in got:
        assert msg.startswith(
            b"Return-Path: <s@example.net>\r\nX-Original-To: alice@example.org\r\n"
            b"Delivered-To: alice@example.org\r\n"
        )
    # Our prepended headers aside, each message reads back exactly as sent.
    assert sorted(m[m.index(b"Subject: ") :] for m in got) == sorted(bodies)


def _give_to_dovecot(mail: Path) -> None:
    """Hand what serve (root) wrote to the 'mail' user Dovecot reads as."""
    user = pwd.getpwnam("mail")
    os.chown(mail, user.pw_uid, user.pw_gid)
    for dirpath, dirnames, filenames in os.walk(mail):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), user.pw_uid, user.pw_gid)


def test_dovecot_reads_our_lf_sizes(dovecot: tuple[Path, int]) -> None:
    """For LF-stored mail, S is the file size and Dovecot's RFC822.SIZE equals our W."""
    mail, imap_port = dovecot
    bodies = {
        f"s{i}": f"Subject: s{i}\r\n\r\n".encode() + b"a line of text\r\n" * (i * 7) + b"end\r\n"
        for i in range(4)
    }
    with ServerProcess(mail) as srv:

        async def send_all() -> None:
            for data in bodies.values():
                replies = await send_message(
                    "127.0.0.1", srv.port, mail_from="s@example.net",
                    rcpts=["alice@example.org"], body=data,
                )  # fmt: skip
                assert [r.code for r in replies] == [250]

        asyncio.run(send_all())
        assert srv.stop() == 0
    files = list((mail / "example.org" / "alice" / "new").iterdir())
    by_subject: dict[str, tuple[int, int]] = {}
    for path in files:
        data = path.read_bytes()
        m = re.search(r",S=(\d+),W=(\d+)", path.name)
        assert m, path.name
        assert b"\r" not in data
        assert int(m.group(1)) == len(data)
        subject = re.search(rb"\nSubject: (s\d)\n", data)
        assert subject
        by_subject[subject.group(1).decode()] = (int(m.group(1)), int(m.group(2)))
    _give_to_dovecot(mail)
    imap = imaplib.IMAP4("127.0.0.1", imap_port)
    try:
        imap.login("alice@example.org", "secret")
        assert imap.select("INBOX", readonly=True) == ("OK", [b"4"])
        typ, fetched = imap.fetch("1:4", "(RFC822.SIZE BODY.PEEK[])")
        assert typ == "OK"
    finally:
        imap.logout()
    items = [item for item in fetched if isinstance(item, tuple)]
    assert len(items) == 4
    for meta, served in items:
        size = re.search(rb"RFC822\.SIZE (\d+)", meta)
        assert size
        subject = re.search(rb"\r\nSubject: (s\d)\r\n", served)
        assert subject
        s, w = by_subject[subject.group(1).decode()]
        assert int(size.group(1)) == w == len(served) > s
        assert served.endswith(bodies[subject.group(1).decode()])


async def _lmtp_utf8(port: int, rcpts: list[str], data: bytes) -> list[str]:
    """One LMTP transaction with MAIL ... SMTPUTF8: the RCPT and DATA replies."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def reply() -> str:
        while True:
            line = (await asyncio.wait_for(reader.readline(), 10)).decode()
            if line[3:4] != "-":
                return line.rstrip()

    try:
        await reply()
        out = []
        for cmd in [
            "LHLO c",
            "MAIL FROM:<s@example.net> SMTPUTF8",
            *[f"RCPT TO:<{r}>" for r in rcpts],
        ]:
            writer.write(cmd.encode() + b"\r\n")
            out.append(await reply())
        writer.write(b"DATA\r\n")
        assert (await reply()).startswith("354")
        writer.write(data + b"\r\n.\r\n")
        out += [await reply() for r in out[2:] if r.startswith("250")]
        writer.write(b"QUIT\r\n")
        return out[2:]
    finally:
        writer.close()


def test_dovecot_sees_detail_deliveries_in_its_folders(dovecot: tuple[Path, int]) -> None:
    """alice+folder mail lands in folders Dovecot made (non-ASCII too); else in INBOX."""
    mail, imap_port = dovecot
    _give_to_dovecot(mail)  # Dovecot creates alice's Maildir and folders itself
    imap = imaplib.IMAP4("127.0.0.1", imap_port)
    try:
        imap.login("alice@example.org", "secret")
        for box in ("Lists", "R&AOk-sum&AOk-"):  # "Résumé" in IMAP's modified UTF-7
            typ, data = imap.create(box)
            assert typ == "OK", data
    finally:
        imap.logout()
    with ServerProcess(mail, "--recipient-delimiter", "+", "--detail-to-folder") as srv:
        rcpts = ["alice+Lists@example.org", "alice+Résumé@example.org", "alice+none@example.org"]
        replies = asyncio.run(_lmtp_utf8(srv.port, rcpts, b"Subject: boxes\r\n\r\nhi\r\n"))
        assert srv.stop() == 0
    assert [r[:9] for r in replies] == ["250 2.1.5"] * 3 + ["250 2.0.0"] * 3, replies
    _give_to_dovecot(mail)
    imap = imaplib.IMAP4("127.0.0.1", imap_port)
    try:
        imap.login("alice@example.org", "secret")
        for box in ("Lists", "R&AOk-sum&AOk-", "INBOX"):
            assert imap.select(box, readonly=True) == ("OK", [b"1"]), box
            typ, fetched = imap.fetch("1", "(BODY.PEEK[HEADER.FIELDS (DELIVERED-TO)])")
            assert typ == "OK"
            item = fetched[0]
            assert isinstance(item, tuple)
            # An SMTPUTF8 session: Delivered-To names the real address, in UTF-8.
            expect = {"Lists": "alice+Lists", "INBOX": "alice+none"}.get(box, "alice+Résumé")
            assert item[1].decode().strip() == f"Delivered-To: {expect}@example.org"
    finally:
        imap.logout()
