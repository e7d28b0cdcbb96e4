"""``serve --config FILE``: a TOML file whose keys are the long options.

``max_connections_per_ip = 0``, ``listen = ["unix:/run/de/lmtp"]``,
``smtp = true``: a key is a long option without its dashes (``-`` or ``_``
alike), a value is what the option takes (a string, number or boolean; a list
for a repeatable option). Each value goes through the same parser as the
command line, so a bad one is refused with the same one-line message; options
given on the command line override the file's (a repeatable one replaces the
file's list). Nothing here lists the options a second time: everything comes
from the ``serve`` parser.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Sequence
from typing import Any

__all__ = ["effective_settings", "load", "merged_args", "to_argv"]

_SKIP = {"help", "version", "config"}


def load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The file's table; ``ValueError`` naming the file for I/O and syntax errors."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ValueError(f"--config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"--config {path}: {exc}") from None


def _key(option: str) -> str:
    return option.lstrip("-").replace("-", "_")


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Key → action for every long option (``--max-size`` → ``max_size``)."""
    out: dict[str, argparse.Action] = {}
    for action in parser._actions:
        for opt in action.option_strings:
            if opt.startswith("--") and _key(opt) not in _SKIP:
                out[_key(opt)] = action
    return out


def _flag(action: argparse.Action) -> bool:
    return action.nargs == 0 and action.const is not None


def to_argv(parser: argparse.ArgumentParser, table: dict[str, Any]) -> list[str]:
    """The command-line words that say what ``table`` says; ``ValueError`` on a bad key or type."""
    options = _options(parser)
    argv: list[str] = []
    for raw_key, value in table.items():
        key = raw_key.replace("-", "_")
        action = options.get(key)
        if action is None:
            raise ValueError(f"unknown setting {raw_key!r}")
        opt = f"--{key.replace('_', '-')}"
        if action.option_strings and opt not in action.option_strings:
            opt = next(o for o in action.option_strings if _key(o) == key)
        if _flag(action):
            if not isinstance(value, bool):
                raise ValueError(f"{raw_key} must be true or false, not {value!r}")
            # true: the flag is given; false: its destination gets the opposite value.
            wanted = action.const if value else not action.const
            if wanted == action.default:
                continue
            if wanted == action.const:
                argv.append(opt)
                continue
            # lmtp = false: the option of the same destination that sets it (--smtp).
            other = next(
                (
                    o
                    for a in parser._actions
                    if a.dest == action.dest and _flag(a) and a.const == wanted
                    for o in a.option_strings
                ),
                None,
            )
            if other is None:
                raise ValueError(f"{raw_key} cannot be {str(value).lower()}")
            argv.append(other)
            continue
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not isinstance(action, argparse._AppendAction):
            raise ValueError(f"{raw_key} takes one value, not a list")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, str | int | float):
                raise ValueError(f"{raw_key}: {v!r} is not a string or number")
            argv += [opt, str(v)]
    return argv


def _explicit(parser: argparse.ArgumentParser, argv: Sequence[str]) -> dict[str, Any]:
    """Only what ``argv`` itself sets (destinations whose default it overrode)."""
    saved = [(a, a.default) for a in parser._actions]
    try:
        for a in parser._actions:
            a.default = argparse.SUPPRESS
        return vars(parser.parse_args(list(argv)))
    finally:
        for a, default in saved:
            a.default = default


def merged_args(
    parser: argparse.ArgumentParser, path: str | os.PathLike[str], argv: Sequence[str]
) -> argparse.Namespace:
    """``parser``'s namespace from the file at ``path``, then ``argv`` on top.

    ``ValueError`` for an unreadable file, bad TOML, an unknown key or a value
    of the wrong type; a value the option refuses exits 2 as on the command line.
    """
    args = parser.parse_args(to_argv(parser, load(path)))
    for dest, value in _explicit(parser, argv).items():
        setattr(args, dest, value)
    return args


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple) and not (
        len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)
    ):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, tuple):  # (host, port)
        value = f"{value[0]}:{value[1]}"
    text = str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def effective_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """``key = value`` lines, in TOML, for every setting that differs from its default
    (as ``postconf -n``); feeding them back as ``--config`` gives the same settings."""
    lines = []
    seen: set[str] = set()
    for key, action in _options(parser).items():
        dest = action.dest
        if dest in seen or not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        default = action.default
        if isinstance(default, str) and callable(action.type):
            default = action.type(default)  # argparse converts string defaults too
        if value == default:
            continue
        if _flag(action):
            if value != action.const:
                continue  # another option of this destination says it
            seen.add(dest)
            lines.append(f"{key} = true")
            continue
        seen.add(dest)
        if key == "socket_mode" and isinstance(value, int):
            lines.append(f'{key} = "{value:04o}"')
        else:
            lines.append(f"{key} = {_toml(value)}")
    return lines
