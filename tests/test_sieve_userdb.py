"""Per-user Sieve scripts where Pigeonhole looks: the userdb's ``sieve`` field, else
``~/.dovecot.sieve`` under the home, else ``.dovecot.sieve`` in the Maildir (no userdb)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from delivery_executor import Maildir
from delivery_executor.server.checks import StartupError
from delivery_executor.server.core import ServerConfig, _sieve
from delivery_executor.testing import ServerProcess, send_message
from delivery_executor.userdb import PasswdFile, UserdbResolver

pytestmark = pytest.mark.timeout(60)


def script(folder: str) -> str:
    """A script that files everything into ``folder``, creating it."""
    return f'require ["fileinto", "mailbox"];\nfileinto :create "{folder}";\n'


def inbox_and_folders(maildir: Path) -> dict[str, int]:
    """Messages in new/ of the INBOX ("") and of each ``.folder`` of ``maildir``."""
    out = {"": len(os.listdir(maildir / "new"))} if (maildir / "new").is_dir() else {}
    if maildir.is_dir():
        for entry in maildir.iterdir():
            if entry.name.startswith(".") and (entry / "new").is_dir():
                out[entry.name] = len(os.listdir(entry / "new"))
    return {k: v for k, v in out.items() if v}


@pytest.mark.asyncio
async def test_resolver_names_the_field_script_the_home_script_or_none(tmp_path: Path) -> None:
    """sieve= (plain, ~, relative, file:...;active=) wins; else ~/.dovecot.sieve; no home: None."""
    users = tmp_path / "users"
    users.write_text(
        "a@x.org:::::/h/a::userdb_sieve=~/f/a.sieve\n"
        "b@x.org:::::/h/b::\n"
        "c@x.org::::::\n"
        "d@x.org:::::/h/d::userdb_sieve=file:~/sieve;active=~/.active.sieve\n"
        "e@x.org:::::/h/e::userdb_sieve=rel.sieve\n"
        "f@x.org:::::::userdb_sieve=/etc/f.sieve\n"
    )
    r = UserdbResolver(tmp_path, userdbs=[PasswdFile(str(users))])
    got = {}
    for u in "abcdef":
        path = await r.aresolve(f"{u}@x.org")
        got[u] = r.sieve_script(path)
        assert r.sieve_script(os.path.join(path, ".Sub")) == got[u]  # a folder: its Maildir's
    assert got == {
        "a": "/h/a/f/a.sieve",
        "b": "/h/b/.dovecot.sieve",
        "c": None,
        "d": "/h/d/.active.sieve",
        "e": "/h/e/rel.sieve",
        "f": "/etc/f.sieve",
    }
    assert r.sieve_script(str(tmp_path / "nobody")) is None
    templates = UserdbResolver(tmp_path, mail_home=str(tmp_path / "h" / "%n"))
    path = await templates.aresolve("q@x.org")  # no userdb: the --mail-home home counts
    assert templates.sieve_script(path) == str(tmp_path / "h" / "q" / ".dovecot.sieve")


@pytest.mark.asyncio
async def test_serve_runs_the_userdb_sieve_field_and_the_home_script(tmp_path: Path) -> None:
    """serve --userdb passwd-file --sieve: a's script is its userdb_sieve= file, b's is
    ~/.dovecot.sieve (a .dovecot.sieve in b's Maildir is not b's script), c (no home)
    keeps the Maildir's .dovecot.sieve."""
    root = tmp_path / "mail"
    home_a, home_b = tmp_path / "home" / "a", tmp_path / "home" / "b"
    (home_a / "filters").mkdir(parents=True)
    (home_a / "filters" / "mine.sieve").write_text(script("Field"))
    home_b.mkdir(parents=True)
    (home_b / ".dovecot.sieve").write_text(script("Home"))
    Maildir.create(home_b / "Maildir")
    (home_b / "Maildir" / ".dovecot.sieve").write_text(script("WrongPlace"))
    c_maildir = root / "example.org" / "c"
    Maildir.create(c_maildir)
    (c_maildir / ".dovecot.sieve").write_text(script("InMaildir"))
    users = tmp_path / "users"
    users.write_text(
        f"a@example.org:::::{home_a}::userdb_sieve=~/filters/mine.sieve\n"
        f"b@example.org:::::{home_b}::\n"
        "c@example.org::::::\n"
    )
    args = ("--lmtp", "--userdb", f"passwd-file:{users}", "--sieve")
    with ServerProcess(root, *args) as srv:
        replies = await send_message(
            "127.0.0.1",
            srv.port,
            mail_from="s@example.net",
            rcpts=["a@example.org", "b@example.org", "c@example.org"],
            body=b"Subject: hi\r\n\r\nbody\r\n",
        )
        assert [r.code for r in replies] == [250, 250, 250], replies
        assert srv.stop() == 0
    assert inbox_and_folders(home_a / "Maildir") == {".Field": 1}
    assert inbox_and_folders(home_b / "Maildir") == {".Home": 1}
    assert inbox_and_folders(c_maildir) == {".InMaildir": 1}


def test_a_missing_admin_script_is_a_startup_error_one_line_exit_2(tmp_path: Path) -> None:
    """_sieve raises StartupError; serve (one worker or two) exits 2 with one line."""
    with pytest.raises(StartupError, match="does not exist"):
        _sieve(ServerConfig(root=tmp_path, sieve_after=(tmp_path / "nope.sieve",)))
    for workers in ("1", "2"):
        res = subprocess.run(
            [sys.executable, "-m", "delivery_executor", "serve", "--root", str(tmp_path / "m"),
             "--listen", "127.0.0.1:0", "--workers", workers, "--hostname", "mx.test",
             "--sieve-before", str(tmp_path / "nope.sieve")],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert res.returncode == 2, (workers, res.stderr)
        assert "Traceback" not in res.stderr, res.stderr
        # One line, before anything forks or listens.
        assert res.stderr.strip().splitlines() == [
            f"delivery-executor serve: Sieve script {str(tmp_path / 'nope.sieve')!r}"
            " does not exist or is not a file"
        ], res.stderr
