"""``serve`` removes stale files from the ``tmp/`` of the Maildirs it delivers to.

A write killed mid-way (SIGKILL, power loss) leaves its file in ``tmp/``; no
acknowledged message is ever there. :class:`TmpCleaner` runs
:meth:`.Maildir.cleanup_tmp` with its defaults (a file goes once it is older
than 36 hours, Dovecot's rule, whichever host named it; see that method for
shared roots) the first time this process delivers to a Maildir, then at most
once per :data:`CLEAN_INTERVAL` per Maildir. The scan runs in one background
thread, never on the event loop; a recipient costs the loop one clock read
and one dict lookup. ``serve`` passes it to the
:class:`~delivery_executor.smtp.DeliveryHandler` as its ``watcher``, which
notes each accepted recipient's Maildir at RCPT, whatever resolved it (the
plain layout, a mail location or a user database).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from collections.abc import Callable

from ..store import Maildir

__all__ = ["CLEAN_INTERVAL", "TmpCleaner"]

_log = logging.getLogger("delivery_executor.server")

CLEAN_INTERVAL = 24 * 3600.0
"""Seconds between two cleanups of one Maildir's ``tmp/`` by one ``serve`` process."""


class TmpCleaner:
    """Cleans each noted Maildir's ``tmp/`` once, then at most once per ``interval`` s.

    ``removed`` counts the files removed so far (the ``tmp_cleaned_total``
    metric). ``clock`` is injectable for tests. A Maildir that does not exist
    yet has nothing to clean; an error (``EACCES``, ...) is logged and the
    Maildir is tried again after ``interval``. Memory: one entry per Maildir
    noted.
    """

    def __init__(
        self, *, interval: float = CLEAN_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be > 0 seconds, not {interval!r}")
        self.interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: set[concurrent.futures.Future[None]] = set()
        self.removed = 0
        """Files removed from ``tmp/`` so far (written by the cleaning thread only)."""

    def note(self, path: str) -> None:
        """``path`` is about to be delivered to: queue its cleanup if it is due."""
        now = self._clock()
        last = self._last.get(path)
        if last is not None and now - last < self.interval:
            return
        self._last[path] = now
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, "tmp-cleanup")
        fut = self._pool.submit(self._clean, path)
        self._pending.add(fut)
        fut.add_done_callback(self._pending.discard)

    def _clean(self, path: str) -> None:
        try:
            removed = Maildir.open(path).cleanup_tmp()
        except (FileNotFoundError, NotADirectoryError):
            return  # not a Maildir yet: the delivery creates it, with an empty tmp/
        except OSError as exc:
            _log.warning("cannot clean %s: %s", os.path.join(path, "tmp"), exc)
            return
        if removed:
            self.removed += removed
            _log.info("removed %d stale file(s) from %s", removed, os.path.join(path, "tmp"))

    def wait(self, timeout: float | None = None) -> None:
        """Block until every cleanup queued so far has run (tests; ``close`` uses it too)."""
        concurrent.futures.wait(list(self._pending), timeout)

    def close(self) -> None:
        """Drop queued cleanups, let a running one finish, stop the thread (blocks)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
