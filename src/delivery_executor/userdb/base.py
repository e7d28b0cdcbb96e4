"""What a user database answers, and the protocol every backend implements."""

from __future__ import annotations

import grp
import pwd
import re
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

__all__ = ["UserDB", "UserKey", "UserRecord", "expand", "parse_fields"]

_VAR = re.compile(r"%(?:\{([a-z]+)\}|([%undh]))")
_LONG = {"user": "u", "username": "n", "domain": "d", "home": "h"}


@dataclass(frozen=True)
class UserKey:
    """A recipient as a user database sees it, already checked and lowercased.

    ``user`` is ``local@domain`` (Dovecot's ``%u``); ``extension`` is what
    followed the recipient delimiter (``""`` if none).
    """

    local: str
    domain: str
    extension: str = ""

    @property
    def user(self) -> str:
        return f"{self.local}@{self.domain}"


@dataclass(frozen=True)
class UserRecord:
    """One user's settings; every field may be unknown (``None``).

    ``mail`` is a Dovecot mail location (``maildir:~/Maildir``) or a plain
    path; ``quota_rule`` uses Dovecot's syntax (``*:storage=1G``).
    """

    home: str | None = None
    mail: str | None = None
    uid: int | None = None
    gid: int | None = None
    quota_rule: str | None = None
    sieve: str | None = None

    def merged(self, fields: dict[str, str], key: UserKey) -> UserRecord:
        """This record with ``fields`` (name → template) set where they name a field."""
        changes: dict[str, object] = {}
        for name, value in fields.items():
            if name in ("uid", "gid"):
                changes[name] = user_id(value) if name == "uid" else group_id(value)
            elif name in ("home", "mail", "quota_rule", "sieve"):
                changes[name] = value
        rec = replace(self, **changes)  # type: ignore[arg-type]
        home = None if rec.home is None else expand(rec.home, key)
        return replace(
            rec,
            home=home,
            mail=None if rec.mail is None else expand(rec.mail, key, home),
            sieve=None if rec.sieve is None else expand(rec.sieve, key, home),
        )


@runtime_checkable
class UserDB(Protocol):
    """A user database: ``await lookup(key)`` → the record, or ``None`` if unknown.

    Raises :class:`~delivery_executor.errors.UserdbUnavailable` when it cannot
    answer. ``reload()`` drops anything cached (SIGHUP); ``aclose()`` frees
    connections.
    """

    async def lookup(self, key: UserKey, /) -> UserRecord | None: ...

    def reload(self) -> None: ...

    async def aclose(self) -> None: ...


def expand(template: str, key: UserKey, home: str | None = None) -> str:
    """``%u %n %d %h`` (and ``%{user}`` etc.) of ``template`` for ``key``; ``%%`` is ``%``.

    A template with ``%h`` but no known home raises ``ValueError``.
    """
    if "%" not in template:
        return template

    def sub(m: re.Match[str]) -> str:
        var = m.group(2) or _LONG.get(m.group(1), "")
        if var == "%":
            return "%"
        if var == "u":
            return key.user
        if var == "n":
            return key.local
        if var == "d":
            return key.domain
        if var == "h":
            if home is None:
                raise ValueError(f"{template!r} uses %h but the user has no home")
            return home
        raise ValueError(f"unknown variable {m.group(0)!r} in {template!r}")

    return _VAR.sub(sub, template)


def parse_fields(text: str, *, prefix: str = "") -> dict[str, str]:
    """``"a=1 b=2"`` → ``{"a": "1", "b": "2"}``; with ``prefix``, only keys that
    start with it (prefix removed). A word without ``=`` is a ``ValueError``."""
    out: dict[str, str] = {}
    for word in text.split():
        name, eq, value = word.partition("=")
        if not eq or not name:
            raise ValueError(f"field {word!r} is not name=value")
        if prefix:
            if not name.startswith(prefix):
                continue
            name = name[len(prefix) :]
        out[name] = value
    return out


def user_id(value: str) -> int:
    """A uid from a number or a user name (``ValueError`` if neither)."""
    if value.isdigit():
        return int(value)
    try:
        return pwd.getpwnam(value).pw_uid
    except KeyError:
        raise ValueError(f"no such user {value!r}") from None


def group_id(value: str) -> int:
    """A gid from a number or a group name (``ValueError`` if neither)."""
    if value.isdigit():
        return int(value)
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise ValueError(f"no such group {value!r}") from None
