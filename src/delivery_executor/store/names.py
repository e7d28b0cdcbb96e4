"""Maildir file names: unique names for new messages, and the ``:2,`` flags suffix.

A new message's name is ``{secs}.M{usec}P{pid}Q{seq}.{host}``: the original's
``secs.M<usec>P<pid>`` plus a per-process sequence number (``Q``, so that two
messages of one process in the same microsecond differ) and the sanitized host
name, as the Maildir spec asks. By default the store appends
``,S=<size>,W=<size with CRLF>`` as Dovecot does (:func:`size_suffix`).
Flags follow in ``:2,<letters>``, sorted in ASCII order; lower-case letters
are keywords (Dovecot maps them through ``dovecot-keywords``) and are kept as
they are.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from ..errors import InvalidMessageId

__all__ = [
    "Flag",
    "MessageId",
    "add_flag",
    "check_info_letters",
    "check_message_id",
    "host_of",
    "known_extra",
    "known_line_ends",
    "known_line_ends_of",
    "parse_flags",
    "sanitize_host",
    "serialize_flags",
    "size_suffix",
    "this_host",
    "unique_name",
]


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
    """The standard flags of a Maildir file name (``"1.M2P3.h:2,RSa"`` → {REPLIED, SEEN}).

    Keyword letters (``a``-``z``) are not :class:`Flag` values and are left out
    here; :func:`add_flag` keeps them in the name. A name without ``:2,`` has
    no flags.
    """
    _, sep, info = name.partition(":2,")
    if not sep:
        return frozenset()
    return frozenset(_FLAG_BY_LETTER[c] for c in info if c in _FLAG_BY_LETTER)


def serialize_flags(flags: Iterable[Flag]) -> str:
    """The ``:2,`` suffix for ``flags``, letters in ASCII order as the spec asks."""
    return ":2," + "".join(sorted({Flag(f).value for f in flags}))


_INFO_LETTERS = frozenset("DFPRST" + "abcdefghijklmnopqrstuvwxyz")


def check_info_letters(letters: str) -> str:
    """``letters`` as a Maildir ``:2,`` info: each letter once, in ASCII order.

    Valid letters are the six standard flags (``D F P R S T``) and the keyword
    letters ``a``-``z`` (Dovecot maps them through ``dovecot-keywords``); any
    order and repeats are accepted and normalised (``"SFS"`` → ``"FS"``).
    ``ValueError`` naming the value for anything else (another capital, a
    digit, a space, ``:``), ``TypeError`` for a non-str.
    """
    if not isinstance(letters, str):
        raise TypeError(f"Maildir flags must be a str, not {type(letters).__name__}")
    if not _INFO_LETTERS.issuperset(letters):
        raise ValueError(
            f"Maildir flags must be letters of DFPRST (flags) or a-z (keywords), not {letters!r}"
        )
    return "".join(sorted(set(letters)))


def check_message_id(name: MessageId | str) -> str:
    """``name`` (an id, or a file name with its ``:2,`` flags) as a str, if it is one file's.

    ``InvalidMessageId`` if it, or its part before ``:``, is empty or starts
    with ``.`` (``.``, ``..``, and the dot files scans skip), or if it holds a
    ``/`` or a NUL byte: such a name could reach a directory or a file outside
    the Maildir. ``TypeError`` for anything but a :class:`MessageId` or str.
    """
    if isinstance(name, MessageId):
        name = name.name
    if not isinstance(name, str):
        raise TypeError(f"message id must be a MessageId or str, not {type(name).__name__}")
    base = name.partition(":")[0]
    if not base or base.startswith(".") or "/" in name or "\0" in name:
        raise InvalidMessageId(
            f"message id {name!r} is not a Maildir file name"
            " (empty, starting with '.', or holding '/' or NUL)"
        )
    return name


def add_flag(name: str, flag: Flag) -> str:
    """``name`` with ``flag`` added to its ``:2,`` suffix (created if missing).

    Every letter already there is kept, keyword letters included, and the
    result is sorted in ASCII order: ``"x:2,FSab"`` + REPLIED → ``"x:2,FRSab"``.
    ``InvalidMessageId`` for a name :func:`check_message_id` refuses.
    """
    check_message_id(name)
    base, sep, info = name.partition(":2,")
    if not sep:
        base, info = name.partition(":")[0], ""
    return base + ":2," + "".join(sorted(set(info) | {Flag(flag).value}))


def sanitize_host(host: str) -> str:
    """``host`` with ``/`` and ``:`` escaped as the Maildir spec asks (``\\057``, ``\\072``).

    ``,`` (which starts the ``,S=`` sizes) becomes ``\\054``, and ``\\`` itself
    ``\\134`` first, so that two host names never share a sanitized form.
    """
    escaped = host.replace("\\", "\\134").replace("/", "\\057").replace(":", "\\072")
    return escaped.replace(",", "\\054") or "localhost"


_HOST = sanitize_host(socket.gethostname())
_PID = os.getpid()
_SEQ = itertools.count()
_SEQ_LOCK = threading.Lock()


def _after_fork() -> None:
    global _PID
    _PID = os.getpid()


os.register_at_fork(after_in_child=_after_fork)


def this_host() -> str:
    """This process's host part of new names (the sanitized host name)."""
    return _HOST


def host_of(name: str) -> str | None:
    """The host part of a Maildir name (``time.unique.host[,S=..][:2,..]``), or ``None``.

    Works for ours (``1.M2P3Q4.mx``), Dovecot's and qmail's names alike: the
    host is what follows the second dot, up to a ``,`` or ``:``.
    """
    base = name.partition(":")[0].partition(",")[0]
    parts = base.split(".", 2)
    return parts[2] if len(parts) == 3 and parts[0].isdigit() and parts[2] else None


def unique_name() -> str:
    """``{secs}.M{usec}P{pid}Q{seq}.{host}``: unique across threads, forks and hosts."""
    with _SEQ_LOCK:
        seq = next(_SEQ)
    secs, usec = divmod(time.time_ns() // 1000, 1_000_000)
    return f"{secs}.M{usec}P{_PID}Q{seq}.{_HOST}"


def size_suffix(parts: Sequence[memoryview]) -> str:
    """``,S=<bytes>,W=<bytes if every line ended in CRLF>`` for a message made of ``parts``.

    ``S`` is the file's size; ``W`` is the RFC 822 size IMAP reports, which
    Dovecot reads from the name instead of counting. Cost: two C scans of the
    bytes (``bytes.count``), about 10 µs per 64 KiB, plus a copy of any part
    that is not a whole ``bytes`` object; none for a part whose count a caller
    already knows (:func:`known_line_ends`).
    """
    size = extra = 0  # extra: W - S, the line ends that lack a CR
    prev_cr = False
    for part in parts:
        if not part.nbytes:
            continue
        known = _KNOWN.get(id(part.obj))
        if known is not None and known[0] is part.obj and len(known[0]) == part.nbytes:
            data = known[0]
            extra += known[1]
        else:
            data = _whole_bytes(part)
            extra += data.count(b"\n") - data.count(b"\r\n")
        size += len(data)
        if prev_cr and data[0] == 10:  # a CRLF split between two parts
            extra -= 1
        prev_cr = data[-1] == 13
    return f",S={size},W={size + extra}"


# id(data) -> (data, its count of LF minus its count of CRLF). The entry holds
# `data`, so its id cannot be reused while it is here. Read from writer threads:
# a dict lookup is atomic.
_KNOWN: dict[int, tuple[bytes, int]] = {}


@contextlib.contextmanager
def known_line_ends(data: bytes, extra: int) -> Iterator[None]:
    """Within the block, :func:`size_suffix` takes a part that is all of ``data`` as having
    ``extra`` = ``data.count(b"\\n") - data.count(b"\\r\\n")``, instead of counting.

    For a caller that learnt the count while producing ``data`` (the SMTP
    handler, converting CRLF to LF); a wrong ``extra`` gives a wrong ``,W=``.
    Only in this process (a helper process counts as before). Nesting with the
    same object is harmless: the value is a function of the bytes, and a part
    no longer known is counted.
    """
    key = id(data)
    _KNOWN[key] = (data, extra)
    try:
        yield
    finally:
        _KNOWN.pop(key, None)


def known_extra(part: memoryview) -> int | None:
    """The count :func:`known_line_ends` gave for all of ``part``'s object, or ``None``.

    Lets a writer pass it on with the bytes (the helper process's frame).
    """
    known = _KNOWN.get(id(part.obj))
    if known is not None and known[0] is part.obj and len(known[0]) == part.nbytes:
        return known[1]
    return None


@contextlib.contextmanager
def known_line_ends_of(pairs: Sequence[tuple[bytes, int]]) -> Iterator[None]:
    """:func:`known_line_ends` for each ``(data, extra)`` of ``pairs`` at once."""
    with contextlib.ExitStack() as stack:
        for data, extra in pairs:
            stack.enter_context(known_line_ends(data, extra))
        yield


def _whole_bytes(part: memoryview) -> bytes:
    obj = part.obj
    if isinstance(obj, bytes) and len(obj) == part.nbytes:
        return obj
    return part.tobytes()
