"""The library's exceptions.

Storage failures are not wrapped: a failed write reaches its caller as the
original ``OSError`` (same type, ``errno`` and ``filename``). The classes here
cover what is not an ``OSError``.
"""

from __future__ import annotations

__all__ = [
    "DeliveryError",
    "ExecutorClosed",
    "ExecutorCrashed",
    "InvalidMaildirPath",
    "InvalidMessageId",
    "MessageTooLarge",
    "QuotaExceeded",
    "RecipientRejected",
    "SieveCompileError",
    "SieveError",
    "SieveRuntimeError",
    "TooManyParts",
    "UserdbUnavailable",
]


class DeliveryError(Exception):
    """Base class of every exception this library defines."""


class ExecutorClosed(DeliveryError, RuntimeError):
    """``deliver()`` was called after ``aclose()`` began; nothing was queued."""


class ExecutorCrashed(DeliveryError, RuntimeError):
    """The executor's collector task died; pending deliveries were not made durable.

    The collector's own exception is attached as ``__cause__``. Deliveries that
    were already being flushed when it died still complete or fail on their own.
    """


class InvalidMaildirPath(DeliveryError, ValueError):
    """A Maildir path is empty, holds a NUL byte, or is otherwise unusable."""


class InvalidMessageId(DeliveryError, ValueError):
    """A message id is empty, starts with ``.``, or holds ``/`` or a NUL byte.

    Such an id could name a directory or a file outside ``new/`` and ``cur/``;
    it is refused before anything on disk is touched.
    """


class MessageTooLarge(DeliveryError, ValueError):
    """A message body exceeds the configured size limit."""


class TooManyParts(DeliveryError, ValueError):
    """A message has more parts than the executor's writer takes (its ``max_parts``)."""


class RecipientRejected(DeliveryError, ValueError):
    """A recipient address cannot be delivered here; carries the SMTP reply.

    ``code`` is the basic and enhanced status (``"553 5.1.3"``), ``text`` says
    why, and ``reply`` is the full reply line.
    """

    def __init__(self, code: str, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text

    @property
    def reply(self) -> str:
        """The SMTP reply line: ``"<code> <text>"``."""
        return f"{self.code} {self.text}"


class UserdbUnavailable(DeliveryError, OSError):
    """A user database could not answer (file unreadable, database down).

    The recipient is deferred (``451 4.3.0``), never treated as unknown.
    """


class QuotaExceeded(DeliveryError):
    """A mailbox is over its quota; carries the SMTP reply (``552 5.2.2`` or ``452 4.2.2``)."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


class SieveError(DeliveryError):
    """Base class of the Sieve filter's errors; the message is then kept in INBOX."""


class SieveCompileError(SieveError, ValueError):
    """A Sieve script does not compile; ``line`` and ``col`` (1-based) say where."""

    def __init__(self, text: str, line: int, col: int) -> None:
        super().__init__(f"line {line}, column {col}: {text}")
        self.text = text
        self.line = line
        self.col = col


class SieveRuntimeError(SieveError, RuntimeError):
    """A Sieve script failed while running (bad mailbox name, a limit reached, ...)."""
