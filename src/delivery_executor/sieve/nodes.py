"""The compiled form of a Sieve script: immutable, typed nodes.

Strings stay as written (variables are expanded when the script runs, and only
when the script requires ``variables``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "AddressTest",
    "AllOf",
    "AnyOf",
    "Block",
    "Const",
    "Discard",
    "EnvelopeTest",
    "ExistsTest",
    "FileInto",
    "FlagAction",
    "HasFlagTest",
    "HeaderTest",
    "If",
    "Keep",
    "MailboxExistsTest",
    "Match",
    "Node",
    "Not",
    "NotPerformed",
    "SetVar",
    "SizeTest",
    "Stop",
    "StringTest",
    "TestNode",
]


@dataclass(frozen=True, slots=True)
class Match:
    """How keys are compared: ``kind`` is ``is``, ``contains`` or ``matches``."""

    kind: str
    comparator: str  # "i;ascii-casemap" or "i;octet"
    keys: tuple[str, ...]
    folded: tuple[str, ...] = ()  # keys under i;ascii-casemap folding, made once


@dataclass(frozen=True, slots=True)
class HeaderTest:
    """``header``: any value of any named header matches any key."""

    names: tuple[str, ...]
    match: Match


@dataclass(frozen=True, slots=True)
class AddressTest:
    """``address``: addresses in the named headers; ``part`` is all/localpart/domain/user/detail."""

    part: str
    names: tuple[str, ...]
    match: Match


@dataclass(frozen=True, slots=True)
class EnvelopeTest:
    """``envelope``: the SMTP ``from`` / ``to`` addresses."""

    part: str
    names: tuple[str, ...]
    match: Match


@dataclass(frozen=True, slots=True)
class ExistsTest:
    """``exists``: every named header is present."""

    names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SizeTest:
    """``size :over N`` / ``size :under N`` (bytes of the message)."""

    over: bool
    limit: int


@dataclass(frozen=True, slots=True)
class AllOf:
    """``allof (..)``: every test is true (evaluated left to right, short-circuit)."""

    tests: tuple[TestNode, ...]


@dataclass(frozen=True, slots=True)
class AnyOf:
    """``anyof (..)``: some test is true (short-circuit)."""

    tests: tuple[TestNode, ...]


@dataclass(frozen=True, slots=True)
class Not:
    """``not TEST``."""

    test: TestNode


@dataclass(frozen=True, slots=True)
class Const:
    """``true`` / ``false``."""

    value: bool


@dataclass(frozen=True, slots=True)
class HasFlagTest:
    """``hasflag`` (RFC 5232): the internal flags, or the named variables', match."""

    variables: tuple[str, ...] | None
    match: Match


@dataclass(frozen=True, slots=True)
class MailboxExistsTest:
    """``mailboxexists`` (RFC 5490): every named mailbox exists."""

    names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class StringTest:
    """``string`` (RFC 5229): any source string matches any key."""

    sources: tuple[str, ...]
    match: Match


TestNode = (
    HeaderTest
    | AddressTest
    | EnvelopeTest
    | ExistsTest
    | SizeTest
    | AllOf
    | AnyOf
    | Not
    | Const
    | HasFlagTest
    | MailboxExistsTest
    | StringTest
)


@dataclass(frozen=True, slots=True)
class If:
    """``if`` / ``elsif`` branches in order, then the optional ``else`` block."""

    branches: tuple[tuple[TestNode, Block], ...]
    orelse: Block | None


@dataclass(frozen=True, slots=True)
class Stop:
    """``stop``."""


@dataclass(frozen=True, slots=True)
class Keep:
    """``keep [:flags ..]``."""

    flags: tuple[str, ...] | None


@dataclass(frozen=True, slots=True)
class Discard:
    """``discard``."""


@dataclass(frozen=True, slots=True)
class FileInto:
    """``fileinto [:copy] [:create] [:flags ..] MAILBOX``."""

    mailbox: str
    copy: bool
    create: bool
    flags: tuple[str, ...] | None


@dataclass(frozen=True, slots=True)
class FlagAction:
    """``setflag`` / ``addflag`` / ``removeflag`` on the internal flags or a variable."""

    op: str
    variable: str | None
    flags: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SetVar:
    """``set [modifiers] NAME VALUE`` (RFC 5229); modifiers in application order."""

    name: str
    value: str
    modifiers: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class NotPerformed:
    """``redirect``, ``reject``, ``vacation``: parsed, logged, not performed."""

    command: str
    line: int
    cancels_keep: bool  # what Pigeonhole would do; we keep the message either way


Node = If | Stop | Keep | Discard | FileInto | FlagAction | SetVar | NotPerformed
Block = tuple[Node, ...]
