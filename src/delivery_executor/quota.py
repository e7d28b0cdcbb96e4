"""Maildir++ quota, compatible with Dovecot's ``quota = maildir`` both ways.

Usage lives in ``<maildir>/maildirsize`` (Courier's README.maildirquota): the
first line holds the limits (``1073741824S,10000C``; a missing part means no
limit), each further line a ``bytes count`` change. Writers append without a
lock; anyone may recalculate: sum the ``,S=`` sizes (else ``stat``) and count
the files in ``new/`` and ``cur/`` of the Maildir and of every ``.folder``,
write that to a file in ``tmp/`` and rename it over ``maildirsize``. We
recalculate when the file is missing, unreadable, over 5,120 bytes, has other
limits than ours, or says over quota and is older than 15 minutes, as Dovecot
does; concurrent writers may race as they do for Dovecot, and the next
recalculation repairs the count.

:class:`QuotaDeliverer` remembers each file's totals and how far it read it
(up to the last newline; an unfinished line counts once it is finished), and
checks with one ``stat``: the same inode and size (and mtime) need no read,
lines appended by anyone are read from where it stopped, anything else (a
rebuild renamed over it, other limits, a shrink) and every 30 s a full read.
Its own append keeps the totals when its offset shows no one else wrote.
Other writers are thus seen at the next check, as with a read each time.

:class:`QuotaDeliverer` wraps the executor: before a copy is written it checks
the mailbox's usage (what the file says plus copies in flight) against the
limits with the grace (Dovecot 2.3: 10 % of the storage limit, for deliveries
into a mailbox still under quota), and refuses with :class:`QuotaExceeded`
(``552 5.2.2`` or, with ``tempfail``, ``452 4.2.2``). Copies that became
durable in the same batch are appended as **one** line per mailbox, once the
batch's deliveries have all resumed (one loop turn later).

The rule syntax is Dovecot's: ``*:storage=1G``, ``*:bytes=1000000``,
``*:messages=10000``, several joined with ``:`` (``*:storage=1G:messages=100``),
``*:ignore`` / ``*:noenforcing`` (no limit). ``storage`` without a unit is in
KiB, as in Dovecot; units B, K, M, G, T. Rules for single folders (``Trash:...``)
are not supported and rejected.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import QuotaExceeded
from .store import Message

__all__ = [
    "QuotaDeliverer",
    "QuotaLimits",
    "Usage",
    "parse_quota_rule",
    "read_usage",
    "recalculate",
]

_log = logging.getLogger("delivery_executor.quota")
MAX_FILE = 5120  # bytes of maildirsize past which it is rewritten (Courier, Dovecot)
STALE = 15 * 60  # seconds: an over-quota maildirsize older than this is recounted
REREAD = 30.0  # seconds: a remembered maildirsize is read whole again after this
KNOWN = 10_000  # mailboxes whose maildirsize totals are remembered
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_AMOUNT = re.compile(r"(\d+)\s*([bkmgt]?)", re.IGNORECASE)
_SIZE = re.compile(r",S=(\d+)")


@dataclass(frozen=True)
class QuotaLimits:
    """Storage (bytes) and message limits; ``None`` is no limit."""

    storage: int | None = None
    messages: int | None = None

    @property
    def unlimited(self) -> bool:
        return self.storage is None and self.messages is None

    def header(self) -> str:
        """The first line of ``maildirsize`` for these limits."""
        parts = []
        if self.storage is not None:
            parts.append(f"{self.storage}S")
        if self.messages is not None:
            parts.append(f"{self.messages}C")
        return ",".join(parts) or "0S,0C"


@dataclass(frozen=True)
class Usage:
    """What ``maildirsize`` says (after any recalculation)."""

    bytes: int
    messages: int


def parse_quota_rule(rule: str) -> QuotaLimits:
    """Dovecot's ``quota_rule`` → :class:`QuotaLimits`; ``ValueError`` naming the problem."""
    name, colon, rest = rule.strip().partition(":")
    if name != "*" or not colon:
        raise ValueError(f"quota rule must start with '*:' (folder rules unsupported): {rule!r}")
    storage: int | None = None
    messages: int | None = None
    for part in rest.split(":"):
        key, eq, value = part.strip().partition("=")
        if not eq and key in ("ignore", "noenforcing"):
            return QuotaLimits()
        m = _AMOUNT.fullmatch(value.strip())
        if not eq or m is None:
            raise ValueError(f"bad quota rule part {part!r} in {rule!r}")
        number, unit = int(m.group(1)), m.group(2).lower()
        if key == "storage":
            storage = number * (_UNITS[unit] if unit else 1024)  # Dovecot: KiB by default
        elif key == "bytes":
            storage = number * _UNITS[unit]
        elif key == "messages":
            if unit:
                raise ValueError(f"quota rule messages takes a plain number: {rule!r}")
            messages = number
        else:
            raise ValueError(f"unknown quota rule key {key!r} in {rule!r}")
    # 0 means "no limit" in Dovecot's rules and in maildirsize.
    return QuotaLimits(storage or None, messages or None)


def _parse_header(line: str) -> QuotaLimits:
    storage = messages = None
    for part in line.strip().split(","):
        if part.endswith("S") and part[:-1].isdigit():
            storage = int(part[:-1]) or None
        elif part.endswith("C") and part[:-1].isdigit():
            messages = int(part[:-1]) or None
    return QuotaLimits(storage, messages)


def _folders(maildir: str) -> list[str]:
    out = [maildir]
    try:
        with os.scandir(maildir) as it:
            for e in it:
                if e.name.startswith(".") and e.name not in (".", "..") and e.is_dir():
                    out.append(e.path)
    except FileNotFoundError:
        pass
    return out


def count(maildir: str) -> Usage:
    """Bytes (``,S=``, else ``stat``) and messages in ``new/`` and ``cur/`` of every folder."""
    total = n = 0
    for folder in _folders(maildir):
        for sub in ("new", "cur"):
            try:
                it = os.scandir(os.path.join(folder, sub))
            except FileNotFoundError:
                continue
            with it:
                for e in it:
                    m = _SIZE.search(e.name)
                    if m is not None:
                        total += int(m.group(1))
                    else:
                        try:
                            total += e.stat().st_size
                        except FileNotFoundError:  # expunged meanwhile
                            continue
                    n += 1
    return Usage(total, n)


def recalculate(maildir: str, limits: QuotaLimits) -> Usage:
    """Count the Maildir and replace ``maildirsize`` (tmp file + rename). Blocking."""
    usage = count(maildir)
    tmp_dir = os.path.join(maildir, "tmp")
    os.makedirs(tmp_dir, mode=0o700, exist_ok=True)
    tmp = os.path.join(tmp_dir, f"{time.time():.0f}.P{os.getpid()}.{socket.gethostname()}.size")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            st = os.stat(tmp_dir)
            if st.st_uid != 0 and os.geteuid() == 0:  # the Maildir's owner may append too
                os.fchown(fd, st.st_uid, st.st_gid)
            os.write(fd, f"{limits.header()}\n{usage.bytes} {usage.messages}\n".encode())
        finally:
            os.close(fd)
        os.rename(tmp, os.path.join(maildir, "maildirsize"))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # else every failed recount leaves a file in tmp/
        raise
    return usage


def _sum_lines(text: str) -> tuple[int, int] | None:
    """The summed ``bytes count`` lines of ``text``; ``None`` for a line that is no numbers."""
    size = n = 0
    for line in text.split("\n"):
        parts = line.split()
        if not parts:
            continue  # a blank or torn line from a concurrent writer
        try:
            size += int(parts[0])
            n += int(parts[1]) if len(parts) > 1 else 0
        except ValueError:
            return None
    return size, n


def _over(limits: QuotaLimits, size: int, n: int) -> bool:
    return (limits.storage is not None and size > limits.storage) or (
        limits.messages is not None and n > limits.messages
    )


def read_usage(maildir: str, limits: QuotaLimits) -> Usage | None:
    """``maildirsize``'s totals, or ``None`` when it must be recalculated. One read."""
    path = os.path.join(maildir, "maildirsize")
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        if st.st_size > MAX_FILE:
            return None
        data = os.read(fd, MAX_FILE + 1).decode("ascii", "replace")
    finally:
        os.close(fd)
    header, _, rest = data.partition("\n")
    if _parse_header(header) != limits:
        return None
    summed = _sum_lines(rest)
    if summed is None:
        return None
    if _over(limits, *summed) and time.time() - st.st_mtime > STALE:
        return None
    return Usage(*summed)


_OWN = -1  # _Known.mtime_ns after our own append: the next stat's mtime is taken


class _Known:
    """What one ``maildirsize`` said when last read: its identity, how far it was
    read (up to its last newline), and the totals up to there."""

    __slots__ = ("bytes", "end", "ino", "limits", "messages", "mtime_ns", "read_at")

    def __init__(self, ino: int, end: int, mtime_ns: int, limits: QuotaLimits, size: int,
                 n: int, read_at: float) -> None:  # fmt: skip
        self.ino, self.end, self.mtime_ns, self.limits = ino, end, mtime_ns, limits
        self.bytes, self.messages, self.read_at = size, n, read_at


def _read_known(maildir: str, limits: QuotaLimits, known: _Known | None) -> _Known | None:
    """``maildirsize`` of ``maildir`` as a :class:`_Known`, reading as little as it can.

    One ``stat``; no read when the file is as ``known`` left it; only the appended
    lines when it grew (same inode, same limits, last full read under
    :data:`REREAD` seconds ago); else a full read. ``None`` when it must be
    recalculated (as :func:`read_usage`).
    """
    path = maildir + "/maildirsize"  # os.path.join, for the hot path
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    if st.st_size > MAX_FILE:
        return None
    now = time.monotonic()
    if (
        known is not None
        and known.ino == st.st_ino
        and known.limits == limits
        and st.st_size >= known.end
        and now - known.read_at < REREAD
    ):
        if st.st_size == known.end and known.mtime_ns in (st.st_mtime_ns, _OWN):
            known.mtime_ns = st.st_mtime_ns
            return known  # unchanged (or as our own append left it): the common case
        if st.st_size > known.end:  # appended to (by us or another writer): add the new lines
            fd = os.open(path, os.O_RDONLY)
            try:
                tail = os.pread(fd, st.st_size - known.end, known.end)
            finally:
                os.close(fd)
            cut = tail.rfind(b"\n") + 1  # an unfinished last line counts once finished
            summed = _sum_lines(tail[:cut].decode("ascii", "replace"))
            if summed is not None:
                return _Known(st.st_ino, known.end + cut, st.st_mtime_ns, limits,
                              known.bytes + summed[0], known.messages + summed[1],
                              known.read_at)  # fmt: skip
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        data = os.read(fd, MAX_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_FILE:
        return None
    first = data.find(b"\n") + 1
    cut = data.rfind(b"\n") + 1
    if not first or _parse_header(data[:first].decode("ascii", "replace")) != limits:
        return None
    summed = _sum_lines(data[first:cut].decode("ascii", "replace"))
    if summed is None:
        return None
    return _Known(st.st_ino, cut, st.st_mtime_ns, limits, *summed, now)


def _absent(path: str) -> bool:
    """True if nothing is at ``path`` (one ``lstat``)."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return True
    return False


def maildir_of(path: str) -> str:
    """The Maildir that holds ``path`` (a ``.folder`` inside one, or itself)."""
    head, tail = os.path.split(path.rstrip(os.sep))
    return head if tail.startswith(".") else path


class QuotaDeliverer:
    """Wraps a :class:`DeliveryExecutor` (or any deliverer) with Maildir++ quota.

    Parameters:
        inner: what writes the copies.
        limits_for: ``limits_for(maildir)`` → the mailbox's limits (``None``
            or unlimited: no check and no ``maildirsize`` upkeep).
        grace: fraction of the storage limit a delivery may go past, if the
            mailbox was under quota before it (Dovecot 2.3's ``quota_grace``).
        tempfail: refuse with ``452 4.2.2`` instead of ``552 5.2.2``.
        check_at_rcpt: tell the handler to call :meth:`check` at RCPT too
            (with ``SIZE=`` from MAIL FROM, else 0: refuses a full mailbox).
        maildir_for: the Maildir that a delivery path belongs to (default:
            :func:`maildir_of`, the parent of a ``.folder``).

    Cost per copy to a limited mailbox: one ``stat`` of ``maildirsize`` on the
    loop (a read only of what others appended), plus one append (open, write,
    lseek, close) per mailbox per batch; a recalculation walks the Maildir in
    a thread (on the loop for a Maildir that does not exist yet: nothing to walk).
    """

    takes_parts = True  # the handler may give us (headers, body) tuples

    def __init__(
        self,
        inner: object,
        limits_for: Callable[[str], QuotaLimits | None],
        *,
        grace: float = 0.10,
        tempfail: bool = False,
        check_at_rcpt: bool = False,
        maildir_for: Callable[[str], str] | None = None,
    ) -> None:
        if not inspect.iscoroutinefunction(getattr(inner, "deliver", None)):
            raise TypeError(f"inner must have an async deliver(), not {type(inner).__name__}")
        if not 0 <= grace <= 10:
            raise ValueError(f"grace must be a fraction between 0 and 10, not {grace!r}")
        self.inner: Any = inner
        self.limits_for = limits_for
        self.check_at_rcpt = check_at_rcpt
        self.maildir_for = maildir_for or maildir_of
        self.grace = grace
        self.reply = (
            "452 4.2.2 Quota exceeded (mailbox for user is full)"
            if tempfail
            else "552 5.2.2 Quota exceeded (mailbox for user is full)"
        )
        self.rejections = 0
        """Copies refused for quota (at RCPT or DATA)."""
        self.appends = 0
        """Lines appended to maildirsize files (one per mailbox per batch)."""
        self._reserved: dict[str, list[int]] = {}  # maildir -> [bytes, messages] not in the file
        self._pending: dict[str, list[int]] = {}  # durable, not yet appended
        self._flush_scheduled = False
        self._recounting: dict[str, asyncio.Future[Usage]] = {}
        # maildir -> its maildirsize as last read (validated by one stat per check)
        self._known: dict[str, _Known] = {}

    async def usage(self, maildir: str, limits: QuotaLimits) -> Usage:
        """The mailbox's usage as ``maildirsize`` says, recalculating it when due.

        Callers that arrive during a recount wait for it, and resume in the order
        they came (so the copies of one transaction are checked in RCPT order).
        """
        running = self._recounting.get(maildir)
        if running is not None:
            return await asyncio.shield(running)
        known = self._known.pop(maildir, None)
        try:
            known = _read_known(maildir, limits, known)
        except OSError:
            known = None
        if known is not None and not (
            _over(limits, known.bytes, known.messages)
            and time.time() - known.mtime_ns / 1e9 > STALE
        ):
            self._known[maildir] = known  # re-inserted: the oldest go first
            if len(self._known) > KNOWN:
                del self._known[next(iter(self._known))]
            return Usage(known.bytes, known.messages)
        if _absent(maildir):
            # A new mailbox: nothing to walk, so no thread hop (a few mkdirs and one rename).
            return recalculate(maildir, limits)
        fut: asyncio.Future[Usage] = asyncio.get_running_loop().create_future()
        self._recounting[maildir] = fut
        try:
            usage = await asyncio.to_thread(recalculate, maildir, limits)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: waiters get it, no "never retrieved"
            raise
        finally:
            del self._recounting[maildir]
        fut.set_result(usage)
        return usage

    async def check(self, path: str, size: int) -> str | None:
        """The refusal for one more copy of ``size`` bytes into ``path``, or ``None``.

        An error reading the usage is no refusal here: the delivery decides.
        """
        maildir = self.maildir_for(path)
        try:
            limits = self.limits_for(maildir)
            if limits is None or limits.unlimited:
                return None
            usage = await self.usage(maildir, limits)
        except OSError:
            return None
        refusal = self._verdict(maildir, limits, usage, size)
        if refusal is not None:
            self.rejections += 1
        return refusal

    def _verdict(self, maildir: str, limits: QuotaLimits, usage: Usage, size: int) -> str | None:
        extra = self._reserved.get(maildir, (0, 0))
        used, n = usage.bytes + extra[0], usage.messages + extra[1]
        if limits.messages is not None and n + 1 > limits.messages:
            return self.reply
        if limits.storage is not None and used + size > limits.storage:
            grace = int(limits.storage * self.grace)
            if used >= limits.storage or used + size > limits.storage + grace:
                return self.reply
        return None

    @property
    def stores_flags(self) -> bool:
        """Whether ``deliver(..., flags=...)`` works: the inner deliverer's say."""
        return getattr(self.inner, "stores_flags", False) is True

    async def deliver(self, path: str, message: Message, /, *, flags: str = "") -> object:
        """Deliver ``message`` into ``path`` unless its mailbox is full (:class:`QuotaExceeded`).

        ``flags`` (Maildir info letters) are passed on to the inner deliverer.
        """
        maildir = self.maildir_for(path)
        limits = self.limits_for(maildir)
        extra = {"flags": flags} if flags else {}
        if limits is None or limits.unlimited:
            return await self.inner.deliver(path, message, **extra)
        size = sum(map(len, message)) if isinstance(message, tuple) else len(message)
        usage = await self.usage(maildir, limits)
        refusal = self._verdict(maildir, limits, usage, size)
        if refusal is not None:
            self.rejections += 1
            raise QuotaExceeded(refusal)
        held = self._reserved.setdefault(maildir, [0, 0])
        held[0] += size
        held[1] += 1
        try:
            result = await self.inner.deliver(path, message, **extra)
        except BaseException:
            self._release(maildir, size)
            raise
        pend = self._pending.setdefault(maildir, [0, 0])
        pend[0] += size
        pend[1] += 1
        if not self._flush_scheduled:
            # Every delivery of this batch resumes in this loop turn: append once after them.
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return result

    def _release(self, maildir: str, size: int, n: int = 1) -> None:
        held = self._reserved.get(maildir)
        if held is None:
            return
        held[0] -= size
        held[1] -= n
        if held[1] <= 0:
            del self._reserved[maildir]

    def _appended(self, maildir: str, fd: int, length: int, size: int, n: int) -> None:
        """Keep the remembered totals of ``maildir`` in step with our own append of
        ``length`` bytes through ``fd``; forget them if anyone else wrote meanwhile."""
        known = self._known.get(maildir)
        if known is None:
            return
        # O_APPEND: the offset is the end of our line, so no one wrote between what
        # we read and it. (A file renamed over it meanwhile has another inode: the
        # next check's stat sees that.) Cheaper than fstat.
        if os.lseek(fd, 0, os.SEEK_CUR) == known.end + length:
            known.end += length
            known.mtime_ns = _OWN
            known.bytes += size
            known.messages += n
        else:  # another writer appended or rebuilt it: the next check reads it
            del self._known[maildir]

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, {}
        for maildir, (size, n) in pending.items():
            try:
                fd = os.open(maildir + "/maildirsize", os.O_WRONLY | os.O_APPEND, 0o600)
            except FileNotFoundError:
                pass  # recalculated at the next check: our files are counted then
            except OSError as exc:
                _log.warning("cannot update %s/maildirsize: %s", maildir, exc.strerror)
            else:
                try:
                    line = f"{size} {n}\n".encode()
                    os.write(fd, line)
                    self.appends += 1
                    self._appended(maildir, fd, len(line), size, n)
                except OSError as exc:
                    _log.warning("cannot update %s/maildirsize: %s", maildir, exc.strerror)
                finally:
                    os.close(fd)
            self._release(maildir, size, n)
