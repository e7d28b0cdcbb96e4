"""The ``delivery-executor`` command (also ``python -m delivery_executor``): ``serve``."""

from __future__ import annotations

import argparse
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
from .logs import LOG_FORMATS, configure_logging
from .metrics import parse_address
from .server import DEFAULT_MAX_CONNECTIONS
from .smtp import DEFAULT_MAX_MESSAGE_SIZE, LINE_ENDINGS
from .store.commit import SYNC_MODES

__all__ = ["main"]


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _metrics_address(value: str) -> tuple[str, int]:
    try:
        return parse_address(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
    # -- Dovecot's on-disk conventions and watching it run (issue 10, items 4-5) --
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


def _serve(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .server import ServerConfig, run_server

    try:
        configure_logging(args.log_level, args.log_format)
    except ValueError as exc:
        print(f"delivery-executor serve: {exc}", file=sys.stderr)
        return 2
    if args.detail_to_folder and not args.recipient_delimiter:
        print("delivery-executor serve: --detail-to-folder needs --recipient-delimiter",
              file=sys.stderr)  # fmt: skip
        return 2
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
        line_endings=args.line_endings,
        size_in_names=args.size_in_names,
        detail_to_folder=args.detail_to_folder,
        metrics=args.metrics,
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
