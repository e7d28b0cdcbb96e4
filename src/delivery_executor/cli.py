"""The ``delivery-executor`` command (also ``python -m delivery_executor``): ``serve``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from . import configfile
from ._version import __version__
from .logs import LOG_FORMATS, BlockFileHandler, configure_logging
from .server import StartupError
from .server.config import add_arguments, from_args

__all__ = ["main"]


# The options of serve are ServerConfig's fields (server/config.py); here only the
# command's own: --config, logging and --version.


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit status 2), no usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Every default in --help; not 'None' (the help says what none means), nor the
    'True' of a flag that turns a default off (--smtp: the default shows on --lmtp)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action, argparse._StoreFalseAction):
            return action.help
        return super()._get_help_string(action)


def _log_level(value: str) -> str:
    name = value.upper()
    if name not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise argparse.ArgumentTypeError(
            f"must be debug, info, warning, error or critical, got {value!r}"
        )
    return name


def _log_handler(path: Path | None) -> logging.Handler | None:
    if path is None:
        return None
    try:
        return BlockFileHandler(path)
    except OSError as exc:
        raise StartupError(f"--log-file {path}: {exc.strerror}") from None


def _add_serve(
    sub: argparse._SubParsersAction[_Parser],
    name: str = "serve",
    help: str = "run a durable Maildir delivery server (LMTP or SMTP)",
) -> _Parser:
    p = sub.add_parser(name, help=help, formatter_class=_Help)
    p.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file whose keys are these long options (max_size = 1000000,"
        ' listen = ["unix:/run/de/lmtp"]); options given here override it',
    )
    p.add_argument("--log-level", type=_log_level, default="INFO", help="debug ... critical")
    p.add_argument(
        "--log-file",
        type=Path,
        metavar="FILE",
        help=(
            "append the log here instead of stderr, INFO lines in blocks at most 0.2 s"
            " late; reopened on SIGHUP (default: stderr)"
        ),
    )
    p.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text",
        help="one line per record: text, or a JSON object",
    )
    p.add_argument("--version", action="version", version=f"delivery-executor {__version__}")
    add_arguments(p)  # one option per ServerConfig field, defaults from the fields
    return p


def _serve(args: argparse.Namespace, check: _Parser | None = None) -> int:
    """Run ``serve``; with ``check`` (check-config), validate and print the settings instead."""
    from .server import run_server

    if check is None:
        try:
            log_file = _log_handler(args.log_file)
        except StartupError as exc:
            print(f"delivery-executor serve: {exc}", file=sys.stderr)
            return 2
        configure_logging(args.log_level, args.log_format, handler=log_file)
    if args.detail_to_folder and not args.recipient_delimiter:
        print("delivery-executor serve: --detail-to-folder needs --recipient-delimiter",
              file=sys.stderr)  # fmt: skip
        return 2
    config = from_args(args)
    try:
        _check_userdb(config)  # here, not in each worker: a bad value exits 2, in one line
        if check is not None:
            return _check_config(check, args)
        return run_server(config)
    except (StartupError, ValueError, TypeError) as exc:
        # The whole run is inside this try: start-up checks raise these, and so
        # would a ValueError or TypeError escaping serve() later (one process;
        # workers report their own). Either way exit 2, as for a bad option
        # value: most likely the configuration needs fixing (README).
        command = "serve" if check is None else "check-config"
        print(f"delivery-executor {command}: {exc}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``delivery-executor`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _Parser(prog="delivery-executor", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "serve": _add_serve(sub),
        "check-config": _add_serve(
            sub, "check-config", "check serve's settings (--config FILE and flags), print them"
        ),
    }
    args = parser.parse_args(argv)
    command = args.command
    if args.config is not None:
        try:  # the file first, then the flags after the command on top
            args = configfile.merged_args(
                commands[command], args.config, argv[argv.index(command) + 1 :]
            )
        except ValueError as exc:
            print(f"delivery-executor {command}: {exc}", file=sys.stderr)
            return 2
    return _serve(args, commands[command] if command == "check-config" else None)


def _check_userdb(config: object) -> None:
    """``ValueError`` for a bad ``--userdb`` (kind, path, query, package) or mail location."""
    from .userdb import resolver_for

    resolver_for(config)  # builds, reads nothing; quota rules were checked by argparse


def _check_config(parser: _Parser, args: argparse.Namespace) -> int:
    """What check-config does once the ServerConfig is built and checked: the handler
    factory is imported, then the settings are printed as TOML."""
    from .server.core import load_handler_factory

    if args.handler is not None:
        load_handler_factory(args.handler)
    for line in configfile.effective_settings(parser, args):
        print(line)
    return 0
