"""User databases when things go wrong: bad options, broken files and rows, 451 versus 550."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sqlite3
import sys
from pathlib import Path

import pytest

from delivery_executor.errors import RecipientRejected, UserdbUnavailable
from delivery_executor.userdb import (
    LmdbMap,
    PasswdFile,
    PostgresUserdb,
    SqliteUserdb,
    TexthashMap,
    UserdbResolver,
    UserKey,
    UserRecord,
    expand,
    open_userdb,
    parse_fields,
)
from delivery_executor.userdb.base import group_id, user_id
from delivery_executor.userdb.options import fraction, non_negative_float, quota_rule
from delivery_executor.userdb.owner import give_maildir
from delivery_executor.userdb.postfix import parse_texthash
from delivery_executor.userdb.sql import sql_userdb

pytestmark = pytest.mark.timeout(60)

KEY = UserKey("a", "x.org")


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# -- option parsers and templates ----------------------------------------------


def test_option_parsers_name_the_bad_text() -> None:
    """--userdb-cache-ttl, --quota-grace, --quota-rule: good text parses, bad text is named."""
    assert non_negative_float("2.5") == 2.5
    assert non_negative_float("inf") == float("inf")  # no limit
    assert fraction("10%") == pytest.approx(0.1)
    assert fraction(" 0.25 ") == 0.25
    assert quota_rule("*:storage=1G") == "*:storage=1G"
    for parse, text, why in (
        (non_negative_float, "soon", "not a number: 'soon'"),
        (non_negative_float, "-1", "must be >= 0, not '-1'"),
        (non_negative_float, "nan", "must be >= 0, not 'nan'"),
        (fraction, "-5%", "must be >= 0, not '-5'"),
        (fraction, "ten%", "not a number: 'ten'"),
        (quota_rule, "*:storage=lots", "lots"),
    ):
        with pytest.raises(argparse.ArgumentTypeError, match=why):
            parse(text)


def test_templates_expand_every_variable_and_refuse_unknown_ones() -> None:
    """%u %n %d %h %% and their long forms expand; %h without a home and %{x} are errors."""
    key = UserKey("bob", "x.org", "ext")
    assert expand("%u|%n|%d|%%|%h", key, "/home/bob") == "bob@x.org|bob|x.org|%|/home/bob"
    assert expand("%{user}/%{username}/%{domain}/%{home}", key, "/h") == "bob@x.org/bob/x.org//h"
    assert expand("no variables", key) == "no variables"
    with pytest.raises(ValueError, match=r"'%h/Maildir' uses %h but the user has no home"):
        expand("%h/Maildir", key)
    with pytest.raises(ValueError, match=r"unknown variable '%\{uid\}' in '/m/%\{uid\}'"):
        expand("/m/%{uid}", key)


def test_fields_and_ids_name_what_is_wrong() -> None:
    """A word without '=' and an unknown user or group name are ValueErrors naming them."""
    assert parse_fields("uid=5 userdb_home=/h x=1", prefix="userdb_") == {"home": "/h"}
    for bad in ("uid", "=5"):
        with pytest.raises(ValueError, match=f"field {bad!r} is not name=value"):
            parse_fields(f"home=/h {bad}")
    assert user_id("root") == 0 and user_id("1234") == 1234
    assert group_id("root") == 0 and group_id("77") == 77
    with pytest.raises(ValueError, match="no such user 'no-such-user-here'"):
        user_id("no-such-user-here")
    with pytest.raises(ValueError, match="no such group 'no-such-group-here'"):
        group_id("no-such-group-here")


# -- the resolver ------------------------------------------------------------------


class Answers:
    """A UserDB that answers from a dict, or raises UserdbUnavailable for ``failing``."""

    def __init__(self, records: dict[str, UserRecord], failing: bool = False) -> None:
        self.records = records
        self.failing = failing
        self.reloads = 0
        self.closed = 0

    async def lookup(self, key: UserKey, /) -> UserRecord | None:
        if self.failing:
            raise UserdbUnavailable("connection refused")
        return self.records.get(key.user)

    def reload(self) -> None:
        self.reloads += 1

    async def aclose(self) -> None:
        self.closed += 1


def test_resolver_checks_its_configuration_up_front(tmp_path: Path) -> None:
    """Non-UserDB objects, empty locations, bad cache_ttl/cache_size: errors naming the value."""
    with pytest.raises(TypeError, match="userdbs must implement UserDB, not dict"):
        UserdbResolver(tmp_path, userdbs=[{}])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="empty mail location"):
        UserdbResolver(tmp_path, mail_location="maildir:")
    for bad, exc, why in (
        (-1.0, ValueError, "cache_ttl must be seconds >= 0, not -1.0"),
        (float("nan"), ValueError, "cache_ttl must be seconds >= 0, not nan"),
        (True, TypeError, "cache_ttl must be seconds .* not bool"),
        ("5", TypeError, "cache_ttl must be seconds .* not str"),
    ):
        with pytest.raises(exc, match=why):
            UserdbResolver(tmp_path, cache_ttl=bad)  # type: ignore[arg-type]
    for bad_size, exc, why in (
        (0, ValueError, "cache_size must be >= 1, not 0"),
        (2.5, TypeError, "cache_size must be an int, not float"),
        (True, TypeError, "cache_size must be an int, not bool"),
    ):
        with pytest.raises(exc, match=why):
            UserdbResolver(tmp_path, cache_size=bad_size)  # type: ignore[arg-type]
    forever = UserdbResolver(tmp_path, cache_ttl=float("inf"))  # no expiry: allowed
    assert forever.cache_ttl == float("inf")
    assert repr(forever) == f"UserdbResolver(root={str(tmp_path)!r}, userdbs=[])"


@pytest.mark.asyncio
async def test_resolver_failures_are_451_and_never_cached(tmp_path: Path) -> None:
    """A failing database is 451 4.3.0 at every attempt; once it answers, the answer counts."""
    db = Answers({"a@x.org": UserRecord()}, failing=True)
    r = UserdbResolver(tmp_path, userdbs=[db])
    for _ in range(2):
        with pytest.raises(RecipientRejected) as ei:
            await r.aresolve("a@x.org")
        assert ei.value.code == "451 4.3.0"
        assert ei.value.text == "Temporary user database failure"
    assert r.lookups == 2  # the failure was not cached
    db.failing = False
    assert await r.aresolve("a@x.org") == f"{tmp_path}/x.org/a"
    r.reload()
    await r.aclose()
    assert (db.reloads, db.closed) == (1, 1)
    with pytest.raises(RuntimeError, match="aresolve"):
        r.resolve("a@x.org")  # with databases, only the async form can answer


@pytest.mark.asyncio
async def test_resolver_misconfigured_locations_are_451(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A record's %h or ~ without a home, or an unknown variable: 451, logged, nothing made."""
    root = tmp_path / "mail"
    db = Answers(
        {
            "h@x.org": UserRecord(mail="%h/Maildir"),
            "t@x.org": UserRecord(mail="~/Maildir"),
            "v@x.org": UserRecord(mail="maildir:/m/%{uid}"),
            "n@x.org": UserRecord(mail="x.org/n\0/"),
        }
    )
    r = UserdbResolver(root, userdbs=[db])
    with caplog.at_level(logging.ERROR, "delivery_executor.userdb"):
        for user in ("h", "t", "v"):
            with pytest.raises(RecipientRejected) as ei:
                await r.aresolve(f"{user}@x.org")
            assert ei.value.reply == "451 4.3.0 Mail location misconfigured", user
    assert [rec.getMessage().split(":")[0] for rec in caplog.records] == [
        "mail location of <h@x.org>",
        "mail location of <t@x.org> uses ~ but the user has no home",
        "mail location of <v@x.org>",
    ]
    with pytest.raises(RecipientRejected) as bad:
        await r.aresolve("n@x.org")
    assert bad.value.reply == "553 5.1.3 address maps to an invalid path"
    assert not root.exists()


@pytest.mark.asyncio
async def test_resolver_domains_existing_only_folders_and_bad_input(tmp_path: Path) -> None:
    """Unserved domain 550 5.7.1; existing_only 550 5.1.1; +box to its .box; not text 553."""
    root = tmp_path / "mail"
    db = Answers({"a@x.org": UserRecord(), "b@x.org": UserRecord()})
    r = UserdbResolver(
        root,
        userdbs=[db],
        domains=["x.org"],
        recipient_delimiter="+",
        existing_only=True,
        detail_to_folder=True,
    )
    with pytest.raises(RecipientRejected) as ei:
        await r.aresolve("a@y.org")
    assert ei.value.reply == "550 5.7.1 domain 'y.org' is not served here"
    with pytest.raises(RecipientRejected) as ei:
        await r.aresolve("a@x.org")  # known to the database, but no Maildir yet
    assert ei.value.reply == "550 5.1.1 no such mailbox: a@x.org"
    box = root / "x.org" / "a"
    for sub in ("tmp", "new", "cur", ".lists/new"):
        (box / sub).mkdir(parents=True)
    assert await r.aresolve("a@x.org") == str(box)
    assert await r.aresolve("a+lists@x.org") == str(box / ".lists")
    assert await r.aresolve("a+other@x.org") == str(box)  # no such folder: the INBOX
    with pytest.raises(RecipientRejected) as ei:
        await r.aresolve(b"a@x.org")  # type: ignore[arg-type]
    assert ei.value.reply == "553 5.1.3 address is not text"


@pytest.mark.asyncio
async def test_sieve_script_locations(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """file:DIR;active=, ~, relative and absolute sieve paths; ~ or relative without home: None."""
    root = tmp_path / "mail"
    db = Answers(
        {
            "a@x.org": UserRecord(home=f"{root}/a", sieve="file:~/sieve;active=~/.dovecot.sieve"),
            "b@x.org": UserRecord(home=f"{root}/b", sieve="rules.sieve"),
            "c@x.org": UserRecord(sieve="/etc/sieve/c.sieve"),
            "d@x.org": UserRecord(sieve="~/.dovecot.sieve"),
            "e@x.org": UserRecord(sieve="rules.sieve"),
            "f@x.org": UserRecord(home=f"{root}/f"),
            "g@x.org": UserRecord(),
        }
    )
    r = UserdbResolver(root, userdbs=[db])
    path = {u: await r.aresolve(f"{u}@x.org") for u in "abcdefg"}
    assert path["a"] == f"{root}/a/Maildir" and path["g"] == f"{root}/x.org/g"
    assert r.sieve_script(path["a"]) == f"{root}/a/.dovecot.sieve"
    assert r.sieve_script(path["a"] + "/.Lists/") == f"{root}/a/.dovecot.sieve"  # its Maildir's
    assert r.sieve_script(path["b"]) == f"{root}/b/rules.sieve"
    assert r.sieve_script(path["c"]) == "/etc/sieve/c.sieve"
    assert r.sieve_script(path["f"]) == f"{root}/f/.dovecot.sieve"
    assert r.sieve_script(path["g"]) is None
    assert r.sieve_script(f"{root}/unknown") is None
    with caplog.at_level(logging.ERROR, "delivery_executor.userdb"):
        assert r.sieve_script(path["d"]) is None
        assert r.sieve_script(path["e"]) is None
    assert [rec.getMessage() for rec in caplog.records] == [
        "sieve location '~/.dovecot.sieve' uses ~ but the user has no home",
        "sieve location 'rules.sieve' is relative but the user has no home",
    ]


@pytest.mark.root
@pytest.mark.asyncio
async def test_a_maildir_that_cannot_be_given_to_its_user_is_451(tmp_path: Path) -> None:
    """As root: a uid's Maildir that cannot be created is 451 4.3.0, again at the next try."""
    if os.geteuid() != 0:
        pytest.skip("needs root to give files away")
    root = tmp_path / "mail"
    root.mkdir()
    (root / "x.org").write_text("a file where the domain directory should be")
    db = Answers({"a@x.org": UserRecord(uid=4321, gid=4321)})
    r = UserdbResolver(root, userdbs=[db])
    for _ in range(2):
        with pytest.raises(RecipientRejected) as ei:
            await r.aresolve("a@x.org")
        assert ei.value.reply == "451 4.3.0 Cannot prepare the mailbox"
    (root / "x.org").unlink()
    path = await r.aresolve("a@x.org")
    st = os.stat(Path(path) / "new")
    assert (st.st_uid, st.st_gid) == (4321, 4321)


@pytest.mark.root
def test_give_maildir_owns_the_path_from_home_down(tmp_path: Path) -> None:
    """Every directory from the home to the Maildir changes hands; gid defaults as documented."""
    if os.geteuid() != 0:
        pytest.skip("needs root to give files away")
    import pwd

    uid = next(u for u in range(4321, 5000) if u not in {p.pw_uid for p in pwd.getpwall()})
    home = tmp_path / "home"
    path = home / "a" / "b" / "Maildir"
    assert give_maildir(str(path), uid, None, str(home))  # no such user: its gid is the uid
    for d in (home, home / "a", home / "a" / "b", path, path / "tmp", path / "new", path / "cur"):
        st = os.lstat(d)
        assert (st.st_uid, st.st_gid) == (uid, uid), d
    assert not give_maildir(str(path), uid, None, str(home))  # already theirs: nothing changes
    nobody = pwd.getpwnam("nobody")
    other = tmp_path / "other" / "Maildir"
    assert give_maildir(str(other), nobody.pw_uid, None, None)
    st = os.lstat(other / "new")
    assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid)
    assert os.lstat(tmp_path / "other").st_uid == 0  # above the Maildir, no home: untouched


# -- passwd-file, texthash, lmdb, sqlite -------------------------------------------


@pytest.mark.asyncio
async def test_passwd_file_bad_lines_are_skipped_bad_users_are_451(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A line without user or with a broken extra field is skipped; an unknown uid name fails."""
    path = write(
        tmp_path / "users",
        ":x:1:1::/h::\n"
        "a@x.org:x:::::/ha:userdb_mail=~/M broken\n"
        "b@x.org:x:no-such-user-here::::\n"
        "c@x.org:x:7:8::/hc::\n",
    )
    db = PasswdFile(path)
    assert repr(db) == f"PasswdFile({path!r})"
    with caplog.at_level(logging.WARNING, "delivery_executor.userdb"):
        assert await db.lookup(UserKey("c", "x.org")) == UserRecord(home="/hc", uid=7, gid=8)
    assert [rec.getMessage() for rec in caplog.records] == [
        f"{path}:1: no user name; line skipped",
        f"{path}:2: field 'broken' is not name=value; line skipped",
    ]
    assert await db.lookup(KEY) is None  # its line was skipped
    with pytest.raises(UserdbUnavailable, match=r"user b@x\.org: no such user 'no-such-user-here'"):
        await db.lookup(UserKey("b", "x.org"))
    await db.aclose()
    with pytest.raises(ValueError, match="passwd-file needs a path, not ''"):
        PasswdFile("")


@pytest.mark.asyncio
async def test_an_unreadable_passwd_file_is_unavailable_not_unknown(tmp_path: Path) -> None:
    """A fixed path that is a directory fails every lookup (451), with the OS's reason."""
    (tmp_path / "users").mkdir()
    db = PasswdFile(str(tmp_path / "users"))
    with pytest.raises(UserdbUnavailable, match="Is a directory"):
        await db.lookup(KEY)
    r = UserdbResolver(tmp_path / "mail", userdbs=[db])
    with pytest.raises(RecipientRejected) as ei:
        await r.aresolve("a@x.org")
    assert ei.value.code == "451 4.3.0"


def test_texthash_comments_and_continuations() -> None:
    """#-comments and blank lines are skipped; an indented line continues the previous value."""
    text = "  continues nothing\n# c\nA@X.org  x.org/a/\n   more\n\nb@x.org\n@y.org y/\n"
    assert parse_texthash(text) == {"a@x.org": "x.org/a/ more", "b@x.org": "", "@y.org": "y/"}


@pytest.mark.asyncio
async def test_postfix_maps_missing_files_fail_and_checks(tmp_path: Path) -> None:
    """A missing map fails (451, naming it); an empty path is refused; repr names the file."""
    db = TexthashMap(str(tmp_path / "vmailbox"))
    assert repr(db) == f"TexthashMap({str(tmp_path / 'vmailbox')!r})"
    where = re.escape(f"texthash:{tmp_path}/vmailbox: ")
    with pytest.raises(UserdbUnavailable, match=where + ".*No such file"):
        await db.lookup(KEY)
    (tmp_path / "vmailbox").write_text("a@x.org x.org/a/\n")
    assert await db.lookup(KEY) == UserRecord(mail="x.org/a/")
    with pytest.raises(ValueError, match="texthash needs a path, not ''"):
        TexthashMap("")


@pytest.mark.asyncio
async def test_an_lmdb_map_rewritten_by_postmap_is_read_again(tmp_path: Path) -> None:
    """A replaced lmdb file (new inode) is reopened at the next lookup: new keys are found."""
    lmdb = pytest.importorskip("lmdb")
    path = tmp_path / "vmailbox.lmdb"

    def postmap(entries: dict[bytes, bytes]) -> None:
        new = tmp_path / "new.lmdb"
        env = lmdb.open(str(new), subdir=False)
        with env.begin(write=True) as txn:
            for k, v in entries.items():
                txn.put(k + b"\0", v + b"\0")
        env.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(str(new) + "-lock")
        os.replace(new, path)  # as postmap does: a new file renamed over the old

    postmap({b"a@x.org": b"x.org/a/"})
    db = LmdbMap(str(path))
    try:
        assert await db.lookup(UserKey("b", "x.org")) is None
        postmap({b"a@x.org": b"x.org/a/", b"b@x.org": b"x.org/b/"})
        assert await db.lookup(UserKey("b", "x.org")) == UserRecord(mail="x.org/b/")
        db.reload()
        assert await db.lookup(KEY) == UserRecord(mail="x.org/a/")
    finally:
        await db.aclose()


def make_users_db(path: Path, rows: list[tuple[str, str, str | None]]) -> None:
    """A fresh SQLite file at ``path`` with a users table holding ``rows``."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE users (email TEXT, home TEXT, uid TEXT)")
        conn.executemany("INSERT INTO users VALUES (?, ?, ?)", rows)
        conn.commit()


@pytest.mark.asyncio
async def test_sqlite_bad_rows_and_a_failing_query(tmp_path: Path) -> None:
    """A row with an unknown uid name is 451; a failing query reconnects and then answers."""
    path = tmp_path / "users.db"
    make_users_db(path, [("a@x.org", "/h/a", "12"), ("b@x.org", "/h/b", "no-such-user-here")])
    db = SqliteUserdb(str(path), "SELECT home, uid FROM users WHERE email = $1")
    assert repr(db) == f"SqliteUserdb({str(path)!r})"
    try:
        assert await db.lookup(KEY) == UserRecord(home="/h/a", uid=12)
        with pytest.raises(UserdbUnavailable, match=r"sql: user b@x\.org: no such user"):
            await db.lookup(UserKey("b", "x.org"))
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.execute("DROP TABLE users")
            conn.commit()
        with pytest.raises(UserdbUnavailable, match="no such table: users"):
            await db.lookup(KEY)
        make_users_db(path, [("a@x.org", "/h/a2", None)])
        assert await db.lookup(KEY) == UserRecord(home="/h/a2")
    finally:
        await db.aclose()


@pytest.mark.asyncio
async def test_a_replaced_sqlite_file_is_read_at_the_next_lookup(tmp_path: Path) -> None:
    """A database file renamed over the old one (as a rebuild does) answers the next lookup."""
    path = tmp_path / "users.db"
    make_users_db(path, [("a@x.org", "/h/old", None)])
    db = SqliteUserdb(str(path), "SELECT home FROM users WHERE email = $1")
    try:
        assert await db.lookup(KEY) == UserRecord(home="/h/old")
        make_users_db(tmp_path / "new.db", [("a@x.org", "/h/new", None), ("b@x.org", "/h/b", None)])
        os.replace(tmp_path / "new.db", path)
        assert await db.lookup(KEY) == UserRecord(home="/h/new")
        assert await db.lookup(UserKey("b", "x.org")) == UserRecord(home="/h/b")
    finally:
        await db.aclose()


def test_sql_urls_and_the_postgres_repr_hides_the_dsn() -> None:
    """sql: picks its backend by URL; another scheme is named; the DSN's password never shows."""
    pytest.importorskip("asyncpg")
    query = "SELECT home FROM users WHERE email = $1"
    pg = sql_userdb("postgresql://u:s3cret@127.0.0.1/db", query)
    assert isinstance(pg, PostgresUserdb)
    assert "s3cret" not in repr(pg) and repr(pg) == "PostgresUserdb(...)"
    assert isinstance(sql_userdb("postgres://127.0.0.1/db", query), PostgresUserdb)
    with pytest.raises(ValueError, match="not 'mysql://h/db'"):
        sql_userdb("mysql://h/db", query)


def test_open_userdb_names_a_missing_backend_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """lmdb: without the lmdb package is a ValueError that says which package to install."""
    monkeypatch.setitem(sys.modules, "lmdb", None)  # import lmdb now raises ImportError
    with pytest.raises(ValueError, match="--userdb lmdb: needs the lmdb package"):
        open_userdb("lmdb:/etc/postfix/vmailbox")
