"""Connection admission for ``loop.create_server``: a cap on live sessions."""

from __future__ import annotations

import asyncio
from typing import Any

from .protocol import DeliveryLMTP, DeliverySMTP

__all__ = ["SessionFactory", "TooManyConnections"]


class TooManyConnections(asyncio.Protocol):
    """Answers ``421 4.3.2`` and closes: what a connection over the cap gets."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(b"421 4.3.2 Too many connections, try again later\r\n")
        transport.close()


class SessionFactory:
    """A ``loop.create_server`` protocol factory that caps live sessions.

    ``live`` counts open sessions; past ``max_connections`` a new connection
    gets ``421 4.3.2`` and is closed.
    """

    def __init__(
        self,
        handler: object,
        *,
        lmtp: bool,
        max_connections: int,
        loop: asyncio.AbstractEventLoop,
        **smtp_kwargs: Any,
    ) -> None:
        if isinstance(max_connections, bool) or not isinstance(max_connections, int):
            raise TypeError(f"max_connections must be an int, not {type(max_connections).__name__}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, not {max_connections}")
        self.handler = handler
        self.cls = DeliveryLMTP if lmtp else DeliverySMTP
        self.max_connections = max_connections
        self.loop = loop
        self.smtp_kwargs = smtp_kwargs
        self.live = 0
        self.refused = 0
        self.idle = asyncio.Event()
        """Set while no session is open."""
        self.idle.set()

    def __call__(self) -> asyncio.BaseProtocol:
        if self.live >= self.max_connections:
            self.refused += 1
            return TooManyConnections()
        self.live += 1
        self.idle.clear()
        proto = self.cls(self.handler, loop=self.loop, **self.smtp_kwargs)
        proto.on_close = self._closed
        return proto

    def _closed(self) -> None:
        self.live -= 1
        if self.live == 0:
            self.idle.set()
