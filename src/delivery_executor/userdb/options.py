"""Value parsers of ``serve``'s user database and quota options (the flags are
declared on :class:`delivery_executor.server.config.ServerConfig`)."""

from __future__ import annotations

import argparse

from .. import validate

__all__ = ["fraction", "non_negative_float", "quota_rule"]


def non_negative_float(text: str) -> float:
    """A number >= 0 (``--userdb-cache-ttl``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    try:
        return validate.seconds("value", value, infinite=True)  # inf: no limit, as before
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {text!r}") from None


def fraction(text: str) -> float:
    """``0.1`` or ``10%`` (``--quota-grace``)."""
    value = text.strip()
    number = non_negative_float(value[:-1] if value.endswith("%") else value)
    return number / 100 if value.endswith("%") else number


def quota_rule(text: str) -> str:
    """A Dovecot quota rule, checked (``--quota-rule``)."""
    from ..quota import parse_quota_rule

    try:
        parse_quota_rule(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text
