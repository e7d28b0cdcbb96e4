"""The ``delivery-executor`` command (also ``python -m delivery_executor``): ``serve``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .executor import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_CONCURRENT_FLUSHES,
    DEFAULT_MAX_WAIT,
    POLICIES,
    WRITERS,
)
from .server import DEFAULT_MAX_CONNECTIONS
from .smtp import DEFAULT_MAX_MESSAGE_SIZE
from .smtp.sessions import DEFAULT_MAX_CONNECTIONS_PER_IP, DEFAULT_MIN_RATE, DEFAULT_SESSION_TIMEOUT
from .store.commit import SYNC_MODES

__all__ = ["main"]


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="run a durable Maildir delivery server (LMTP or SMTP)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--root", type=Path, default=Path("maildirs"), help="root of all Maildirs")
    p.add_argument(
        "--listen", type=_listen, default=("127.0.0.1", 2525), help="HOST:PORT to listen on"
    )
    proto = p.add_mutually_exclusive_group()
    proto.add_argument("--lmtp", dest="lmtp", action="store_true", default=True, help="LMTP")
    proto.add_argument("--smtp", dest="lmtp", action="store_false", help="SMTP instead of LMTP")
    p.add_argument("--domain", action="append", help="accepted domain (repeatable; default: any)")
    p.add_argument("--recipient-delimiter", help="e.g. + to map a+tag@d to a@d")
    p.add_argument("--existing-only", action="store_true", help="reject unknown mailboxes at RCPT")
    p.add_argument("--max-size", type=int, default=DEFAULT_MAX_MESSAGE_SIZE, help="bytes/message")
    p.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS)
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH)
    p.add_argument("--max-wait-ms", type=float, default=DEFAULT_MAX_WAIT * 1000)
    p.add_argument("--max-concurrent-flushes", type=int, default=DEFAULT_MAX_CONCURRENT_FLUSHES)
    p.add_argument("--policy", choices=POLICIES, default="eager")
    p.add_argument("--sync", choices=SYNC_MODES, default="auto")
    p.add_argument(
        "--writer",
        choices=WRITERS,
        default="process",
        help="where batches are written: a helper process, the loop (syncs in a thread),"
        " or a thread",
    )
    p.add_argument("--no-headers", action="store_true", help="do not prepend trace headers")
    p.add_argument("--workers", type=int, default=1, help="server processes sharing the port")
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--handler",
        metavar="MODULE:FACTORY",
        help="use FACTORY(executor, resolver, config) as the aiosmtpd handler",
    )
    p.add_argument("--log-level", default="INFO")
    # -- hostile load: caps, fairness and the DATA budget (smtp/sessions.py)
    p.add_argument(
        "--max-connections-per-ip",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS_PER_IP,
        help="sessions per peer (IPv4 address or IPv6 /64; Unix sockets exempt); 0: no cap",
    )
    p.add_argument(
        "--session-timeout",
        type=float,
        default=DEFAULT_SESSION_TIMEOUT,
        help="seconds a session may last before 421 4.4.2",
    )
    p.add_argument(
        "--min-rate",
        type=int,
        default=DEFAULT_MIN_RATE,
        help="bytes/s a client must average while the server waits on it"
        " (after 10 s of waiting); else 421 4.4.2. 0: no rule",
    )
    p.add_argument(
        "--max-pending-bytes",
        type=int,
        default=None,
        help="bytes held in DATA across sessions; past it DATA waits, then 451 4.3.1"
        " (default: 4 x --max-size)",
    )


def _serve(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .server import ServerConfig, run_server

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.log_level.upper() != "DEBUG":
        # aiosmtpd logs every connection at INFO: real CPU at thousands per second.
        logging.getLogger("mail.log").setLevel(logging.WARNING)
    if args.workers < 1:
        raise SystemExit("--workers must be >= 1")
    config = ServerConfig(
        root=args.root.resolve(),
        host=args.listen[0],
        port=args.listen[1],
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
        max_connections_per_ip=args.max_connections_per_ip,
        session_timeout=args.session_timeout,
        min_rate=args.min_rate,
        max_pending_bytes=args.max_pending_bytes,
    )
    try:
        return run_server(config, argv)
    except (OSError, ValueError, TypeError) as exc:
        print(f"delivery-executor serve: {exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``delivery-executor`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="delivery-executor", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    args = parser.parse_args(argv)
    return _serve(args, argv)
