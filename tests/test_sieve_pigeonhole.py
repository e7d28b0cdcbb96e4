"""Differential tests: our Sieve evaluator against Dovecot's Pigeonhole (sieve-test).

Every corpus script runs on every corpus message through both; the mailboxes
the message lands in and their flags must agree. The few known differences
are Pigeonhole deviating from the RFCs; each is recognised by a rule below
that names the RFC section, and an unexplained difference fails the test.
Skipped when sieve-test is missing, except under CI=true.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import pytest

from delivery_executor.errors import SieveCompileError
from delivery_executor.sieve import Envelope, MessageView, Script, compile_script, evaluate

from .sieve_corpus import MESSAGES, SCRIPTS, envelope_of
from .sieve_oracle import Outcome, SieveTest, available

if not available():
    if os.environ.get("CI") == "true":
        pytest.fail("sieve-test (Debian dovecot-sieve) is required under CI", pytrace=False)
    pytest.skip("sieve-test (Debian dovecot-sieve) is not installed", allow_module_level=True)

# The whole corpus is ~3,500 sieve-test processes: 12-53 s here, depending on the load.
pytestmark = pytest.mark.timeout(300)

Stores = dict[str, frozenset[str]]

# Pigeonhole's :matches skips the rest of a leading segment after a "?"
# ("b?b*" matches "big"). RFC 5228 2.7.1: "?" matches one character and the
# other characters must match themselves. Recognised by such a key.
_PREFIX_QMARK = re.compile(r'"[^"*]*\?[^"*]+\*')
# Pigeonhole's "string" test compares with i;octet when no comparator is
# given. RFC 5228 2.7.3 makes i;ascii-casemap the default for every test,
# and RFC 5229 5 does not override it.
_STRING_NO_COMPARATOR = re.compile(r"\bstring\s+(?::is|:contains|:matches)?\s*\"")


# "fileinto :copy X; fileinto X": Pigeonhole merges the second into the first
# and keeps the implicit keep. RFC 5228 4.1: fileinto (without :copy, RFC 3894
# 3) cancels the implicit keep.
_COPY_TARGET = re.compile(r'fileinto :copy "([^"]*)"')


def known_pigeonhole_bug(source: str) -> str | None:
    """The documented Pigeonhole deviation that can explain a difference, if any."""
    if any(f'fileinto "{t}"' in source for t in _COPY_TARGET.findall(source)):
        return "copy-then-plain-fileinto (RFC 5228 4.1, RFC 3894 3)"
    if ":matches" in source and _PREFIX_QMARK.search(source):
        return "matches-prefix-qmark (RFC 5228 2.7.1)"
    if _STRING_NO_COMPARATOR.search(source):
        return "string-default-comparator (RFC 5228 2.7.3)"
    return None


def ours(script: Script, message: str) -> Stores:
    """Our deliveries for ``message``, flags normalised as sieve-test prints them."""
    sender, rcpt = envelope_of(message)
    res = evaluate([script], MessageView.parse(MESSAGES[message]), Envelope(sender, rcpt))
    # sieve-test prints control characters in names as "?".
    return {
        re.sub(r"[\x00-\x1f]", "?", d.mailbox): frozenset(
            f.lower() if f.startswith("\\") else f for f in d.flags
        )
        for d in res.deliveries
    }


def theirs(o: Outcome) -> Stores:
    """Pigeonhole's stores; redirect/reject are not performed by us and keep instead."""
    got = dict(o.stores)
    if any(x.startswith(("redirect message", "reject")) for x in o.others):
        got.setdefault("INBOX", frozenset())
    return got


def _selected() -> list[tuple[str, str]]:
    # The whole corpus by default; SIEVE_CORPUS=sample runs every script on
    # three messages only (a quarter of the runs).
    if os.environ.get("SIEVE_CORPUS") == "sample":
        names = list(MESSAGES)
        return [
            (s, names[(i + k * 5) % len(names)])
            for i, (s, _) in enumerate(SCRIPTS)
            for k in range(3)
        ]
    return [(s, m) for s, _ in SCRIPTS for m in MESSAGES]


@pytest.fixture(scope="module")
def pigeonhole() -> Iterator[dict[tuple[str, str], Outcome]]:
    """Pigeonhole's outcome for every selected (script, message) pair, run two at a time."""
    st = SieveTest()
    try:
        msgs = {m: st.file(f"m-{m}.eml", b) for m, b in MESSAGES.items()}
        scripts = {s: st.file(f"{s}.sieve", src.encode()) for s, src in SCRIPTS}
        pairs = _selected()
        jobs = [(scripts[s], msgs[m], *envelope_of(m)) for s, m in pairs]
        yield dict(zip(pairs, st.run_many(jobs), strict=True))
    finally:
        st.close()


def test_corpus_is_large_enough() -> None:
    """The corpus holds at least 200 scripts (hand-written and generated) and a dozen messages."""
    assert len(SCRIPTS) >= 200 and len({s for s, _ in SCRIPTS}) == len(SCRIPTS)
    assert sum(1 for s, _ in SCRIPTS if not s.startswith("gen-")) >= 40
    assert len(MESSAGES) >= 12


def test_every_script_lands_where_pigeonhole_puts_it(
    pigeonhole: dict[tuple[str, str], Outcome],
) -> None:
    """Same compile verdict, mailboxes and flags for every pair, or a documented Pigeonhole bug."""
    sources = dict(SCRIPTS)
    compiled: dict[str, Script | None] = {}
    unexplained: list[str] = []
    explained: dict[str, int] = {}
    for (s, m), o in pigeonhole.items():
        if s not in compiled:
            try:
                compiled[s] = compile_script(sources[s], name=s)
            except SieveCompileError:
                compiled[s] = None
        script = compiled[s]
        if (script is not None) != o.compiled:
            unexplained.append(f"{s}: compiles here={script is not None}, Pigeonhole={o.compiled}")
            continue
        if script is None:
            continue
        a, b = ours(script, m), theirs(o)
        if a == b:
            continue
        bug = known_pigeonhole_bug(sources[s])
        if bug is None:
            unexplained.append(f"{s} x {m}: ours {a} Pigeonhole {b} {o.others}")
        else:
            explained[bug] = explained.get(bug, 0) + 1
    print(f"\nsieve corpus: {len(pigeonhole)} runs, explained differences {explained}")
    assert not unexplained, "\n".join(unexplained[:30])


def test_compile_errors_agree_on_the_line() -> None:
    """Scripts Pigeonhole rejects, we reject too, naming the same line."""
    bad = [
        'keep;\nfileinto "x";',
        'require "fileinto";\nif header :is "a" { keep; }',
        "if true {\n  keep;\n}\nelse { keep; }\n\nif true { stop }",
        'require ["fileinto"];\nkeep;\nrequire "copy";',
        'require "imap4flags";\nif hasflag :bogus "x" { keep; }',
        'require "nosuchext";',
        'if header :contains "a" "b" { keep; } elsif { keep; }',
    ]
    st = SieveTest()
    try:
        msg = st.file("m.eml", MESSAGES["plain"])
        for i, src in enumerate(bad):
            o = st.run(st.file(f"bad{i}.sieve", src.encode()), msg, "a@b.c", "d@e.f")
            assert not o.compiled, src
            line = re.search(r"line (\d+): error", o.text)
            assert line is not None, o.text
            with pytest.raises(SieveCompileError) as ei:
                compile_script(src)
            assert ei.value.line == int(line.group(1)), (src, str(ei.value), o.text)
    finally:
        st.close()
