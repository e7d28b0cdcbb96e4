"""A crash-state checker for Maildir delivery protocols (after ALICE and CrashMonkey).

``TraceOps`` records what the store does through its ``FsOps`` seam (the real
code path runs, and really writes). ``violations`` then replays the trace under
a conservative Linux persistence model and enumerates every crash state:

- a crash may happen after any prefix of the trace;
- a write or rename not yet covered by a sync may be lost or may persist,
  each independently of the others;
- ``fdatasync(f)`` persists the data written to ``f`` before it;
- ``fsync(dir)`` persists the entries (creates, renames into it) made before it;
- ``syncfs`` persists everything before it on its file system (``Op.dev``,
  which ``TraceOps`` records; a hand-made log may leave it 0 for one file system);
- ``wait_writeback(f)`` (``sync_file_range`` with both waits) persists
  nothing by itself; with ``ordered`` (True, or the ``Op.dev`` values of the
  file systems that have a journal that commits a rename after the data
  written back before it: ext4 with a journal, XFS, as
  ``tests/test_power_loss.py`` checks on a real device) a file written back
  before its move is whole whenever the move persists, and ``fsync(dir)``
  persists, beside its own entries, every entry made on its file system
  before the directory's last change (one journal, committed in order);
- ``mkdir(d)`` makes a directory entry like any other: it persists only with
  an ``fsync`` of ``d``'s parent or a ``syncfs`` after it, and if it is lost,
  everything under ``d`` is lost with it (a first delivery into a brand-new
  Maildir);
- ``link(src, dst)`` (the fallback of ``rename_noreplace``) makes the entry
  ``dst`` for ``src``'s file, exactly as a rename would; the ``unlink(src)``
  after it touches ``tmp/`` only, so a crash between the two leaves the message
  under both names, never under none.

A file whose rename into ``new/`` persisted but whose data did not is the
ext4/XFS delayed-allocation outcome: a name with empty or partial content.

For each crash state it checks two things: every message acknowledged before
the crash point is in ``new/`` with its full bytes, and no file in ``new/`` is
partial.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TypeAlias

from delivery_executor.fsops import FsOps

Ordered: TypeAlias = "bool | Collection[int]"
"""Which file systems (``Op.dev``) order writeback before a later move: all (True),
none (False) or those listed."""


@dataclass(frozen=True)
class Op:
    kind: str  # create|write|fdatasync|wait_writeback|mkdir|rename|link|fsync_dir|syncfs|unlink|ack
    path: str = ""
    path2: str = ""
    data: bytes = b""
    dev: int = 0  # the file system it touched (TraceOps fills it in; 0 for all in hand-made logs)


class TraceOps(FsOps):
    """Real syscalls, recorded as :class:`Op` (writes with their bytes)."""

    __slots__ = ("_paths", "log")

    def __init__(self) -> None:
        self.log: list[Op] = []
        self._paths: dict[int, str] = {}  # open fd -> the file it was created as

    def _add(self, op: Op) -> None:
        where = op.path if op.kind in ("fsync_dir", "syncfs") else os.path.dirname(op.path)
        try:
            dev = os.stat(where).st_dev
        except OSError:
            dev = -1
        self.log.append(dataclasses.replace(op, dev=dev))

    def create(self, path: str) -> int:
        self._add(Op("create", path))
        fd = super().create(path)
        self._paths[fd] = path
        return fd

    def write_all(self, fd: int, parts: Sequence[memoryview], path: str) -> None:
        self._add(Op("write", path, data=b"".join(parts)))
        super().write_all(fd, parts, path)

    def fdatasync(self, fd: int, path: str) -> None:
        self._add(Op("fdatasync", path))
        super().fdatasync(fd, path)

    def wait_writeback(self, fd: int, path: str) -> None:
        super().wait_writeback(fd, path)
        self._add(Op("wait_writeback", self._paths.get(fd, path)))

    def mkdir(self, path: str) -> None:
        super().mkdir(path)  # recorded only if it made the directory
        self._add(Op("mkdir", path.rstrip(os.sep)))

    def rename(self, src: str, dst: str) -> None:
        self._add(Op("rename", src, dst))
        super().rename(src, dst)

    def renameat2(self, src: str, dst: str) -> None:
        super().renameat2(src, dst)  # recorded only if it moved the file
        self._add(Op("rename", src, dst))

    def link(self, src: str, dst: str) -> None:
        super().link(src, dst)
        self._add(Op("link", src, dst))

    def unlink(self, path: str) -> None:
        self._add(Op("unlink", path))
        super().unlink(path)

    def fsync_dir(self, path: str) -> None:
        self._add(Op("fsync_dir", path.rstrip(os.sep)))
        super().fsync_dir(path)

    def syncfs(self, path: str, fd: int = -1) -> None:
        self._add(Op("syncfs", path))
        super().syncfs(path, fd)

    def ack(self, new_path: str) -> None:
        """Mark that the caller was told ``new_path`` is delivered (the call returned)."""
        self._add(Op("ack", new_path))


@dataclass(frozen=True)
class FileFate:
    """What a crash at one point may leave of one message file in ``new/``."""

    new_path: str
    full: bytes
    acked: bool
    # Each option: (name present in new/, data complete)
    options: frozenset[tuple[bool, bool]]


def _fates(log: list[Op], k: int, ordered: Ordered = False) -> list[FileFate]:
    """Per message file, the outcomes a crash after ``log[:k]`` allows."""
    prefix = log[:k]
    acked = {op.path for op in prefix if op.kind == "ack"}
    made = {op.path: i for i, op in enumerate(prefix) if op.kind == "mkdir"}
    fates = []
    for r, op in enumerate(prefix):
        if op.kind not in ("rename", "link"):
            continue
        src, dst = op.path, op.path2
        writes = [i for i, o in enumerate(prefix) if o.kind == "write" and o.path == src]
        full = b"".join(prefix[i].data for i in writes)
        last_write = writes[-1] if writes else -1
        data_durable = any(
            (o.kind == "fdatasync" and o.path == src) or (o.kind == "syncfs" and o.dev == op.dev)
            for o in prefix[last_write + 1 :]
        ) or (
            _orders(ordered, op.dev)
            and any(
                o.kind == "wait_writeback" and o.path == src for o in prefix[last_write + 1 : r]
            )
        )
        name_durable = _entry_durable(prefix, r, dst, ordered) and all(
            _entry_durable(prefix, made[d], d, ordered) for d in _ancestors(dst) if d in made
        )
        names = {True} if name_durable else {True, False}
        datas = {True} if data_durable or not full else {True, False}
        fates.append(FileFate(dst, full, dst in acked, frozenset(itertools.product(names, datas))))
    return fates


def _orders(ordered: Ordered, dev: int) -> bool:
    return ordered is True or (not isinstance(ordered, bool) and dev in ordered)


def _entry_durable(prefix: list[Op], i: int, path: str, ordered: Ordered = False) -> bool:
    """Whether the directory entry ``path``, made by ``prefix[i]``, is persisted later on."""
    parent = os.path.dirname(path)
    dev = prefix[i].dev
    journal = _orders(ordered, dev)
    for j in range(i + 1, len(prefix)):
        o = prefix[j]
        if (o.kind == "syncfs" and o.dev == dev) or (o.kind == "fsync_dir" and o.path == parent):
            return True
        # On one ordered journal, the commit that holds a directory's last
        # change holds every change made before it (on that file system).
        if (
            journal
            and o.kind == "fsync_dir"
            and o.dev == dev
            and _last_change(prefix[:j], o.path) >= i
        ):
            return True
    return False


def _last_change(ops: list[Op], directory: str) -> int:
    """The index of the last op in ``ops`` that adds or removes an entry of ``directory``, or -1."""
    for k in range(len(ops) - 1, -1, -1):
        o = ops[k]
        if o.kind in ("create", "mkdir", "rename", "link", "unlink") and directory in (
            os.path.dirname(o.path),
            os.path.dirname(o.path2) if o.path2 else None,
        ):
            return k
    return -1


def _ancestors(path: str) -> list[str]:
    out = []
    while (parent := os.path.dirname(path)) != path:
        out.append(parent)
        path = parent
    return out


def _bad(f: FileFate, present: bool, complete: bool) -> str | None:
    if f.acked and not present:
        return f"acknowledged {os.path.basename(f.new_path)} missing from new/"
    if present and not complete:
        return f"partial {os.path.basename(f.new_path)} in new/"
    return None


def violations(log: list[Op], *, exhaustive_limit: int = 12, ordered: Ordered = False) -> list[str]:
    """Every (crash point, problem) the model allows; empty when the protocol is safe.

    The check is per file and the model treats files independently, so a state
    is bad exactly when one of its files is in a bad outcome. Crash points whose
    unknowns number at most ``exhaustive_limit`` bits are also enumerated as the
    full product of states, and the two answers must agree.
    """
    problems: list[str] = []
    for k in range(len(log) + 1):
        fates = _fates(log, k, ordered)
        found = {
            msg
            for f in fates
            for present, complete in f.options
            if (msg := _bad(f, present, complete)) is not None
        }
        states = 1
        for f in fates:
            states *= len(f.options)
        if states <= 2**exhaustive_limit:
            product_bad = set()
            for state in itertools.product(*(sorted(f.options) for f in fates)):
                for f, (present, complete) in zip(fates, state, strict=True):
                    msg = _bad(f, present, complete)
                    if msg is not None:
                        product_bad.add(msg)
            assert product_bad == found, (k, product_bad, found)
        problems += [f"crash after op {k}: {m}" for m in sorted(found)]
    return problems
