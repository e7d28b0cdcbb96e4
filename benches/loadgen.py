"""Closed-loop SMTP/LMTP load generator: ``python -m benches.loadgen``.

Each of ``--conns`` clients loops connect → LHLO/EHLO → MAIL → RCPT (×
``--rcpts``) → DATA → QUIT, one new connection per message (the original
benchmark's shape), for ``--warmup`` seconds unmeasured and then
``--duration`` seconds measured. Recipients are drawn from ``--mailboxes``
mailboxes (``alice@example.org`` when 1). Bodies are ``--size`` bytes, or
drawn from a seeded mix with ``--size mixed`` (60 % up to 8 KiB, 35 % up to
128 KiB, 5 % up to 4 MiB). With ``--pipelining`` MAIL, the RCPTs and DATA
go out as one group, as Postfix's LMTP client sends them.

It prints one JSON object: messages and copies acknowledged in the measured
window, msg/s, copies/s, MB/s of message bytes, errors, latency percentiles
and a latency CDF (200 points) in milliseconds, and ``acked_total``: every
copy acknowledged with 250, warm-up included, which the benchmark compares
with the files on disk. Every loop is bounded by the duration and by
``--max-messages``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import sys
import time
from typing import Any

from delivery_executor.stats import percentile
from delivery_executor.testing import SMTPClientError, dot_stuff, send_message

__all__ = ["body_pool", "run_load"]

_MESSAGE_TIMEOUT = 60.0
_MIX = ((0.60, 500, 8 * 1024), (0.35, 8 * 1024, 128 * 1024), (0.05, 128 * 1024, 4 * 1024 * 1024))


def _body(size: int, n: int) -> bytes:
    head = f"From: load@example.net\r\nSubject: load {n}\r\n\r\n".encode()
    line = b"The quick brown fox jumps over the lazy dog 0123456789\r\n"
    filler = (line * (size // len(line) + 1))[: max(0, size - len(head) - 2)]
    return head + filler + b"\r\n"


def body_pool(size: str, n: int = 64, seed: int = 1) -> list[bytes]:
    """``n`` bodies of ``size`` bytes, or of the seeded ``mixed`` distribution."""
    if size != "mixed":
        return [_body(int(size), i) for i in range(n)]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        r, acc = rng.random(), 0.0
        for share, lo, hi in _MIX:
            acc += share
            if r < acc:
                out.append(_body(rng.randrange(lo, hi), i))
                break
        else:
            out.append(_body(_MIX[-1][2], i))
    return out


async def run_load(
    host: str,
    port: int,
    *,
    conns: int,
    duration: float,
    warmup: float,
    mailboxes: int,
    rcpts: int,
    lmtp: bool,
    size: str,
    max_messages: int,
    pipelining: bool = False,
) -> dict[str, Any]:
    """Drive the server; return counts and latencies of the measured window."""
    latencies: list[float] = []
    errors = sent = acked = copies = nbytes = 0
    start = time.monotonic()
    measure_from = start + warmup
    end = measure_from + duration
    rng = random.Random(1)
    pool = [(body, dot_stuff(body)) for body in body_pool(size)]

    def recipients() -> list[str]:
        if mailboxes == 1:
            return ["alice@example.org"] * rcpts
        return [f"user{k}@example.org" for k in rng.sample(range(mailboxes), rcpts)]

    async def client(n: int) -> None:
        nonlocal errors, sent, acked, copies, nbytes
        while time.monotonic() < end and sent < max_messages:
            body, data = pool[(sent + n) % len(pool)]
            sent += 1
            t0 = time.monotonic()
            try:
                async with asyncio.timeout(_MESSAGE_TIMEOUT):  # every loop ends
                    replies = await send_message(
                        host, port, mail_from="load@example.net", rcpts=recipients(),
                        body=body, data=data, lmtp=lmtp, pipelining=pipelining,
                    )  # fmt: skip
                good = sum(1 for r in replies if r.code == 250)
                ok = good == rcpts
                acked += good
            except (OSError, SMTPClientError, TimeoutError):
                ok, good = False, 0
            t1 = time.monotonic()
            if t0 >= measure_from and t1 <= end:
                if ok:
                    latencies.append(t1 - t0)
                    copies += good
                    nbytes += len(body)
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
        "copies": copies,
        "acked_total": acked,
        "errors": errors,
        "seconds": duration,
        "msg_s": len(latencies) / duration,
        "copies_s": copies / duration,
        "mb_s": nbytes / duration / 1e6,
        "p50_ms": q(0.5),
        "p90_ms": q(0.9),
        "p99_ms": q(0.99),
        "p999_ms": q(0.999),
        "max_ms": latencies[-1] * 1e3 if latencies else 0.0,
        "cdf_ms": [q(i / 200) for i in range(1, 201)],
    }


def raise_fd_limit() -> None:
    """Lift the soft open-file limit to the hard one: 1,000 sessions need more than 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benches.loadgen", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--conns", type=int, default=32)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--mailboxes", type=int, default=1, help="recipients are drawn from these")
    p.add_argument("--rcpts", type=int, default=1, help="recipients per message")
    p.add_argument("--smtp", action="store_true", help="SMTP instead of LMTP")
    p.add_argument("--size", default="498", help="message bytes, or 'mixed'")
    p.add_argument("--max-messages", type=int, default=1_000_000)
    p.add_argument("--pipelining", action="store_true", help="MAIL, RCPTs and DATA as one group")
    a = p.parse_args(argv)
    if a.size != "mixed" and not a.size.isdigit():
        p.error(f"--size must be a number of bytes or 'mixed', not {a.size!r}")
    if not 1 <= a.rcpts <= a.mailboxes and a.mailboxes > 1:
        p.error("--rcpts must be between 1 and --mailboxes")
    raise_fd_limit()
    coro = run_load(
        a.host, a.port, conns=a.conns, duration=a.duration, warmup=a.warmup,
        mailboxes=a.mailboxes, rcpts=a.rcpts, lmtp=not a.smtp, size=a.size,
        max_messages=a.max_messages, pipelining=a.pipelining,
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
