"""A finished session is freed by refcounting alone; one lost with an error, by the collector."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import ssl
import struct
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from delivery_executor import DeliveryExecutor, MailboxResolver
from delivery_executor.smtp import DeliveryHandler, SessionFactory

from .helpers import listening, until

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]


@pytest.fixture
def no_collector() -> Iterator[None]:
    """The cycle collector off for the test: what it would free does not count."""
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


async def _line(reader: asyncio.StreamReader) -> bytes:
    while True:  # to the last line of a multi-line reply
        line = await asyncio.wait_for(reader.readline(), 10)
        if line[3:4] != b"-":
            return line


def _factory(ex: DeliveryExecutor, root: Path, lmtp: bool, **kwargs: Any) -> SessionFactory:
    return SessionFactory(
        DeliveryHandler(ex, MailboxResolver(root)),
        lmtp=lmtp,
        max_connections=4,
        loop=asyncio.get_running_loop(),
        **kwargs,
    )


def _noting(factory: SessionFactory) -> list[weakref.ref[object]]:
    """Weak references to every protocol ``factory`` admits from now on (weak: the test
    must not keep them alive)."""
    protocols: list[weakref.ref[object]] = []
    admit = factory._admit

    def admit_and_note(transport: asyncio.BaseTransport, overrides: dict[str, Any]) -> Any:
        proto = admit(transport, overrides)
        protocols.append(weakref.ref(proto))
        return proto

    factory._admit = admit_and_note  # type: ignore[method-assign]
    return protocols


async def _session(port: int, lmtp: bool, ending: str) -> None:
    """One session that ends as ``ending`` says: after QUIT, mid-transaction or mid-DATA."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert (await _line(reader)).startswith(b"220 ")
        for cmd in (b"LHLO c" if lmtp else b"EHLO c", b"MAIL FROM:<s@example.net>",
                    b"RCPT TO:<alice@example.org>"):  # fmt: skip
            writer.write(cmd + b"\r\n")
            assert (await _line(reader)).startswith(b"250 "), cmd
        if ending == "mid-transaction":
            return
        writer.write(b"DATA\r\n")
        assert (await _line(reader)).startswith(b"354 ")
        writer.write(b"Subject: x\r\n\r\nbody\r\n")
        if ending == "mid-data":
            return
        writer.write(b".\r\nQUIT\r\n")
        assert (await _line(reader)).startswith(b"250 ")
        assert (await _line(reader)).startswith(b"221 ")
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.uvloop
@pytest.mark.parametrize("lmtp", [True, False], ids=["lmtp", "smtp"])
@pytest.mark.parametrize("ending", ["quit", "mid-transaction", "mid-data"])
@pytest.mark.usefixtures("no_collector")
async def test_a_closed_session_is_freed_without_the_cycle_collector(
    tmp_path: Path, lmtp: bool, ending: str
) -> None:
    """After the connection closes, the protocol object dies with the collector off."""
    ex = DeliveryExecutor()
    factory = _factory(ex, tmp_path, lmtp)
    async with listening(factory, ex) as port:
        protocols = _noting(factory)
        await _session(port, lmtp, ending)
        assert len(protocols) == 1
        await until(lambda: not factory.sessions, "the session ended")
        await until(lambda: protocols[0]() is None, "the protocol freed by refcounting")
    stored = [p for p in tmp_path.rglob("*") if p.parent.name == "new"]  # noqa: ASYNC240
    assert len(stored) == (1 if ending == "quit" else 0)
    if stored:
        assert stored[0].read_bytes().endswith(b"Subject: x\n\nbody\n")


async def _reset(port: int, lmtp: bool, tls: ssl.SSLContext | None) -> None:
    """A client that resets the connection: after pipelined commands, or mid-STARTTLS."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert (await _line(reader)).startswith(b"220 ")
        hello = b"LHLO c\r\n" if lmtp else b"EHLO c\r\n"
        if tls is not None:
            writer.write(hello + b"STARTTLS\r\n")
            assert (await _line(reader)).startswith(b"250 ")
            assert (await _line(reader)).startswith(b"220 ")
            writer.write(b"\x16\x03\x01\x00\x05hello")  # no TLS handshake: it fails
            await asyncio.sleep(0.05)
        else:
            writer.write(hello + b"NOOP\r\n" * 3)  # its replies meet the reset
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        writer.transport.abort()


@pytest.fixture(scope="module")
def server_tls(tls_files: tuple[Path, Path]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*tls_files)
    return ctx


@pytest.mark.uvloop
@pytest.mark.parametrize("lmtp", [True, False], ids=["lmtp", "smtp"])
@pytest.mark.parametrize("ending", ["reset", "failed-starttls"])
@pytest.mark.usefixtures("no_collector")
async def test_a_session_lost_with_an_error_ends_and_is_collected(
    tmp_path: Path,
    lmtp: bool,
    ending: str,
    server_tls: ssl.SSLContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reset or a failed TLS handshake ends the session, and the cycle collector frees it."""
    # aiosmtpd logs the failed handshake with its traceback: the test's log capture
    # would keep that record, and so the session, alive.
    monkeypatch.setattr(logging.getLogger("mail.log"), "disabled", True)
    ex = DeliveryExecutor()
    factory = _factory(ex, tmp_path, lmtp, tls_context=server_tls)
    async with listening(factory, ex) as port:
        protocols = _noting(factory)
        for _ in range(5):  # whether a reply's write meets the reset is a race: try a few
            await _reset(port, lmtp, server_tls if ending == "failed-starttls" else None)
        await until(lambda: not factory.sessions, "the sessions ended")
        assert len(protocols) == 5
        # The error's traceback in asyncio's close future holds the session (see
        # _unlink): such a session is the collector's to free, and it must free it.
        await asyncio.sleep(0.05)
        gc.collect()
        assert all(p() is None for p in protocols), "a session leaked past the collector"
