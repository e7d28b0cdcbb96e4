"""serve --config FILE (keys = long options), check-config, serve with a userdb and quota."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from delivery_executor.cli import main
from delivery_executor.testing import ServerProcess, send_message

pytestmark = [pytest.mark.timeout(120)]


def check(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], str]:
    code = main(["check-config", *argv])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def test_check_config_prints_settings_and_flags_override(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The file's settings are printed as TOML; flags override scalars and replace lists."""
    conf = tmp_path / "de.toml"
    conf.write_text(
        "max_connections_per_ip = 0\n"
        'listen = ["unix:/run/de/lmtp", "127.0.0.1:2400"]\n'
        "smtp = true\n"
        'socket-mode = "0640"\n'
        "max_batch = 8\n"
        'quota_rule = "*:storage=1G"\n'
        "no_size_names = false\n"
    )
    code, lines, err = check(capsys, "--config", str(conf), "--max-batch", "7")
    assert (code, err) == (0, "")
    assert lines == [
        'listen = ["unix:/run/de/lmtp", "127.0.0.1:2400"]',
        'socket_mode = "0640"',
        "smtp = true",
        "max_batch = 7",
        "max_connections_per_ip = 0",
        'quota_rule = "*:storage=1G"',
    ]
    code, lines, _ = check(capsys, "--config", str(conf), "--listen", "127.0.0.1:1", "--lmtp")
    assert 'listen = ["127.0.0.1:1"]' in lines
    assert "smtp = true" not in lines and "max_batch = 8" in lines
    # What it prints reads back as the same settings.
    again = tmp_path / "again.toml"
    code, lines, _ = check(capsys, "--config", str(conf))
    again.write_text("\n".join(lines) + "\n")
    assert check(capsys, "--config", str(again))[1] == lines
    # Without a file: only the non-defaults given as flags.
    assert check(capsys, "--max-size", "1000")[:2] == (0, ["max_size = 1000"])


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("bogus = 1\n", "unknown setting 'bogus'"),
        ('max_batch = "x"\n', "argument --max-batch: must be a whole number"),
        ("max_batch = [1, 2]\n", "max_batch takes one value, not a list"),
        ('smtp = "yes"\n', "smtp must be true or false"),
        ("max_batch = \n", "--config"),
        ('quota_rule = "Trash:storage=1G"\n', "quota rule must start with"),
        ('userdb = ["nope:/x"]\n', "--userdb must be one of"),
        ('listen = "nowhere"\n', "expected HOST:PORT"),
    ],
)
def test_check_config_refuses_bad_settings_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, reason: str
) -> None:
    """A bad key or value exits 2 with one line on stderr that says why."""
    conf = tmp_path / "bad.toml"
    conf.write_text(text)
    try:
        code = main(["check-config", "--config", str(conf)])
    except SystemExit as exc:  # argparse's own refusals
        code = int(str(exc.code))
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert reason in err


def test_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An unreadable --config is a one-line error for serve and check-config alike."""
    for command in ("serve", "check-config"):
        assert main([command, "--config", str(tmp_path / "none.toml")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"delivery-executor {command}: --config") and "No such file" in err


async def _codes(port: int, rcpts: list[str], body: bytes) -> list[str]:
    replies = await send_message(
        "127.0.0.1", port, mail_from="s@x.org", rcpts=rcpts, body=body, lmtp=True
    )
    return [f"{r.code} {r.text[:5]}" for r in replies]


def test_serve_with_config_userdb_quota_and_sighup(tmp_path: Path) -> None:
    """serve --config: passwd-file userdb and quota from the file; SIGHUP drops cached answers."""
    users = tmp_path / "users"
    users.write_text("a@x.org:::::::userdb_quota_rule=*:messages=2\n")
    conf = tmp_path / "de.toml"
    conf.write_text(
        f'userdb = ["passwd-file:{users}"]\nquota_rule = "*:storage=1M"\n'
        'userdb_cache_ttl = 600\nwriter = "loop"\n'
    )
    root = tmp_path / "mail"
    body = b"Subject: c\r\n\r\nhi\r\n"
    with ServerProcess(root, "--config", str(conf)) as srv:
        # One transaction stores one copy per mailbox: three messages fill a@'s two.
        got = asyncio.run(_codes(srv.port, ["a@x.org", "b@x.org", "a@x.org"], body))
        assert got == ["250 2.0.0", "550 5.1.1", "250 2.0.0"]
        assert asyncio.run(_codes(srv.port, ["a@x.org"], body)) == ["250 2.0.0"]
        assert asyncio.run(_codes(srv.port, ["a@x.org"], body)) == ["552 5.2.2"]
        users.write_text("a@x.org:::::::userdb_quota_rule=*:messages=2\nb@x.org:::::::\n")
        assert asyncio.run(_codes(srv.port, ["b@x.org"], body)) == ["550 5.1.1"]  # cached
        srv.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while not any("user databases will be read again" in line for line in srv.lines):
            srv.readline(deadline - time.monotonic())
        assert asyncio.run(_codes(srv.port, ["b@x.org"], body)) == ["250 2.0.0"]
        assert srv.stop() == 0
    assert len(list((root / "x.org" / "a" / "new").iterdir())) == 2
    # The user's own rule replaces --quota-rule, as a userdb quota_rule does in Dovecot.
    assert (root / "x.org" / "a" / "maildirsize").read_text().startswith("2C\n0 0\n")
    assert (root / "x.org" / "b" / "maildirsize").read_text().startswith("1048576S\n")


def test_contrib_example_config_checks(capsys: pytest.CaptureFixture[str]) -> None:
    """contrib/delivery-executor.toml passes check-config and says what it sets."""
    example = Path(__file__).resolve().parent.parent / "contrib" / "delivery-executor.toml"
    code, lines, err = check(capsys, "--config", str(example))
    assert (code, err) == (0, "")
    assert 'userdb = ["passwd-file:/etc/dovecot/userdb"]' in lines
    assert 'root = "/var/mail/vhosts"' in lines


def test_serve_refuses_a_bad_userdb_before_starting_workers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """serve checks --userdb and --mail-location up front: exit 2, one line, no worker started."""
    for bad in (["--userdb", "nope:x"], ["--mail-location", "mbox:~/mail"]):
        code = main(["serve", "--root", str(tmp_path / "m"), "--workers", "2", *bad])
        err = capsys.readouterr().err
        assert code == 2
        assert len(err.strip().splitlines()) == 1 and err.startswith("delivery-executor serve:")
    assert not (tmp_path / "m").exists()


def test_workers_auto_is_one_per_usable_cpu(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """workers = "auto" (file or flag) becomes the number of CPUs the process may run on."""
    cpus = len(os.sched_getaffinity(0))
    conf = tmp_path / "de.toml"
    conf.write_text('workers = "auto"\n')
    for argv in (["--config", str(conf)], ["--workers", "AUTO"]):
        code, lines, err = check(capsys, "--root", str(tmp_path / "m"), *argv)
        assert (code, err) == (0, "")
        # check-config prints settings that differ from the default (1), as postconf -n.
        workers = [line for line in lines if line.startswith("workers")]
        assert workers == ([f"workers = {cpus}"] if cpus > 1 else [])
