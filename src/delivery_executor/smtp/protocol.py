"""aiosmtpd's SMTP and LMTP protocols, as ``serve`` runs them.

:class:`DeliverySMTP` and :class:`DeliveryLMTP` add to aiosmtpd's classes:
enhanced status codes on aiosmtpd's own DATA errors (once per recipient under
LMTP, as RFC 2033 wants), and a hook run once when the connection is gone.
Use them with :class:`~delivery_executor.smtp.DeliveryHandler` or any handler.

Made by a :class:`~delivery_executor.smtp.SessionFactory`, a session also has
a ``guard`` (:class:`~delivery_executor.smtp.sessions.SessionGuard`) that the
hooks below keep informed, for the factory's fairness rules, and a share of
the server's DATA budget:

- at ``DATA``, before the ``354``, the session reserves the message's declared
  ``SIZE`` (or a 64 KiB slice), waiting in line for up to ``data_wait`` s, else
  answers ``451 4.3.1``;
- as DATA bytes arrive it reserves more (doubling; older transfers first, and
  never so much that the oldest could not finish: no deadlock); while none is
  free it stops reading from the socket, and if none comes within
  ``data_wait`` s it closes with ``421 4.3.1``;
- everything is given back once the handler's ``handle_DATA`` has answered.

So the bytes that sessions hold between ``354`` and their reply (aiosmtpd's
line list, the joined message, the copies being delivered) stay within the
budget, counted as received (aiosmtpd's per-line objects add their overhead
on top until a bulk DATA reader replaces its ``smtp_DATA``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, AnyStr

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope

if TYPE_CHECKING:
    from .sessions import SessionGuard

__all__ = ["DeliveryLMTP", "DeliverySMTP"]

_SLICE = 64 * 1024
_LINE_SLACK = 4 * 1024  # a reader stores at most one line past data_size_limit


def _declared_size(envelope: Envelope | None) -> int | None:
    """The ``SIZE=`` of the MAIL command, if the client declared one."""
    for option in envelope.mail_options if envelope is not None else ():
        name, _, value = option.partition("=")
        if name == "SIZE" and value.isdigit():
            return int(value)
    return None


class _DeliveryProtocol:
    """Enhanced codes for aiosmtpd's own DATA errors (one per recipient in LMTP),
    a hook run once when the connection is gone, and the session guard's hooks."""

    envelope: Envelope | None
    transport: asyncio.BaseTransport | None
    data_size_limit: int | None
    _per_recipient = False
    on_close: Callable[[], None] | None = None
    guard: SessionGuard | None = None

    async def push(self, status: AnyStr) -> None:
        if not isinstance(status, str):
            await super().push(status)  # type: ignore[misc]
            return
        if status.startswith("354") and self.guard is not None:
            self.guard.data_started()
        if status.startswith("552 Error: Too much mail data"):
            status = "552 5.3.4 Message too big"
        elif status.startswith("500 Line too long"):
            status = "500 5.6.0 Line too long (RFC 5321 4.5.3.1.6)"
        else:
            await super().push(status)  # type: ignore[misc]
            return
        env = self.envelope
        if self._per_recipient and env is not None and len(env.rcpt_tos) > 1:
            status = "\r\n".join([status] * len(env.rcpt_tos))
        await super().push(status)  # type: ignore[misc]

    async def smtp_DATA(self, arg: str) -> None:
        # The one DATA hook: reserve DATA budget around aiosmtpd's own reader.
        guard = self.guard
        env = self.envelope
        if guard is None or env is None or not env.rcpt_tos or arg:
            await super().smtp_DATA(arg)  # type: ignore[misc]
            return
        limit = self.data_size_limit or guard.factory.budget.max_bytes
        hold = guard.factory.budget.hold(limit + _LINE_SLACK)
        guard.hook(True)  # waiting for room is the server's time, not the client's
        try:
            async with asyncio.timeout(guard.factory.data_wait):
                await hold.open(_declared_size(env) or _SLICE)
        except TimeoutError:
            await self.push("451 4.3.1 Too much mail data pending on this server, try again later")
            return
        finally:
            guard.hook(False)
        guard.hold = hold
        try:
            await super().smtp_DATA(arg)  # type: ignore[misc]
        finally:
            guard.hold = None
            guard.data_done()
            hold.close()

    async def _call_handler_hook(self, command: str, *args: Any) -> Any:
        guard = self.guard
        if guard is None:
            return await super()._call_handler_hook(command, *args)  # type: ignore[misc]
        guard.hook(True, command)
        try:
            return await super()._call_handler_hook(command, *args)  # type: ignore[misc]
        finally:
            guard.hook(False)

    def data_received(self, data: bytes) -> None:
        if self.guard is None or self.guard.received(data):
            super().data_received(data)  # type: ignore[misc]

    def feed(self, data: bytes) -> None:
        """Hand bytes kept back for DATA budget to aiosmtpd's reader, now that they fit."""
        super().data_received(data)  # type: ignore[misc]

    def pause_writing(self) -> None:
        if self.guard is not None:
            self.guard.paused(True)
        super().pause_writing()  # type: ignore[misc]

    def resume_writing(self) -> None:
        if self.guard is not None:
            self.guard.paused(False)
        super().resume_writing()  # type: ignore[misc]

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)  # type: ignore[misc]
        if self.guard is not None:
            self.guard.stop()
        hook, self.on_close = self.on_close, None
        if hook is not None:
            hook()


class DeliverySMTP(_DeliveryProtocol, SMTP):
    """aiosmtpd SMTP with enhanced status codes on its own DATA errors."""


class DeliveryLMTP(_DeliveryProtocol, LMTP):
    """aiosmtpd LMTP that also answers its own DATA errors once per recipient."""

    _per_recipient = True
