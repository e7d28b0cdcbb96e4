"""A private Postfix instance for tests with real parts, and helpers to read what it did.

:class:`PrivatePostfix` runs ``postfix -c <absolute dir> start`` on a
configuration made from ``postfix_conf/main.cf.in`` and ``master.cf.in``: its
own queue and data directories and log file (written by postlogd, since this
machine has no syslog), smtpd on a loopback address and a free port, final
delivery for the test's virtual domains through the test's
``virtual_transport`` (or ``transport_maps``), no DNS, and retry timers of a
second or two. Leaving the ``with`` block stops it (``postfix -c DIR stop``),
makes sure that no process of the instance is left (they are found by the
``MAIL_CONFIG=DIR`` in their environment and killed by PID) and removes the
directory, also after a failure. Every Postfix command gets ``-c DIR``, so the
system's Postfix (``/etc/postfix``) is never read for configuration nor
started.

Without root, or without Postfix, a test that asks for an instance is
skipped with the reason (in CI, where ``.ci/run`` installs Postfix, a missing
binary is a failure instead, as in ``test_interop``).
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

__all__ = [
    "Delivered",
    "LogDelivery",
    "PrivatePostfix",
    "alive",
    "free_port_on",
    "need",
    "postfix_queue_id",
    "read_maildirs",
    "require_root",
    "wait_for",
]

TEMPLATES = Path(__file__).with_name("postfix_conf")
_FIELD = re.compile(r"@([A-Z_]+)@")


def need(binary: str) -> str:
    """The path of ``binary`` (PATH, /usr/sbin, /usr/bin); skip the test if it is missing.

    In CI (``CI=true``) a missing binary fails the test: ``.ci/run`` installs them.
    """
    path = shutil.which(binary) or next(
        (p for p in (f"/usr/sbin/{binary}", f"/usr/bin/{binary}") if os.access(p, os.X_OK)), None
    )
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{binary} is missing in CI: .ci/run should have installed it")
        pytest.skip(f"{binary} not installed (Debian: postfix, swaks)")
    return path


def require_root(why: str) -> None:
    """Skip the test, saying ``why``, unless we are root."""
    if os.geteuid() != 0:
        pytest.skip(f"needs root: {why}")


def free_port_on(*addresses: str) -> int:
    """A TCP port that was free a moment ago on every one of ``addresses`` (loopback)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind((addresses[0], 0))
            port = int(first.getsockname()[1])
            ok = True
            for addr in addresses[1:]:
                with socket.socket() as other:
                    try:
                        other.bind((addr, port))
                    except OSError:
                        ok = False
                        break
            if ok:
                return port
    raise AssertionError(f"no port free on all of {addresses} after 50 tries")


def wait_for(cond: Callable[[], bool], timeout: float, what: str, *, every: float = 0.05) -> float:
    """Poll ``cond`` until it holds; the seconds it took. AssertionError after ``timeout``."""
    start = time.monotonic()
    deadline = start + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)
    return time.monotonic() - start


# -- what Postfix logged


_DELIVERY = re.compile(
    r"postfix/(?P<agent>[\w-]+)\[\d+\]: (?P<qid>\w+): to=<(?P<rcpt>[^>]*)>,"
    r"(?: orig_to=<[^>]*>,)? relay=(?P<relay>[^,]+),.*? dsn=(?P<dsn>[\d.]+),"
    r" status=(?P<status>\w+) \((?P<text>.*)\)$"
)
_ACCEPTED = re.compile(r"postfix/smtpd\[\d+\]: (\w+): client=")
_LOST = re.compile(
    r"postfix/(?:lmtp|smtp)\[\d+\]: (\w+): lost connection with (\S+) while (.*)$", re.M
)


@dataclass(frozen=True, slots=True)
class LogDelivery:
    """One delivery attempt from the log: ``QID: to=<rcpt>, relay=..., dsn=..., status=...``."""

    queue_id: str
    recipient: str
    relay: str
    dsn: str
    status: str
    text: str
    agent: str


# -- what reached the Maildirs


_NAME = re.compile(r"^(\d+)\.M(\d+)P(\d+)Q(\d+)\.([^,:]+)(?:,S=\d+,W=\d+)?$")
_POSTFIX_ID = re.compile(rb"\(Postfix\)(?:\s+with\s+\S+)?\s+id\s+(\w+)")


def postfix_queue_id(data: bytes) -> str | None:
    """The queue id in the (first) Received header Postfix added to a message."""
    head = data.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    m = _POSTFIX_ID.search(head)
    return m.group(1).decode() if m else None


@dataclass(frozen=True, slots=True)
class Delivered:
    """One file in some ``<root>/<domain>/<user>/new/``, read back."""

    mailbox: str  # "user@domain"
    name: str
    data: bytes

    @property
    def host(self) -> str:
        """The host part of the file name (``{secs}.M{usec}P{pid}Q{seq}.{host}``)."""
        m = _NAME.match(self.name)
        assert m, f"not one of our names: {self.name!r}"
        return m.group(5)

    @property
    def queue_id(self) -> str | None:
        """Postfix's queue id of the message this copy came from."""
        return postfix_queue_id(self.data)

    def header(self, field: str) -> str | None:
        """The first header ``field`` (unfolded), or None."""
        head = self.data.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0].decode("ascii", "replace")
        m = re.search(rf"^{re.escape(field)}:\s*(.*(?:\r?\n[ \t].*)*)", head, re.I | re.M)
        return re.sub(r"\s+", " ", m.group(1)).strip() if m else None

    @property
    def body(self) -> bytes:
        """The bytes after the header section."""
        for sep in (b"\r\n\r\n", b"\n\n"):
            if sep in self.data:
                return self.data.split(sep, 1)[1]
        return b""


def read_maildirs(root: Path) -> list[Delivered]:
    """Every file in every ``<root>/<domain>/<user>/new/``, with its bytes."""
    out: list[Delivered] = []
    if not root.exists():
        return out
    for domain in sorted(os.listdir(root)):
        for user in sorted(os.listdir(root / domain)):
            new = root / domain / user / "new"
            if not new.is_dir():
                continue
            for name in sorted(os.listdir(new)):
                out.append(Delivered(f"{user}@{domain}", name, (new / name).read_bytes()))
    return out


def count_new_files(root: Path) -> int:
    """How many files are in all ``<root>/<domain>/<user>/new/`` right now (cheap, no reads)."""
    total = 0
    try:
        domains = os.listdir(root)
    except FileNotFoundError:
        return 0
    for domain in domains:
        for user in os.listdir(root / domain):
            try:
                total += len(os.listdir(root / domain / user / "new"))
            except FileNotFoundError:
                pass
    return total


# -- the instance


def require_private_postfix() -> dict[str, str]:
    """Skip unless we are root and Postfix with its users is installed; the tools' paths."""
    require_root("a private Postfix instance runs its daemons as the postfix user")
    tools = {name: need(name) for name in ("postfix", "postconf", "postqueue")}
    try:
        pwd.getpwnam("postfix")
        grp.getgrnam("postdrop")
    except KeyError as exc:
        pytest.skip(f"Postfix's users are missing ({exc}); install Debian's postfix package")
    return tools


class PrivatePostfix:
    """A Postfix instance of our own, from ``postfix -c DIR start`` to the removed DIR.

    ``settings`` are appended to main.cf (they win over the template's);
    ``virtual_transport`` is where mail for ``domains`` goes, for instance
    ``lmtp:inet:127.0.0.1:PORT``. smtpd listens on ``address:smtp_port``.
    """

    def __init__(
        self,
        *,
        virtual_transport: str,
        domains: Sequence[str] = ("example.org",),
        settings: Mapping[str, str] | None = None,
        address: str = "127.0.0.1",
        myhostname: str = "postfix.test.localdomain",
    ) -> None:
        tools = require_private_postfix()
        self._postfix, self._postconf, self._postqueue = (
            tools["postfix"],
            tools["postconf"],
            tools["postqueue"],
        )
        self.address = address
        self.smtp_port = free_port_on(address)
        self.myhostname = myhostname
        self.base = Path(tempfile.mkdtemp(prefix="de-postfix-"))
        self.conf = self.base / "conf"
        self.queue_dir = self.base / "queue"
        self.data_dir = self.base / "data"
        self.maillog_path = self.base / "maillog"
        self._fields = {
            "QUEUE_DIRECTORY": str(self.queue_dir),
            "DATA_DIRECTORY": str(self.data_dir),
            "MAILLOG_FILE": str(self.maillog_path),
            "BASE_DIRECTORY": str(self.base),
            "MYHOSTNAME": myhostname,
            "ADDRESS": address,
            "SMTP_PORT": str(self.smtp_port),
            "VIRTUAL_MAILBOX_DOMAINS": " ".join(domains),
            "VIRTUAL_TRANSPORT": virtual_transport,
        }
        self._settings = dict(settings or {})
        self.master_pid: int | None = None

    # -- life cycle

    def __enter__(self) -> PrivatePostfix:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:  # pytest shows this with the failure
            print(f"--- tail of the private Postfix's maillog ({self.maillog_path}):")
            print("\n".join(self.maillog().splitlines()[-60:]))
        self.close()

    def _render(self, template: str) -> str:
        text = (TEMPLATES / template).read_text()
        return _FIELD.sub(lambda m: self._fields[m.group(1)], text)

    def start(self) -> None:
        """Write the configuration, ``postfix -c DIR start`` and wait for smtpd's banner."""
        # The daemons run as the postfix user: it must be able to reach the queue.
        self.base.chmod(0o755)
        for d in (self.conf, self.queue_dir, self.data_dir):
            d.mkdir()
        owner = pwd.getpwnam("postfix")
        os.chown(self.data_dir, owner.pw_uid, owner.pw_gid)
        main = self._render("main.cf.in")
        if self._settings:
            main += "\n# The test's own settings.\n"
            main += "".join(f"{k} = {v}\n" for k, v in self._settings.items())
        (self.conf / "main.cf").write_text(main)
        (self.conf / "master.cf").write_text(self._render("master.cf.in"))
        self._postfix_cmd("start")
        pid_file = self.queue_dir / "pid" / "master.pid"
        wait_for(pid_file.exists, 10, "Postfix's master.pid")
        self.master_pid = int(pid_file.read_text().split()[0])
        wait_for(self._banner, 20, f"smtpd's 220 banner on {self.address}:{self.smtp_port}")

    def _postfix_cmd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            [self._postfix, "-c", str(self.conf), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and res.returncode != 0:
            raise AssertionError(
                f"postfix -c {self.conf} {' '.join(args)} failed ({res.returncode}): "
                f"{res.stdout}{res.stderr}\nmaillog:\n{self.maillog()[-4000:]}"
            )
        return res

    def _banner(self) -> bool:
        try:
            with socket.create_connection((self.address, self.smtp_port), timeout=2) as s:
                greeting = s.recv(512)
                s.sendall(b"QUIT\r\n")
        except OSError:
            return False
        return greeting.startswith(b"220 ")

    def reconfigure(self, settings: Mapping[str, str]) -> None:
        """``postconf -c DIR -e`` each setting, then ``postfix -c DIR reload``."""
        self._settings.update(settings)
        edits = [f"{k}={v}" for k, v in settings.items()]
        subprocess.run([self._postconf, "-c", str(self.conf), "-e", *edits], check=True, timeout=30)
        self._postfix_cmd("reload")

    def instance_pids(self) -> list[int]:
        """PIDs of this instance's processes (``MAIL_CONFIG=<our conf>`` in their environment)."""
        marker = b"MAIL_CONFIG=" + os.fsencode(self.conf) + b"\0"
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    env = f.read()
            except OSError:  # gone meanwhile, or a kernel thread
                continue
            if marker in env:
                found.append(int(entry))
        return found

    def stop(self) -> None:
        """``postfix -c DIR stop``; then SIGKILL, by PID, whatever of the instance is left."""
        if self.master_pid is not None and alive(self.master_pid):
            self._postfix_cmd("stop", check=False)  # waits up to 5 s, then kills the master
            try:
                wait_for(lambda: not alive(self.master_pid or 0), 10, "Postfix's master to exit")
            except AssertionError:
                os.kill(self.master_pid, signal.SIGKILL)
        for _ in range(50):
            left = self.instance_pids()
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        assert not self.instance_pids(), f"Postfix processes left: {self.instance_pids()}"

    def close(self) -> None:
        """Stop the instance and remove its directory."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
            assert not self.base.exists(), f"could not remove {self.base}"

    # -- the log

    def maillog(self) -> str:
        """The instance's whole log so far."""
        try:
            return self.maillog_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def deliveries(self) -> list[LogDelivery]:
        """Every ``QID: to=<...>, relay=..., status=...`` line of the log, parsed."""
        out = []
        for line in self.maillog().splitlines():
            m = _DELIVERY.search(line)
            if m:
                fields = ("qid", "rcpt", "relay", "dsn", "status", "text", "agent")
                out.append(LogDelivery(*(m[k] for k in fields)))
        return out

    def count_status(self, status: str) -> int:
        """How many log lines say ``status=<status>`` (sent, deferred, bounced)."""
        return sum(1 for d in self.deliveries() if d.status == status)

    def lost_sessions(self) -> list[tuple[str, str, str]]:
        """``(queue id, peer, what)`` for each ``QID: lost connection with PEER while WHAT``.

        Postfix logs this when a session dies under a transaction; with a
        next-hop list it then goes on to the next host in the same attempt, so
        no ``status=deferred`` line need follow. ``WHAT`` ends in ``-- message
        may be sent more than once`` when the peer died after the whole
        message was sent: the at-least-once window.
        """
        return [(m[0], m[1], m[2]) for m in _LOST.findall(self.maillog())]

    def accepted_ids(self) -> list[str]:
        """Queue ids of the messages smtpd accepted (``QID: client=...``), in log order."""
        return _ACCEPTED.findall(self.maillog())

    # -- the queue

    def queue(self) -> list[dict[str, Any]]:
        """``postqueue -c DIR -j``: one dict per queued message."""
        res = subprocess.run(
            [self._postqueue, "-c", str(self.conf), "-j"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]

    def flush(self) -> None:
        """``postqueue -c DIR -f``: retry every deferred message now."""
        subprocess.run([self._postqueue, "-c", str(self.conf), "-f"], check=True, timeout=30)

    def wait_queue_empty(self, timeout: float = 60, *, flush_every: float | None = None) -> float:
        """Wait until the queue is empty (flushing every ``flush_every`` s); seconds taken."""
        start = time.monotonic()
        deadline = start + timeout
        last_flush = start
        empty_before = False
        while True:
            queued = self.queue()
            # showq reads the queue directories one after another, so a message
            # moving from deferred/ to active/ can be missed once: two in a row.
            if not queued and empty_before:
                return time.monotonic() - start
            empty_before = not queued
            now = time.monotonic()
            if now > deadline:
                sample = [(q.get("queue_id"), q.get("queue_name")) for q in queued[:10]]
                raise AssertionError(
                    f"{len(queued)} messages still queued after {timeout} s, e.g. {sample}\n"
                    + "\n".join(self.maillog().splitlines()[-30:])
                )
            if flush_every is not None and now - last_flush >= flush_every:
                self.flush()
                last_flush = now
            time.sleep(0.2)


def alive(pid: int) -> bool:
    """True if ``pid`` runs; a zombie (exited, not yet reaped by init) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def run_tool(args: Sequence[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a client tool (swaks, smtp-source); AssertionError with its output if it fails."""
    res = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({res.returncode}): {res.stdout}{res.stderr}")
    return res
