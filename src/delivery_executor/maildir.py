"""A durable Maildir store: the port of mailrs-maildir 1.2, made power-loss safe.

A delivery is: 1) create and write each file in ``tmp/`` (``O_EXCL``, mode
0600), 2) make the data durable, 3) rename each into ``new/``, 4) make the
renames durable. Only then does a call return. Steps 2 and 4 take one of two
forms (see :data:`SyncMode`):

``"fsync"`` (portable)
    ``fdatasync`` each file before closing it, then ``fsync`` each distinct
    ``new/`` directory once after the renames. Syscalls per batch of N files in
    D Maildirs: N × (open, write, fdatasync, close, rename) + D × (open,
    fsync, close).

``"syncfs"`` (Linux)
    Write and close every file without syncing it, ``syncfs`` the file system,
    rename, ``syncfs`` again: two syncs per file system whatever N and D.
    Syscalls: N × (open, write, close, rename) + 2 × F × (open, syncfs, close)
    for F file systems. ``syncfs`` also flushes every other program's dirty
    data on that file system, which can make it slow on a busy shared disk.

``"auto"`` (the default)
    Per file system: ``"syncfs"`` when a batch puts at least
    :data:`AUTO_SYNCFS_MIN_FILES` files on it, else ``"fsync"``. Measured here
    (ext4, virtio disk) a single message is cheaper with fdatasync + fsync (about
    0.4 ms against 0.7-1.0 ms), and from two messages on syncfs wins (see
    BUDGETS.md).

A directory fsync alone does **not** persist the data of new files on ext4
(delayed allocation) or XFS; that is why the original's batch protocol is not
used here.
"""

from __future__ import annotations

import enum
import errno
import itertools
import os
import socket
import stat
import threading
import time
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Literal, TypeAlias

from .errors import InvalidMaildirPath
from .fsops import HAVE_SYNCFS, OS_OPS, FsOps

__all__ = [
    "AUTO_SYNCFS_MIN_FILES",
    "Body",
    "Flag",
    "Maildir",
    "MaildirEntry",
    "MessageId",
    "SyncMode",
    "add_flag",
    "check_body",
    "check_maildir_path",
    "commit_batch",
    "commit_steps",
    "parse_flags",
    "run_steps",
    "run_sync_call",
    "serialize_flags",
]

Body: TypeAlias = bytes | bytearray | memoryview
SyncMode: TypeAlias = Literal["auto", "syncfs", "fsync"]

AUTO_SYNCFS_MIN_FILES = 2
"""With ``sync="auto"``, the number of files on one file system from which one
batch uses syncfs instead of per-file fdatasync."""

_SYNC_MODES = ("auto", "syncfs", "fsync")
_EEXIST_RETRIES = 8
_CACHE_MAX = 4096
_PATH_MAX = 4096  # Linux's PATH_MAX, terminating NUL included
DEFAULT_TMP_MAX_AGE = timedelta(hours=36)


# --------------------------------------------------------------------------
# Names and flags


@dataclass(frozen=True, slots=True)
class MessageId:
    """A delivered message's unique file name in ``new/`` (no ``:2,`` suffix)."""

    name: str

    def __str__(self) -> str:
        return self.name


class Flag(enum.StrEnum):
    """The standard Maildir flags, as their ``:2,`` letters."""

    DRAFT = "D"
    FLAGGED = "F"
    PASSED = "P"
    REPLIED = "R"
    SEEN = "S"
    TRASHED = "T"


_FLAG_BY_LETTER = {f.value: f for f in Flag}


def parse_flags(name: str) -> frozenset[Flag]:
    """The flags of a Maildir file name (``"123.M1P2Q3.host:2,RS"`` → {REPLIED, SEEN}).

    Letters this library does not know (experimental lowercase flags) are
    ignored; a name without a ``:2,`` suffix has no flags.
    """
    _, sep, info = name.partition(":2,")
    if not sep:
        return frozenset()
    return frozenset(_FLAG_BY_LETTER[c] for c in info if c in _FLAG_BY_LETTER)


def serialize_flags(flags: Iterable[Flag]) -> str:
    """The ``:2,`` suffix for ``flags``, letters in ASCII order as the spec asks."""
    return ":2," + "".join(sorted({Flag(f).value for f in flags}))


def add_flag(name: str, flag: Flag) -> str:
    """``name`` with ``flag`` added to its ``:2,`` suffix (created if missing)."""
    base = name.partition(":")[0]
    return base + serialize_flags(parse_flags(name) | {Flag(flag)})


def _sanitize_host(host: str) -> str:
    # The Maildir spec's escapes: '/' and ':' cannot appear in a file name part.
    return host.replace("/", "\\057").replace(":", "\\072") or "localhost"


_HOST = _sanitize_host(socket.gethostname())
_PID = os.getpid()
_SEQ = itertools.count()
_SEQ_LOCK = threading.Lock()


def _after_fork() -> None:
    global _PID
    _PID = os.getpid()


os.register_at_fork(after_in_child=_after_fork)


def _unique_name() -> str:
    """``{secs}.M{usec}P{pid}Q{seq}.{host}``: unique across threads, forks and hosts."""
    with _SEQ_LOCK:
        seq = next(_SEQ)
    secs, usec = divmod(time.time_ns() // 1000, 1_000_000)
    return f"{secs}.M{usec}P{_PID}Q{seq}.{_HOST}"


# --------------------------------------------------------------------------
# Input checks


def check_maildir_path(path: str | os.PathLike[str]) -> str:
    """Return ``path`` as a str, or raise ``TypeError``/``InvalidMaildirPath``.

    Rejects non-str paths (bytes included), the empty path, NUL bytes and
    paths of PATH_MAX (4,096) bytes or more.
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
    if len(p) > _PATH_MAX // 4 and len(os.fsencode(p)) >= _PATH_MAX:
        raise InvalidMaildirPath(
            f"Maildir path is {len(os.fsencode(p))} bytes long (limit {_PATH_MAX - 1})"
        )
    return p


def check_body(body: object) -> memoryview:
    """Return ``body`` as a flat byte view, or raise ``TypeError`` naming its type."""
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise TypeError(
            f"message body must be bytes, bytearray or memoryview, not {type(body).__name__}"
        )
    view = memoryview(body)
    if not view.c_contiguous:
        raise TypeError("message body memoryview must be C-contiguous")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _check_sync(sync: str) -> None:
    if sync not in _SYNC_MODES:
        raise ValueError(f"sync must be one of {_SYNC_MODES}, not {sync!r}")
    if sync == "syncfs" and not HAVE_SYNCFS:
        raise ValueError("sync='syncfs' is not available on this platform")


# --------------------------------------------------------------------------
# The Maildir


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

    __slots__ = ("_cur", "_new", "_tmp", "dev", "path")

    path: Path
    dev: int

    def __init__(self, root: str, dev: int) -> None:
        self.path = Path(root)
        self.dev = dev
        # Precomputed prefixes: the hot path builds file paths by concatenation.
        self._tmp = os.path.join(root, "tmp") + os.sep
        self._new = os.path.join(root, "new") + os.sep
        self._cur = os.path.join(root, "cur") + os.sep

    def __repr__(self) -> str:
        return f"Maildir({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Maildir) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    # -- construction ------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike[str]) -> Maildir:
        """Open the Maildir at ``path``, creating it and any missing parent (mode 0700).

        Each directory it creates is made durable (its parent is fsynced), so a
        message later delivered into it cannot lose its Maildir in a crash.
        Raises ``OSError`` (``ENOTDIR``, ``EACCES``, ...) with the failing path.
        """
        root = os.path.abspath(check_maildir_path(path))
        created: list[str] = []
        _makedirs(root, created)
        for sub in ("tmp", "new", "cur"):
            d = os.path.join(root, sub)
            try:
                os.mkdir(d, 0o700)
                created.append(d)
            except FileExistsError:
                pass
        for parent in dict.fromkeys(os.path.dirname(d) for d in created):
            OS_OPS.fsync_dir(parent)
        return cls._checked(root)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Maildir:
        """Open an existing Maildir (``FileNotFoundError``/``NotADirectoryError`` if not)."""
        return cls._checked(os.path.abspath(check_maildir_path(path)))

    @classmethod
    def _checked(cls, root: str) -> Maildir:
        dev = 0
        for sub in ("cur", "tmp", "new"):
            d = os.path.join(root, sub)
            st = os.stat(d)
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), d)
            dev = st.st_dev
        return cls(root, dev)

    @classmethod
    def cached(cls, path: str | os.PathLike[str]) -> Maildir:
        """:meth:`create`, remembered per path for the process: no syscall on a hit.

        A relative path is resolved against the working directory at the first
        call. :meth:`forget` drops an entry (the executor does so when a
        delivery fails with ``ENOENT``, so a removed Maildir is recreated).
        """
        key = check_maildir_path(path)
        md = _CACHE.get(key)
        if md is not None:
            return md
        md = cls.create(key)
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

    def deliver(self, body: Body, *, sync: SyncMode = "auto") -> MessageId:
        """Durably deliver one message into ``new/`` and return its id.

        See :func:`commit_batch` for the protocol, costs and failure modes.
        """
        return self.deliver_batch((body,), sync=sync)[0]

    def deliver_batch(self, bodies: Sequence[Body], *, sync: SyncMode = "auto") -> list[MessageId]:
        """Durably deliver ``bodies``; ids are positional. ``[]`` touches nothing.

        Raises ``TypeError`` (before any file is touched) for a non-bytes body,
        and the first ``OSError`` of the batch otherwise; see
        :func:`commit_batch` for what a failure leaves behind.
        """
        if not bodies:
            _check_sync(sync)
            return []
        (result,) = commit_batch([(self, bodies)], sync=sync)
        if isinstance(result, OSError):
            raise result
        return result

    # -- reading -----------------------------------------------------------

    def scan_new(self) -> list[MaildirEntry]:
        """Every message in ``new/`` (unordered). Dot files are skipped."""
        return self._scan(self._new)

    def scan_cur(self) -> list[MaildirEntry]:
        """Every message in ``cur/`` with its flags (unordered)."""
        return self._scan(self._cur)

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

        Raises ``FileNotFoundError`` if the message is in neither directory.
        """
        base = str(message).partition(":")[0]
        src = self._new + base
        if not os.path.exists(src):
            src = ""
            with os.scandir(self._cur) as it:
                for e in it:
                    if e.name == base or e.name.startswith(base + ":"):
                        src = e.path
                        break
        if not src:
            raise FileNotFoundError(errno.ENOENT, "no such message", base)
        name = add_flag(os.path.basename(src), flag)
        dst = self._cur + name
        os.rename(src, dst)
        return MaildirEntry(MessageId(base), Path(dst), parse_flags(name))

    def cleanup_tmp(self, max_age: float | timedelta = DEFAULT_TMP_MAX_AGE) -> int:
        """Remove files in ``tmp/`` not modified for ``max_age`` (seconds or timedelta).

        Returns how many were removed. Fresh files, which may belong to a
        delivery in progress, are left alone; the default age is qmail's 36 h.
        """
        age = max_age.total_seconds() if isinstance(max_age, timedelta) else float(max_age)
        if age < 0:
            raise ValueError(f"max_age must be >= 0, not {max_age!r}")
        cutoff = time.time() - age
        removed = 0
        with os.scandir(self._tmp) as it:
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode) and st.st_mtime < cutoff:
                        os.unlink(e.path)
                        removed += 1
                except FileNotFoundError:
                    continue
        return removed


_CACHE: dict[str, Maildir] = {}
_CACHE_LOCK = threading.Lock()


def _makedirs(path: str, created: list[str]) -> None:
    # os.makedirs does not say which components it made; we need them to fsync.
    # Another thread or process may create any component at the same time.
    try:
        os.mkdir(path, 0o700)
    except FileNotFoundError:
        parent = os.path.dirname(path)
        if parent == path:
            raise
        _makedirs(parent, created)
        try:
            os.mkdir(path, 0o700)
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


# --------------------------------------------------------------------------
# Many mailboxes, one commit


class _Group:
    __slots__ = ("error", "md", "names", "renamed", "views")

    def __init__(self, md: Maildir, views: list[memoryview]) -> None:
        self.md = md
        self.views = views
        self.names: list[str] = []
        self.renamed = 0
        self.error: OSError | None = None

    def fail(self, exc: OSError, ops: FsOps) -> None:
        """Record the first error and remove the group's not-yet-renamed tmp files."""
        if self.error is None:
            self.error = exc
        for name in self.names[self.renamed :]:
            try:
                ops.unlink(self.md._tmp + name)
            except OSError:
                pass
        self.names = self.names[: self.renamed]


SyncCall: TypeAlias = tuple[str, int, str]
"""A sync the protocol needs: ``("fdatasync", fd, path)``, ``("fsync_dir", -1, path)``
or ``("syncfs", -1, path)``."""

CommitSteps: TypeAlias = Generator[SyncCall, "OSError | None", "list[list[MessageId] | OSError]"]


def commit_batch(
    groups: Sequence[tuple[Maildir, Sequence[Body]]],
    *,
    sync: SyncMode = "auto",
    ops: FsOps = OS_OPS,
) -> list[list[MessageId] | OSError]:
    """Durably deliver several Maildirs' messages with shared sync steps.

    Returns one result per group, in order: its ids (positional) or the
    ``OSError`` that failed it. A failure is confined to the groups it
    concerns: a write error fails its own group; a failed ``syncfs`` fails
    every group on that file system; a failed directory fsync fails the groups
    of that directory. A sync error is final: it is never retried (after a
    failed sync the kernel may have dropped the data).

    After a failure, a group's tmp files are removed and ``new/`` holds nothing
    partial. If the failure came after some renames (rename or directory-sync
    error), those messages are complete in ``new/`` but were not acknowledged:
    a retry may deliver them twice, never zero times.

    Raises ``TypeError``/``ValueError`` for bad bodies or ``sync`` before any
    file is touched. Cost: see the module docstring for the syscalls.
    """
    return run_steps(commit_steps(groups, sync=sync, ops=ops), ops)[0]


def commit_steps(
    groups: Sequence[tuple[Maildir, Sequence[Body]]],
    *,
    sync: SyncMode = "auto",
    ops: FsOps = OS_OPS,
) -> CommitSteps:
    """:func:`commit_batch` as a generator that hands each sync to its driver.

    The generator does the page-cache work (open, write, close, rename) itself
    and yields a :data:`SyncCall` wherever the protocol must wait for the disk;
    the driver makes that call (for instance in a thread, see
    :func:`run_sync_call`) and sends back ``None`` or the ``OSError`` it raised.
    Its return value is :func:`commit_batch`'s. Bodies and ``sync`` are checked
    here, before the generator exists.
    """
    _check_sync(sync)
    work = [_Group(md, [check_body(b) for b in bodies]) for md, bodies in groups]
    return _steps(work, sync, ops)


def run_steps(steps: CommitSteps, ops: FsOps) -> tuple[list[list[MessageId] | OSError], int]:
    """Drive :func:`commit_steps` in this thread; its results and the syncs made."""
    syncs = 0
    try:
        call = next(steps)
        while True:
            err = run_sync_call(ops, call)
            syncs += 1
            call = steps.send(err)
    except StopIteration as done:
        results: list[list[MessageId] | OSError] = done.value
        return results, syncs


def run_sync_call(ops: FsOps, call: SyncCall) -> OSError | None:
    """Make one yielded sync through ``ops``; return its ``OSError`` instead of raising."""
    kind, fd, path = call
    try:
        if kind == "fdatasync":
            ops.fdatasync(fd, path)
        elif kind == "fsync_dir":
            ops.fsync_dir(path)
        else:
            ops.syncfs(path)
    except OSError as exc:
        return exc
    return None


def _steps(work: list[_Group], sync: str, ops: FsOps) -> CommitSteps:
    # Decide the form per file system before writing: it changes step 2.
    per_dev: dict[int, int] = {}
    for g in work:
        per_dev[g.md.dev] = per_dev.get(g.md.dev, 0) + len(g.views)
    if sync == "auto":
        syncfs_devs = {d for d, n in per_dev.items() if n >= AUTO_SYNCFS_MIN_FILES and HAVE_SYNCFS}
    elif sync == "syncfs":
        syncfs_devs = set(per_dev)
    else:
        syncfs_devs = set()

    # 1-2. Write into tmp/ (fdatasync per file for the portable form).
    for g in work:
        datasync = g.md.dev not in syncfs_devs
        try:
            for view in g.views:
                yield from _write_one(g, view, datasync, ops)
        except OSError as exc:
            g.fail(exc, ops)

    # 2. syncfs form: one sync per file system covers every file's data.
    for dev in syncfs_devs:
        yield from _sync_dev(work, dev, ops)

    # 3. Rename into new/.
    for g in work:
        if g.error is not None:
            continue
        try:
            for name in g.names:
                ops.rename(g.md._tmp + name, g.md._new + name)
                g.renamed += 1
        except OSError as exc:
            g.fail(exc, ops)

    # 4. Make the renames durable.
    for dev in syncfs_devs:
        yield from _sync_dev(work, dev, ops)
    new_dirs: dict[str, list[_Group]] = {}
    for g in work:
        if g.error is None and g.md.dev not in syncfs_devs and g.names:
            new_dirs.setdefault(g.md._new, []).append(g)
    for new_dir, members in new_dirs.items():
        err = yield ("fsync_dir", -1, new_dir)
        if err is not None:
            for g in members:
                g.fail(err, ops)

    return [g.error if g.error is not None else [MessageId(n) for n in g.names] for g in work]


def _write_one(
    g: _Group, view: memoryview, datasync: bool, ops: FsOps
) -> Generator[SyncCall, OSError | None, None]:
    for _ in range(_EEXIST_RETRIES):
        name = _unique_name()
        path = g.md._tmp + name
        try:
            fd = ops.create(path)
        except FileExistsError:
            continue
        g.names.append(name)  # from here on, failure must unlink it
        try:
            ops.write_all(fd, view, path)
            if datasync:
                err = yield ("fdatasync", fd, path)
                if err is not None:
                    raise err
        finally:
            ops.close(fd)
        return
    raise FileExistsError(errno.EEXIST, "no unique name after retries", g.md._tmp)


def _sync_dev(
    work: list[_Group], dev: int, ops: FsOps
) -> Generator[SyncCall, OSError | None, None]:
    live = [g for g in work if g.md.dev == dev and g.error is None and g.names]
    if not live:
        return
    err = yield ("syncfs", -1, live[0].md._new)
    if err is not None:
        for g in live:
            g.fail(err, ops)
