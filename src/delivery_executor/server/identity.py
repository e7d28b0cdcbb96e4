"""The name ``serve`` gives itself: banner, LHLO/EHLO line and ``Received: by``.

Default: the FQDN (``socket.getfqdn()``). Containers and fresh installs often
resolve it to ``localhost``, which in a ``Received`` line makes mail harder to
trace, so then the kernel's host name (``socket.gethostname()``) is used and a
warning asks for ``--hostname``. The banner names no software version unless
asked (``--banner-version``): aiosmtpd's default says ``Python SMTP 1.4.6``.
"""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Callable

from .._version import __version__

__all__ = ["banner", "check_hostname", "default_hostname"]

_log = logging.getLogger("delivery_executor.server")
_LOCAL = re.compile(r"(localhost[46]?|ip6-localhost|ip6-loopback)(\.localdomain[46]?)?\.?", re.I)
_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?")


def check_hostname(name: str) -> str:
    """``name`` if fit for a banner and a header (letters, digits, ``-._``); else ValueError."""
    if not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"not a host name: {name!r} (letters, digits, '-', '.', '_')")
    return name


def default_hostname(
    fqdn: Callable[[], str] = socket.getfqdn, short: Callable[[], str] = socket.gethostname
) -> str:
    """The FQDN, or the host name with a warning when the FQDN is ``localhost``-like."""
    name = fqdn()
    if name and not _LOCAL.fullmatch(name):
        return name
    fallback = short()
    _log.warning(
        "this host's FQDN is %r; using %r in the banner and Received lines;"
        " pass --hostname to set the name mail should show",
        name,
        fallback,
    )
    return fallback or "localhost"


def banner(lmtp: bool, with_version: bool = False) -> str:
    """What follows ``220 <hostname>`` in the greeting (aiosmtpd's ``ident``)."""
    proto = "LMTP" if lmtp else "ESMTP"
    if not with_version:
        return f"{proto} ready"
    return f"{proto} delivery-executor {__version__} ready"
