"""RFC 3461 DSN parameters on MAIL and RCPT: syntax checks and xtext decoding.

aiosmtpd answers ``555`` to every MAIL/RCPT parameter it does not know, and
upper-cases the rest, which would lose the case of an ``ORCPT`` address. The
protocol classes take the DSN parameters out of the command line first
(:func:`take_params`), check them here, and hand them to the handler with
their case intact, appended to ``mail_options`` / ``rcpt_options``.

Checks (a failure is ``501 5.5.4`` with the reason, never ``555``):

- ``RET=FULL|HDRS`` and ``ENVID=<xtext>`` (at most 100 characters) on MAIL;
- ``NOTIFY=NEVER`` or a list of ``SUCCESS``, ``FAILURE``, ``DELAY``, and
  ``ORCPT=<addr-type>;<xtext>`` (at most 500 characters) on RCPT;
- each at most once per command.

xtext (RFC 3461 4): printable ASCII except ``+`` and ``=``, and ``+XX`` for
any other byte. An ``ORCPT`` of type ``utf-8`` (RFC 6533) may also carry
``\\x{HEX}`` escapes and, under SMTPUTF8, raw UTF-8.
"""

from __future__ import annotations

import re

__all__ = [
    "MAIL_PARAMS",
    "RCPT_PARAMS",
    "DsnSyntaxError",
    "original_recipient",
    "take_params",
    "xtext_decode",
]

MAIL_PARAMS = frozenset({"RET", "ENVID"})
RCPT_PARAMS = frozenset({"NOTIFY", "ORCPT"})
_NOTIFY = frozenset({"SUCCESS", "FAILURE", "DELAY"})
_MAX_ORCPT = 500  # RFC 3461 4.2
_MAX_ENVID = 100  # RFC 3461 4.4
_ADDR_TYPE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-Fa-f]{2})*")
_HEX = re.compile(rb"\+([0-9A-Fa-f]{2})")
_UNI = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")


class DsnSyntaxError(ValueError):
    """A malformed DSN parameter; ``str()`` says which and why (for a ``501`` reply)."""


def xtext_decode(text: str) -> bytes:
    """The bytes that the xtext ``text`` encodes; :class:`DsnSyntaxError` if it is not xtext."""
    if not _XTEXT.fullmatch(text):
        raise DsnSyntaxError("malformed xtext")
    return _unhex(text.encode("ascii"))


def _unhex(raw: bytes) -> bytes:
    return _HEX.sub(lambda m: bytes.fromhex(m.group(1).decode("ascii")), raw)


def _check(key: str, value: str, utf8: bool) -> None:
    if key == "RET":
        if value.upper() not in ("FULL", "HDRS"):
            raise DsnSyntaxError("RET must be FULL or HDRS")
    elif key == "ENVID":
        if len(value) > _MAX_ENVID:
            raise DsnSyntaxError(f"ENVID longer than {_MAX_ENVID} characters")
        xtext_decode(value)
    elif key == "NOTIFY":
        words = value.upper().split(",")
        if words != ["NEVER"] and not all(w in _NOTIFY for w in words):
            raise DsnSyntaxError("NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY")
    else:  # ORCPT
        if len(value) > _MAX_ORCPT:
            raise DsnSyntaxError(f"ORCPT longer than {_MAX_ORCPT} characters")
        original_recipient(value, utf8=utf8)


def original_recipient(value: str, *, utf8: bool = False) -> str:
    """The address in an ``ORCPT`` value (``rfc822;alias+40x@example.org`` → ``alias@x...``).

    ``value`` is ``addr-type;xtext``. The decoded bytes must be UTF-8 without
    control characters; raise :class:`DsnSyntaxError` otherwise.
    """
    addr_type, sep, text = value.partition(";")
    if not sep or not _ADDR_TYPE.fullmatch(addr_type) or not text:
        raise DsnSyntaxError("ORCPT must be addr-type;address")
    if addr_type.lower() == "utf-8":
        if not text.isascii() and not utf8:
            raise DsnSyntaxError("raw UTF-8 in ORCPT needs SMTPUTF8")
        # utf-8-addr-unitext: xtext-like, with \\x{HEX} escapes and raw UTF-8.
        xtext_decode("".join(c if c.isascii() else "!" for c in text))
        try:
            raw = _unhex(text.encode("utf-8")).decode("utf-8")
            address = _UNI.sub(lambda m: chr(int(m.group(1), 16)), raw)
        except (UnicodeDecodeError, ValueError, OverflowError):
            raise DsnSyntaxError("bad UTF-8 or \\x{...} escape in ORCPT") from None
    else:
        try:
            address = xtext_decode(text).decode("utf-8")
        except UnicodeDecodeError:
            raise DsnSyntaxError("ORCPT address is not UTF-8") from None
    if not address or not address.isprintable():
        raise DsnSyntaxError("ORCPT address is empty or holds control characters")
    return address


def take_params(params: str, known: frozenset[str], *, utf8: bool) -> tuple[str, list[str]]:
    """Split ``params`` (what follows the path) into the others and the DSN ones.

    Returns ``(rest, dsn)``: ``rest`` keeps every other parameter in order for
    aiosmtpd (which answers ``555`` to unknown ones), ``dsn`` the ``known``
    parameters as sent (keyword upper-cased, value untouched). Raises
    :class:`DsnSyntaxError` for a malformed or repeated DSN parameter.
    """
    rest: list[str] = []
    dsn: list[str] = []
    seen: set[str] = set()
    for token in params.split():
        key, eq, value = token.partition("=")
        key = key.upper()
        if key not in known:
            rest.append(token)
            continue
        if not eq or not value:
            raise DsnSyntaxError(f"{key} needs a value")
        if key in seen:
            raise DsnSyntaxError(f"{key} given twice")
        seen.add(key)
        _check(key, value, utf8)
        dsn.append(f"{key}={value}")
    return " ".join(rest), dsn
