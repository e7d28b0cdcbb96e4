"""From a :class:`~.evaluator.SieveResult` to Maildir++ deliveries, as Dovecot lays them out.

- ``fileinto "Lists/python"`` goes to the folder ``<root>/.Lists.python``
  (Dovecot's Maildir++ layout with ``/`` as the IMAP separator); each level is
  stored in IMAP modified UTF-7 (``Café`` → ``.Caf&AOk-``). ``INBOX`` (any
  case) and ``""`` are the Maildir itself.
- A folder is created only for ``fileinto :create``; when a target folder is
  missing, or a name cannot be stored (a ``.`` inside a level, an empty
  level, a leading ``~``), the whole result is dropped and the message is kept
  in INBOX without flags: Pigeonhole (with ``lda_mailbox_autocreate = no``)
  fails the script and does the implicit keep.
- IMAP flags become Maildir info letters (``\\Seen`` S, ``\\Answered`` R,
  ``\\Flagged`` F, ``\\Deleted`` T, ``\\Draft`` D); keywords get letters
  ``a``-``z`` through the folder's ``dovecot-keywords`` file (lines
  ``N name``), extended as needed, so Dovecot IMAP shows them. A message with
  flags is delivered into ``cur/`` as ``name:2,<letters>``, as Dovecot's LDA
  does; one without, into ``new/``.

Every target of one message rides one :func:`~delivery_executor.store.commit_batch`
(one group commit for all its folders).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import SieveRuntimeError
from ..fsops import OS_OPS, FsOps
from ..recipients import imap_utf7
from ..store import Maildir, Message, MessageId, SyncMode, commit_batch
from .evaluator import SieveResult

__all__ = [
    "KEYWORDS_FILE",
    "SYSTEM_FLAG_LETTERS",
    "Target",
    "deliver",
    "folder_dir",
    "keyword_letters",
    "mailbox_exists",
    "plan",
    "prepare",
]

SYSTEM_FLAG_LETTERS = {
    "\\Seen": "S",
    "\\Answered": "R",
    "\\Flagged": "F",
    "\\Deleted": "T",
    "\\Draft": "D",
}
KEYWORDS_FILE = "dovecot-keywords"
_MAX_KEYWORDS = 26  # letters a-z


@dataclass(frozen=True, slots=True)
class Target:
    """One place to store the message: the folder's Maildir root and its flags."""

    path: str
    mailbox: str
    flags: tuple[str, ...]
    create: bool


def folder_dir(root: str, mailbox: str) -> str:
    """The Maildir++ directory of ``mailbox`` under the Maildir ``root``.

    Raises :class:`SieveRuntimeError` for a name Dovecot would refuse with
    this layout.
    """
    if mailbox == "" or mailbox.upper() == "INBOX":
        return root
    if mailbox.startswith(("/", "~")) or mailbox.endswith("/") or "//" in mailbox:
        raise SieveRuntimeError(f"invalid mailbox name {mailbox!r}")
    levels = mailbox.split("/")
    for level in levels:
        if "." in level or any(c < " " or c == "\x7f" for c in level):
            raise SieveRuntimeError(f"invalid mailbox name {mailbox!r}")
    name = "." + ".".join(imap_utf7(level) for level in levels)
    if len(name.encode()) > 255:
        raise SieveRuntimeError(f"mailbox name too long: {mailbox!r}")
    return os.path.join(root, name)


def mailbox_exists(root: str, mailbox: str) -> bool:
    """Whether ``mailbox`` exists under ``root`` (``mailboxexists``); invalid names do not."""
    try:
        path = folder_dir(root, mailbox)
    except SieveRuntimeError:
        return False
    return path == root or os.path.isdir(os.path.join(path, "cur"))


def plan(result: SieveResult, root: str) -> tuple[list[Target], str | None]:
    """The targets of ``result`` under ``root``, and why it fell back to INBOX, if it did.

    Cost: one ``stat`` per folder without ``:create``. Never raises for a
    script's choices: a missing folder or a bad name yields INBOX only.
    """
    out: list[Target] = []
    for d in result.deliveries:
        try:
            path = folder_dir(root, d.mailbox)
        except SieveRuntimeError as e:
            return [Target(root, "INBOX", (), False)], str(e)
        if path != root and not d.create and not os.path.isdir(os.path.join(path, "cur")):
            return [Target(root, "INBOX", (), False)], f"mailbox {d.mailbox!r} does not exist"
        out.append(Target(path, "INBOX" if path == root else d.mailbox, d.flags, d.create))
    return out, None


def keyword_letters(folder: str, keywords: Sequence[str], *, ops: FsOps = OS_OPS) -> str:
    """The letters of ``keywords`` in ``folder``'s ``dovecot-keywords``, adding missing ones.

    New keywords take the lowest free index (letters ``a``-``z``); past 26
    they are dropped (a Maildir name cannot carry them). The file is replaced
    atomically and durably (write, fsync, rename, fsync of the folder) under
    an ``flock`` of the folder, so two of our deliveries never hand out one
    letter twice. Raises ``OSError`` on I/O failure.
    """
    if not keywords:
        return ""
    path = os.path.join(folder, KEYWORDS_FILE)
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(dfd, fcntl.LOCK_EX)
        by_name: dict[str, int] = {}
        lines: list[str] = []
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    num, sep, name = line.rstrip("\n").partition(" ")
                    if sep and num.isdigit() and name:
                        by_name.setdefault(name, int(num))
                        lines.append(line.rstrip("\n"))
        except FileNotFoundError:
            pass
        used = set(by_name.values())
        letters: list[str] = []
        added = False
        for kw in keywords:
            idx = by_name.get(kw)
            if idx is None:
                free = next((i for i in range(_MAX_KEYWORDS) if i not in used), None)
                if free is None:
                    continue
                idx = by_name[kw] = free
                used.add(free)
                lines.append(f"{free} {kw}")
                added = True
            if idx < _MAX_KEYWORDS:
                letters.append(chr(ord("a") + idx))
        if added:
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in lines))
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, path)
            ops.fsync_dir(folder)
        return "".join(letters)
    finally:
        os.close(dfd)


def prepare(targets: Sequence[Target], *, ops: FsOps = OS_OPS) -> list[Maildir]:
    """The Maildir view each target is delivered through (flags in the name).

    Creates folders asked for with ``:create`` (mode 0700, durable, with the
    Maildir++ ``maildirfolder`` marker) and registers keywords. Raises
    ``OSError`` (e.g. a folder removed since :func:`plan`).
    """
    views: list[Maildir] = []
    for t in targets:
        if t.mailbox == "INBOX" or t.create:
            fresh = not os.path.isdir(t.path)
            md = Maildir.create(t.path, ops=ops)
            if fresh and t.mailbox != "INBOX":
                marker = os.path.join(t.path, "maildirfolder")
                os.close(os.open(marker, os.O_WRONLY | os.O_CREAT, 0o600))
                ops.fsync_dir(t.path)
        else:
            md = Maildir.open(t.path)
        system = "".join(SYSTEM_FLAG_LETTERS[f] for f in t.flags if f in SYSTEM_FLAG_LETTERS)
        keywords = [f for f in t.flags if not f.startswith("\\")]
        views.append(md.with_flags(system + keyword_letters(t.path, keywords, ops=ops)))
    return views


def deliver(
    root: str,
    result: SieveResult,
    body: Message,
    *,
    sync: SyncMode = "auto",
    ops: FsOps = OS_OPS,
) -> list[tuple[Target, MessageId]]:
    """Store ``body`` everywhere ``result`` says, in one durable batch.

    Returns each target with the id it got. A discarded message (no
    deliveries) touches nothing. Raises the first ``OSError`` of the batch.
    """
    targets, _why = plan(result, root)
    if not targets:
        return []
    views = prepare(targets, ops=ops)
    out: list[tuple[Target, MessageId]] = []
    for t, got in zip(
        targets, commit_batch([(v, [body]) for v in views], sync=sync, ops=ops), strict=True
    ):
        if isinstance(got, OSError):
            raise got
        out.append((t, got[0]))
    return out
