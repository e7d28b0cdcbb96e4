"""Child for test_duplicates: an LMTP server that SIGKILLs itself between commit and reply.

Run as ``python dupchild.py ROOT WINDOW``. It serves our handler (with
``duplicate_window=WINDOW``) and protocol on 127.0.0.1 with an executor whose
``deliver`` awaits the real, durable delivery and then kills the whole process
with SIGKILL before the handler can answer: the client never gets its ``250``,
though the message and its duplicate record are committed. Prints the port
as one line once listening.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from delivery_executor import DeliveryExecutor, MailboxResolver
from delivery_executor.smtp import DeliveryHandler, SessionFactory


class KillAfterCommit:
    """Delivers through a real executor, then dies before anyone learns of it."""

    def __init__(self, executor: DeliveryExecutor) -> None:
        self.executor = executor

    async def deliver(self, path: str, body: bytes, /) -> object:
        """Deliver ``body`` durably into ``path``; then SIGKILL this process."""
        await self.executor.deliver(path, body)
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")


async def main(root: str, window: float) -> None:
    loop = asyncio.get_running_loop()
    executor = DeliveryExecutor()
    handler = DeliveryHandler(
        KillAfterCommit(executor), MailboxResolver(root), duplicate_window=window
    )
    factory = SessionFactory(handler, lmtp=True, max_connections=4, loop=loop)
    server = await loop.create_server(factory, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(60)  # the test's message ends it long before


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2])))
