"""A bulk DATA reader for aiosmtpd: one buffer per message, not one object per line.

:class:`BulkDataMixin` replaces ``aiosmtpd.smtp.SMTP.smtp_DATA``; put it first
in the bases (``class Server(BulkDataMixin, SMTP)``, or ``LMTP``). Replies,
envelope and session state are aiosmtpd 1.4's, byte for byte: the same
pre-checks, ``354``, ``552 Error: Too much mail data`` past
``data_size_limit``, ``500 Line too long (see RFC5321 4.5.3.1.6)``, ``500
Error: strict ASCII mode``, the ``handle_DATA`` hook (or the deprecated
``process_message``), ``250 OK``. The reply strings go through ``self.push``
unchanged, so a ``push`` override that rewrites them keeps working.

How aiosmtpd decides, reproduced exactly (its reader has ``limit`` =
``line_length_limit`` = L, 1001 by default):

- A body line is the bytes up to and including a CRLF; bare CR and bare LF
  are ordinary bytes. The body ends at the first line that is ``.`` CRLF
  (the very first line included: an empty message).
- A line of T bytes (CRLF and any stuffing dot included) is too long if
  T > L. With T >= L + 3 aiosmtpd's ``readuntil`` overruns on its first
  part, before the line is counted: ``500``, whatever the size. With T of
  L + 1 or L + 2 the line is counted first: ``552`` if that takes the count
  past the limit, else ``500``. Bytes are counted line by line, so ``552``
  means the first line ending past ``data_size_limit`` bytes came before any
  too-long line. The first of these events decides; later bytes only
  matter for finding the end.
- Unstuffing removes the first byte of every line that starts with ``.``.

Reading: large chunks from the StreamReader (``readuntil`` on the
terminator, which with the small limit raises ``LimitOverrunError`` and
tells how much can be consumed safely; never past the terminator, so
pipelined commands stay in the reader). What is consumed goes into one
``bytearray``; line lengths are checked with one ``bytes.rfind`` per L bytes,
unstuffing is one ``bytes.replace``.

Memory: one ``bytearray`` of the raw body (up to 1/8 growth slack) plus one
transport read (<= 256 KiB with asyncio's transports, plus the reader's
2 x L pause threshold); at the end the body is copied once into ``bytes``
(twice if it has stuffed dots, the first copy freed before the second is
made): peak about 2 x the body, at most 2.25 x. Once a ``552`` or ``500`` is
certain the buffer is dropped: with a ``data_size_limit`` it never holds more
than limit + 2 L bytes plus one read. aiosmtpd keeps one ``bytearray`` object
(about 60 bytes of overhead) per line, e.g. 2.6 GiB for 30 MiB of empty lines.

Cost: per transport read about 3 StreamReader calls (a ``readuntil`` that
overruns, the ``readexactly`` it allows, sometimes a byte to settle a
partial terminator), whatever the line lengths; each byte is copied 3 times
(reader -> chunk -> buffer -> ``bytes``) and scanned 3 times (the reader's
``find``, our ``rfind``, ``replace``). Only ``\n.\r\n`` (a bare LF before a
lone-dot line) costs extra calls: a body made of it forces about one call
per 2 bytes, about twice aiosmtpd's CPU on that same body, still less than
aiosmtpd spends on a body of empty lines, and still one buffer.

A client that disconnects mid-body: aiosmtpd's ``eof_received``/
``connection_lost`` cancel the session task; as in aiosmtpd we log, close
the writer and re-raise, the handler is not called and nothing reaches the
loop's exception handler.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import TYPE_CHECKING, Any
from warnings import warn

from aiosmtpd.smtp import MISSING, syntax

if TYPE_CHECKING:
    from aiosmtpd.smtp import SMTP as _MixinBase
else:
    _MixinBase = object

__all__ = ["BulkDataMixin"]

# aiosmtpd's logger, so existing logging configuration covers us too.
_log = logging.getLogger("mail.log")

_TERM = b"\r\n.\r\n"
_TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"
_TOO_MUCH = "552 Error: Too much mail data"


async def _read_upto(reader: asyncio.StreamReader, sep: bytes) -> bytes:
    """Through the first ``sep`` if the reader's limit allows, else as much as holds none."""
    try:
        return await reader.readuntil(sep)
    except asyncio.LimitOverrunError as exc:
        # exc.consumed: where sep starts, or all but the last len(sep) - 1
        # bytes when there is none. The bytes are still buffered: no wait.
        return await reader.readexactly(exc.consumed)


class _Body:
    """The DATA bytes consumed so far and aiosmtpd's verdict on them.

    ``buf`` holds the raw (still dot-stuffed) bytes while no verdict is
    certain; ``verdict`` becomes a reply string once one is, and ``buf`` is
    dropped. ``scanned`` is the start of the first line not yet known to be
    at most ``line_max`` bytes long; every line before it is.
    """

    __slots__ = ("buf", "limit", "line_max", "scanned", "verdict")

    def __init__(self, limit: int | None, line_max: int) -> None:
        self.buf = bytearray()
        self.limit = limit or 0  # aiosmtpd: a falsy limit means none
        self.line_max = line_max
        self.scanned = 0
        self.verdict: str | None = None

    def feed(self, chunk: bytes) -> None:
        """Append consumed bytes that do not complete the terminator, and judge them.

        A partial terminator at the end (``.`` or ``.\\r`` after a CRLF) is
        harmless: only whole lines and over-long windows are judged.
        """
        if self.verdict is None:
            self.buf += chunk
            # Judge once a whole window is unjudged: the small reads that
            # partial terminators cause skip the scan, and the verdict comes
            # at most line_max bytes late.
            if len(self.buf) - self.scanned >= self.line_max:
                self._scan()

    def finish(self, chunk: bytes) -> None:
        """Append the bytes that complete the terminator, drop its ``.\\r\\n``, judge the rest.

        The terminator is not a body line: fed to :meth:`_scan` it would count
        3 bytes towards ``data_size_limit``.
        """
        if self.verdict is None:
            self.buf += chunk
            del self.buf[-3:]
            self._scan()
            assert self.verdict is not None or self.scanned == len(self.buf)

    def content(self) -> bytes:
        """The unstuffed body (call once, after :meth:`finish` left no verdict)."""
        buf, self.buf = self.buf, bytearray()
        if buf.startswith(b"."):
            del buf[0]  # O(1): a bytearray drops leading bytes by moving its start
        data = bytes(buf)
        del buf  # free the raw buffer before replace() makes its copy
        # No line is "." (that would have ended the body), so the matches never
        # overlap; replace() returns `data` itself when there is nothing to do.
        return data.replace(b"\r\n.", b"\r\n")

    def _decide(self, verdict: str) -> None:
        self.verdict = verdict
        self.buf = bytearray()  # discard at once, as aiosmtpd does

    def _scan(self) -> None:
        buf, s, w, end = self.buf, self.scanned, self.line_max, len(self.buf)
        rfind = buf.rfind
        # Every line inside [s, last CRLF in a w-byte window] is <= w bytes, so
        # one rfind per window proves many lines at once (>= w/2 bytes a step
        # amortised). A window without CRLF starts a too-long line.
        too_long = False
        while end - s >= w:
            i = rfind(b"\r\n", s, s + w)
            if i < 0:
                too_long = True
                break
            s = i + 2
        else:
            i = rfind(b"\r\n", s, end)
            if i >= 0:
                s = i + 2
        self.scanned = s
        limit = self.limit
        if limit and s > max(limit, 0):
            # The first line ending past the limit is before s, so it is short.
            # (max: with a negative limit aiosmtpd still needs a line to count.)
            self._decide(_TOO_MUCH)
        elif too_long:
            # The line at s is > w bytes. With w + 1 or w + 2 bytes aiosmtpd's
            # readuntil returns it whole and counts it before checking it; any
            # longer and its first fragment overruns: too long, not counted.
            j = buf.find(b"\r\n", s + w - 1, s + w + 2)
            if j >= 0:
                self._decide(_TOO_MUCH if limit and j + 2 > limit else _TOO_LONG)
            elif end >= s + w + 2:
                self._decide(_TOO_LONG)
            # else: too few bytes yet to know which; at most w + 1 past s.


class BulkDataMixin(_MixinBase):
    """aiosmtpd ``SMTP``/``LMTP`` mixin: DATA read in bulk, same replies and state.

    Use as the first base: ``class Server(BulkDataMixin, SMTP)``. It relies
    on aiosmtpd 1.4 internals (``_reader``, ``_writer``, ``_handle_hooks``,
    ``_decode_data``, ``_call_handler_hook``) and on the reader having been
    built with ``limit=line_length_limit``, as ``SMTP.__init__`` does.
    """

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA, the body read in bulk (see the module docstring)."""
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return

        await self.push("354 End data with <CR><LF>.<CR><LF>")
        body = _Body(self.data_size_limit, self.line_length_limit)
        try:
            await self._read_data_body(body)
        except asyncio.CancelledError:
            # eof_received/connection_lost cancelled the session mid-body.
            _log.info("Connection lost during DATA")
            self._writer.close()
            raise

        if body.verdict is not None:
            await self.push(body.verdict)
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return

        original_content = body.content()
        content: str | bytes
        if self._decode_data:
            if self.enable_SMTPUTF8:
                content = original_content.decode("utf-8", errors="surrogateescape")
            else:
                try:
                    content = original_content.decode("ascii", errors="strict")
                except UnicodeDecodeError:
                    # Like aiosmtpd: no reset, the envelope stays as it was.
                    await self.push("500 Error: strict ASCII mode")
                    return
        else:
            content = original_content
        self.envelope.content = content
        self.envelope.original_content = original_content

        status: Any
        if "DATA" in self._handle_hooks:
            status = await self._call_handler_hook("DATA")
        else:
            status = await self._process_message_compat()
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

    async def _read_data_body(self, body: _Body) -> None:
        """Consume the stream up to and including the terminator, feeding ``body``.

        ``tail`` is the last 5 bytes consumed, starting with the CRLF that
        ended the DATA command, so an empty message (``.`` CRLF first) is the
        same case as any other. The terminator is searched for inside the
        reader's buffer, so one that began in ``tail`` (a partial match of k
        bytes) must be finished first; it ends 5 - k bytes ahead at the
        earliest, so consuming up to that much is safe.
        """
        reader = self._reader
        tail = b"\r\n"
        while True:
            if tail.endswith(b"\r"):
                if tail.endswith(b"\r\n.\r"):
                    chunk = await reader.readexactly(1)
                else:
                    # Search for the rest, LF "." CRLF: rare in mail, so a body
                    # of empty lines stays in bulk.
                    chunk = await _read_upto(reader, b"\n.\r\n")
            elif tail.endswith(b"\r\n"):
                # One byte: reading 3 (all that is safe) would keep a body of
                # 1-byte lines in this state for ever.
                chunk = await reader.readexactly(1)
            elif tail.endswith(b"\r\n."):
                chunk = await reader.readexactly(2)
            else:
                chunk = await _read_upto(reader, _TERM)
            tail = chunk[-5:] if len(chunk) >= 5 else (tail + chunk)[-5:]
            if tail == _TERM:
                body.finish(chunk)
                return
            body.feed(chunk)

    async def _process_message_compat(self) -> Any:
        """aiosmtpd's fallback for handlers with only the deprecated ``process_message``."""
        handler = self.event_handler
        if not hasattr(handler, "process_message"):
            return MISSING
        warn(
            "Use handler.handle_DATA() instead of .process_message()",
            DeprecationWarning,
            stacklevel=1,  # aiosmtpd's own
        )
        assert self.session is not None
        assert self.envelope is not None
        args = (
            self.session.peer,
            self.envelope.mail_from,
            self.envelope.rcpt_tos,
            self.envelope.content,
        )
        if inspect.iscoroutinefunction(handler.process_message):
            status = await handler.process_message(*args)
        else:
            status = handler.process_message(*args)
        return MISSING if status is None else status
