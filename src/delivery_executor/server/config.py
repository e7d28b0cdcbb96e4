""":class:`ServerConfig`, everything ``serve`` needs, and the ``serve`` flags built from it.

Each field carries its flag in its metadata (:mod:`.options`): the parser
(:func:`add_arguments`) and the config built from parsed arguments
(:func:`from_args`) both come from the fields, so a default is stated once,
here. The config file (:mod:`delivery_executor.configfile`) is built from the
parser in turn.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..executor import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_CONCURRENT_FLUSHES,
    DEFAULT_MAX_WAIT,
    POLICIES,
    WRITERS,
    BatchPolicy,
    WriterName,
)
from ..smtp import DEFAULT_MAX_MESSAGE_SIZE, LINE_ENDINGS, LineEndings
from ..smtp.sessions import (
    DEFAULT_MAX_CONNECTIONS_PER_IP,
    DEFAULT_MIN_RATE,
    DEFAULT_SESSION_TIMEOUT,
    DEFAULT_TRUSTED_NETWORKS,
    trusted_networks_option,
)
from ..store.commit import SYNC_MODES, SyncMode
from ..userdb.options import fraction, non_negative_float, quota_rule
from .identity import check_hostname
from .listeners import ListenSpec
from .loops import LOOPS, default_loop
from .metrics import parse_address
from .options import (
    Flag,
    Option,
    arg,
    group_id,
    non_negative_int,
    octal_mode,
    option,
    positive_int,
    seconds,
    worker_count,
)

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "ServerConfig",
    "add_arguments",
    "from_args",
    "metric_labels",
]

DEFAULT_MAX_CONNECTIONS = 256

_USERDB = "user database and quota"
_SMTP = "SMTP instead of LMTP"
_QUOTA = "quota (Maildir++ maildirsize, as Dovecot's quota = maildir)"


def _resolved(paths: Sequence[Path]) -> tuple[Path, ...]:
    return tuple(p.resolve() for p in paths)


def _listeners(plain: Sequence[ListenSpec] | None, tls: Sequence[ListenSpec] | None) -> Any:
    return (*(plain or ()), *(tls or ()))


def _none(_: object) -> None:
    return None


def _not(value: bool) -> bool:
    return not value


@dataclass
class ServerConfig:
    """Everything ``serve`` needs; each field is one ``serve`` option (two for a pair)."""

    root: Path = field(
        metadata=option(
            "--root", "root", type=Path, default=Path("maildirs"), help="root of all Maildirs",
            to_config=Path.resolve,
        )
    )  # fmt: skip
    # -- listeners
    listen: Sequence[ListenSpec] = field(
        default=(),
        metadata=option(
            "--listen",
            "listen",
            type=arg(ListenSpec.parse),
            action="append",
            metavar="ADDRESS",
            help="HOST:PORT, [IPv6]:PORT, unix:PATH or fd:N (repeatable; default: 127.0.0.1:2525"
            " unless --tls-listen or systemd sockets are given)",
            also=(
                Flag(
                    ("--tls-listen",),
                    "tls_listen",
                    {
                        "type": arg(functools.partial(ListenSpec.parse, implicit_tls=True)),
                        "action": "append",
                        "metavar": "ADDRESS",
                        "help": "also listen here with implicit TLS (port-465 style);"
                        " as --listen (repeatable)",
                    },
                ),
            ),
            to_cli=_none,
            to_config=_listeners,
        ),
    )
    """Listeners (``--listen``, ``--tls-listen``); with none, and no systemd
    socket, ``127.0.0.1:2525``."""
    socket_mode: int = field(
        default=0o660,
        metadata=option(
            "--socket-mode",
            "socket_mode",
            type=octal_mode,
            help="permissions of the UNIX socket files serve creates (octal)",
            to_cli="{:04o}".format,
        ),
    )
    """Permissions of the UNIX socket files ``serve`` creates."""
    socket_gid: int | None = field(
        default=None,
        metadata=option(
            "--socket-group",
            "socket_group",
            type=group_id,
            metavar="GROUP",
            help="group of those socket files, e.g. postfix; needs membership of it (default:"
            " the directory's group if it is setgid, else the process's group)",
        ),
    )
    """Group to give those files (e.g. Postfix's), or keep the process's."""
    # -- what is accepted and how it is batched
    lmtp: bool = field(
        default=True,
        metadata=option(
            "--lmtp",
            "lmtp",
            action="store_true",
            help="LMTP",
            also=(Flag(("--smtp",), "lmtp", {"action": "store_false", "help": _SMTP}),),
            exclusive=True,
        ),
    )
    domains: Sequence[str] | None = field(
        default=None,
        metadata=option(
            "--domain", "domain", action="append", help="accepted domain (repeatable; default: any)"
        ),
    )
    recipient_delimiter: str | None = field(
        default=None,
        metadata=option(
            "--recipient-delimiter", "recipient_delimiter", help="e.g. + to map a+tag@d to a@d"
        ),
    )
    existing_only: bool = field(
        default=False,
        metadata=option(
            "--existing-only",
            "existing_only",
            action="store_true",
            help="reject unknown mailboxes at RCPT",
        ),
    )
    max_message_size: int = field(
        default=DEFAULT_MAX_MESSAGE_SIZE,
        metadata=option("--max-size", "max_size", type=positive_int, help="bytes/message"),
    )
    max_connections: int = field(
        default=DEFAULT_MAX_CONNECTIONS,
        metadata=option(
            "--max-connections",
            "max_connections",
            type=positive_int,
            help="open sessions at most; more get 421",
        ),
    )
    max_batch: int = field(
        default=DEFAULT_MAX_BATCH,
        metadata=option("--max-batch", "max_batch", type=positive_int, help="messages per commit"),
    )
    max_wait: float = field(
        default=DEFAULT_MAX_WAIT,
        metadata=option(
            "--max-wait-ms",
            "max_wait_ms",
            type=seconds,
            help="how long the window policy holds a batch open",
            to_cli=lambda s: s * 1000,
            to_config=lambda ms: ms / 1000.0,
        ),
    )
    """Seconds; the flag takes milliseconds."""
    max_concurrent_flushes: int = field(
        default=DEFAULT_MAX_CONCURRENT_FLUSHES,
        metadata=option(
            "--max-concurrent-flushes",
            "max_concurrent_flushes",
            type=positive_int,
            help="batches written at once",
        ),
    )
    policy: BatchPolicy = field(
        default="eager",
        metadata=option("--policy", "policy", choices=POLICIES, help="batching policy"),
    )
    sync: SyncMode = field(
        default="auto",
        metadata=option("--sync", "sync", choices=SYNC_MODES, help="how batches are synced"),
    )
    writer: WriterName = field(
        default="process",
        metadata=option(
            "--writer",
            "writer",
            choices=WRITERS,
            help="where batches are written: a helper process, the loop (syncs in a thread),"
            " or a thread",
        ),
    )
    """Where batches are written: ``"process"`` (a helper process, the default:
    the loop keeps its core), ``"loop"`` (on the loop, syncs in a thread) or
    ``"thread"``."""
    add_headers: bool = field(
        default=True,
        metadata=option(
            "--no-headers",
            "no_headers",
            action="store_true",
            help="do not prepend trace headers",
            to_cli=_not,
            to_config=_not,
        ),
    )
    dsn: bool = field(
        default=True,
        metadata=option(
            "--no-dsn",
            "no_dsn",
            action="store_true",
            help="do not advertise DSN (Postfix then sends success notices itself)",
            to_cli=_not,
            to_config=_not,
        ),
    )
    """Advertise DSN (RFC 3461). With it, Postfix passes ``NOTIFY=SUCCESS`` on
    and leaves the success notice to us, and ``serve`` sends none; without it,
    Postfix sends the notice itself (as "relayed", RFC 3461 section 4.1)."""
    workers: int = field(
        default=1,
        metadata=option(
            "--workers",
            "workers",
            type=worker_count,
            metavar="N|auto",
            help="server processes sharing the listeners; auto: one per usable CPU",
        ),
    )
    reuse_port: bool = field(
        default=False,
        metadata=option("--reuse-port", "reuse_port", action="store_true", help=argparse.SUPPRESS),
    )
    handler: str | None = field(
        default=None,
        metadata=option(
            "--handler",
            "handler",
            metavar="MODULE:FACTORY",
            help="use FACTORY(executor, resolver, config) as the aiosmtpd handler",
        ),
    )
    """``"module:factory"``: ``factory(executor, resolver, config)`` returns the
    aiosmtpd handler to use instead of :class:`DeliveryHandler`."""
    # -- deployment: TLS, identity, event loop, stopping
    tls_cert: Path | None = field(
        default=None,
        metadata=option(
            "--tls-cert", "tls_cert", type=Path, metavar="FILE", help="PEM certificate chain"
        ),
    )
    """PEM certificate chain: with ``tls_key``, turns STARTTLS on."""
    tls_key: Path | None = field(
        default=None,
        metadata=option(
            "--tls-key",
            "tls_key",
            type=Path,
            metavar="FILE",
            help="PEM private key; with --tls-cert, STARTTLS is offered (both re-read on SIGHUP)",
        ),
    )
    require_starttls: bool = field(
        default=False,
        metadata=option(
            "--require-starttls",
            "require_starttls",
            action="store_true",
            help="refuse MAIL (530) until the client has done STARTTLS",
        ),
    )
    """Refuse MAIL (``530``) on a connection that has not done STARTTLS."""
    hostname: str | None = field(
        default=None,
        metadata=option(
            "--hostname",
            "hostname",
            type=arg(check_hostname),
            help="name in the banner, LHLO/EHLO and Received lines (default: this host's FQDN)",
        ),
    )
    """Name in the banner, LHLO/EHLO and ``Received: by``; default: the FQDN."""
    banner_version: bool = field(
        default=False,
        metadata=option(
            "--banner-version",
            "banner_version",
            action="store_true",
            help="name the software and its version in the banner",
        ),
    )
    """Name the software and its version in the banner."""
    loop: str = field(
        default_factory=default_loop,
        metadata=option("--loop", "loop", choices=LOOPS, help="event loop"),
    )
    """``"uvloop"`` (default when installed) or ``"asyncio"``."""
    grace: float = field(
        default=10.0,
        metadata=option(
            "--grace",
            "grace",
            type=seconds,
            help="seconds open sessions get to finish after SIGTERM/SIGINT (new MAIL gets"
            " 421 4.3.2); then they get 421 4.3.2 and are closed, and the rest is drained",
        ),
    )
    """Seconds to let open sessions finish after a stop signal."""
    # -- Dovecot's on-disk conventions and watching it run
    line_endings: LineEndings = field(
        default="lf",
        metadata=option(
            "--line-endings",
            "line_endings",
            choices=LINE_ENDINGS,
            help="line ends on disk: lf, as Dovecot (mail_save_crlf=no) and Postfix's local"
            " delivery store mail, or crlf, the body exactly as received",
        ),
    )
    """``"lf"``: store CRLF as LF, as Dovecot and Postfix's local delivery do."""
    size_in_names: bool = field(
        default=True,
        metadata=option(
            "--no-size-names",
            "size_in_names",
            action="store_false",
            help="do not end file names with Dovecot's ,S=<size>,W=<size with CRLF>",
        ),
    )
    """End file names with ``,S=<size>,W=<size with CRLF>`` as Dovecot does."""
    detail_to_folder: bool = field(
        default=False,
        metadata=option(
            "--detail-to-folder",
            "detail_to_folder",
            action="store_true",
            help="deliver user+box@domain into the Maildir++ folder .box when it exists, else"
            " INBOX (Dovecot's lmtp_save_to_detail_mailbox; needs --recipient-delimiter)",
        ),
    )
    """``user+box@d`` into the Maildir++ folder ``.box`` when it exists."""
    duplicate_window: float = field(
        default=0.0,
        metadata=option(
            "--duplicate-window",
            "duplicate_window",
            type=seconds,
            metavar="SECONDS",
            help="answer 250 without storing again a message whose Message-ID the same"
            " mailbox got within SECONDS (0, the default: off)",
        ),
    )
    """Seconds during which a Message-ID already in a mailbox is not stored again; 0: off."""
    metrics: tuple[str, int] | None = field(
        default=None,
        metadata=option(
            "--metrics",
            "metrics",
            type=arg(parse_address),
            metavar="HOST:PORT",
            help="serve Prometheus metrics at http://HOST:PORT/metrics (needs the 'metrics'"
            " extra: prometheus_client)",
        ),
    )
    """``(host, port)`` to serve Prometheus metrics on (see :mod:`.metrics`)."""
    # -- hostile load (SessionFactory; see delivery_executor.smtp.sessions)
    max_connections_per_ip: int = field(
        default=DEFAULT_MAX_CONNECTIONS_PER_IP,
        metadata=option(
            "--max-connections-per-ip",
            "max_connections_per_ip",
            type=non_negative_int,
            help="sessions per peer (IPv4 address or IPv6 /64; Unix sockets exempt); 0: no cap",
        ),
    )
    """Sessions per peer (IPv4 address or IPv6 /64); 0: no cap."""
    session_timeout: float = field(
        default=DEFAULT_SESSION_TIMEOUT,
        metadata=option(
            "--session-timeout",
            "session_timeout",
            type=seconds,
            help="seconds a session may last before 421 4.4.2",
        ),
    )
    """Seconds a session may last."""
    min_rate: int = field(
        default=DEFAULT_MIN_RATE,
        metadata=option(
            "--min-rate",
            "min_rate",
            type=non_negative_int,
            help="bytes/s a client must average while the server waits on it"
            " (after 10 s of waiting); else 421 4.4.2. 0: no rule",
        ),
    )
    """Bytes/s a client must average while the server waits on it; 0: no rule."""
    max_pending_bytes: int | None = field(
        default=None,
        metadata=option(
            "--max-pending-bytes",
            "max_pending_bytes",
            type=positive_int,
            help="bytes held in DATA across sessions; past it DATA waits, then 451 4.3.1"
            " (default: 4 x --max-size)",
        ),
    )
    """Bytes held in DATA across sessions; ``None``: 4 × ``max_message_size``."""
    trusted_networks: tuple[str, ...] = field(
        default=DEFAULT_TRUSTED_NETWORKS,
        metadata=option(
            "--trusted-networks",
            "trusted_networks",
            type=arg(trusted_networks_option),
            metavar="CIDR,...",
            help="peers exempt from --max-connections-per-ip and --min-rate (the MTA in front;"
            " Unix sockets always are); '' for none",
            to_cli=",".join,
        ),
    )
    """Peers (CIDRs) exempt from the per-peer cap and ``min_rate``; Unix sockets always are."""
    # -- user database and quota (see delivery_executor.userdb, .quota)
    userdb: Sequence[str] = field(
        default=(),
        metadata=option(
            "--userdb",
            "userdb",
            group=_USERDB,
            action="append",
            metavar="KIND:ARG",
            help="passwd-file:PATH, texthash:PATH, lmdb:PATH, cdb:PATH or sql:URL"
            " (sqlite:///PATH, postgresql://...); repeatable, tried in order; unknown users"
            " get 550 5.1.1",
            to_cli=_none,
            to_config=lambda v: tuple(v or ()),
        ),
    )
    """``passwd-file:PATH``, ``texthash:PATH``, ``lmdb:PATH``, ``sql:URL``: tried in order."""
    userdb_default_fields: str = field(
        default="",
        metadata=option(
            "--userdb-default-fields",
            "userdb_default_fields",
            group=_USERDB,
            metavar="FIELDS",
            help="fields a passwd-file line leaves out, e.g. 'uid=vmail home=/var/mail/%%d/%%n'"
            " (Dovecot's default_fields)",
        ),
    )
    """``"uid=vmail home=/var/mail/%d/%n"``: fields a passwd-file line leaves out."""
    user_query: str | None = field(
        default=None,
        metadata=option(
            "--user-query",
            "user_query",
            group=_USERDB,
            metavar="SQL",
            help="query for sql: userdbs; $1 is the address; columns home, mail, uid, gid,"
            " quota_rule, sieve",
        ),
    )
    """SQL for ``sql:`` userdbs, with ``$1`` for the address."""
    mail_location: str | None = field(
        default=None,
        metadata=option(
            "--mail-location",
            "mail_location",
            group=_USERDB,
            metavar="TEMPLATE",
            help="Dovecot mail_location for users without a mail field: %%d/%%n/Maildir"
            " (under --root), maildir:~/Maildir (needs a home)",
        ),
    )
    """Dovecot's ``mail_location`` (``%d/%n/Maildir``, ``maildir:~/Maildir``)."""
    mail_home: str | None = field(
        default=None,
        metadata=option(
            "--mail-home",
            "mail_home",
            group=_USERDB,
            metavar="TEMPLATE",
            help="home for users without one, e.g. /var/mail/%%d/%%n (Dovecot's mail_home)",
        ),
    )
    """Home template (``/var/mail/%d/%n``) for users the userdb gives none."""
    userdb_cache_ttl: float = field(
        default=5.0,
        metadata=option(
            "--userdb-cache-ttl",
            "userdb_cache_ttl",
            group=_USERDB,
            type=non_negative_float,
            metavar="SECONDS",
            help="how long a lookup's answer is reused (0: every RCPT asks)",
        ),
    )
    """Seconds a lookup's answer is reused server-wide (0: never)."""
    quota_rule: str | None = field(
        default=None,
        metadata=option(
            "--quota-rule",
            "quota_rule",
            group=_QUOTA,
            type=quota_rule,
            metavar="RULE",
            help="default for users whose userdb record has no quota_rule: *:storage=1G,"
            " *:messages=10000, *:storage=1G:messages=10000 (storage without unit: KiB)",
        ),
    )
    """Default Dovecot quota rule (``*:storage=1G``) for users whose record has none."""
    quota_grace: float = field(
        default=0.10,
        metadata=option(
            "--quota-grace",
            "quota_grace",
            group=_QUOTA,
            type=fraction,
            metavar="FRACTION",
            help="how far past the storage limit one delivery may go, if the mailbox was under"
            " it (0.1 or 10%%)",
        ),
    )
    """Fraction of the storage limit one delivery may go past (Dovecot 2.3's 10 %)."""
    quota_full_tempfail: bool = field(
        default=False,
        metadata=option(
            "--quota-full-tempfail",
            "quota_full_tempfail",
            group=_QUOTA,
            action="store_true",
            help="answer a full mailbox with 452 4.2.2 (retry later) instead of 552 5.2.2",
        ),
    )
    """Answer a full mailbox with ``452 4.2.2`` instead of ``552 5.2.2``."""
    quota_check_at_rcpt: bool = field(
        default=False,
        metadata=option(
            "--quota-check-at-rcpt",
            "quota_check_at_rcpt",
            group=_QUOTA,
            action="store_true",
            help="refuse a full mailbox at RCPT already (with SIZE= from MAIL FROM)",
        ),
    )
    """Refuse a full mailbox already at RCPT (with ``SIZE=`` from MAIL FROM)."""
    # -- Sieve filtering (delivery_executor.sieve)
    sieve: bool = field(
        default=False,
        metadata=option(
            "--sieve",
            "sieve",
            action="store_true",
            help="run each user's .dovecot.sieve (in their Maildir directory) at delivery;"
            " implied by --sieve-before/--sieve-after/--sieve-default",
        ),
    )
    """Run each user's ``.dovecot.sieve`` (in their Maildir directory) at delivery;
    implied by the three options below."""
    sieve_before: Sequence[Path] = field(
        default=(),
        metadata=option(
            "--sieve-before",
            "sieve_before",
            type=Path,
            action="append",
            metavar="PATH",
            help="admin Sieve script run before the user's (Pigeonhole's sieve_before; repeatable)",
            to_cli=list,
            to_config=_resolved,
        ),
    )
    """Admin scripts run before the user's (Pigeonhole's ``sieve_before``)."""
    sieve_after: Sequence[Path] = field(
        default=(),
        metadata=option(
            "--sieve-after",
            "sieve_after",
            type=Path,
            action="append",
            metavar="PATH",
            help="admin Sieve script run after the user's (sieve_after; repeatable)",
            to_cli=list,
            to_config=_resolved,
        ),
    )
    """Admin scripts run after the user's (``sieve_after``)."""
    sieve_default: Path | None = field(
        default=None,
        metadata=option(
            "--sieve-default",
            "sieve_default",
            type=Path,
            metavar="PATH",
            help="Sieve script for users without their own (sieve_default)",
            to_config=lambda p: p.resolve() if p else None,
        ),
    )
    """The script for users without their own (``sieve_default``)."""


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one option (or pair) per :class:`ServerConfig` field to ``parser``, in field order."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(ServerConfig):
        opt: Option = f.metadata["cli"]
        target: Any = parser
        if opt.group is not None:
            if opt.group not in groups:
                groups[opt.group] = parser.add_argument_group(opt.group)
            target = groups[opt.group]
        if opt.exclusive:
            target = target.add_mutually_exclusive_group()
        default = _default(f)
        for i, flag in enumerate(opt.flags):
            kwargs = dict(flag.kwargs)
            if i == 0 and default is not dataclasses.MISSING:
                kwargs["default"] = opt.to_cli(default)
            target.add_argument(*flag.names, dest=flag.dest, **kwargs)


def from_args(args: argparse.Namespace) -> ServerConfig:
    """The :class:`ServerConfig` that parsed ``serve`` arguments describe."""
    values = {}
    for f in dataclasses.fields(ServerConfig):
        opt: Option = f.metadata["cli"]
        values[f.name] = opt.to_config(*(getattr(args, dest) for dest in opt.dests))
    return ServerConfig(**values)


_LABELLED = (
    "lmtp", "line_endings", "size_in_names", "detail_to_folder", "recipient_delimiter",
    "workers", "writer", "sync", "policy", "max_batch", "max_concurrent_flushes",
    "max_message_size", "max_connections", "add_headers", "existing_only",
)  # fmt: skip


def metric_labels(config: ServerConfig) -> dict[str, str]:
    """The settings an admin asks about, as labels of the metrics' info line."""
    out = {}
    for name in _LABELLED:
        value = getattr(config, name)
        out[name] = "" if value is None else str(value).lower()
    out["protocol"] = "lmtp" if out.pop("lmtp") == "true" else "smtp"
    return out
