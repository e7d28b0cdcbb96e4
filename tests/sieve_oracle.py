"""Pigeonhole as an oracle: ``sieve-test`` dry runs and ``dovecot-lda`` real deliveries.

Both run with a private configuration (no daemon, no system config). Dovecot
refuses mail access as root, so as root they run as ``nobody`` (the work
directory is made world-accessible); otherwise as the current user.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["IMAP", "LDA", "SIEVE_TEST", "Outcome", "SieveTest", "available", "parse_sieve_test"]

SIEVE_TEST = shutil.which("sieve-test") or "/usr/bin/sieve-test"
LDA = "/usr/lib/dovecot/dovecot-lda"
IMAP = "/usr/lib/dovecot/imap"
_EXTS = "+fileinto +envelope +imap4flags +mailbox +subaddress +copy +variables +vacation +reject"


def available() -> bool:
    """Whether sieve-test can run here."""
    return os.access(SIEVE_TEST, os.X_OK)


def _ids() -> tuple[int, int]:
    if os.getuid() == 0:
        return 65534, 65534
    return os.getuid(), os.getgid()


@dataclass
class Outcome:
    """What Pigeonhole reported: compiled?, mailbox -> flags, other actions, final result."""

    compiled: bool
    stores: dict[str, frozenset[str]] = field(default_factory=dict)
    others: list[str] = field(default_factory=list)
    result: str = ""
    text: str = ""


def _norm_flag(f: str) -> str:
    return f.lower() if f.startswith("\\") else f


def parse_sieve_test(text: str, rc: int) -> Outcome:
    """The actions sieve-test printed (single script), or compiled=False."""
    if rc != 0 and "failed to compile" in text:
        return Outcome(False, text=text)
    out = Outcome(True, text=text)
    cur: str | None = None
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("* store message in folder: "):
            cur = s.removeprefix("* store message in folder: ")
            cur = "INBOX" if cur.upper() == "INBOX" else cur
            out.stores[cur] = frozenset()
        elif s == "* keep":
            cur = "INBOX"
            out.stores[cur] = frozenset()
        elif s.startswith("* "):
            cur = None
            out.others.append(s[2:].split(":")[0])
        elif s.startswith("+ add IMAP flags: ") and cur is not None:
            out.stores[cur] = frozenset(_norm_flag(f) for f in s.split(": ", 1)[1].split())
        elif "final result:" in s:
            out.result = s.split("final result:", 1)[1].strip()
    return out


class SieveTest:
    """Runs sieve-test in a private, world-readable work directory."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sieve-oracle-"))
        self.dir.chmod(0o777)
        uid, gid = _ids()
        self.conf = self.dir / "dovecot.conf"
        self.conf.write_text(
            f"mail_uid = {uid}\nmail_gid = {gid}\nfirst_valid_uid = 0\nfirst_valid_gid = 0\n"
            f"protocols =\nbase_dir = {self.dir}/run\nlog_path = /dev/stderr\n"
            f"mail_location = maildir:{self.dir}/Maildir\nrecipient_delimiter = +\n"
            f"plugin {{\n  sieve_extensions = {_EXTS}\n}}\n"
        )
        self.conf.chmod(0o644)
        self._n = 0

    def file(self, name: str, data: bytes) -> Path:
        """Write a world-readable input file."""
        p = self.dir / name
        p.write_bytes(data)
        p.chmod(0o644)
        return p

    def run(self, script: Path, message: Path, sender: str, recipient: str) -> Outcome:
        """One dry run of ``script`` on ``message``."""
        cmd = [SIEVE_TEST, "-c", str(self.conf), "-r", recipient, "-a", recipient]
        if sender:
            cmd += ["-f", sender]
        cmd += [str(script), str(message)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
        return parse_sieve_test(p.stdout + p.stderr, p.returncode)

    def run_many(
        self, jobs: Sequence[tuple[Path, Path, str, str]], workers: int = 2
    ) -> list[Outcome]:
        """Many dry runs, ``workers`` processes at a time (one process per run)."""
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(lambda j: self.run(*j), jobs))

    def close(self) -> None:
        """Remove the work directory."""
        shutil.rmtree(self.dir, ignore_errors=True)


class DovecotLDA:
    """Real Pigeonhole deliveries with dovecot-lda into a private Maildir."""

    def __init__(self, before: Sequence[str] = ()) -> None:
        """``before``: sources of sieve_before scripts, run in order before the user's."""
        self.dir = Path(tempfile.mkdtemp(prefix="sieve-lda-"))
        self.dir.chmod(0o777)
        self.home = self.dir / "home"
        self.home.mkdir()
        uid, gid = _ids()
        befores = ""
        for i, src in enumerate(before):
            p = self.dir / f"before{i}.sieve"
            p.write_text(src)
            p.chmod(0o644)
            befores += f"  sieve_before{'' if i == 0 else i + 1} = {p}\n"
        self.conf = self.dir / "dovecot.conf"
        self.conf.write_text(
            "protocols =\n"
            f"base_dir = {self.dir}/run\nlog_path = /dev/stderr\ninfo_log_path = /dev/stderr\n"
            "first_valid_uid = 0\nfirst_valid_gid = 0\n"
            f"mail_location = maildir:{self.home}/Maildir\n"
            "recipient_delimiter = +\nlda_mailbox_autocreate = no\n"
            "namespace inbox {\n  inbox = yes\n  separator = /\n}\n"
            "protocol lda {\n  mail_plugins = sieve\n}\n"
            f"plugin {{\n  sieve = file:{self.dir}/sieve;active={self.home}/.dovecot.sieve\n"
            f"  sieve_extensions = {_EXTS}\n{befores}}}\n"
        )
        self.conf.chmod(0o644)
        self.uid, self.gid = uid, gid
        os.chown(self.home, uid, gid)

    @property
    def maildir(self) -> Path:
        """The user's Maildir."""
        return self.home / "Maildir"

    def set_script(self, source: str) -> None:
        """Install the user's active script."""
        p = self.home / ".dovecot.sieve"
        p.write_text(source)
        p.chmod(0o644)

    def deliver(self, message: bytes, sender: str, recipient: str) -> str:
        """Deliver one message as dovecot-lda does; returns its log."""
        cmd = [LDA, "-c", str(self.conf), "-a", recipient, "-f", sender or "<>"]
        if os.getuid() == 0:
            cmd = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", *cmd]
        env = {"HOME": str(self.home), "USER": "nobody", "PATH": os.environ.get("PATH", "")}
        p = subprocess.run(
            cmd, input=message, capture_output=True, env=env, timeout=30, check=False
        )
        log = (p.stdout + p.stderr).decode("utf-8", "replace")
        if p.returncode != 0:
            raise RuntimeError(f"dovecot-lda failed ({p.returncode}): {log}")
        return log

    def imap(self, commands: Sequence[str]) -> str:
        """Run Dovecot's imap binary as a PREAUTH session on the Maildir; its output.

        Everything under the Maildir is first given to the LDA user, as
        Dovecot needs to write its index files there.
        """
        for root, _, names in os.walk(self.maildir):
            os.chown(root, self.uid, self.gid)
            for name in names:
                os.chown(os.path.join(root, name), self.uid, self.gid)
        cmd = [IMAP, "-c", str(self.conf)]
        if os.getuid() == 0:
            cmd = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", *cmd]
        script = "".join(f"t{i} {c}\r\n" for i, c in enumerate([*commands, "LOGOUT"]))
        env = {"HOME": str(self.home), "USER": "nobody", "PATH": os.environ.get("PATH", "")}
        p = subprocess.run(
            cmd, input=script.encode(), capture_output=True, env=env, timeout=30, check=False
        )
        return p.stdout.decode("utf-8", "replace")

    def make_folder(self, name: str) -> None:
        """Create a Maildir++ folder (``.name`` with cur/new/tmp) owned by the LDA user."""
        for sub in ("cur", "new", "tmp"):
            d = self.maildir / f".{name}" / sub
            d.mkdir(parents=True, exist_ok=True)
        for root, dirs, _ in os.walk(self.maildir):
            os.chown(root, self.uid, self.gid)
            for name in dirs:
                os.chown(os.path.join(root, name), self.uid, self.gid)

    def close(self) -> None:
        """Remove the work directory."""
        shutil.rmtree(self.dir, ignore_errors=True)
