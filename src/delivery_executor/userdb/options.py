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
        help="passwd-file:PATH, texthash:PATH, lmdb:PATH or sql:URL (sqlite:///PATH,"
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


def config_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The ServerConfig keyword arguments these options set."""
    return {
        "userdb": tuple(args.userdb or ()),
        "userdb_default_fields": args.userdb_default_fields,
        "user_query": args.user_query,
        "mail_location": args.mail_location,
        "mail_home": args.mail_home,
        "userdb_cache_ttl": args.userdb_cache_ttl,
    }
