"""The ``delivery-executor`` command (also ``python -m delivery_executor``): ``serve``."""

from __future__ import annotations

import argparse
import functools
import grp
import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn, TypeVar

from . import configfile
from ._version import __version__
from .executor import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_CONCURRENT_FLUSHES,
    DEFAULT_MAX_WAIT,
    POLICIES,
    WRITERS,
)
from .logs import LOG_FORMATS, BlockFileHandler, configure_logging
from .metrics import parse_address
from .server import DEFAULT_MAX_CONNECTIONS, ListenSpec, StartupError
from .server.identity import check_hostname
from .server.loops import LOOPS, default_loop
from .smtp import DEFAULT_MAX_MESSAGE_SIZE, LINE_ENDINGS
from .smtp.sessions import (
    DEFAULT_MAX_CONNECTIONS_PER_IP,
    DEFAULT_MIN_RATE,
    DEFAULT_SESSION_TIMEOUT,
    DEFAULT_TRUSTED_NETWORKS,
    trusted_networks_option,
)
from .store.commit import SYNC_MODES
from .userdb import options as userdb_options

__all__ = ["main"]


# -- deployment options (listeners, TLS, identity, loop, logs): value checks and flags


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit status 2), no usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Every default in --help; not 'None' (the help says what none means), nor the
    'True' of a flag that turns a default off (--smtp: the default shows on --lmtp)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action, argparse._StoreFalseAction):
            return action.help
        return super()._get_help_string(action)


_T = TypeVar("_T")


def _arg(parse: Callable[[str], _T]) -> Callable[[str], _T]:
    """``parse`` as an argparse type: its ``ValueError`` text becomes the one-line error."""

    def check(value: str) -> _T:
        try:
            return parse(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return check


_listen_spec = _arg(ListenSpec.parse)
_tls_listen_spec = _arg(functools.partial(ListenSpec.parse, implicit_tls=True))
_hostname = _arg(check_hostname)
_metrics_address = _arg(parse_address)


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {value!r}")
    return n


def _non_negative_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {value!r}")
    return n


def _seconds(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        x = -1.0
    if not math.isfinite(x) or x < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {value!r}")
    return x


def _log_level(value: str) -> str:
    name = value.upper()
    if name not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise argparse.ArgumentTypeError(
            f"must be debug, info, warning, error or critical, got {value!r}"
        )
    return name


def _octal_mode(value: str) -> int:
    try:
        mode = int(value, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"must be octal permissions 000-777, got {value!r}")
    return mode


def _group(value: str) -> int:
    if value.isdigit():
        return int(value)
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no such group: {value!r}") from None


def _add_listeners(p: argparse.ArgumentParser) -> None:
    """Where serve listens."""
    p.add_argument(
        "--listen",
        type=_listen_spec,
        action="append",
        metavar="ADDRESS",
        help="HOST:PORT, [IPv6]:PORT, unix:PATH or fd:N (repeatable; default: 127.0.0.1:2525"
        " unless --tls-listen or systemd sockets are given)",
    )
    p.add_argument(
        "--tls-listen",
        type=_tls_listen_spec,
        action="append",
        metavar="ADDRESS",
        help="also listen here with implicit TLS (port-465 style); as --listen (repeatable)",
    )
    p.add_argument(
        "--socket-mode",
        type=_octal_mode,
        default="0660",
        help="permissions of the UNIX socket files serve creates (octal)",
    )
    p.add_argument(
        "--socket-group",
        type=_group,
        metavar="GROUP",
        help=(
            "group of those socket files, e.g. postfix; needs membership of it (default:"
            " the directory's group if it is setgid, else the process's group)"
        ),
    )


def _add_deploy(p: argparse.ArgumentParser) -> None:
    """TLS, identity, event loop, logs and stopping."""
    p.add_argument("--tls-cert", type=Path, metavar="FILE", help="PEM certificate chain")
    p.add_argument(
        "--tls-key",
        type=Path,
        metavar="FILE",
        help="PEM private key; with --tls-cert, STARTTLS is offered (both re-read on SIGHUP)",
    )
    p.add_argument(
        "--require-starttls",
        action="store_true",
        help="refuse MAIL (530) until the client has done STARTTLS",
    )
    p.add_argument(
        "--hostname",
        type=_hostname,
        help="name in the banner, LHLO/EHLO and Received lines (default: this host's FQDN)",
    )
    p.add_argument(
        "--banner-version",
        action="store_true",
        help="name the software and its version in the banner",
    )
    p.add_argument("--loop", choices=LOOPS, default=default_loop(), help="event loop")
    p.add_argument(
        "--log-file",
        type=Path,
        metavar="FILE",
        help=(
            "append the log here instead of stderr, INFO lines in blocks at most 0.2 s"
            " late; reopened on SIGHUP (default: stderr)"
        ),
    )
    p.add_argument(
        "--grace",
        type=_seconds,
        default=10.0,
        help="seconds open sessions get to finish after SIGTERM/SIGINT (new MAIL gets"
        " 421 4.3.2); then they get 421 4.3.2 and are closed, and the rest is drained",
    )
    p.add_argument("--version", action="version", version=f"delivery-executor {__version__}")


def _log_handler(path: Path | None) -> logging.Handler | None:
    if path is None:
        return None
    try:
        return BlockFileHandler(path)
    except OSError as exc:
        raise StartupError(f"--log-file {path}: {exc.strerror}") from None


def _add_conventions(p: argparse.ArgumentParser) -> None:
    """Dovecot's on-disk conventions and watching it run."""
    p.add_argument(
        "--line-endings",
        choices=LINE_ENDINGS,
        default="lf",
        help="line ends on disk: lf, as Dovecot (mail_save_crlf=no) and Postfix's local"
        " delivery store mail, or crlf, the body exactly as received",
    )
    p.add_argument(
        "--no-size-names",
        dest="size_in_names",
        action="store_false",
        help="do not end file names with Dovecot's ,S=<size>,W=<size with CRLF>",
    )
    p.add_argument(
        "--detail-to-folder",
        action="store_true",
        help="deliver user+box@domain into the Maildir++ folder .box when it exists, else"
        " INBOX (Dovecot's lmtp_save_to_detail_mailbox; needs --recipient-delimiter)",
    )
    p.add_argument(
        "--duplicate-window",
        type=_seconds,
        default=0.0,
        metavar="SECONDS",
        help="answer 250 without storing again a message whose Message-ID the same"
        " mailbox got within SECONDS (0, the default: off)",
    )
    p.add_argument(
        "--metrics",
        type=_metrics_address,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (needs the 'metrics'"
        " extra: prometheus_client)",
    )
    p.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text",
        help="one line per record: text, or a JSON object",
    )


def _add_sieve(p: argparse.ArgumentParser) -> None:
    """Sieve filtering at delivery (delivery_executor.sieve)."""
    p.add_argument(
        "--sieve",
        action="store_true",
        help="run each user's .dovecot.sieve (in their Maildir directory) at delivery;"
        " implied by --sieve-before/--sieve-after/--sieve-default",
    )
    p.add_argument(
        "--sieve-before",
        type=Path,
        action="append",
        default=[],
        metavar="PATH",
        help="admin Sieve script run before the user's (Pigeonhole's sieve_before; repeatable)",
    )
    p.add_argument(
        "--sieve-after",
        type=Path,
        action="append",
        default=[],
        metavar="PATH",
        help="admin Sieve script run after the user's (sieve_after; repeatable)",
    )
    p.add_argument(
        "--sieve-default",
        type=Path,
        metavar="PATH",
        help="Sieve script for users without their own (sieve_default)",
    )


def _add_hostile_load(p: argparse.ArgumentParser) -> None:
    """Caps, fairness and the DATA budget (smtp/sessions.py)."""
    p.add_argument(
        "--max-connections-per-ip",
        type=_non_negative_int,
        default=DEFAULT_MAX_CONNECTIONS_PER_IP,
        help="sessions per peer (IPv4 address or IPv6 /64; Unix sockets exempt); 0: no cap",
    )
    p.add_argument(
        "--session-timeout",
        type=_seconds,
        default=DEFAULT_SESSION_TIMEOUT,
        help="seconds a session may last before 421 4.4.2",
    )
    p.add_argument(
        "--min-rate",
        type=_non_negative_int,
        default=DEFAULT_MIN_RATE,
        help="bytes/s a client must average while the server waits on it"
        " (after 10 s of waiting); else 421 4.4.2. 0: no rule",
    )
    p.add_argument(
        "--max-pending-bytes",
        type=_positive_int,
        default=None,
        help="bytes held in DATA across sessions; past it DATA waits, then 451 4.3.1"
        " (default: 4 x --max-size)",
    )
    p.add_argument(
        "--trusted-networks",
        type=_arg(trusted_networks_option),
        default=",".join(DEFAULT_TRUSTED_NETWORKS),
        metavar="CIDR,...",
        help="peers exempt from --max-connections-per-ip and --min-rate (the MTA in front;"
        " Unix sockets always are); '' for none",
    )


# -- end of the deployment options


def _add_serve(
    sub: argparse._SubParsersAction[_Parser],
    name: str = "serve",
    help: str = "run a durable Maildir delivery server (LMTP or SMTP)",
) -> _Parser:
    p = sub.add_parser(name, help=help, formatter_class=_Help)
    p.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file whose keys are these long options (max_size = 1000000,"
        ' listen = ["unix:/run/de/lmtp"]); options given here override it',
    )
    p.add_argument("--root", type=Path, default=Path("maildirs"), help="root of all Maildirs")
    _add_listeners(p)
    proto = p.add_mutually_exclusive_group()
    proto.add_argument("--lmtp", dest="lmtp", action="store_true", default=True, help="LMTP")
    proto.add_argument("--smtp", dest="lmtp", action="store_false", help="SMTP instead of LMTP")
    p.add_argument("--domain", action="append", help="accepted domain (repeatable; default: any)")
    p.add_argument("--recipient-delimiter", help="e.g. + to map a+tag@d to a@d")
    p.add_argument("--existing-only", action="store_true", help="reject unknown mailboxes at RCPT")
    p.add_argument(
        "--max-size", type=_positive_int, default=DEFAULT_MAX_MESSAGE_SIZE, help="bytes/message"
    )
    p.add_argument(
        "--max-connections", type=_positive_int, default=DEFAULT_MAX_CONNECTIONS,
        help="open sessions at most; more get 421",
    )  # fmt: skip
    p.add_argument(
        "--max-batch", type=_positive_int, default=DEFAULT_MAX_BATCH, help="messages per commit"
    )
    p.add_argument(
        "--max-wait-ms", type=_seconds, default=DEFAULT_MAX_WAIT * 1000,
        help="how long the window policy holds a batch open",
    )  # fmt: skip
    p.add_argument(
        "--max-concurrent-flushes", type=_positive_int, default=DEFAULT_MAX_CONCURRENT_FLUSHES,
        help="batches written at once",
    )  # fmt: skip
    p.add_argument("--policy", choices=POLICIES, default="eager", help="batching policy")
    p.add_argument("--sync", choices=SYNC_MODES, default="auto", help="how batches are synced")
    p.add_argument(
        "--writer",
        choices=WRITERS,
        default="process",
        help="where batches are written: a helper process, the loop (syncs in a thread),"
        " or a thread",
    )
    p.add_argument("--no-headers", action="store_true", help="do not prepend trace headers")
    p.add_argument(
        "--workers", type=_positive_int, default=1, help="server processes sharing the listeners"
    )
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--handler",
        metavar="MODULE:FACTORY",
        help="use FACTORY(executor, resolver, config) as the aiosmtpd handler",
    )
    p.add_argument("--log-level", type=_log_level, default="INFO", help="debug ... critical")
    _add_deploy(p)
    _add_conventions(p)
    _add_hostile_load(p)
    userdb_options.add_arguments(p)
    _add_sieve(p)
    return p


def _serve(args: argparse.Namespace, check: _Parser | None = None) -> int:
    """Run ``serve``; with ``check`` (check-config), validate and print the settings instead."""
    from .server import ServerConfig, run_server

    if check is None:
        try:
            log_file = _log_handler(args.log_file)
        except StartupError as exc:
            print(f"delivery-executor serve: {exc}", file=sys.stderr)
            return 2
        configure_logging(args.log_level, args.log_format, handler=log_file)
    if args.detail_to_folder and not args.recipient_delimiter:
        print("delivery-executor serve: --detail-to-folder needs --recipient-delimiter",
              file=sys.stderr)  # fmt: skip
        return 2
    config = ServerConfig(
        root=args.root.resolve(),
        lmtp=args.lmtp,
        domains=args.domain,
        recipient_delimiter=args.recipient_delimiter,
        existing_only=args.existing_only,
        max_message_size=args.max_size,
        max_connections=args.max_connections,
        max_batch=args.max_batch,
        max_wait=args.max_wait_ms / 1000.0,
        max_concurrent_flushes=args.max_concurrent_flushes,
        policy=args.policy,
        sync=args.sync,
        add_headers=not args.no_headers,
        reuse_port=args.reuse_port,
        workers=args.workers,
        writer=args.writer,
        handler=args.handler,
        grace=args.grace,
        # -- deployment
        listen=[*(args.listen or ()), *(args.tls_listen or ())],
        socket_mode=args.socket_mode,
        socket_gid=args.socket_group,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        require_starttls=args.require_starttls,
        hostname=args.hostname,
        banner_version=args.banner_version,
        loop=args.loop,
        # -- Dovecot's conventions, watching it run
        line_endings=args.line_endings,
        size_in_names=args.size_in_names,
        detail_to_folder=args.detail_to_folder,
        duplicate_window=args.duplicate_window,
        metrics=args.metrics,
        # -- hostile load
        max_connections_per_ip=args.max_connections_per_ip,
        session_timeout=args.session_timeout,
        min_rate=args.min_rate,
        max_pending_bytes=args.max_pending_bytes,
        trusted_networks=args.trusted_networks,
        **userdb_options.config_fields(args),
        # -- Sieve
        sieve=args.sieve,
        sieve_before=tuple(p.resolve() for p in args.sieve_before),
        sieve_after=tuple(p.resolve() for p in args.sieve_after),
        sieve_default=args.sieve_default.resolve() if args.sieve_default else None,
    )
    try:
        _check_userdb(config)  # here, not in each worker: a bad value exits 2, in one line
        if check is not None:
            return _check_config(check, args)
        return run_server(config)
    except (StartupError, ValueError, TypeError) as exc:
        # Start-up only: once serving, run_server returns a status. Exit 2, as
        # for a bad option value: the configuration needs fixing (README).
        command = "serve" if check is None else "check-config"
        print(f"delivery-executor {command}: {exc}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``delivery-executor`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _Parser(prog="delivery-executor", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "serve": _add_serve(sub),
        "check-config": _add_serve(
            sub, "check-config", "check serve's settings (--config FILE and flags), print them"
        ),
    }
    args = parser.parse_args(argv)
    command = args.command
    if args.config is not None:
        try:  # the file first, then the flags after the command on top
            args = configfile.merged_args(
                commands[command], args.config, argv[argv.index(command) + 1 :]
            )
        except ValueError as exc:
            print(f"delivery-executor {command}: {exc}", file=sys.stderr)
            return 2
    return _serve(args, commands[command] if command == "check-config" else None)


def _check_userdb(config: object) -> None:
    """``ValueError`` for a bad ``--userdb`` (kind, path, query, package) or mail location."""
    from .userdb import resolver_for

    resolver_for(config)  # builds, reads nothing; quota rules were checked by argparse


def _check_config(parser: _Parser, args: argparse.Namespace) -> int:
    """What check-config does once the ServerConfig is built and checked: the handler
    factory is imported, then the settings are printed as TOML."""
    from .server.core import load_handler_factory

    if args.handler is not None:
        load_handler_factory(args.handler)
    for line in configfile.effective_settings(parser, args):
        print(line)
    return 0
