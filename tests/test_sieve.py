"""The Sieve parser, compiler, matcher, evaluator and limits (no Pigeonhole needed)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from delivery_executor.errors import SieveCompileError
from delivery_executor.sieve import (
    Delivery,
    Envelope,
    Limits,
    MessageView,
    compile_script,
    evaluate,
)
from delivery_executor.sieve.match import compile_glob, glob_match, match_value
from delivery_executor.sieve.parser import StringList, parse

MSG = (
    b"From: Alice Example <alice+news@Example.org>\r\n"
    b"To: bob@example.com, carol+x@example.net\r\n"
    b"Subject: =?utf-8?q?Caf=C3=A9_menu?=\r\n"
    b"X-Spam-Flag: YES\r\n"
    b"List-Id: Python list <python-list.python.org>\r\n"
    b"\r\n"
    b"body\r\n"
)
ENV = Envelope("alice+news@example.org", "bob+sieve@example.com")


def run(src: str, msg: bytes = MSG, env: Envelope = ENV, **kw: object) -> tuple[Delivery, ...]:
    """Compile ``src``, run it on ``msg`` and return the deliveries."""
    res = evaluate([compile_script(src)], MessageView.parse(msg), env, **kw)  # type: ignore[arg-type]
    return res.deliveries


def test_multiline_text_escapes_and_comments_parse() -> None:
    """text: blocks undo dot-stuffing; quoted escapes; both comment forms are skipped."""
    src = (
        'keep /* c */ ; # x\nif header :is "s" ["a\\"b\\\\c", '
        "text:  # note\n..dot\nline\n.\n] { stop; }\n"
    )
    cmds = parse(src)
    arg = cmds[1].tests[0].args[2]
    assert isinstance(arg, StringList)
    assert arg.values == ('a"b\\c', ".dot\r\nline\r\n")


@pytest.mark.parametrize(
    ("src", "line", "col"),
    [
        ('keep;\nif true {\n  fileinto "x"\n}', 4, 1),
        ('if header :is "a" {\n keep;\n}', 1, 4),
        ('require "fileinto";\nkeep;\n  fileinto :bogus "x";', 3, 12),
        ('keep;\nrequire "fileinto";', 2, 1),
        ('require "nope";', 1, 9),
        ('fileinto "x";', 1, 1),
        ('keep;\n"unterminated', 2, 1),
        ("if true { keep; ", 1, 17),
    ],
)
def test_compile_errors_name_line_and_column(src: str, line: int, col: int) -> None:
    """Syntax and meaning errors carry the 1-based line and column."""
    with pytest.raises(SieveCompileError) as ei:
        compile_script(src)
    assert (ei.value.line, ei.value.col) == (line, col), str(ei.value)


def test_matches_captures_shortest_then_rest() -> None:
    """Each * takes the shortest text, the last one the rest (as Pigeonhole)."""
    got = match_value("matches", "i;ascii-casemap", "x@a@b.c", "*@*", lambda k: None)
    assert got == ["x@a@b.c", "x", "a@b.c"]
    got = match_value("matches", "i;ascii-casemap", "HiiiII", "*I*?", lambda k: None)
    assert got == ["HiiiII", "H", "iiI", "I"]
    assert match_value("matches", "i;octet", "a*b", "a\\*b", lambda k: None) == ["a*b"]
    assert match_value("matches", "i;octet", "axb", "a\\*b", lambda k: None) is None


def test_matches_is_linear_on_a_hostile_pattern() -> None:
    """A backtracking-bomb pattern costs at most len(pattern)*len(value) steps."""
    value = "a" * 5000
    pattern = "*a" * 30 + "*b"
    count = [0]

    def tick(k: int) -> None:
        count[0] += k

    assert glob_match(compile_glob(pattern), value, tick) is None
    assert count[0] <= len(value) * len(pattern)


def test_step_limit_turns_a_hostile_script_into_implicit_keep() -> None:
    """A run over max_steps is stopped; its actions are dropped and INBOX keeps the message."""
    big = b"Subject: " + b"a" * 20000 + b"\r\n\r\nx\r\n"
    src = (
        'require "fileinto";\nfileinto "Early";\nif header :matches "subject" "*'
        + "a" * 200
        + 'b" { discard; }'
    )
    res = evaluate(
        [compile_script(src)], MessageView.parse(big), ENV, limits=Limits(max_steps=100_000)
    )
    assert res.deliveries == (Delivery("INBOX"),)
    assert res.implicit_keep and "steps" in res.errors[0]


def test_cpu_limit_is_checked() -> None:
    """A run over max_cpu_seconds fails with a clear error and keeps the message."""
    big = b"Subject: " + b"a" * 100000 + b"\r\n\r\nx\r\n"
    keys = ", ".join(f'"*{i}*"' for i in range(200))
    src = f'if header :matches "subject" [{keys}] {{ discard; }}'
    t0 = time.process_time()
    res = evaluate(
        [compile_script(src)],
        MessageView.parse(big),
        ENV,
        limits=Limits(max_cpu_seconds=0.05, max_steps=10**9),
    )
    assert res.deliveries == (Delivery("INBOX"),)
    assert "CPU" in res.errors[0]
    assert time.process_time() - t0 < 5


def test_size_nesting_and_action_limits() -> None:
    """Script size and nesting fail to compile; too many actions fail at run time (keep)."""
    with pytest.raises(SieveCompileError, match="over the limit"):
        compile_script("keep;" * 100, limits=Limits(max_script_bytes=50))
    with pytest.raises(SieveCompileError, match="nested deeper"):
        compile_script("if true {" * 40 + "}" * 40)
    with pytest.raises(SieveCompileError, match="nested deeper"):
        compile_script("if " + "not " * 40 + "true { keep; }")
    src = 'require "fileinto";\n' + "".join(f'fileinto "f{i}";' for i in range(40))
    res = evaluate([compile_script(src)], MessageView.parse(MSG), ENV)
    assert res.deliveries == (Delivery("INBOX"),) and "actions" in res.errors[0]


def test_core_spam_rule_files_into_junk_with_flags() -> None:
    """The commonest script: X-Spam-Flag to Junk, marked seen; no implicit keep."""
    src = (
        'require ["fileinto", "imap4flags"];\n'
        'if header :contains "X-Spam-Flag" "yes" { addflag "\\\\Seen"; fileinto "Junk"; stop; }\n'
        'fileinto "Never";'
    )
    assert run(src) == (Delivery("Junk", ("\\Seen",)),)


def test_encoded_words_are_decoded_for_header_tests() -> None:
    """RFC 2047 words in Subject are decoded before matching."""
    src = 'require "fileinto";\nif header :contains "subject" "Café" { fileinto "Food"; }'
    assert run(src) == (Delivery("Food"),)


def test_address_parts_and_subaddress() -> None:
    """:localpart/:domain/:user/:detail on headers and envelope, configurable delimiter."""
    src = (
        'require ["fileinto", "envelope", "subaddress", "variables"];\n'
        'if address :detail "from" "news" { fileinto "News"; }\n'
        'if address :domain :is "to" "EXAMPLE.net" { fileinto "Net"; }\n'
        'if envelope :detail :matches "to" "*" { fileinto "D-${1}"; }\n'
        'if envelope :user "to" "bob" { fileinto "Bob"; }\n'
    )
    assert [d.mailbox for d in run(src)] == ["News", "Net", "D-sieve", "Bob"]
    env = Envelope("", "bob-x+y@example.com")
    got = run(src, env=env, recipient_delimiter="-")
    assert [d.mailbox for d in got] == ["Net", "D-x+y", "Bob"]


def test_variables_modifiers_and_match_variables() -> None:
    """set modifiers apply in precedence order; ${n} come from the last :matches."""
    src = (
        'require ["fileinto", "variables"];\n'
        'if header :matches "List-Id" "*<*.*>" { set :lower :upperfirst "l" "${2}"; }\n'
        'set :length "n" "${l}";\n'
        'if string :is "${n}" "11" { fileinto "Lists/${l}"; }\n'
    )
    assert run(src) == (Delivery("Lists/Python-list"),)


def test_flags_and_duplicates() -> None:
    """Invalid flags are dropped, duplicates collapse with the later flags winning."""
    src = (
        'require ["fileinto", "imap4flags", "copy"];\n'
        'addflag ["\\\\seen", "Foo", "foo", "\\\\Recent", "a(b"];\n'
        'if hasflag :is "FOO" { fileinto :copy "X"; }\n'
        'fileinto :flags "\\\\Flagged $Label1" :copy "X";\n'
        'removeflag "foo";\n'
    )
    assert run(src) == (
        Delivery("X", ("\\Flagged", "$Label1")),
        Delivery("INBOX", ("\\Seen",)),
    )


def test_chain_keep_defers_and_fileinto_ends_it() -> None:
    """before/user/after: keep passes on to the next script, fileinto ends the chain,
    stop ends only its own script, flags carry over."""
    before = compile_script('require "imap4flags";\naddflag "\\\\Flagged"; stop;')
    user = compile_script(
        'require "fileinto";\nif header :contains "subject" "menu" { fileinto "Food"; }'
    )
    after = compile_script('require "fileinto";\nfileinto "After";')
    view = MessageView.parse(MSG)
    got = evaluate([before, user, after], view, ENV)
    assert got.deliveries == (Delivery("Food", ("\\Flagged",)),)
    plain = MessageView.parse(b"Subject: other\r\n\r\nx\r\n")
    got = evaluate([before, user, after], plain, ENV)
    assert got.deliveries == (Delivery("After", ("\\Flagged",)),)
    keep = compile_script("keep;")
    assert evaluate([keep, after], plain, ENV).deliveries == (Delivery("After"),)


def test_redirect_reject_vacation_keep_the_message() -> None:
    """redirect/reject/vacation are parsed, reported as not performed, and the message kept."""
    src = 'require ["vacation", "reject"];\nredirect "x@y.z";\nvacation "away";\nreject "no";'
    res = evaluate([compile_script(src)], MessageView.parse(MSG), ENV)
    assert res.deliveries == (Delivery("INBOX"),)
    assert [p.split()[0] for p in res.not_performed] == ["redirect", "vacation", "reject"]


def test_discard_and_missing_headers() -> None:
    """discard cancels the implicit keep; tests on absent headers are false (exists too)."""
    assert run('if not exists "x-nope" { discard; }') == ()
    assert run('if header :contains "x-nope" "" { discard; }') == (Delivery("INBOX"),)
    assert run("if size :over 100 { discard; }") == ()
    assert run("if size :under 1K { discard; }") == ()


_TOKENS = [
    "if", "elsif", "else", "require", "keep", "fileinto", "discard", "stop", "header",
    "address", "allof", "anyof", "not", "true", "size", ":is", ":matches", ":over", ":all",
    ":comparator", ":flags", "[", "]", "(", ")", "{", "}", ",", ";", '"x"', '"${1}"', "1K",
    "text:\n.\n", '"fileinto"', '"variables"', "#c\n", "/* c */", '"\\\\"', "set", "addflag",
]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_TOKENS), max_size=40) | st.text(max_size=200).map(lambda s: [s]))
def test_any_input_compiles_or_fails_with_a_position(tokens: list[str]) -> None:
    """Token soup and random text either compile or raise SieveCompileError, nothing else."""
    source = " ".join(tokens)
    error: SieveCompileError | None = None
    try:
        compile_script(source)
    except SieveCompileError as e:
        error = e
    if error is not None:
        assert 1 <= error.line <= source.count("\n") + 1 and error.col >= 1


_ROBUST = compile_script(
    'require ["fileinto", "envelope", "subaddress", "imap4flags", "variables", "copy"];\n'
    'if address :detail :matches ["to", "from", "cc"] "*" { fileinto :copy "D/${1}"; }\n'
    'if header :matches "subject" "*?*" { addflag "${1}"; fileinto :copy "S-${2}"; }\n'
    'if envelope :domain :contains "from" "." { addflag "\\\\Seen"; }\n'
    'if exists "x" { discard; }\n'
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.text(max_size=30), st.text(max_size=30))
def test_any_message_and_envelope_evaluate_without_raising(raw: bytes, snd: str, rcpt: str) -> None:
    """Arbitrary bytes as a message, arbitrary envelope: a result, never an exception."""
    res = evaluate([_ROBUST], MessageView.parse(raw), Envelope(snd, rcpt))
    assert res.deliveries or not res.implicit_keep


def test_bench_script_compiles_and_keeps_load_messages() -> None:
    """benches/sieve20.sieve (the load table's Sieve row) has 20 rules and files nothing away."""
    script = compile_script(
        (Path(__file__).parent.parent / "benches" / "sieve20.sieve").read_bytes()
    )
    assert len(script.body) == 20
    load_like = (
        b"From: <s@example.net>\r\nTo: <a@example.org>\r\nSubject: load\r\n\r\n" + b"x" * 400
    )
    res = evaluate([script], MessageView.parse(load_like), ENV)
    assert res.deliveries == (Delivery("INBOX"),) and res.implicit_keep


def test_short_run_reads_no_cpu_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 20-rule run that files nothing never reads the CPU clock (a syscall per message)."""
    import delivery_executor.sieve.evaluator as ev

    reads: list[float] = []
    real = time.process_time

    def clock() -> float:
        reads.append(real())
        return reads[-1]

    monkeypatch.setattr(ev, "_cpu", clock, raising=False)
    monkeypatch.setattr(time, "process_time", clock)
    src = (Path(__file__).resolve().parent.parent / "benches" / "sieve20.sieve").read_bytes()
    msg = MessageView.parse(b"From: a@example.net\r\nSubject: hi\r\n\r\nbody\r\n")
    res = evaluate([compile_script(src)], msg, ENV)
    assert res.deliveries == (Delivery("INBOX"),) and res.implicit_keep and not res.errors
    assert reads == []
