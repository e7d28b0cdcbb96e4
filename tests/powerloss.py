"""Power loss on a real kernel file system: record a disk's writes and flushes, replay crashes.

This machine's kernel has no device-mapper (so no ``dm-log-writes``), but it
has FUSE and loop devices. A loop device whose backing file lives on a small
FUSE file system of ours sends us every block write and every cache flush the
file system above it issues (the loop driver turns a ``FLUSH`` into an
``fsync`` of its backing file, and FUA into write + flush). The daemon
(``python -m tests.powerloss IMAGE MOUNTPOINT LOG``, one thread, so requests
are logged in the order they arrive) applies each write to the image and
appends it to a log; a test can put a *mark* in the same log (a ``stat`` of
``/mark.<label>``), e.g. "batch 3 was acknowledged".

A power loss at some point of the log leaves the device holding every write
acknowledged before its last flush, and any subset of the writes since (a
volatile cache keeps no order). :meth:`Recording.states` builds such images
from the file system as it was made (before mount) and the log:
every flush point with all or none of the writes after it, and random subsets
in between. :func:`mounted` mounts one (ext4 and XFS replay their journal
there) for the test to check.

Needs root, ``libfuse2`` and ``fusepy`` (``pip install fusepy``), ``losetup``
and ``mkfs.ext4``/``mkfs.xfs``; :func:`recorder` skips the test otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

_HEAD = struct.Struct("<cQI")  # kind, offset, length
_MKFS = {
    "ext4": ["mkfs.ext4", "-q", "-F"],
    "ext4-fast_commit": ["mkfs.ext4", "-q", "-F", "-O", "fast_commit"],
    "xfs": ["mkfs.xfs", "-q", "-f"],
}
_SIZE = {"ext4": 64 << 20, "ext4-fast_commit": 64 << 20, "xfs": 320 << 20}  # xfs: >= 300 MiB


@dataclass
class Entry:
    kind: bytes  # b"W" write, b"F" flush, b"M" mark
    offset: int = 0
    data: bytes = b""  # a write's bytes, or a mark's label


@dataclass
class Recording:
    """The file system as made (``base``) and what the device saw afterwards (``log``)."""

    base: Path
    fs: str
    log: list[Entry] = field(default_factory=list)

    def marks_before(self, end: int) -> list[str]:
        return [e.data.decode() for e in self.log[:end] if e.kind == b"M"]

    def states(self, *, seed: int = 0, subsets: int = 1) -> Iterator[tuple[str, int, list[int]]]:
        """Crash states: ``(name, end, writes)``: the log entries persisted, crash at ``end``.

        For every flush: everything before it (the flush completed), and the
        writes before the previous flush only (it never came); plus
        ``subsets`` random subsets of the writes between the two. Marks
        before ``end`` were made, so what they acknowledged must be there.
        """
        rng = random.Random(seed)
        flushes = [i for i, e in enumerate(self.log) if e.kind == b"F"] + [len(self.log)]
        prev = 0
        for k, f in enumerate(flushes):
            durable = [i for i in range(prev) if self.log[i].kind == b"W"]
            between = [i for i in range(prev, f) if self.log[i].kind == b"W"]
            yield f"flush {k} done", f, durable + between
            if between:
                yield f"flush {k} lost", f, durable
                for s in range(subsets):
                    part = [i for i in between if rng.random() < 0.5]
                    yield f"flush {k} torn {s}", f, durable + part
            prev = f

    def image(self, writes: list[int], into: Path) -> Path:
        """The base image with ``writes`` (log indices, applied in order) at ``into``."""
        subprocess.run(["cp", "--sparse=always", str(self.base), str(into)], check=True)
        fd = os.open(into, os.O_WRONLY)
        try:
            for i in writes:
                e = self.log[i]
                os.pwrite(fd, e.data, e.offset)
        finally:
            os.close(fd)
        return into


def read_log(path: Path) -> list[Entry]:
    out: list[Entry] = []
    data = path.read_bytes()
    at = 0
    while at < len(data):
        kind, offset, n = _HEAD.unpack_from(data, at)
        at += _HEAD.size
        out.append(Entry(kind, offset, data[at : at + n]))
        at += n
    return out


def _run(*cmd: str) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {res.stderr.strip() or res.stdout.strip()}")
    return res.stdout.strip()


def missing(fs: str) -> str | None:
    """Why a recording on ``fs`` cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (loop devices, mounts)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    for tool in ("losetup", _MKFS[fs][0]):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    try:
        import fuse  # noqa: F401
    except (ImportError, OSError) as exc:
        return f"fusepy/libfuse2 unusable: {exc}"
    return None


class Recorder:
    """A mounted ``fs`` whose device's writes and flushes are being recorded."""

    def __init__(self, work: Path, fs: str) -> None:
        self.work = work
        self.fs = fs
        self.root = work / "fs"
        self._fuse = work / "fuse"
        self._log = work / "log"
        self._daemon: subprocess.Popen[bytes] | None = None
        self._loop = ""
        self.recording: Recording | None = None  # set by stop()

    def start(self) -> None:
        img = self.work / "disk.img"
        with open(img, "wb") as f:
            f.truncate(_SIZE[self.fs])
        _run(*_MKFS[self.fs], str(img))
        shutil.copyfile(img, self.work / "base.img")
        self._fuse.mkdir()
        self.root.mkdir()
        self._daemon = subprocess.Popen(
            [sys.executable, "-m", "tests.powerloss", str(img), str(self._fuse), str(self._log)],
            cwd=Path(__file__).resolve().parent.parent,
        )
        deadline = time.monotonic() + 20
        while not (self._fuse / "disk").exists():
            if self._daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the recording FUSE daemon did not come up")
            time.sleep(0.02)
        self._loop = _run("losetup", "-f", "--show", str(self._fuse / "disk"))
        _run("mount", self._loop, str(self.root))

    def mark(self, label: str) -> None:
        """Put ``label`` in the log, after every flush that has completed."""
        with contextlib.suppress(FileNotFoundError):
            os.stat(self._fuse / f"mark.{label}")

    def stop(self) -> Recording:
        """Unmount everything (idempotent); the recording, also kept as ``.recording``."""
        if self.recording is not None:
            return self.recording
        if self._loop:
            subprocess.run(["umount", str(self.root)], check=False)
            subprocess.run(["losetup", "-d", self._loop], check=False)
            self._loop = ""
        if self._daemon is not None:
            subprocess.run(["umount", str(self._fuse)], check=False)
            try:
                self._daemon.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._daemon.kill()
                self._daemon.wait()
            self._daemon = None
        log = read_log(self._log) if self._log.exists() else []
        self.recording = Recording(self.work / "base.img", self.fs, log)
        return self.recording


@contextlib.contextmanager
def recorder(fs: str) -> Iterator[Recorder]:
    """A fresh ``fs`` (``"ext4"`` or ``"xfs"``) on a recorded device, mounted at ``.root``.

    On exit everything is unmounted and ``.recording`` set; :func:`cleanup`
    removes the work directory (images and log) once the states are checked.
    """
    work = Path(tempfile.mkdtemp(prefix="de-powerloss-", dir="/var/tmp"))
    rec = Recorder(work, fs)
    try:
        rec.start()
        yield rec
    finally:
        rec.stop()


def cleanup(rec: Recorder) -> None:
    """Remove a finished recorder's work directory (images and log)."""
    rec.stop()
    shutil.rmtree(rec.work, ignore_errors=True)


@contextlib.contextmanager
def mounted(recording: Recording, writes: list[int], work: Path) -> Iterator[Path]:
    """The crash image with ``writes`` applied, mounted (journal replayed) at a fresh dir."""
    img = recording.image(writes, work / "crash.img")
    where = work / "crash"
    where.mkdir(exist_ok=True)
    dev = _run("losetup", "-f", "--show", str(img))
    try:
        _run("mount", dev, str(where))
        try:
            yield where
        finally:
            subprocess.run(["umount", str(where)], check=False)
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
        img.unlink()


# --------------------------------------------------------------------------
# The daemon


def _daemon(image: str, mountpoint: str, log_path: str) -> None:
    from fuse import FUSE, FuseOSError, Operations

    size = os.path.getsize(image)
    fd = os.open(image, os.O_RDWR)
    log = open(log_path, "wb")  # noqa: SIM115 - open for the daemon's life

    def record(kind: bytes, offset: int = 0, data: bytes = b"") -> None:
        log.write(_HEAD.pack(kind, offset, len(data)))
        log.write(data)

    class Disk(Operations):  # type: ignore[misc]
        def getattr(self, path: str, fh: object = None) -> dict[str, int]:
            if path == "/":
                return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}
            if path == "/disk":
                return {"st_mode": stat.S_IFREG | 0o600, "st_nlink": 1, "st_size": size}
            if path.startswith("/mark."):
                record(b"M", 0, path[6:].encode())
                log.flush()
            raise FuseOSError(errno.ENOENT)

        def readdir(self, path: str, fh: object) -> list[str]:
            return [".", "..", "disk"]

        def open(self, path: str, flags: int) -> int:
            return 0

        def read(self, path: str, n: int, offset: int, fh: object) -> bytes:
            return os.pread(fd, n, offset)

        def write(self, path: str, data: bytes, offset: int, fh: object) -> int:
            os.pwrite(fd, data, offset)
            record(b"W", offset, bytes(data))
            return len(data)

        def truncate(self, path: str, length: int, fh: object = None) -> None:
            raise FuseOSError(errno.EPERM)

        def fsync(self, path: str, datasync: int, fh: object) -> int:
            record(b"F")
            log.flush()
            return 0

        def flush(self, path: str, fh: object) -> int:
            return 0

    try:
        FUSE(Disk(), mountpoint, foreground=True, nothreads=True, direct_io=True)
    finally:
        log.close()
        os.close(fd)


if __name__ == "__main__":
    _daemon(*sys.argv[1:4])
