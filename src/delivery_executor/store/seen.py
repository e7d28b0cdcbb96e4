"""Duplicate records: which Message-IDs a Maildir already holds, committed with the message.

A Maildir that has a ``delivery-executor.seen/`` directory (made by the
handler when ``--duplicate-window`` is on; a name Dovecot's Maildir++ layout
never takes for a folder, which starts with a dot) gets one small record file
per delivered message that has a ``Message-ID``: named by a hash of the
Message-ID, holding the message's file name in ``new/``. The commit protocol
writes it once the message's data is durable and before moving it into
``new/`` (:func:`~delivery_executor.store.commit.commit_steps`): a message
that reached ``new/`` has its record even if the process dies right after
the move, and the sync that makes the move durable covers the record too
(``syncfs`` covers everything, and a writeback-form batch that wrote records
ends with one; the portable form adds an ``fdatasync`` of each record and an
``fsync`` of the record directory). Every writer (workers,
hosts on a shared root) writes and reads the same files, so the records are
shared without a lock.

A record counts only while the file it names is still in ``new/`` or ``cur/``
and holds that Message-ID (:func:`find`): a record without its message (a
crash before the move, a user deleted the message), a corrupt or missing
record, all cost at most a second copy, never a lost message. Records older
than the window are ignored and removed by :func:`sweep`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Sequence

__all__ = ["SEEN_DIR", "find", "make_durable", "message_key", "records_dir", "sweep"]

SEEN_DIR = "delivery-executor.seen"
_SCAN = 16 * 1024  # as far as a Message-ID header is looked for
_RECHECK = 1.0  # seconds between checks for a records directory that was not there
_CACHE_MAX = 4096
_dirs: dict[str, tuple[float, bool]] = {}


def message_key(parts: Sequence[bytes | bytearray | memoryview]) -> str | None:
    """A hash (32 hex digits) of the message's first ``Message-ID``, or ``None`` if it has none.

    ``parts`` are the stored message's buffers in order (our headers, then the
    client's); only the first 16 KiB of the header block are read. The value
    is compared as sent, whitespace (and folding) removed.
    """
    head = bytearray()
    for part in parts:
        head += part[: _SCAN - len(head)]
        if len(head) >= _SCAN:
            break
    text = bytes(head).replace(b"\r\n", b"\n")
    end = text.find(b"\n\n")
    if end != -1:
        text = text[: end + 1]
    low = b"\n" + text.lower()
    at = low.find(b"\nmessage-id:")
    if at == -1:
        return None
    value = bytearray(text[at + 11 : _line_end(text, at)])
    nxt = _line_end(text, at) + 1
    while nxt < len(text) and text[nxt : nxt + 1] in (b" ", b"\t"):  # folded
        stop = _line_end(text, nxt)
        value += text[nxt:stop]
        nxt = stop + 1
    key = b"".join(bytes(value).split())
    if not key:
        return None
    return hashlib.blake2b(key, digest_size=16).hexdigest()


def _line_end(text: bytes, start: int) -> int:
    stop = text.find(b"\n", start)
    return len(text) if stop == -1 else stop


def records_dir(maildir: str) -> str | None:
    """``<maildir>/delivery-executor.seen/`` (with a trailing slash) if it exists, else ``None``.

    One ``stat`` per Maildir and second at most: a directory seen once is
    remembered; an absent one is looked for again a second later.
    """
    now = time.monotonic()
    known = _dirs.get(maildir)
    if known is None or (not known[1] and now - known[0] > _RECHECK):
        if len(_dirs) >= _CACHE_MAX:
            _dirs.clear()
        known = (now, os.path.isdir(os.path.join(maildir, SEEN_DIR)))
        _dirs[maildir] = known
    return os.path.join(maildir, SEEN_DIR, "") if known[1] else None


def forget(maildir: str) -> None:
    """Drop what :func:`records_dir` remembers of ``maildir`` (after its directory was made)."""
    _dirs.pop(maildir, None)


def find(maildir: str, key: str, window: float, *, now: float | None = None) -> str | None:
    """The file name of the copy of message ``key`` that ``maildir`` holds, if recorded
    within the last ``window`` seconds, still in ``new/`` or ``cur/``, and holding
    that Message-ID; else ``None``.

    Costs one failed ``open`` when there is no record; a hit reads the file's
    first 16 KiB, and one whose file has moved to ``cur/`` lists ``cur/``.
    Never raises ``OSError``.
    """
    path = os.path.join(maildir, SEEN_DIR, key)
    try:
        with open(path, "rb") as f:
            age = (time.time() if now is None else now) - os.fstat(f.fileno()).st_mtime
            raw = f.read(512)
    except OSError:
        return None
    if age > window:
        return None
    try:
        name = raw.split(b"\n", 1)[0].decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not name or "/" in name or name.startswith("."):
        return None
    found = None
    if os.path.exists(os.path.join(maildir, "new", name)):
        found = os.path.join("new", name)
    else:
        base = name.split(":", 1)[0]
        try:
            with os.scandir(os.path.join(maildir, "cur")) as entries:
                for entry in entries:
                    if entry.name.split(":", 1)[0] == base:
                        found = os.path.join("cur", entry.name)
                        break
        except OSError:
            return None
    if found is None:
        return None
    # The file must hold this message: a record written before its move names
    # a file that may, after a crash, never have got there.
    try:
        with open(os.path.join(maildir, found), "rb") as f:
            head = f.read(_SCAN)
    except OSError:
        return None
    return os.path.basename(found) if message_key((head,)) == key else None


def make_durable(maildir: str, name: str) -> bool:
    """``fsync`` the file ``name`` (in ``new/`` or ``cur/``) and its directory; ``True`` if done.

    A record found after its writer died may name a file whose commit never
    finished its last sync (a killed process leaves it in the page cache).
    Before answering ``250`` for it, the suppressing server makes it durable
    itself. Blocking (two syncs): run it off the event loop.
    """
    for sub in ("new", "cur"):
        where = os.path.join(maildir, sub)
        try:
            fd = os.open(os.path.join(where, name), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        except OSError:
            return False
        try:
            os.fsync(fd)
            dfd = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            return False
        finally:
            os.close(fd)
        return True
    return False


def sweep(maildir: str, window: float) -> int:
    """Remove the records of ``maildir`` older than ``window`` seconds; how many went.

    One listing of the record directory and a ``stat`` per record; errors are
    ignored (a record left behind is only looked at and ignored later).
    """
    cutoff = time.time() - window
    removed = 0
    with contextlib.suppress(OSError), os.scandir(os.path.join(maildir, SEEN_DIR)) as entries:
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except OSError:
                continue
    return removed
