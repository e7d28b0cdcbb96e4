"""Start-up checks for ``serve``: each failure is one clear line, before anything listens.

:class:`StartupError` is what every check raises; the CLI prints it as
``delivery-executor serve: <message>`` and exits with status 2, the status of
a bad option value, since a wrong ``--root``, certificate or socket path is a
configuration error in the same sense.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["StartupError", "check_root", "check_scripts"]


class StartupError(Exception):
    """``serve`` cannot start as configured; the message says what to fix (one line)."""


def check_root(root: Path) -> None:
    """Create ``root`` if missing (mode 0700), then prove we can write there.

    The proof creates and removes a probe file, so a read-only mount, a
    missing permission or a full inode table is reported at start and not as
    a ``451`` on the first message. Costs one mkdir, open and unlink.
    Raises :class:`StartupError`.
    """
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        raise StartupError(f"--root {root}: exists and is not a directory") from None
    except OSError as exc:
        raise StartupError(f"--root {root}: cannot create it: {exc.strerror}") from exc
    if not root.is_dir():
        raise StartupError(f"--root {root}: exists and is not a directory")
    probe = root / f".delivery-executor-probe.{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"probe\n")
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise StartupError(
            f"--root {root}: not writable by uid {os.geteuid()}: {exc.strerror}"
        ) from exc


def check_scripts(paths: Iterable[str | os.PathLike[str]]) -> None:
    """Each admin Sieve script (``--sieve-before`` etc.) must be a file; one ``stat`` each.

    Raises :class:`StartupError` naming the first that is not.
    """
    for p in paths:
        if not os.path.isfile(p):
            raise StartupError(f"Sieve script {os.fspath(p)!r} does not exist or is not a file")
