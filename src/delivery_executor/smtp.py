"""An aiosmtpd handler that delivers through a :class:`DeliveryExecutor`.

Use it with ``aiosmtpd.smtp.SMTP`` or ``aiosmtpd.lmtp.LMTP`` running in the
executor's own event loop (``loop.create_server``), or take the ready-made
:class:`DeliverySMTP`/:class:`DeliveryLMTP` protocols and :func:`serve`.

Replies:

- RCPT: ``250 2.1.5`` or the resolver's rejection (``553 5.1.3``,
  ``550 5.1.1``, ``550 5.7.1``, ``553 5.6.7``), ``452 4.5.3`` past
  ``max_recipients``.
- LMTP DATA: exactly one reply per recipient, in order, duplicates included
  (RFC 2033): ``250 2.0.0`` once that copy is durable, else ``451 4.3.0`` for
  that recipient alone. The handler never raises under LMTP: aiosmtpd would
  answer a single ``500``, the wrong number of replies.
- SMTP DATA: ``250 2.0.0`` only when every recipient's copy is durable, else
  ``451 4.3.0`` (the client retries; copies that did land may be duplicated,
  none is lost).
- A message over ``max_message_size``: ``552 5.3.4`` (per recipient in LMTP).
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import logging
import os
import socket
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, AnyStr

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from .errors import DeliveryError, RecipientRejected
from .executor import DeliveryExecutor
from .maildir import MessageId
from .recipients import MailboxResolver

__all__ = [
    "DeliveryHandler",
    "DeliveryLMTP",
    "DeliverySMTP",
    "SessionFactory",
    "TooManyConnections",
]

_log = logging.getLogger("delivery_executor.smtp")
DEFAULT_MAX_MESSAGE_SIZE = 32 * 1024 * 1024
DEFAULT_MAX_RECIPIENTS = 1000


def _clean(text: str | None, default: str = "unknown", limit: int = 255) -> str:
    # Header values come from the client: no CR/LF, no control characters.
    if not text:
        return default
    return "".join(c for c in text[:limit] if " " <= c < "\x7f") or default


class DeliveryHandler:
    """aiosmtpd handler: RCPT checks through a resolver, DATA through the executor.

    Parameters:
        executor: delivers each recipient's copy; must run in the server's loop.
        resolver: maps and checks recipients (:class:`MailboxResolver`).
        max_message_size: bodies above it get ``552 5.3.4``.
        max_recipients: RCPTs beyond it get ``452 4.5.3``.
        add_headers: prepend ``Return-Path``, ``Delivered-To`` and ``Received``
            (as Dovecot and Postfix's local delivery do).
        hostname: the name in our ``Received`` line (default: this host's FQDN).
    """

    def __init__(
        self,
        executor: DeliveryExecutor,
        resolver: MailboxResolver,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_recipients: int = DEFAULT_MAX_RECIPIENTS,
        add_headers: bool = True,
        hostname: str | None = None,
    ) -> None:
        if not isinstance(executor, DeliveryExecutor):
            raise TypeError(f"executor must be a DeliveryExecutor, not {type(executor).__name__}")
        if not isinstance(resolver, MailboxResolver):
            raise TypeError(f"resolver must be a MailboxResolver, not {type(resolver).__name__}")
        for name, value in (
            ("max_message_size", max_message_size),
            ("max_recipients", max_recipients),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, not {value!r}")
        self.executor = executor
        self.resolver = resolver
        self.max_message_size = max_message_size
        self.max_recipients = max_recipients
        self.add_headers = add_headers
        self.hostname = _clean(hostname or socket.getfqdn(), "localhost")
        self._ids = itertools.count()
        # Each envelope's resolved paths, in RCPT order: resolved once, at RCPT.
        self._paths: weakref.WeakKeyDictionary[Envelope, list[str]] = weakref.WeakKeyDictionary()
        self._date = (0, "")
        self.accepted = 0
        self.rejected = 0

    def __repr__(self) -> str:
        return (
            f"<DeliveryHandler accepted={self.accepted} rejected={self.rejected}"
            f" resolver={self.resolver!r}>"
        )

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        """Resolve ``address`` now, so that a bad recipient is refused at RCPT."""
        if len(envelope.rcpt_tos) >= self.max_recipients:
            return f"452 4.5.3 Too many recipients (at most {self.max_recipients})"
        try:
            path = self.resolver.resolve(address, smtputf8=envelope.smtp_utf8)
        except RecipientRejected as exc:
            return exc.reply
        envelope.rcpt_tos.append(address)  # aiosmtpd leaves this to the handler
        self._paths.setdefault(envelope, []).append(path)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Deliver one copy per recipient; reply per recipient under LMTP."""
        lmtp = isinstance(server, LMTP)
        rcpts = list(envelope.rcpt_tos)
        try:
            replies = await self._deliver_all(session, envelope, rcpts, lmtp)
        except asyncio.CancelledError:
            raise  # the client went away; writes already queued still complete
        except Exception:
            _log.exception("unexpected error delivering a message")
            replies = ["451 4.3.0 Local error in processing"] * len(rcpts)
        if lmtp:
            return "\r\n".join(replies)
        if all(r.startswith("250") for r in replies):
            return f"250 2.0.0 Ok: delivered to {len(rcpts)} mailbox(es)"
        if all(r.startswith("552") for r in replies):
            return replies[0]
        return "451 4.3.0 Delivery failed for some recipients; try again later"

    async def _deliver_all(
        self, session: Session, envelope: Envelope, rcpts: list[str], lmtp: bool
    ) -> list[str]:
        body = envelope.original_content
        if body is None:
            content = envelope.content
            body = (
                content.encode("utf-8", "surrogateescape") if isinstance(content, str) else content
            )
        if body is None:
            return ["554 5.6.0 No message data"] * len(rcpts)
        if len(body) > self.max_message_size:
            self.rejected += len(rcpts)
            return [f"552 5.3.4 Message too big (limit {self.max_message_size} bytes)"] * len(rcpts)
        replies: list[str | None] = [None] * len(rcpts)
        jobs: list[tuple[int, str, str, bytes]] = []
        received = self._received(session, rcpts, lmtp) if self.add_headers else b""
        paths = self._paths.pop(envelope, None)
        for i, rcpt in enumerate(rcpts):
            if paths is not None and len(paths) == len(rcpts):
                path = paths[i]
            else:  # recipients added some other way than our handle_RCPT
                try:
                    path = self.resolver.resolve(rcpt, smtputf8=envelope.smtp_utf8)
                except RecipientRejected as exc:
                    replies[i] = exc.reply
                    continue
            copy = body
            if self.add_headers:
                copy = self._headers(envelope.mail_from, rcpt) + received + body
            jobs.append((i, rcpt, path, copy))
        results: Sequence[MessageId | BaseException]
        if len(jobs) == 1:  # the common case: no task per message
            _, _, path, copy = jobs[0]
            results = [await self._one(path, copy)]
        else:
            results = await asyncio.gather(
                *(self._one(path, copy) for _, _, path, copy in jobs), return_exceptions=True
            )
        for (i, rcpt, _, _), res in zip(jobs, results, strict=True):
            if isinstance(res, MessageId):
                self.accepted += 1
                replies[i] = f"250 2.0.0 <{rcpt}> Ok: delivered as {res.name}"
            else:
                self.rejected += 1
                replies[i] = self._failure(rcpt, res)
        return [r if r is not None else "451 4.3.0 Local error" for r in replies]

    async def _one(self, path: str, copy: bytes) -> MessageId | BaseException:
        try:
            return await self.executor.deliver(path, copy)
        except (OSError, DeliveryError) as exc:
            return exc

    @staticmethod
    def _failure(rcpt: str, exc: BaseException) -> str:
        if isinstance(exc, OSError):
            _log.error("delivery to <%s> failed: %s", rcpt, exc)
            reason = os.strerror(exc.errno) if exc.errno else type(exc).__name__
            return f"451 4.3.0 <{rcpt}> Temporary local failure: {reason}"
        _log.error("delivery to <%s> failed: %r", rcpt, exc)
        return f"451 4.3.0 <{rcpt}> Temporary local failure: {type(exc).__name__}"

    def _headers(self, mail_from: str | None, rcpt: str) -> bytes:
        sender = _clean(mail_from, "")
        return f"Return-Path: <{sender}>\r\nDelivered-To: {_clean(rcpt)}\r\n".encode(
            "utf-8", "replace"
        )

    def _received(self, session: Session, rcpts: list[str], lmtp: bool) -> bytes:
        peer: Any = session.peer
        ip = peer[0] if isinstance(peer, tuple) and peer else "unknown"
        helo = _clean(session.host_name)
        proto = "LMTP" if lmtp else ("ESMTP" if session.extended_smtp else "SMTP")
        qid = f"{os.getpid():x}{next(self._ids):x}"
        for_part = f"\r\n\tfor <{_clean(rcpts[0])}>" if len(rcpts) == 1 else ""
        now = int(time.time())
        if self._date[0] != now:  # formatting the date costs more than the rest
            self._date = (now, email.utils.formatdate(now, localtime=True))
        date = self._date[1]
        return (
            f"Received: from {helo} ([{ip}])\r\n\tby {self.hostname} (delivery-executor)"
            f" with {proto} id {qid}{for_part};\r\n\t{date}\r\n"
        ).encode("utf-8", "replace")


class _DeliveryProtocol:
    """Enhanced codes for aiosmtpd's own DATA errors (one per recipient in LMTP),
    and a hook run once when the connection is gone."""

    envelope: Envelope | None
    _per_recipient = False
    on_close: Callable[[], None] | None = None

    async def push(self, status: AnyStr) -> None:
        if not isinstance(status, str):
            await super().push(status)  # type: ignore[misc]
            return
        if status.startswith("552 Error: Too much mail data"):
            status = "552 5.3.4 Message too big"
        elif status.startswith("500 Line too long"):
            status = "500 5.6.0 Line too long (RFC 5321 4.5.3.1.6)"
        else:
            await super().push(status)  # type: ignore[misc]
            return
        env = self.envelope
        if self._per_recipient and env is not None and len(env.rcpt_tos) > 1:
            status = "\r\n".join([status] * len(env.rcpt_tos))
        await super().push(status)  # type: ignore[misc]

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)  # type: ignore[misc]
        hook, self.on_close = self.on_close, None
        if hook is not None:
            hook()


class DeliverySMTP(_DeliveryProtocol, SMTP):
    """aiosmtpd SMTP with enhanced status codes on its own DATA errors."""


class DeliveryLMTP(_DeliveryProtocol, LMTP):
    """aiosmtpd LMTP that also answers its own DATA errors once per recipient."""

    _per_recipient = True


class TooManyConnections(asyncio.Protocol):
    """Answers ``421 4.3.2`` and closes: what a connection over the cap gets."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(b"421 4.3.2 Too many connections, try again later\r\n")
        transport.close()


class SessionFactory:
    """A ``loop.create_server`` protocol factory that caps live sessions.

    ``live`` counts open sessions; past ``max_connections`` a new connection
    gets ``421 4.3.2`` and is closed.
    """

    def __init__(
        self,
        handler: object,
        *,
        lmtp: bool,
        max_connections: int,
        loop: asyncio.AbstractEventLoop,
        **smtp_kwargs: Any,
    ) -> None:
        if isinstance(max_connections, bool) or not isinstance(max_connections, int):
            raise TypeError(f"max_connections must be an int, not {type(max_connections).__name__}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, not {max_connections}")
        self.handler = handler
        self.cls = DeliveryLMTP if lmtp else DeliverySMTP
        self.max_connections = max_connections
        self.loop = loop
        self.smtp_kwargs = smtp_kwargs
        self.live = 0
        self.refused = 0
        self.idle = asyncio.Event()
        """Set while no session is open."""
        self.idle.set()

    def __call__(self) -> asyncio.BaseProtocol:
        if self.live >= self.max_connections:
            self.refused += 1
            return TooManyConnections()
        self.live += 1
        self.idle.clear()
        proto = self.cls(self.handler, loop=self.loop, **self.smtp_kwargs)
        proto.on_close = self._closed
        return proto

    def _closed(self) -> None:
        self.live -= 1
        if self.live == 0:
            self.idle.set()
