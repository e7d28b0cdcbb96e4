"""Sieve at delivery time: which scripts apply to a recipient, and where its copy goes.

:class:`SieveFilter` is what a server calls per recipient. Scripts come from
where Pigeonhole's settings put them: ``before`` scripts (``sieve_before``),
the user's own script (the userdb's ``sieve`` field, else ``~/.dovecot.sieve``
under the user's home, else ``.dovecot.sieve`` in the user's Maildir
directory), else ``default`` (``sieve_default``), then ``after`` scripts
(``sieve_after``). Each file is compiled once and recompiled when it changes:
its ``stat`` is looked at again at most once per ``recheck`` seconds (default
1 s), missing files included, so a busy server pays a dict lookup per script
path per delivery, not a syscall, and an edited, added or removed script takes
effect within that second. A script that does not compile is logged once per
version with its line and column, and the message is kept in INBOX, as
Pigeonhole does. :meth:`SieveFilter.route` never raises for a script's sake:
the worst case is INBOX.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import SieveCompileError
from ..store import Maildir
from .compiler import Script, compile_script
from .evaluator import evaluate
from .limits import Limits
from .maildir import SYSTEM_FLAG_LETTERS, keyword_letters, mailbox_exists, plan
from .message import Envelope, MessageView

__all__ = ["DEFAULT_RECHECK", "USER_SCRIPT", "Route", "ScriptCache", "SieveFilter"]

USER_SCRIPT = ".dovecot.sieve"
_log = logging.getLogger("delivery_executor.sieve")


@dataclass(frozen=True, slots=True)
class Route:
    """One copy to store: the Maildir (INBOX or a folder) and its info letters."""

    path: str
    letters: str = ""


class _Broken:
    """A script file that did not compile (kept so the error is logged once)."""

    __slots__ = ("error",)

    def __init__(self, error: SieveCompileError) -> None:
        self.error = error


DEFAULT_RECHECK = 1.0
"""Seconds between two ``stat`` calls on one script path (see the module doc)."""
_MAX_ENTRIES = 16384
_stat = os.stat  # the one syscall per script look (tests count it here)
_Entry = tuple[float, "tuple[int, int, int] | None", "Script | _Broken | None"]


class ScriptCache:
    """Compiled scripts by path, recompiled when (inode, size, mtime) changes.

    A path is ``stat``-ed again only once ``recheck`` seconds have passed since
    its last look (``0``: on every call); what a look found, a missing file
    included, stands until then. At most 16,384 paths are remembered (the
    oldest is dropped first: it costs one ``stat``, and a compile if it had
    a script, next time).
    """

    def __init__(self, limits: Limits, recheck: float = DEFAULT_RECHECK) -> None:
        if not isinstance(recheck, (int, float)) or not 0 <= recheck < float("inf"):
            raise ValueError(f"recheck must be a finite number of seconds >= 0, not {recheck!r}")
        self.limits = limits
        self.recheck = float(recheck)
        self._lock = threading.Lock()
        self._by_path: dict[str, _Entry] = {}

    def get(self, path: str) -> Script | _Broken | None:
        """The compiled script at ``path``; ``None`` if there is no such file."""
        now = time.monotonic()
        got = self._by_path.get(path)
        if got is not None and now - got[0] < self.recheck:
            return got[2]
        try:
            st = _stat(path)
        except (FileNotFoundError, NotADirectoryError):
            self._put(path, (now, None, None))
            return None
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if got is not None and got[1] == key:
            self._put(path, (now, key, got[2]))
            return got[2]
        try:
            with open(path, "rb") as f:
                source = f.read(self.limits.max_script_bytes + 1)
            compiled: Script | _Broken = compile_script(source, name=path, limits=self.limits)
        except SieveCompileError as e:
            _log.error("sieve: %s: %s; messages are kept in INBOX until it is fixed", path, e)
            compiled = _Broken(e)
        except OSError as e:
            _log.error("sieve: cannot read %s: %s", path, e)
            return None
        self._put(path, (now, key, compiled))
        return compiled

    def _put(self, path: str, entry: _Entry) -> None:
        with self._lock:
            if path not in self._by_path and len(self._by_path) >= _MAX_ENTRIES:
                del self._by_path[next(iter(self._by_path))]
            self._by_path[path] = entry


class SieveFilter:
    """Runs the applicable scripts for one recipient and says where its copy goes.

    Parameters:
        before, after: admin scripts run around the user's, in order.
        default: the script for users without their own.
        user_scripts: run each user's own script.
        user_script: ``user_script(maildir)`` → that user's script path, or
            ``None`` for the default place, ``.dovecot.sieve`` in the Maildir
            (serve passes the userdb's ``sieve`` field or ``~/.dovecot.sieve``).
        limits: per-script and per-message bounds (:class:`Limits`).
        recipient_delimiter: characters that start ``:detail``.
        recheck: seconds between two ``stat`` calls on one script path
            (default 1; ``0``: every delivery); see the module doc.
    """

    def __init__(
        self,
        *,
        before: Sequence[str | os.PathLike[str]] = (),
        after: Sequence[str | os.PathLike[str]] = (),
        default: str | os.PathLike[str] | None = None,
        user_scripts: bool = True,
        limits: Limits | None = None,
        recipient_delimiter: str = "+",
        user_script: Callable[[str], str | None] | None = None,
        recheck: float = DEFAULT_RECHECK,
    ) -> None:
        if not isinstance(recipient_delimiter, str) or not recipient_delimiter:
            raise ValueError(
                f"recipient_delimiter must be a non-empty str, not {recipient_delimiter!r}"
            )
        self.before = [os.fspath(p) for p in before]
        self.after = [os.fspath(p) for p in after]
        self.default = os.fspath(default) if default is not None else None
        self.user_scripts = user_scripts
        self.limits = limits or Limits()
        self.delimiter = recipient_delimiter
        self._user_script = user_script
        self.cache = ScriptCache(self.limits, recheck)

    def chain(self, maildir: str) -> list[Script] | None:
        """The scripts for the user of ``maildir`` (``[]``: none); ``None`` if one is broken."""
        paths = list(self.before)
        personal = None
        if self.user_scripts:
            mine = None if self._user_script is None else self._user_script(maildir)
            personal = self.cache.get(mine or os.path.join(maildir, USER_SCRIPT))
        if personal is None and self.default is not None:
            personal = self.cache.get(self.default)
        out: list[Script] = []
        for p in paths:
            got = self.cache.get(p)
            if isinstance(got, _Broken):
                return None
            if got is not None:
                out.append(got)
        if isinstance(personal, _Broken):
            return None
        if personal is not None:
            out.append(personal)
        for p in self.after:
            got = self.cache.get(p)
            if isinstance(got, _Broken):
                return None
            if got is not None:
                out.append(got)
        return out

    def route(
        self, maildir: str, message: bytes | MessageView, sender: str, recipient: str
    ) -> list[Route] | None:
        """Where the copy for ``recipient`` (Maildir ``maildir``) goes.

        ``message`` is the raw message or its :class:`MessageView` (pass one
        view for all the recipients of a message: its headers are parsed once).

        ``None``: deliver as usual (no script applies, or the scripts keep
        the message in INBOX without flags). ``[]``: discarded. Otherwise one
        :class:`Route` per copy; folders asked for with ``:create`` are
        created here and keywords registered, so this does file I/O only
        then. Cost without scripts: a dict lookup per script path (a ``stat``
        at most once a second per path).
        """
        chain = self.chain(maildir)
        if chain is None:
            return [Route(maildir)]
        if not chain:
            return None
        res = evaluate(
            chain,
            message if isinstance(message, MessageView) else MessageView.parse(message),
            Envelope(sender, recipient),
            limits=self.limits,
            mailbox_exists=lambda name: mailbox_exists(maildir, name),
            recipient_delimiter=self.delimiter,
        )
        for err in res.errors:
            _log.warning("sieve: <%s>: %s; message kept in INBOX", recipient, err)
        for what in res.not_performed:
            _log.warning(
                "sieve: <%s>: %s not performed (no outgoing mail); message kept", recipient, what
            )
        kept = res.deliveries
        if len(kept) == 1 and kept[0].mailbox == "INBOX" and not kept[0].flags:
            return None  # the plain delivery: no plan, no route
        targets, why = plan(res, maildir)
        if why is not None:
            _log.warning("sieve: <%s>: %s; message kept in INBOX", recipient, why)
        routes: list[Route] = []
        for t in targets:
            if t.create and not os.path.isdir(t.path):
                Maildir.create(t.path)
                marker = os.path.join(t.path, "maildirfolder")
                os.close(os.open(marker, os.O_WRONLY | os.O_CREAT, 0o600))
            system = "".join(SYSTEM_FLAG_LETTERS[f] for f in t.flags if f in SYSTEM_FLAG_LETTERS)
            keywords = [f for f in t.flags if not f.startswith("\\")]
            if keywords:
                if t.path == maildir:
                    Maildir.cached(maildir)  # INBOX may not exist before its first message
                system += keyword_letters(t.path, keywords)
            routes.append(Route(t.path, "".join(sorted(set(system)))))
        return routes
