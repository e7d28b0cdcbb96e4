"""The Guard protocol the session protocol is typed against matches the guard it is given."""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path

import pytest

from delivery_executor import DeliveryExecutor, MailboxResolver
from delivery_executor.smtp import DeliveryHandler, SessionFactory
from delivery_executor.smtp.data_budget import DataBudget
from delivery_executor.smtp.guard import Guard, GuardFactory

from .helpers import listening, until

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]


def members(protocol: type) -> list[str]:
    """The attributes, properties and methods ``protocol`` declares (its own, not object's)."""
    own = [n for n in vars(protocol) if not n.startswith("_")]
    return sorted({*own, *getattr(protocol, "__annotations__", {})})


def check(obj: object, protocol: type) -> None:
    """``obj`` has every member of ``protocol``; methods take the same parameters."""
    for name in members(protocol):
        assert hasattr(obj, name), f"{type(obj).__name__} lacks {protocol.__name__}.{name}"
        declared = vars(protocol).get(name)
        if inspect.isfunction(declared):
            want = list(inspect.signature(declared).parameters.values())[1:]  # without self
            got = list(inspect.signature(getattr(obj, name)).parameters.values())
            assert [(p.name, p.default) for p in got] == [(p.name, p.default) for p in want], name


async def test_a_live_sessions_guard_and_factory_implement_the_protocols(tmp_path: Path) -> None:
    """A connected session's guard has every Guard member; its factory every GuardFactory one."""
    assert members(Guard) == [
        "data_done", "data_started", "factory", "hold", "hook", "paused", "received", "stop"
    ]  # fmt: skip
    assert members(GuardFactory) == ["budget", "data_wait"]
    loop = asyncio.get_running_loop()
    ex = DeliveryExecutor()
    factory = SessionFactory(
        DeliveryHandler(ex, MailboxResolver(tmp_path)), lmtp=True, max_connections=2, loop=loop
    )
    async with listening(factory, ex) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"220 ")
            (guard,) = factory.sessions
            assert guard.proto.guard is guard  # what the protocol calls through Guard
            check(guard, Guard)
            check(guard.factory, GuardFactory)
            assert isinstance(guard.factory.budget, DataBudget)
            assert guard.factory.data_wait == factory.data_wait > 0
        finally:
            writer.close()
            await writer.wait_closed()
        await until(lambda: not factory.sessions, "the session's guard stopped")
