"""systemd's readiness protocol (``sd_notify``), for ``Type=notify`` units.

``serve`` says ``READY=1`` once it accepts connections and ``STOPPING=1`` when
a stop begins, as one datagram each to ``$NOTIFY_SOCKET``. Only the main
process speaks (systemd ignores other PIDs by default): forked workers drop
the variable, and so do the processes they start.
"""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["forget", "notify"]

_log = logging.getLogger("delivery_executor.server")
_VAR = "NOTIFY_SOCKET"


def notify(*states: str) -> bool:
    """Send ``states`` (e.g. ``"READY=1"``) to systemd; False if not run by it.

    A failure to send is logged as a warning, never raised: readiness is
    advice to the service manager, and delivery goes on without it.
    """
    where = os.environ.get(_VAR, "")
    if where.startswith("@"):
        address = "\0" + where[1:]  # an abstract socket
    elif where.startswith("/"):
        address = where
    else:
        return False  # unset, or a form we do not speak (vsock)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto("\n".join(states).encode(), address)
    except OSError as exc:
        _log.warning("cannot notify systemd at %s: %s", where, exc.strerror or exc)
        return False
    return True


def forget() -> None:
    """Stop this process (and its children) from notifying: for forked workers."""
    os.environ.pop(_VAR, None)
