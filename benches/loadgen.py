"""Closed-loop SMTP/LMTP load generator: ``python -m benches.loadgen``.

Each of ``--conns`` clients loops connect → LHLO/EHLO → MAIL → RCPT → DATA →
QUIT, one new connection per message (the original benchmark's shape), for
``--warmup`` seconds unmeasured and then ``--duration`` seconds measured. It
prints one JSON object: messages acknowledged, errors, elapsed seconds,
latency percentiles and a latency CDF (200 points), all in milliseconds, and
``acked_total``: every copy acknowledged with 250, warm-up included, which the
benchmark compares with the files on disk.
Every loop is bounded by the duration and by ``--max-messages``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from typing import Any

from delivery_executor.stats import percentile
from delivery_executor.testing import SMTPClientError, send_message

__all__ = ["run_load"]


def _body(size: int, n: int) -> bytes:
    head = f"From: load@example.net\r\nSubject: load {n}\r\n\r\n".encode()
    line = b"The quick brown fox jumps over the lazy dog 0123456789\r\n"
    filler = (line * (size // len(line) + 1))[: max(0, size - len(head) - 2)]
    return head + filler + b"\r\n"


async def run_load(
    host: str,
    port: int,
    *,
    conns: int,
    duration: float,
    warmup: float,
    recipients: int,
    lmtp: bool,
    size: int,
    max_messages: int,
) -> dict[str, Any]:
    """Drive the server; return counts and latencies of the measured window."""
    latencies: list[float] = []
    errors = 0
    sent = 0
    acked = 0
    start = time.monotonic()
    measure_from = start + warmup
    end = measure_from + duration
    rng = random.Random(1)

    async def client(n: int) -> None:
        nonlocal errors, sent, acked
        while time.monotonic() < end and sent < max_messages:
            sent += 1
            rcpt = (
                f"user{rng.randrange(recipients)}@example.org"
                if recipients > 1
                else "alice@example.org"
            )
            t0 = time.monotonic()
            try:
                replies = await send_message(
                    host,
                    port,
                    mail_from="load@example.net",
                    rcpts=[rcpt],
                    body=_body(size, n),
                    lmtp=lmtp,
                )
                ok = bool(replies) and replies[0].code == 250
                acked += sum(1 for r in replies if r.code == 250)
            except (OSError, SMTPClientError):
                ok = False
            t1 = time.monotonic()
            if t0 >= measure_from and t1 <= end:
                if ok:
                    latencies.append(t1 - t0)
                else:
                    errors += 1
            if not ok:
                await asyncio.sleep(0.01)  # do not spin on a refusing server

    await asyncio.gather(*(client(n) for n in range(conns)))
    latencies.sort()

    def q(p: float) -> float:
        return percentile(latencies, p) * 1e3

    return {
        "messages": len(latencies),
        "acked_total": acked,
        "errors": errors,
        "seconds": duration,
        "msg_s": len(latencies) / duration,
        "p50_ms": q(0.5),
        "p90_ms": q(0.9),
        "p99_ms": q(0.99),
        "p999_ms": q(0.999),
        "max_ms": latencies[-1] * 1e3 if latencies else 0.0,
        "cdf_ms": [q(i / 200) for i in range(1, 201)],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benches.loadgen", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--conns", type=int, default=32)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--recipients", type=int, default=1, help="spread over this many mailboxes")
    p.add_argument("--smtp", action="store_true", help="SMTP instead of LMTP")
    p.add_argument("--size", type=int, default=498, help="message bytes")
    p.add_argument("--max-messages", type=int, default=1_000_000)
    a = p.parse_args(argv)
    coro = run_load(
        a.host, a.port, conns=a.conns, duration=a.duration, warmup=a.warmup,
        recipients=a.recipients, lmtp=not a.smtp, size=a.size, max_messages=a.max_messages,
    )  # fmt: skip
    try:
        import uvloop  # the client should cost as little CPU as it can

        result = uvloop.run(coro)
    except ImportError:
        result = asyncio.run(coro)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
