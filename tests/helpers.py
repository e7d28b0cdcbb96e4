"""Helpers that tests import: syscall recorders, real small file systems, servers, polling.

Fixtures stay in ``conftest.py``; what a test calls by name lives here, so that
no test module imports from ``conftest``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import pytest

from delivery_executor import DeliveryExecutor, fsops
from delivery_executor.fsops import FsOps
from delivery_executor.smtp import DeliveryHandler, SessionFactory
from delivery_executor.userdb import UserdbResolver


def self_signed(openssl: str, directory: Path, name: str = "c") -> tuple[Path, Path]:
    """A throwaway self-signed certificate for localhost and its key, made by ``openssl``."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
         "-days", "2", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


async def until(cond: Callable[[], object], what: str, limit: float = 10.0) -> None:
    """Yield to the loop until ``cond()`` holds; fail naming ``what`` after ``limit`` s."""
    try:
        async with asyncio.timeout(limit):
            # Polling on purpose: the conditions change in other threads or processes.
            while not cond():  # noqa: ASYNC110
                await asyncio.sleep(0.001)
    except TimeoutError:
        raise AssertionError(f"not within {limit} s: {what}") from None


# -- syscall recording and fault injection through the store's FsOps seam


class RecordingOps(FsOps):
    """Real syscalls, with each one appended to ``calls`` as ``(op, path, ...)``."""

    __slots__ = ("calls", "fail")

    def __init__(self, fail: Callable[[str, str], OSError | None] | None = None) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.fail = fail

    def _rec(self, op: str, path: str, *extra: str) -> None:
        self.calls.append((op, path, *extra))
        if self.fail is not None:
            exc = self.fail(op, path)
            if exc is not None:
                raise exc

    def create(self, path: str) -> int:
        self._rec("create", path)
        return super().create(path)

    def write_all(self, fd: int, parts: Sequence[memoryview], path: str) -> None:
        self._rec("write", path)
        super().write_all(fd, parts, path)

    def mkdir(self, path: str) -> None:
        self._rec("mkdir", path)
        super().mkdir(path)

    def fdatasync(self, fd: int, path: str) -> None:
        self._rec("fdatasync", path)
        super().fdatasync(fd, path)

    def rename(self, src: str, dst: str) -> None:
        self._rec("rename", src, dst)
        super().rename(src, dst)

    def renameat2(self, src: str, dst: str) -> None:
        self._rec("rename", src, dst)
        super().renameat2(src, dst)

    def link(self, src: str, dst: str) -> None:
        self._rec("link", src, dst)
        super().link(src, dst)

    def unlink(self, path: str) -> None:
        self._rec("unlink", path)
        super().unlink(path)

    def fsync_dir(self, path: str) -> None:
        self._rec("fsync_dir", path)
        super().fsync_dir(path)

    def syncfs(self, path: str, fd: int = -1) -> None:
        self._rec("syncfs", path)
        super().syncfs(path, fd)

    def start_writeback(self, fd: int, path: str) -> None:
        self._rec("start_writeback", path)
        super().start_writeback(fd, path)

    def wait_writeback(self, fd: int, path: str) -> None:
        self._rec("wait_writeback", path)
        super().wait_writeback(fd, path)


# -- real small file systems (root only)


def _is_root() -> bool:
    return os.geteuid() == 0


@contextlib.contextmanager
def mounted_tmpfs(size: str, *, readonly: bool = False) -> Iterator[Path]:
    """Mount a fresh tmpfs of ``size`` and unmount it afterwards; skip if we cannot."""
    if not _is_root():
        pytest.skip("mounting a tmpfs needs root")
    where = Path(tempfile.mkdtemp(prefix="de-tmpfs-"))
    opts = f"size={size},mode=0755" + (",ro" if readonly else "")
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True
    )
    if res.returncode != 0:
        where.rmdir()
        pytest.skip(f"cannot mount tmpfs: {res.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        where.rmdir()


def files_in(directory: Path) -> list[str]:
    """Names in ``directory``, sorted."""
    return sorted(os.listdir(directory))


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (a /proc scan: the writer helpers of a serve)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat_line = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat_line.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


@contextlib.asynccontextmanager
async def listening(factory: SessionFactory, executor: DeliveryExecutor) -> AsyncIterator[int]:
    """``factory`` served on 127.0.0.1:<ephemeral>; yields the port. Afterwards closes
    the sessions still open (421), the server and ``executor``."""
    srv = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    try:
        yield srv.sockets[0].getsockname()[1]
    finally:
        srv.close()
        for guard in list(factory.sessions):
            guard.close("421 4.3.2 Test over")
        await srv.wait_closed()
        await executor.aclose()


@contextlib.asynccontextmanager
async def userdb_lmtp(resolver: UserdbResolver) -> AsyncIterator[int]:
    """An LMTP server on 127.0.0.1 resolving through ``resolver``; yields the port, then
    closes it, its executor and the resolver's user databases."""
    ex = DeliveryExecutor()
    loop = asyncio.get_running_loop()
    factory = SessionFactory(DeliveryHandler(ex, resolver), lmtp=True, max_connections=8, loop=loop)
    async with listening(factory, ex) as port:
        yield port
    await resolver.aclose()


def spy_c_writeback(monkeypatch: pytest.MonkeyPatch, path: str = "c") -> list[tuple[int, ...]]:
    """Route ``FsOps.writeback`` through its C call, recording each call's fds, or, for
    ``path="python"``, through the per-file calls; skips where the C helpers are off."""
    calls: list[tuple[int, ...]] = []
    if path == "python":
        monkeypatch.setattr(fsops, "_WRITEBACK_ALL", None)
        return calls
    real = fsops._WRITEBACK_ALL
    if real is None:
        pytest.skip("C helpers off")

    def spy(fds: Sequence[int]) -> tuple[int, int] | None:
        calls.append(tuple(fds))
        return real(fds)

    monkeypatch.setattr(fsops, "_WRITEBACK_ALL", spy)
    return calls
