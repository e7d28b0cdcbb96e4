"""Connection fairness: per-peer caps, a minimum rate, a session deadline, room when full."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from delivery_executor import DeliveryExecutor, MailboxResolver, ThreadWriter, write_batch
from delivery_executor.smtp import DeliveryHandler, SessionFactory
from delivery_executor.smtp.sessions import (
    DEFAULT_MAX_CONNECTIONS_PER_IP,
    SessionGuard,
    peer_key,
)
from delivery_executor.testing import ServerProcess, SMTPClientError, send_message
from delivery_executor.writers import BatchResult, Group

from .helpers import files_in, listening

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]


@contextlib.asynccontextmanager
async def server(
    root: Path, executor: DeliveryExecutor | None = None, **factory_kwargs: Any
) -> AsyncIterator[tuple[int, SessionFactory]]:
    """An LMTP server on 127.0.0.1 (all of 127/8 reaches it) with the given limits.

    It trusts no network unless told: loopback, where the tests run, is trusted by default.
    """
    loop = asyncio.get_running_loop()
    ex = executor or DeliveryExecutor()
    handler = DeliveryHandler(ex, MailboxResolver(root))
    kwargs: dict[str, Any] = {
        "max_connections": 256,
        "enable_SMTPUTF8": True,
        "trusted_networks": (),
    }
    kwargs.update(factory_kwargs)
    factory = SessionFactory(handler, lmtp=True, loop=loop, **kwargs)
    async with listening(factory, ex) as port:
        yield port, factory


class _FakeTimer:
    def __init__(self, callback: Callable[[], object]) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """A session clock that moves only when :meth:`advance` says: no real waiting."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._due: list[tuple[float, int, _FakeTimer]] = []
        self._order = itertools.count()

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], object]) -> _FakeTimer:
        timer = _FakeTimer(callback)
        heapq.heappush(self._due, (self.now + delay, next(self._order), timer))
        return timer

    def advance(self, seconds: float) -> None:
        """Move ``seconds`` on, running every timer due on the way, in order."""
        end = self.now + seconds
        while self._due and self._due[0][0] <= end:
            when, _, timer = heapq.heappop(self._due)
            self.now = max(self.now, when)
            if not timer.cancelled:
                timer.callback()
        self.now = end


async def until(check: Callable[[], bool], limit: float = 10.0) -> None:
    """Poll a server-side condition (the server runs on this loop) for ``limit`` real s."""
    async with asyncio.timeout(limit):
        while not check():  # noqa: ASYNC110 - server-side state, no event to wait on
            await asyncio.sleep(0.005)


def only_guard(factory: SessionFactory) -> SessionGuard:
    (guard,) = factory.sessions
    return guard


async def connect(port: int, source: str = "127.0.0.1") -> tuple[asyncio.StreamReader, Any]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def closed_with(reader: asyncio.StreamReader, limit: float) -> bytes:
    """The last line the server sent before closing (within ``limit`` s)."""
    last = b""
    async with asyncio.timeout(limit):
        while line := await reader.readline():
            last = line
    return last


async def test_peer_keys() -> None:
    """IPv4 counts per address, IPv6 per /64 (v4-mapped as IPv4); Unix sockets are exempt."""
    assert peer_key(("192.0.2.7", 25)) == "192.0.2.7"
    assert peer_key(("2001:db8:1:2::5", 25, 0, 0)) == peer_key(("2001:db8:1:2:ffff::9", 1, 0, 0))
    assert peer_key(("2001:db8:1:2::5", 25, 0, 0)) == "2001:db8:1:2::/64"
    assert peer_key(("2001:db8:1:3::5", 25, 0, 0)) != peer_key(("2001:db8:1:2::5", 25, 0, 0))
    assert peer_key(("::ffff:192.0.2.7", 25, 0, 0)) == "192.0.2.7"
    assert peer_key(("fe80::1%eth0", 25, 0, 2)) == "fe80::/64"
    for unix in ("", "/run/lmtp.sock", None, b""):
        assert peer_key(unix) is None
    assert DEFAULT_MAX_CONNECTIONS_PER_IP == 32


async def test_per_peer_cap_refuses_past_it_and_only_that_peer(tmp_path: Path) -> None:
    """With 4 per peer, the 5th from 127.0.0.2 gets 421 4.3.2; 127.0.0.3 is still served."""
    async with server(tmp_path, max_connections_per_ip=4) as (port, factory):
        held = [await connect(port, "127.0.0.2") for _ in range(4)]
        for reader, _ in held:
            assert (await reader.readline()).startswith(b"220")
        r5, w5 = await connect(port, "127.0.0.2")
        assert (
            await r5.readline()
            == b"421 4.3.2 Too many connections from your address, try again later\r\n"
        )
        assert await r5.read() == b""
        w5.close()
        other = await send_message(
            "127.0.0.1", port, mail_from="s@x.net", rcpts=["a@example.org"], body=b"hi\r\n"
        )
        assert other[0].code == 250
        held[0][1].close()
        async with asyncio.timeout(5):
            while factory.per_peer.get("127.0.0.2") != 3:  # noqa: ASYNC110 - server side
                await asyncio.sleep(0.01)
        r6, w6 = await connect(port, "127.0.0.2")
        assert (await r6.readline()).startswith(b"220")
        assert factory.refused == 1
        for _, w in [*held[1:], (r6, w6)]:
            w.close()


async def test_a_trickling_client_is_closed_but_an_idle_one_between_commands_is_not(
    tmp_path: Path,
) -> None:
    """4 bytes mid-command against min_rate 100: 421 4.4.2 once 1 s of waiting is spent."""
    clock = FakeClock()
    async with server(tmp_path, min_rate=100, rate_grace=1.0, clock=clock) as (port, factory):
        slow_r, slow_w = await connect(port)
        assert (await slow_r.readline()).startswith(b"220")
        slow = only_guard(factory)
        idle_r, idle_w = await connect(port)
        assert (await idle_r.readline()).startswith(b"220")
        idle_w.write(b"LHLO idle.example\r\n")
        async with asyncio.timeout(5):
            while not (await idle_r.readline()).startswith(b"250 "):  # the LHLO reply
                pass
        slow_w.write(b"NOOP")  # and then nothing: the server waits on it mid-command
        await until(lambda: slow.bytes_in == 4)
        clock.advance(0.75)  # not yet past rate_grace
        assert factory.too_slow == 0 and factory.live == 2
        clock.advance(0.5)
        last = await closed_with(slow_r, 10)
        assert last == b"421 4.4.2 Connection too slow, closing\r\n"
        assert factory.too_slow == 1
        # The idle client waited just as long, between commands, and is still served.
        assert (await send_via(idle_r, idle_w, b"NOOP\r\n")).startswith(b"250")
        assert factory.live == 1
        slow_w.close()
        idle_w.close()


async def send_via(reader: asyncio.StreamReader, writer: Any, line: bytes) -> bytes:
    writer.write(line)
    async with asyncio.timeout(5):
        return await reader.readline()


async def test_the_session_deadline_closes_with_421_4_4_2(tmp_path: Path) -> None:
    """An idle session past session_timeout gets 421 4.4.2 and is closed, not before."""
    clock = FakeClock()
    async with server(tmp_path, session_timeout=0.5, clock=clock) as (port, factory):
        reader, writer = await connect(port)
        assert (await reader.readline()).startswith(b"220")
        clock.advance(0.4)
        assert factory.timed_out == 0 and factory.live == 1
        clock.advance(0.2)
        assert await closed_with(reader, 5) == b"421 4.4.2 Session time limit exceeded, closing\r\n"
        assert factory.timed_out == 1 and factory.live == 0
        writer.close()


async def test_the_deadline_never_cuts_a_message_being_delivered(tmp_path: Path) -> None:
    """A delivery still being written when the deadline passes is answered 250, then 421."""
    gate = threading.Event()

    def slow(groups: Sequence[Group]) -> BatchResult:
        gate.wait(10)
        return write_batch(groups)

    ex = DeliveryExecutor(writer=ThreadWriter(slow))
    clock = FakeClock()
    async with server(tmp_path, ex, session_timeout=0.3, clock=clock) as (port, factory):
        reader, writer = await connect(port)
        for line in (b"LHLO c\r\n", b"MAIL FROM:<s@x.net>\r\n", b"RCPT TO:<a@example.org>\r\n",
                     b"DATA\r\n", b"Subject: s\r\n\r\nbody\r\n.\r\n"):  # fmt: skip
            writer.write(line)
        guard = only_guard(factory)
        await until(lambda: guard.hooks > 0)  # the handler is delivering
        clock.advance(0.8)  # well past the deadline, the write is still held
        assert factory.timed_out == 0
        gate.set()
        lines = []
        async with asyncio.timeout(10):
            while not (line := await reader.readline()).startswith(b"250 2.0.0"):
                lines.append(line)
            lines.append(line)
            await until(lambda: guard.hooks == 0)
            clock.advance(0.2)  # the next check: the deadline has passed
            while line := await reader.readline():
                lines.append(line)
        writer.close()
    assert lines[-2].startswith(b"250 2.0.0 <a@example.org> Ok")
    assert lines[-1] == b"421 4.4.2 Session time limit exceeded, closing\r\n"
    assert len(files_in(tmp_path / "example.org" / "a" / "new")) == 1


async def test_a_client_that_does_not_read_its_replies_is_closed(tmp_path: Path) -> None:
    """Pipelined NOOPs with our replies left unread: blocked writes count against min_rate."""
    # A high rate: the 100 KB or so it sends before our writes block buy it 1 s.
    clock = FakeClock()
    limits: dict[str, Any] = {"min_rate": 100_000, "rate_grace": 0.5, "write_stall": 1e6}
    async with server(tmp_path, clock=clock, **limits) as (port, factory):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        assert (await reader.readline()).startswith(b"220")
        (guard,) = factory.sessions
        theirs = guard.proto.transport.get_extra_info("socket")
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        writer.write(b"LHLO c\r\n" + b"NOOP\r\n" * 200_000)  # and never read a reply
        await until(lambda: guard.write_paused, 15)
        assert factory.too_slow == 0
        for _ in range(120):  # bounded: 60 s of server time, in half seconds
            clock.advance(0.5)
            if factory.too_slow:
                break
        assert factory.too_slow == 1 and factory.live == 0
        assert guard.bytes_in < 1_200_000  # it stopped reading them: the server was blocked
        writer.transport.abort()


async def test_slow_clients_holding_every_slot_do_not_starve_normal_ones(tmp_path: Path) -> None:
    """256 clients trickling 1 byte/s from 8 addresses fill the server; 40 normal messages
    from a 9th address are still each answered 250 within 10 s (retrying a 421 gate refusal)."""
    async with server(tmp_path, rate_grace=3.0) as (port, factory):
        stop = asyncio.Event()
        attacker_sessions = 0

        async def attacker(source: str) -> None:
            nonlocal attacker_sessions
            for _ in range(10):  # bounded reconnects; each session at most ~12 s
                if stop.is_set():
                    return
                try:
                    _, writer = await connect(port, source)
                except OSError:
                    return
                attacker_sessions += 1
                try:
                    for byte in b"NOOP\r\n" * 2:
                        writer.write(bytes([byte]))
                        await writer.drain()
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(1.0):  # a byte per second
                                await stop.wait()
                        if stop.is_set():
                            break
                except OSError:
                    pass
                finally:
                    writer.transport.abort()

        attackers = [asyncio.create_task(attacker(f"127.0.0.{2 + i % 8}")) for i in range(256)]
        try:
            async with asyncio.timeout(15):
                while factory.live < 256:  # noqa: ASYNC110 - a server-side count
                    await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)  # every attacker is trickling now

            refusals = 0

            async def one(i: int) -> float:
                nonlocal refusals
                started = time.monotonic()
                async with asyncio.timeout(10):  # each normal message: answered within 10 s
                    while True:
                        try:
                            replies = await send_message(
                                "127.0.0.1", port, mail_from="s@x.net",
                                rcpts=["normal@example.org"], body=b"normal %d\r\n" % i,
                            )  # fmt: skip
                        except SMTPClientError:  # 421 at the gate: every slot was fresh
                            refusals += 1
                            await asyncio.sleep(0.2)
                            continue
                        assert [r.code for r in replies] == [250]
                        return time.monotonic() - started

            async def worker(w: int) -> list[float]:
                return [await one(w * 10 + i) for i in range(10)]

            times = [t for ts in await asyncio.gather(*(worker(w) for w in range(4))) for t in ts]
        finally:
            stop.set()
            await asyncio.gather(*attackers, return_exceptions=True)
    assert len(times) == 40 and max(times) < 10
    assert len(files_in(tmp_path / "example.org" / "normal" / "new")) == 40
    assert factory.evicted >= 1  # slots were taken from slow clients, not waited for
    assert refusals < 40, refusals  # most messages got in on the first try
    assert attacker_sessions >= 256


async def test_serve_flags_reach_the_session_rules(tmp_path: Path) -> None:
    """serve --max-connections-per-ip 1 --session-timeout 1 (loopback not trusted): 421s."""
    args = ("--max-connections-per-ip", "1", "--session-timeout", "1", "--min-rate", "0",
            "--max-pending-bytes", "100000", "--max-size", "50000",
            "--trusted-networks", "10.0.0.0/8")  # fmt: skip
    with ServerProcess(tmp_path, *args) as srv:
        r1, w1 = await connect(srv.port)
        assert (await r1.readline()).startswith(b"220")
        r2, w2 = await connect(srv.port)
        assert (await r2.readline()).startswith(b"421 4.3.2 Too many connections from your")
        assert await closed_with(r1, 10) == b"421 4.4.2 Session time limit exceeded, closing\r\n"
        replies = await send_message(
            "127.0.0.1", srv.port, mail_from="s@x.net", rcpts=["a@example.org"], body=b"hi\r\n"
        )
        assert [r.code for r in replies] == [250]
        for w in (w1, w2):
            w.close()
        assert srv.stop() == 0
