"""Recipient address → Maildir path: a small, explicit policy.

The default maps ``Local+detail@Example.COM`` to ``<root>/example.com/local``:

- the domain is lowercased (DNS names are case-insensitive);
- the local part is lowercased too (``fold_case=True``). RFC 5321 lets a
  server treat local parts as case-sensitive, but in practice mail to ``Alice``
  and ``alice`` is meant for one person, and two Maildirs that differ only in
  case are a support ticket waiting to happen. Pass ``fold_case=False`` to keep
  the case as sent;
- with a ``recipient_delimiter`` (say ``"+"``), everything from the first
  delimiter on is dropped from the local part;
- with ``detail_to_folder`` too, ``user+box@domain`` goes to the Maildir++
  folder ``.box`` inside user's Maildir when that folder exists, else to the
  Maildir itself (INBOX), as Dovecot's ``lmtp_save_to_detail_mailbox`` does.
  The folder name keeps its case and is stored as Dovecot names it on disk
  (IMAP modified UTF-7: ``&`` becomes ``&-``, non-ASCII ``&...-``).

Anything that could escape the root or confuse a file system is rejected with
an SMTP reply that says why: path separators, ``.``/``..`` and leading dots,
NUL and control characters, quoted local parts, empty or over-long parts,
malformed domains, and non-ASCII unless the session negotiated SMTPUTF8.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import RecipientRejected

__all__ = ["MailboxResolver", "RecipientRejected"]

_MAX_LOCAL = 64  # RFC 5321 4.5.3.1.1
_MAX_DOMAIN = 255  # RFC 5321 4.5.3.1.2
_MAX_LABEL = 63
# RFC 5322 atext, minus "/" (a path separator here).
_LOCAL_ASCII = re.compile(r"[A-Za-z0-9!#$%&'*+\-=?^_`{|}~.]+")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")

Mapper = Callable[[str, str], "str | os.PathLike[str] | None"]

_BAD_SYNTAX = "553 5.1.3"
_UNKNOWN_USER = "550 5.1.1"
_NOT_OURS = "550 5.7.1"
_NEEDS_UTF8 = "553 5.6.7"
_MAX_FOLDER = 200  # bytes of the encoded folder name; NAME_MAX is 255


def imap_utf7(name: str) -> str:
    """``name`` in IMAP's modified UTF-7 (RFC 3501 5.1.3), as Dovecot names folders on disk."""
    out: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            raw = base64.b64encode("".join(run).encode("utf-16-be")).rstrip(b"=")
            out.append("&" + raw.decode("ascii").replace("/", ",") + "-")
            run.clear()

    for c in name:
        if " " <= c <= "~":
            flush()
            out.append("&-" if c == "&" else c)
        else:
            run.append(c)
    flush()
    return "".join(out)


class MailboxResolver:
    """Maps recipient addresses to Maildir paths under ``root``; rejects the rest.

    Parameters:
        root: the directory that holds every Maildir.
        domains: accepted domains (case-insensitive); ``None`` accepts any.
        recipient_delimiter: e.g. ``"+"``; the local part is cut at its first
            occurrence. ``None`` keeps it whole.
        existing_only: reject (``550 5.1.1``) recipients whose Maildir does not
            exist yet, instead of creating it on first delivery.
        fold_case: lowercase the local part (see the module docstring).
        detail_to_folder: deliver ``user+box`` into the folder ``.box`` of
            user's Maildir when it exists (needs ``recipient_delimiter``).
            The folder name obeys the local part's rules and may not start
            with a dot.
        mapper: ``mapper(local, domain)`` returning a path (relative to
            ``root`` or absolute inside it) or ``None`` for an unknown user;
            it replaces the ``<domain>/<local>`` layout. Its answer is checked
            to stay inside ``root`` like any other.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        domains: Iterable[str] | None = None,
        recipient_delimiter: str | None = None,
        existing_only: bool = False,
        fold_case: bool = True,
        mapper: Mapper | None = None,
        detail_to_folder: bool = False,
    ) -> None:
        self.root = Path(os.path.abspath(os.fspath(root)))
        if isinstance(domains, str):
            raise TypeError("domains must be an iterable of domain names, not a single str")
        self.domains = None if domains is None else frozenset(d.lower().strip(".") for d in domains)
        if recipient_delimiter is not None and (
            len(recipient_delimiter) != 1 or recipient_delimiter in "@/.\0\\"
        ):
            raise ValueError(
                f"recipient_delimiter must be one character other than @ / . \\, "
                f"not {recipient_delimiter!r}"
            )
        if detail_to_folder and recipient_delimiter is None:
            raise ValueError("detail_to_folder needs a recipient_delimiter")
        if mapper is not None and not callable(mapper):
            raise TypeError(f"mapper must be callable, not {type(mapper).__name__}")
        self.recipient_delimiter = recipient_delimiter
        self.existing_only = existing_only
        self.fold_case = fold_case
        self.mapper = mapper
        self.detail_to_folder = detail_to_folder
        self._root_prefix = str(self.root) + os.sep

    def __repr__(self) -> str:
        domains = None if self.domains is None else sorted(self.domains)
        return (
            f"MailboxResolver(root={str(self.root)!r}, domains={domains},"
            f" recipient_delimiter={self.recipient_delimiter!r},"
            f" existing_only={self.existing_only}, detail_to_folder={self.detail_to_folder})"
        )

    def resolve(self, address: str, *, smtputf8: bool = False) -> str:
        """The Maildir path for ``address``; raise :class:`RecipientRejected` if none.

        Pure string work, plus one ``stat`` when ``existing_only`` is set, and
        one when ``detail_to_folder`` is on and the address has a detail.
        """
        if not isinstance(address, str):
            raise RecipientRejected(_BAD_SYNTAX, "address is not text")
        local, domain, detail = self._split(address, smtputf8)
        if self.domains is not None and domain not in self.domains:
            raise RecipientRejected(_NOT_OURS, f"domain {domain!r} is not served here")
        if self.mapper is not None:
            mapped = self.mapper(local, domain)
            if mapped is None:
                raise RecipientRejected(_UNKNOWN_USER, f"no such user: {local}@{domain}")
            path = self._inside_root(os.fspath(mapped))
        else:
            path = self._inside_root(os.path.join(domain, local))
        if self.existing_only and not os.path.isdir(os.path.join(path, "new")):
            raise RecipientRejected(_UNKNOWN_USER, f"no such mailbox: {local}@{domain}")
        if detail:
            folder = os.path.join(path, "." + detail)
            if os.path.isdir(folder):  # a missing folder means INBOX, as in Dovecot
                return folder
        return path

    async def aresolve(self, address: str, *, smtputf8: bool = False) -> str:
        """:meth:`resolve` for async callers; subclasses that do I/O (user
        databases, :mod:`delivery_executor.userdb`) override it."""
        return self.resolve(address, smtputf8=smtputf8)

    # -- internals ---------------------------------------------------------

    def _split(self, address: str, smtputf8: bool) -> tuple[str, str, str]:
        """``(local, domain, folder)``; ``folder`` is ``""`` unless ``detail_to_folder``."""
        if not address:
            raise RecipientRejected(_BAD_SYNTAX, "empty address")
        if any(c < " " or c == "\x7f" for c in address):
            raise RecipientRejected(_BAD_SYNTAX, "control character in address")
        if not address.isascii():
            if not smtputf8:
                raise RecipientRejected(_NEEDS_UTF8, "non-ASCII address needs SMTPUTF8")
            if not address.isprintable():
                raise RecipientRejected(_BAD_SYNTAX, "unprintable character in address")
        if address.startswith('"') or "\\" in address:
            raise RecipientRejected(_BAD_SYNTAX, "quoted local parts are not accepted")
        local, at, domain = address.rpartition("@")
        if not at or not local or not domain:
            raise RecipientRejected(_BAD_SYNTAX, f"address must be local@domain: {address!r}")
        if "@" in local:
            raise RecipientRejected(_BAD_SYNTAX, "more than one @ in address")
        user, folder = self._local(local)
        return user, self._domain(domain), folder

    def _local(self, local: str) -> tuple[str, str]:
        if len(local.encode()) > _MAX_LOCAL:
            raise RecipientRejected(_BAD_SYNTAX, f"local part longer than {_MAX_LOCAL} octets")
        if "/" in local:
            raise RecipientRejected(_BAD_SYNTAX, "'/' is not allowed in a local part")
        if not _LOCAL_ASCII.fullmatch("".join(c for c in local if c.isascii()) or "x"):
            raise RecipientRejected(_BAD_SYNTAX, f"invalid character in local part {local!r}")
        if local.startswith(".") or local.endswith(".") or ".." in local:
            raise RecipientRejected(_BAD_SYNTAX, "local part may not start or end with a dot")
        detail = ""
        if self.recipient_delimiter is not None:
            local, _, detail = local.partition(self.recipient_delimiter)
            if not local:
                raise RecipientRejected(_BAD_SYNTAX, "local part is empty before the delimiter")
        local = local.lower() if self.fold_case else local
        if self.detail_to_folder and detail:
            # The whole local part passed the checks above; what a folder adds:
            if detail.startswith("."):
                raise RecipientRejected(_BAD_SYNTAX, "folder name may not start with a dot")
            detail = imap_utf7(detail)
            if len(detail) > _MAX_FOLDER:
                raise RecipientRejected(_BAD_SYNTAX, "folder name too long")
            return local, detail
        return local, ""

    @staticmethod
    def _domain(domain: str) -> str:
        if domain.startswith("[") or not domain.isascii():
            # Address literals and raw IDN are not mailbox domains we serve.
            raise RecipientRejected(_BAD_SYNTAX, f"unsupported domain {domain!r}")
        d = domain.lower()
        if len(d) > _MAX_DOMAIN:
            raise RecipientRejected(_BAD_SYNTAX, "domain too long")
        labels = d.split(".")
        if any(len(label) > _MAX_LABEL or not _LABEL.fullmatch(label) for label in labels):
            raise RecipientRejected(_BAD_SYNTAX, f"malformed domain {domain!r}")
        return d

    def _inside_root(self, rel: str) -> str:
        # Lexical check: no '..' or absolute path may leave the root. (Symlinks
        # inside the root are the administrator's business.)
        full = os.path.normpath(os.path.join(self.root, rel))
        if not full.startswith(self._root_prefix) or "\0" in full:
            raise RecipientRejected(_BAD_SYNTAX, "address maps outside the mail root")
        parts = full[len(self._root_prefix) :].split(os.sep)
        if any(not p or p.startswith(".") for p in parts):
            raise RecipientRejected(_BAD_SYNTAX, "address maps to a hidden or empty path part")
        return full
