"""Session slots: trusted networks, a slot freed when the session ends, on asyncio and uvloop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from delivery_executor import DeliveryExecutor, MailboxResolver
from delivery_executor.smtp import DeliveryHandler, DeliveryLMTP, SessionFactory
from delivery_executor.smtp.sessions import (
    DEFAULT_TRUSTED_NETWORKS,
    WRITE_HIGH,
    trusted_networks_option,
)
from delivery_executor.testing import ServerProcess, send_message

from .helpers import files_in, listening

pytestmark = [pytest.mark.timeout(90), pytest.mark.asyncio]


@contextlib.asynccontextmanager
async def server(root: Path, **factory_kwargs: Any) -> AsyncIterator[tuple[int, SessionFactory]]:
    """An LMTP server on 127.0.0.1 with SessionFactory's defaults, but for ``factory_kwargs``."""
    loop = asyncio.get_running_loop()
    ex = DeliveryExecutor()
    handler = factory_kwargs.pop("handler", None) or DeliveryHandler(ex, MailboxResolver(root))
    kwargs: dict[str, Any] = {"max_connections": 256}
    kwargs.update(factory_kwargs)
    factory = SessionFactory(handler, lmtp=True, loop=loop, **kwargs)
    async with listening(factory, ex) as port:
        yield port, factory


async def connect(port: int, source: str = "127.0.0.1") -> tuple[asyncio.StreamReader, Any]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def until(cond: Any, limit: float = 10.0) -> None:
    """Poll ``cond`` every 10 ms; AssertionError if it stays false for ``limit`` s."""
    for _ in range(int(limit * 100)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"still false after {limit} s")


# -- trusted networks


async def test_loopback_is_trusted_by_default_past_the_per_peer_cap(tmp_path: Path) -> None:
    """With a per-peer cap of 2, five sessions from 127.0.0.1 (trusted by default) are served."""
    assert DEFAULT_TRUSTED_NETWORKS == ("127.0.0.0/8", "::1/128")
    async with server(tmp_path, max_connections_per_ip=2) as (port, factory):
        conns = [await connect(port) for _ in range(5)]
        for r, _ in conns:
            assert (await r.readline()).startswith(b"220")
        assert factory.live == 5 and factory.per_peer == {} and factory.refused == 0
        for _, w in conns:
            w.close()


async def test_an_untrusted_peer_is_still_capped(tmp_path: Path) -> None:
    """Trusting only 127.0.0.2: 127.0.0.1 gets the per-peer 421 at its 3rd session, .2 does not."""
    async with server(tmp_path, max_connections_per_ip=2, trusted_networks=["127.0.0.2"]) as (
        port,
        factory,
    ):
        conns = [await connect(port, "127.0.0.1") for _ in range(2)]
        conns += [await connect(port, "127.0.0.2") for _ in range(3)]
        for r, _ in conns:
            assert (await r.readline()).startswith(b"220")
        r3, w3 = await connect(port, "127.0.0.1")
        assert await r3.readline() == (
            b"421 4.3.2 Too many connections from your address, try again later\r\n"
        )
        assert factory.per_peer == {"127.0.0.1": 2} and factory.refused == 1
        for _, w in [*conns, (r3, w3)]:
            w.close()


async def test_a_trusted_peer_is_exempt_from_min_rate(tmp_path: Path) -> None:
    """Half a command line, then silence: 421 4.4.2 for an untrusted peer, not for a trusted one."""
    async with server(
        tmp_path, min_rate=10_000, rate_grace=0.2, trusted_networks=["127.0.0.2/32"]
    ) as (port, factory):
        (ru, wu), (rt, wt) = await connect(port, "127.0.0.1"), await connect(port, "127.0.0.2")
        for r, w in ((ru, wu), (rt, wt)):
            assert (await r.readline()).startswith(b"220")
            w.write(b"NOO")  # started a command: the server now waits on the client
        async with asyncio.timeout(10):
            assert await ru.readline() == b"421 4.4.2 Connection too slow, closing\r\n"
        await asyncio.sleep(0.5)  # as long again for the trusted one
        wt.write(b"P\r\n")
        assert await rt.readline() == b"250 2.0.0 OK\r\n"
        assert factory.too_slow == 1
        for w in (wu, wt):
            w.close()


async def test_trusted_networks_are_checked_up_front() -> None:
    """A bad network is a ValueError naming it; a bare string is a TypeError; '' trusts none."""
    assert trusted_networks_option("") == ()
    assert trusted_networks_option("10.0.0.0/8, ::1") == ("10.0.0.0/8", "::1/128")
    with pytest.raises(ValueError, match="not an IP network: 'localhost'"):
        trusted_networks_option("127.0.0.1,localhost")
    loop = asyncio.get_running_loop()
    with pytest.raises(ValueError, match=r"not an IP network: '10\.0\.0\.0/33'"):
        SessionFactory(object(), lmtp=True, max_connections=1, loop=loop,
                       trusted_networks=["10.0.0.0/33"])  # fmt: skip
    with pytest.raises(TypeError, match="sequence of networks"):
        SessionFactory(object(), lmtp=True, max_connections=1, loop=loop,
                       trusted_networks="127.0.0.1")  # fmt: skip


# -- a slot is free once the session has ended


class FakeTransport(asyncio.Transport):
    """A transport that records writes and never calls connection_lost by itself."""

    def __init__(self, peer: tuple[str, int]) -> None:
        super().__init__()
        self.peer = peer
        self.written = bytearray()
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol


@pytest.mark.parametrize("ending", ["QUIT", "EOF"])
async def test_a_session_stops_counting_when_it_ends_not_at_connection_lost(
    tmp_path: Path, ending: str
) -> None:
    """After its 221 (or the peer's EOF) a session no longer counts, before connection_lost."""
    loop = asyncio.get_running_loop()
    async with DeliveryExecutor() as ex:
        handler = DeliveryHandler(ex, MailboxResolver(tmp_path))
        factory = SessionFactory(handler, lmtp=True, max_connections=1, loop=loop,
                                 max_connections_per_ip=1, trusted_networks=())  # fmt: skip
        transport = FakeTransport(("192.0.2.7", 4242))
        gate = factory()
        gate.connection_made(transport)
        assert factory.live == 1 and factory.per_peer == {"192.0.2.7": 1}
        proto = next(iter(factory.sessions)).proto
        await until(lambda: transport.written.startswith(b"220"))
        if ending == "QUIT":
            proto.data_received(b"QUIT\r\n")
            await until(lambda: transport.closing)
            assert transport.written.endswith(b"221 2.0.0 Bye\r\n")
        else:
            assert proto.eof_received() is False  # the transport closes our side too
        # connection_lost has not run: the slot is free anyway, for the next session.
        assert factory.live == 0 and factory.per_peer == {}
        second = FakeTransport(("192.0.2.7", 4243))
        factory().connection_made(second)
        assert factory.live == 1 and factory.refused == 0
        second.close()
        for guard in list(factory.sessions):
            guard.proto.connection_lost(None)
        proto.connection_lost(None)
        assert factory.live == 0


class CountingLMTP(DeliveryLMTP):
    lost = 0

    def connection_lost(self, exc: Exception | None) -> None:
        type(self).lost += 1
        super().connection_lost(exc)


def connect_and_close(port: int, n: int) -> None:
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", port)):
            pass


@pytest.mark.uvloop
async def test_clients_that_connect_and_close_at_once_free_their_slots(tmp_path: Path) -> None:
    """60 connect+close clients: every session gets connection_lost and none stays live."""
    CountingLMTP.lost = 0
    async with server(tmp_path) as (port, factory):
        factory.cls = CountingLMTP
        await asyncio.to_thread(connect_and_close, port, 60)
        await until(lambda: CountingLMTP.lost + factory.refused == 60)
        assert factory.live == 0 and factory.per_peer == {}
        replies = await send_message(
            "127.0.0.1", port, mail_from="s@x.net", rcpts=["a@example.org"], body=b"hi\r\n"
        )
        assert [r.code for r in replies] == [250]
    assert CountingLMTP.lost + factory.refused == 61
    assert len(files_in(tmp_path / "example.org" / "a" / "new")) == 1


# -- eviction


class BlockingHandler:
    """Delivers nothing until ``release`` is set: a delivery in flight as long as a test needs."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.entered.set()
        await self.release.wait()
        return "250 2.0.0 Delivered"


async def test_a_session_is_never_evicted_while_its_delivery_is_in_flight(tmp_path: Path) -> None:
    """A full server with a slow sender mid-delivery refuses the newcomer; the sender gets 250."""
    handler = BlockingHandler()
    async with server(tmp_path, handler=handler, max_connections=1, trusted_networks=(),
                      min_rate=100_000, rate_grace=60) as (port, factory):  # fmt: skip
        r, w = await connect(port)
        assert (await r.readline()).startswith(b"220")
        w.write(b"LHLO c\r\nMAIL FROM:<s@x.net>\r\nRCPT TO:<a@example.org>\r\nDATA\r\n")
        while not (await r.readline()).startswith(b"354"):
            pass
        w.write(b"Subject: x\r\n")
        await asyncio.sleep(0.7)  # slow: well over half a second behind min_rate now
        guard = next(iter(factory.sessions))
        assert guard.eviction_score() > 0  # before delivery it could be evicted...
        w.write(b"\r\nbody\r\n.\r\n")
        await handler.entered.wait()
        assert guard.eviction_score() == 0  # ...not while its message is being delivered
        r2, w2 = await connect(port)
        assert await r2.readline() == b"421 4.3.2 Too many connections, try again later\r\n"
        handler.release.set()
        assert await r.readline() == b"250 2.0.0 Delivered\r\n"
        assert factory.evicted == 0 and factory.refused == 1
        for writer in (w, w2):
            writer.close()


# -- the MTA in front, reconnecting per message


async def test_32_lmtp_clients_reconnecting_from_loopback_deliver_everything(
    tmp_path: Path,
) -> None:
    """Default serve, 32 LMTP clients on 127.0.0.1 each sending 8 messages, one session each."""
    with ServerProcess(tmp_path) as srv:

        async def client(i: int) -> list[int]:
            codes = []
            for j in range(8):
                replies = await send_message(
                    "127.0.0.1", srv.port, mail_from="s@x.net",
                    rcpts=[f"u{i}@example.org"], body=f"Subject: {j}\r\n\r\nhi\r\n".encode(),
                )  # fmt: skip
                codes += [r.code for r in replies]
            return codes

        results = await asyncio.gather(*(client(i) for i in range(32)))
        assert srv.stop() == 0
    assert [c for codes in results for c in codes] == [250] * 256
    assert sum(len(files_in(tmp_path / "example.org" / f"u{i}" / "new")) for i in range(32)) == 256


# -- clients that pipeline and never read


@pytest.mark.uvloop
async def test_a_client_that_never_reads_its_replies_is_bounded_then_aborted(
    tmp_path: Path,
) -> None:
    """100,000 pipelined LHLOs, never read: unread replies stay under WRITE_HIGH plus one reply,
    the session is aborted after write_stall s (trusted or not), and others are served meanwhile."""
    loop = asyncio.get_running_loop()
    async with server(tmp_path, write_stall=1.0) as (port, factory):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))

        async def flood() -> None:
            with contextlib.suppress(OSError):
                await loop.sock_sendall(sock, b"LHLO flood\r\n" * 100_000)

        sender = asyncio.create_task(flood())
        await until(lambda: any(g.write_paused for g in factory.sessions))
        (guard,) = factory.sessions
        most, served = 0, False
        while not guard.closed:  # bounded: write_stall ends it (the test's timeout otherwise)
            most = max(most, guard.proto.transport.get_write_buffer_size())
            await asyncio.sleep(0.01)
            if not served and not guard.closed:
                replies = await send_message(
                    "127.0.0.1", port, mail_from="s@x.net", rcpts=["a@example.org"], body=b"hi\r\n"
                )
                assert [r.code for r in replies] == [250]
                served = not guard.closed  # served while the flood was held
        assert served and 0 < most <= WRITE_HIGH + 1024  # one LHLO reply is about 150 bytes
        assert factory.write_stalled == 1 and factory.live == 0
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        sock.close()
    assert len(files_in(tmp_path / "example.org" / "a" / "new")) == 1
