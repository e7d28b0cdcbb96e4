"""aiosmtpd integration: a handler that delivers through the executor, and protocols.

- :mod:`.handler`: :class:`DeliveryHandler` (RCPT checks, DATA delivery, replies);
- :mod:`.protocol`: :class:`DeliverySMTP` / :class:`DeliveryLMTP`;
- :mod:`.sessions`: :class:`SessionFactory`, the connection cap for ``create_server``.
"""

from .handler import (
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_MAX_RECIPIENTS,
    LINE_ENDINGS,
    DeliveryHandler,
    LineEndings,
)
from .protocol import DeliveryLMTP, DeliverySMTP
from .sessions import SessionFactory, TooManyConnections

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_MAX_RECIPIENTS",
    "LINE_ENDINGS",
    "DeliveryHandler",
    "DeliveryLMTP",
    "DeliverySMTP",
    "LineEndings",
    "SessionFactory",
    "TooManyConnections",
]
