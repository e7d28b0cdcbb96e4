"""aiosmtpd's stock SMTP/LMTP classes with a no-op handler: the ceiling before our reader.

    python -m benches.stock_server --listen 127.0.0.1:2525 [--smtp] [--loop asyncio|uvloop]

Started by the load benchmark (mode ``noop-stock``) with the same arguments as
``delivery-executor serve``; it prints the same "listening on" and
"summary:" lines. Everything else of ``serve`` is left out.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP

from .baselines import NoopHandler


async def _main(host: str, port: int, lmtp: bool, size: int) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    handler = NoopHandler()
    cls = LMTP if lmtp else SMTP
    server = await loop.create_server(
        lambda: cls(handler, data_size_limit=size, enable_SMTPUTF8=True), host, port
    )
    bound = server.sockets[0].getsockname()
    proto = "LMTP" if lmtp else "SMTP"
    print(f"listening on {bound[0]}:{bound[1]} ({proto}, pid {os.getpid()})", flush=True)
    async with server:
        await stop.wait()
    print(
        f"summary: delivered {handler.accepted}, failed 0, batches 0, mean batch size 0.00,"
        " syncs 0, refused connections 0, up 0.0 s",
        flush=True,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benches.stock_server", description=__doc__)
    p.add_argument("--listen", default="127.0.0.1:2525")
    p.add_argument("--smtp", action="store_true")
    p.add_argument("--loop", choices=["asyncio", "uvloop"], default="uvloop")
    p.add_argument("--max-size", type=int, default=32 * 1024 * 1024)
    a, _ = p.parse_known_args(argv)  # serve's other options do not apply
    host, _, port = a.listen.rpartition(":")
    coro = _main(host, int(port), not a.smtp, a.max_size)
    if a.loop == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


if __name__ == "__main__":
    sys.exit(main())
