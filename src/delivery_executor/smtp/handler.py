"""An aiosmtpd handler that delivers through a :class:`DeliveryExecutor`.

Use it with aiosmtpd's ``SMTP``/``LMTP`` or our :class:`DeliverySMTP` /
:class:`DeliveryLMTP`, through ``loop.create_server`` or aiosmtpd's
``Controller`` (its own thread and loop: the executor serves any loop).

Replies:

- RCPT: ``250 2.1.5`` or the resolver's rejection (``553 5.1.3``,
  ``550 5.1.1``, ``550 5.7.1``, ``553 5.6.7``), ``452 4.5.3`` past
  ``max_recipients``.
- LMTP DATA: exactly one reply per recipient, in order, duplicates included
  (RFC 2033): ``250 2.0.0`` once that copy is durable, else ``451 4.3.0`` for
  that recipient alone. One Maildir named twice (``carol``, ``Carol``) is
  stored once, and each of its recipients gets that copy's reply. The handler
  never raises under LMTP: aiosmtpd would answer a single ``500``, the wrong
  number of replies.
- SMTP DATA: ``250 2.0.0`` only when every recipient's copy is durable, else
  ``451 4.3.0`` (the client retries; copies that did land may be duplicated,
  none is lost).
- A message over ``max_message_size``: ``552 5.3.4`` (per recipient in LMTP).
- A full mailbox (executor wrapped in a :class:`~delivery_executor.quota.QuotaDeliverer`):
  ``552 5.2.2`` or ``452 4.2.2`` for that recipient, at DATA or, with
  ``check_at_rcpt``, at RCPT.

On disk each copy has LF line ends by default (``line_endings="lf"``, as
Dovecot's ``mail_save_crlf=no`` and Postfix's local delivery store mail); the
body is converted once per message and shared by every recipient's copy.

Each delivered copy is logged once at INFO on ``delivery_executor.delivery``,
as Dovecot logs a delivery: ``msgid=<id> from=<sender> to=<rcpt> size=N saved
as <name> (N ms)``. The record's arguments are those six values in that order
(:data:`DELIVERY_LOG_FIELDS`), formatted only if a handler emits the record.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.utils
import inspect
import itertools
import logging
import os
import re
import socket
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal, Protocol, TypeAlias

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from .. import validate
from .._native import speedups
from ..errors import (
    DeliveryError,
    ExecutorClosed,
    InvalidMaildirPath,
    MessageTooLarge,
    QuotaExceeded,
    RecipientRejected,
)
from ..executor import DeliveryExecutor
from ..logs import DELIVERY_LOG_FIELDS
from ..recipients import MailboxResolver
from ..sieve.hook import SieveFilter
from ..sieve.message import MessageView
from ..stats import Buckets
from ..store import Message
from ..store.names import known_line_ends
from .dsn import DsnSyntaxError, original_recipient
from .duplicates import DuplicateFilter
from .reader import counted_line_ends, has_no_bare_lf, lf_body, raw_body_size

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_MAX_RECIPIENTS",
    "DELIVERY_LOG_FIELDS",
    "LINE_ENDINGS",
    "SHUTTING_DOWN",
    "Deliverer",
    "DeliveryHandler",
    "LineEndings",
]

_log = logging.getLogger("delivery_executor.smtp")
_dlog = logging.getLogger("delivery_executor.delivery")
DEFAULT_MAX_MESSAGE_SIZE = 32 * 1024 * 1024
DEFAULT_MAX_RECIPIENTS = 1000
LineEndings: TypeAlias = Literal["lf", "crlf"]
LINE_ENDINGS: tuple[LineEndings, ...] = ("lf", "crlf")
_SAVED = "msgid=%s from=<%s> to=<%s> size=%d saved as %s (%.1f ms)"
_HEADER_SCAN = 16 * 1024  # where to stop looking for the end of the header
SHUTTING_DOWN = "421 4.3.2 Service shutting down"
"""MAIL's reply once a stop has begun, and the last words to a session still open after it."""
# What a failed copy's 451 says: never a Python class name on the wire.
_FAILURE_TEXT: tuple[tuple[type[BaseException], str], ...] = (
    (ExecutorClosed, "service shutting down"),
    (MessageTooLarge, "message too large for this server"),
    (InvalidMaildirPath, "mailbox path not usable"),
)


class MailboxWatcher(Protocol):
    """Told each Maildir path a recipient was accepted for (``serve``'s ``tmp/`` cleanup)."""

    def note(self, path: str, /) -> None:
        """``path`` will be delivered to; must return at once (it runs on the loop)."""
        ...


class Deliverer(Protocol):
    """Anything with ``await deliver(path, body)`` returning the stored name (str-able)."""

    async def deliver(self, path: str, body: bytes, /) -> object:
        """Store ``body`` durably in the Maildir at ``path``; raise ``OSError`` on failure."""
        ...


def _clean_utf8(text: str | None, default: str = "unknown", limit: int = 255) -> str:
    # An SMTPUTF8 session: header values may be UTF-8 (RFC 6532), so only what
    # is not printable (controls, line and paragraph separators) goes.
    if not text:
        return default
    text = text[:limit]
    if text.isprintable():
        return text
    return "".join(c for c in text if c.isprintable()) or default


def _clean(text: str | None, default: str = "unknown", limit: int = 255) -> str:
    # Header values come from the client: no CR/LF, no control characters.
    if not text:
        return default
    text = text[:limit]
    if text.isascii() and text.isprintable():  # the common case, in C
        return text
    return "".join(c for c in text if " " <= c < "\x7f") or default


def _mail_size(mail_options: list[str]) -> int:
    """``SIZE=`` of MAIL FROM (RFC 1870), else 0."""
    for opt in mail_options:
        if opt[:5].upper() == "SIZE=" and opt[5:].isdigit():
            return int(opt[5:])
    return 0


# A CR followed by anything but LF. "\r[^\n]" (plus a look at the last byte)
# rather than "\r(?!\n)": the regex engine scans for its first byte either
# way, but a class match costs it half what a lookahead does.
_CR_NOT_LF = re.compile(rb"\r[^\n]")


def _has_bare_cr(body: bytes) -> bool:
    return _CR_NOT_LF.search(body) is not None or body.endswith(b"\r")


_SAMPLE = 4096  # bytes looked at to guess the line length
_SHORT_LINES = 24  # CRs in the sample: lines shorter than _SAMPLE / this on average


def _without_cr(body: bytes) -> bytes:
    # replace() deletes a single byte by finding each CR with memchr and
    # copying the runs between them: one pass into one new object, about a
    # fifth of the CPU of bytes(bytearray(body).translate(None, b"\r")) (two
    # more transient copies) per MiB of 80-byte lines. Its cost is per CR,
    # though (4x translate's for empty lines), so a body whose first 4 KiB
    # has short lines takes translate's byte-by-byte loop instead; guessing
    # wrong costs CPU, never a different result.
    if body.count(b"\r", 0, _SAMPLE) * _SHORT_LINES > min(len(body), _SAMPLE):
        return bytes(bytearray(body).translate(None, b"\r"))
    return body.replace(b"\r", b"")


def to_lf(body: bytes) -> bytes:
    """``body`` with every CRLF turned into LF; a bare CR stays.

    The same bytes as ``body.replace(b"\\r\\n", b"\\n")`` at about half its
    cost: without a bare CR, deleting every CR is the same edit, and one
    single-byte delete plus one regex scan beat a two-byte ``replace``.
    """
    if not _has_bare_cr(body):
        return _without_cr(body)
    return body.replace(b"\r\n", b"\n")


def to_lf_counted(body: bytes, no_bare_lf: bool = False, crlf: int = -1) -> tuple[bytes, int]:
    """``(to_lf(body), its LF count minus its CRLF count)``: the stored body and its ``W - S``.

    The count :func:`~delivery_executor.store.names.size_suffix` would make,
    taken here so that the store need not make it. With the C helpers
    (:mod:`delivery_executor._native`) one pass that copies each line and
    drops its CR, after a pass that counts the CRLFs unless ``crlf`` (not
    negative) says how many there are (the reader counted them: a wrong
    count costs that pass, never a wrong result); else :func:`to_lf_counted_py`.
    """
    if speedups is not None:
        return speedups.to_lf_counted(body, crlf)
    return to_lf_counted_py(body, no_bare_lf or crlf >= 0)


def to_lf_counted_py(body: bytes, no_bare_lf: bool = False) -> tuple[bytes, int]:
    """:func:`to_lf_counted` in Python: two or three C-level passes of ``bytes`` methods.

    ``no_bare_lf``: the caller knows every LF of ``body`` ends a CRLF (the
    bulk reader saw); then one CR delete and one count do: as many CRs
    deleted as LFs counted means no bare CR (each LF had its CR), so deleting
    every CR was the right edit.
    """
    if no_bare_lf:
        lf = _without_cr(body)
        n = lf.count(b"\n")
        if n == len(body) - len(lf):
            return lf, n
    elif not _has_bare_cr(body):
        lf = _without_cr(body)
        return lf, lf.count(b"\n")
    lf = body.replace(b"\r\n", b"\n")
    return lf, lf.count(b"\n") - lf.count(b"\r\n")


def message_id(body: bytes) -> str:
    """The first ``Message-ID`` header's value (cleaned), or ``"unspecified"`` as Dovecot says.

    Looks only at the header block, at most its first 16 KiB: a lower-cased copy
    of it and three ``find`` calls, a few microseconds for a typical header.
    """
    # An LF-only body (line_endings="lf") has no CR at the end of its first line.
    nl = body.find(b"\n", 0, _HEADER_SCAN)
    end = body.find(b"\r\n\r\n" if body[nl - 1 : nl] == b"\r" else b"\n\n", 0, _HEADER_SCAN)
    head = b"\n" + body[: _HEADER_SCAN if end == -1 else end + 1].lower()
    at = head.find(b"\nmessage-id:")
    if at == -1:
        return "unspecified"
    at += 12
    stop = head.find(b"\n", at)
    value = body[at - 1 : (len(head) if stop == -1 else stop) - 1].strip()
    if not value and stop != -1 and head[stop + 1 : stop + 2] in (b" ", b"\t"):  # folded
        nxt = head.find(b"\n", stop + 1)
        value = body[stop : (len(head) if nxt == -1 else nxt) - 1].strip()
    return _clean(value.decode("ascii", "replace"), "unspecified", 250)


class _Recipients:
    """One transaction's recipients as resolved at RCPT.

    ``answers``: (accepted, path or reply) by (address, smtputf8), so an
    address named twice is looked up once; replies are kept as text, since an
    exception's traceback would hold the envelope that keys this state.
    ``entries``: (path, ORCPT address or ""), in the order RCPTs were accepted.
    """

    __slots__ = ("answers", "entries")

    def __init__(self) -> None:
        self.answers: dict[tuple[str, bool], tuple[bool, str]] = {}
        self.entries: list[tuple[str, str]] = []


class DeliveryHandler:
    """aiosmtpd handler: RCPT checks through a resolver, DATA through the executor.

    Parameters:
        executor: delivers each recipient's copy: a :class:`DeliveryExecutor`
            (from any loop or thread) or any object with an async
            ``deliver(path, body)``.
        resolver: maps and checks recipients (:class:`MailboxResolver`).
        max_message_size: bodies above it get ``552 5.3.4``.
        max_recipients: RCPTs beyond it get ``452 4.5.3``.
        add_headers: prepend ``Return-Path``, ``X-Original-To`` (the RCPT's
            ``ORCPT``, else the RCPT address), ``Delivered-To`` (Postfix's
            ``virtual(8)`` order) and ``Received``, per copy; UTF-8 in an
            SMTPUTF8 transaction (RFC 6532), else printable ASCII.
        hostname: the name in our ``Received`` line (default: this host's FQDN).
        line_endings: ``"lf"`` (default) stores every CRLF as LF, in the body and
            in our headers; ``"crlf"`` stores the body exactly as received.
        duplicate_window: seconds (0: off, the default); a message whose
            ``Message-ID`` the same Maildir got within it is answered ``250``
            and not stored again (:mod:`.duplicates`).
        watcher: its ``note(path)`` is called with the Maildir of each accepted
            recipient, at RCPT.

    With a :class:`DeliveryExecutor` a message is held once, whatever the
    number of recipients: each copy is its own small header block followed by
    the shared body. Any other ``deliver`` gets one joined ``bytes`` per copy.
    Works with aiosmtpd's ``SMTP``/``LMTP`` (``decode_data`` either way: the
    raw bytes are delivered) and with ``python -m aiosmtpd -c
    delivery_executor.DeliveryHandler ROOT`` (see :meth:`from_cli`).
    """

    def __init__(
        self,
        executor: Deliverer | DeliveryExecutor,
        resolver: MailboxResolver,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_recipients: int = DEFAULT_MAX_RECIPIENTS,
        add_headers: bool = True,
        hostname: str | None = None,
        line_endings: LineEndings = "lf",
        duplicate_window: float = 0.0,
        watcher: MailboxWatcher | None = None,
        sieve: SieveFilter | None = None,
    ) -> None:
        if not inspect.iscoroutinefunction(getattr(executor, "deliver", None)):
            raise TypeError(
                "executor must be a DeliveryExecutor or have an async deliver(path, body),"
                f" not {type(executor).__name__}"
            )
        if not isinstance(resolver, MailboxResolver):
            raise TypeError(f"resolver must be a MailboxResolver, not {type(resolver).__name__}")
        validate.count("max_message_size", max_message_size)
        validate.count("max_recipients", max_recipients)
        if line_endings not in LINE_ENDINGS:
            raise ValueError(f"line_endings must be one of {LINE_ENDINGS}, not {line_endings!r}")
        self.executor = executor
        self.resolver = resolver
        self.max_message_size = max_message_size
        self.max_recipients = max_recipients
        self.add_headers = add_headers
        self.hostname = _clean(hostname or socket.getfqdn(), "localhost")
        self.line_endings: LineEndings = line_endings
        self.sieve = sieve
        """Sieve filtering per recipient (:class:`SieveFilter`), or ``None``."""
        self._lf = line_endings == "lf"
        self._eol = "\n" if self._lf else "\r\n"
        # Our executor takes (headers, body) tuples and writes them with writev.
        self._parts = isinstance(executor, DeliveryExecutor) or (
            getattr(executor, "takes_parts", False) is True  # e.g. quota.QuotaDeliverer
        )
        check = getattr(executor, "check", None) if getattr(executor, "check_at_rcpt", 0) else None
        self._rcpt_quota: Callable[[str, int], Awaitable[str | None]] | None = check
        self._ids = itertools.count()
        # Each transaction's recipients, resolved once at RCPT (_Recipients).
        self._resolved: weakref.WeakKeyDictionary[Envelope, _Recipients] = (
            weakref.WeakKeyDictionary()
        )
        self._date = (0, "")
        self.accepted = 0
        self.rejected = 0
        self.rcpt_rejected = 0
        """Recipients refused at RCPT (bad, unknown, not ours, too many)."""
        self.failed = 0
        """Copies answered ``451`` after DATA (what ``failed_total`` and the summary count)."""
        self.stopping = False
        """Set by ``serve`` when a stop begins: MAIL gets :data:`SHUTTING_DOWN` and the
        connection is closed."""
        self.duplicates = None if not duplicate_window else DuplicateFilter(duplicate_window)
        self.watcher = watcher
        self.quota_rejected = 0
        """Recipients refused because their mailbox is full (at RCPT or DATA)."""
        self.delivery_seconds = Buckets()
        """Per delivered copy: seconds from the end of DATA until the copy was durable."""

    @classmethod
    def from_cli(cls, parser: argparse.ArgumentParser, *args: str) -> DeliveryHandler:
        """aiosmtpd's CLI hook: ``python -m aiosmtpd -c delivery_executor.DeliveryHandler ROOT``.

        ``ROOT`` is the directory of all Maildirs (``<root>/<domain>/<user>``).
        The executor binds to aiosmtpd's loop at the first message.
        """
        if len(args) != 1:
            parser.error("delivery_executor.DeliveryHandler takes one argument: the Maildir root")
        return cls(DeliveryExecutor(), MailboxResolver(args[0]))

    def __repr__(self) -> str:
        return (
            f"<DeliveryHandler accepted={self.accepted} rejected={self.rejected}"
            f" resolver={self.resolver!r}>"
        )

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        """Refuse a reverse path with NUL or control characters (``553 5.1.7``); else accept.

        aiosmtpd leaves recording the sender to this hook once it exists, so it
        sets ``envelope.mail_from`` and ``mail_options`` as aiosmtpd would.
        Such characters are never part of a real address (a quoted local part
        may hold CR after parsing) and would end up in ``Return-Path``.
        """
        if self.stopping:  # RFC 5321 3.8: 421, then close; the client retries elsewhere/later
            transport = getattr(server, "transport", None)
            if transport is not None:  # after the reply is written (same step, see push)
                asyncio.get_running_loop().call_soon(transport.close)
            return SHUTTING_DOWN
        if any(c < " " or "\x7f" <= c < "\xa0" for c in address):
            return "553 5.1.7 Sender address contains control characters"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        """Resolve ``address`` now, so that a bad recipient is refused at RCPT.

        An ``ORCPT=`` among ``rcpt_options`` (as :class:`DeliveryLMTP` passes
        it, case kept) becomes that copy's ``X-Original-To``.
        """
        if len(envelope.rcpt_tos) >= self.max_recipients:
            self.rcpt_rejected += 1
            return f"452 4.5.3 Too many recipients (at most {self.max_recipients})"
        # Looked up once per transaction whatever the resolver caches
        # (--userdb-cache-ttl 0 too): an address named twice costs one lookup.
        state = self._resolved.get(envelope)
        if state is None:
            state = self._resolved[envelope] = _Recipients()
        answer = state.answers.get((address, envelope.smtp_utf8))
        if answer is None:
            try:
                answer = (True, await self.resolver.aresolve(address, smtputf8=envelope.smtp_utf8))
            except RecipientRejected as exc:
                answer = (False, exc.reply)
            state.answers[(address, envelope.smtp_utf8)] = answer
        accepted, path = answer
        if not accepted:
            self.rcpt_rejected += 1
            return path
        orcpt = ""
        for option in rcpt_options:
            if option[:6].upper() == "ORCPT=":
                with contextlib.suppress(DsnSyntaxError):  # our protocol checked it
                    orcpt = original_recipient(option[6:], utf8=envelope.smtp_utf8)
        if not envelope.smtp_utf8 and not orcpt.isascii():
            # Headers stay ASCII here: a non-ASCII address with its letters
            # dropped would name someone else, so X-Original-To is the RCPT.
            orcpt = ""
        if self._rcpt_quota is not None:
            refusal = await self._rcpt_quota(path, _mail_size(envelope.mail_options))
            if refusal is not None:
                self.rcpt_rejected += 1
                self.quota_rejected += 1
                return refusal
        if self.watcher is not None:
            self.watcher.note(path)
        envelope.rcpt_tos.append(address)  # aiosmtpd leaves this to the handler
        envelope.rcpt_options.extend(rcpt_options)
        state.entries.append((path, orcpt))
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Deliver one copy per recipient; reply per recipient under LMTP."""
        lmtp = isinstance(server, LMTP)
        rcpts = list(envelope.rcpt_tos)
        try:
            replies = await self._deliver_all(server, session, envelope, rcpts, lmtp)
        except asyncio.CancelledError:
            raise  # the client went away; writes already queued still complete
        except Exception:
            _log.exception("unexpected error delivering a message")
            replies = ["451 4.3.0 Local error in processing"] * len(rcpts)
            self.failed += len(rcpts)
        if lmtp:
            return "\r\n".join(replies)
        return self._smtp_reply(replies, len(rcpts))

    @staticmethod
    def _smtp_reply(replies: list[str], n: int) -> str:
        # One reply for the whole transaction: it must be true of every recipient.
        if all(r.startswith("250") for r in replies):
            return f"250 2.0.0 Ok: delivered to {n} mailbox(es)"
        if all(r.startswith("552") for r in replies):
            return replies[0]
        if not any(r.startswith("250") for r in replies):
            return "451 4.3.0 Delivery failed; try again later"
        return "451 4.3.0 Delivery failed for some recipients; try again later"

    async def _deliver_all(
        self, server: SMTP, session: Session, envelope: Envelope, rcpts: list[str], lmtp: bool
    ) -> list[str]:
        started = time.perf_counter()
        # Our reader's body, not yet made: sized without a pass, converted in one.
        held = raw_body_size(envelope) if self._lf else -1
        if held > self.max_message_size:
            return self._too_big(len(rcpts))
        fused = lf_body(envelope) if held >= 0 else None
        if fused is not None:
            lf, extra = fused
            with known_line_ends(lf, extra):
                return await self._deliver_body(server, session, envelope, rcpts, lmtp, lf, started)
        body = envelope.original_content
        if body is None:
            return ["554 5.6.0 No message data"] * len(rcpts)
        if len(body) > self.max_message_size:
            return self._too_big(len(rcpts))
        if self._lf:
            # Once per message: every copy shares it, and the store takes ,W= from us.
            # Counted only where the reader vouched for no bare LF (has_no_bare_lf).
            ends = counted_line_ends(envelope, body)
            body, extra = to_lf_counted(body, ends >= 0, ends)
        elif has_no_bare_lf(envelope, body):
            extra = 0  # every LF ends a CRLF: W = S, nothing to count
        else:  # counted here once, rather than by each writer (a helper process too)
            extra = body.count(b"\n") - body.count(b"\r\n")
        with known_line_ends(body, extra):
            return await self._deliver_body(server, session, envelope, rcpts, lmtp, body, started)

    def _too_big(self, n: int) -> list[str]:
        self.rejected += n
        return [f"552 5.3.4 Message too big (limit {self.max_message_size} bytes)"] * n

    async def _deliver_body(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        rcpts: list[str],
        lmtp: bool,
        body: bytes,
        started: float,
    ) -> list[str]:
        entries = self._resolved.pop(envelope).entries
        utf8 = bool(envelope.smtp_utf8)
        clean = _clean_utf8 if utf8 else _clean
        # aiosmtpd keeps the null sender as "<>": a bounce's Return-Path is "<>".
        sender = "" if envelope.mail_from == "<>" else clean(envelope.mail_from, "")
        received = self._received(server, session, lmtp, utf8) if self.add_headers else ("", "")
        # One copy per mailbox: the same Maildir named twice (carol, Carol,
        # carol+x) is stored once, with the first such recipient's headers.
        first: dict[str, int] = {}
        which: list[int] = []  # recipient → index of the copy that serves it
        paths: list[str] = []
        copies: list[Message] = []
        owners: list[str] = []  # copy → the recipient it was made for (Sieve's envelope to)
        dups = self.duplicates
        key = dups.key(body) if dups is not None else None
        found: dict[int, str] = {}  # copy → the name it is already stored under
        for rcpt, (path, orcpt) in zip(rcpts, entries, strict=True):
            at = first.get(path)
            if at is None:
                at = first[path] = len(paths)
                paths.append(path)
                owners.append(rcpt)
                if dups is not None and key is None:
                    dups.prepare(path)
                elif dups is not None and key is not None and (name := await dups.find(path, key)):
                    found[at] = name
                if not self.add_headers:
                    copies.append(body)
                else:
                    head = self._headers(sender, clean(rcpt), clean(orcpt or rcpt), received)
                    copies.append((head, body) if self._parts else head + body)
            which.append(at)
        results: Sequence[tuple[object, float] | BaseException]
        if len(paths) == 1:  # the common case: no task per message
            results = [await self._copy(0, paths, copies, owners, found, body, sender)]
        else:
            # Sieve: one view of the message for every recipient (headers parsed once).
            view = body if self.sieve is None else MessageView.parse(body)
            results = await asyncio.gather(
                *(
                    self._copy(i, paths, copies, owners, found, view, sender)
                    for i in range(len(paths))
                ),
                return_exceptions=True,
            )
        log = _dlog.isEnabledFor(logging.INFO)
        msgid = message_id(body) if log else ""
        replies = []
        for rcpt, at in zip(rcpts, which, strict=True):
            item, copy = results[at], copies[at]
            res, done = (item, 0.0) if isinstance(item, BaseException) else item
            if isinstance(res, BaseException):
                self.rejected += 1
                if isinstance(res, QuotaExceeded):
                    self.quota_rejected += 1
                else:
                    self.failed += 1
                replies.append(self._failure(rcpt, res))
                continue
            if at in found and dups is not None:
                dups.suppressed += 1
                _log.info(
                    "duplicate: msgid=%s from=<%s> to=<%s> already stored as %s, not stored again",
                    message_id(body), sender, rcpt, res,
                )  # fmt: skip
                replies.append(f"250 2.0.0 <{rcpt}> Ok: already delivered as {res}")
                continue
            self.accepted += 1
            seconds = done - started
            self.delivery_seconds.observe(seconds)
            if log:
                size = len(copy[0]) + len(copy[1]) if isinstance(copy, tuple) else len(copy)
                _dlog.info(_SAVED, msgid, sender, rcpt, size, res, seconds * 1000)
            replies.append(f"250 2.0.0 <{rcpt}> Ok: delivered as {res}")
        return replies

    def _copy(
        self,
        i: int,
        paths: list[str],
        copies: list[Message],
        owners: list[str],
        found: dict[int, str],
        body: bytes | MessageView,
        sender: str,
    ) -> Awaitable[tuple[object, float]]:
        """Store copy ``i``: already there (a duplicate), through Sieve, or as it is."""
        if i in found:
            return self._known(found[i])
        if self.sieve is not None:
            return self._sieved(paths[i], copies[i], body, sender, owners[i])
        return self._one(paths[i], copies[i])

    @staticmethod
    async def _known(name: str) -> tuple[object, float]:
        return name, time.perf_counter()

    async def _one(self, path: str, copy: Message, flags: str = "") -> tuple[object, float]:
        """Deliver one copy; return its id (or the error) and when it was done."""
        try:
            if flags:
                res: object = await self.executor.deliver(path, copy, flags=flags)  # type: ignore[arg-type,call-arg]
            else:
                res = await self.executor.deliver(path, copy)  # type: ignore[arg-type]
        except (OSError, DeliveryError) as exc:
            res = exc
        return res, time.perf_counter()

    async def _sieved(
        self, path: str, copy: Message, body: bytes | MessageView, sender: str, rcpt: str
    ) -> tuple[object, float]:
        """One recipient through Sieve: each route is a delivery riding the same batches.

        A script never costs the message: any failure of the filter itself
        delivers to INBOX. A flagged copy is committed straight into
        ``cur/<name>:2,<letters>`` with the rest of its batch; a deliverer
        that cannot store flags (no ``stores_flags``) gets the copy without them.
        """
        assert self.sieve is not None
        try:
            routes = self.sieve.route(path, body, sender, rcpt)
        except Exception:
            _log.exception("sieve failed for <%s>; delivering to INBOX", rcpt)
            routes = None
        if routes is None:
            return await self._one(path, copy)
        if not routes:
            return "nothing (discarded by Sieve)", time.perf_counter()
        flags_ok = getattr(self.executor, "stores_flags", False) is True
        if not flags_ok and any(r.letters for r in routes):
            _log.warning("sieve: <%s>: flags not set: the deliverer cannot store them", rcpt)
        if len(routes) == 1:  # no task for the common case
            r = routes[0]
            got = [await self._one(r.path, copy, r.letters if flags_ok else "")]
        else:
            got = await asyncio.gather(
                *(self._one(r.path, copy, r.letters if flags_ok else "") for r in routes)
            )
        names: list[str] = []
        for r, (res, _) in zip(routes, got, strict=True):
            if isinstance(res, BaseException):
                return res, time.perf_counter()
            name = str(res) + (f":2,{r.letters}" if r.letters and flags_ok else "")
            names.append(name if r.path == path else f"{os.path.basename(r.path)}/{name}")
        return ", ".join(names), time.perf_counter()

    @staticmethod
    def _failure(rcpt: str, exc: BaseException) -> str:
        """The reply for one failed copy: the quota's own, else ``451`` with a plain reason
        (the log has the detail)."""
        if isinstance(exc, QuotaExceeded):  # "552 5.2.2 <rcpt> Quota exceeded (...)"
            return f"{exc.reply[:9]} <{rcpt}>{exc.reply[9:]}"
        if isinstance(exc, OSError):
            _log.error("delivery to <%s> failed: %s", rcpt, exc)
            reason = os.strerror(exc.errno) if exc.errno else "I/O error"
        else:
            _log.error("delivery to <%s> failed: %r", rcpt, exc)
            reason = next((t for c, t in _FAILURE_TEXT if isinstance(exc, c)), "internal error")
        return f"451 4.3.0 <{rcpt}> Temporary local failure: {reason}"

    def _headers(self, sender: str, rcpt: str, original: str, received: tuple[str, str]) -> bytes:
        # The order Postfix's virtual(8) writes them, then our Received line,
        # whose "for" names this copy's recipient only.
        eol = self._eol
        return (
            f"Return-Path: <{sender}>{eol}X-Original-To: {original}{eol}Delivered-To: {rcpt}{eol}"
            f"{received[0]}{eol}\tfor <{rcpt}>;{eol}\t{received[1]}{eol}"
        ).encode("utf-8", "replace")

    def _received(self, server: SMTP, session: Session, lmtp: bool, utf8: bool) -> tuple[str, str]:
        """Our ``Received`` line around its ``for`` clause: (up to the id, the date)."""
        peer: Any = session.peer
        ip = peer[0] if isinstance(peer, tuple) and peer else "unknown"
        helo = _clean(session.host_name)
        # RFC 3848/6531 protocol names: ESMTPS after STARTTLS or on a TLS
        # listener, A when authenticated, UTF8 for an SMTPUTF8 transaction.
        proto = "LMTP" if lmtp else ("ESMTP" if session.extended_smtp else "SMTP")
        if proto != "SMTP":
            transport = getattr(server, "transport", None)
            if session.ssl is not None or (
                transport is not None and transport.get_extra_info("ssl_object") is not None
            ):
                proto += "S"
            if session.authenticated:
                proto += "A"
            if utf8:
                proto = "UTF8" + proto[1:] if proto.startswith("E") else "UTF8" + proto
        qid = f"{os.getpid():x}{next(self._ids):x}"
        now = int(time.time())
        if self._date[0] != now:  # formatting the date costs more than the rest
            self._date = (now, email.utils.formatdate(now, localtime=True))
        return (
            f"Received: from {helo} ([{ip}]){self._eol}\tby {self.hostname} (delivery-executor)"
            f" with {proto} id {qid}",
            self._date[1],
        )
