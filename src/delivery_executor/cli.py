"""The ``delivery-executor`` command (also ``python -m delivery_executor``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .executor import DeliveryExecutor, ExecutorStats
from .fsops import HAVE_SYNCFS
from .maildir import Maildir, MessageId

__all__ = ["main"]


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def _demo_phase(
    ex: DeliveryExecutor, title: str, paths: list[Path], sessions: int, per_session: int
) -> list[tuple[Path, MessageId, bytes]]:
    latencies: list[float] = []
    done: list[tuple[Path, MessageId, bytes]] = []
    before = ex.stats()

    async def session(n: int) -> None:
        for i in range(per_session):
            path = paths[(n * per_session + i) % len(paths)]
            body = (
                f"From: demo@example.org\r\nTo: {path.name}@example.org\r\n"
                f"Subject: demo {n}.{i}\r\n\r\nHello from session {n}, message {i}.\r\n"
            ).encode()
            t0 = time.perf_counter()
            mid = await ex.deliver(path, body)
            latencies.append(time.perf_counter() - t0)
            done.append((path, mid, body))

    t0 = time.perf_counter()
    await asyncio.gather(*(session(n) for n in range(sessions)))
    elapsed = time.perf_counter() - t0
    after = ex.stats()
    lat = sorted(latencies)
    batches = after.batches - before.batches
    syncs = after.syncs - before.syncs
    print(
        f"{title:<34} {len(lat):>6} msgs  {len(lat) / elapsed:>8.0f} msg/s"
        f"  p50 {_percentile(lat, 0.5) * 1e3:6.2f} ms  p99 {_percentile(lat, 0.99) * 1e3:6.2f} ms"
        f"  {batches:>5} batches (mean {len(lat) / max(batches, 1):5.1f})  {syncs:>5} syncs"
    )
    return done


Delivered = list[tuple[Path, MessageId, bytes]]


async def _demo(root: Path, sessions: int, messages: int) -> tuple[Delivered, ExecutorStats]:
    print(f"delivering into {root}  (sync='auto', syncfs available: {HAVE_SYNCFS})")
    alice = root / "example.org" / "alice"
    users = [root / "example.org" / f"user{i:03d}" for i in range(100)]
    delivered: Delivered = []
    async with DeliveryExecutor() as ex:
        delivered += await _demo_phase(ex, "1 session, one mailbox", [alice], 1, messages)
        delivered += await _demo_phase(
            ex, f"{sessions} sessions, one mailbox", [alice], sessions, messages
        )
        delivered += await _demo_phase(
            ex, f"{sessions} sessions, 100 mailboxes", users, sessions, messages
        )
        return delivered, ex.stats()


def _verify(delivered: Delivered, stats: ExecutorStats) -> int:
    print("first ids:")
    for path, mid, _ in delivered[:3]:
        print(f"  {path / 'new' / mid.name}")
    bad = [m for p, m, b in delivered if (p / "new" / m.name).read_bytes() != b]
    boxes = {p for p, _, _ in delivered}
    on_disk = sum(len(Maildir.open(p).scan_new()) for p in boxes)
    print(
        f"verified {len(delivered) - len(bad)}/{len(delivered)} messages byte for byte;"
        f" {on_disk} files in new/ across {len(boxes)} Maildirs (earlier runs' mail included)"
    )
    print(
        f"executor: {stats.delivered} delivered, {stats.batches} batches,"
        f" mean batch {stats.mean_batch_size:.1f}, {stats.syncs} syncs"
    )
    return 1 if bad else 0


def _demo_server(root: Path, seconds: float) -> int:
    from .bench import format_table, run_cell

    print(
        f"\nserver demo: 'delivery-executor serve' (LMTP) on 127.0.0.1, delivering into {root};"
        f"\n32 load-generator connections for {seconds:g} s, a new connection per message"
    )
    row = run_cell(root, "32 conns, 1 rcpt", "executor", seconds, 1.0, lmtp=True)
    print(format_table([row]))
    ok = row.on_disk >= row.delivered > 0 and row.errors == 0
    print("verified: every delivery the server counted is a file in new/" if ok else "MISMATCH")
    return 0 if ok else 1


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _add_serve(sub: Any) -> None:
    p = sub.add_parser("serve", help="run a durable Maildir delivery server (LMTP or SMTP)")
    p.add_argument("--root", type=Path, default=Path("maildirs"), help="root of all Maildirs")
    p.add_argument(
        "--listen",
        type=_listen,
        default=("127.0.0.1", 2525),
        help="HOST:PORT (default 127.0.0.1:2525)",
    )
    proto = p.add_mutually_exclusive_group()
    proto.add_argument(
        "--lmtp", dest="lmtp", action="store_true", default=True, help="LMTP (default)"
    )
    proto.add_argument("--smtp", dest="lmtp", action="store_false", help="SMTP")
    p.add_argument("--domain", action="append", help="accepted domain (repeatable; default: any)")
    p.add_argument("--recipient-delimiter", help="e.g. + to map a+tag@d to a@d")
    p.add_argument("--existing-only", action="store_true", help="reject unknown mailboxes at RCPT")
    p.add_argument("--max-size", type=int, default=32 * 1024 * 1024, help="bytes per message")
    p.add_argument("--max-connections", type=int, default=256)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--max-concurrent-flushes", type=int, default=2)
    p.add_argument("--policy", choices=["eager", "window"], default="eager")
    p.add_argument("--sync", choices=["auto", "syncfs", "fsync"], default="auto")
    p.add_argument(
        "--offload",
        choices=["process", "syncs", "all"],
        default="process",
        help="where batches are written: a helper process (default), the loop, or a thread",
    )
    p.add_argument("--no-headers", action="store_true", help="do not prepend trace headers")
    p.add_argument("--workers", type=int, default=1, help="server processes sharing the port")
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--mode",
        choices=["executor", "noop", "per-message"],
        default="executor",
        help=argparse.SUPPRESS,
    )
    p.add_argument("--log-level", default="INFO")


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
        mode=args.mode,
        offload=args.offload,
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
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="deliver sample mail into a local Maildir tree")
    demo.add_argument("--root", type=Path, default=Path("demo-maildir"), help="Maildir tree root")
    demo.add_argument("--sessions", type=int, default=32, help="concurrent sessions")
    demo.add_argument("--messages", type=int, default=50, help="messages per session")
    demo.add_argument("--seconds", type=float, default=3.0, help="length of the server demo")
    _add_serve(sub)
    sub.add_parser(
        "bench", help="the SMTP/LMTP load benchmark (see 'bench --help')", add_help=False
    )
    if argv and argv[0] == "bench":  # its own parser: see delivery_executor.bench
        from .bench import main as bench_main

        return bench_main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.sessions < 1 or args.messages < 1:
            parser.error("--sessions and --messages must be >= 1")
        root = args.root.resolve()
        delivered, stats = asyncio.run(_demo(root, args.sessions, args.messages))
        code = _verify(delivered, stats)
        return code or _demo_server(root / "server", args.seconds)
    if args.command == "serve":
        return _serve(args, argv)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover
    return 2  # pragma: no cover
