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

__all__ = ["HAVE_SYNCFS", "OS_OPS", "FsOps"]

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)
_O_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


def _load_syncfs() -> Callable[[int], int] | None:
    # Python has no os.syncfs; libc's is reachable through ctypes. CDLL (not
    # PyDLL) releases the GIL for the duration of the call.
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_SYNCFS = _load_syncfs()
HAVE_SYNCFS: bool = _SYNCFS is not None
"""True where ``syncfs(2)`` is available (Linux with glibc or musl)."""


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

    def mkdir(self, path: str) -> None:
        """``mkdir(path, 0o700)``; the caller fsyncs the parent to make it durable."""
        os.mkdir(path, 0o700)

    def close(self, fd: int) -> None:
        """``close(2)``."""
        os.close(fd)

    def rename(self, src: str, dst: str) -> None:
        """``rename(2)``, atomic within one file system."""
        os.rename(src, dst)

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

    def syncfs(self, path: str) -> None:
        """``syncfs(2)`` on the file system holding ``path``: all its dirty data and metadata.

        Raises ``OSError(ENOSYS)`` where syncfs is not available.
        """
        if _SYNCFS is None:
            raise OSError(errno.ENOSYS, "syncfs is not available on this platform", path)
        fd = os.open(path, _O_DIR)
        try:
            if _SYNCFS(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err), path)
        finally:
            os.close(fd)


def _with_path(exc: OSError, path: str) -> OSError:
    # os.fsync/fdatasync errors carry no filename; callers need to know which file.
    return OSError(exc.errno, exc.strerror, path)


OS_OPS = FsOps()
"""The real syscalls; the default for every store function."""
