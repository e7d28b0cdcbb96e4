"""A finished session is freed by reference counting alone: no cyclic garbage per connection."""

from __future__ import annotations

import asyncio
import gc
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
    factory = SessionFactory(
        DeliveryHandler(ex, MailboxResolver(tmp_path)),
        lmtp=lmtp,
        max_connections=4,
        loop=asyncio.get_running_loop(),
    )
    async with listening(factory, ex) as port:
        protocols: list[weakref.ref[object]] = []
        admit = factory._admit

        def admit_and_note(transport: asyncio.BaseTransport, overrides: dict[str, Any]) -> Any:
            proto = admit(transport, overrides)
            protocols.append(weakref.ref(proto))  # weak: the test must not keep it alive
            return proto

        factory._admit = admit_and_note  # type: ignore[method-assign]
        await _session(port, lmtp, ending)
        assert len(protocols) == 1
        await until(lambda: not factory.sessions, "the session ended")
        await until(lambda: protocols[0]() is None, "the protocol freed by refcounting")
    stored = [p for p in tmp_path.rglob("*") if p.parent.name == "new"]  # noqa: ASYNC240
    assert len(stored) == (1 if ending == "quit" else 0)
    if stored:
        assert stored[0].read_bytes().endswith(b"Subject: x\n\nbody\n")
