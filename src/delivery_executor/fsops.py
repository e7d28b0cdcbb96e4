"""The file-system calls the store makes, behind one small seam.

Every syscall that matters for durability goes through an :class:`FsOps`
instance. Production code uses :data:`OS_OPS`; tests pass a recording or
fault-injecting subclass, so the code path that is checked is the real one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import sys
from collections.abc import Callable, Sequence

from ._native import speedups

__all__ = ["HAVE_SYNCFS", "HAVE_WRITEBACK", "OS_OPS", "FsOps", "orders_writeback"]

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)
_O_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


_FS_ENCODING = sys.getfilesystemencoding()
_FS_ERRORS = sys.getfilesystemencodeerrors()
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
# renameat2 errors that mean "not here": no such syscall, or a file system
# that does not implement RENAME_NOREPLACE (some FUSE and network ones).
_NOREPLACE_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


def _libc_fn(name: str, argtypes: list[type]) -> Callable[..., int] | None:
    # Python has no os.syncfs or os.renameat2; libc's are reachable through
    # ctypes. CDLL (not PyDLL) releases the GIL for the duration of the call.
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = getattr(libc, name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_SYNCFS = _libc_fn("syncfs", [ctypes.c_int])
HAVE_SYNCFS: bool = _SYNCFS is not None
"""True where ``syncfs(2)`` is available (Linux with glibc or musl)."""
_SYNC_FILE_RANGE = _libc_fn(
    "sync_file_range", [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
)
HAVE_WRITEBACK: bool = _SYNC_FILE_RANGE is not None
"""True where ``sync_file_range(2)`` is available (Linux)."""
_SFR_WAIT_BEFORE, _SFR_WRITE, _SFR_WAIT_AFTER = 1, 2, 4
# All of a batch's sync_file_range calls in one C call, the GIL released once
# (Linux, with the C helpers built); see FsOps.writeback.
_WRITEBACK_ALL: Callable[[Sequence[int]], tuple[int, int] | None] | None = getattr(
    speedups, "writeback", None
)
_RENAMEAT2 = _libc_fn(
    "renameat2", [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
)


class FsOps:
    """Thin wrappers over the syscalls of a delivery; override to trace or fail.

    Each method raises ``OSError`` with ``errno`` and ``filename`` set, exactly
    as the ``os`` function it wraps.
    """

    __slots__ = ()

    def create(self, path: str) -> int:
        """``open(path, O_WRONLY|O_CREAT|O_EXCL|O_CLOEXEC, 0o600)``."""
        return os.open(path, _O_NEW, 0o600)

    def write_all(self, fd: int, parts: Sequence[memoryview], path: str) -> None:
        """``write(2)``/``writev(2)`` until every byte of ``parts`` is written, in order.

        Short writes are retried from where they stopped.
        """
        try:
            if len(parts) == 1:
                data = parts[0]
                done, total = 0, data.nbytes
                while done < total:
                    done += os.write(fd, data[done:])
                return
            pending = [p for p in parts if p.nbytes]
            while pending:
                n = os.writev(fd, pending)
                while pending and n >= pending[0].nbytes:
                    n -= pending.pop(0).nbytes
                if n:
                    pending[0] = pending[0][n:]
        except OSError as exc:
            raise _with_path(exc, path) from None

    def fdatasync(self, fd: int, path: str) -> None:
        """``fdatasync(2)``: the file's data and the metadata needed to read it."""
        try:
            os.fdatasync(fd)
        except OSError as exc:
            raise _with_path(exc, path) from None

    def fchown(self, fd: int, uid: int, gid: int, path: str) -> None:
        """``fchown(2)``: give a new file to its Maildir's owner (when running as root)."""
        try:
            os.fchown(fd, uid, gid)
        except OSError as exc:
            exc.filename = path
            raise

    def mkdir(self, path: str) -> None:
        """``mkdir(path, 0o700)``; the caller fsyncs the parent to make it durable."""
        os.mkdir(path, 0o700)

    def close(self, fd: int) -> None:
        """``close(2)``."""
        os.close(fd)

    def rename(self, src: str, dst: str) -> None:
        """``rename(2)``, atomic within one file system; replaces ``dst`` if it exists."""
        os.rename(src, dst)

    def rename_noreplace(self, src: str, dst: str) -> None:
        """Move ``src`` to ``dst``; ``FileExistsError`` (and no change) if ``dst`` exists.

        :meth:`renameat2` with ``RENAME_NOREPLACE`` (Linux >= 3.15, ext4, XFS,
        btrfs, tmpfs); where the kernel or the file system lacks it, or off
        Linux, :meth:`link` then :meth:`unlink` of ``src``, which also never
        replaces. A crash between those two leaves the file under both names
        (the ``tmp/`` one is removed later by ``cleanup_tmp``). There, each
        call costs a failed ``renameat2`` and one syscall more; a file system
        with neither (no hard links) fails the move. The error carries
        ``filename=src`` and ``filename2=dst``, as ``os.rename``'s do.
        """
        if _RENAMEAT2 is not None:
            try:
                self.renameat2(src, dst)
                return
            except OSError as exc:
                if exc.errno not in _NOREPLACE_UNSUPPORTED:
                    raise
        self.link(src, dst)
        self.unlink(src)

    def renameat2(self, src: str, dst: str) -> None:
        """``renameat2(AT_FDCWD, src, AT_FDCWD, dst, RENAME_NOREPLACE)``.

        ``OSError(ENOSYS)`` where libc has no ``renameat2``; ``EINVAL`` from a
        file system without ``RENAME_NOREPLACE``.
        """
        if _RENAMEAT2 is None:
            raise OSError(errno.ENOSYS, "renameat2 is not available here", src, None, dst)
        # str.encode as os.fsencode does it, without its two Python-level calls per name.
        a, b = src.encode(_FS_ENCODING, _FS_ERRORS), dst.encode(_FS_ENCODING, _FS_ERRORS)
        if _RENAMEAT2(_AT_FDCWD, a, _AT_FDCWD, b, _RENAME_NOREPLACE):
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), src, None, dst)

    def link(self, src: str, dst: str) -> None:
        """``link(2)``: a second name for ``src``; ``FileExistsError`` if ``dst`` exists."""
        os.link(src, dst)

    def unlink(self, path: str) -> None:
        """``unlink(2)``."""
        os.unlink(path)

    def fsync_dir(self, path: str) -> None:
        """``open(path, O_DIRECTORY)`` + ``fsync(2)`` + ``close``: persists its entries."""
        fd = os.open(path, _O_DIR)
        try:
            os.fsync(fd)
        except OSError as exc:
            raise _with_path(exc, path) from None
        finally:
            os.close(fd)

    def syncfs(self, path: str, fd: int = -1) -> None:
        """``syncfs(2)``: all dirty data and metadata of one file system.

        The file system is that of ``fd``, any open file on it (the store
        passes a file it created, so no open can fail here), or with ``fd=-1``
        that of the directory ``path``, opened for the call. ``path`` names the
        file system in errors. Raises ``OSError(ENOSYS)`` where syncfs is not
        available.
        """
        if _SYNCFS is None:
            raise OSError(errno.ENOSYS, "syncfs is not available on this platform", path)
        own = fd < 0
        if own:
            fd = os.open(path, _O_DIR)
        try:
            if _SYNCFS(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err), path)
        finally:
            if own:
                os.close(fd)

    def device(self, fd: int, path: str) -> int:
        """``fstat(fd).st_dev``: the file system an open file is on."""
        try:
            return os.fstat(fd).st_dev
        except OSError as exc:
            raise _with_path(exc, path) from None

    def start_writeback(self, fd: int, path: str) -> None:
        """``sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)``: start writing the data out.

        Returns once the writes are queued (ext4 and XFS allocate the blocks
        then); durable is only what a later sync or journal commit covers.
        """
        self._sync_file_range(fd, _SFR_WRITE, path)

    def wait_writeback(self, fd: int, path: str) -> None:
        """``sync_file_range(fd, 0, 0, WAIT_BEFORE|WRITE|WAIT_AFTER)``: every dirty page written.

        Returns when the device has completed the writes (they may still sit
        in its volatile cache: the next journal commit or ``syncfs`` flushes
        it); raises the writeback error (``EIO``, ``ENOSPC``) if one happened.
        """
        self._sync_file_range(fd, _SFR_WAIT_BEFORE | _SFR_WRITE | _SFR_WAIT_AFTER, path)

    def writeback(self, fds: Sequence[int], paths: Sequence[str]) -> None:
        """:meth:`start_writeback` on every file, then :meth:`wait_writeback` on each.

        The first failure raises, naming its file (``paths[i]`` for
        ``fds[i]``), and no later call is made. With the C helpers built and
        both per-file methods as defined here, all 2N calls are one C call
        that releases the GIL once: a thread making them one by one must win
        the GIL back after each from an event loop that may be busy: 540
        against 355 µs for 16 files in the executor's sync thread here, while
        the loop wrote the next batch (BUDGETS.md). An override of either
        method or of the syscall wrapper under both (to trace or to fail), on
        a subclass, on this class or on the instance, gets them one by one.
        ``ValueError`` if ``fds`` and ``paths`` differ in length.
        """
        # Looked up on the instance, as the per-file path would look them up.
        if (
            _WRITEBACK_ALL is not None
            and _SYNC_FILE_RANGE is _LIBC_SYNC_FILE_RANGE
            and getattr(self.start_writeback, "__func__", None) is _STOCK_START
            and getattr(self.wait_writeback, "__func__", None) is _STOCK_WAIT
            and self._sync_file_range is _STOCK_SYNC_FILE_RANGE
        ):
            if len(fds) != len(paths):
                raise ValueError("writeback: fds and paths differ in length")
            failed = _WRITEBACK_ALL(fds)
            if failed is not None:
                i, err = failed
                raise OSError(err, os.strerror(err), paths[i])
            return
        for fd, path in zip(fds, paths, strict=True):
            self.start_writeback(fd, path)
        for fd, path in zip(fds, paths, strict=True):
            self.wait_writeback(fd, path)

    @staticmethod
    def _sync_file_range(fd: int, flags: int, path: str) -> None:
        if _SYNC_FILE_RANGE is None:
            raise OSError(errno.ENOSYS, "sync_file_range is not available on this platform", path)
        while _SYNC_FILE_RANGE(fd, 0, 0, flags) != 0:
            err = ctypes.get_errno()
            if err != errno.EINTR:  # a signal is no failure (PEP 475), here as in the C call
                raise OSError(err, os.strerror(err), path)


# The per-file calls and the syscall as defined above: FsOps.writeback takes
# its C path only while an instance still has these (a patch counts as an override).
_STOCK_START = FsOps.start_writeback
_STOCK_WAIT = FsOps.wait_writeback
_STOCK_SYNC_FILE_RANGE = FsOps._sync_file_range
_LIBC_SYNC_FILE_RANGE = _SYNC_FILE_RANGE


def orders_writeback(path: str) -> bool:
    """Whether the file system of ``path`` journals a rename after the data written before it.

    True for ext4 (or ext3) with a journal and for XFS, mounted with write barriers and
    no ``journal_async_commit``: there, once :meth:`FsOps.wait_writeback` has
    returned, the block allocation, size and unwritten-extent conversion of
    that data are in the journal before any later rename, and a journal
    commit flushes the device cache before its commit block: no crash can
    keep the rename without the data (checked by a power-loss test on a
    recorded device: ``tests/test_power_loss.py``). False for everything else
    (tmpfs, btrfs, ext4 without a journal, network file systems), and
    wherever ``/proc`` or ``sync_file_range`` is missing or the answer unclear.

    Cost: one ``stat`` and a read of ``/proc/self/mountinfo`` (about 0.1 ms here);
    callers keep the answer (a :class:`~delivery_executor.store.Maildir` does).
    """
    if _SYNC_FILE_RANGE is None or _SYNCFS is None:
        return False
    try:
        st = os.stat(path)
        want = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if len(fields) < 10 or fields[2] != want or "-" not in fields:
            continue
        rest = fields[fields.index("-") + 1 :]
        if len(rest) < 3:
            return False
        fstype, options = rest[0], set(fields[5].split(",") + rest[2].split(","))
        if options & {"nobarrier", "barrier=0", "journal_async_commit"}:
            return False
        if fstype == "xfs":
            return True
        if fstype in ("ext4", "ext3"):  # ext3 is mounted by the ext4 driver
            # A journal shows as /proc/fs/jbd2/<block device>-8 while mounted (an
            # external journal is named after its own device: taken as unknown).
            try:
                dev = os.path.basename(os.path.realpath(f"/sys/dev/block/{want}"))
            except OSError:
                return False
            return os.path.isdir(f"/proc/fs/jbd2/{dev}-8")
        return False
    return False


def _with_path(exc: OSError, path: str) -> OSError:
    # os.fsync/fdatasync errors carry no filename; callers need to know which file.
    return OSError(exc.errno, exc.strerror, path)


OS_OPS = FsOps()
"""The real syscalls; the default for every store function."""
