"""What a Sieve script sees of a message: headers, size and envelope.

Only the header section is parsed (the body is never walked, apart from its
size). Header values are unfolded; :meth:`MessageView.header_values` decodes
RFC 2047 encoded words with the stdlib ``email.header``, as RFC 5228 section
2.7.2 asks. Undecodable text is replaced, never raised.
"""

from __future__ import annotations

import email.errors
import email.header
import email.utils
import re
from dataclasses import dataclass

__all__ = ["Envelope", "MessageView"]

_FOLD = re.compile(r"\r?\n(?=[ \t])")
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_FIELD = re.compile(r"^([!-9;-~]+):[ \t]*(.*?)[ \t\r]*$", re.MULTILINE)
# "local@domain" or "Display Name <local@domain>" with nothing unusual in it:
# no quotes, comments, groups, lists or encoded words.
_SIMPLE_ADDRESS = re.compile(
    r"([A-Za-z0-9.!#$%&\'*+/=?^_`{|}~-]+@[A-Za-z0-9.-]+)\Z"
    r"|[A-Za-z0-9 .\'_-]*<([A-Za-z0-9.!#$%&\'*+/=?^_`{|}~-]+@[A-Za-z0-9.-]+)>\Z"
)


@dataclass(frozen=True, slots=True)
class Envelope:
    """The SMTP envelope of one delivery: MAIL FROM ("" for ``<>``) and this RCPT TO."""

    sender: str
    recipient: str


class MessageView:
    """A message's header section, parsed on first use, plus its size; one per message.

    ``size`` is what RFC 5228 ``size`` compares: the octets of the message as
    handed over (CRLF line ends when it comes from SMTP), as Pigeonhole counts.
    Build it with :meth:`parse`; the header section is parsed (once) only
    when a test reads a header, and decoded values and addresses are cached,
    so one view serves every recipient's scripts. Not for sharing between
    threads while in use.
    """

    __slots__ = ("_addresses", "_decoded", "_headers", "_raw", "size")

    def __init__(self, headers: dict[str, list[str]] | None, size: int, raw: bytes = b"") -> None:
        self._headers = headers
        self._raw = raw
        self.size = size
        self._decoded: dict[str, list[str]] = {}
        self._addresses: dict[str, list[tuple[str, bool]]] = {}

    @classmethod
    def parse(cls, raw: bytes) -> MessageView:
        """The view of ``raw`` (CRLF or LF line ends); the headers are parsed lazily.

        Cost here: nothing but the size; on first header access, one pass over
        the header section (the body is never walked).
        """
        return cls(None, len(raw), raw)

    @property
    def headers(self) -> dict[str, list[str]]:
        """Lower-case name -> unfolded raw values, in order."""
        got = self._headers
        if got is None:
            got = self._headers = _parse_headers(self._raw)
            self._raw = b""
        return got

    def raw_values(self, name: str) -> list[str]:
        """Every value of header ``name`` (case-insensitive), in order, undecoded."""
        headers = self._headers
        return (self.headers if headers is None else headers).get(name.lower(), [])

    def header_values(self, name: str) -> list[str]:
        """Every value of ``name``, encoded words decoded (cached per name)."""
        key = name.lower()
        got = self._decoded.get(key)
        if got is None:
            headers = self._headers
            raw = (self.headers if headers is None else headers).get(key)
            if not raw:  # the common miss (a header the message lacks): nothing to cache
                return []
            got = [_decode(v) for v in raw]
            self._decoded[key] = got
        return got

    def addresses(self, name: str) -> list[tuple[str, bool]]:
        """The addresses in header ``name`` as ``(text, valid)``; groups flattened.

        A valid address is ``local@domain``. A value that holds no valid
        address, or an entry without a domain, comes back whole with
        ``valid=False``: only ``:all`` may match it (RFC 5228 2.7.4), which is
        what Pigeonhole does with ``undisclosed-recipients:;`` or ``no-domain``.
        """
        key = name.lower()
        cached = self._addresses.get(key)
        if cached is not None:
            return cached
        out: list[tuple[str, bool]] = []
        self._addresses[key] = out
        for raw in self.raw_values(key):
            simple = _SIMPLE_ADDRESS.match(raw)
            if simple:  # the common case, without the stdlib parser's cost
                addr = simple.group(1) or simple.group(2)
                out.append((addr, True))
                continue
            got = [a for _, a in email.utils.getaddresses([raw]) if a]
            if not got:
                out.append((raw, False))
                continue
            for addr in got:
                local, at, domain = addr.rpartition("@")
                out.append((addr, bool(at and local and domain)))
        return out


def _parse_headers(raw: bytes) -> dict[str, list[str]]:
    m = _HEADER_END.search(raw)
    head = raw[: m.start()] if m else raw
    if raw.startswith((b"\n", b"\r\n")):
        head = b""
    text = _FOLD.sub("", head.decode("utf-8", "replace"))
    headers: dict[str, list[str]] = {}
    # A field name is printable ASCII but ':' (RFC 5322 2.2); other lines are skipped.
    for name, value in _FIELD.findall(text):
        headers.setdefault(name.lower(), []).append(value)
    return headers


def _decode(value: str) -> str:
    if "=?" not in value:
        return value
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except (LookupError, ValueError, email.errors.HeaderParseError):
        return value
