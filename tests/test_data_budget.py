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
from delivery_executor.smtp.data_budget import GROW_AHEAD
from delivery_executor.testing import dot_stuff, send_message

from .helpers import files_in, listening

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]

SLICE = 8192  # what a DATA reserves before its 354


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
    assert not budget.hold(5).try_grow(5)  # the newest transfer: behind the line
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
        assert not h.try_grow(25) and not budget.hold(100).try_grow(1)
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


async def test_shortfall_covers_what_arrived_plus_a_bounded_step_and_close_is_idempotent() -> None:
    """A growing transfer reserves what it received plus at most GROW_AHEAD, never past its cap."""
    budget = DataBudget(1_000_000)
    hold = budget.hold(300_000)
    await hold.open(8192)
    hold.used = 8192
    assert hold.shortfall() == 0 and hold.try_cover()
    hold.used = 8193
    assert hold.shortfall() == 1
    assert hold.try_cover() and hold.reserved == 8193 + GROW_AHEAD
    hold.used = 10_000_000
    assert hold.try_cover() and hold.reserved == 300_000
    assert hold.shortfall() == 0
    other = budget.hold(1_000_000)  # younger: room is kept for hold to reach its cap
    await other.open(650_000)
    other.used = 650_010
    assert other.try_cover() and other.reserved == 650_010  # the step ahead did not fit
    other.used = 700_001
    assert not other.try_cover() and other.reserved == 650_010
    other.close()
    hold.close()
    hold.close()
    assert budget.held == 0 and budget.transfers == 0
    with pytest.raises(ValueError, match="cannot reserve 1000001"):
        budget.hold(5).try_grow(1_000_001)
    assert budget.hold(5_000_000).cap == 1_000_000


async def test_a_hold_closed_while_it_waits_returns_holding_nothing() -> None:
    """close() during grow(): the wait ends, nothing is reserved, the line moves on."""
    budget = DataBudget(100)
    first, second = budget.hold(100), budget.hold(100)
    await first.open(60)
    await second.open(0)
    task = asyncio.create_task(second.grow(50))
    await settle()
    assert budget.waiting == 1
    second.close()
    await task
    assert second.reserved == 0 and budget.held == 60 and budget.waiting == 0
    first.close()
    assert budget.held == 0 and budget.transfers == 0


async def test_a_cancelled_open_leaves_nothing_behind_even_when_granted_first() -> None:
    """A task cancelled right after its grant: leaving the async-with gives the bytes back."""
    budget = DataBudget(100)
    blocker = budget.hold(100)
    await blocker.open(100)

    async def transfer() -> None:
        async with budget.hold(100) as hold:
            await hold.open(40)
            await asyncio.sleep(3600)

    task = asyncio.create_task(transfer())
    await settle()
    blocker.close()  # granted now; cancelled before it runs again
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert budget.held == 0 and budget.transfers == 0


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
    """With the room kept for an older stalled transfer, a new DATA waits, then gets 451 4.3.1."""
    async with server(tmp_path, 100_000, max_pending_bytes=100_000, data_wait=0.3) as (
        port,
        factory,
    ):
        ra, wa, reply = await start_data(port, 90_000, "a@example.org")
        assert reply.startswith(b"354")
        msg = dot_stuff(body(80_000))
        wa.write(msg[:1000])  # and stalls: A holds its slice, and may need the whole budget
        rb, wb, reply_b = await start_data(port, 20_000, "b@example.org")
        assert reply_b.startswith(b"451 4.3.1 ")
        assert factory.budget.held == SLICE  # a declared SIZE reserves nothing ahead
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
        ra, wa, reply = await start_data(port, None, "a@example.org")
        rb, wb, reply_b = await start_data(port, 20_000, "b@example.org")
        rc, wc, reply_c = await start_data(port, 60_000, "c@example.org")
        assert reply == reply_b == reply_c
        assert reply.startswith(b"354")
        assert factory.budget.held == 3 * SLICE  # whatever SIZE they declared
        # B sends 90 kB: it must grow, but the room left is kept for A, the oldest
        # transfer, to reach its cap (104 kB of the 200). B is no longer read, then closed.
        wb.write(dot_stuff(body(90_000)))
        assert await rb.readline() == (
            b"421 4.3.1 Too much mail data pending on this server, closing\r\n"
        )
        assert factory.budget_closed == 1
        assert factory.budget.held == 2 * SLICE
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


async def test_fifty_slow_data_clients_do_not_hold_up_a_fast_one(tmp_path: Path) -> None:
    """50 clients stalled mid-DATA (half declared 1 MiB) hold what they sent; 900 kB passes."""
    limit = 1_048_576
    async with server(
        tmp_path,
        limit,
        data_wait=5,
        min_rate=500,
        rate_grace=20,
        trusted_networks=(),
        max_connections_per_ip=0,
    ) as (
        port,
        factory,
    ):
        budget = factory.budget
        assert budget.max_bytes == 4 * limit  # serve's default: 4 x --max-size
        slow = []
        for i in range(50):
            _r, w, reply = await start_data(port, limit if i % 2 else None, f"s{i}@example.org")
            assert reply.startswith(b"354")
            w.write(b"Subject: slow\r\n\r\n" + b"x" * 1000)  # and then nothing: slowloris
            slow.append(w)
        assert budget.held == 50 * SLICE and budget.waiting == 0
        async with asyncio.timeout(5):  # well before min_rate closes the slow ones (20 s)
            replies = await send_message(
                "127.0.0.1", port, mail_from="s@x.net", rcpts=["good@example.org"],
                body=body(900_000),
            )  # fmt: skip
        assert [r.code for r in replies] == [250]
        assert factory.live == 50 and factory.too_slow == 0 and factory.budget_closed == 0
        assert budget.held == 50 * SLICE  # the fast transfer gave its bytes back
        for w in slow:
            w.close()
    assert len(files_in(tmp_path / "example.org" / "good" / "new")) == 1
