"""Duplicate suppression for the handler: ``--duplicate-window SECONDS``.

When a message whose ``Message-ID`` was delivered to the same Maildir within
the window arrives again (an MTA resending after losing our ``250``, typically
because a host died between the commit and the reply), the handler answers
``250`` and stores nothing. The records are kept by the commit protocol, in the
same commit as the message (:mod:`delivery_executor.store.seen`); this module
turns them on per Maildir and looks them up. Messages without a Message-ID are
never suppressed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time

from ..store import Maildir, seen

__all__ = ["DuplicateFilter"]

_log = logging.getLogger("delivery_executor.smtp")
_MEMORY = 4096  # Maildirs remembered as set up / swept, per process


class DuplicateFilter:
    """Looks up and sets up the duplicate records of the Maildirs a handler delivers to.

    ``window``: seconds during which a Message-ID counts as delivered.
    Costs per recipient on the event loop: one failed ``open`` (no record);
    the first time a Maildir is seen, a ``mkdir`` (and the Maildir's own
    creation if it is new); once per window per Maildir a sweep of expired
    records in a thread.
    """

    def __init__(self, window: float) -> None:
        if isinstance(window, bool) or not isinstance(window, (int, float)):
            raise TypeError(f"duplicate_window must be a number, not {type(window).__name__}")
        if not math.isfinite(window) or window <= 0:
            raise ValueError(
                f"duplicate_window must be a positive number of seconds, not {window!r}"
            )
        self.window = float(window)
        self.suppressed = 0
        """Copies answered 250 without being stored again."""
        self._ready: set[str] = set()
        self._swept: dict[str, float] = {}
        self._sweeps: set[asyncio.Future[int]] = set()

    @staticmethod
    def key(body: bytes) -> str | None:
        """The record key of a message (its Message-ID's hash), or ``None`` without one."""
        return seen.message_key((body,))

    def prepare(self, path: str) -> bool:
        """Make ``path`` keep records (once per Maildir and process); ``False`` if it cannot.

        Called for every message, with a Message-ID or not, so that the writer
        never caches "no records here" just before a message that needs one.
        """
        if path in self._ready:
            return True
        try:
            Maildir.cached(path)  # a new mailbox: created as a delivery would
            os.mkdir(os.path.join(path, seen.SEEN_DIR), 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            _log.warning("duplicate records unavailable in %s: %s", path, exc)
            return False
        seen.forget(path)
        if len(self._ready) >= _MEMORY:
            self._ready.clear()
        self._ready.add(path)
        return True

    async def find(self, path: str, key: str) -> str | None:
        """The name under which ``path`` already holds message ``key``, else ``None``.

        A copy found is made durable first (in a thread), since the server that
        wrote it may have died before its last sync. Also makes sure the Maildir
        keeps records from now on. Never raises ``OSError``: a Maildir whose
        records cannot be set up, or whose copy cannot be synced, gets the
        message again (at most a duplicate).
        """
        if not self.prepare(path):
            return None
        self._sweep(path)
        name = seen.find(path, key, self.window)
        if name is None or not await asyncio.to_thread(seen.make_durable, path, name):
            return None
        return name

    def _sweep(self, path: str) -> None:
        now = time.monotonic()
        last = self._swept.get(path)
        if last is not None and now - last < max(self.window, 60.0):
            return
        if len(self._swept) >= _MEMORY:
            self._swept.clear()
        self._swept[path] = now
        fut = asyncio.get_running_loop().run_in_executor(None, seen.sweep, path, self.window)
        self._sweeps.add(fut)
        fut.add_done_callback(self._sweeps.discard)
