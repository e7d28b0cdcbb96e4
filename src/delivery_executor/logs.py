"""Logging for ``serve``: text or JSON lines, cheap enough for one line per delivery.

- :func:`configure_logging` sets up the root logger for the command line.
- :class:`TextFormatter` / :class:`JSONFormatter`: one line per record.
- :class:`BlockFileHandler`: a log file written in blocks, not a ``write(2)``
  per line.
- :class:`NoMessageData`: a filter on aiosmtpd's ``mail.log`` logger that keeps
  message bodies (and anything a client sends that could be one) out of the
  log at every level.

The per-copy delivery line (logger ``delivery_executor.delivery``, see
:mod:`delivery_executor.smtp.handler`) is formatted only when a handler emits
it; in JSON its six arguments become fields (``msgid``, ``from``, ``to``,
``size``, ``name``, ``ms``).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import sys
import time
import weakref
from typing import Literal, TextIO, TypeAlias

__all__ = [
    "DELIVERY_LOG_FIELDS",
    "FLUSH_INTERVAL",
    "LOG_FORMATS",
    "BlockFileHandler",
    "JSONFormatter",
    "LogFormat",
    "NoMessageData",
    "TextFormatter",
    "configure_logging",
    "logs_to_file",
]

DELIVERY_LOG_FIELDS = ("msgid", "from", "to", "size", "name", "ms")
"""The arguments of each delivery record (``delivery_executor.delivery``), in order:
the SMTP handler logs them, the formatters here name them."""

LogFormat: TypeAlias = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
_DELIVERY = "delivery_executor.delivery"
FLUSH_INTERVAL = 0.2
"""Seconds a :class:`BlockFileHandler` may hold INFO lines before writing them."""

# aiosmtpd's records that carry what a client sent: DATA lines, raw command
# lines (a client that does not wait for 354 gets its body read as commands,
# and AUTH lines hold credentials), and an unknown command's name.
_CLIENT_DATA = frozenset(
    {
        "DATA readline: %s",
        "_handle_client readline: %r",
        "%r unrecognised: %s",
        "%r can't decode base64: %s",
    }
)
_COMMAND_LINE = "%r >> %r"
_REPLY_LINE = "%r << %r"
# Commands whose line is safe to log at INFO/DEBUG: an address at most.
_SAFE_VERBS = frozenset(
    b"HELO EHLO LHLO MAIL RCPT DATA RSET NOOP QUIT VRFY EXPN HELP STARTTLS".split()
)


class NoMessageData(logging.Filter):
    """Drops aiosmtpd records that could hold message data; redacts unknown commands.

    Installed on the ``mail.log`` logger, so it applies whatever handlers are
    configured. A command line is kept when its verb is a known SMTP command
    other than AUTH; otherwise only its length is logged.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg
        if msg in _CLIENT_DATA:
            return False
        args = record.args
        if msg == _COMMAND_LINE and isinstance(args, tuple) and len(args) == 2:
            line = args[1]
            verb = line.split(b" ", 1)[0].upper() if isinstance(line, bytes) else b""
            if verb not in _SAFE_VERBS:
                record.msg = "%r >> [%d bytes not logged]"
                record.args = (args[0], len(line) if isinstance(line, (bytes, str)) else 0)
        elif msg == _REPLY_LINE and isinstance(args, tuple) and len(args) == 2:
            reply = args[1]
            if isinstance(reply, bytes) and b"not recognized" in reply:
                # aiosmtpd echoes the unknown command, which may be body text.
                record.args = (args[0], reply.split(b" ", 1)[0] + b" [command not logged]")
        return True


class BlockFileHandler(logging.FileHandler):
    """A ``FileHandler`` that writes lines below WARNING in blocks, at most
    ``interval`` seconds late; WARNING and above are written at once.

    A ``write(2)`` per delivered copy to a file on the mail's own file system
    costs more than the line: every ``syncfs`` of a commit then also writes
    out the log's inode and pages: a measurable share of ``serve``'s throughput
    with a write per line, nothing measurable in blocks (BUDGETS.md). The timed
    write is a ``call_later`` on the event loop running in the logging thread;
    a record logged outside any running loop is written at once. The cost is
    the crash window: a SIGKILL or power loss loses up to ``interval`` seconds
    of INFO lines. A normal exit (:func:`logging.shutdown`), ``close()``,
    ``flush()`` and ``os.fork()`` write them. Lines logged on a loop that then
    stops wait for that loop to run again, or for a WARNING, a ``flush()`` or
    a record from outside any loop.
    """

    def __init__(self, filename: str | os.PathLike[str], interval: float = FLUSH_INTERVAL) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be > 0 seconds, not {interval!r}")
        super().__init__(filename, encoding="utf-8")
        self.interval = interval
        self._timed: set[asyncio.AbstractEventLoop] = set()  # loops with a flush pending
        _BLOCK_HANDLERS.add(self)

    def _open(self) -> io.TextIOWrapper:
        # Kept open by the handler. 64 KiB: a second of lines at thousands of copies/s.
        stream = open(  # noqa: SIM115
            self.baseFilename, self.mode, buffering=64 * 1024, encoding=self.encoding
        )
        assert isinstance(stream, io.TextIOWrapper)  # a text mode
        return stream

    def emit(self, record: logging.LogRecord) -> None:
        """Format and buffer ``record``; write now if it is WARNING or above."""
        try:
            line = self.format(record)
            stream = self.stream
            if stream is None:  # closed, then logged to again: as FileHandler does
                stream = self._open()
                self.stream = stream
            stream.write(line + self.terminator)
            if record.levelno >= logging.WARNING:
                stream.flush()
                return
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                stream.flush()
                return
            if loop not in self._timed:
                # A loop closed before its flush ran is dropped here, not pinned.
                self._timed = {other for other in self._timed if not other.is_closed()}
                self._timed.add(loop)
                loop.call_later(self.interval, self._timed_flush, loop)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def _timed_flush(self, loop: asyncio.AbstractEventLoop) -> None:
        with self.lock:  # type: ignore[union-attr]  # Handler.createLock always sets it
            self._timed.discard(loop)
            try:
                self.flush()
            except (OSError, ValueError) as exc:
                sys.stderr.write(f"delivery-executor: cannot write the log file: {exc}\n")

    def close(self) -> None:
        """Write what is buffered and close the file (idempotent)."""
        with self.lock:  # type: ignore[union-attr]
            self._timed.clear()
            super().close()


_BLOCK_HANDLERS: weakref.WeakSet[BlockFileHandler] = weakref.WeakSet()


_HELD_FOR_FORK: list[BlockFileHandler] = []


def _flush_before_fork() -> None:
    # Lines still buffered would be written twice, by the parent and the child;
    # the handler stays locked until the fork is done, so none is added between.
    for handler in list(_BLOCK_HANDLERS):
        handler.acquire()
        _HELD_FOR_FORK.append(handler)
        try:
            handler.flush()
        except (OSError, ValueError):
            pass  # the parent reports it on its next write


def _release_after_fork() -> None:
    while _HELD_FOR_FORK:
        _HELD_FOR_FORK.pop().release()


def _forget_after_fork() -> None:
    _HELD_FOR_FORK.clear()  # logging has given the child's handlers fresh locks


os.register_at_fork(
    before=_flush_before_fork,
    after_in_parent=_release_after_fork,
    after_in_child=_forget_after_fork,
)


class TextFormatter(logging.Formatter):
    """``2024-05-01 12:00:00,123 INFO name: message``; the date formatted once a second."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:  # strftime costs more than the rest of the line
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return f"{self._stamp},{int(record.msecs):03d}"


class JSONFormatter(logging.Formatter):
    """One JSON object per line: ``time``, ``level``, ``logger``, ``message``, plus fields.

    A delivery record adds ``msgid``, ``from``, ``to``, ``size``, ``name`` and
    ``ms``; an exception adds ``exception`` (the formatted traceback).
    """

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""
        self._zone = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(second))
            self._zone = time.strftime("%z", time.localtime(second))
        out: dict[str, object] = {
            "time": f"{self._stamp}.{int(record.msecs):03d}{self._zone}",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        args = record.args
        if record.name == _DELIVERY and isinstance(args, tuple):
            fields = dict(zip(DELIVERY_LOG_FIELDS, args, strict=False))
            ms = fields.get("ms")
            fields["name"] = str(fields.get("name", ""))
            fields["ms"] = round(ms, 1) if isinstance(ms, float) else ms
            out.update(fields)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def logs_to_file() -> bool:
    """True if the root logger writes to a file (``--log-file``), not only to a stream."""
    return any(isinstance(h, logging.FileHandler) for h in logging.getLogger().handlers)


def configure_logging(
    level: str = "INFO",
    fmt: LogFormat = "text",
    stream: TextIO | None = None,
    *,
    handler: logging.Handler | None = None,
) -> logging.Handler:
    """Log to ``handler`` (default: a stream handler on ``stream``, else stderr) at
    ``level`` in ``fmt``; return the handler.

    Raises ``ValueError`` for an unknown level or format. Also turns off what
    ``logging`` records per call that no line here shows (caller frame, thread,
    process names), keeps aiosmtpd's per-connection INFO chatter out unless
    ``level`` is DEBUG, and never lets it log message data (:class:`NoMessageData`).
    """
    name = level.upper()
    if not isinstance(logging.getLevelNamesMapping().get(name), int):
        raise ValueError(f"unknown log level {level!r}")
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, not {fmt!r}")
    # The documented knobs for cheaper records (logging HOWTO, "Optimization").
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    if hasattr(logging, "logAsyncioTasks"):  # Python 3.12+
        logging.logAsyncioTasks = False
    if handler is None:
        handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(name)
    mail_log = logging.getLogger("mail.log")
    if not any(isinstance(f, NoMessageData) for f in mail_log.filters):
        mail_log.addFilter(NoMessageData())
    # aiosmtpd logs every connection at INFO: real CPU at thousands per second.
    mail_log.setLevel(logging.NOTSET if name == "DEBUG" else logging.WARNING)
    return handler
