"""The ``delivery-executor`` command (also ``python -m delivery_executor``)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from pathlib import Path

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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``delivery-executor`` console script."""
    parser = argparse.ArgumentParser(prog="delivery-executor", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="deliver sample mail into a local Maildir tree")
    demo.add_argument("--root", type=Path, default=Path("demo-maildir"), help="Maildir tree root")
    demo.add_argument("--sessions", type=int, default=32, help="concurrent sessions")
    demo.add_argument("--messages", type=int, default=50, help="messages per session")
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.sessions < 1 or args.messages < 1:
            parser.error("--sessions and --messages must be >= 1")
        delivered, stats = asyncio.run(_demo(args.root.resolve(), args.sessions, args.messages))
        return _verify(delivered, stats)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
