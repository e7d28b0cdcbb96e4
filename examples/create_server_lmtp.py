"""An LMTP server on ``loop.create_server``, with the executor on the same loop.

The simplest arrangement: one event loop holds the listening socket, the
sessions and the executor, so no request crosses threads. This is what
``delivery-executor serve`` does (plus its helper writer process).

    python examples/create_server_lmtp.py --root ./mail --port 8024
    swaks --server 127.0.0.1:8024 --protocol LMTP --to alice@example.org

Stops on SIGINT/SIGTERM: the listener closes, then every accepted message is
made durable before the executor closes.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from delivery_executor import DeliveryExecutor, DeliveryHandler, DeliveryLMTP, MailboxResolver


async def main(root: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async with DeliveryExecutor() as executor:  # home: this loop
        handler = DeliveryHandler(executor, MailboxResolver(root, recipient_delimiter="+"))
        server = await loop.create_server(lambda: DeliveryLMTP(handler), "127.0.0.1", port)
        print(f"listening on 127.0.0.1:{port}", flush=True)
        async with server:
            await stop.wait()
    print(f"delivered {executor.stats().delivered}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", required=True, help="directory of all Maildirs")
    parser.add_argument("--port", type=int, default=8024)
    args = parser.parse_args()
    asyncio.run(main(args.root, args.port))
