"""Comparison handlers for the load benchmark; not for production.

``serve --handler benches.baselines:noop`` (or ``:per_message``) runs them in
place of the delivery handler, with everything else of ``serve`` unchanged.

``NoopHandler``
    Accepts every recipient and discards the message: the protocol ceiling.
``PerMessageHandler``
    Durable delivery the way asyncio servers are usually written: per message
    and recipient, an aiofiles write into ``tmp/``, ``fsync``, rename into
    ``new/`` and ``fsync`` of ``new/``, each blocking step in the loop's
    default thread pool. Durable, but one commit per message.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import aiofiles
import aiofiles.os

from delivery_executor import MailboxResolver, Maildir
from delivery_executor.store import unique_name

__all__ = ["NoopHandler", "PerMessageHandler", "noop", "per_message"]


def noop(executor: object, resolver: MailboxResolver, config: object) -> NoopHandler:
    """``serve --handler`` factory: the protocol ceiling."""
    return NoopHandler()


def per_message(executor: object, resolver: MailboxResolver, config: object) -> PerMessageHandler:
    """``serve --handler`` factory: naive durable delivery, one commit per copy."""
    return PerMessageHandler(resolver)


class NoopHandler:
    """Accept everything, store nothing."""

    def __init__(self) -> None:
        self.accepted = 0

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        n = len(envelope.rcpt_tos)
        self.accepted += n
        return "\r\n".join(["250 2.0.0 Ok: discarded"] * n)


class PerMessageHandler:
    """Naive durable delivery: aiofiles write, fsync, rename, fsync(new/) per copy."""

    def __init__(self, resolver: MailboxResolver) -> None:
        self.resolver = resolver
        self.accepted = 0
        self.failed = 0

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        try:
            self.resolver.resolve(address)
        except ValueError as exc:
            return str(exc)
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        body: bytes = envelope.original_content
        replies = []
        for rcpt in envelope.rcpt_tos:
            try:
                await self._deliver(self.resolver.resolve(rcpt), body)
                self.accepted += 1
                replies.append("250 2.0.0 Ok")
            except OSError as exc:
                self.failed += 1
                replies.append(f"451 4.3.0 {exc.strerror}")
        return "\r\n".join(replies)

    @staticmethod
    async def _deliver(path: str, body: bytes) -> None:
        loop = asyncio.get_running_loop()
        md = await loop.run_in_executor(None, Maildir.cached, path)
        name = unique_name()
        tmp = os.path.join(md.path, "tmp", name)
        async with aiofiles.open(tmp, "wb") as f:
            await f.write(body)
            await f.flush()
            await loop.run_in_executor(None, os.fsync, f.fileno())
        await aiofiles.os.rename(tmp, os.path.join(md.path, "new", name))
        new_fd = await loop.run_in_executor(
            None, os.open, os.path.join(md.path, "new"), os.O_RDONLY
        )
        try:
            await loop.run_in_executor(None, os.fsync, new_fd)
        finally:
            os.close(new_fd)
