"""How a :class:`~.config.ServerConfig` field becomes ``serve`` flags, and the flags' value parsers.

Each field of ``ServerConfig`` carries an :class:`Option` in its metadata
(``field(metadata=option(...))``): its flag names, argparse keywords, help
text, and how its default and value translate between the command line and the
field. The ``serve`` parser and the config built from it are generated from
those (:func:`.config.add_arguments`, :func:`.config.from_args`), so a default
is stated once, on the field.

The parsers turn option text into a value and check it with
:mod:`delivery_executor.validate`; a bad value is argparse's one-line error.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .. import validate
from ..userdb.base import group_id as userdb_group_id

__all__ = [
    "Flag",
    "Option",
    "arg",
    "group_id",
    "non_negative_int",
    "octal_mode",
    "option",
    "positive_int",
    "seconds",
]

_T = TypeVar("_T")


@dataclass(frozen=True)
class Flag:
    """One command-line option: its names, destination and argparse keywords."""

    names: tuple[str, ...]
    dest: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Option:
    """A field's flags (usually one; an on/off pair or plain and TLS listeners: two).

    ``to_cli`` maps the field's default to the first flag's argparse default;
    ``to_config`` maps the parsed values, one per distinct destination, to the
    field's value. ``group`` is the --help section; ``exclusive``: the flags
    exclude one another.
    """

    flags: tuple[Flag, ...]
    to_cli: Callable[[Any], Any] = _same
    to_config: Callable[..., Any] = _same
    group: str | None = None
    exclusive: bool = False

    @property
    def dests(self) -> tuple[str, ...]:
        """The flags' destinations, each once, in order."""
        return tuple(dict.fromkeys(f.dest for f in self.flags))


def option(
    name: str,
    dest: str,
    *,
    to_cli: Callable[[Any], Any] = _same,
    to_config: Callable[..., Any] = _same,
    group: str | None = None,
    also: tuple[Flag, ...] = (),
    exclusive: bool = False,
    **kwargs: Any,
) -> dict[str, Option]:
    """Field metadata for the flag ``name`` (destination ``dest``) plus the ``also`` flags."""
    flags = (Flag((name,), dest, kwargs), *also)
    return {"cli": Option(flags, to_cli, to_config, group, exclusive)}


def arg(parse: Callable[[str], _T]) -> Callable[[str], _T]:
    """``parse`` as an argparse type: its ``ValueError`` text becomes the one-line error."""

    def check(value: str) -> _T:
        try:
            return parse(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return check


def _whole(value: str, minimum: int) -> int:
    try:
        return validate.count("value", int(value), minimum=minimum)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a whole number >= {minimum}, got {value!r}"
        ) from None


def positive_int(value: str) -> int:
    """A whole number >= 1."""
    return _whole(value, 1)


def usable_cpus() -> int:
    """The number of CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def worker_count(value: str) -> int:
    """``auto`` (one worker per usable CPU, see :func:`usable_cpus`) or a whole number >= 1."""
    if value.strip().lower() == "auto":
        return usable_cpus()
    try:
        return _whole(value, 1)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"must be 'auto' or a whole number >= 1, got {value!r}"
        ) from None


def non_negative_int(value: str) -> int:
    """A whole number >= 0."""
    return _whole(value, 0)


def seconds(value: str) -> float:
    """A finite number of seconds >= 0."""
    try:
        return validate.seconds("value", float(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {value!r}") from None


def octal_mode(value: str) -> int:
    """Octal permissions 000-777."""
    try:
        mode = int(value, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"must be octal permissions 000-777, got {value!r}")
    return mode


def group_id(value: str) -> int:
    """A group name or number → its id (the userdb's rule, as an option error)."""
    try:
        return userdb_group_id(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
