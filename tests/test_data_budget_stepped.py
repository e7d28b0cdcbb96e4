"""The DATA budget under a stepped clock: a grant and a timeout in the same loop iteration."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from delivery_executor import DeliveryExecutor, MailboxResolver
from delivery_executor.smtp import DataBudget, DeliveryHandler, SessionFactory
from delivery_executor.testing import dot_stuff

from .helpers import files_in, listening

pytestmark = [pytest.mark.timeout(60)]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


class SteppedClockLoop(asyncio.SelectorEventLoop):
    """An asyncio loop whose clock a test moves forward: timers fall due when it says."""

    offset = 0.0

    def time(self) -> float:
        return super().time() + self.offset


def run_stepped(main: Callable[[SteppedClockLoop], Awaitable[None]]) -> None:
    """Run ``main(loop)`` on a fresh :class:`SteppedClockLoop`; any loop error fails."""
    loop = SteppedClockLoop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    try:
        loop.run_until_complete(main(loop))  # bounded by the test timeout, not the loop clock
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    assert not errors, errors


@pytest.mark.timeout(60)
def test_a_grant_in_the_same_iteration_as_the_timeout_is_given_back() -> None:
    """Granted and timed out in one loop iteration: the hold still gives it all back."""

    async def main(loop: SteppedClockLoop) -> None:
        budget = DataBudget(1000)
        blocker = budget.hold(1000)
        await blocker.open(1000)
        outcome: list[str] = []

        async def transfer() -> None:
            async with budget.hold(1000) as hold:
                try:
                    async with asyncio.timeout(30):
                        await hold.open(100)
                    outcome.append("granted")
                except TimeoutError:
                    outcome.append("timed out")

        task = asyncio.create_task(transfer())
        await settle()
        assert budget.waiting == 1
        loop.call_soon(blocker.close)  # the grant...
        loop.offset += 30  # ...and the timeout, run in the same iteration after it
        await task
        assert outcome == ["timed out"]
        assert budget.held == 0 and budget.transfers == 0 and budget.waiting == 0
        fresh = budget.hold(1000)
        assert fresh.try_grow(1000)  # the whole budget, at once: no dead hold keeps room
        fresh.close()

    run_stepped(main)


def test_a_session_whose_data_wait_ends_as_room_comes_leaves_the_server_taking_mail(
    tmp_path: Path,
) -> None:
    """A DATA granted in its timeout's iteration gets 451 and leaks nothing: the next gets 250."""
    limit = 50_000

    async def main(loop: SteppedClockLoop) -> None:
        ex = DeliveryExecutor()
        handler = DeliveryHandler(ex, MailboxResolver(tmp_path), max_message_size=limit)
        factory = SessionFactory(
            handler, lmtp=True, loop=loop, max_connections=8, min_rate=0, data_size_limit=limit,
            max_pending_bytes=limit, data_wait=5,
        )  # fmt: skip
        budget = factory.budget
        blocker = budget.hold(limit)  # something else holds the whole budget
        assert blocker.try_grow(limit)
        async with listening(factory, ex) as port:

            async def session(rcpt: str) -> tuple[asyncio.StreamReader, Any]:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                await reader.readline()
                writer.write(f"LHLO c\r\nMAIL FROM:<s@x.net>\r\nRCPT TO:<{rcpt}>\r\n".encode())
                while not (await reader.readline()).startswith(b"250 "):  # LHLO
                    pass
                assert (await reader.readline()).startswith(b"250")
                assert (await reader.readline()).startswith(b"250")
                return reader, writer

            ra, wa = await session("a@example.org")
            wa.write(b"DATA\r\n")
            for _ in range(1000):
                if budget.waiting:
                    break
                await asyncio.sleep(0.005)
            assert budget.waiting == 1
            loop.call_soon(blocker.close)  # room comes...
            loop.offset += 5  # ...in the iteration where the DATA's 5 s wait ends
            assert (await ra.readline()).startswith(b"451 4.3.1 ")
            assert budget.held == 0
            # A fresh client needs the whole budget for a message of the maximum size.
            rb, wb = await session("b@example.org")
            wb.write(b"DATA\r\n")
            assert (await rb.readline()).startswith(b"354")
            wb.write(dot_stuff(b"Subject: x\r\n\r\n" + (b"y" * 78 + b"\r\n") * 600))
            assert (await rb.readline()).startswith(b"250")
            for w in (wa, wb):
                w.close()
        assert budget.held == 0

    run_stepped(main)
    assert len(files_in(tmp_path / "example.org" / "b" / "new")) == 1
