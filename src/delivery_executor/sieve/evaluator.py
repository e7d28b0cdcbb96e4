"""Running compiled Sieve scripts against one message: the deliveries they ask for.

:func:`evaluate` runs a chain of scripts (``sieve_before``..., the user's,
``sieve_after``...) as Pigeonhole does: the next script runs only while the
message would still be kept (implicit or explicit ``keep``); a script that
files the message elsewhere or discards it ends the chain; ``stop`` ends only
its own script; the imap4flags internal variable carries over from one
script to the next. Duplicate deliveries to one mailbox collapse into one,
the later one's flags winning (RFC 5228 section 2.10.3).

``redirect``, ``reject`` and ``vacation`` need outgoing mail: they are
recorded in :attr:`SieveResult.not_performed` and the message is kept.

Cost: one walk of the script per message, bounded by :class:`Limits`. A
runtime error (a limit: actions, steps, CPU time) drops that script's actions,
keeps those of earlier scripts of the chain and adds INBOX; it never raises
to the caller. Mailbox names are checked later, by :mod:`.maildir`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import SieveRuntimeError
from . import nodes as n
from .compiler import Script
from .limits import Limits
from .match import casemap, compile_glob_cached, glob_match
from .message import Envelope, MessageView
from .scan import address_parts, envelope_values, match_steps, scan_of

__all__ = ["Delivery", "SieveResult", "evaluate", "normalize_flags"]

_SYSTEM_FLAGS = {
    f.lower(): f for f in ("\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft")
}
# RFC 3501 atom: no atom-specials ( ) { SP CTL % * " \ ]
_ATOM = re.compile(r'[^(){ %*"\\\]\x00-\x20\x7f]+\Z')
_VAR_REF = re.compile(r"\$\{([A-Za-z0-9_.]*)\}")
_CPU_CHECK_EVERY = 4096
# The CPU clock is a syscall (CLOCK_PROCESS_CPUTIME_ID has no vDSO path), so it
# is read only at every _CPU_CHECK_EVERY-th step: the first read starts the
# chain's budget, later ones check it. A run under that many steps (the usual
# one) reads it never; the budget's start is late by at most that many steps,
# each of bounded cost. Tests count the reads here.
_cpu = time.process_time
_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}
_UPPER = {c + 32: c for c in range(ord("A"), ord("Z") + 1)}


@dataclass(frozen=True, slots=True)
class Delivery:
    """One place the message goes: ``mailbox`` (``"INBOX"`` or a folder name),
    IMAP ``flags`` (system flags spelled ``\\Seen`` etc., then keywords) and
    whether ``fileinto :create`` asked for the folder to be created."""

    mailbox: str
    flags: tuple[str, ...] = ()
    create: bool = False


@dataclass(frozen=True, slots=True)
class SieveResult:
    """What the scripts decided for one message.

    ``deliveries`` is never empty unless the message was discarded;
    ``implicit_keep`` says whether INBOX came from the implicit keep (also the
    case after an error); ``errors`` holds runtime errors (the message was kept);
    ``not_performed`` lists redirect/reject/vacation that were not carried out.
    """

    deliveries: tuple[Delivery, ...]
    implicit_keep: bool
    errors: tuple[str, ...] = ()
    not_performed: tuple[str, ...] = ()


KEEP_ONLY = SieveResult((Delivery("INBOX"),), True)
_DEFAULT_LIMITS = Limits()


def _only_inbox(name: str) -> bool:
    return name == "INBOX"


def normalize_flags(values: Sequence[str]) -> list[str]:
    """Flags from space-separated strings: valid ones only, deduplicated ignoring case.

    System flags are spelled canonically (``\\seen`` → ``\\Seen``); ``\\Recent``,
    unknown system flags and keywords that are not IMAP atoms are dropped, as
    Pigeonhole drops them.
    """
    out: list[str] = []
    seen: set[str] = set()
    for v in values:
        for f in v.split():
            low = f.lower()
            if f.startswith("\\"):
                canon = _SYSTEM_FLAGS.get(low)
                if canon is None:
                    continue
                f = canon
            elif not _ATOM.match(f):
                continue
            if low not in seen:
                seen.add(low)
                out.append(f)
    return out


def _mailbox_key(name: str) -> str:
    return "INBOX" if name.upper() == "INBOX" else name


@dataclass(slots=True)
class _Store:
    mailbox: str
    flags: tuple[str, ...]
    create: bool
    is_keep: bool


class _Stop(Exception):
    pass


class _Run:
    """One script's run: variables, flags and the actions it collected."""

    def __init__(
        self,
        script: Script,
        msg: MessageView,
        env: Envelope,
        flags: list[str],
        limits: Limits,
        mailbox_exists: Callable[[str], bool],
        delimiter: str,
        steps: list[int],
        deadline: list[float],
        parts: dict[tuple[str, str], list[str]],
    ) -> None:
        self.script = script
        self.msg = msg
        self.env = env
        self.flags = list(flags)
        self.limits = limits
        self.mailbox_exists = mailbox_exists
        self.delimiter = delimiter
        self.vars: dict[str, str] = {}
        self.match_vars: list[str] = []
        self.stores: dict[str, _Store] = {}
        self.implicit_keep = True
        self.explicit_keep = False
        self.not_performed: list[str] = []
        self.actions = 0
        self.steps = steps  # shared by the scripts of one chain
        self.deadline = deadline  # [0.0] until the first check, shared like steps
        self.use_vars = script.variables
        self.parts_cache = parts  # the message's, shared with the scan

    # -- bookkeeping
    def tick(self, k: int) -> None:
        s = self.steps[0] + k
        self.steps[0] = s
        if s > self.limits.max_steps:
            raise SieveRuntimeError(f"script used more than {self.limits.max_steps} steps")
        if s // _CPU_CHECK_EVERY != (s - k) // _CPU_CHECK_EVERY:
            now, deadline = _cpu(), self.deadline
            if not deadline[0]:
                deadline[0] = now + self.limits.max_cpu_seconds
            elif now > deadline[0]:
                raise SieveRuntimeError(
                    f"script used more than {self.limits.max_cpu_seconds} s of CPU"
                )

    def action(self) -> None:
        self.actions += 1
        if self.actions > self.limits.max_actions:
            raise SieveRuntimeError(f"script performed more than {self.limits.max_actions} actions")

    def expand(self, s: str) -> str:
        if not self.use_vars or "${" not in s:
            return s
        self.tick(1 + len(s) // 64)

        def ref(m: re.Match[str]) -> str:
            name = m.group(1)
            if name.isdigit():
                i = int(name)
                return self.match_vars[i] if i < len(self.match_vars) else ""
            if not name or name[0].isdigit():
                return m.group(0)
            return self.vars.get(name.lower(), "")

        return _VAR_REF.sub(ref, s)

    def expand_all(self, values: tuple[str, ...]) -> Sequence[str]:
        if not self.use_vars or not _has_variable(values):
            return values
        return [self.expand(v) for v in values]

    # -- commands
    def block(self, body: n.Block, start: int = 0) -> None:
        """Run ``body``'s commands from index ``start`` (where a scan stopped)."""
        steps, limit = self.steps, self.limits.max_steps
        cmds = _compiled_block(body)
        for cmd in cmds[start:] if start else cmds:
            # self.tick(1), inlined: one step per command is the hot path.
            k = steps[0] + 1
            steps[0] = k
            if k > limit or not k % _CPU_CHECK_EVERY:
                steps[0] = k - 1
                self.tick(1)
            cmd(self)

    def command(self, node: n.Node) -> None:
        if isinstance(node, n.If):
            for test, body in node.branches:
                if self.test(test):
                    self.block(body)
                    return
            if node.orelse is not None:
                self.block(node.orelse)
        elif isinstance(node, n.Stop):
            raise _Stop
        elif isinstance(node, n.Keep):
            self.action()
            self.implicit_keep = False
            self.explicit_keep = True
            self.store("INBOX", node.flags, False, True)
        elif isinstance(node, n.Discard):
            self.action()
            self.implicit_keep = False
        elif isinstance(node, n.FileInto):
            self.action()
            box = self.expand(node.mailbox)
            if not node.copy:
                self.implicit_keep = False
            self.store(box, node.flags, node.create, False)
        elif isinstance(node, n.FlagAction):
            self.flag_action(node)
        elif isinstance(node, n.SetVar):
            self.vars[node.name] = self.modify(self.expand(node.value), node.modifiers)
        else:  # NotPerformed: logged by the caller; the message is kept (see module doc)
            self.action()
            self.not_performed.append(f"{node.command} (line {node.line})")

    def store(
        self, mailbox: str, flags: tuple[str, ...] | None, create: bool, is_keep: bool
    ) -> None:
        # Without :flags, the internal variable; it may come from an earlier
        # script of the chain even when this one does not require imap4flags.
        chosen = (
            tuple(self.flags) if flags is None else tuple(normalize_flags(self.expand_all(flags)))
        )
        key = _mailbox_key(mailbox)
        old = self.stores.pop(key, None)
        if old is not None:
            create = create or old.create
            is_keep = is_keep and old.is_keep
        # A later duplicate replaces the earlier one's flags (as Pigeonhole).
        self.stores[key] = _Store(key, chosen, create, is_keep)

    def flag_action(self, node: n.FlagAction) -> None:
        new = normalize_flags(self.expand_all(node.flags))
        if node.variable is None:
            current = self.flags
        else:
            current = normalize_flags([self.vars.get(node.variable, "")])
        if node.op == "setflag":
            result = new
        elif node.op == "addflag":
            result = normalize_flags([*current, *new])
        else:
            drop = {f.lower() for f in new}
            result = [f for f in current if f.lower() not in drop]
        if node.variable is None:
            self.flags = result
        else:
            self.vars[node.variable] = self.clip(" ".join(result))

    def clip(self, value: str) -> str:
        limit = self.limits.max_variable_bytes
        if len(value) > limit // 4 and len(value.encode("utf-8", "surrogatepass")) > limit:
            b = value.encode("utf-8", "surrogatepass")[:limit]
            value = b.decode("utf-8", "ignore")
        return value

    def modify(self, value: str, mods: tuple[str, ...]) -> str:
        # Case modifiers change ASCII letters only, as Pigeonhole (and as the
        # i;ascii-casemap comparator folds).
        for m in mods:
            if m == "lower":
                value = value.translate(_LOWER)
            elif m == "upper":
                value = value.translate(_UPPER)
            elif m == "lowerfirst":
                value = value[:1].translate(_LOWER) + value[1:]
            elif m == "upperfirst":
                value = value[:1].translate(_UPPER) + value[1:]
            elif m == "quotewildcard":
                value = value.replace("\\", "\\\\").replace("*", "\\*").replace("?", "\\?")
            elif m == "length":
                value = str(len(value))
        return self.clip(value)

    # -- tests
    def test(self, t: n.TestNode) -> bool:
        # Steps are charged by match() (one per value and key) and block().
        fast = _fast_test(t)
        if fast is not None:
            return fast(self)
        if isinstance(t, n.HeaderTest):
            names = self.expand_all(t.names) if self.use_vars else t.names
            if len(names) == 1:
                values = self.msg.header_values(names[0])
                if not values:  # a header the message lacks: match()'s first step, inlined
                    done = self.steps[0] + 1
                    if done > self.limits.max_steps or not done % _CPU_CHECK_EVERY:
                        self.tick(1)
                    else:
                        self.steps[0] = done
                    return False
                return self.match(t.match, values)
            return self.match(t.match, [v for h in names for v in self.msg.header_values(h)])
        if isinstance(t, n.AddressTest):
            names = self.expand_all(t.names) if self.use_vars else t.names
            if len(names) == 1:
                return self.match(t.match, self.address_parts(names[0], t.part))
            return self.match(t.match, [v for h in names for v in self.address_parts(h, t.part)])
        if isinstance(t, n.EnvelopeTest):
            return self.match(t.match, envelope_values(self.env, t.names, t.part, self.delimiter))
        if isinstance(t, n.ExistsTest):
            return all(self.msg.raw_values(h) for h in self.expand_all(t.names))
        if isinstance(t, n.SizeTest):
            return self.msg.size > t.limit if t.over else self.msg.size < t.limit
        if isinstance(t, n.AllOf):
            return all(self.test(x) for x in t.tests)
        if isinstance(t, n.AnyOf):
            return any(self.test(x) for x in t.tests)
        if isinstance(t, n.Not):
            return not self.test(t.test)
        if isinstance(t, n.Const):
            return t.value
        if isinstance(t, n.HasFlagTest):
            if t.variables is None:
                flags = self.flags
            else:
                flags = normalize_flags([self.vars.get(v, "") for v in t.variables])
            return self.match(t.match, flags)
        if isinstance(t, n.MailboxExistsTest):
            return all(self.mailbox_exists(_mailbox_key(b)) for b in self.expand_all(t.names))
        return self.match(t.match, self.expand_all(t.sources))

    def address_parts(self, header: str, part: str) -> list[str]:
        """The ``part`` of every address in ``header`` (cached for the message)."""
        return address_parts(self.msg, header, part, self.delimiter, self.parts_cache)

    def match(self, m: n.Match, values: Sequence[str]) -> bool:
        """Whether any value matches any key (one step per value and key, plus
        one per 64 characters compared; ``:matches`` per character)."""
        if not values:  # e.g. a header the message lacks: self.tick(1), inlined
            done = self.steps[0] + 1
            if done > self.limits.max_steps or not done % _CPU_CHECK_EVERY:
                self.tick(1)
            else:
                self.steps[0] = done
            return False
        fold = m.comparator == "i;ascii-casemap"
        if self.use_vars and _has_variable(m.keys):
            keys: Sequence[str] = self.expand_all(m.keys)
            if fold:
                keys = [casemap(k) for k in keys]
        else:
            keys = m.folded if fold else m.keys
        kind = m.kind
        if kind != "matches":  # :is, :contains: the scan's rule and charge, shared
            hit, charged = match_steps(values, keys, fold, kind == "contains")
            self.tick(charged)
            return hit
        steps = 1
        try:
            for v in values:
                fv = casemap(v) if fold else v
                steps += len(keys) * (1 + len(v) // 64)
                for k in keys:
                    spans = glob_match(compile_glob_cached(k), fv, self.tick)
                    if spans is not None:
                        if self.use_vars:
                            # Captures come from the unfolded value: ASCII
                            # folding keeps every index.
                            self.match_vars = [v, *(v[a:b] for a, b in spans)]
                        return True
            return False
        finally:
            self.tick(steps)


_Fast = Callable[[_Run], bool]
_Command = Callable[[_Run], None]
# id(block) -> (block, one callable per command). As _FAST: the entry holds the
# block, so its id cannot be reused while it is here.
_BLOCKS: dict[int, tuple[n.Block, tuple[_Command, ...]]] = {}


def _compiled_block(body: n.Block) -> tuple[_Command, ...]:
    """The commands of ``body`` as callables, made once per block (see :func:`_compile_if`)."""
    got = _BLOCKS.get(id(body))
    if got is not None and got[0] is body:
        return got[1]
    cmds = tuple(_compile_command(node) for node in body)
    if len(_BLOCKS) >= 65536:
        _BLOCKS.clear()  # bounded: scripts come and go
    _BLOCKS[id(body)] = (body, cmds)
    return cmds


def _compile_command(node: n.Node) -> _Command:
    """``node`` as a callable: an ``if`` whose tests all specialise (see
    :func:`_specialise`) runs them directly; anything else goes through
    :meth:`_Run.command`, as before."""
    if isinstance(node, n.If):
        fasts = [_fast_test(t) for t, _ in node.branches]
        if all(f is not None for f in fasts):
            return _compile_if(
                tuple((f, b) for f, (_, b) in zip(fasts, node.branches, strict=True) if f),
                node.orelse,
            )

    def generic(run: _Run) -> None:
        run.command(node)

    return generic


def _compile_if(branches: tuple[tuple[_Fast, n.Block], ...], orelse: n.Block | None) -> _Command:
    """What :meth:`_Run.command` does for ``if``, without its dispatch per test."""
    if len(branches) == 1 and orelse is None:
        test, body = branches[0]

        def one(run: _Run) -> None:
            if test(run):
                run.block(body)

        return one

    def chain(run: _Run) -> None:
        for test, body in branches:
            if test(run):
                run.block(body)
                return
        if orelse is not None:
            run.block(orelse)

    return chain


# id(test) -> (test, its specialised form or None). The entry holds the test, so
# its id cannot be reused while it is here; the tests are a compiled script's.
_FAST: dict[int, tuple[n.TestNode, _Fast | None]] = {}


def _fast_test(t: n.TestNode) -> _Fast | None:
    """``t`` specialised once (see :func:`_specialise`), or None: evaluated generically."""
    got = _FAST.get(id(t))
    if got is not None and got[0] is t:
        return got[1]
    fn = _specialise(t)
    if len(_FAST) >= 65536:
        _FAST.clear()  # bounded: scripts come and go
    _FAST[id(t)] = (t, fn)
    return fn


def _specialise(t: n.TestNode) -> _Fast | None:
    """A closure for the commonest tests: ``header``/``address`` with ``:is`` or
    ``:contains`` and no variable in names or keys. It does what :meth:`_Run.test`
    and :meth:`_Run.match` do for them, steps charged alike, without their
    dispatch (the results are checked equal on the whole corpus)."""
    if not isinstance(t, (n.HeaderTest, n.AddressTest)):
        return None
    m = t.match
    if m.kind not in ("is", "contains") or _has_variable(t.names) or _has_variable(m.keys):
        return None
    fold = m.comparator == "i;ascii-casemap"
    keys = m.folded if fold else m.keys
    contains = m.kind == "contains"
    names = t.names
    values_of: Callable[[_Run], Sequence[str]]
    if isinstance(t, n.HeaderTest):
        if len(names) == 1:
            name = names[0].lower()  # header_values folds it anyway: once here

            def values_of(run: _Run) -> Sequence[str]:
                return run.msg.header_values(name)
        else:

            def values_of(run: _Run) -> Sequence[str]:
                return [v for h in names for v in run.msg.header_values(h)]
    else:
        part = t.part
        if len(names) == 1:
            name = names[0]
            key = (name.lower(), part)  # address_parts's cache key, made once here

            def values_of(run: _Run) -> Sequence[str]:
                got = run.parts_cache.get(key)
                return run.address_parts(name, part) if got is None else got
        else:

            def values_of(run: _Run) -> Sequence[str]:
                return [v for h in names for v in run.address_parts(h, part)]

    def fast(run: _Run) -> bool:
        values = values_of(run)
        if not values:  # the common miss: run.tick(1), inlined
            done = run.steps[0] + 1
            if done > run.limits.max_steps or not done % _CPU_CHECK_EVERY:
                run.tick(1)
            else:
                run.steps[0] = done
            return False
        hit, steps = match_steps(values, keys, fold, contains)  # the scan's rule, shared
        run.tick(steps)
        return hit

    return fast


# id(values) -> (values, whether one holds "${"). The entry holds the tuple, so
# its id cannot be reused while it is here; the tuples are a compiled script's.
_VARIABLE_SEEN: dict[int, tuple[tuple[str, ...], bool]] = {}


def _has_variable(values: tuple[str, ...]) -> bool:
    got = _VARIABLE_SEEN.get(id(values))
    if got is not None and got[0] is values:
        return got[1]
    has = any("${" in v for v in values)
    if len(_VARIABLE_SEEN) >= 65536:
        _VARIABLE_SEEN.clear()  # bounded: scripts come and go
    _VARIABLE_SEEN[id(values)] = (values, has)
    return has


def evaluate(
    scripts: Sequence[Script],
    message: MessageView,
    envelope: Envelope,
    *,
    limits: Limits | None = None,
    mailbox_exists: Callable[[str], bool] | None = None,
    recipient_delimiter: str = "+",
) -> SieveResult:
    """Run ``scripts`` in order (before..., user, after...) on one message.

    ``mailbox_exists(name)`` answers ``mailboxexists`` (default: only INBOX);
    ``recipient_delimiter`` holds the characters that start a ``:detail``.
    Never raises for anything a script does: errors end in an implicit keep.
    """
    if not scripts:
        return KEEP_ONLY
    lim = limits or _DEFAULT_LIMITS
    limit = lim.max_steps
    done = 0  # steps
    parts: dict[tuple[str, str], list[str]] = {}
    starts: list[int] = []
    for script in scripts:
        # The scan of each script's leading rules (see .scan): a script whose
        # rules all stay false ends here in an implicit keep, without a _Run.
        # Scripts before it in the chain have kept too, so flags are still [].
        got = scan_of(script, recipient_delimiter)
        if got is None:
            break
        # It stops before passing the step limit or a CPU check (every 4096 steps).
        bound = min(limit, (done // _CPU_CHECK_EVERY + 1) * _CPU_CHECK_EVERY - 1)
        start, done = got[0](message, envelope, parts, done, bound)
        starts.append(start)
        if start < len(script.body):
            break
    else:
        return KEEP_ONLY
    exists = mailbox_exists or _only_inbox
    steps = [done]  # the scans' (fewer than _CPU_CHECK_EVERY)
    deadline = [0.0]  # set at the first CPU check (see _CPU_CHECK_EVERY)
    flags: list[str] = []
    stores: dict[str, _Store] = {}
    not_performed: list[str] = []

    def add(s: _Store) -> None:
        old = stores.pop(s.mailbox, None)
        stores[s.mailbox] = _Store(
            s.mailbox, s.flags, s.create or (old.create if old else False), False
        )

    implicit = False
    for i, script in enumerate(scripts):
        last = i == len(scripts) - 1
        run = _Run(
            script,
            message,
            envelope,
            flags,
            lim,
            exists,
            recipient_delimiter,
            steps,
            deadline,
            parts,
        )
        # Scripts scanned whole (all rules false) run no command; the one the
        # scan stopped in goes on from there; the later ones from the start.
        # (Not a slice of the body: blocks are compiled once per block object.)
        start = starts[i] if i < len(starts) else 0
        try:
            try:
                run.block(script.body, start)
            except _Stop:
                pass
        except SieveRuntimeError as e:
            # This script's actions are dropped; earlier scripts' stand; keep.
            not_performed.extend(run.not_performed)
            add(_Store("INBOX", (), False, False))
            return SieveResult(
                tuple(Delivery(s.mailbox, s.flags, s.create) for s in stores.values()),
                True,
                (f"{script.name}: {e}",),
                tuple(not_performed),
            )
        not_performed.extend(run.not_performed)
        keeps = run.implicit_keep or run.explicit_keep
        for s in run.stores.values():
            if s.is_keep and keeps and not last:
                continue  # a keep defers to the next script
            add(s)
        if not keeps:
            break
        if not last:
            flags = run.flags
            continue
        if run.implicit_keep:
            implicit = True
            add(_Store("INBOX", tuple(run.flags), False, False))
    return SieveResult(
        tuple(Delivery(s.mailbox, s.flags, s.create) for s in stores.values()),
        implicit,
        (),
        tuple(not_performed),
    )
