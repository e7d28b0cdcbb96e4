"""ServerConfig is the single source of serve's options: one flag per field, defaults once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from delivery_executor import cli
from delivery_executor.server.config import ServerConfig, from_args
from delivery_executor.server.options import Option

CLI_ONLY = {"-h", "--help", "--config", "--log-level", "--log-file", "--log-format", "--version"}


def _serve_parser() -> cli._Parser:
    parser = cli._Parser(prog="x")
    return cli._add_serve(parser.add_subparsers())


def test_every_field_has_its_own_flags_and_every_flag_a_field() -> None:
    """Each ServerConfig field declares one option (a pair at most); each flag is one field's."""
    owner: dict[str, str] = {}
    for f in dataclasses.fields(ServerConfig):
        opt = f.metadata.get("cli")
        assert isinstance(opt, Option), f"{f.name} declares no flag"
        assert 1 <= len(opt.flags) <= 2, f.name
        for flag in opt.flags:
            for name in flag.names:
                assert name not in owner, f"{name} is both {owner[name]}'s and {f.name}'s"
                owner[name] = f.name
    flags = {o for a in _serve_parser()._actions for o in a.option_strings}
    assert flags - CLI_ONLY == set(owner), "a serve flag without a field, or the reverse"


def test_no_flags_give_the_fields_defaults() -> None:
    """Each flag's default, parsed and converted, is its field's default (root: ./maildirs)."""
    config = from_args(_serve_parser().parse_args([]))
    expected = ServerConfig(root=Path("maildirs").resolve())
    for f in dataclasses.fields(ServerConfig):
        assert getattr(config, f.name) == getattr(expected, f.name), f.name


def test_flags_set_the_fields_they_name() -> None:
    """Renamed, inverted and scaled flags land in the right field with the right value."""
    argv = [
        "--smtp", "--no-headers", "--no-size-names", "--max-wait-ms", "250",
        "--max-size", "1000", "--socket-group", "0", "--socket-mode", "0600",
        "--listen", "127.0.0.1:1", "--tls-listen", "127.0.0.1:2", "--domain", "a.org",
        "--userdb", "passwd-file:/x", "--sieve-before", "s.sieve", "--trusted-networks", "",
    ]  # fmt: skip
    config = from_args(_serve_parser().parse_args(argv))
    assert (config.lmtp, config.add_headers, config.size_in_names) == (False, False, False)
    assert (config.max_wait, config.max_message_size) == (0.25, 1000)
    assert (config.socket_gid, config.socket_mode) == (0, 0o600)
    assert [(s.implicit_tls) for s in config.listen] == [False, True]
    assert config.domains == ["a.org"] and config.userdb == ("passwd-file:/x",)
    assert config.sieve_before == (Path("s.sieve").resolve(),)
    assert config.trusted_networks == ()
