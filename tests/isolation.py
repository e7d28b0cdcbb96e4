"""One batch of healthy Maildirs and one broken Maildir, through every delivery path.

``run(base, breakage, how, sync)`` makes four Maildirs under ``base`` (``b``
first in the batch, then ``h0``-``h2``), delivers one message to each (so that
the paths are created and cached), breaks ``b``, then delivers two messages to
each of the four in ONE batch, through ``commit_batch`` or a
``DeliveryExecutor`` with the ``"loop"``, ``"thread"`` or ``"process"`` writer.
It returns one JSON-able outcome per message of that batch.

``python -m tests.isolation BASE BREAKAGE`` runs every path and sync form for
one breakage and prints the outcomes as JSON: the ``chmod 000`` case runs that
way, in a process whose permission checks apply (see ``test_isolation``).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from delivery_executor import DeliveryExecutor, Maildir, commit_batch
from delivery_executor.executor import WriterName
from delivery_executor.store import SyncMode

BREAKAGES = ("new-removed", "new-unreadable", "root-is-file")
HOWS = ("commit_batch", "loop", "thread", "process")
SYNCS: tuple[SyncMode, ...] = ("auto", "syncfs", "fsync")
BOXES = ("b", "h0", "h1", "h2")
Outcome = dict[str, Any]


def break_maildir(path: Path, breakage: str) -> None:
    """Break the Maildir at ``path`` in one of the :data:`BREAKAGES` ways."""
    if breakage == "new-removed":
        shutil.rmtree(path / "new")
    elif breakage == "new-unreadable":
        os.chmod(path / "new", 0)
    elif breakage == "root-is-file":
        shutil.rmtree(path)
        path.write_bytes(b"not a Maildir\n")
    else:
        raise ValueError(breakage)


def _jobs(base: Path) -> list[tuple[str, bytes]]:
    return [(str(base / box), f"{box} #{i}\r\n".encode()) for box in BOXES for i in range(2)]


def _outcome(path: str, body: bytes, res: object) -> Outcome:
    out: Outcome = {"box": os.path.basename(path), "body": body.decode()}
    if isinstance(res, OSError):
        out.update(errno=res.errno, filename=res.filename, filename2=res.filename2)
    else:
        out["id"] = str(res)
    return out


def _via_commit_batch(base: Path, breakage: str, sync: SyncMode) -> list[Outcome]:
    boxes = [Maildir.create(base / box) for box in BOXES]
    for md in boxes:
        md.deliver(b"warm-up\r\n")
    break_maildir(base / "b", breakage)
    jobs = _jobs(base)
    groups = [(md, [b for p, b in jobs if p == str(md.path)]) for md in boxes]
    out = []
    for (md, bodies), res in zip(groups, commit_batch(groups, sync=sync), strict=True):
        for i, body in enumerate(bodies):
            out.append(_outcome(str(md.path), body, res if isinstance(res, OSError) else res[i]))
    return out


async def _via_executor(
    base: Path, breakage: str, writer: WriterName, sync: SyncMode
) -> list[Outcome]:
    async with DeliveryExecutor(writer=writer, sync=sync) as ex:
        for box in BOXES:
            await ex.deliver(base / box, b"warm-up\r\n")
        break_maildir(base / "b", breakage)
        before = ex.stats().batches
        jobs = _jobs(base)
        results = await asyncio.gather(*(ex.deliver(p, b) for p, b in jobs), return_exceptions=True)
        assert ex.stats().batches == before + 1, "the deliveries did not share one batch"
    return [_outcome(p, b, r) for (p, b), r in zip(jobs, results, strict=True)]


def run(base: Path, breakage: str, how: str, sync: SyncMode) -> list[Outcome]:
    """One mixed batch under ``base`` (which must not exist yet); its outcomes."""
    base.mkdir(parents=True)
    if how == "commit_batch":
        return _via_commit_batch(base, breakage, sync)
    return asyncio.run(_via_executor(base, breakage, how, sync))  # type: ignore[arg-type]


def run_all(base: Path, breakage: str) -> dict[str, list[Outcome]]:
    """:func:`run` for every path and sync form, each under its own directory."""
    return {
        f"{how}/{sync}": run(base / f"{how}-{sync}", breakage, how, sync)
        for how in HOWS
        for sync in SYNCS
    }


if __name__ == "__main__":
    print(json.dumps(run_all(Path(sys.argv[1]), sys.argv[2])))
