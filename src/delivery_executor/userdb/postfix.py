"""Postfix ``virtual_mailbox_maps`` as a user database: ``texthash:``, ``lmdb:``, ``cdb:``.

Semantics are those of Postfix's ``virtual(8)``: keys are looked up as
``user+ext@domain`` (when the address had an extension), ``user@domain``,
then ``@domain``; a result is a path relative to ``--root`` (Postfix's
``virtual_mailbox_base``) and must end in ``/``, meaning Maildir. A result
without the ``/`` names an mbox file, which is not supported: that recipient is
deferred (``451 4.3.0``) and the reason logged, never delivered elsewhere.
Keys are matched case-insensitively (lowercased), as ``postmap`` stores them.

Both forms are ``stat``-ed on every lookup and re-read when the file changed.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

from ..errors import UserdbUnavailable
from .base import UserKey, UserRecord

__all__ = ["CdbMap", "LmdbMap", "TexthashMap", "parse_texthash"]


def _candidates(key: UserKey, delimiter: str) -> Iterator[str]:
    if key.extension:
        yield f"{key.local}{delimiter}{key.extension}@{key.domain}"
    yield key.user
    yield f"@{key.domain}"


class _PostfixMap:
    kind = ""

    def __init__(self, path: str, *, delimiter: str = "+") -> None:
        if not isinstance(path, str) or not path:
            raise ValueError(f"{self.kind} needs a path, not {path!r}")
        self.path = path
        self.delimiter = delimiter
        self._sig: tuple[int, int, int] | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"

    def reload(self) -> None:
        """Read the file again at the next lookup."""
        self._sig = None

    async def lookup(self, key: UserKey, /) -> UserRecord | None:
        """The Maildir of ``key`` as a ``mail`` relative to the root; ``None`` if unknown."""
        try:
            st = os.stat(self.path)
            sig = (st.st_mtime_ns, st.st_size, st.st_ino)
            if sig != self._sig:
                await self._load()
                self._sig = sig
            for candidate in _candidates(key, self.delimiter):
                result = self._get(candidate.lower())
                if result is not None:
                    break
            else:
                return None
        except UserdbUnavailable:
            raise
        except Exception as exc:  # OSError, lmdb.Error: the map cannot answer
            raise UserdbUnavailable(f"{self.kind}:{self.path}: {exc}") from exc
        result = result.strip()
        if not result.endswith("/"):
            raise UserdbUnavailable(
                f"{self.kind}:{self.path}: {candidate} maps to {result!r}, an mbox file"
                " (only Maildir results, ending in '/', are supported)"
            )
        return UserRecord(mail=result)

    async def _load(self) -> None:
        raise NotImplementedError

    def _get(self, key: str) -> str | None:
        raise NotImplementedError


def parse_texthash(text: str) -> dict[str, str]:
    """A texthash file's ``key value`` lines (comments, blanks, continuations as Postfix)."""
    out: dict[str, str] = {}
    last = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace():  # a continuation of the previous value
            if last is not None:
                out[last] += " " + line.strip()
            continue
        parts = line.split(None, 1)
        last = parts[0].lower()
        out[last] = parts[1].strip() if len(parts) > 1 else ""
    return out


class TexthashMap(_PostfixMap):
    """``texthash:PATH``: a ``key value`` text file read whole into memory."""

    kind = "texthash"

    def __init__(self, path: str, *, delimiter: str = "+") -> None:
        super().__init__(path, delimiter=delimiter)
        self._map: dict[str, str] = {}

    async def aclose(self) -> None:
        """Nothing to close."""

    async def _load(self) -> None:
        self._map = await asyncio.to_thread(self._read)

    def _read(self) -> dict[str, str]:
        with open(self.path, encoding="utf-8", errors="replace") as f:
            return parse_texthash(f.read())

    def _get(self, key: str) -> str | None:
        return self._map.get(key)


class LmdbMap(_PostfixMap):
    """``lmdb:PATH``: the single file ``postmap lmdb:`` writes, read-only, no lock.

    Needs the ``lmdb`` package (``pip install delivery-executor[userdb]``).
    Keys and values end in NUL as Postfix writes them; keys without are found too.
    """

    kind = "lmdb"

    def __init__(self, path: str, *, delimiter: str = "+") -> None:
        import lmdb  # noqa: F401  (fail at configuration time if missing)

        super().__init__(path, delimiter=delimiter)
        self._env: Any = None

    async def aclose(self) -> None:
        """Close the environment."""
        if self._env is not None:
            self._env.close()
            self._env = None

    async def _load(self) -> None:
        import lmdb

        if self._env is not None:
            self._env.close()
            self._env = None
        self._env = lmdb.open(
            self.path, subdir=False, readonly=True, lock=False, max_dbs=0, readahead=False
        )

    def _get(self, key: str) -> str | None:
        raw = key.encode()
        with self._env.begin(buffers=False) as txn:
            value = txn.get(raw + b"\0")
            if value is None:
                value = txn.get(raw)
        if value is None:
            return None
        return bytes(value).rstrip(b"\0").decode("utf-8", "replace")


class CdbMap(_PostfixMap):
    """``cdb:PATH``: the ``PATH.cdb`` file ``postmap cdb:PATH`` writes, memory-mapped.

    Needs the ``pure-cdb`` package (``pip install delivery-executor[userdb]``).
    Postfix's cdb keys and values have no NUL; keys with one are found too.
    ``PATH`` may be given with or without its ``.cdb``.
    """

    kind = "cdb"

    def __init__(self, path: str, *, delimiter: str = "+") -> None:
        import cdblib  # noqa: F401  (fail at configuration time if missing)

        super().__init__(path if path.endswith(".cdb") else path + ".cdb", delimiter=delimiter)
        self._reader: Any = None

    async def aclose(self) -> None:
        """Unmap the file."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    async def _load(self) -> None:
        import cdblib

        await self.aclose()
        self._reader = cdblib.Reader.from_file_path(self.path)

    def _get(self, key: str) -> str | None:
        raw = key.encode()
        value = self._reader.get(raw)
        if value is None:
            value = self._reader.get(raw + b"\0")
        if value is None:
            return None
        return bytes(value).rstrip(b"\0").decode("utf-8", "replace")
