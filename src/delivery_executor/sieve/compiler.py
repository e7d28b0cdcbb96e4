"""From the syntax tree to typed nodes: the meaning checks of a Sieve script.

Checks what RFC 5228 and the extensions ask at compile time: ``require``
first and only for supported extensions, every command and tag known and
required, argument counts and kinds, comparators, variable names. Cost: one
walk of the tree. Failure: :class:`~delivery_executor.errors.SieveCompileError`
with line and column.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import SieveCompileError
from . import nodes as n
from .limits import Limits
from .match import casemap
from .parser import Argument, Command, Number, StringList, Tag, Test, parse

__all__ = ["SUPPORTED_EXTENSIONS", "Script", "compile_script"]

SUPPORTED_EXTENSIONS = frozenset(
    {
        "fileinto",
        "envelope",
        "imap4flags",
        "mailbox",
        "subaddress",
        "copy",
        "variables",
        "reject",
        "vacation",
        "comparator-i;octet",
        "comparator-i;ascii-casemap",
    }
)
_COMPARATORS = frozenset({"i;octet", "i;ascii-casemap"})
_MATCH_TAGS = frozenset({"is", "contains", "matches"})
_PART_TAGS = {
    "all": None,
    "localpart": None,
    "domain": None,
    "user": "subaddress",
    "detail": "subaddress",
}
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_MODIFIER_RANK = {
    "lower": 40,
    "upper": 40,
    "lowerfirst": 30,
    "upperfirst": 30,
    "quotewildcard": 20,
    "length": 10,
}


@dataclass(frozen=True, slots=True)
class Script:
    """A compiled script: its name (for logs), extensions and top-level block."""

    name: str
    extensions: frozenset[str]
    body: n.Block

    @property
    def variables(self) -> bool:
        """Whether strings are expanded (the script requires ``variables``)."""
        return "variables" in self.extensions


def _err(node: Command | Test | Argument, msg: str) -> SieveCompileError:
    return SieveCompileError(msg, node.line, node.col)


class _Args:
    """The arguments of one command or test, consumed by the checks below."""

    def __init__(self, owner: Command | Test, exts: frozenset[str]) -> None:
        self.owner = owner
        self.exts = exts
        self.tags: dict[str, Tag] = {}
        self.tag_values: dict[str, Argument] = {}
        self.positional: list[Argument] = []

    def split(self, with_value: dict[str, str], flags: dict[str, str | None]) -> None:
        """Sort tags from positionals; ``with_value`` tags take the next argument."""
        args = self.owner.args
        i = 0
        while i < len(args):
            a = args[i]
            if isinstance(a, Tag):
                if a.name in self.tags:
                    raise _err(a, f"tag :{a.name} given twice")
                if self.positional:
                    raise _err(a, f"tag :{a.name} after positional arguments")
                if a.name in with_value:
                    if i + 1 >= len(args) or isinstance(args[i + 1], Tag):
                        raise _err(a, f"tag :{a.name} needs a {with_value[a.name]} argument")
                    self.tag_values[a.name] = args[i + 1]
                    i += 1
                elif a.name in flags:
                    ext = flags[a.name]
                    if ext is not None and ext not in self.exts:
                        raise _err(a, f"tag :{a.name} needs require {ext!r}")
                else:
                    raise _err(a, f"unknown tag :{a.name} for {self.owner.name!r}")
                self.tags[a.name] = a
            else:
                self.positional.append(a)
            i += 1

    def exclusive(self, group: frozenset[str] | dict[str, str | None], what: str) -> str | None:
        found = [t for t in self.tags if t in group]
        if len(found) > 1:
            raise _err(self.tags[found[1]], f"more than one {what}")
        return found[0] if found else None

    def strings(self, count: int) -> list[tuple[str, ...]]:
        if len(self.positional) != count:
            raise _err(
                self.owner,
                f"{self.owner.name!r} takes {count} positional argument(s),"
                f" got {len(self.positional)}",
            )
        out = []
        for a in self.positional:
            if not isinstance(a, StringList):
                raise _err(a, f"{self.owner.name!r} expects a string or string list here")
            out.append(a.values)
        return out

    def single(self, a: Argument) -> str:
        if not isinstance(a, StringList) or not a.single:
            raise _err(a, f"{self.owner.name!r} expects a single string here")
        return a.values[0]

    def match(self, keys: tuple[str, ...]) -> n.Match:
        kind = self.exclusive(_MATCH_TAGS, "match type") or "is"
        comp = "i;ascii-casemap"
        if "comparator" in self.tag_values:
            comp = self.single(self.tag_values["comparator"]).lower()
            if comp not in _COMPARATORS:
                raise _err(self.tag_values["comparator"], f"unknown comparator {comp!r}")
        return n.Match(kind, comp, keys, tuple(casemap(k) for k in keys))


_MATCH_FLAGS: dict[str, str | None] = {"is": None, "contains": None, "matches": None}
_CMP = {"comparator": "string"}


class _Compiler:
    def __init__(self, exts: frozenset[str], limits: Limits) -> None:
        self.exts = exts
        self.limits = limits

    def need(self, node: Command | Test, ext: str) -> None:
        if ext not in self.exts:
            raise _err(node, f"{node.name!r} needs require {ext!r}")

    def block(self, cmds: tuple[Command, ...], top: bool) -> n.Block:
        out: list[n.Node] = []
        i = 0
        seen_other = False
        while i < len(cmds):
            c = cmds[i]
            if c.name == "require":
                if not top or seen_other:
                    raise _err(c, "'require' must come before any other command")
                i += 1
                continue
            seen_other = True
            if c.name == "if":
                branches = [(self.test_of(c), self.body_of(c))]
                orelse: n.Block | None = None
                i += 1
                while i < len(cmds) and cmds[i].name in ("elsif", "else"):
                    c2 = cmds[i]
                    if c2.name == "elsif":
                        branches.append((self.test_of(c2), self.body_of(c2)))
                        i += 1
                    else:
                        if c2.args or c2.tests:
                            raise _err(c2, "'else' takes no arguments")
                        orelse = self.body_of(c2)
                        i += 1
                        break
                out.append(n.If(tuple(branches), orelse))
                continue
            if c.name in ("elsif", "else"):
                raise _err(c, f"{c.name!r} without a preceding 'if'")
            if c.block is not None:
                raise _err(c, f"{c.name!r} takes no block")
            if c.tests:
                raise _err(c, f"{c.name!r} takes no test")
            out.append(self.command(c))
            i += 1
        return tuple(out)

    def test_of(self, c: Command) -> n.TestNode:
        if c.args or len(c.tests) != 1:
            raise _err(c, f"{c.name!r} needs exactly one test")
        return self.test(c.tests[0])

    def body_of(self, c: Command) -> n.Block:
        if c.block is None:
            raise _err(c, f"{c.name!r} needs a block")
        return self.block(c.block, False)

    def flags_tag(self, a: _Args) -> tuple[str, ...] | None:
        if "flags" not in a.tag_values:
            return None
        v = a.tag_values["flags"]
        if not isinstance(v, StringList):
            raise _err(v, ":flags expects a string list")
        return v.values

    def command(self, c: Command) -> n.Node:
        a = _Args(c, self.exts)
        name = c.name
        if name == "stop":
            a.split({}, {})
            a.strings(0)
            return n.Stop()
        if name == "discard":
            a.split({}, {})
            a.strings(0)
            return n.Discard()
        if name == "keep":
            a.split({"flags": "string list"} if "imap4flags" in self.exts else {}, {})
            a.strings(0)
            return n.Keep(self.flags_tag(a))
        if name == "fileinto":
            self.need(c, "fileinto")
            a.split(
                {"flags": "string list"} if "imap4flags" in self.exts else {},
                {"copy": "copy", "create": "mailbox"},
            )
            a.strings(1)
            mailbox = a.single(a.positional[0])
            return n.FileInto(mailbox, "copy" in a.tags, "create" in a.tags, self.flags_tag(a))
        if name in ("setflag", "addflag", "removeflag"):
            self.need(c, "imap4flags")
            a.split({}, {})
            if len(a.positional) == 2:
                self.need(c, "variables")
                var = a.single(a.positional[0])
                self.var_name(c, var)
                (_, flags) = a.strings(2)
                return n.FlagAction(name, var.lower(), flags)
            (flags,) = a.strings(1)
            return n.FlagAction(name, None, flags)
        if name == "set":
            self.need(c, "variables")
            a.split({}, {m: None for m in _MODIFIER_RANK})
            a.strings(2)
            var = a.single(a.positional[0])
            value = a.single(a.positional[1])
            self.var_name(c, var)
            ranks = [_MODIFIER_RANK[m] for m in a.tags]
            if len(ranks) != len(set(ranks)):
                raise _err(c, "two 'set' modifiers of the same precedence")
            mods = tuple(sorted(a.tags, key=lambda m: -_MODIFIER_RANK[m]))
            return n.SetVar(var.lower(), value, mods)
        if name == "redirect":
            a.split({}, {"copy": "copy"})
            a.strings(1)
            a.single(a.positional[0])
            return n.NotPerformed("redirect", c.line, "copy" not in a.tags)
        if name == "reject":
            self.need(c, "reject")
            a.split({}, {})
            a.strings(1)
            a.single(a.positional[0])
            return n.NotPerformed("reject", c.line, True)
        if name == "vacation":
            self.need(c, "vacation")
            a.split(
                {
                    "days": "number",
                    "seconds": "number",
                    "subject": "string",
                    "from": "string",
                    "addresses": "string list",
                    "handle": "string",
                },
                {"mime": None},
            )
            a.strings(1)
            return n.NotPerformed("vacation", c.line, False)
        raise _err(c, f"unknown command {name!r}")

    def var_name(self, node: Command | Test, name: str) -> None:
        if not _VAR_NAME.match(name):
            raise _err(node, f"invalid variable name {name!r}")

    def test(self, t: Test) -> n.TestNode:
        a = _Args(t, self.exts)
        name = t.name
        if name in ("true", "false"):
            if t.args or t.tests:
                raise _err(t, f"{name!r} takes no arguments")
            return n.Const(name == "true")
        if name in ("allof", "anyof"):
            if t.args or not t.tests:
                raise _err(t, f"{name!r} needs a test list")
            tests = tuple(self.test(x) for x in t.tests)
            return n.AllOf(tests) if name == "allof" else n.AnyOf(tests)
        if name == "not":
            if t.args or len(t.tests) != 1:
                raise _err(t, "'not' needs exactly one test")
            return n.Not(self.test(t.tests[0]))
        if t.tests:
            raise _err(t, f"{name!r} takes no nested test")
        if name == "exists":
            a.split({}, {})
            (names,) = a.strings(1)
            return n.ExistsTest(names)
        if name == "size":
            a.split({}, {"over": None, "under": None})
            which = a.exclusive(frozenset({"over", "under"}), "of :over/:under")
            if which is None or len(a.positional) != 1 or not isinstance(a.positional[0], Number):
                raise _err(t, "'size' needs :over or :under and a number")
            return n.SizeTest(which == "over", a.positional[0].value)
        if name == "header":
            a.split(_CMP, _MATCH_FLAGS)
            names, keys = a.strings(2)
            return n.HeaderTest(names, a.match(keys))
        if name in ("address", "envelope"):
            if name == "envelope":
                self.need(t, "envelope")
            a.split(_CMP, {**_MATCH_FLAGS, **_PART_TAGS})
            part = a.exclusive(_PART_TAGS, "address part") or "all"
            names, keys = a.strings(2)
            m = a.match(keys)
            if name == "address":
                return n.AddressTest(part, names, m)
            for p in names:
                if p.lower() not in ("from", "to"):
                    raise _err(t, f"unsupported envelope part {p!r}")
            return n.EnvelopeTest(part, tuple(p.lower() for p in names), m)
        if name == "hasflag":
            self.need(t, "imap4flags")
            a.split(_CMP, _MATCH_FLAGS)
            if len(a.positional) == 2:
                self.need(t, "variables")
                variables, keys = a.strings(2)
                for v in variables:
                    self.var_name(t, v)
                return n.HasFlagTest(tuple(v.lower() for v in variables), a.match(keys))
            (keys,) = a.strings(1)
            return n.HasFlagTest(None, a.match(keys))
        if name == "mailboxexists":
            self.need(t, "mailbox")
            a.split({}, {})
            (names,) = a.strings(1)
            return n.MailboxExistsTest(names)
        if name == "string":
            self.need(t, "variables")
            a.split(_CMP, _MATCH_FLAGS)
            sources, keys = a.strings(2)
            return n.StringTest(sources, a.match(keys))
        raise _err(t, f"unknown test {name!r}")


def _requires(cmds: tuple[Command, ...]) -> frozenset[str]:
    exts: set[str] = set()
    for c in cmds:
        if c.name != "require":
            break
        if (
            len(c.args) != 1
            or not isinstance(c.args[0], StringList)
            or c.tests
            or c.block is not None
        ):
            raise _err(c, "'require' takes one string or string list")
        for e in c.args[0].values:
            if e not in SUPPORTED_EXTENSIONS:
                raise _err(c.args[0], f"unsupported extension {e!r}")
            exts.add(e)
    return frozenset(exts)


def compile_script(
    source: str | bytes, *, name: str = "<script>", limits: Limits | None = None
) -> Script:
    """Compile ``source`` into an immutable :class:`Script`.

    Bytes are decoded as UTF-8. Raises :class:`SieveCompileError` (line and
    column) for a syntax or meaning error, a script over
    ``limits.max_script_bytes``, or nesting past ``limits.max_nesting``.
    """
    lim = limits or Limits()
    size = (
        len(source) if isinstance(source, bytes) else len(source.encode("utf-8", "surrogatepass"))
    )
    if size > lim.max_script_bytes:
        raise SieveCompileError(
            f"script is {size} bytes, over the limit of {lim.max_script_bytes}", 1, 1
        )
    if isinstance(source, bytes):
        raw = source
        try:
            source = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise SieveCompileError("script is not valid UTF-8", line, 1) from None
    cmds = parse(source, max_nesting=lim.max_nesting)
    exts = _requires(cmds)
    body = _Compiler(exts, lim).block(cmds, True)
    return Script(name, exts, body)
