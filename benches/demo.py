"""The project's demo: ``python3 tasks.py demo`` (``.venv/bin/python -m benches.demo``).

1. In process: deliver through a :class:`DeliveryExecutor` from 1 and then 32
   sessions, into one mailbox and into 100, and read every message back.
2. The server: start ``delivery-executor serve`` (LMTP) on 127.0.0.1 and drive
   it with 32 load-generator connections for a few seconds, then check that
   every acknowledged copy is a file in ``new/``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from delivery_executor import HAVE_SYNCFS, DeliveryExecutor, ExecutorStats, Maildir, MessageId
from delivery_executor.stats import percentile

Delivered = list[tuple[Path, MessageId, bytes]]


async def _phase(
    ex: DeliveryExecutor, title: str, paths: list[Path], sessions: int, per_session: int
) -> Delivered:
    latencies: list[float] = []
    done: Delivered = []
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
        f"  p50 {percentile(lat, 0.5) * 1e3:6.2f} ms  p99 {percentile(lat, 0.99) * 1e3:6.2f} ms"
        f"  {batches:>5} batches (mean {len(lat) / max(batches, 1):5.1f})  {syncs:>5} syncs"
    )
    return done


async def _in_process(root: Path, sessions: int, messages: int) -> tuple[Delivered, ExecutorStats]:
    print(f"delivering into {root}  (sync='auto', syncfs available: {HAVE_SYNCFS})")
    alice = root / "example.org" / "alice"
    users = [root / "example.org" / f"user{i:03d}" for i in range(100)]
    delivered: Delivered = []
    async with DeliveryExecutor() as ex:
        delivered += await _phase(ex, "1 session, one mailbox", [alice], 1, messages)
        delivered += await _phase(
            ex, f"{sessions} sessions, one mailbox", [alice], sessions, messages
        )
        delivered += await _phase(
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


def _server(root: Path, seconds: float) -> int:
    from .load import format_table, run_cell

    print(
        f"\nserver demo: 'delivery-executor serve' (LMTP) on 127.0.0.1, delivering into {root};"
        f"\n32 load-generator connections for {seconds:g} s, a new connection per message"
    )
    root.mkdir(parents=True, exist_ok=True)
    row = run_cell(root, "32 conns/1 box", "executor", seconds, 1.0, lmtp=True)
    print(format_table([row]))
    ok = row.on_disk >= row.acked > 0 and row.errors == 0
    print("verified: every acknowledged copy is a file in new/" if ok else "MISMATCH")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benches.demo", description=__doc__)
    p.add_argument("--root", type=Path, default=Path("demo-maildir"), help="Maildir tree root")
    p.add_argument("--sessions", type=int, default=32, help="concurrent sessions")
    p.add_argument("--messages", type=int, default=50, help="messages per session")
    p.add_argument("--seconds", type=float, default=3.0, help="length of the server demo")
    a = p.parse_args(argv)
    if a.sessions < 1 or a.messages < 1:
        p.error("--sessions and --messages must be >= 1")
    root = a.root.resolve()
    delivered, stats = asyncio.run(_in_process(root, a.sessions, a.messages))
    return _verify(delivered, stats) or _server(root / "server", a.seconds)


if __name__ == "__main__":
    sys.exit(main())
