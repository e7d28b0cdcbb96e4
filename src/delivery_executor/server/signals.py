"""Signals for ``serve``: TERM/INT drain and stop, HUP reloads, USR1 reports.

- SIGTERM, SIGINT: stop accepting, let sessions finish, drain, print the summary.
- SIGHUP: reopen log files (for logrotate) and reload the TLS certificate;
  never stops the server.
- SIGUSR1: log one line of live counters.

:func:`take_over` makes the four signals the loop's, whatever was inherited. A
command started in the background by a non-interactive shell begins with
SIGINT ignored, and a parent can hand down a blocked signal mask (``execve``
keeps both). So they are blocked (held, not lost), reset to their defaults,
given to ``loop.add_signal_handler`` on whichever loop runs (asyncio or
uvloop), and only then unblocked.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..executor import DeliveryExecutor
from ..smtp import SessionFactory
from .listeners import BoundListener
from .tls import TlsManager

__all__ = ["HANDLED", "Running", "block", "reopen_log_files", "take_over", "unblock"]

_log = logging.getLogger("delivery_executor.server")

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


def block() -> None:
    """Hold the handled signals for this thread (and threads it starts) until :func:`unblock`."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)


def unblock() -> None:
    """Deliver the handled signals again, including any that arrived while blocked."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)


def take_over(
    loop: asyncio.AbstractEventLoop,
    *,
    stop: Callable[[], None],
    reload: Callable[[], None],
    report: Callable[[], None],
) -> None:
    """Route TERM/INT to ``stop``, HUP to ``reload``, USR1 to ``report`` on ``loop``.

    Call from the main thread, with ``loop`` running or about to run.
    """
    block()
    for sig in HANDLED:
        signal.signal(sig, signal.SIG_DFL)
    loop.add_signal_handler(signal.SIGTERM, stop)
    loop.add_signal_handler(signal.SIGINT, stop)
    loop.add_signal_handler(signal.SIGHUP, reload)
    loop.add_signal_handler(signal.SIGUSR1, report)
    unblock()


def _handlers() -> Iterator[logging.Handler]:
    yield from logging.getLogger().handlers
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger):
            yield from logger.handlers


def reopen_log_files() -> int:
    """Reopen every ``logging.FileHandler``'s file (after logrotate moved it); how many.

    A file that cannot be reopened keeps its old stream and is reported on it.
    """
    count = 0
    for handler in _handlers():
        if not isinstance(handler, logging.FileHandler):
            continue
        try:
            stream = handler._open()
        except OSError as exc:
            _log.error("cannot reopen log file %s: %s", handler.baseFilename, exc.strerror)
            continue
        old = handler.setStream(stream)
        if old is not None:
            old.close()
        count += 1
    return count


@dataclass(eq=False)
class Running:
    """A server that is up, as ``serve``'s ``on_ready`` gets it: what HUP and USR1 act on."""

    listeners: list[BoundListener]
    executor: DeliveryExecutor
    sessions: SessionFactory
    tls: TlsManager | None
    started: float

    def stats_line(self) -> str:
        """One line of live counters (what SIGUSR1 logs); O(batch sizes seen)."""
        s = self.executor.stats()
        return (
            f"stats: delivered {s.delivered}, failed {s.failed}, batches {s.batches},"
            f" mean batch {s.mean_batch_size:.2f}, queued {s.queued} ({s.queued_bytes} bytes),"
            f" flushing {s.in_flight}, connections {self.sessions.live}"
            f" (refused {self.sessions.refused}), up {time.monotonic() - self.started:.1f} s"
        )

    def reload_tls(self) -> None:
        """Re-read the certificate for new handshakes; on failure log why and keep the old."""
        if self.tls is None:
            return
        try:
            self.tls.reload()
        except ValueError as exc:
            _log.error("TLS reload failed, still serving the previous certificate: %s", exc)
        else:
            _log.info("TLS certificate reloaded from %s", self.tls.cert)
