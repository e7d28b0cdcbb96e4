"""The commit protocol: many Maildirs' messages made durable with shared syncs.

This is the project's sans-IO core. :func:`commit_steps` does the page-cache
work of a batch (open, write, close, rename, through an :class:`FsOps`) and
*yields* each sync the protocol must wait for; whoever drives it decides where
that sync runs: the calling thread (:func:`commit_batch`), a thread pool from
the event loop, or a helper process. :class:`StepDriver` is the one driver
loop all of them share.

A delivery is: 1) create and write each file in ``tmp/`` (``O_EXCL``, mode
0600), 2) make the data durable, 3) move each into ``new/`` with
``renameat2(RENAME_NOREPLACE)`` (or ``link`` + ``unlink``), so that a name
collision can never replace a message already there (it is retried under a
new name), 4) make the moves durable. Steps 2 and 4 take one of these forms (see
:data:`SyncMode`):

``"fsync"`` (portable)
    ``fdatasync`` each file before closing it, then ``fsync`` each distinct
    ``new/`` directory once after the moves. Syscalls per batch of N files in
    D Maildirs: N × (open, write, fdatasync, close, renameat2) + D × (open,
    fsync, close).

``"syncfs"`` (Linux)
    Write and close every file without syncing it, ``syncfs`` the file system,
    move, ``syncfs`` again: two syncs per file system whatever N and D.
    Syscalls: N × (open, write, close, renameat2) + 2 × F × syncfs for F file
    systems. Each ``syncfs`` runs on the first file the batch wrote on that
    file system, kept open until the end, never on a directory that one broken
    Maildir could make unopenable. ``syncfs`` also flushes every other
    program's dirty data on that file system, which can make it slow on a busy
    shared disk.

``"auto"`` (the default)
    Per file system: ``"fsync"`` for fewer than :data:`AUTO_SYNCFS_MIN_FILES`
    files (one message is cheaper with fdatasync + fsync than with two
    syncfs); from two files on, the *writeback* form where the file system
    orders it (below), else ``"syncfs"`` (figures in BUDGETS.md).

The writeback form (``"auto"`` only, on ext4 with a journal and on XFS)
    Step 2 is ``sync_file_range(WRITE)`` on every file, then
    ``sync_file_range(WAIT_BEFORE|WRITE|WAIT_AFTER)`` on each: the data is
    on the device (perhaps in its volatile cache) and its block allocation,
    size and unwritten-extent conversion are in the journal before the first
    move is made. Any journal commit that holds a move therefore holds those
    too, and flushes the device cache before its commit block. Step 4 is then
    one ``fsync`` of the ``new/`` directory moved into last on that file
    system: the journal commits in order, so the commit that holds that
    directory's last change holds every move made before it (ext4's jbd2
    commits whole transactions in sequence; XFS forces its log up to that
    change). Unlike ``syncfs``, it neither writes out nor waits for anyone
    else's dirty data, and two batches' commits can overlap: 0.95-1.35 ms
    against 1.23-1.80 for a ``syncfs`` in its place, and a batch of 32 small
    files takes 2.74-3.78 ms against 3.95-5.24 with two ``syncfs`` here (two
    runs, BUDGETS.md). A batch that wrote duplicate records (:mod:`.seen`)
    ends with ``syncfs`` instead, which also covers their data, and so does
    one whose last directory cannot be opened any more (see :func:`_sync_dev`).
    Where that ordering is not known to hold
    (:func:`~delivery_executor.fsops.orders_writeback` says which), ``"auto"``
    keeps two ``syncfs``. Checked on a recorded device, for every crash state,
    with journal commits forced between every two steps, and with the moves
    into one Maildir left to that ``fsync`` alone (``tests/test_power_loss.py``;
    ext4, ext4 with ``fast_commit``, XFS). Files stay open from their
    write to their wait, at most :data:`WRITEBACK_CHUNK` at a time. Only for
    up to :data:`WRITEBACK_MAX_BYTES` per file system and batch: past that,
    two ``syncfs`` (faster for big mail, measured).

A directory fsync alone does **not** persist the data of new files on ext4
(delayed allocation) or XFS; that is why a batch protocol of no file sync,
``fsync(tmp/)``, rename, ``fsync(new/)`` is not used here.
"""

from __future__ import annotations

import contextlib
import errno
import functools
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, TypeAlias

from ..fsops import HAVE_SYNCFS, OS_OPS, FsOps
from .names import MessageId, size_suffix, unique_name
from .seen import message_key, records_dir


class MaildirTarget(Protocol):
    """What a commit needs of a Maildir (:class:`~.maildir.Maildir` is one)."""

    @property
    def path(self) -> Path: ...
    @property
    def dev(self) -> int:
        """``st_dev`` of its file system: groups on one file system share syncs."""

    @property
    def tmp_prefix(self) -> str:
        """``<path>/tmp/``."""

    @property
    def new_prefix(self) -> str:
        """``<path>/new/``."""

    @property
    def owner(self) -> tuple[int, int] | None:
        """``(uid, gid)`` new files are given (root delivering for a user), or None."""

    @property
    def info(self) -> str:
        """Appended to each final name: ``""``, or ``":2,<flags>"`` (new_prefix is cur/ then)."""

    @property
    def ordered(self) -> bool:
        """Its file system journals a move after data written back before it."""


__all__ = [
    "AUTO_SYNCFS_MIN_FILES",
    "WRITEBACK_CHUNK",
    "WRITEBACK_MAX_BYTES",
    "Body",
    "CommitSteps",
    "MaildirTarget",
    "Message",
    "StepDriver",
    "StoreOptions",
    "SyncCall",
    "SyncMode",
    "check_message",
    "check_sync",
    "commit_batch",
    "commit_steps",
    "run_sync_call",
]

Body: TypeAlias = bytes | bytearray | memoryview
Message: TypeAlias = Body | tuple[Body, ...]
"""One message: a buffer, or a tuple of buffers written one after the other
(e.g. per-recipient headers and a body shared between recipients)."""
Parts: TypeAlias = tuple[memoryview, ...]
SyncMode: TypeAlias = Literal["auto", "syncfs", "fsync"]

AUTO_SYNCFS_MIN_FILES = 2
"""With ``sync="auto"``, the number of files on one file system from which one
batch uses syncfs instead of per-file fdatasync."""

WRITEBACK_CHUNK = 128
"""In the writeback form, the most files one file system's batch keeps open
between their write and the wait for their writeback."""

WRITEBACK_MAX_BYTES = 4 << 20
"""The most bytes one batch puts on a file system in the writeback form; past
that, two ``syncfs``. Measured here (BUDGETS.md): the writeback form is a
quarter faster for a batch of small mail and level at 64 KiB, but ``serve``
ran a third slower with it at 1 MiB, with more system CPU in its own
processes (the waits make the writing thread do the writeback), while its
last step was a ``syncfs``. With the ``fsync`` last step, no bound led in 7
of 10 rounds at 1 MiB (+7 % median), within the noise: the bound stays."""

SYNC_MODES: tuple[SyncMode, ...] = ("auto", "syncfs", "fsync")
_EEXIST_RETRIES = 8
# What opening a directory can fail with, unlike fsync itself (EIO, ENOSPC).
_OPEN_ERRORS = frozenset(
    {
        errno.ENOENT,
        errno.ENOTDIR,
        errno.EACCES,
        errno.EPERM,
        errno.ELOOP,
        errno.EMFILE,
        errno.ENFILE,
    }
)
_STALE = "the Maildir's file system changed since it was opened (a mount?): reopen it"

SyncCall: TypeAlias = "tuple[str, int | tuple[int, ...], str | tuple[str, ...]]"
"""A sync the protocol needs: ``("fdatasync", fd, path)``, ``("fsync_dir", -1, path)``,
``("syncfs", fd, root)`` (``fd`` an open file on that file system; ``root`` the
Maildir it is in, for errors) or ``("writeback", (fd, ...), (path, ...))``
(start, then wait for, the writeback of each file)."""

GroupOutcome: TypeAlias = "list[MessageId] | OSError"
CommitSteps: TypeAlias = Generator[SyncCall, "OSError | None", "list[list[MessageId] | OSError]"]


# --------------------------------------------------------------------------
# Input checks


def _view(body: object) -> memoryview:
    if type(body) is memoryview and body.ndim == 1 and body.format == "B" and body.c_contiguous:
        return body  # already a flat byte view (the executor's parts): nothing to make
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


def check_message(message: object) -> Parts:
    """``message`` as a tuple of flat byte views, or ``TypeError`` naming the bad type.

    A message is a bytes-like object or a tuple of them (written in order).
    The bytes are not copied.
    """
    if isinstance(message, tuple):
        if len(message) == 1:  # the executor's usual form: no generator for one part
            return (_view(message[0]),)
        return tuple(_view(part) for part in message)
    return (_view(message),)


def check_sync(sync: str) -> None:
    """``ValueError`` unless ``sync`` is a :data:`SyncMode` available here."""
    if sync not in SYNC_MODES:
        raise ValueError(f"sync must be one of {SYNC_MODES}, not {sync!r}")
    if sync == "syncfs" and not HAVE_SYNCFS:
        raise ValueError("sync='syncfs' is not available on this platform")


@dataclass(frozen=True, slots=True)
class StoreOptions:
    """How the store writes a batch: one value instead of three threaded flags.

    ``sync`` picks the sync form (:data:`SyncMode`, checked here: ``ValueError``);
    ``size_in_names`` puts ``,S=``/``,W=`` in each name; ``ops`` makes the
    file-system calls (tests pass a tracing or failing one). Built once, at a
    public boundary (a writer's or the executor's constructor), and passed down
    as is: nothing is allocated per batch or per message.
    """

    sync: SyncMode = "auto"
    size_in_names: bool = True
    ops: FsOps = OS_OPS

    def __post_init__(self) -> None:
        check_sync(self.sync)

    @staticmethod
    def of(
        options: StoreOptions | None,
        sync: SyncMode = "auto",
        ops: FsOps = OS_OPS,
        size_in_names: bool = True,
    ) -> StoreOptions:
        """``options``, or the value the three keywords make; ``TypeError`` if given both."""
        if options is None:
            if ops is OS_OPS and sync in SYNC_MODES and isinstance(size_in_names, bool):
                return _plain_options(sync, size_in_names)  # shared: no allocation per call
            return StoreOptions(sync, size_in_names, ops)
        if not isinstance(options, StoreOptions):
            raise TypeError(f"options must be a StoreOptions, not {type(options).__name__}")
        if sync != "auto" or ops is not OS_OPS or not size_in_names:
            raise TypeError("pass options= or sync/ops/size_in_names, not both")
        return options


DEFAULT_STORE_OPTIONS = StoreOptions()


@functools.lru_cache(maxsize=len(SYNC_MODES) * 2)
def _plain_options(sync: SyncMode, size_in_names: bool) -> StoreOptions:
    if sync == "auto" and size_in_names:
        return DEFAULT_STORE_OPTIONS
    return StoreOptions(sync, size_in_names)  # ValueError (not cached) for an unusable sync


# --------------------------------------------------------------------------
# The protocol


class _Group:
    __slots__ = ("error", "ids", "md", "messages", "names", "suffixes")

    def __init__(self, md: MaildirTarget, messages: list[Parts]) -> None:
        self.md = md
        self.messages = messages
        self.names: list[str] = []  # in tmp/, in message order
        self.suffixes: list[str] = []  # each name's ",S=...,W=..." part, kept on a re-name
        self.ids: list[MessageId] = []  # in new/: names[i] unless that name was taken
        self.error: OSError | None = None

    def fail(self, exc: OSError, ops: FsOps) -> None:
        """Record the first error and remove the group's not-yet-moved tmp files."""
        if self.error is None:
            self.error = exc
        for name in self.names[len(self.ids) :]:
            try:
                ops.unlink(self.md.tmp_prefix + name)
            except OSError:
                pass
        self.names = self.names[: len(self.ids)]


def commit_batch(
    groups: Sequence[tuple[MaildirTarget, Sequence[Message]]],
    *,
    sync: SyncMode = "auto",
    ops: FsOps = OS_OPS,
    size_in_names: bool = True,
    options: StoreOptions | None = None,
) -> list[list[MessageId] | OSError]:
    """Durably deliver several Maildirs' messages with shared sync steps, in this thread.

    Returns one result per group, in order: its ids (positional) or the
    ``OSError`` that failed it. A failure is confined to the groups it
    concerns: a create, write or move error fails its own group only, in every
    sync form (so a Maildir that is gone, unreadable or no longer a directory
    never fails its neighbours); a failed ``syncfs`` fails every group on that
    file system; a failed directory fsync fails the groups of that directory.
    A sync error is final: it is never retried (after a failed sync the kernel
    may have dropped the data). A name already in ``new/`` is never replaced:
    the message is moved there under another name.

    After a failure, a group's tmp files are removed and ``new/`` holds nothing
    partial. If the failure came after some moves (move or directory-sync
    error), those messages are complete in ``new/`` but were not acknowledged:
    a retry may deliver them twice, never zero times.

    With ``size_in_names`` (the default) each name carries ``,S=<bytes>,W=<bytes
    with CRLF line ends>``, the Maildir++ sizes Dovecot and quota tools read
    without a ``stat`` (see :func:`~delivery_executor.store.names.size_suffix`).

    ``options`` (a :class:`StoreOptions`) may stand for the three keywords.
    Raises ``TypeError``/``ValueError`` for bad bodies or ``sync`` before any
    file is touched. Cost: see the module docstring for the syscalls.
    """
    opts = StoreOptions.of(options, sync, ops, size_in_names)
    return StepDriver(commit_steps(groups, options=opts)).run_here(opts.ops).results


def commit_steps(
    groups: Sequence[tuple[MaildirTarget, Sequence[Message]]],
    *,
    sync: SyncMode = "auto",
    ops: FsOps = OS_OPS,
    size_in_names: bool = True,
    options: StoreOptions | None = None,
) -> CommitSteps:
    """:func:`commit_batch` as a generator that hands each sync to its driver.

    The generator does the page-cache work (open, write, close, rename) itself
    and yields a :data:`SyncCall` wherever the protocol must wait for the disk;
    the driver makes that call (:func:`run_sync_call`) and sends back ``None``
    or the ``OSError`` it raised. Its return value is :func:`commit_batch`'s.
    Messages and ``sync`` are checked here, before the generator exists;
    ``options`` may stand for the three keywords, as in :func:`commit_batch`.
    """
    opts = StoreOptions.of(options, sync, ops, size_in_names)
    work = [_Group(md, [check_message(m) for m in messages]) for md, messages in groups]
    return _steps(work, opts)


class StepDriver:
    """The one driver loop of :func:`commit_steps`, wherever its syncs run.

    ``next_call(outcome)`` sends the previous sync's outcome (``None`` or its
    ``OSError``) and returns the next sync to make, or ``None`` when the batch
    is done; then :attr:`results` holds the per-group results and
    :attr:`syncs` the number of syncs made. A thread drives it with
    ``err = run_sync_call(ops, call)``, the event loop by awaiting the same
    call in a thread pool (see ``LoopWriter``).
    """

    __slots__ = ("_started", "_steps", "results", "syncs")

    def __init__(self, steps: CommitSteps) -> None:
        self._steps = steps
        self._started = False
        self.results: list[list[MessageId] | OSError] = []
        self.syncs = 0

    def next_call(self, outcome: OSError | None = None) -> SyncCall | None:
        """Resume the protocol with the last sync's outcome; the next sync or ``None``."""
        try:
            if self._started:
                self.syncs += 1
                return self._steps.send(outcome)
            self._started = True
            return next(self._steps)
        except StopIteration as done:
            self.results = done.value
            return None

    def run_here(self, ops: FsOps) -> StepDriver:
        """Drive the whole protocol in this thread, each sync through ``ops``; returns self."""
        err: OSError | None = None
        while (call := self.next_call(err)) is not None:
            err = run_sync_call(ops, call)
        return self


def run_sync_call(ops: FsOps, call: SyncCall) -> OSError | None:
    """Make one yielded sync through ``ops``; return its ``OSError`` instead of raising."""
    kind, fd, path = call
    try:
        if isinstance(fd, tuple):  # "writeback": every file's writes queued before any wait
            ops.writeback(fd, path if isinstance(path, tuple) else (path,) * len(fd))
            return None
        assert isinstance(path, str)
        if kind == "fdatasync":
            ops.fdatasync(fd, path)
        elif kind == "fsync_dir":
            ops.fsync_dir(path)
        else:
            ops.syncfs(path, fd)
    except OSError as exc:
        return exc
    return None


def _syncfs_devices(work: list[_Group], sync: str) -> set[int]:
    """The file systems this batch syncs with syncfs (decided before writing: it
    changes step 2); the others get the portable form."""
    per_dev: dict[int, int] = {}
    for g in work:
        per_dev[g.md.dev] = per_dev.get(g.md.dev, 0) + len(g.messages)
    if sync == "auto":
        return {d for d, n in per_dev.items() if n >= AUTO_SYNCFS_MIN_FILES and HAVE_SYNCFS}
    return set(per_dev) if sync == "syncfs" else set()


def _steps(work: list[_Group], options: StoreOptions) -> CommitSteps:
    ops, sizes = options.ops, options.size_in_names
    syncfs_devs = _syncfs_devices(work, options.sync)
    # Per syncfs file system, the first file written there stays open: syncfs
    # runs on it. Opening a directory instead could fail for one broken Maildir
    # (gone, unreadable) and so fail every group on the file system; and an fd
    # opened before the writes also sees writeback errors from then on.
    handles: dict[int, tuple[int, str]] = {}
    # Writeback form: per file system, the files written and still open until
    # their writeback has been waited for (the handle among them), and the
    # file systems where such a wait failed (the rest of the batch there fails).
    held: dict[int, list[tuple[int, str]]] = {
        d: [] for d in _ordered_devices(work, syncfs_devs, options)
    }
    broken: dict[int, OSError] = {}
    # Per file system, the new/ the batch moved a file into last; and the file
    # systems where it wrote duplicate records.
    last_dir: dict[int, str] = {}
    recorded: set[int] = set()
    try:
        # 1-2. Write into tmp/ (fdatasync per file for the portable form).
        for g in work:
            dev = g.md.dev
            keep = handles if dev in syncfs_devs else None
            mine = held.get(dev)
            try:
                for parts in g.messages:
                    if dev in broken:
                        raise broken[dev]
                    suffix = size_suffix(parts) if sizes else ""
                    yield from _write_one(g, parts, suffix, keep, mine, ops)
                    if mine is not None and sum(map(len, held.values())) >= WRITEBACK_CHUNK:
                        yield from _write_back_all(work, held, handles, broken, ops)
            except OSError as exc:
                g.fail(exc, ops)

        # 2. One wait per file system covers every file's data: the writeback
        # form's, or the syncfs form's first syncfs.
        yield from _write_back_all(work, held, handles, broken, ops)
        for dev, (fd, root) in handles.items():
            if dev not in held:
                yield from _sync_dev(work, dev, ("syncfs", fd, root), ops)

        # 2b. Duplicate records (store/seen.py), before the moves: a message
        # in new/ always has its record, even if the process dies right after
        # the move; the sync below covers both. A record whose move never
        # happened is ignored (seen.find checks the file and its Message-ID).
        record_dirs = yield from _write_records(
            work, syncfs_devs, ops, moved=False, recorded=recorded
        )

        # 3. Move into new/, never over an existing name.
        for g in work:
            if g.error is not None:
                continue
            try:
                for name, suffix in zip(g.names, g.suffixes, strict=True):
                    g.ids.append(_move_new(g.md, name, suffix, ops))
            except OSError as exc:
                g.fail(exc, ops)  # keeps the moves made: they count below
            if g.ids:
                last_dir[g.md.dev] = g.md.new_prefix
        # A name taken in new/ (next to never) moved a message under another:
        # its record is written again, naming that one.
        yield from _write_records(work, syncfs_devs, ops, moved=True, recorded=recorded)

        # 4. Make the moves durable: one syncfs per file system or, in the
        # writeback form, one fsync of the new/ moved into last: a journal
        # commits in order, so the commit holding that directory's last change
        # holds every move before it. Not where duplicate records were
        # written: their data was never waited for, and syncfs covers it.
        for dev, (fd, root) in handles.items():
            if dev in held and dev not in recorded:
                if dev in last_dir:
                    yield from _sync_dev(work, dev, ("fsync_dir", -1, last_dir[dev]), ops, fd)
            else:
                yield from _sync_dev(work, dev, ("syncfs", fd, root), ops)
    except GeneratorExit:
        # The driver gave up on the batch (a writer's close timed out): nobody
        # is told these messages were delivered, so their tmp/ files go now.
        for g in work:
            g.fail(OSError(errno.ECANCELED, "batch abandoned", str(g.md.path)), ops)
        raise
    finally:
        kept = {fd for fd, _ in handles.values()}
        for files in held.values():  # left open only when the batch stopped early
            for fd, _ in files:
                if fd not in kept:
                    with contextlib.suppress(OSError):
                        ops.close(fd)
        for fd in kept:
            try:
                ops.close(fd)
            except OSError:
                pass  # its data was synced (or its groups failed) already
    new_dirs: dict[str, list[_Group]] = {}
    for g in work:
        if g.error is None and g.md.dev not in syncfs_devs and g.ids:
            new_dirs.setdefault(g.md.new_prefix, []).append(g)
    for new_dir, members in new_dirs.items():
        err = yield ("fsync_dir", -1, new_dir)
        if err is not None:
            for g in members:
                g.fail(err, ops)
    for record_dir in record_dirs:
        yield ("fsync_dir", -1, record_dir)  # a failure costs a duplicate at most

    return [g.error if g.error is not None else g.ids for g in work]


def _write_records(
    work: list[_Group],
    syncfs_devs: set[int],
    ops: FsOps,
    *,
    moved: bool,
    recorded: set[int],
) -> Generator[SyncCall, OSError | None, list[str]]:
    """Record each message that has a Message-ID, in Maildirs that keep records.

    Before the moves (``moved=False``) a record names the message's intended
    name in ``new/`` (its name in ``tmp/``); after them (``moved=True``) only
    messages moved under another name are recorded again. Each record is
    written under a name of its own and renamed over ``<key>``, so a reader
    sees a whole record or the one before. The portable form syncs each
    record's data here; the caller fsyncs the returned directories. Errors are
    ignored: a missing record costs a duplicate at most. ``recorded`` gains the
    file system of each Maildir that got a record.
    """
    dirs: list[str] = []
    for g in work:
        if g.error is not None or not g.names:
            continue
        where = records_dir(str(g.md.path))  # a cached answer: no syscall, as a rule
        if where is None:
            continue
        if moved:
            todo = [
                (parts, mid.name)
                for parts, name, mid in zip(g.messages, g.names, g.ids, strict=True)
                if mid.name != name
            ]
            if not todo:
                continue
        else:
            todo = list(zip(g.messages, g.names, strict=True))
        portable = g.md.dev not in syncfs_devs
        if portable:
            dirs.append(where)
        for parts, final in todo:
            key = message_key(parts)
            if key is None:
                continue
            tmp = f"{where}tmp.{final}"
            try:
                fd = ops.create(tmp)
            except OSError:
                continue
            err: OSError | None = None
            try:
                ops.write_all(fd, (memoryview(final.encode() + b"\n"),), tmp)
                if portable:
                    err = yield ("fdatasync", fd, tmp)
            except OSError as exc:
                err = exc
            finally:
                with contextlib.suppress(OSError):
                    ops.close(fd)
            try:
                if err is not None:
                    raise err
                ops.rename(tmp, where + key)
                recorded.add(g.md.dev)
            except OSError:
                with contextlib.suppress(OSError):
                    ops.unlink(tmp)
    return dirs


def _write_one(
    g: _Group,
    parts: Parts,
    suffix: str,
    keep: dict[int, tuple[int, str]] | None,
    held: list[tuple[int, str]] | None,
    ops: FsOps,
) -> Generator[SyncCall, OSError | None, None]:
    for _ in range(_EEXIST_RETRIES):
        name = unique_name() + suffix
        path = g.md.tmp_prefix + name
        try:
            fd = ops.create(path)
        except FileExistsError:
            continue
        first = not g.names
        g.names.append(name)  # from here on, failure must unlink it
        g.suffixes.append(suffix)
        close = True
        try:
            if first and ops.device(fd, path) != g.md.dev:
                # A file system mounted over (or from under) the Maildir since it
                # was opened: its syncs would go to the wrong one.
                raise OSError(errno.ESTALE, _STALE, path)
            if g.md.owner is not None:  # root delivering into a user's Maildir
                ops.fchown(fd, g.md.owner[0], g.md.owner[1], path)
            ops.write_all(fd, parts, path)
            if keep is None:
                err = yield ("fdatasync", fd, path)
                if err is not None:
                    raise err
            else:
                if g.md.dev not in keep:
                    keep[g.md.dev] = (fd, str(g.md.path))  # the file system's syncfs handle
                    close = False
                if held is not None:  # the writeback form: open until its wait
                    held.append((fd, path))
                    close = False
        finally:
            if close:
                ops.close(fd)
        return
    raise FileExistsError(errno.EEXIST, "no unique name after retries", g.md.tmp_prefix)


def _move_new(md: MaildirTarget, name: str, suffix: str, ops: FsOps) -> MessageId:
    # O_EXCL guards tmp/ only: a plain rename would replace a message already
    # in new/ under the same name. On a collision, pick another name.
    src = md.tmp_prefix + name
    final = name
    for _ in range(_EEXIST_RETRIES):
        try:
            # md.info is ":2,<flags>" for a with_flags view (new_prefix is then cur/).
            ops.rename_noreplace(src, md.new_prefix + final + md.info)
            return MessageId(final)
        except FileExistsError:
            final = unique_name() + suffix
    raise FileExistsError(
        errno.EEXIST, "no unique name in new/ after retries", src, None, md.new_prefix
    )


def _ordered_devices(work: list[_Group], syncfs_devs: set[int], options: StoreOptions) -> set[int]:
    """The syncfs file systems whose batch takes the writeback form (``"auto"`` only):
    every Maildir there says the file system orders it, and the batch puts at
    most :data:`WRITEBACK_MAX_BYTES` there."""
    if options.sync != "auto":
        return set()
    out = set(syncfs_devs)
    size: dict[int, int] = {}
    for g in work:
        # getattr: a MaildirTarget written before `ordered` existed stays on two syncfs.
        if not getattr(g.md, "ordered", False):
            out.discard(g.md.dev)
        elif g.md.dev in out:
            size[g.md.dev] = size.get(g.md.dev, 0) + sum(
                p.nbytes for parts in g.messages for p in parts
            )
    return {d for d in out if size.get(d, 0) <= WRITEBACK_MAX_BYTES}


def _write_back_all(
    work: list[_Group],
    held: dict[int, list[tuple[int, str]]],
    handles: dict[int, tuple[int, str]],
    broken: dict[int, OSError],
    ops: FsOps,
) -> Generator[SyncCall, OSError | None, None]:
    """Wait for the writeback of every held file, one call per file system; close them
    (not the syncfs handles). A failed wait fails every live group on that file
    system, as a failed syncfs does, and is noted in ``broken``."""
    for dev, files in held.items():
        if not files:
            continue
        handle = handles[dev][0]
        fds = tuple(fd for fd, _ in files)
        paths = tuple(path for _, path in files)
        files.clear()
        try:
            live = _live(work, dev)
            if live:
                err = yield ("writeback", fds, paths)
                if err is not None:
                    broken[dev] = err
                    for g in live:
                        g.fail(err, ops)
        finally:
            for fd in fds:
                if fd != handle:
                    with contextlib.suppress(OSError):
                        ops.close(fd)


def _live(work: list[_Group], dev: int) -> list[_Group]:
    """The groups on file system ``dev`` that a sync there still concerns."""
    return [g for g in work if g.md.dev == dev and g.error is None and g.names]


def _sync_dev(
    work: list[_Group], dev: int, call: SyncCall, ops: FsOps, handle: int = -1
) -> Generator[SyncCall, OSError | None, None]:
    """Make ``call``, the sync covering file system ``dev``, unless no group there is
    live; its failure fails every live group there.

    A directory fsync whose directory cannot be opened (one Maildir removed,
    moved or unreadable since its moves) falls back to a ``syncfs`` on
    ``handle``, a file held open since the writes: one broken Maildir must
    not fail its neighbours.
    """
    live = _live(work, dev)
    if not live:
        return
    err = yield call
    if err is not None and call[0] == "fsync_dir" and err.errno in _OPEN_ERRORS:
        err = yield ("syncfs", handle, str(live[0].md.path))
    if err is not None:
        for g in live:
            g.fail(err, ops)
