"""Dovecot's ``passwd-file`` user database.

Lines are ``user:password:uid:gid:gecos:home:shell:extra``; every field after
the user may be empty or missing, and ``extra`` is space-separated
``name=value`` fields of which the ``userdb_`` ones count here
(``userdb_mail=maildir:~/Maildir userdb_quota_rule=*:storage=1G``). Blank lines
and ``#`` comments are skipped; a line without a user is logged and skipped.

As in Dovecot, the file is ``stat``-ed on every lookup and read again when its
mtime, size or inode changed; the read runs in a thread, so a large file does
not stall the event loop. ``PATH`` may hold ``%d`` (one file per domain): a
missing per-domain file means the domain has no users, while a missing or
unreadable fixed file makes every lookup fail (``451 4.3.0``).
"""

from __future__ import annotations

import asyncio
import logging
import os

from ..errors import UserdbUnavailable
from .base import UserKey, UserRecord, expand, parse_fields

__all__ = ["PasswdFile"]

_log = logging.getLogger("delivery_executor.userdb")
_Entries = dict[str, dict[str, str]]


def parse_passwd(text: str, source: str = "passwd-file") -> _Entries:
    """The user → fields map of a passwd-file's text (fields: uid, gid, home, userdb_*)."""
    entries: _Entries = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split(":", 7)
        user = parts[0].strip().lower()
        if not user:
            _log.warning("%s:%d: no user name; line skipped", source, n)
            continue
        parts += [""] * (8 - len(parts))
        fields: dict[str, str] = {}
        for name, value in (("uid", parts[2]), ("gid", parts[3]), ("home", parts[5])):
            if value:
                fields[name] = value
        try:
            fields.update(parse_fields(parts[7], prefix="userdb_"))
        except ValueError as exc:
            _log.warning("%s:%d: %s; line skipped", source, n, exc)
            continue
        entries[user] = fields
    return entries


class PasswdFile:
    """``passwd-file:PATH``: look users up in a Dovecot passwd-file.

    Parameters:
        path: the file; may contain ``%d`` for one file per domain.
        default_fields: ``"uid=vmail gid=vmail home=/var/mail/%d/%n"``: fields
            used when the file does not give them (Dovecot's ``default_fields``).

    A user is found by ``local@domain``, then by the bare local part (for
    per-domain files or ``username_format = %n``).
    """

    def __init__(self, path: str, *, default_fields: str = "") -> None:
        if not isinstance(path, str) or not path:
            raise ValueError(f"passwd-file needs a path, not {path!r}")
        self.path = path
        self.default_fields = parse_fields(default_fields)
        self._files: dict[str, tuple[tuple[int, int, int], _Entries]] = {}
        # path -> user -> the record made from its line; emptied when the file changes
        self._made: dict[str, dict[str, UserRecord]] = {}
        self.loads = 0
        """How many times a file was (re)read: for tests and curious admins."""

    def __repr__(self) -> str:
        return f"PasswdFile({self.path!r})"

    def reload(self) -> None:
        """Forget every file read, so the next lookup reads them again."""
        self._files.clear()
        self._made.clear()

    async def aclose(self) -> None:
        """Nothing to close."""

    async def lookup(self, key: UserKey, /) -> UserRecord | None:
        """The record of ``key``, ``None`` if not in the file; one ``stat`` per call.

        Records are made once per user and file version (a dict lookup after that).
        """
        per_domain = "%" in self.path
        path = expand(self.path, key) if per_domain else self.path
        try:
            entries = await self._entries(path)
        except FileNotFoundError:
            if per_domain:
                return None
            raise UserdbUnavailable(f"passwd-file {path}: no such file") from None
        except OSError as exc:
            raise UserdbUnavailable(f"passwd-file {path}: {exc.strerror or exc}") from exc
        made = self._made.setdefault(path, {})
        record = made.get(key.user)
        if record is not None:
            return record
        fields = entries.get(key.user)
        if fields is None:
            fields = entries.get(key.local)
        if fields is None:
            return None
        try:
            record = UserRecord().merged({**self.default_fields, **fields}, key)
        except ValueError as exc:
            raise UserdbUnavailable(f"passwd-file {path}: user {key.user}: {exc}") from exc
        if len(made) >= 2 * len(entries) + 1024:  # bare-local-part matches under many domains
            made.clear()
        made[key.user] = record
        return record

    async def _entries(self, path: str) -> _Entries:
        st = os.stat(path)  # cheap, and Dovecot does the same per lookup
        sig = (st.st_mtime_ns, st.st_size, st.st_ino)
        cached = self._files.get(path)
        if cached is not None and cached[0] == sig:
            return cached[1]
        entries = await asyncio.to_thread(self._read, path)
        self._files[path] = (sig, entries)
        self._made.pop(path, None)
        self.loads += 1
        return entries

    @staticmethod
    def _read(path: str) -> _Entries:
        with open(path, encoding="utf-8", errors="replace") as f:
            return parse_passwd(f.read(), path)
