"""The serve command line: value checks, start-up checks, --help defaults, --version.

Run in-process through ``cli.main``: every case here stops before anything
listens, so nothing is left running.
"""

from __future__ import annotations

import argparse
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from delivery_executor import __version__, cli
from delivery_executor.server.checks import StartupError, check_root

from .helpers import mounted_tmpfs

pytestmark = pytest.mark.timeout(60)


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--log-level", "loud"], "argument --log-level: must be debug, info, warning, error"),
        (["--max-size", "-1"], "argument --max-size: must be a whole number >= 1"),
        (["--max-connections", "many"], "argument --max-connections: must be a whole number"),
        (["--max-batch", "1.5"], "argument --max-batch: must be a whole number"),
        (["--workers", "0"], "argument --workers: must be 'auto' or a whole number >= 1"),
        (["--workers", "most"], "argument --workers: must be 'auto' or a whole number >= 1"),
        (["--max-wait-ms", "-5"], "argument --max-wait-ms: must be a number >= 0"),
        (["--max-wait-ms", "nan"], "argument --max-wait-ms: must be a number >= 0"),
        (["--grace", "-1"], "argument --grace: must be a number >= 0"),
        (["--socket-mode", "1777"], "argument --socket-mode: must be octal permissions"),
        (["--socket-mode", "rw"], "argument --socket-mode: must be octal permissions"),
        (["--socket-group", "no-such-group-x"], "argument --socket-group: no such group"),
        (["--listen", "127.0.0.1:70000"], "argument --listen: port must be 0-65535"),
        (["--tls-listen", "nope"], "argument --tls-listen: expected HOST:PORT"),
        (["--hostname", "a b"], "argument --hostname: not a host name"),
        (["--loop", "trio"], "argument --loop: invalid choice"),
    ],
)
def test_bad_option_value_is_one_line_and_exit_2(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each bad value: exit status 2 and one line on stderr saying which option and why."""
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", *argv])
    assert exc.value.code == 2
    assert says in _one_error_line(capsys)


def test_startup_errors_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Unusable root, TLS files or options that need TLS: one line, exit 2, nothing listens."""
    a_file = tmp_path / "file"
    a_file.write_text("x")
    junk = tmp_path / "junk.pem"
    junk.write_text("not PEM\n")
    root = ["--root", str(tmp_path / "mail")]
    cases = [
        (["--root", str(a_file)], "exists and is not a directory"),
        (["--root", str(a_file / "sub")], "cannot create it: Not a directory"),
        ([*root, "--require-starttls"], "need --tls-cert and --tls-key"),
        ([*root, "--tls-listen", "127.0.0.1:0"], "need --tls-cert and --tls-key"),
        ([*root, "--tls-cert", str(junk)], "--tls-cert and --tls-key go together"),
        (
            [*root, "--tls-cert", str(tmp_path / "gone.pem"), "--tls-key", str(junk)],
            f"--tls-cert {tmp_path / 'gone.pem'}: No such file or directory",
        ),
        ([*root, "--tls-cert", str(junk), "--tls-key", str(junk)], "cannot load them as a PEM"),
        ([*root, "--log-file", str(a_file / "log")], "--log-file"),
    ]
    for argv, says in cases:
        assert cli.main(["serve", *argv, "--listen", "127.0.0.1:0"]) == 2, argv
        line = _one_error_line(capsys)
        assert line.startswith("delivery-executor serve: ")
        assert says in line, (argv, line)


def test_unwritable_root_is_refused_at_start(capsys: pytest.CaptureFixture[str]) -> None:
    """--root on a read-only file system: exit 2 at start, saying it is not writable."""
    with mounted_tmpfs("1m", readonly=True) as ro:
        assert cli.main(["serve", "--root", str(ro), "--listen", "127.0.0.1:0"]) == 2
    line = _one_error_line(capsys)
    assert f"--root {ro}: not writable by uid {os.geteuid()}: Read-only file system" in line


def test_root_is_created_and_left_clean(tmp_path: Path) -> None:
    """A missing --root is created (mode 0700) and the write probe leaves nothing behind."""
    root = tmp_path / "a" / "b" / "mail"
    check_root(root)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert list(root.iterdir()) == []
    check_root(root)  # existing: fine too
    with pytest.raises(StartupError, match="exists and is not a directory"):
        check_root(Path(__file__))


def test_help_shows_every_default(capsys: pytest.CaptureFixture[str]) -> None:
    """serve --help prints '(default: X)' for every option that has a default."""
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo the line wrapping
    parser = cli._Parser(prog="x")
    sub = parser.add_subparsers()
    cli._add_serve(sub)
    serve = sub.choices["serve"]
    checked = 0
    for action in serve._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        if action.default in (None, argparse.SUPPRESS) or action.dest == "lmtp":
            continue
        assert f"(default: {action.default})" in text, action.option_strings
        checked += 1
    assert checked >= 15
    assert "default: 127.0.0.1:2525 unless --tls-listen or systemd sockets" in text
    assert "SMTP instead of LMTP --domain" in text  # no misleading '(default: True)' on --smtp


def test_version_on_the_command_and_on_serve() -> None:
    """--version prints the version, on the command and on serve."""
    for argv in (["--version"], ["serve", "--version"]):
        res = subprocess.run(
            [sys.executable, "-m", "delivery_executor", *argv],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert res.returncode == 0
        assert res.stdout.strip() == f"delivery-executor {__version__}"
