"""The server-wide DATA budget: order, deadlock freedom, and what sessions do with it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from delivery_executor import DeliveryExecutor, MailboxResolver
from delivery_executor.smtp import DataBudget, DeliveryHandler, SessionFactory
from delivery_executor.testing import dot_stuff, send_message

from .helpers import files_in, listening

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


# -- the budget object


async def test_requests_are_served_oldest_transfer_first_and_never_overtaken() -> None:
    """A waiting older transfer is served before younger ones, even ones that would fit."""
    budget = DataBudget(100)
    first, second = budget.hold(50), budget.hold(50)
    await first.open(50)
    await second.open(45)
    older, younger = budget.hold(50), budget.hold(50)
    order: list[str] = []

    async def want(tag: str, hold: Any, n: int) -> None:
        await hold.open(n)
        order.append(tag)

    t_old = asyncio.create_task(want("older", older, 30))
    await settle()
    t_young = asyncio.create_task(want("younger", younger, 5))
    await settle()
    # 95 held: 30 do not fit; 5 would, were the older request not ahead of it.
    assert order == [] and budget.waiting == 2
    assert not budget.try_reserve(5)
    first.close()
    await asyncio.gather(t_old, t_young)
    assert order == ["older", "younger"]
    assert budget.held == 80
    for h in (second, older, younger):
        h.close()
    assert budget.held == 0 and budget.peak == 95


async def test_room_is_kept_for_the_oldest_transfer_so_none_deadlocks() -> None:
    """Four transfers that will each need the whole budget: one at a time, oldest first."""
    budget = DataBudget(100)
    holds = [budget.hold(100) for _ in range(4)]
    await holds[0].open(25)
    for h in holds[1:]:  # room for holds[0] to reach 100 is kept: the others must wait
        assert not h.try_grow(25) and not budget.try_reserve(1)
    waiting = [asyncio.create_task(h.open(25)) for h in holds[1:]]
    for i, hold in enumerate(holds):
        if i:
            await waiting[i - 1]  # its turn came when the one before finished
        await settle()
        assert not any(t.done() for t in waiting[i:])
        hold.used = 100
        assert hold.try_grow(hold.shortfall())  # the oldest can always grow at once
        assert hold.reserved == 100 and budget.held == 100
        hold.close()
    assert budget.held == 0 and budget.peak == 100


async def test_a_cancelled_wait_takes_nothing_and_lets_the_line_move() -> None:
    """A timed-out request at the head leaves the line; the one behind it is served."""
    budget = DataBudget(100)
    hog = budget.hold(100)
    await hog.open(90)
    big, small = budget.hold(100), budget.hold(100)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await big.open(50)
    assert budget.held == 90
    task = asyncio.create_task(small.open(5))
    await settle()
    assert not task.done()  # the oldest (hog) still has room kept for it
    hog.close()
    await task
    assert budget.held == 5 and big.reserved == 0
    small.close()


async def test_shortfall_doubles_up_to_the_cap_and_close_is_idempotent() -> None:
    """A growing transfer asks for as much again each time, never past its cap."""
    budget = DataBudget(1000)
    hold = budget.hold(300)
    await hold.open(64)
    hold.used = 65
    assert hold.shortfall() == 64
    assert hold.try_grow(64) and hold.reserved == 128
    hold.used = 290
    assert hold.shortfall() == 162  # min(max(162, 128), 300 - 128)
    hold.used = 10_000
    assert hold.try_grow(hold.shortfall()) and hold.reserved == 300
    assert hold.shortfall() == 0
    hold.close()
    hold.close()
    assert budget.held == 0
    with pytest.raises(ValueError, match="cannot reserve 1001"):
        budget.try_reserve(1001)
    with pytest.raises(ValueError, match="cannot release"):
        budget.release(1)
    assert budget.hold(5000).cap == 1000


# -- sessions


@contextlib.asynccontextmanager
async def server(
    root: Path, limit: int = 200_000, **factory_kwargs: Any
) -> AsyncIterator[tuple[int, SessionFactory]]:
    loop = asyncio.get_running_loop()
    ex = DeliveryExecutor()
    handler = DeliveryHandler(ex, MailboxResolver(root), max_message_size=limit)
    kwargs: dict[str, Any] = {"max_connections": 64, "min_rate": 0, "data_size_limit": limit}
    kwargs.update(factory_kwargs)
    factory = SessionFactory(handler, lmtp=True, loop=loop, **kwargs)
    async with listening(factory, ex) as port:
        yield port, factory


async def start_data(port: int, size: int | None, rcpt: str) -> tuple[Any, Any, bytes]:
    """Open a session and send MAIL (SIZE=size), RCPT and DATA; return the DATA reply."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.readline()
    param = f" SIZE={size}" if size is not None else ""
    writer.write(f"LHLO c\r\nMAIL FROM:<s@x.net>{param}\r\nRCPT TO:<{rcpt}>\r\n".encode())
    while not (await reader.readline()).startswith(b"250 "):  # the LHLO reply
        pass
    assert (await reader.readline()).startswith(b"250")
    assert (await reader.readline()).startswith(b"250")
    writer.write(b"DATA\r\n")
    return reader, writer, await reader.readline()


def body(n: int) -> bytes:
    return b"Subject: x\r\n\r\n" + (b"y" * 78 + b"\r\n") * (n // 80)


async def test_data_waits_for_room_then_gets_451_4_3_1(tmp_path: Path) -> None:
    """With 100 kB held by a stalled transfer, DATA for 20 kB more waits, then gets 451 4.3.1."""
    async with server(tmp_path, 100_000, max_pending_bytes=100_000, data_wait=0.3) as (
        port,
        factory,
    ):
        ra, wa, reply = await start_data(port, 90_000, "a@example.org")
        assert reply.startswith(b"354")
        msg = dot_stuff(body(80_000))
        wa.write(msg[:1000])  # and stalls: 90,000 bytes stay reserved
        rb, wb, reply_b = await start_data(port, 20_000, "b@example.org")
        assert reply_b.startswith(b"451 4.3.1 ")
        assert factory.budget.held == 90_000
        wa.write(msg[1000:])
        assert (await ra.readline()).startswith(b"250")
        wb.write(b"DATA\r\n")  # the same session tries again, now with room
        assert (await rb.readline()).startswith(b"354")
        wb.write(dot_stuff(body(10_000)))
        assert (await rb.readline()).startswith(b"250")
        for w in (wa, wb):
            w.close()
    assert factory.budget.held == 0 and factory.budget.peak <= 100_000


async def test_a_transfer_that_cannot_grow_is_closed_with_421_4_3_1(tmp_path: Path) -> None:
    """A transfer past its reservation, with no room to grow, stops being read, then gets 421."""
    async with server(tmp_path, limit=100_000, max_pending_bytes=200_000, data_wait=0.3) as (
        port,
        factory,
    ):
        ra, wa, reply = await start_data(port, None, "a@example.org")  # a 64 KiB slice
        rb, wb, reply_b = await start_data(port, 20_000, "b@example.org")
        rc, wc, reply_c = await start_data(port, 60_000, "c@example.org")
        assert reply == reply_b == reply_c
        assert reply.startswith(b"354")
        assert factory.budget.held == 65_536 + 20_000 + 60_000
        # B declared 20 kB and sends 90: it must grow, but the room left is kept for A,
        # the oldest transfer, to reach its cap. B is no longer read, and then closed.
        wb.write(dot_stuff(body(90_000)))
        assert await rb.readline() == (
            b"421 4.3.1 Too much mail data pending on this server, closing\r\n"
        )
        assert factory.budget_closed == 1
        assert factory.budget.held == 65_536 + 60_000
        wa.write(dot_stuff(body(90_000)))  # A, the oldest, grows past its slice at once
        assert (await ra.readline()).startswith(b"250")
        wc.write(dot_stuff(body(50_000)))
        assert (await rc.readline()).startswith(b"250")
        for w in (wa, wb, wc):
            w.close()
    assert factory.budget.held == 0 and factory.budget.peak <= 200_000
    assert len(files_in(tmp_path / "example.org" / "a" / "new")) == 1
    assert len(files_in(tmp_path / "example.org" / "c" / "new")) == 1
    assert not (tmp_path / "example.org" / "b").exists()


async def test_concurrent_transfers_stay_within_the_budget_and_all_complete(
    tmp_path: Path,
) -> None:
    """16 sessions sending 100 kB at once through a 300 kB budget: all 250, never over 300 kB."""
    async with server(tmp_path, max_pending_bytes=300_000, data_wait=20) as (port, factory):
        replies = await asyncio.gather(
            *(
                send_message(
                    "127.0.0.1",
                    port,
                    mail_from="s@x.net",
                    rcpts=[f"u{i}@example.org"],
                    body=body(100_000),
                )
                for i in range(16)
            )
        )
    assert [r.code for rs in replies for r in rs] == [250] * 16
    assert 100_000 < factory.budget.peak <= 300_000  # several at once, never over
    assert factory.budget.held == 0 and factory.budget_closed == 0
    for i in range(16):
        assert len(files_in(tmp_path / "example.org" / f"u{i}" / "new")) == 1


async def test_a_budget_smaller_than_one_message_is_refused(tmp_path: Path) -> None:
    """max_pending_bytes below data_size_limit is a configuration error, said at once."""
    loop = asyncio.get_running_loop()
    async with DeliveryExecutor() as ex:
        handler = DeliveryHandler(ex, MailboxResolver(tmp_path))
        with pytest.raises(ValueError, match="max_pending_bytes must be >= 1000, not 999"):
            SessionFactory(
                handler, lmtp=True, max_connections=1, loop=loop, data_size_limit=1000,
                max_pending_bytes=999,
            )  # fmt: skip
        factory = SessionFactory(handler, lmtp=True, max_connections=1, loop=loop)
        assert factory.budget.max_bytes == 4 * 33554432
