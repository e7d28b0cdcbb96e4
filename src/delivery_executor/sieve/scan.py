"""A script's leading rules compiled once into one generated function: the per-message scan.

Most rules of a filtering script do not fire for most messages: ``if header
:contains "X-Spam-Flag" "YES" {...}`` on a message without that header. The
scan runs the longest leading run of a script's top-level ``if`` commands
whose tests are pure (``header``, ``address``, ``envelope`` with ``:is`` or
``:contains`` and no variable; ``exists``, ``size``, ``true``/``false``,
``allof``/``anyof``/``not`` of those) as straight-line Python generated once
per compiled script: a dict lookup per header a rule tests, no node walk, no
per-message objects. It stops at the first rule whose test is true (or that
has an ``else``, or is not pure): the evaluator runs the script from that rule
on, as it always did, so actions are never done here.

Steps are charged exactly as :class:`.evaluator._Run` charges them (one per
command, :func:`match_steps` for each match), so a run ends the same way at
every step limit. The scan returns before the rule during which the count
would pass ``bound`` (the step limit, or the next multiple of the evaluator's
CPU-check interval): the evaluator redoes that rule and makes the check
itself. Generated code holds no script text: names and keys are constants of
the function's namespace. A script that cannot be generated (too deep for
Python's parser) has no scan and is walked as before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

from . import nodes as n
from .compiler import Script
from .match import casemap
from .message import Envelope, MessageView

__all__ = ["Scan", "address_part", "address_parts", "envelope_values", "match_steps", "scan_of"]

Parts = dict[tuple[str, str], list[str]]  # one message's address parts, by (header, part)
# scan(msg, env, parts, steps, bound) -> (first command left to the evaluator, steps)
Scan = Callable[[MessageView, Envelope, Parts, int, int], tuple[int, int]]
_MAX_RULES = 2000  # rules generated per script: beyond, the evaluator walks them


def match_steps(
    values: Sequence[str], keys: Sequence[str], fold: bool, contains: bool
) -> tuple[bool, int]:
    """Whether a value matches a key with ``:is``/``:contains``, and the steps it costs.

    ``keys`` are already folded when ``fold``. One step, plus per value one per
    key and 64 characters, plus for ``:contains`` one per 64 characters times
    key length: what :meth:`.evaluator._Run.match` charges.
    """
    steps = 1
    nkeys = len(keys)
    for v in values:
        fv = casemap(v) if fold else v
        steps += nkeys * (1 + len(v) // 64)
        if contains:
            for k in keys:
                steps += len(v) * len(k) // 64
                if k in fv:
                    return True, steps
        elif fv in keys:
            return True, steps
    return False, steps


def address_part(addr: str, part: str, delimiter: str) -> str | None:
    """``part`` (all/localpart/domain/user/detail) of ``addr``; None: no ``:detail``."""
    if part == "all":
        return addr
    local, at, domain = addr.rpartition("@")
    if not at:
        local, domain = addr, ""
    if part == "localpart":
        return local
    if part == "domain":
        return domain
    cut = min((i for i in (local.find(d) for d in delimiter) if i >= 0), default=-1)
    if part == "user":
        return local if cut < 0 else local[:cut]
    return None if cut < 0 else local[cut + 1 :]


def address_parts(
    msg: MessageView,
    header: str,
    part: str,
    delimiter: str,
    cache: dict[tuple[str, str], list[str]],
) -> list[str]:
    """The ``part`` of every address in ``header``, remembered in ``cache`` (one message's)."""
    key = (header.lower(), part)
    got = cache.get(key)
    if got is None:
        got = []
        for addr, valid in msg.addresses(header):
            if not valid:  # only :all sees an invalid address, whole
                if part == "all":
                    got.append(addr)
                continue
            value = address_part(addr, part, delimiter)
            if value is not None:
                got.append(value)
        cache[key] = got
    return got


def envelope_values(env: Envelope, names: Sequence[str], part: str, delimiter: str) -> list[str]:
    """What ``envelope`` compares: ``part`` of MAIL FROM (``from``) or RCPT TO, per name."""
    values = []
    for p in names:
        addr = env.sender if p == "from" else env.recipient
        # The null sender <> is "" for every part (as Pigeonhole), no :detail.
        got = address_part(addr, part, delimiter) if addr else None if part == "detail" else ""
        if got is not None:
            values.append(got)
    return values


class _Gen:
    """Python source for one script's scan; constants go to ``self.consts``."""

    def __init__(self, delimiter: str) -> None:
        self.consts: dict[str, object] = {
            "M": match_steps,
            "AP": address_parts,
            "EV": envelope_values,
            "D": delimiter,
        }
        self.lines: list[str] = []
        self.headers = False  # whether the scan reads the header section

    def const(self, value: object) -> str:
        name = f"c{len(self.consts)}"
        self.consts[name] = value
        return name

    def emit(self, depth: int, line: str) -> None:
        self.lines.append("    " * depth + line)

    def pure(self, t: n.TestNode) -> bool:
        """Whether the scan can run ``t``: no side effect, no variable."""
        if isinstance(t, (n.HeaderTest, n.AddressTest, n.EnvelopeTest)):
            m = t.match
            return m.kind in ("is", "contains") and not any("${" in s for s in (*t.names, *m.keys))
        if isinstance(t, n.ExistsTest):
            return not any("${" in s for s in t.names)
        if isinstance(t, (n.SizeTest, n.Const)):
            return True
        if isinstance(t, (n.AllOf, n.AnyOf)):
            return all(self.pure(x) for x in t.tests)
        if isinstance(t, n.Not):
            return self.pure(t.test)
        return False

    def test(self, t: n.TestNode, d: int) -> None:
        """Code that sets ``r`` to ``t``'s value and adds its steps to ``s``."""
        if isinstance(t, (n.HeaderTest, n.AddressTest, n.EnvelopeTest)):
            m = t.match
            fold = m.comparator == "i;ascii-casemap"
            keys = self.const(m.folded if fold else m.keys)
            tail = f"{keys}, {fold}, {m.kind == 'contains'})"
            if isinstance(t, n.EnvelopeTest):
                names = self.const(t.names)
                self.emit(d, f"r, k = M(EV(env, {names}, {self.const(t.part)}, D), {tail}")
                self.emit(d, "s += k")
                return
            self.headers = True
            if isinstance(t, n.HeaderTest):
                get = "msg.header_values({})"
            else:
                get = "AP(msg, {}, " + self.const(t.part) + ", D, parts)"
            if len(t.names) == 1:
                name = self.const(t.names[0].lower())
                # A header the message lacks: no values, one step (as the evaluator).
                self.emit(d, f"if H.get({name}):")
                self.emit(d + 1, f"r, k = M({get.format(name)}, {tail}")
                self.emit(d + 1, "s += k")
                self.emit(d, "else:")
                self.emit(d + 1, "r = False")
                self.emit(d + 1, "s += 1")
            else:
                names = self.const(t.names)
                self.emit(d, f"r, k = M([v for h in {names} for v in {get.format('h')}], {tail}")
                self.emit(d, "s += k")
        elif isinstance(t, n.ExistsTest):
            self.headers = True
            each = [f"bool(H.get({self.const(x.lower())}))" for x in t.names]
            self.emit(d, "r = " + (" and ".join(each) or "True"))
        elif isinstance(t, n.SizeTest):
            self.emit(d, f"r = msg.size {'>' if t.over else '<'} {int(t.limit)}")
        elif isinstance(t, n.Const):
            self.emit(d, f"r = {bool(t.value)}")
        elif isinstance(t, n.Not):
            self.test(t.test, d)
            self.emit(d, "r = not r")
        elif isinstance(t, (n.AllOf, n.AnyOf)):
            # Flat, short-circuit: each later test runs only while r is still undecided.
            guard = "if r:" if isinstance(t, n.AllOf) else "if not r:"
            self.emit(d, f"r = {isinstance(t, n.AllOf)}")
            for x in t.tests:
                self.emit(d, guard)
                self.test(x, d + 1)
        else:  # pragma: no cover - pure() lets only the above through
            raise AssertionError(t)

    def script(self, body: n.Block) -> int:
        """Generate the scan of ``body``'s leading pure rules; how many it covers."""
        count = 0
        for node in body[:_MAX_RULES]:
            if not (
                isinstance(node, n.If)
                and node.orelse is None
                and all(self.pure(t) for t, _ in node.branches)
            ):
                break
            self.emit(1, "s0 = s")
            self.emit(1, "s += 1")  # the command's step
            for t, _ in node.branches:
                self.test(t, 1)
                self.emit(1, "if r:")
                self.emit(2, f"return {count}, s0")
            self.emit(1, "if s > bound:")
            self.emit(2, f"return {count}, s0")
            count += 1
        return count


# id(script) -> (script, its scan and the number of commands it covers, or None).
# The entry holds the script, so its id cannot be reused while it is here.
_SCANS: dict[int, tuple[Script, str, tuple[Scan, int] | None]] = {}


def scan_of(script: Script, delimiter: str) -> tuple[Scan, int] | None:
    """``script``'s scan and how many leading commands it covers; None: no such rule.

    Generated on first use per (script, delimiter) and remembered; cost then
    one dict lookup.
    """
    got = _SCANS.get(id(script))
    if got is not None and got[0] is script and got[1] == delimiter:
        return got[2]
    made = _make(script, delimiter)
    if len(_SCANS) >= 4096:
        _SCANS.clear()  # bounded: scripts come and go
    _SCANS[id(script)] = (script, delimiter, made)
    return made


def _make(script: Script, delimiter: str) -> tuple[Scan, int] | None:
    gen = _Gen(delimiter)
    count = gen.script(script.body)
    if not count:
        return None
    head = ["def scan(msg, env, parts, s, bound):"]
    if gen.headers:
        head.append("    H = msg.headers")
    source = "\n".join([*head, *gen.lines, f"    return {count}, s", ""])
    namespace: dict[str, object] = dict(gen.consts)
    try:
        exec(compile(source, f"<sieve scan of {script.name}>", "exec"), namespace)
    except (SyntaxError, RecursionError, MemoryError):  # too deep for the parser: no scan
        return None
    return cast(Scan, namespace["scan"]), count
