"""User databases: which addresses exist, where their Maildir is, their quota.

Each form implements :class:`UserDB` and can be used from the library as well
as through ``serve --userdb``; :class:`UserdbResolver` plugs them into the
handler's recipient checks.

- ``passwd-file:PATH``: Dovecot's passwd-file (:class:`PasswdFile`);
- ``texthash:PATH``, ``lmdb:PATH``, ``cdb:PATH``: Postfix ``virtual_mailbox_maps``
  (:class:`TexthashMap`, :class:`LmdbMap`, :class:`CdbMap`);
- ``sql:sqlite:///PATH``, ``sql:postgresql://...`` with a query
  (:class:`SqliteUserdb`, :class:`PostgresUserdb`).
"""

from __future__ import annotations

from typing import Any

from ..quota import QuotaDeliverer
from .base import UserDB, UserKey, UserRecord, expand, parse_fields
from .passwd import PasswdFile
from .postfix import CdbMap, LmdbMap, TexthashMap
from .resolver import UserdbResolver, reload_all
from .sql import PostgresUserdb, SqliteUserdb, sql_userdb

__all__ = [
    "CdbMap",
    "LmdbMap",
    "PasswdFile",
    "PostgresUserdb",
    "SqliteUserdb",
    "TexthashMap",
    "UserDB",
    "UserKey",
    "UserRecord",
    "UserdbResolver",
    "expand",
    "open_userdb",
    "parse_fields",
    "quota_for",
    "reload_all",
    "resolver_for",
]

KINDS = ("passwd-file", "texthash", "lmdb", "cdb", "sql")


def open_userdb(
    spec: str,
    *,
    default_fields: str = "",
    user_query: str | None = None,
    recipient_delimiter: str | None = None,
) -> UserDB:
    """The database ``spec`` names (``passwd-file:/etc/dovecot/users``, ...).

    ``ValueError`` naming the problem for an unknown kind, a missing path or
    query, or a backend whose package is not installed.
    """
    kind, colon, arg = spec.partition(":")
    if not colon or kind not in KINDS or not arg:
        raise ValueError(f"--userdb must be one of {', '.join(k + ':...' for k in KINDS)},"
                         f" not {spec!r}")  # fmt: skip
    delim = recipient_delimiter or "+"
    try:
        if kind == "passwd-file":
            return PasswdFile(arg, default_fields=default_fields)
        if kind == "texthash":
            return TexthashMap(arg, delimiter=delim)
        if kind == "lmdb":
            return LmdbMap(arg, delimiter=delim)
        if kind == "cdb":
            return CdbMap(arg, delimiter=delim)
        return sql_userdb(arg, user_query)
    except ImportError as exc:
        raise ValueError(
            f"--userdb {kind}: needs the {exc.name} package (pip install delivery-executor[userdb])"
        ) from exc


def resolver_for(config: object) -> UserdbResolver | None:
    """The resolver ``serve`` uses for a ServerConfig, or ``None`` when it sets no
    userdb or mail location (the plain :class:`MailboxResolver` then)."""
    c: Any = config
    if not c.userdb and c.mail_location is None and c.mail_home is None:
        return None
    dbs = [
        open_userdb(
            spec,
            default_fields=c.userdb_default_fields,
            user_query=c.user_query,
            recipient_delimiter=c.recipient_delimiter,
        )
        for spec in c.userdb
    ]
    return UserdbResolver(
        c.root,
        userdbs=dbs,
        mail_location=c.mail_location,
        mail_home=c.mail_home,
        cache_ttl=c.userdb_cache_ttl,
        domains=c.domains,
        recipient_delimiter=c.recipient_delimiter,
        existing_only=c.existing_only,
        detail_to_folder=c.detail_to_folder,
    )


def quota_for(config: object, executor: object, resolver: object) -> QuotaDeliverer | None:
    """``executor`` wrapped in a :class:`~delivery_executor.quota.QuotaDeliverer` when the
    config sets ``--quota-rule`` or a userdb (whose records may carry a rule), else ``None``."""
    import functools

    from ..errors import UserdbUnavailable
    from ..quota import QuotaLimits, maildir_of, parse_quota_rule

    c: Any = config
    if c.quota_rule is None and not c.userdb:
        return None
    default = None if c.quota_rule is None else parse_quota_rule(c.quota_rule)
    parse = functools.lru_cache(maxsize=256)(parse_quota_rule)
    records = resolver if isinstance(resolver, UserdbResolver) else None

    def limits_for(maildir: str) -> QuotaLimits | None:
        record = None if records is None else records.record(maildir)
        if record is None or record.quota_rule is None:
            return default
        try:
            return parse(record.quota_rule)
        except ValueError as exc:  # the database's data: defer, and say why
            raise UserdbUnavailable(f"user quota_rule: {exc}") from exc

    def maildir_for(path: str) -> str:
        if records is not None and records.record(path) is not None:
            return path
        return maildir_of(path)

    return QuotaDeliverer(
        executor,
        limits_for,
        grace=c.quota_grace,
        tempfail=c.quota_full_tempfail,
        check_at_rcpt=c.quota_check_at_rcpt,
        maildir_for=maildir_for,
    )
