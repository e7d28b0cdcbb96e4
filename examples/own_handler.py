"""Your own aiosmtpd handler, choosing the Maildir itself and calling ``deliver``.

Here every message for a domain goes into one shared Maildir per domain
(``<root>/<domain>``), whatever the local part: a catch-all archive. The
handler only needs ``await executor.deliver(path, body)``; the executor takes
care of durability and of sharing syncs between concurrent sessions.

    python examples/own_handler.py --root ./archive --port 8026
    swaks --server 127.0.0.1:8026 --to anyone@example.org

Stops on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

from aiosmtpd.smtp import SMTP, Envelope, Session

from delivery_executor import DeliveryExecutor, InvalidMaildirPath


class ArchiveHandler:
    """Accepts mail for ``domains`` and files each message once per domain."""

    def __init__(self, executor: DeliveryExecutor, root: str, domains: set[str]) -> None:
        self.executor = executor
        self.root = root
        self.domains = domains

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        domain = address.rpartition("@")[2].lower()
        if domain not in self.domains:  # also keeps '../x' and friends out of our paths
            return "550 5.7.1 Relay access denied"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert envelope.original_content is not None
        domains = {rcpt.rpartition("@")[2].lower() for rcpt in envelope.rcpt_tos}
        try:
            for domain in sorted(domains):
                path = os.path.join(self.root, domain)
                await self.executor.deliver(path, envelope.original_content)
        except (OSError, InvalidMaildirPath) as exc:
            return f"451 4.3.0 Temporary failure: {exc}"
        return "250 2.0.0 Archived"


async def main(root: str, port: int, domains: set[str]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with DeliveryExecutor() as executor:
        handler = ArchiveHandler(executor, root, domains)
        server = await loop.create_server(lambda: SMTP(handler), "127.0.0.1", port)
        print(f"listening on 127.0.0.1:{port}", flush=True)
        async with server:
            await stop.wait()
    print(f"delivered {executor.stats().delivered}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", required=True, help="directory of the archive Maildirs")
    parser.add_argument("--port", type=int, default=8026)
    parser.add_argument("--domain", action="append", default=["example.org"])
    args = parser.parse_args()
    asyncio.run(main(args.root, args.port, set(args.domain)))
