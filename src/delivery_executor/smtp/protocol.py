"""aiosmtpd's SMTP and LMTP protocols, as ``serve`` runs them.

:class:`DeliverySMTP` and :class:`DeliveryLMTP` add to aiosmtpd's classes:
enhanced status codes on aiosmtpd's own DATA errors (once per recipient under
LMTP, as RFC 2033 wants), and a hook run once when the connection is gone.
Use them with :class:`~delivery_executor.smtp.DeliveryHandler` or any handler.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import AnyStr

from aiosmtpd import smtp as _aiosmtpd_smtp
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope

__all__ = ["DeliveryLMTP", "DeliverySMTP"]

# aiosmtpd 1.4.6 lets only NOOP, EHLO, STARTTLS and QUIT through before STARTTLS
# under require_starttls: an LMTP client could not even send LHLO (530). The
# check reads this module-level set at each command, so it is fixed in place.
_aiosmtpd_smtp.ALLOWED_BEFORE_STARTTLS.add("LHLO")


class _DeliveryProtocol:
    """Enhanced codes for aiosmtpd's own DATA errors (one per recipient in LMTP),
    and a hook run once when the connection is gone."""

    envelope: Envelope | None
    _per_recipient = False
    on_close: Callable[[], None] | None = None

    async def push(self, status: AnyStr) -> None:
        if not isinstance(status, str):
            await super().push(status)  # type: ignore[misc]
            return
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

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)  # type: ignore[misc]
        hook, self.on_close = self.on_close, None
        if hook is not None:
            hook()


class DeliverySMTP(_DeliveryProtocol, SMTP):
    """aiosmtpd SMTP with enhanced status codes on its own DATA errors."""


class DeliveryLMTP(_DeliveryProtocol, LMTP):
    """aiosmtpd LMTP that also answers its own DATA errors once per recipient."""

    _per_recipient = True
