"""``serve``'s user database and quota options: one block, shared by ``cli``."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_arguments", "config_fields"]


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``--userdb`` and friends to ``p``."""
    g = p.add_argument_group("user database and quota")
    g.add_argument(
        "--userdb",
        action="append",
        metavar="KIND:ARG",
        help="passwd-file:PATH, texthash:PATH, lmdb:PATH, cdb:PATH or sql:URL (sqlite:///PATH,"
        " postgresql://...); repeatable, tried in order; unknown users get 550 5.1.1",
    )
    g.add_argument(
        "--userdb-default-fields",
        default="",
        metavar="FIELDS",
        help="fields a passwd-file line leaves out, e.g. 'uid=vmail home=/var/mail/%%d/%%n'"
        " (Dovecot's default_fields)",
    )
    g.add_argument(
        "--user-query",
        metavar="SQL",
        help="query for sql: userdbs; $1 is the address; columns home, mail, uid, gid,"
        " quota_rule, sieve",
    )
    g.add_argument(
        "--mail-location",
        metavar="TEMPLATE",
        help="Dovecot mail_location for users without a mail field: %%d/%%n/Maildir"
        " (under --root), maildir:~/Maildir (needs a home)",
    )
    g.add_argument(
        "--mail-home",
        metavar="TEMPLATE",
        help="home for users without one, e.g. /var/mail/%%d/%%n (Dovecot's mail_home)",
    )
    g.add_argument(
        "--userdb-cache-ttl",
        type=_non_negative_float,
        default=5.0,
        metavar="SECONDS",
        help="how long a lookup's answer is reused (0: every RCPT asks)",
    )
    add_quota_arguments(p)


def _fraction(text: str) -> float:
    value = text.strip()
    number = _non_negative_float(value[:-1] if value.endswith("%") else value)
    return number / 100 if value.endswith("%") else number


def _quota_rule(text: str) -> str:
    from ..quota import parse_quota_rule

    try:
        parse_quota_rule(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_quota_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``--quota-rule`` and friends to ``p``."""
    g = p.add_argument_group("quota (Maildir++ maildirsize, as Dovecot's quota = maildir)")
    g.add_argument(
        "--quota-rule",
        type=_quota_rule,
        metavar="RULE",
        help="default for users whose userdb record has no quota_rule: *:storage=1G,"
        " *:messages=10000, *:storage=1G:messages=10000 (storage without unit: KiB)",
    )
    g.add_argument(
        "--quota-grace",
        type=_fraction,
        default=0.10,
        metavar="FRACTION",
        help="how far past the storage limit one delivery may go, if the mailbox was under"
        " it (0.1 or 10%%)",
    )
    g.add_argument(
        "--quota-full-tempfail",
        action="store_true",
        help="answer a full mailbox with 452 4.2.2 (retry later) instead of 552 5.2.2",
    )
    g.add_argument(
        "--quota-check-at-rcpt",
        action="store_true",
        help="refuse a full mailbox at RCPT already (with SIZE= from MAIL FROM)",
    )


def config_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The ServerConfig keyword arguments these options set."""
    return {
        "userdb": tuple(args.userdb or ()),
        "userdb_default_fields": args.userdb_default_fields,
        "user_query": args.user_query,
        "mail_location": args.mail_location,
        "mail_home": args.mail_home,
        "userdb_cache_ttl": args.userdb_cache_ttl,
        "quota_rule": args.quota_rule,
        "quota_grace": args.quota_grace,
        "quota_full_tempfail": args.quota_full_tempfail,
        "quota_check_at_rcpt": args.quota_check_at_rcpt,
    }
