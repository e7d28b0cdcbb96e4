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

Reading: once ``354`` is sent, what aiosmtpd's StreamReader already holds
is taken from it, and every later transport read goes straight to the body
(``data_received``) until the terminator; the bytes after it (pipelined
commands) go back to the reader. The StreamReader sees none of the body, so
the transport is never paused by it; the DATA budget still sees every read
first (the protocol's ``data_received``). Each read is appended to one
``bytearray`` and searched once by a loop that stops at each LF (one
``memchr`` per line in C, ``_speedups.c``; a regex where the C helpers are
not built): every line that starts with a dot (the terminator or a stuffed
line, its position noted) and the first bare LF (LF without its CR). Without one, every line
end is a CRLF, so the handler converts and counts line ends by lengths alone
(:func:`has_no_bare_lf`), and the loop has counted them on its way
(:func:`counted_line_ends`): the handler's CRLF-to-LF copy is allocated at its
size without a pass of its own to count them. After a bare LF,
``bytes.find`` looks for ``CRLF .`` only. Line lengths are checked by
stepping from CRLF to CRLF at most L bytes at a time, each step found by
looking back from the end of its window, which touches only each window's
last line (:func:`judge_lines`: one C call per read, or a ``bytes.rfind`` per
L bytes without the C helpers).
Unstuffing joins the slices between the noted dots into the ``bytes`` the
handler gets; past 256 stuffed lines the reader stops noting them, searches
for the terminator only and unstuffs with one ``bytes.replace``. Where the
reader vouches for the body (no bare LF, at most 256 stuffed lines, the C
helpers built, no ``decode_data``), the envelope (:class:`BulkEnvelope`)
holds the raw buffer and makes that ``bytes`` only when its content is read;
``DeliveryHandler`` instead takes the body with LF line ends straight from
the raw buffer (:func:`lf_body`: one C copy that unstuffs and converts), so
the CRLF body is never made.

Memory: one ``bytearray`` of the raw body (up to 1/8 growth slack) plus the
transport read being appended; at the end the body is copied once into
``bytes`` (the slices between dots joined; twice past 256 dots, the first
copy freed before the second is made): peak about 2 x the body, at most
2.25 x. Once a ``552`` or ``500`` is certain the buffer is dropped (only the
last 4 bytes are kept, for a terminator split across reads): with a
``data_size_limit`` it never holds more than limit + 2 L bytes plus one read.
aiosmtpd keeps one ``bytearray`` object (about 60 bytes of overhead) per
line, e.g. 2.6 GiB for 30 MiB of empty lines.

Cost: per transport read one append, one line search (plus one Python step
per stuffed line, at most 256 of them) and one line-length check (about
read/L ``rfind`` calls without the C helpers), whatever the line lengths;
each byte is copied twice (read -> buffer -> ``bytes``, or read -> buffer ->
LF body through :func:`lf_body`) and scanned once in full (the line search)
plus each window's last line (the length check). A held body keeps the raw
buffer alive until the envelope goes (the next transaction), in place of the
``bytes`` copy: the same peak.

A client that disconnects mid-body: aiosmtpd's ``eof_received``/
``connection_lost`` cancel the session task; as in aiosmtpd we log, close
the writer and re-raise, the handler is not called and nothing reaches the
loop's exception handler.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import threading
from typing import TYPE_CHECKING, Any
from warnings import warn

from aiosmtpd.smtp import MISSING, Envelope, syntax

from .._native import speedups

if TYPE_CHECKING:
    from aiosmtpd.smtp import SMTP as _MixinBase
else:
    _MixinBase = object

__all__ = [
    "LINE_ENDS",
    "NO_BARE_LF",
    "BulkDataMixin",
    "BulkEnvelope",
    "counted_line_ends",
    "has_no_bare_lf",
    "lf_body",
    "raw_body_size",
]

# aiosmtpd's logger, so existing logging configuration covers us too.
_log = logging.getLogger("mail.log")

_TERM = b"\r\n.\r\n"
_TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"
_TOO_MUCH = "552 Error: Too much mail data"


# An LF that starts a line with a dot, or that lacks its CR (a bare LF). The
# engine scans for the LF in C; the lookbehind sees before the search start.
_DOT_LINE_OR_BARE_LF = re.compile(rb"\n(?:\.|(?<!\r\n))")


def find_dot_or_bare_lf_py(buf: bytes | bytearray, pos: int) -> int:
    """The first LF at or after ``pos`` that starts a line with a dot or lacks its CR, or -1."""
    m = _DOT_LINE_OR_BARE_LF.search(buf, pos)
    return -1 if m is None else m.start()


def find_dot_or_bare_lf_counted_py(buf: bytes | bytearray, pos: int) -> tuple[int, int]:
    """``find_dot_or_bare_lf_py`` and the LFs before it from ``pos`` (to the end if -1)."""
    j = find_dot_or_bare_lf_py(buf, pos)
    return j, buf.count(b"\n", max(pos, 0), len(buf) if j < 0 else j)


# The C loop (one memchr per line): 0.08 ms per MiB of 80-byte lines, the regex 0.58.
# It counts the line ends it passes, which the handler's CRLF-to-LF copy then
# need not count again.
find_dot_or_bare_lf_counted = (
    speedups.find_dot_or_bare_lf_counted if speedups is not None else find_dot_or_bare_lf_counted_py
)


def judge_lines_py(buf: bytes | bytearray, start: int, end: int, width: int) -> tuple[int, bool]:
    """Where the line-length check of ``buf[start:end]`` stops, and whether it found a long line.

    Every line inside [start, last CRLF in a ``width``-byte window] is at most
    ``width`` bytes, so one ``rfind`` per window proves many lines at once
    (>= width/2 bytes a step, amortised). A window without CRLF starts a
    too-long line: ``(its start, True)``. Else ``(the start of the line after
    the last CRLF, False)``.
    """
    if not 0 <= start <= end <= len(buf) or width < 1:
        raise ValueError(
            "judge_lines: need 0 <= start <= end <= len(buf) and width >= 1, "
            f"got start={start} end={end} len={len(buf)} width={width}"
        )
    rfind = buf.rfind
    s = start
    while end - s >= width:
        i = rfind(b"\r\n", s, s + width)
        if i < 0:
            return s, True
        s = i + 2
    i = rfind(b"\r\n", s, end)
    return (i + 2 if i >= 0 else s), False


# One C call per read instead of a bytes.rfind call per 1001 bytes (about a
# thousand calls per MiB, each parsing its arguments).
judge_lines = speedups.judge_lines if speedups is not None else judge_lines_py


NO_BARE_LF = "delivery_executor_no_bare_lf"
"""The envelope attribute that holds ``original_content`` when the reader saw
no bare LF in it (:func:`has_no_bare_lf`)."""
LINE_ENDS = "delivery_executor_line_ends"
"""The envelope attribute that holds the number of CRLFs in ``original_content``
when the reader counted them (:func:`counted_line_ends`)."""
_MAX_DOTS = 256  # stuffed lines remembered by position; past that, one replace() at the end


class _Body:
    """The DATA bytes consumed so far, where the body ends, and aiosmtpd's verdict on them.

    ``buf`` holds the raw (still dot-stuffed) bytes after a ``\\r\\n`` that
    stands for the end of the DATA command, so that a first line ``.`` or
    ``.x`` is the same case as any other; ``verdict`` becomes a reply string
    once one is certain, and then ``buf`` keeps only the few bytes a
    terminator split across reads needs. ``scanned`` is the start of the
    first line not yet known to be at most ``line_max`` bytes long; every line
    before it is. ``pos`` is where the search for the next line that starts
    with a dot resumes; ``dots`` the offsets of the stuffing dots found (None
    once there are too many to keep: then the search is for the terminator
    only and unstuffing is one ``replace`` at the end). ``line_ends`` counts
    the LFs in ``buf[:pos]`` while the search stops at every LF, and once the
    body is whole, its line ends (every one a CRLF); None once the search no
    longer stops at every LF (a bare LF, too many dots, a verdict).
    """

    __slots__ = (
        "bare_lf",
        "buf",
        "done",
        "dots",
        "limit",
        "line_ends",
        "line_max",
        "made",
        "pos",
        "scanned",
        "verdict",
    )

    def __init__(self, limit: int | None, line_max: int) -> None:
        self.buf = bytearray(b"\r\n")
        self.limit = limit or 0  # aiosmtpd: a falsy limit means none
        self.line_max = line_max
        self.scanned = 2
        self.pos = 0
        self.dots: list[int] | None = []
        self.bare_lf: bool | None = False  # None: not looked for
        self.line_ends: int | None = 0
        self.done = False
        self.verdict: str | None = None
        self.made: bytes | None = None  # content(), once made (buf is then empty)

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        """Consume ``data`` up to and including the terminator; return the bytes consumed.

        That is ``len(data)`` until the terminator arrives (then ``done`` is
        set); the bytes after it are not the body's (pipelined commands).
        """
        buf = self.buf
        start = len(buf)
        buf += data
        i = self._find()
        if i < 0:
            # Judge once a whole window is unjudged: small reads skip the scan,
            # and the verdict comes at most line_max bytes late.
            if self.verdict is None and len(buf) - self.scanned >= self.line_max:
                self._scan()
            if self.verdict is not None:
                self._trim()
            return len(data)
        # "\r\n.\r\n" at i: the body's last line ends at i + 2. The ".\r\n" is
        # not a body line: judged, it would count 3 bytes towards the limit.
        self.done = True
        del buf[i + 2 :]
        if self.verdict is None:
            self._scan()
            assert self.verdict is not None or self.scanned == len(buf)
        return i + 5 - start

    def _find(self) -> int:
        """The terminator's offset in ``buf`` (``-1`` if not there yet); notes dots on the way.

        While no bare LF has been seen, one pass stops at every LF and
        returns those that start a line with a dot (a stuffed line or the
        terminator) or lack their CR (the first bare LF: then the search is for
        ``CRLF .`` only, with ``bytes.find``). Once there is a verdict or too
        many dots, only the terminator is looked for. The bytes just consumed
        may end in a partial match; ``pos`` then stays before it.
        """
        buf, pos, dots = self.buf, self.pos, self.dots
        if dots is None or self.verdict is not None:
            i = buf.find(_TERM, max(pos - 1, 0))
            if i < 0:
                self.pos = max(pos, len(buf) - 4)
            return i
        if self.bare_lf is False:
            find_dot = find_dot_or_bare_lf_counted
            ends = self.line_ends
            assert ends is not None
            while True:
                j, passed = find_dot(buf, pos)  # an LF, and the LFs in [pos, j)
                ends += passed
                if j < 0:
                    self.pos = max(pos, len(buf) - 1)  # an LF at the end may start ".": look again
                    if len(buf) - 1 >= pos and buf[-1] == 10:
                        ends -= 1  # counted again then
                    self.line_ends = ends
                    return -1
                if buf[j - 1] != 13:  # a bare LF: the first is all the handler needs to know
                    self.bare_lf = True
                    self.line_ends = None
                    self.pos = j + 1
                    return self._find()
                if len(buf) < j + 4:  # too soon to tell a stuffed line from the end
                    self.pos = j
                    self.line_ends = ends
                    return -1
                if buf[j + 2] == 13 and buf[j + 3] == 10:
                    # The body's line ends: the LFs before this one but the first
                    # (buf's leading CRLF), and this one.
                    self.line_ends = ends
                    return j - 1
                pos = j + 2
                ends += 1
                if not self._note_dot(j + 1):
                    self.pos = pos
                    return self._find()
        find = buf.find
        while True:
            i = find(b"\r\n.", pos)
            if i < 0:
                self.pos = max(pos, len(buf) - 2)
                return -1
            if len(buf) < i + 5:
                self.pos = i
                return -1
            if buf[i + 3] == 13 and buf[i + 4] == 10:
                return i
            pos = i + 3
            if not self._note_dot(i + 2):
                self.pos = pos
                return self._find()

    def _note_dot(self, at: int) -> bool:
        """Note a stuffing dot at ``at``; False once there are too many to note."""
        dots = self.dots
        assert dots is not None
        dots.append(at)
        if len(dots) <= _MAX_DOTS:
            return True
        self.dots = None
        self.line_ends = None
        if self.bare_lf is False:
            self.bare_lf = None  # no longer looked for
        return False

    def convertible(self) -> bool:
        """Whether ``buf`` still holds a body :meth:`lf_content` can convert: no bare LF,
        the dots noted, the line ends counted, and not yet given to :meth:`content`."""
        return (
            self.bare_lf is False
            and self.dots is not None
            and self.line_ends is not None
            and self.made is None
        )

    def raw_size(self) -> int:
        """The unstuffed body's length, without making it (when :meth:`convertible`)."""
        assert self.dots is not None
        return len(self.buf) - 2 - len(self.dots)

    def lf_content(self) -> tuple[bytes, int] | None:
        """``(the unstuffed body with CRLF turned into LF, its W - S)`` in one C copy from
        ``buf``, which stays as it is (when :meth:`convertible`); None without the C helpers."""
        if speedups is None:
            return None
        assert self.dots is not None and self.line_ends is not None
        return speedups.unstuff_to_lf(self.buf, 2, self.dots, self.line_ends)

    def made_content(self) -> bytes:
        """:meth:`content`, made once, then the same ``bytes`` again (for a held body: an
        envelope and its ``copy.copy`` share it)."""
        if self.made is None:
            self.made = self.content()
        return self.made

    def content(self) -> bytes:
        """The unstuffed body (call once, after the terminator, when there is no verdict)."""
        buf, self.buf = self.buf, bytearray()
        dots = self.dots
        if dots is None:
            del buf[:2]  # O(1): a bytearray drops leading bytes by moving its start
            if buf.startswith(b"."):
                del buf[0]
            data = bytes(buf)
            del buf  # free the raw buffer before replace() makes its copy
            # No line is "." (that would have ended the body), so the matches
            # never overlap.
            return data.replace(b"\r\n.", b"\r\n")
        with memoryview(buf) as view:
            if not dots:
                return bytes(view[2:])
            pieces = []
            at = 2
            for dot in dots:
                pieces.append(view[at:dot])
                at = dot + 1
            pieces.append(view[at:])
            data = b"".join(pieces)
            del pieces
            return data

    def _decide(self, verdict: str) -> None:
        self.verdict = verdict
        self.line_ends = None
        self._trim()  # discard at once, as aiosmtpd does

    def _trim(self) -> None:
        """Keep only what the terminator search still needs (at most 4 bytes)."""
        buf = self.buf
        keep = max(0, min(self.pos, len(buf) - 4))
        self.buf = buf[keep:]
        self.pos -= keep
        self.scanned = 0

    def _scan(self) -> None:
        buf, end = self.buf, len(self.buf)
        s, too_long = judge_lines(buf, self.scanned, end, self.line_max)
        self.scanned = s
        w = self.line_max
        limit = self.limit
        # Offsets in buf are 2 past the body's: its first 2 bytes stand for DATA's CRLF.
        if limit and s - 2 > max(limit, 0):
            # The first line ending past the limit is before s, so it is short.
            # (max: with a negative limit aiosmtpd still needs a line to count.)
            self._decide(_TOO_MUCH)
        elif too_long:
            # The line at s is > w bytes. With w + 1 or w + 2 bytes aiosmtpd's
            # readuntil returns it whole and counts it before checking it; any
            # longer and its first fragment overruns: too long, not counted.
            j = buf.find(b"\r\n", s + w - 1, s + w + 2)
            if j >= 0:
                self._decide(_TOO_MUCH if limit and j > limit else _TOO_LONG)
            elif end >= s + w + 2:
                self._decide(_TOO_LONG)
            # else: too few bytes yet to know which; at most w + 1 past s.


def _vouch(envelope: object, content: bytes, line_ends: int | None) -> None:
    """Mark ``content`` as the reader's body with no bare LF (and its CRLF count, if
    known), for :func:`has_no_bare_lf` and :func:`counted_line_ends`."""
    setattr(envelope, NO_BARE_LF, content)
    if line_ends is not None:
        setattr(envelope, LINE_ENDS, line_ends)


_MAKING = threading.Lock()


class BulkEnvelope(Envelope):
    """aiosmtpd's ``Envelope``, whose body the bulk reader may hand over unmade.

    ``content`` and ``original_content`` read and write as aiosmtpd's
    attributes. After a DATA whose body the reader vouched for (no bare LF, at
    most 256 stuffed lines, the C helpers built, no ``decode_data``) they are
    made from the reader's raw buffer only when first read, so a handler that
    takes the body through :func:`lf_body` instead (``DeliveryHandler`` storing
    LF line ends) never makes the CRLF copy: at 1 MiB one copy of the body
    fewer before the write. Until then the raw buffer (the body as received,
    dots and all, with its growth slack) is kept: a handler that keeps
    envelopes unread keeps that, a little more than the body. ``vars()`` shows
    ``_raw``, ``_content`` and ``_original``, not the two public names. The
    body is made once (under a lock) and shared by a ``copy.copy`` of the
    envelope.
    """

    def __init__(self) -> None:
        self._raw: _Body | None = None
        self._original: bytes | None = None
        self._content: bytes | str | None = None
        super().__init__()

    def hold(self, body: _Body) -> None:
        """Keep ``body`` (whole, no verdict) to make the content from when it is asked for."""
        self._raw = body

    def _made(self) -> None:
        if self._raw is None:
            return
        with _MAKING:  # a handler's threads, or a copy.copy sharing raw: made once
            raw = self._raw
            if raw is None:
                return
            data = raw.made_content()  # the same bytes for every envelope sharing raw
            self._original = self._content = data
            _vouch(self, data, raw.line_ends)
            self._raw = None  # last: a concurrent reader sees the held body or the made one

    @property
    def original_content(self) -> bytes | None:
        self._made()
        return self._original

    @original_content.setter
    def original_content(self, value: bytes | None) -> None:
        self._made()
        self._original = value

    @property
    def content(self) -> bytes | str | None:
        self._made()
        return self._content

    @content.setter
    def content(self, value: bytes | str | None) -> None:
        self._made()
        self._content = value


def _held(envelope: object) -> _Body | None:
    raw = envelope._raw if isinstance(envelope, BulkEnvelope) else None
    return raw if raw is not None and raw.convertible() else None


def raw_body_size(envelope: object) -> int:
    """The length of the body a :class:`BulkEnvelope` holds unmade, else -1 (no pass over it)."""
    raw = _held(envelope)
    return -1 if raw is None else raw.raw_size()


def lf_body(envelope: object) -> tuple[bytes, int] | None:
    """``(body with LF line ends, W - S)`` straight from a :class:`BulkEnvelope`'s unmade
    body (one C pass, no CRLF copy), else None: then read ``original_content``."""
    raw = _held(envelope)
    return None if raw is None else raw.lf_content()


def counted_line_ends(envelope: object, content: bytes) -> int:
    """The CRLFs in ``content`` if our reader read it as this envelope's body and counted them,
    else -1 (a bare LF in it, too many stuffed lines, a handler that replaced it)."""
    if not has_no_bare_lf(envelope, content):
        return -1
    ends = getattr(envelope, LINE_ENDS, -1)
    return ends if isinstance(ends, int) else -1


def has_no_bare_lf(envelope: object, content: bytes) -> bool:
    """True if our reader read ``content`` as this envelope's body and saw no bare LF in it.

    Then every LF of ``content`` ends a CRLF: its line ends are counted by
    lengths alone (``,W=``), without a pass over it. False for any other
    content (a handler that replaced it, aiosmtpd's reader).
    """
    return getattr(envelope, NO_BARE_LF, None) is content


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

        env = self.envelope
        convertible = speedups is not None and body.convertible()
        if not self._decode_data and isinstance(env, BulkEnvelope) and convertible:
            env.hold(body)  # made on first read; our handler converts straight from it
            return await self._handle_data()
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
        if body.bare_lf is False:
            _vouch(self.envelope, original_content, body.line_ends)
        await self._handle_data()

    async def _handle_data(self) -> None:
        """The handler's DATA hook (or aiosmtpd's fallback), the new state, the reply."""
        status: Any
        if "DATA" in self._handle_hooks:
            status = await self._call_handler_hook("DATA")
        else:
            status = await self._process_message_compat()
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

    def _create_envelope(self) -> Envelope:
        return BulkEnvelope()

    async def _read_data_body(self, body: _Body) -> None:
        """Consume the stream up to and including the terminator, feeding ``body``.

        First what aiosmtpd's StreamReader already holds (read along with the
        DATA command, or while it ran), then, straight from the transport,
        every read that arrives (:meth:`data_received`) until the terminator:
        the reader sees none of the body, and gets back what follows it.
        """
        reader = self._reader
        pending: bytearray = reader._buffer  # type: ignore[attr-defined]
        if pending:
            with memoryview(pending) as view:
                n = body.feed(view)
            del pending[:n]
            # The reader may have paused the transport when its buffer filled.
            reader._maybe_resume_transport()  # type: ignore[attr-defined]
            if body.done:
                return
        self._data_done = done = self.loop.create_future()
        self._data_body = body
        try:
            await done
        finally:
            self._data_body = None
            self._data_done = None

    _data_body: _Body | None = None
    _data_done: asyncio.Future[None] | None = None

    def data_received(self, data: bytes) -> None:
        """A transport read: the DATA body's while one is being read, else the reader's."""
        body = self._data_body
        if body is None:
            super().data_received(data)
            return
        n = body.feed(data)
        if body.done:
            self._data_body = None
            done = self._data_done
            if done is not None and not done.done():
                done.set_result(None)
            if n < len(data):
                super().data_received(data[n:])  # pipelined commands: the reader's

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
