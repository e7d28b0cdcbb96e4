"""Child for test_names_multihost: deliver COUNT messages into one Maildir, count O_EXCL retries.

Run as ``python namechild.py MAILDIR TAG COUNT BATCH``, usually inside its own
PID and UTS namespaces. It prints one JSON line when ready (its pid and host
name), waits for a line on stdin so that all children start together, then
delivers through ``commit_batch`` with an ``FsOps`` whose ``create`` counts
``FileExistsError`` (each one is a generated name that was already taken in
``tmp/``, and made the store retry with a new name), and prints a JSON line
with the ids and that count.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys

from delivery_executor import FsOps, Maildir, commit_batch


def body(tag: str, i: int) -> bytes:
    """Message ``i`` of child ``tag``: distinct for every (tag, i), checkable byte for byte."""
    digest = hashlib.sha256(f"{tag}/{i}".encode()).hexdigest()
    return f"From: {tag}@example.org\r\nSubject: {tag} {i}\r\n\r\n{digest}\r\n{digest}\r\n".encode()


class CountingOps(FsOps):
    """The real syscalls; ``eexist`` counts the creates that found the name taken."""

    __slots__ = ("eexist",)

    def __init__(self) -> None:
        self.eexist = 0

    def create(self, path: str) -> int:
        try:
            return super().create(path)
        except FileExistsError:
            self.eexist += 1
            raise


def main(argv: list[str]) -> int:
    path, tag, count, batch = argv[0], argv[1], int(argv[2]), int(argv[3])
    box = Maildir.open(path)
    ops = CountingOps()
    bodies = [body(tag, i) for i in range(count)]
    print(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}), flush=True)
    if sys.stdin.readline().strip() != "go":
        return 3
    ids: list[str] = []
    for start in range(0, count, batch):
        [result] = commit_batch([(box, bodies[start : start + batch])], ops=ops)
        if isinstance(result, OSError):
            raise result
        ids.extend(m.name for m in result)
    print(json.dumps({"ids": ids, "eexist": ops.eexist}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
