"""The generated scan of a script's leading pure rules gives exactly what the evaluator gives."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from delivery_executor.errors import SieveCompileError
from delivery_executor.sieve import evaluator, scan
from delivery_executor.sieve.compiler import Script, compile_script
from delivery_executor.sieve.limits import Limits
from delivery_executor.sieve.message import Envelope, MessageView

from .sieve_corpus import MESSAGES, SCRIPTS, envelope_of

pytestmark = pytest.mark.timeout(300)

_SIEVE20 = (Path(__file__).parent.parent / "benches" / "sieve20.sieve").read_text()


def _compiled() -> list[Script]:
    out = []
    for name, source in [*SCRIPTS, ("sieve20", _SIEVE20)]:
        try:
            out.append(compile_script(source, name=name))
        except SieveCompileError:
            continue  # the corpus holds scripts that must not compile
    return out


def _run(scripts: list[Script], message: str, steps: int) -> evaluator.SieveResult:
    sender, rcpt = envelope_of(message)
    return evaluator.evaluate(
        scripts,
        MessageView.parse(MESSAGES[message]),
        Envelope(sender, rcpt),
        limits=dataclasses.replace(Limits(), max_steps=steps),
        mailbox_exists=lambda name: name in ("INBOX", "Junk"),
    )


def test_results_with_the_scan_equal_the_evaluator_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every corpus script (alone and chained after sieve20), every message, several step limits."""
    compiled = _compiled()
    assert sum(scan.scan_of(s, "+") is not None for s in compiled) > 50
    chains = [[s] for s in compiled] + [[compiled[-1], s] for s in compiled[::7]]
    cases = [(c, m, k) for c in chains for m in MESSAGES for k in (1, 3, 20, 2_000_000)]
    with_scan = [_run(c, m, k) for c, m, k in cases]
    monkeypatch.setattr(evaluator, "scan_of", lambda *a: None)
    without = [_run(c, m, k) for c, m, k in cases]
    assert with_scan == without


def test_all_false_rules_build_no_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """A script whose pure rules all stay false keeps without building the evaluator's state."""
    script = compile_script('if header :contains "X-Spam-Flag" "YES" { discard; }\n' * 20)

    def no_run(*args: object) -> None:
        raise AssertionError("the evaluator ran")

    monkeypatch.setattr(evaluator, "_Run", no_run)
    result = _run([script], "plain", 2_000_000)
    assert result == evaluator.KEEP_ONLY


def test_header_names_and_keys_never_become_code() -> None:
    """Quotes, newlines and code in a header name or key are data to the generated scan."""
    name = 'X-A");__import__("os")._exit(3)#\\n'  # no space or colon: a valid field name
    quoted = name.replace("\\", "\\\\").replace('"', '\\"')
    script = compile_script(f'if header :is "{quoted}" "v\\"x" {{ discard; }}\n')
    assert scan.scan_of(script, "+") is not None
    hostile = f'{name}: v"x\r\nSubject: s\r\n\r\nbody\r\n'.encode()
    result = evaluator.evaluate([script], MessageView.parse(hostile), Envelope("a@b", "c@d"))
    assert result.deliveries == ()  # the rule matched: discarded


def test_a_scan_that_stops_midway_compiles_no_block_per_message() -> None:
    """Resuming after the scan reuses the script's compiled block: no new entry per message."""
    rules = 'if header :contains "X-Spam-Flag" "YES" { fileinto "Junk"; }\n'
    script = compile_script('require "fileinto";\nif false { keep; }\n' + rules * 3)
    for _ in range(3):  # warm: every block of the script compiled once
        _run([script], "spam", 2_000_000)
    before = len(evaluator._BLOCKS)
    results = {_run([script], "spam", 2_000_000) for _ in range(50)}
    assert len(evaluator._BLOCKS) == before
    assert len(results) == 1 and next(iter(results)).deliveries[0].mailbox == "Junk"
