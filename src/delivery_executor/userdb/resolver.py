"""A :class:`MailboxResolver` that asks user databases and mail-location templates.

Where mail goes, in order: the record's ``mail``, else ``mail_location``,
else ``~/Maildir`` when the record has a home, else ``<root>/<domain>/<local>``.
A location may carry Dovecot's ``maildir:`` prefix (its ``:OPTION=...`` tail is
ignored); ``~`` is the home, ``%u %n %d %h`` expand; a relative result is under
``root``. The final path must stay inside ``root`` or inside the user's home:
anything else is refused (``553 5.1.3``), whatever the database said.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence

from .. import validate
from ..errors import RecipientRejected, UserdbUnavailable
from ..recipients import MailboxResolver
from .base import UserDB, UserKey, UserRecord, expand
from .owner import give_maildir

__all__ = ["UserdbResolver", "reload_all"]

_log = logging.getLogger("delivery_executor.userdb")
_live: weakref.WeakSet[UserdbResolver] = weakref.WeakSet()
_TEMPFAIL = "451 4.3.0"
_UNKNOWN = "550 5.1.1"
_BAD = "553 5.1.3"


def reload_all() -> int:
    """Reload every live resolver's databases and caches (what SIGHUP does); how many."""
    resolvers = list(_live)
    for r in resolvers:
        r.reload()
    return len(resolvers)


def _location(template: str) -> str:
    """The path part of a Dovecot mail location; ``ValueError`` for non-Maildir formats."""
    fmt, colon, rest = template.partition(":")
    if colon and fmt.isalpha() and fmt.islower():
        if fmt != "maildir":
            raise ValueError(f"mail location {template!r}: only maildir: is supported")
        template = rest.partition(":")[0]  # drop :LAYOUT=..., :INBOX=... options
    if not template:
        raise ValueError("empty mail location")
    return template


class UserdbResolver(MailboxResolver):
    """Resolves through ``userdbs`` (tried in order) and a mail-location template.

    Parameters (beyond :class:`MailboxResolver`'s):
        userdbs: :class:`~.base.UserDB` objects; the first that knows the user
            answers. None knows it: ``550 5.1.1``. One fails: ``451 4.3.0``.
        mail_location: Dovecot's ``mail_location`` (``%d/%n/Maildir``,
            ``maildir:~/Maildir``) for users whose record has no ``mail``.
        mail_home: home template (``/var/mail/%d/%n``) for users whose record
            has none, and for every address when there is no userdb.
        cache_ttl, cache_size: answers (found or unknown, never failures) are
            kept this many seconds, for at most this many addresses.

    Use :meth:`aresolve` (the handler does); :meth:`resolve` works only
    without userdbs. :meth:`record` gives the record a path was resolved
    with (for quota), :meth:`sieve_script` that user's Sieve script.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        userdbs: Sequence[UserDB] = (),
        mail_location: str | None = None,
        mail_home: str | None = None,
        cache_ttl: float = 5.0,
        cache_size: int = 10_000,
        **kwargs: object,
    ) -> None:
        super().__init__(root, **kwargs)  # type: ignore[arg-type]
        for db in userdbs:
            if not isinstance(db, UserDB):
                raise TypeError(f"userdbs must implement UserDB, not {type(db).__name__}")
        if mail_location is not None:
            _location(mail_location)  # ValueError now, not at the first RCPT
        cache_ttl = validate.seconds("cache_ttl", cache_ttl, infinite=True)  # inf: keep
        validate.count("cache_size", cache_size)
        self.userdbs = list(userdbs)
        self.mail_location = mail_location
        self.mail_home = mail_home
        self.cache_ttl = cache_ttl
        self.cache_size = cache_size
        self._cache: OrderedDict[UserKey, tuple[float, str | RecipientRejected]] = OrderedDict()
        self._records: OrderedDict[str, UserRecord] = OrderedDict()
        self.lookups = 0
        """Database lookups made (cache misses)."""
        self._as_root = os.geteuid() == 0 and bool(self.userdbs)
        self._owned: OrderedDict[str, None] = OrderedDict()  # Maildirs already given
        _live.add(self)

    def __repr__(self) -> str:
        return f"UserdbResolver(root={str(self.root)!r}, userdbs={self.userdbs!r})"

    def reload(self) -> None:
        """Drop cached answers and make every database re-read its source."""
        self._cache.clear()
        for db in self.userdbs:
            db.reload()

    async def aclose(self) -> None:
        """Close every database (connection pools)."""
        for db in self.userdbs:
            await db.aclose()

    def record(self, path: str) -> UserRecord | None:
        """The record of the last address resolved to ``path`` (or its Maildir)."""
        return self._records.get(path)

    def sieve_script(self, path: str) -> str | None:
        """The user's own Sieve script for Maildir ``path``, where Pigeonhole looks.

        The record's ``sieve`` (a path, or Pigeonhole's ``file:DIR;active=PATH``
        location, whose active script counts; ``~`` and relative paths are
        under the home), else ``~/.dovecot.sieve`` when the record has a home.
        ``None`` when no record is known for ``path`` (or, for a ``.folder``,
        for its Maildir) or it gives neither: the caller's default applies.
        A dict lookup; no disk access.
        """
        record = self._records.get(path)
        if record is None:
            head, tail = os.path.split(path.rstrip(os.sep))
            if tail.startswith("."):
                record = self._records.get(head)
        if record is None:
            return None
        home = record.home
        if not record.sieve:
            return None if home is None else os.path.join(home, ".dovecot.sieve")
        location = record.sieve.removeprefix("file:")
        script, _, options = location.partition(";")
        for option in options.split(";"):
            name, _, value = option.partition("=")
            if name == "active" and value:
                script = value
        if script == "~" or script.startswith("~/"):
            if home is None:
                _log.error("sieve location %r uses ~ but the user has no home", record.sieve)
                return None
            script = home + script[1:]
        if not os.path.isabs(script):
            if home is None:
                _log.error("sieve location %r is relative but the user has no home", record.sieve)
                return None
            script = os.path.join(home, script)
        return script

    def resolve(self, address: str, *, smtputf8: bool = False) -> str:
        """As :meth:`MailboxResolver.resolve`, for templates only (no userdbs)."""
        if self.userdbs:
            raise RuntimeError("a resolver with user databases resolves with aresolve()")
        key, detail = self._key(address, smtputf8)
        home = None if self.mail_home is None else expand(self.mail_home, key)
        return self._finish(key, detail, UserRecord(home=home))

    async def aresolve(self, address: str, *, smtputf8: bool = False) -> str:
        """The Maildir path for ``address``; :class:`RecipientRejected` if none.

        A cached answer costs a dict lookup; a miss costs the databases' lookups.
        """
        key, detail = self._key(address, smtputf8)
        now = time.monotonic()
        hit = self._cache.get(key)
        # A path whose record fell out of _records is looked up again: quota needs it.
        if hit is not None and hit[0] > now and self._has_record(hit[1]):
            answer = hit[1]
        else:
            answer = await self._lookup(key)
            if self.cache_ttl > 0:
                self._cache[key] = (now + self.cache_ttl, answer)
                self._cache.move_to_end(key)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        if isinstance(answer, RecipientRejected):
            raise RecipientRejected(answer.code, answer.text)
        if self._as_root and answer not in self._owned:
            await self._give(answer)
        # Only the folder check and existing_only touch the disk here.
        return self._with_detail(key, detail, answer)

    # -- internals ---------------------------------------------------------

    def _has_record(self, answer: str | RecipientRejected) -> bool:
        if isinstance(answer, RecipientRejected):
            return True
        if answer in self._records:
            self._records.move_to_end(answer)
            return True
        return False

    async def _give(self, path: str) -> None:
        """Root, and the user has a uid: their Maildir is made theirs, once per path."""
        record = self._records.get(path)
        if record is not None and record.uid:
            try:
                await asyncio.to_thread(give_maildir, path, record.uid, record.gid, record.home)
            except OSError as exc:
                _log.error("cannot give %s to uid %d: %s", path, record.uid, exc)
                raise RecipientRejected(_TEMPFAIL, "Cannot prepare the mailbox") from exc
        self._owned[path] = None
        while len(self._owned) > self.cache_size:
            self._owned.popitem(last=False)

    def _key(self, address: str, smtputf8: bool) -> tuple[UserKey, str]:
        if not isinstance(address, str):
            raise RecipientRejected(_BAD, "address is not text")
        local, domain, detail = self._split(address, smtputf8)
        if self.domains is not None and domain not in self.domains:
            raise RecipientRejected("550 5.7.1", f"domain {domain!r} is not served here")
        ext = ""
        if self.recipient_delimiter is not None:
            ext = address.rpartition("@")[0].partition(self.recipient_delimiter)[2].lower()
        return UserKey(local, domain, ext), detail

    async def _lookup(self, key: UserKey) -> str | RecipientRejected:
        self.lookups += 1
        record = None if self.userdbs else UserRecord()  # templates only: everyone exists
        try:
            for db in self.userdbs:
                record = await db.lookup(key)
                if record is not None:
                    break
        except UserdbUnavailable as exc:
            _log.warning("user database lookup of <%s> failed: %s", key.user, exc)
            # Not cached: the next attempt asks again.
            raise RecipientRejected(_TEMPFAIL, "Temporary user database failure") from exc
        if record is None:
            return RecipientRejected(_UNKNOWN, f"no such user: {key.user}")
        if record.home is None and self.mail_home is not None:
            record = dataclasses.replace(record, home=expand(self.mail_home, key))
        try:
            path = self._maildir(key, record)
        except RecipientRejected as exc:
            return exc
        self._records[path] = record
        self._records.move_to_end(path)
        while len(self._records) > self.cache_size:
            self._records.popitem(last=False)
        return path

    def _finish(self, key: UserKey, detail: str, record: UserRecord) -> str:
        return self._with_detail(key, detail, self._maildir(key, record))

    def _with_detail(self, key: UserKey, detail: str, path: str) -> str:
        if self.existing_only and not os.path.isdir(os.path.join(path, "new")):
            raise RecipientRejected(_UNKNOWN, f"no such mailbox: {key.user}")
        if detail:
            folder = os.path.join(path, "." + detail)
            if os.path.isdir(folder):
                return folder
        return path

    def _maildir(self, key: UserKey, record: UserRecord) -> str:
        template = record.mail or self.mail_location
        if template is None:
            if record.home is None:
                return self._inside_root(os.path.join(key.domain, key.local))
            template = "~/Maildir"
        try:
            path = expand(_location(template), key, record.home)
        except ValueError as exc:
            _log.error("mail location of <%s>: %s", key.user, exc)
            raise RecipientRejected(_TEMPFAIL, "Mail location misconfigured") from None
        if path == "~" or path.startswith("~/"):
            if record.home is None:
                _log.error("mail location of <%s> uses ~ but the user has no home", key.user)
                raise RecipientRejected(_TEMPFAIL, "Mail location misconfigured")
            path = record.home + path[1:]
        return self._allowed(path, record.home)

    def _allowed(self, path: str, home: str | None) -> str:
        full = os.path.normpath(os.path.join(self.root, path))
        if "\0" in full:
            raise RecipientRejected(_BAD, "address maps to an invalid path")
        if full.startswith(self._root_prefix):
            return self._inside_root(full)
        if home is not None and os.path.isabs(home):
            h = os.path.normpath(home)
            if full == h or full.startswith(h + os.sep):
                return full
        raise RecipientRejected(_BAD, "address maps outside the mail root and home")
