"""Each kind of Sieve script mistake is refused at compile time, saying what and on which line."""

from __future__ import annotations

import pytest

from delivery_executor.errors import SieveCompileError
from delivery_executor.sieve import compile_script

pytestmark = [pytest.mark.timeout(60)]


@pytest.mark.parametrize(
    ("src", "line", "text"),
    [
        ('if header :is :is "a" "b" { keep; }', 1, "tag :is given twice"),
        ('if header "a" :is "b" { keep; }', 1, "tag :is after positional arguments"),
        ("if header :is :comparator { keep; }", 1, "tag :comparator needs a string argument"),
        ('keep;\nredirect :copy "a@x.org";', 2, "tag :copy needs require 'copy'"),
        ('if header :is :contains "a" "b" { keep; }', 1, "more than one match type"),
        ('if header :is 5 "b" { keep; }', 1, "'header' expects a string or string list here"),
        ('require "fileinto";\nfileinto ["a", "b"];', 2, "'fileinto' expects a single string here"),
        ('if header :comparator "i;bogus" :is "a" "b" {}', 1, "unknown comparator 'i;bogus'"),
        ('if true { keep; } else "x" { keep; }', 1, "'else' takes no arguments"),
        ("elsif true { keep; }", 1, "'elsif' without a preceding 'if'"),
        ("if true {}\nelse {}\nelse {}", 3, "'else' without a preceding 'if'"),
        ("keep { stop; }", 1, "'keep' takes no block"),
        ("stop true;", 1, "'stop' takes no test"),
        ("if true;", 1, "'if' needs a block"),
        ('require "imap4flags";\nkeep :flags 5;', 2, ":flags expects a string list"),
        ('require "variables"; set :lower :upper "a" "b";', 1, "two 'set' modifiers of the"),
        ("keep;\n\nbogus;", 3, "unknown command 'bogus'"),
        ('require "variables";\nset "a-b" "x";', 2, "invalid variable name 'a-b'"),
        ('if true "x" { keep; }', 1, "'true' takes no arguments"),
        ('if anyof "x" { keep; }', 1, "'anyof' needs a test list"),
        ("if not (true, false) { keep; }", 1, "'not' needs exactly one test"),
        ("if exists (true) { keep; }", 1, "'exists' takes no nested test"),
        ("if size 5 { keep; }", 1, "'size' needs :over or :under and a number"),
        (
            'require "envelope";\nif envelope :all :is "subject" "x" {}',
            2,
            "unsupported envelope part 'subject'",
        ),
        ("if bogus { keep; }", 1, "unknown test 'bogus'"),
        ("require 5;", 1, "'require' takes one string or string list"),
    ],
)
def test_a_bad_script_is_refused_naming_the_mistake(src: str, line: int, text: str) -> None:
    """compile_script raises SieveCompileError with the mistake's text and its line."""
    with pytest.raises(SieveCompileError) as ei:
        compile_script(src)
    assert ei.value.text.startswith(text), ei.value.text
    assert ei.value.line == line
    assert str(ei.value).startswith(f"line {line}, column {ei.value.col}: {text}")


def test_a_script_that_is_not_utf8_names_the_line() -> None:
    """Bytes that are not UTF-8 are refused with the line they are on."""
    with pytest.raises(SieveCompileError) as ei:
        compile_script(b"keep;\n# caf\xe9\nstop;\n")
    assert (ei.value.text, ei.value.line) == ("script is not valid UTF-8", 2)
