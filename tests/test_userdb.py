"""User databases: passwd-file, texthash, lmdb, sqlite, templates, and RCPT replies through LMTP."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from delivery_executor import DeliveryExecutor
from delivery_executor.errors import RecipientRejected, UserdbUnavailable
from delivery_executor.smtp import DeliveryHandler, SessionFactory
from delivery_executor.testing import Reply, send_message
from delivery_executor.userdb import (
    LmdbMap,
    PasswdFile,
    SqliteUserdb,
    TexthashMap,
    UserdbResolver,
    UserKey,
    UserRecord,
    open_userdb,
    reload_all,
)

from .helpers import files_in, listening, userdb_lmtp

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]

BODY = b"From: s@example.net\r\nSubject: hi\r\n\r\nHello.\r\n"


def passwd(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "users"
    p.write_text(text)
    return p


async def test_passwd_file_fields_extra_and_templates(tmp_path: Path) -> None:
    """uid, gid, home and userdb_ extra fields are read; ~ and %d/%n expand."""
    p = passwd(
        tmp_path,
        "# comment\n\n"
        "alice@example.org:{PLAIN}x:5000:5001::/home/%d/%n::"
        "userdb_mail=maildir:~/Maildir userdb_quota_rule=*:storage=1G"
        " userdb_sieve=~/.dovecot.sieve nopassword=y\n"
        "bob:{PLAIN}y:::::\n",
    )
    db = PasswdFile(str(p))
    rec = await db.lookup(UserKey("alice", "example.org"))
    assert rec == UserRecord(
        home="/home/example.org/alice",
        mail="maildir:~/Maildir",  # ~ is the home, expanded where the path is used
        uid=5000,
        gid=5001,
        quota_rule="*:storage=1G",
        sieve="~/.dovecot.sieve",
    )
    # A bare user name matches any domain (username_format=%n style).
    assert await db.lookup(UserKey("bob", "other.org")) == UserRecord()
    assert await db.lookup(UserKey("carol", "example.org")) is None


async def test_passwd_file_default_fields_fill_what_lines_leave_out(tmp_path: Path) -> None:
    """--userdb-default-fields supply uid/home/quota when the line has none; the line wins."""
    p = passwd(tmp_path, "a@x.org::::::\nb@x.org:::::/srv/b::userdb_quota_rule=*:storage=5M\n")
    db = PasswdFile(str(p), default_fields="uid=0 home=/var/mail/%d/%n quota_rule=*:storage=1M")
    a = await db.lookup(UserKey("a", "x.org"))
    b = await db.lookup(UserKey("b", "x.org"))
    assert a == UserRecord(home="/var/mail/x.org/a", uid=0, quota_rule="*:storage=1M")
    assert b == UserRecord(home="/srv/b", uid=0, quota_rule="*:storage=5M")


async def test_passwd_file_reloaded_when_it_changes(tmp_path: Path) -> None:
    """A changed file (size/mtime) is re-read at the next lookup; an unchanged one is not."""
    p = passwd(tmp_path, "a@x.org::::::\n")
    db = PasswdFile(str(p))
    assert await db.lookup(UserKey("b", "x.org")) is None
    assert await db.lookup(UserKey("a", "x.org")) is not None
    assert db.loads == 1
    p.write_text("a@x.org::::::\nb@x.org::::::\n")
    assert await db.lookup(UserKey("b", "x.org")) is not None
    assert db.loads == 2
    db.reload()
    await db.lookup(UserKey("b", "x.org"))
    assert db.loads == 3


async def test_passwd_file_records_made_once_per_file_version(tmp_path: Path) -> None:
    """A user's record is built once per version of the file; a change or reload rebuilds it."""
    p = passwd(tmp_path, "a@x.org:::::/home/a::userdb_quota_rule=*:storage=1M\n")
    db = PasswdFile(str(p))
    first = await db.lookup(UserKey("a", "x.org"))
    assert first is not None and first.home == "/home/a"
    assert await db.lookup(UserKey("a", "x.org", "ext")) is first  # a dict lookup, same record
    p.write_text("a@x.org:::::/home/a2::userdb_quota_rule=*:storage=2M\n")
    changed = await db.lookup(UserKey("a", "x.org"))
    assert changed is not None and (changed.home, changed.quota_rule) == (
        "/home/a2",
        "*:storage=2M",
    )
    db.reload()
    again = await db.lookup(UserKey("a", "x.org"))
    assert again == changed and again is not changed
    assert db.loads == 3


async def test_passwd_file_missing_is_a_failure_per_domain_file_is_unknown(tmp_path: Path) -> None:
    """A missing fixed file cannot answer (UserdbUnavailable); a missing %d file means unknown."""
    with pytest.raises(UserdbUnavailable, match="no such file"):
        await PasswdFile(str(tmp_path / "nope")).lookup(UserKey("a", "x.org"))
    (tmp_path / "x.org").write_text("a::::::\n")
    per_domain = PasswdFile(str(tmp_path / "%d"))
    assert await per_domain.lookup(UserKey("a", "x.org")) == UserRecord()
    assert await per_domain.lookup(UserKey("a", "y.org")) is None


async def test_texthash_lookup_order_and_results(tmp_path: Path) -> None:
    """user+ext@d, then user@d, then @d, as virtual(8); results must name a Maildir."""
    m = tmp_path / "vmailbox"
    m.write_text(
        "a+lists@x.org x.org/lists/\nA@X.org x.org/a/\n@y.org y.org/catchall/\nm@x.org x.org/mbox\n"
    )
    db = TexthashMap(str(m))
    assert await db.lookup(UserKey("a", "x.org", "lists")) == UserRecord(mail="x.org/lists/")
    assert await db.lookup(UserKey("a", "x.org", "other")) == UserRecord(mail="x.org/a/")
    assert await db.lookup(UserKey("z", "y.org")) == UserRecord(mail="y.org/catchall/")
    assert await db.lookup(UserKey("z", "x.org")) is None
    with pytest.raises(UserdbUnavailable, match="mbox"):
        await db.lookup(UserKey("m", "x.org"))


async def test_lmdb_map_with_nul_terminated_keys(tmp_path: Path) -> None:
    """An lmdb: map as Postfix writes it (NUL-terminated keys and values) is read."""
    lmdb = pytest.importorskip("lmdb")
    path = tmp_path / "vmailbox.lmdb"
    env = lmdb.open(str(path), subdir=False)
    with env.begin(write=True) as txn:
        txn.put(b"a@x.org\0", b"x.org/a/\0")
        txn.put(b"@y.org\0", b"y.org/all/\0")
    env.close()
    db = LmdbMap(str(path))
    try:
        assert await db.lookup(UserKey("a", "x.org")) == UserRecord(mail="x.org/a/")
        assert await db.lookup(UserKey("q", "y.org")) == UserRecord(mail="y.org/all/")
        assert await db.lookup(UserKey("q", "x.org")) is None
    finally:
        await db.aclose()


async def test_sqlite_userdb_binds_the_address(tmp_path: Path) -> None:
    """sql:sqlite:/// runs the query with the address bound as $1; no row is unknown."""
    path = tmp_path / "users.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE users (email TEXT, home TEXT, quota TEXT)")
        conn.execute("INSERT INTO users VALUES ('a@x.org', '/srv/a', '*:storage=2M')")
        conn.commit()
    db = open_userdb(
        f"sql:sqlite:///{path}",
        user_query="SELECT home, quota AS quota_rule FROM users WHERE email = $1",
    )
    assert isinstance(db, SqliteUserdb)
    try:
        assert await db.lookup(UserKey("a", "x.org")) == UserRecord(
            home="/srv/a", quota_rule="*:storage=2M"
        )
        assert await db.lookup(UserKey("x' OR '1'='1", "x.org")) is None
    finally:
        await db.aclose()
    broken = SqliteUserdb(str(tmp_path / "missing.db"), "SELECT home FROM users WHERE e = $1")
    with pytest.raises(UserdbUnavailable):
        await broken.lookup(UserKey("a", "x.org"))


async def test_open_userdb_rejects_bad_specs() -> None:
    """Unknown kinds, missing paths and sql: without a $1 query are ValueErrors naming them."""
    for spec in ("nope:/x", "passwd-file:", "texthash"):
        with pytest.raises(ValueError, match="--userdb must be"):
            open_userdb(spec)
    with pytest.raises(ValueError, match="--user-query"):
        open_userdb("sql:sqlite:///x.db")
    with pytest.raises(ValueError, match=r"\$1"):
        open_userdb("sql:sqlite:///x.db", user_query="SELECT home FROM u WHERE e = 'a'")


async def test_resolver_paths_from_records_and_templates(tmp_path: Path) -> None:
    """mail, ~/Maildir from a home, --mail-location, texthash results under the root."""
    root = tmp_path / "mail"
    p = passwd(
        tmp_path,
        f"a@x.org:::::{root}/homes/a::userdb_mail=maildir:~/Mail:LAYOUT=fs\n"
        f"b@x.org:::::{root}/homes/b::\n"
        "c@x.org::::::\n",
    )
    r = UserdbResolver(root, userdbs=[PasswdFile(str(p))])
    assert await r.aresolve("A@x.org") == f"{root}/homes/a/Mail"
    assert await r.aresolve("b@x.org") == f"{root}/homes/b/Maildir"
    assert await r.aresolve("c@x.org") == f"{root}/x.org/c"
    r2 = UserdbResolver(root, userdbs=[PasswdFile(str(p))], mail_location="%d/%n/Maildir")
    assert await r2.aresolve("c@x.org") == f"{root}/x.org/c/Maildir"
    # Without a userdb: the template alone, synchronously too.
    r3 = UserdbResolver(root, mail_location="maildir:~/Maildir", mail_home=f"{root}/h/%d/%n")
    assert r3.resolve("d@y.org") == f"{root}/h/y.org/d/Maildir"
    assert await r3.aresolve("d@y.org") == f"{root}/h/y.org/d/Maildir"
    with pytest.raises(ValueError, match="only maildir"):
        UserdbResolver(root, mail_location="mbox:~/mail")


async def test_resolver_refuses_paths_outside_root_and_home(tmp_path: Path) -> None:
    """A database answer that leaves the root and the user's home is refused with 553."""
    root = tmp_path / "mail"
    m = tmp_path / "map"
    m.write_text("a@x.org ../../etc/\nb@x.org /etc/\nc@x.org .hidden/\n")
    r = UserdbResolver(root, userdbs=[TexthashMap(str(m))])
    for who in ("a", "b", "c"):
        with pytest.raises(RecipientRejected) as ei:
            await r.aresolve(f"{who}@x.org")
        assert ei.value.code == "553 5.1.3", who
    p = passwd(tmp_path, "d@x.org:::::/srv/d::userdb_mail=maildir:~/../../etc\n")
    r2 = UserdbResolver(root, userdbs=[PasswdFile(str(p))])
    with pytest.raises(RecipientRejected, match="outside the mail root and home"):
        await r2.aresolve("d@x.org")
    # Hostile addresses never reach the database's templates.
    r3 = UserdbResolver(root, mail_location="%d/%n")
    for bad in ("../x@x.org", "a/b@x.org", ".a@x.org"):
        with pytest.raises(RecipientRejected, match="553"):
            await r3.aresolve(bad)


async def test_resolver_cache_failures_and_chain(tmp_path: Path) -> None:
    """Databases are tried in order; answers are cached for the TTL, failures never are."""
    first = tmp_path / "first"
    first.write_text("a@x.org x.org/a/\n")
    second = passwd(tmp_path, "b@x.org::::::\n")
    r = UserdbResolver(tmp_path, userdbs=[TexthashMap(str(first)), PasswdFile(str(second))])
    assert await r.aresolve("a@x.org") == f"{tmp_path}/x.org/a"
    assert await r.aresolve("b@x.org") == f"{tmp_path}/x.org/b"
    with pytest.raises(RecipientRejected, match=r"550 5\.1\.1"):
        await r.aresolve("c@x.org")
    lookups = r.lookups
    await r.aresolve("a@x.org")
    with pytest.raises(RecipientRejected, match=r"550 5\.1\.1"):
        await r.aresolve("c@x.org")
    assert r.lookups == lookups  # both from the cache
    assert reload_all() >= 1  # SIGHUP: the cache is dropped
    second.unlink()
    with pytest.raises(RecipientRejected, match=r"451 4\.3\.0"):
        await r.aresolve("b@x.org")
    second.write_text("b@x.org::::::\n")
    assert await r.aresolve("b@x.org") == f"{tmp_path}/x.org/b"


async def send(port: int, rcpts: list[str]) -> list[Reply]:
    return await send_message(
        "127.0.0.1", port, mail_from="s@example.net", rcpts=rcpts, body=BODY, lmtp=True
    )


async def test_lmtp_rcpt_replies_unknown_and_failing_userdb(tmp_path: Path) -> None:
    """Through LMTP: known 250 (mail where the userdb says), unknown 550 5.1.1, unreadable 451."""
    root = tmp_path / "mail"
    p = passwd(tmp_path, f"a@x.org:::::{root}/u/a::\n")
    resolver = UserdbResolver(root, userdbs=[PasswdFile(str(p))], cache_ttl=0)
    async with userdb_lmtp(resolver) as port:
        replies = await send(port, ["a@x.org", "nobody@x.org"])
        assert [r.code for r in replies] == [250, 550]
        assert replies[1].text.startswith("5.1.1")
        assert len(files_in(root / "u" / "a" / "Maildir" / "new")) == 1
        os.chmod(p, 0)
        p.rename(tmp_path / "gone")  # root ignores modes: make it unreadable by removal
        replies = await send(port, ["a@x.org"])
        assert [r.code for r in replies] == [451]
        assert replies[0].text.startswith("4.3.0")
    assert len(files_in(root / "u" / "a" / "Maildir" / "new")) == 1  # nothing lost or misplaced
    assert not (root / "x.org").exists()


async def test_server_config_builds_a_userdb_resolver(tmp_path: Path) -> None:
    """--userdb/--mail-location in the config build a UserdbResolver; none: the plain one."""
    from delivery_executor.server.core import ServerConfig
    from delivery_executor.userdb import resolver_for

    p = passwd(tmp_path, "a@x.org::::::\n")
    cfg: Any = ServerConfig(root=tmp_path, userdb=(f"passwd-file:{p}",), mail_location="%d/%n/M")
    r = resolver_for(cfg)
    assert isinstance(r, UserdbResolver)
    assert await r.aresolve("a@x.org") == f"{tmp_path}/x.org/a/M"
    assert resolver_for(ServerConfig(root=tmp_path)) is None


async def test_bounded_cache_keeps_the_record_of_every_answer_it_serves(tmp_path: Path) -> None:
    """With cache_size=2, a cached path whose record was evicted is looked up again."""
    p = passwd(
        tmp_path, "".join(f"{u}@x.org:::::::userdb_quota_rule=*:messages=9\n" for u in "abc")
    )
    r = UserdbResolver(tmp_path, userdbs=[PasswdFile(str(p))], cache_size=2)
    paths = [await r.aresolve(f"{u}@x.org") for u in "abc"]
    assert len(r._cache) == 2 and len(r._records) == 2
    for path, u in zip(paths, "abc", strict=True):
        assert await r.aresolve(f"{u}@x.org") == path
        record = r.record(path)
        assert record is not None and record.quota_rule == "*:messages=9"


async def test_cdb_map_as_postmap_writes_it(tmp_path: Path) -> None:
    """A cdb: map (keys and values without NUL, as Postfix writes them) answers like texthash."""
    cdblib = pytest.importorskip("cdblib")
    with (tmp_path / "vmailbox.cdb").open("wb") as f, cdblib.Writer(f) as w:
        w.put(b"a@x.org", b"x.org/a/")
        w.put(b"@y.org", b"y.org/all/")
    db = open_userdb(f"cdb:{tmp_path / 'vmailbox'}")
    try:
        assert await db.lookup(UserKey("a", "x.org", "ext")) == UserRecord(mail="x.org/a/")
        assert await db.lookup(UserKey("q", "y.org")) == UserRecord(mail="y.org/all/")
        assert await db.lookup(UserKey("q", "x.org")) is None
    finally:
        await db.aclose()


async def test_one_lookup_per_address_per_transaction_even_without_a_cache(
    tmp_path: Path,
) -> None:
    """--userdb-cache-ttl 0: an address named twice in one transaction (known or unknown)
    is looked up once; the next transaction looks it up again."""
    p = passwd(tmp_path, "a@x.org::::::\nb@x.org::::::\n")
    r = UserdbResolver(tmp_path, userdbs=[PasswdFile(str(p))], cache_ttl=0)
    async with userdb_lmtp(r) as port:
        rcpts = ["a@x.org", "a@x.org", "b@x.org", "nobody@x.org", "nobody@x.org"]
        replies = await send(port, rcpts)
        assert [x.code for x in replies] == [250, 250, 250, 550, 550], replies
        assert r.lookups == 3
        await send(port, ["a@x.org", "a@x.org"])
        assert r.lookups == 4
    assert len(files_in(tmp_path / "x.org" / "a" / "new")) == 2  # one copy per transaction


async def test_rcpt_answers_do_not_outlive_their_transaction(tmp_path: Path) -> None:
    """After transactions with refused and accepted RCPTs, no envelope is kept alive."""
    p = passwd(tmp_path, "a@x.org::::::\n")
    r = UserdbResolver(tmp_path, userdbs=[PasswdFile(str(p))], cache_ttl=0)
    ex = DeliveryExecutor()
    handler = DeliveryHandler(ex, r)
    factory = SessionFactory(handler, lmtp=True, max_connections=8, loop=asyncio.get_running_loop())
    async with listening(factory, ex) as port:
        for _ in range(3):
            await send(port, ["a@x.org", "nobody@x.org", "nobody@x.org"])
    gc.collect()
    assert len(handler._resolved) == 0
