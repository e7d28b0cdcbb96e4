"""One Maildir on disk: creation, delivery, scans, flags and tmp clean-up.

:class:`Maildir` is the port of mailrs-maildir 1.2's ``Maildir``. Delivery goes
through :func:`~delivery_executor.store.commit.commit_batch` (the durable
protocol); the rest is plain file work. Paths are checked at the boundary by
:func:`check_maildir_path`.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from ..errors import InvalidMaildirPath
from ..fsops import OS_OPS, FsOps, orders_writeback
from ..validate import seconds
from .commit import Message, SyncMode, check_sync, commit_batch
from .names import (
    Flag,
    MessageId,
    add_flag,
    check_info_letters,
    check_message_id,
    host_of,
    parse_flags,
    this_host,
)

__all__ = ["DEFAULT_TMP_MAX_AGE", "Maildir", "MaildirEntry", "check_maildir_path"]

_CACHE_MAX = 4096
_PATH_MAX = 4096  # Linux's PATH_MAX, terminating NUL included
DEFAULT_TMP_MAX_AGE = timedelta(hours=36)
"""qmail's age for stale files in ``tmp/``."""


def check_maildir_path(path: str | os.PathLike[str]) -> str:
    """``path`` as an absolute str path, or ``TypeError``/``InvalidMaildirPath``.

    A relative path is resolved here, once, against the current working
    directory (``os.path.abspath``, which also normalises ``a/../b``), so a
    later ``chdir`` cannot move where mail goes. Rejects non-str paths (bytes
    included), the empty path, NUL bytes and paths of PATH_MAX (4,096) bytes
    or more.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"Maildir path must be str or os.PathLike, not {type(path).__name__}")
    p = os.fspath(path)
    if not isinstance(p, str):
        raise TypeError(f"Maildir path must be a str path, not {type(p).__name__}")
    if not p:
        raise InvalidMaildirPath("Maildir path is empty")
    if "\0" in p:
        raise InvalidMaildirPath(f"Maildir path contains a NUL byte: {p!r}")
    if not p.startswith("/") or "/." in p or "//" in p or p.endswith("/"):
        p = os.path.abspath(p)
    if len(p) > _PATH_MAX // 4 and len(os.fsencode(p)) >= _PATH_MAX:
        raise InvalidMaildirPath(
            f"Maildir path is {len(os.fsencode(p))} bytes long (limit {_PATH_MAX - 1})"
        )
    return p


@dataclass(frozen=True, slots=True)
class MaildirEntry:
    """A message found by a scan: its id, its current path and its flags."""

    id: MessageId
    path: Path
    flags: frozenset[Flag]


class Maildir:
    """One Maildir (``tmp/``, ``new/``, ``cur/``) on disk.

    Build it with :meth:`create`, :meth:`open` or :meth:`cached`, not directly.
    Instances are immutable and safe to share between threads.
    """

    __slots__ = (
        "cur_prefix",
        "dev",
        "info",
        "new_prefix",
        "ordered",
        "owner",
        "path",
        "tmp_prefix",
    )

    path: Path
    """The Maildir's root, absolute."""
    dev: int
    """``st_dev`` of its file system: batches share syncs per file system."""
    tmp_prefix: str
    """``<root>/tmp/``; file paths are built by concatenation on the hot path."""
    new_prefix: str
    """``<root>/new/``."""
    cur_prefix: str
    """``<root>/cur/``."""
    owner: tuple[int, int] | None
    """``(uid, gid)`` each new file is given, or ``None`` (the creator's): set when
    this process is root and ``tmp/`` belongs to another user, so that mail in
    a user's Maildir is theirs (per-user uid/gid, as Dovecot does)."""
    info: str
    """Suffix of delivered names: ``""``, or ``":2,<flags>"`` for a :meth:`with_flags` view."""
    ordered: bool
    """Its file system journals a rename after the data written back before it
    (:func:`~delivery_executor.fsops.orders_writeback`: ext4 with a journal, XFS):
    ``sync="auto"`` batches there need one sync, not two ``syncfs``."""

    def __init__(
        self, root: str, dev: int, owner: tuple[int, int] | None = None, ordered: bool = False
    ) -> None:
        self.path = Path(root)
        self.dev = dev
        self.owner = owner
        self.ordered = ordered
        self.tmp_prefix = os.path.join(root, "tmp") + os.sep
        self.new_prefix = os.path.join(root, "new") + os.sep
        self.cur_prefix = os.path.join(root, "cur") + os.sep
        self.info = ""

    def with_flags(self, letters: str) -> Maildir:
        """A view of this Maildir whose deliveries land in ``cur/`` as ``name:2,<letters>``.

        This is what Dovecot's LDA does for a message saved with flags (Sieve
        ``imap4flags``): the flags are part of the name from the start, with
        the same durable protocol (the rename into ``cur/`` and the fsync of
        ``cur/`` replace those of ``new/``). ``letters`` are Maildir info
        letters (``S``, ``F``, ... and keyword letters ``a``-``z``), stored
        sorted and once each (:func:`check_info_letters`); ``""`` returns this
        Maildir itself. Raises ``ValueError`` for any other letter.
        """
        info = check_info_letters(letters)
        if not info:
            return self
        view = Maildir(str(self.path), self.dev, self.owner, self.ordered)
        view.new_prefix = self.cur_prefix
        view.info = ":2," + info
        return view

    def __repr__(self) -> str:
        return f"Maildir({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Maildir) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    # -- construction ------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike[str], *, ops: FsOps = OS_OPS) -> Maildir:
        """Open the Maildir at ``path``, creating it and any missing parent (mode 0700).

        Each directory it creates is made durable (its parent is fsynced through
        ``ops``), so a message later delivered into it cannot lose its Maildir
        in a crash. Safe against other threads and processes creating the same
        path at once. Raises ``OSError`` (``ENOTDIR``, ``EACCES``, ...) with the
        failing path.
        """
        root = check_maildir_path(path)
        created: list[str] = []
        _makedirs(root, created, ops)
        for sub in ("tmp", "new", "cur"):
            d = os.path.join(root, sub)
            try:
                ops.mkdir(d)
                created.append(d)
            except FileExistsError:
                pass
        for parent in dict.fromkeys(os.path.dirname(d) for d in created):
            ops.fsync_dir(parent)
        return cls._checked(root)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Maildir:
        """Open an existing Maildir (``FileNotFoundError``/``NotADirectoryError`` if not)."""
        return cls._checked(check_maildir_path(path))

    @classmethod
    def _checked(cls, root: str) -> Maildir:
        dev = 0
        owner = None
        for sub in ("cur", "tmp", "new"):
            d = os.path.join(root, sub)
            st = os.stat(d)
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), d)
            dev = st.st_dev
            if sub == "tmp" and st.st_uid != 0 and os.geteuid() == 0:
                owner = (st.st_uid, st.st_gid)
        return cls(root, dev, owner, orders_writeback(d))  # d: new/, whose st_dev is dev

    @classmethod
    def cached(cls, path: str | os.PathLike[str], *, ops: FsOps = OS_OPS) -> Maildir:
        """:meth:`create`, remembered per path for the process: no syscall on a hit.

        :meth:`forget` drops an entry (the executor does so when a
        delivery fails with ``ENOENT``, so a removed Maildir is recreated).
        """
        key = check_maildir_path(path)
        md = _CACHE.get(key)
        if md is not None:
            return md
        md = cls.create(key, ops=ops)
        with _CACHE_LOCK:
            if len(_CACHE) >= _CACHE_MAX:
                del _CACHE[next(iter(_CACHE))]
            _CACHE[key] = md
        return md

    @staticmethod
    def peek_cached(path: str) -> Maildir | None:
        """The :meth:`cached` entry for ``path`` if there is one; never touches the disk."""
        return _CACHE.get(path)

    @staticmethod
    def forget(path: str | os.PathLike[str]) -> None:
        """Drop ``path`` from the :meth:`cached` table, if present."""
        with _CACHE_LOCK:
            _CACHE.pop(check_maildir_path(path), None)

    # -- delivery ----------------------------------------------------------

    def deliver(self, body: Message, *, sync: SyncMode = "auto") -> MessageId:
        """Durably deliver one message into ``new/`` and return its id.

        See :func:`commit_batch` for the protocol, costs and failure modes.
        """
        return self.deliver_batch((body,), sync=sync)[0]

    def deliver_batch(
        self, bodies: Sequence[Message], *, sync: SyncMode = "auto"
    ) -> list[MessageId]:
        """Durably deliver ``bodies``; ids are positional. ``[]`` touches nothing.

        Raises ``TypeError`` (before any file is touched) for a non-bytes body,
        and the first ``OSError`` of the batch otherwise; see
        :func:`commit_batch` for what a failure leaves behind.
        """
        if not bodies:
            check_sync(sync)
            return []
        (result,) = commit_batch([(self, bodies)], sync=sync)
        if isinstance(result, OSError):
            raise result
        return result

    # -- reading -----------------------------------------------------------

    def scan_new(self) -> list[MaildirEntry]:
        """Every message in ``new/`` (unordered). Dot files are skipped."""
        return self._scan(self.new_prefix)

    def scan_cur(self) -> list[MaildirEntry]:
        """Every message in ``cur/`` with its flags (unordered)."""
        return self._scan(self.cur_prefix)

    @staticmethod
    def _scan(directory: str) -> list[MaildirEntry]:
        out = []
        with os.scandir(directory) as it:
            for e in it:
                if e.name.startswith(".") or not e.is_file(follow_symlinks=False):
                    continue
                out.append(
                    MaildirEntry(
                        id=MessageId(e.name.partition(":")[0]),
                        path=Path(e.path),
                        flags=parse_flags(e.name),
                    )
                )
        return out

    def add_flag(self, message: MessageId | str, flag: Flag) -> MaildirEntry:
        """Add ``flag`` to a message, moving it from ``new/`` to ``cur/`` if needed.

        Raises ``FileNotFoundError`` if the message is in neither directory,
        and, before touching anything, ``InvalidMessageId`` for an id that is
        not one file's name (see :func:`check_message_id`) and ``ValueError``
        for a bad flag.
        """
        flag = Flag(flag)
        base = check_message_id(message).partition(":")[0]
        src = self.new_prefix + base
        if not os.path.exists(src):
            src = ""
            with os.scandir(self.cur_prefix) as it:
                for e in it:
                    if e.name == base or e.name.startswith(base + ":"):
                        src = e.path
                        break
        if not src:
            raise FileNotFoundError(errno.ENOENT, "no such message", base)
        name = add_flag(os.path.basename(src), flag)
        dst = self.cur_prefix + name
        os.rename(src, dst)
        return MaildirEntry(MessageId(base), Path(dst), parse_flags(name))

    def cleanup_tmp(
        self,
        max_age: float | timedelta = DEFAULT_TMP_MAX_AGE,
        *,
        other_hosts_max_age: float | timedelta = DEFAULT_TMP_MAX_AGE,
    ) -> int:
        """Remove stale files in ``tmp/``; return how many were removed.

        A file named by this host (the host part of a Maildir name, see
        :mod:`.names`) goes once it has not been modified for ``max_age``
        (seconds or timedelta); a file of any other host, or with a name that
        is not a Maildir name, only after ``other_hosts_max_age`` (default
        qmail's 36 h), whatever ``max_age`` says. On a Maildir shared by
        several hosts another host may be writing that file right now, and its
        clock and its idea of "stale" are not ours. Cost: one ``scandir`` and a
        ``stat`` per file.
        """
        mine = seconds("max_age", max_age, infinite=True)
        theirs = max(mine, seconds("other_hosts_max_age", other_hosts_max_age, infinite=True))
        now = time.time()
        removed = 0
        with os.scandir(self.tmp_prefix) as it:
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                    age = now - st.st_mtime
                    limit = mine if host_of(e.name) == this_host() else theirs
                    if stat.S_ISREG(st.st_mode) and age > limit:
                        os.unlink(e.path)
                        removed += 1
                except FileNotFoundError:
                    continue
        return removed


_CACHE: dict[str, Maildir] = {}
_CACHE_LOCK = threading.Lock()


def _makedirs(path: str, created: list[str], ops: FsOps) -> None:
    # os.makedirs does not say which components it made; we need them to fsync.
    # Another thread or process may create any component at the same time.
    try:
        ops.mkdir(path)
    except FileNotFoundError:
        parent = os.path.dirname(path)
        if parent == path:
            raise
        _makedirs(parent, created, ops)
        try:
            ops.mkdir(path)
        except FileExistsError:
            _require_dir(path)
            return
    except FileExistsError:
        _require_dir(path)
        return
    created.append(path)


def _require_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
