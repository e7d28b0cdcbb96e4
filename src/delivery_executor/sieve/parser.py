"""Sieve syntax (RFC 5228 section 8): a lexer and a recursive-descent parser.

The result is a generic, immutable tree (:class:`Command`, :class:`Test`,
arguments) with the line and column of every node; :mod:`.compiler` checks
its meaning. Cost: linear in the script's size; nesting is bounded
(``max_nesting``) so a hostile script cannot exhaust the Python stack.
Failure: :class:`~delivery_executor.errors.SieveCompileError` naming the line
and column.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import SieveCompileError

__all__ = ["Command", "Number", "StringList", "Tag", "Test", "parse"]


@dataclass(frozen=True, slots=True)
class Tag:
    """A tagged argument such as ``:contains`` (name without the colon, lower case)."""

    name: str
    line: int
    col: int


@dataclass(frozen=True, slots=True)
class Number:
    """A number argument, its K/M/G quantifier applied."""

    value: int
    line: int
    col: int


@dataclass(frozen=True, slots=True)
class StringList:
    """A string or a ``[..]`` string list, escapes and dot-stuffing undone."""

    values: tuple[str, ...]
    line: int
    col: int
    single: bool  # written as one string, not as a bracketed list


Argument = Tag | Number | StringList


@dataclass(frozen=True, slots=True)
class Test:
    """A test: identifier, arguments and nested tests (``allof (..)``)."""

    name: str
    args: tuple[Argument, ...]
    tests: tuple[Test, ...]
    line: int
    col: int


@dataclass(frozen=True, slots=True)
class Command:
    """A command: identifier, arguments, tests and an optional block."""

    name: str
    args: tuple[Argument, ...]
    tests: tuple[Test, ...]
    block: tuple[Command, ...] | None
    line: int
    col: int


_TOKEN = re.compile(
    r"""
    (?P<ws>[ \t\r\n]+)
  | (?P<hash>\#[^\n]*)
  | (?P<bracket>/\*)
  | (?P<text>text:[ \t]*(?:\#[^\n]*)?\r?\n)
  | (?P<tag>:[A-Za-z_][A-Za-z0-9_]*)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<num>[0-9]+[KkMmGg]?)
  | (?P<quote>")
  | (?P<punct>[\[\](){},;])
    """,
    re.VERBOSE,
)
_QUANT = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_MAX_NUMBER = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class _Tok:
    kind: str  # tag ident num str punct eof
    value: str
    line: int
    col: int


class _Lexer:
    def __init__(self, src: str) -> None:
        self.src = src

    def tokens(self) -> list[_Tok]:
        src = self.src
        out: list[_Tok] = []
        n = len(src)
        # Line/column are tracked incrementally: one pass over the script.
        line, line_start = 1, 0
        pos = 0
        while pos < n:
            m = _TOKEN.match(src, pos)
            if m is None:
                raise SieveCompileError(
                    f"unexpected character {src[pos]!r}", line, pos - line_start + 1
                )
            kind = m.lastgroup
            assert kind is not None
            col = pos - line_start + 1
            tok_line = line
            end = m.end()
            if kind == "bracket":
                close = src.find("*/", end)
                if close < 0:
                    raise SieveCompileError("unterminated /* comment", line, col)
                end = close + 2
            elif kind == "quote":
                value, end = self._quoted(end, line, col)
                out.append(_Tok("str", value, tok_line, col))
            elif kind == "text":
                value, end = self._multiline(end, line, col)
                out.append(_Tok("str", value, tok_line, col))
            elif kind == "tag":
                out.append(_Tok("tag", m.group()[1:].lower(), tok_line, col))
            elif kind == "ident":
                out.append(_Tok("ident", m.group().lower(), tok_line, col))
            elif kind == "num":
                out.append(_Tok("num", m.group(), tok_line, col))
            elif kind == "punct":
                out.append(_Tok("punct", m.group(), tok_line, col))
            nl = src.count("\n", pos, end)
            if nl:
                line += nl
                line_start = src.rfind("\n", pos, end) + 1
            pos = end
        out.append(_Tok("eof", "", line, pos - line_start + 1))
        return out

    def _quoted(self, start: int, line: int, col: int) -> tuple[str, int]:
        src = self.src
        parts: list[str] = []
        i = start
        while True:
            j = src.find('"', i)
            if j < 0:
                raise SieveCompileError("unterminated string", line, col)
            # Count the backslashes right before the quote: odd means escaped.
            k = j
            while k > i and src[k - 1] == "\\":
                k -= 1
            if (j - k) % 2 == 0:
                parts.append(src[i:j])
                end = j + 1
                break
            parts.append(src[i : j + 1])
            i = j + 1
        raw = "".join(parts)
        if "\\" in raw:
            # RFC 5228 2.4.2: "\" followed by any character is that character.
            raw = re.sub(r"\\(.)", r"\1", raw, flags=re.DOTALL)
        # RFC 5228 2.4.2: a bare CR or LF in a quoted string is the line break CRLF.
        return _crlf(raw), end

    def _multiline(self, start: int, line: int, col: int) -> tuple[str, int]:
        src = self.src
        m = re.compile(r"^\.\r?\n", re.MULTILINE).search(src, start)
        if m is None:
            raise SieveCompileError(
                "unterminated text: block (no line with a single '.')", line, col
            )
        body = src[start : m.start()]
        lines = body.split("\n")
        # The last element is the empty text after the final newline.
        text = "\n".join(ln[1:] if ln.startswith("..") else ln for ln in lines)
        return _crlf(text), m.end()


def _crlf(s: str) -> str:
    if "\n" not in s and "\r" not in s:
        return s
    return re.sub(r"\r\n|\r|\n", "\r\n", s)


class _Parser:
    def __init__(self, toks: list[_Tok], max_nesting: int) -> None:
        self.toks = toks
        self.i = 0
        self.max_nesting = max_nesting

    def _peek(self) -> _Tok:
        return self.toks[self.i]

    def _next(self) -> _Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    @staticmethod
    def _err(t: _Tok, msg: str) -> SieveCompileError:
        found = "end of script" if t.kind == "eof" else repr(t.value)
        return SieveCompileError(f"{msg}, found {found}", t.line, t.col)

    def _punct(self, t: _Tok, value: str) -> bool:
        return t.kind == "punct" and t.value == value

    def commands(self, depth: int, closing: str | None) -> tuple[Command, ...]:
        out: list[Command] = []
        while True:
            t = self._peek()
            if closing is None and t.kind == "eof":
                return tuple(out)
            if closing is not None and self._punct(t, closing):
                self._next()
                return tuple(out)
            out.append(self.command(depth))

    def command(self, depth: int) -> Command:
        t = self._next()
        if t.kind != "ident":
            raise self._err(t, "expected a command name")
        args, tests = self.arguments(depth)
        t2 = self._next()
        block: tuple[Command, ...] | None = None
        if self._punct(t2, "{"):
            if depth + 1 > self.max_nesting:
                raise SieveCompileError(
                    f"blocks nested deeper than {self.max_nesting}", t2.line, t2.col
                )
            block = self.commands(depth + 1, "}")
        elif not self._punct(t2, ";"):
            raise self._err(t2, f"expected ';' or '{{' after {t.value!r}")
        return Command(t.value, args, tests, block, t.line, t.col)

    def arguments(self, depth: int) -> tuple[tuple[Argument, ...], tuple[Test, ...]]:
        args: list[Argument] = []
        while True:
            t = self._peek()
            if t.kind == "tag":
                self._next()
                args.append(Tag(t.value, t.line, t.col))
            elif t.kind == "num":
                self._next()
                args.append(Number(_number(t), t.line, t.col))
            elif t.kind == "str":
                self._next()
                args.append(StringList((t.value,), t.line, t.col, True))
            elif self._punct(t, "["):
                self._next()
                args.append(self.string_list(t))
            else:
                break
        t = self._peek()
        if t.kind == "ident":
            return tuple(args), (self.test(depth + 1),)
        if self._punct(t, "("):
            self._next()
            return tuple(args), self.test_list(depth + 1, t)
        return tuple(args), ()

    def string_list(self, opening: _Tok) -> StringList:
        values: list[str] = []
        while True:
            t = self._next()
            if t.kind != "str":
                raise self._err(t, "expected a string in the string list")
            values.append(t.value)
            t = self._next()
            if self._punct(t, "]"):
                return StringList(tuple(values), opening.line, opening.col, False)
            if not self._punct(t, ","):
                raise self._err(t, "expected ',' or ']' in the string list")

    def test(self, depth: int) -> Test:
        t = self._next()
        if t.kind != "ident":
            raise self._err(t, "expected a test name")
        if depth > self.max_nesting:
            raise SieveCompileError(f"tests nested deeper than {self.max_nesting}", t.line, t.col)
        args, tests = self.arguments(depth)
        return Test(t.value, args, tests, t.line, t.col)

    def test_list(self, depth: int, opening: _Tok) -> tuple[Test, ...]:
        tests: list[Test] = []
        while True:
            tests.append(self.test(depth))
            t = self._next()
            if self._punct(t, ")"):
                return tuple(tests)
            if not self._punct(t, ","):
                raise self._err(t, "expected ',' or ')' in the test list")


def _number(t: _Tok) -> int:
    s = t.value
    mult = _QUANT.get(s[-1].lower(), 1)
    digits = s[:-1] if mult != 1 else s
    value = int(digits) * mult
    if value > _MAX_NUMBER:
        raise SieveCompileError(f"number {s} is too large", t.line, t.col)
    return value


def parse(source: str, *, max_nesting: int = 32) -> tuple[Command, ...]:
    """The commands of ``source`` (a whole script).

    Raises :class:`SieveCompileError` (with ``line`` and ``col``) on a syntax
    error or when blocks or tests nest deeper than ``max_nesting``.
    """
    toks = _Lexer(source).tokens()
    return _Parser(toks, max_nesting).commands(0, None)
