"""Sieve mail filtering (RFC 5228 and extensions) at delivery time.

:func:`compile_script` turns a script into an immutable :class:`Script`;
:func:`evaluate` runs a chain of them on one message and returns the
:class:`Delivery` list (mailbox, flags). :mod:`.maildir` maps that onto
Maildir++ folders. Supported: RFC 5228 core, ``fileinto``, ``envelope``,
``imap4flags``, ``mailbox``, ``subaddress``, ``copy``, ``variables``;
``redirect``, ``reject`` and ``vacation`` are parsed but not performed.
"""

from __future__ import annotations

from .compiler import SUPPORTED_EXTENSIONS, Script, compile_script
from .evaluator import Delivery, SieveResult, evaluate, normalize_flags
from .limits import Limits
from .message import Envelope, MessageView

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "Delivery",
    "Envelope",
    "Limits",
    "MessageView",
    "Script",
    "SieveResult",
    "compile_script",
    "evaluate",
    "normalize_flags",
]
