"""Per-user ownership: a Maildir made for a user with a uid belongs to them.

When ``serve`` runs as root and a user's record gives a ``uid`` (and ``gid``),
the user's Maildir (its directory and ``tmp``, ``new``, ``cur``, plus the
directories from the home down to it) is created and given to that user
before the first delivery. The store then gives every new file the owner of
its Maildir's ``tmp/`` (:attr:`Maildir.owner`), inside the batch, before the
data is written and synced: one batch may hold several users' files, each
owned by its user, for one ``fchown`` per file.
"""

from __future__ import annotations

import contextlib
import os
import pwd

from ..store import Maildir

__all__ = ["give_maildir"]


def _owner_ids(uid: int, gid: int | None) -> tuple[int, int]:
    if gid is not None:
        return uid, gid
    try:
        return uid, pwd.getpwuid(uid).pw_gid
    except KeyError:
        return uid, uid


def give_maildir(path: str, uid: int, gid: int | None, home: str | None) -> bool:
    """Create the Maildir at ``path`` if needed and give it (and the directories from
    ``home`` down to it) to ``uid``/``gid``; only directories root owns change hands.
    Each one changed is fsynced. Blocking; ``OSError`` if it cannot. True if it changed any.
    """
    owner = _owner_ids(uid, gid)
    Maildir.create(path)
    dirs = []
    if home is not None:
        home = os.path.normpath(home)
        rel = os.path.relpath(os.path.dirname(path), home)
        if not rel.startswith(".."):
            d = home
            dirs.append(d)
            for part in [] if rel == "." else rel.split(os.sep):
                d = os.path.join(d, part)
                dirs.append(d)
    dirs += [path, *(os.path.join(path, sub) for sub in ("tmp", "new", "cur"))]
    changed = False
    for d in dirs:
        st = os.lstat(d)
        if st.st_uid != 0 or (st.st_uid, st.st_gid) == owner:
            continue
        os.chown(d, *owner, follow_symlinks=False)
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)  # the new owner survives a crash, as the directory does
        finally:
            os.close(fd)
        changed = True
    if changed:
        with contextlib.suppress(OSError):
            Maildir.forget(path)  # re-stat: the cached entry has no owner yet
    return changed
