"""Our protocol classes' shortcuts around aiosmtpd's per-connection and per-command costs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import pytest
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP
from hypothesis import example, given, settings
from hypothesis import strategies as st

from delivery_executor import DeliveryLMTP, DeliverySMTP

pytestmark = pytest.mark.timeout(120)


@contextlib.asynccontextmanager
async def _connected(
    cls: type[SMTP], handler: object
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A server on 127.0.0.1 with a ``cls`` session per connection, and one client of it."""
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(lambda: cls(handler, loop=loop, hostname="h"), "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.sockets[0].getsockname()[1])
    try:
        yield reader, writer
    finally:
        writer.close()
        srv.close()
        await srv.wait_closed()


class _Handler:
    async def handle_DATA(self, *args: object) -> str:
        return "250 OK"


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[SMTP, SMTP]]:
    loop = asyncio.new_event_loop()
    ours = DeliverySMTP(_Handler(), loop=loop, hostname="h")
    stock = SMTP(_Handler(), loop=loop, hostname="h")
    yield ours, stock
    loop.close()


atoms = st.text(alphabet="abcXYZ019.-+_=!#~'\"\\()<>@[]: ,;", max_size=30)


@settings(max_examples=1500, deadline=None)
@given(arg=st.one_of(atoms, st.builds(lambda a, b, c: f"<{a}@{b}>{c}", atoms, atoms, atoms)))
@example("<alice@example.org>")
@example("<alice@example.org> SIZE=1234 BODY=8BITMIME")
@example("<>")
@example("")
@example(" <a@b>")
@example("<a.b@c.d.>")
@example('<"quoted local"@example.org>')
@example("<a@[192.0.2.1]>")
@example("<a@b> (comment) SIZE=1")
@example("<a@b>\tSIZE=1")
@example("alice@example.org")
@example("<" + "x" * 65 + "@example.org>")
def test_getaddr_gives_what_aiosmtpd_gives(pair: tuple[SMTP, SMTP], arg: str) -> None:
    """Our _getaddr (with its fast path for plain <a@b>) returns, or raises, as aiosmtpd's."""
    ours, stock = pair
    assert _outcome(ours, arg) == _outcome(stock, arg)


def _outcome(server: SMTP, arg: str) -> object:
    # aiosmtpd's parser raises IndexError on some garbage (answered 500 by aiosmtpd):
    # ours must do the same there, not answer differently.
    try:
        return server._getaddr(arg)
    except Exception as exc:
        return type(exc)


def test_getaddr_respects_the_local_part_limit(pair: tuple[SMTP, SMTP]) -> None:
    """A local part past local_part_limit is refused on the fast path too, as in aiosmtpd."""
    ours, stock = pair
    ours.local_part_limit = stock.local_part_limit = 64
    try:
        for arg in ("<" + "x" * 64 + "@example.org>", "<" + "x" * 65 + "@example.org>"):
            assert ours._getaddr(arg) == stock._getaddr(arg)
        assert ours._getaddr("<" + "x" * 65 + "@example.org>") == (None, None)
    finally:
        ours.local_part_limit = stock.local_part_limit = 0


@pytest.mark.parametrize(("ours_cls", "stock_cls"), [(DeliverySMTP, SMTP), (DeliveryLMTP, LMTP)])
def test_a_short_dir_keeps_every_command_and_auth_mechanism(
    ours_cls: type[SMTP], stock_cls: type[SMTP]
) -> None:
    """aiosmtpd finds the same commands and AUTH mechanisms in our short dir() as in its own."""
    loop = asyncio.new_event_loop()
    try:
        ours = ours_cls(_Handler(), loop=loop, hostname="h")
        stock = stock_cls(_Handler(), loop=loop, hostname="h")
        assert set(ours._smtp_methods) == set(stock._smtp_methods)
        assert set(ours._auth_methods) == set(stock._auth_methods)
        assert all(name.startswith(("smtp_", "auth_")) for name in dir(ours))
    finally:
        loop.close()


class _HookedHandler:
    """A handler with a class hook, an AUTH mechanism, an instance hook and a costly property."""

    reads = 0

    def __init__(self) -> None:
        self.handle_RCPT = self._rcpt  # a hook set on the instance, not the class

    @property
    def costly(self) -> int:
        type(self).reads += 1
        return 0

    async def _rcpt(self, *args: object) -> str:
        return "250 OK"

    async def handle_DATA(self, *args: object) -> str:
        return "250 OK"

    async def auth_CUSTOM(self, *args: object) -> object:
        return None


@pytest.mark.parametrize(("ours_cls", "stock_cls"), [(DeliverySMTP, SMTP), (DeliveryLMTP, LMTP)])
def test_the_handler_scan_finds_what_aiosmtpd_finds_and_reads_nothing_else(
    ours_cls: type[SMTP], stock_cls: type[SMTP]
) -> None:
    """Hooks (class and instance) and AUTH mechanisms match aiosmtpd's scan; no property is read."""
    loop = asyncio.new_event_loop()
    try:
        handler = _HookedHandler()
        stock = stock_cls(handler, loop=loop, hostname="h")
        assert _HookedHandler.reads == 1  # aiosmtpd's own scan reads every attribute
        _HookedHandler.reads = 0
        ours = ours_cls(handler, loop=loop, hostname="h")
        assert _HookedHandler.reads == 0
        assert ours.event_handler is handler
        assert ours._handle_hooks == stock._handle_hooks  # the handler's own bound methods
        assert set(ours._auth_methods) == set(stock._auth_methods)
        assert ours._auth_methods["CUSTOM"].method == handler.auth_CUSTOM
        assert ours._auth_methods["CUSTOM"].is_builtin is False
        handler.handle_NOOP = handler._rcpt  # added later
        assert "NOOP" in ours_cls(handler, loop=loop, hostname="h")._handle_hooks
    finally:
        loop.close()


@pytest.mark.asyncio
@pytest.mark.uvloop
@pytest.mark.parametrize("base", [DeliveryLMTP, DeliverySMTP])
async def test_a_pipelining_client_lets_other_sessions_run(base: type[SMTP]) -> None:
    """4,000 NOOPs in one write are answered with the loop given to others every 64 replies."""
    pushed = [0]

    class Counting(base):  # type: ignore[valid-type, misc]
        async def push(self, status: str) -> None:
            await super().push(status)
            pushed[0] += 1

    seen: list[int] = []  # replies pushed so far, at each turn another task got

    async def other_session() -> None:
        while True:
            seen.append(pushed[0])
            await asyncio.sleep(0)

    async with _connected(Counting, _Handler()) as (reader, writer):
        await reader.readline()  # the greeting
        ticker = asyncio.create_task(other_session())
        writer.write(b"NOOP\r\n" * 4000)  # 56 kB of replies: under the write high-water mark
        async with asyncio.timeout(30):
            for _ in range(4000):
                await reader.readline()
        ticker.cancel()
        # Turns inside the burst, one at least every 64 replies (not one after 4,000).
        inside = sorted({n for n in seen if 1 < n < 4001})
        assert len(inside) >= 4000 // 64 - 1, inside[:10]


@pytest.mark.asyncio
@pytest.mark.parametrize(("base", "hello"), [(DeliveryLMTP, b"LHLO"), (DeliverySMTP, b"EHLO")])
async def test_the_hello_reply_is_one_write(base: type[SMTP], hello: bytes) -> None:
    """Every line of the EHLO/LHLO reply goes out in one transport write, in aiosmtpd's order."""
    writes: list[bytes] = []

    class Counting(base):  # type: ignore[valid-type, misc]
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            real = transport.write  # type: ignore[attr-defined]

            def write(data: bytes) -> None:
                writes.append(bytes(data))
                real(data)

            transport.write = write  # type: ignore[attr-defined]
            super().connection_made(transport)

    async with _connected(Counting, _Handler()) as (reader, writer):
        async with asyncio.timeout(10):
            await reader.readline()  # the greeting
            writes.clear()
            writer.write(hello + b" client.example\r\n")
            lines = [await reader.readline()]
            while lines[-1][3:4] == b"-":
                lines.append(await reader.readline())
        assert writes == [b"".join(lines)]
        assert lines[0] == b"250-h\r\n" and lines[-1] == b"250 HELP\r\n"
        assert b"250-SIZE 33554432\r\n" in lines and b"250-PIPELINING\r\n" in lines


@pytest.mark.asyncio
@pytest.mark.uvloop
@pytest.mark.filterwarnings("ignore:Use the 5-argument handle_EHLO:DeprecationWarning")
async def test_a_hello_hook_that_fails_midway_still_sends_the_held_lines() -> None:
    """An old-style EHLO hook that raises after aiosmtpd pushed its lines: they still go out."""

    class Failing(_Handler):
        # aiosmtpd's 4-argument form: its lines are pushed (held by us) before the hook runs.
        async def handle_EHLO(
            self, server: object, session: object, envelope: object, hostname: str
        ) -> str:
            raise RuntimeError("hook broke")

    async with _connected(DeliverySMTP, Failing()) as (reader, writer):
        async with asyncio.timeout(10):
            await reader.readline()
            writer.write(b"EHLO client.example\r\n")
            writer.write(b"NOOP\r\n")
            lines = [await reader.readline()]
            while not lines[-1].startswith(b"250 "):
                lines.append(await reader.readline())
        assert lines[0] == b"250-h\r\n", lines
        assert b"250-SIZE 33554432\r\n" in lines
        assert any(line.startswith(b"500") for line in lines), lines


@pytest.mark.asyncio
@pytest.mark.uvloop
@pytest.mark.filterwarnings("ignore:Use the 5-argument handle_EHLO:DeprecationWarning")
async def test_a_hello_hook_reply_midway_follows_the_held_lines() -> None:
    """An old-style EHLO hook answering an error: aiosmtpd's lines go out before it, in order."""

    class Refusing(_Handler):
        async def handle_EHLO(
            self, server: object, session: object, envelope: object, hostname: str
        ) -> str:
            return "550 not you"

    async with _connected(DeliverySMTP, Refusing()) as (reader, writer):
        async with asyncio.timeout(10):
            await reader.readline()
            writer.write(b"EHLO client.example\r\n")
            lines = [await reader.readline()]
            while not lines[-1].startswith(b"550"):
                lines.append(await reader.readline())
        assert lines[0] == b"250-h\r\n", lines
        assert all(line.startswith(b"250-") for line in lines[:-1]), lines
