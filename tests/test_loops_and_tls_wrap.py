"""--loop names and the implicit-TLS wrapper for a factory that is not a SessionFactory."""

from __future__ import annotations

import asyncio
import ssl
import sys

import pytest
from aiosmtpd.smtp import SMTP

from delivery_executor.server.loops import loop_factory
from delivery_executor.server.tls import implicit_tls

pytestmark = [pytest.mark.timeout(60)]


def test_loop_names_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """asyncio is always there; an unknown name or a missing uvloop is a ValueError naming it."""
    assert loop_factory("asyncio") is asyncio.new_event_loop
    with pytest.raises(ValueError, match="--loop must be one of uvloop, asyncio, not 'trio'"):
        loop_factory("trio")
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now fails
    with pytest.raises(ValueError, match="--loop uvloop: uvloop is not installed"):
        loop_factory("uvloop")


@pytest.mark.asyncio
async def test_implicit_tls_turns_starttls_off_on_any_smtp_factory() -> None:
    """A plain factory's SMTP sessions lose STARTTLS and its requirement; others pass as made."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    made: list[asyncio.BaseProtocol] = []

    def smtp() -> asyncio.BaseProtocol:
        proto = SMTP(object(), tls_context=ctx, require_starttls=True)
        made.append(proto)
        return proto

    proto = implicit_tls(smtp)()
    assert proto is made[0] and isinstance(proto, SMTP)
    assert proto.tls_context is None and proto.require_starttls is False
    other = asyncio.Protocol()
    assert implicit_tls(lambda: other)() is other
