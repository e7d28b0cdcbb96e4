"""aiosmtpd integration: a handler that delivers through the executor, and protocols.

- :mod:`.handler`: :class:`DeliveryHandler` (RCPT checks, DATA delivery, replies);
- :mod:`.protocol`: :class:`DeliverySMTP` / :class:`DeliveryLMTP`;
- :mod:`.reader`: :class:`BulkDataMixin`, DATA read in bulk into one buffer;
- :mod:`.sessions`: :class:`SessionFactory`, caps and fairness rules for ``create_server``;
- :mod:`.data_budget`: :class:`DataBudget`, the server-wide budget of bytes held in DATA.
"""

from .data_budget import DataBudget, DataHold
from .handler import (
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_MAX_RECIPIENTS,
    LINE_ENDINGS,
    DeliveryHandler,
    LineEndings,
)
from .protocol import DeliveryLMTP, DeliverySMTP
from .reader import BulkDataMixin
from .sessions import SessionFactory, TooManyConnections

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_MAX_RECIPIENTS",
    "LINE_ENDINGS",
    "BulkDataMixin",
    "DataBudget",
    "DataHold",
    "DeliveryHandler",
    "DeliveryLMTP",
    "DeliverySMTP",
    "LineEndings",
    "SessionFactory",
    "TooManyConnections",
]
