"""Maildir++ quota: rules, maildirsize upkeep, per-recipient refusals, and Dovecot reading it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from delivery_executor import DeliveryExecutor, Maildir
from delivery_executor.errors import QuotaExceeded
from delivery_executor.quota import (
    QuotaDeliverer,
    QuotaLimits,
    Usage,
    parse_quota_rule,
    read_usage,
    recalculate,
)
from delivery_executor.server.core import ServerConfig
from delivery_executor.smtp import DeliveryHandler, SessionFactory
from delivery_executor.testing import send_message
from delivery_executor.userdb import PasswdFile, UserdbResolver, quota_for

from .helpers import files_in, listening

pytestmark = [pytest.mark.timeout(120)]

BODY = b"Subject: q\r\n\r\n" + b"x" * 980 + b"\r\n"


def test_parse_quota_rule_units_and_errors() -> None:
    """Dovecot's syntax: storage in KiB unless a unit, bytes, messages, ignore; bad: ValueError."""
    assert parse_quota_rule("*:storage=1G") == QuotaLimits(1 << 30, None)
    assert parse_quota_rule("*:storage=100") == QuotaLimits(100 * 1024, None)
    assert parse_quota_rule("*:bytes=5000:messages=10") == QuotaLimits(5000, 10)
    assert parse_quota_rule("*:storage=2m") == QuotaLimits(2 << 20, None)
    assert parse_quota_rule("*:ignore").unlimited
    assert parse_quota_rule("*:storage=0").unlimited
    for bad in ("Trash:storage=1G", "*:storage=lots", "*:colour=1", "storage=1G", "*:messages=1k"):
        with pytest.raises(ValueError, match="quota rule"):
            parse_quota_rule(bad)
    assert QuotaLimits(1000, 5).header() == "1000S,5C"
    assert QuotaLimits(1000).header() == "1000S"


def _fill(maildir: Path, sizes: list[int], folder: str = "") -> None:
    base = maildir / folder if folder else maildir
    for sub in ("new", "cur", "tmp"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for i, size in enumerate(sizes):
        sub = "new" if i % 2 else "cur"
        name = f"{i}.M1P1.host{folder},S={size},W={size + 1}" + (":2,S" if sub == "cur" else "")
        (base / sub / name).write_bytes(b"x" * size)


def test_maildirsize_recalculated_when_missing_big_changed_or_stale(tmp_path: Path) -> None:
    """Missing, over 5,120 bytes, other limits, or over quota and 15 min old: recount; else sum."""
    md = tmp_path / "md"
    _fill(md, [100, 200, 300])
    _fill(md, [1000], folder=".Sent")
    (md / "new" / "nosize").write_bytes(b"y" * 50)  # no ,S=: stat'ed
    limits = QuotaLimits(10_000, 100)
    assert read_usage(str(md), limits) is None
    assert recalculate(str(md), limits) == Usage(1650, 5)
    assert (md / "maildirsize").read_text() == "10000S,100C\n1650 5\n"
    with (md / "maildirsize").open("a") as f:
        f.write("10 1\n-100 -1\n5 1\n")  # another writer's lines, a partial last one ignored
    assert read_usage(str(md), limits) == Usage(1565, 6)
    assert read_usage(str(md), QuotaLimits(20_000, 100)) is None  # limits changed
    with (md / "maildirsize").open("a") as f:
        f.write("1 0\n" * 2000)
    assert read_usage(str(md), limits) is None  # over 5,120 bytes
    recalculate(str(md), QuotaLimits(1000))
    assert read_usage(str(md), QuotaLimits(1000)) == Usage(1650, 5)  # over quota but fresh
    old = time.time() - 16 * 60
    os.utime(md / "maildirsize", (old, old))
    assert read_usage(str(md), QuotaLimits(1000)) is None


async def _deliverer(
    root: Path, rule: str, **kw: object
) -> tuple[QuotaDeliverer, DeliveryExecutor]:
    ex = DeliveryExecutor()
    limits = parse_quota_rule(rule)
    return QuotaDeliverer(ex, lambda md: limits, **kw), ex  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_one_append_per_mailbox_per_batch_and_exact_totals(tmp_path: Path) -> None:
    """Concurrent deliveries append one line per mailbox per batch; sums equal what is on disk."""
    q, ex = await _deliverer(tmp_path, "*:storage=10M")
    boxes = [str(tmp_path / f"u{i}") for i in range(3)]
    async with ex:
        for md in boxes:  # the first delivery creates maildirsize
            await q.deliver(md, b"first\n")
        before = q.appends
        await asyncio.gather(*(q.deliver(boxes[i % 3], BODY) for i in range(60)))
        batches = ex.stats().batches
    appended = q.appends - before
    assert 3 <= appended < 60
    assert appended <= 3 * batches
    for md in boxes:
        usage = read_usage(md, QuotaLimits(10 << 20))
        on_disk = recalculate(md, QuotaLimits(10 << 20))
        assert usage == on_disk == Usage(6 + 20 * len(BODY), 21)


@pytest.mark.asyncio
async def test_limits_grace_and_replies(tmp_path: Path) -> None:
    """A delivery may pass the limit by the grace if the box was under it; then 552 or 452."""
    md = str(tmp_path / "u")
    n = len(BODY)
    q, ex = await _deliverer(tmp_path, f"*:bytes={int(2.8 * n)}")
    async with ex:
        await q.deliver(md, BODY)
        await q.deliver(md, BODY)
        await q.deliver(md, BODY)  # 2 n was under; 3 n <= 2.8 n * 1.1: within the grace
        with pytest.raises(QuotaExceeded) as ei:
            await q.deliver(md, BODY)  # already over: refused
        assert ei.value.reply == "552 5.2.2 Quota exceeded (mailbox for user is full)"
        strict, ex2 = await _deliverer(tmp_path, f"*:bytes={2 * n}", grace=0.0, tempfail=True)
        async with ex2:
            md2 = str(tmp_path / "v")
            await strict.deliver(md2, BODY)
            await strict.deliver(md2, BODY)
            with pytest.raises(QuotaExceeded, match=r"^452 4\.2\.2"):
                await strict.deliver(md2, BODY)
        counted, ex3 = await _deliverer(tmp_path, "*:messages=2")
        async with ex3:
            md3 = str(tmp_path / "w")
            await counted.deliver(md3, b"a\n")
            await counted.deliver(md3, b"b\n")
            with pytest.raises(QuotaExceeded):
                await counted.deliver(md3, b"c\n")
    assert len(Maildir.open(md).scan_new()) == 3
    assert q.rejections == 1


@pytest.mark.asyncio
async def test_concurrent_writer_drift_is_repaired_by_recalculation(tmp_path: Path) -> None:
    """Files removed behind our back (an IMAP expunge) are seen once maildirsize is recounted."""
    md = tmp_path / "u"
    q, ex = await _deliverer(tmp_path, "*:messages=3")
    async with ex:
        for _ in range(3):
            await q.deliver(str(md), b"m\n")
        with pytest.raises(QuotaExceeded):
            await q.deliver(str(md), b"m\n")
        for name in files_in(md / "new")[:2]:
            (md / "new" / name).unlink()  # expunged without a maildirsize line
        with (md / "maildirsize").open("a") as f:  # a writer that grew the file past 5,120
            f.write("0 0\n" * 1400)
        await q.deliver(str(md), b"m\n")  # recounted: 1 + 1 <= 3
    assert (md / "maildirsize").stat().st_size < 100


@contextlib.asynccontextmanager
async def lmtp_server(config: ServerConfig, resolver: UserdbResolver) -> AsyncIterator[int]:
    ex = DeliveryExecutor()
    deliverer = quota_for(config, ex, resolver)
    assert deliverer is not None
    handler = DeliveryHandler(deliverer, resolver)
    loop = asyncio.get_running_loop()
    factory = SessionFactory(handler, lmtp=True, max_connections=8, loop=loop)
    async with listening(factory, ex) as port:
        yield port
    assert handler.quota_rejected >= 1


@pytest.mark.asyncio
async def test_lmtp_full_mailbox_gets_552_others_250(tmp_path: Path) -> None:
    """In one LMTP transaction the full mailbox gets 552 5.2.2 and the others 250."""
    users = tmp_path / "users"
    users.write_text(
        "full@x.org:::::::userdb_quota_rule=*:messages=1\nok@x.org:::::::\nother@x.org:::::::\n"
    )
    root = tmp_path / "mail"
    config = ServerConfig(root=root, userdb=(f"passwd-file:{users}",), quota_rule="*:storage=1M")
    resolver = UserdbResolver(root, userdbs=[PasswdFile(str(users))])
    async with lmtp_server(config, resolver) as port:

        async def send(rcpts: list[str]) -> list[str]:
            replies = await send_message(
                "127.0.0.1", port, mail_from="s@x.org", rcpts=rcpts, body=BODY, lmtp=True
            )
            return [f"{r.code} {r.text}" for r in replies]

        assert [r[:3] for r in await send(["full@x.org"])] == ["250"]
        replies = await send(["ok@x.org", "full@x.org", "other@x.org"])
        assert replies[0].startswith("250") and replies[2].startswith("250")
        assert replies[1] == "552 5.2.2 <full@x.org> Quota exceeded (mailbox for user is full)"
    assert len(files_in(root / "x.org" / "full" / "new")) == 1
    assert len(files_in(root / "x.org" / "ok" / "new")) == 1
    assert len(files_in(root / "x.org" / "other" / "new")) == 1
    assert (root / "x.org" / "ok" / "maildirsize").read_text().startswith("1048576S\n")


@pytest.mark.asyncio
async def test_quota_checked_at_rcpt_with_size(tmp_path: Path) -> None:
    """--quota-check-at-rcpt refuses at RCPT when SIZE= would not fit (and a full box)."""
    root = tmp_path / "mail"
    config = ServerConfig(root=root, quota_rule="*:bytes=5000", quota_check_at_rcpt=True)
    resolver = UserdbResolver(root, mail_location="%d/%n")
    async with lmtp_server(config, resolver) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:

            async def cmd(line: str) -> str:
                if line:
                    writer.write(line.encode() + b"\r\n")
                reply = b""
                while True:
                    got = await reader.readline()
                    reply += got
                    if got[3:4] != b"-":
                        return reply.decode()

            assert (await cmd("")).startswith("220")
            assert (await cmd("LHLO c")).startswith("250")
            assert (await cmd("MAIL FROM:<s@x.org> SIZE=9000")).startswith("250")
            assert (await cmd("RCPT TO:<a@x.org>")).startswith("552 5.2.2")
            assert (await cmd("RSET")).startswith("250")
            assert (await cmd("MAIL FROM:<s@x.org> SIZE=100")).startswith("250")
            assert (await cmd("RCPT TO:<a@x.org>")).startswith("250")
        finally:
            writer.close()
            await writer.wait_closed()


# -- a real Dovecot reads our maildirsize -------------------------------------------


def _need(binary: str) -> str:
    path = shutil.which(binary) or (
        f"/usr/bin/{binary}" if os.path.exists(f"/usr/bin/{binary}") else None
    )
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{binary} missing in CI")
        pytest.skip(f"{binary} not installed")
    return path


@pytest.fixture
def dovecot_quota() -> Iterator[tuple[Path, Path, Path]]:
    """A Dovecot with ``quota = maildir:User quota`` and a passwd-file userdb; yields
    (config file, passwd-file, mail root)."""
    binary = _need("dovecot")
    _need("doveadm")
    if os.geteuid() != 0:
        pytest.skip("needs root (Dovecot reads the mail as the 'mail' user)")
    base = Path(tempfile.mkdtemp(prefix="de-quota-"))
    base.chmod(0o755)
    for sub in ("run", "state", "mail"):
        (base / sub).mkdir()
    user = pwd.getpwnam("mail")
    users = base / "users"
    users.write_text(
        f"alice@example.org:{{PLAIN}}x:{user.pw_uid}:{user.pw_gid}::{base}/mail/example.org/alice::"
        "userdb_mail=maildir:~/Maildir userdb_quota_rule=*:storage=100K\n"
    )
    conf = base / "dovecot.conf"
    conf.write_text(
        f"""protocols =
base_dir = {base}/run
state_dir = {base}/state
log_path = {base}/dovecot.log
ssl = no
first_valid_uid = 1
mail_plugins = quota
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {users}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {users}
}}
plugin {{
  quota = maildir:User quota
}}
"""
    )
    proc = subprocess.Popen([binary, "-F", "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not (base / "run" / "auth-userdb").exists():
            assert proc.poll() is None, "dovecot exited"
            assert time.monotonic() < deadline, "dovecot did not start"
            time.sleep(0.05)
        yield conf, users, base / "mail"
    finally:
        proc.terminate()
        proc.wait(20)
        shutil.rmtree(base, ignore_errors=True)


def _doveadm(conf: Path, *args: str) -> str:
    return subprocess.run(
        ["doveadm", "-c", str(conf), *args], check=True, capture_output=True, text=True, timeout=60
    ).stdout


def _quota_get(conf: Path) -> dict[str, int]:
    out = _doveadm(conf, "-f", "tab", "quota", "get", "-u", "alice@example.org")
    rows = [line.split("\t") for line in out.strip().splitlines()[1:]]
    return {r[1]: int(r[2]) for r in rows}


def _chown_to_mail(path: Path) -> None:
    user = pwd.getpwnam("mail")
    for dirpath, _, filenames in os.walk(path):
        os.chown(dirpath, user.pw_uid, user.pw_gid)
        for name in filenames:
            os.chown(os.path.join(dirpath, name), user.pw_uid, user.pw_gid)


def test_dovecot_reports_what_we_account_and_we_see_its_expunges(
    dovecot_quota: tuple[Path, Path, Path],
) -> None:
    """doveadm quota get reports our bytes and messages; after its expunge our usage drops."""
    conf, users, mail = dovecot_quota
    config = ServerConfig(root=mail, userdb=(f"passwd-file:{users}",))

    async def deliver(n: int) -> list[str]:
        resolver = UserdbResolver(mail, userdbs=[PasswdFile(str(users))])
        async with lmtp_server_quiet(config, resolver) as port:
            out = []
            for _ in range(n):
                rcpts = ["alice@example.org"]
                replies = await send_message(
                    "127.0.0.1", port, mail_from="s@x.org", rcpts=rcpts, body=BODY, lmtp=True
                )
                out.append(f"{replies[0].code}")
            return out

    assert asyncio.run(deliver(5)) == ["250"] * 5
    maildir = mail / "example.org" / "alice" / "Maildir"
    ours = read_usage(str(maildir), QuotaLimits(100 * 1024))
    assert ours is not None and ours.messages == 5
    assert ours.bytes == sum(
        int(n.split(",S=")[1].split(",")[0]) for n in files_in(maildir / "new")
    )
    before = (maildir / "maildirsize").read_bytes()
    _chown_to_mail(mail)
    got = _quota_get(conf)
    assert got["MESSAGE"] == 5
    assert got["STORAGE"] in (ours.bytes // 1024, -(-ours.bytes // 1024))
    assert (maildir / "maildirsize").read_bytes() == before  # read as it was, not recounted
    _doveadm(conf, "expunge", "-u", "alice@example.org", "mailbox", "INBOX", "all")
    after = read_usage(str(maildir), QuotaLimits(100 * 1024))
    assert after == Usage(0, 0)
    assert asyncio.run(deliver(1)) == ["250"]
    (name,) = files_in(maildir / "new")
    size = int(name.split(",S=")[1].split(",")[0])
    assert read_usage(str(maildir), QuotaLimits(100 * 1024)) == Usage(size, 1)
    _chown_to_mail(mail)
    assert _quota_get(conf)["MESSAGE"] == 1


@contextlib.asynccontextmanager
async def lmtp_server_quiet(config: ServerConfig, resolver: UserdbResolver) -> AsyncIterator[int]:
    ex = DeliveryExecutor()
    deliverer = quota_for(config, ex, resolver)
    assert deliverer is not None
    loop = asyncio.get_running_loop()
    factory = SessionFactory(DeliveryHandler(deliverer, resolver), lmtp=True, max_connections=8,
                             loop=loop)  # fmt: skip
    async with listening(factory, ex) as port:
        yield port


@pytest.mark.asyncio
async def test_copies_are_checked_in_call_order_even_during_a_recount(tmp_path: Path) -> None:
    """Concurrent copies into a box being recounted are judged in the order they came."""
    limits = parse_quota_rule("*:messages=2")
    async with DeliveryExecutor(writer="loop") as ex:
        q = QuotaDeliverer(ex, lambda md: limits)
        for i in range(10):
            md = str(tmp_path / f"u{i}")  # no maildirsize yet: the first copy recounts

            async def one(md: str = md) -> str:
                try:
                    await q.deliver(md, b"x\n")
                except QuotaExceeded:
                    return "full"
                return "ok"

            assert list(await asyncio.gather(one(), one(), one())) == ["ok", "ok", "full"]


def test_quota_rejections_are_counted_in_metrics(tmp_path: Path) -> None:
    """serve --quota-rule: the second message to a one-message box is 552 and counted."""
    from delivery_executor.testing import ServerProcess, free_port

    from .test_observability import scrape, value

    mport = free_port()
    args = ("--quota-rule", "*:messages=1", "--metrics", f"127.0.0.1:{mport}")
    with ServerProcess(tmp_path / "mail", *args) as srv:

        async def two() -> list[int]:
            codes = []
            for _ in range(2):
                replies = await send_message(
                    "127.0.0.1", srv.port, mail_from="s@x.org", rcpts=["a@x.org"], body=BODY
                )
                codes.append(replies[0].code)
            return codes

        assert asyncio.run(two()) == [250, 552]
        samples = scrape(mport)
        assert srv.stop() == 0
    assert value(samples, "quota_rejected_total") == 1
    assert value(samples, "delivered_total") == 1


@pytest.mark.asyncio
async def test_a_bad_quota_rule_in_the_userdb_defers_only_that_user(tmp_path: Path) -> None:
    """A user whose quota_rule cannot be parsed gets 451 4.3.0 at DATA; the others 250."""
    users = tmp_path / "users"
    users.write_text("bad@x.org:::::::userdb_quota_rule=*:colour=1\nok@x.org:::::::\n")
    root = tmp_path / "mail"
    config = ServerConfig(root=root, userdb=(f"passwd-file:{users}",), quota_rule="*:messages=5")
    resolver = UserdbResolver(root, userdbs=[PasswdFile(str(users))])
    loop = asyncio.get_running_loop()
    async with DeliveryExecutor() as ex:
        deliverer = quota_for(config, ex, resolver)
        assert deliverer is not None
        factory = SessionFactory(
            DeliveryHandler(deliverer, resolver), lmtp=True, max_connections=4, loop=loop
        )
        srv = await loop.create_server(factory, "127.0.0.1", 0)
        try:
            replies = await send_message(
                "127.0.0.1", srv.sockets[0].getsockname()[1], mail_from="s@x.org",
                rcpts=["bad@x.org", "ok@x.org"], body=BODY, lmtp=True,
            )  # fmt: skip
        finally:
            srv.close()
            await srv.wait_closed()
    assert [(r.code, r.text[:5]) for r in replies] == [(451, "4.3.0"), (250, "2.0.0")]
    assert not (root / "x.org" / "bad" / "new").exists() or not files_in(
        root / "x.org" / "bad" / "new"
    )


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every read-only open of a ``maildirsize`` (the quota module's reads)."""
    opened: list[str] = []
    real_open = os.open

    def counting_open(path: str, flags: int, *args: int) -> int:
        if str(path).endswith("maildirsize") and not flags & (os.O_WRONLY | os.O_RDWR):
            opened.append(str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", counting_open)
    return opened


@pytest.mark.asyncio
async def test_unchanged_maildirsize_is_not_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the first read, our own appends keep the totals: later checks only stat the file."""
    md = str(tmp_path / "u")
    q, ex = await _deliverer(tmp_path, "*:storage=10M")
    async with ex:
        await q.deliver(md, b"first\n")  # recounted, then appended
        opened = _count_reads(monkeypatch)
        for _ in range(5):
            await q.deliver(md, BODY)
        assert opened == [str(tmp_path / "u" / "maildirsize")]  # read once, never again
    assert q.appends == 6
    assert read_usage(md, QuotaLimits(10 << 20)) == recalculate(md, QuotaLimits(10 << 20))
    assert recalculate(md, QuotaLimits(10 << 20)) == Usage(6 + 5 * len(BODY), 6)


@pytest.mark.asyncio
async def test_remembered_usage_sees_other_writers_lines_and_rebuilds(tmp_path: Path) -> None:
    """Lines another writer appends (even torn) and a rebuild renamed over it are counted."""
    md = tmp_path / "u"
    q, ex = await _deliverer(tmp_path, "*:messages=5")
    async with ex:
        await q.deliver(str(md), b"m\n")  # 1
        await asyncio.sleep(0)  # its line is appended one loop turn later
        limits = QuotaLimits(None, 5)
        with (md / "maildirsize").open("a") as f:
            f.write("100 2\n50")  # another writer: 3, plus a torn line still being written
        assert await q.usage(str(md), limits) == Usage(102, 3)  # the torn line: not yet
        with (md / "maildirsize").open("a") as f:
            f.write(" 1\n")  # finished: 4
        assert await q.usage(str(md), limits) == Usage(152, 4)
        await q.deliver(str(md), b"m\n")  # 5
        with pytest.raises(QuotaExceeded):
            await q.deliver(str(md), b"m\n")
        # Another writer rebuilds the file (tmp + rename) after an expunge: 2 messages left.
        tmp = md / "tmp" / "rebuild"
        tmp.write_text("5S\n0 0\n")  # other limits: we recount
        os.rename(tmp, md / "maildirsize")
        for name in files_in(md / "new")[1:]:
            (md / "new" / name).unlink()
        await q.deliver(str(md), b"m\n")  # recounted: 1 + 1
        await asyncio.sleep(0)
        tmp.write_text("5C\n2 2\n")  # same limits, our view of the totals
        os.rename(tmp, md / "maildirsize")
        await q.deliver(str(md), b"m\n")  # 3
        await asyncio.sleep(0)
        with (md / "maildirsize").open("a") as f:
            f.write("-2 -2\n")  # an expunge elsewhere: 1
        for _ in range(4):
            await q.deliver(str(md), b"m\n")  # 5
        with pytest.raises(QuotaExceeded):
            await q.deliver(str(md), b"m\n")
    assert q.rejections == 2
    assert read_usage(str(md), QuotaLimits(None, 5)) == Usage(2 + 2 - 2 + 4 * 2, 5)


@pytest.mark.asyncio
async def test_a_new_mailbox_is_counted_without_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Maildir that does not exist yet gets its maildirsize on the loop, no thread hop."""
    hops: list[object] = []
    real = asyncio.to_thread

    async def no_thread(func: object, /, *args: object) -> object:
        hops.append(func)
        return await real(func, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(asyncio, "to_thread", no_thread)
    q, ex = await _deliverer(tmp_path, "*:storage=10M")
    async with ex:
        await q.deliver(str(tmp_path / "new-user"), BODY)
        assert hops == []
        _fill(tmp_path / "old-user", [100])  # exists without maildirsize: walked in a thread
        await q.deliver(str(tmp_path / "old-user"), BODY)
        assert hops == [recalculate]
    assert read_usage(str(tmp_path / "new-user"), QuotaLimits(10 << 20)) == Usage(len(BODY), 1)
    assert read_usage(str(tmp_path / "old-user"), QuotaLimits(10 << 20)) == Usage(
        100 + len(BODY), 2
    )


@pytest.mark.asyncio
async def test_a_line_appended_between_our_check_and_our_append_is_counted(
    tmp_path: Path,
) -> None:
    """Another writer's line that lands between our check and our own append is not lost."""
    md = str(tmp_path / "u")

    def other_writer(path: str) -> None:
        with open(os.path.join(path, "maildirsize"), "a") as f:
            f.write("1000 1\n")

    class Racing:
        """Writes nothing; another writer appends while our copy is being written."""

        async def deliver(self, path: str, message: bytes) -> str:
            other_writer(path)
            return "name"

    limits = QuotaLimits(None, 100)
    q = QuotaDeliverer(Racing(), lambda m: limits)
    for _ in range(3):
        await q.deliver(md, b"abc\n")
        await asyncio.sleep(0)  # our append
    assert await q.usage(md, limits) == Usage(3 * 1004, 6) == read_usage(md, limits)


def test_remembered_usage_follows_dovecot_expunge_and_save_both_ways(
    dovecot_quota: tuple[Path, Path, Path],
) -> None:
    """One long-lived QuotaDeliverer sees Dovecot's expunge and save; Dovecot counts ours."""
    conf, _, mail = dovecot_quota
    maildir = mail / "example.org" / "alice" / "Maildir"
    md = str(maildir)
    limits = QuotaLimits(100 * 1024)

    def sizes() -> int:
        return sum(int(n.split(",S=")[1].split(",")[0]) for n in files_in(maildir / "new"))

    def dovecot_save() -> None:
        subprocess.run(
            ["doveadm", "-c", str(conf), "save", "-u", "alice@example.org", "-m", "INBOX"],
            input=b"Subject: from dovecot\n\nhello\n", check=True, capture_output=True,
            timeout=60,
        )  # fmt: skip

    async def scenario() -> None:
        async with DeliveryExecutor() as ex:
            q = QuotaDeliverer(ex, lambda m: limits)
            for _ in range(3):
                await q.deliver(md, BODY)
                await asyncio.sleep(0)  # our line
            assert await q.usage(md, limits) == Usage(sizes(), 3) == read_usage(md, limits)
            await asyncio.to_thread(_chown_to_mail, mail)
            await asyncio.to_thread(
                _doveadm, conf, "expunge", "-u", "alice@example.org", "mailbox", "INBOX", "all"
            )
            assert await q.usage(md, limits) == Usage(0, 0)
            await asyncio.to_thread(dovecot_save)
            theirs = await q.usage(md, limits)
            assert theirs.messages == 1 and theirs == read_usage(md, limits)
            await q.deliver(md, BODY)
            await asyncio.sleep(0)
            both = await q.usage(md, limits)
            assert both == read_usage(md, limits)
            assert both.messages == 2 and both.bytes == theirs.bytes + len(BODY)

    asyncio.run(scenario())
    _chown_to_mail(mail)
    got = _quota_get(conf)
    assert got["MESSAGE"] == 2
