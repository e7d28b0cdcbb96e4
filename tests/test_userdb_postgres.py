"""The SQL user database against a real PostgreSQL: a private cluster in a temp dir.

The cluster runs as the ``postgres`` user (PostgreSQL refuses root) on a UNIX
socket in its own directory, with no TCP listener. Outside CI the test skips
when PostgreSQL 15 or that user is missing; in CI (CI=true) that is a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from delivery_executor.testing import send_message
from delivery_executor.userdb import PostgresUserdb, UserdbResolver, UserKey, UserRecord

from .helpers import files_in, userdb_lmtp

pytestmark = [pytest.mark.timeout(180)]

PG_BIN = Path("/usr/lib/postgresql/15/bin")
BODY = b"From: s@example.net\r\nSubject: pg\r\n\r\nHello.\r\n"


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} in CI: .ci/run should have installed postgresql")
    pytest.skip(reason)


class Cluster:
    """A private PostgreSQL cluster run as the ``postgres`` user."""

    def __init__(self, base: Path, user: pwd.struct_passwd) -> None:
        self.base = base
        self.data = base / "data"
        self.sock = base / "sock"
        self.user = user
        self.dsn = f"postgresql://postgres@/postgres?host={self.sock}"

    def run(self, *cmd: str) -> None:
        subprocess.run(
            cmd,
            check=True,
            user=self.user.pw_uid,
            group=self.user.pw_gid,
            cwd=self.base,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
            timeout=60,
        )

    def start(self) -> None:
        opts = f"-k {self.sock} -c listen_addresses='' -c fsync=off"
        self.run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", opts, "-w",
                 "-l", str(self.base / "log"), "start")  # fmt: skip

    def stop(self) -> None:
        self.run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def sql(self, statement: str) -> None:
        self.run(str(PG_BIN / "psql"), "-h", str(self.sock), "-U", "postgres", "-q",
                 "-v", "ON_ERROR_STOP=1", "-c", statement)  # fmt: skip


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """A running cluster with a ``users`` table; stopped and removed afterwards."""
    if not (PG_BIN / "initdb").exists():
        _skip_or_fail("PostgreSQL 15 (initdb) not installed")
    if os.geteuid() != 0:
        pytest.skip("needs root to run the cluster as the postgres user")
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        _skip_or_fail("no postgres user")
        raise
    base = Path(tempfile.mkdtemp(prefix="de-pg-"))
    base.chmod(0o755)
    (base / "sock").mkdir()
    for p in (base, base / "sock"):
        os.chown(p, user.pw_uid, user.pw_gid)
    c = Cluster(base, user)
    try:
        c.run(str(PG_BIN / "initdb"), "-D", str(c.data), "-A", "trust", "-U", "postgres",
              "--no-sync")  # fmt: skip
        c.start()
        c.sql(
            "CREATE TABLE users (email text PRIMARY KEY, home text, quota_rule text);"
            " INSERT INTO users VALUES ('alice@example.org', NULL, '*:storage=1M');"
        )
        yield c
    finally:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            c.run(str(PG_BIN / "pg_ctl"), "-D", str(c.data), "-m", "immediate", "stop")
        shutil.rmtree(base, ignore_errors=True)


async def codes(port: int, rcpts: list[str]) -> list[str]:
    replies = await send_message(
        "127.0.0.1", port, mail_from="s@example.net", rcpts=rcpts, body=BODY, lmtp=True
    )
    return [f"{r.code} {r.text[:5]}" for r in replies]


@pytest.mark.asyncio
async def test_postgres_userdb_serves_rcpt_and_a_stopped_db_defers(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Known 250, unknown 550 5.1.1; with the db stopped 451 4.3.0 and no mail; back up: 250."""
    db = PostgresUserdb(cluster.dsn, "SELECT home, quota_rule FROM users WHERE email = $1")
    assert await db.lookup(UserKey("alice", "example.org")) == UserRecord(quota_rule="*:storage=1M")
    resolver = UserdbResolver(tmp_path, userdbs=[db], cache_ttl=0)
    inbox = tmp_path / "example.org" / "alice" / "new"
    async with userdb_lmtp(resolver) as port:
        assert await codes(port, ["alice@example.org", "bob@example.org"]) == [
            "250 2.0.0",
            "550 5.1.1",
        ]
        assert len(files_in(inbox)) == 1
        await asyncio.to_thread(cluster.stop)
        assert await codes(port, ["alice@example.org"]) == ["451 4.3.0"]
        assert len(files_in(inbox)) == 1  # nothing delivered, nothing elsewhere
        assert sorted(os.listdir(tmp_path)) == ["example.org"]
        await asyncio.to_thread(cluster.start)
        assert await codes(port, ["alice@example.org"]) == ["250 2.0.0"]
    assert len(files_in(inbox)) == 2
