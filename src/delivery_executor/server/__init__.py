"""``delivery-executor serve``: a durable Maildir delivery server over LMTP or SMTP.

One module per concern:

- :mod:`.config`: :class:`ServerConfig`, whose fields are the ``serve`` flags;
- :mod:`.options`: how a field declares its flag, and the flags' value parsers;
- :mod:`.core`: the async :func:`serve`;
- :mod:`.run`: :func:`run_server`, the command (start-up checks, workers);
- :mod:`.listeners`: TCP, IPv6, UNIX, inherited and systemd sockets;
- :mod:`.tls`: STARTTLS, implicit TLS, certificate reload;
- :mod:`.identity`: host name and banner;
- :mod:`.signals`: TERM/INT drain, HUP reload, USR1 stats;
- :mod:`.loops`: uvloop or asyncio;
- :mod:`.metrics`: ``--metrics``, Prometheus metrics;
- :mod:`.checks`: :class:`StartupError` and the ``--root`` check.
"""

from .checks import StartupError
from .config import DEFAULT_MAX_CONNECTIONS, ServerConfig
from .core import (
    ServerSummary,
    load_handler_factory,
    serve,
)
from .listeners import BoundListener, ListenSpec
from .run import run_server
from .signals import Running

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "BoundListener",
    "ListenSpec",
    "Running",
    "ServerConfig",
    "ServerSummary",
    "StartupError",
    "load_handler_factory",
    "run_server",
    "serve",
]
