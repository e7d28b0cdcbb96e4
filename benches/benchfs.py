"""Where benchmarks write: a fresh loop-mounted ext4 with a journal, if we can.

The root file system of these machines is ext4 *without* a journal, where every
fsync is its own device flush; production ext4/XFS have journals. As root we
make and mount our own image so figures are representative; otherwise we fall
back to a temporary directory and say so.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

IMAGE_SIZE = "8G"  # sparse: only what is written takes space


@contextlib.contextmanager
def bench_filesystem(kind: str = "ext4") -> Iterator[tuple[Path, str]]:
    """Yield ``(directory, description)`` on a fresh file system, unmounted afterwards."""
    work = Path(tempfile.mkdtemp(prefix="de-bench-", dir="/var/tmp"))
    work.chmod(0o755)  # Dovecot's LMTP runs as the mail user and must reach its Maildirs
    mnt = work / "mnt"
    mnt.mkdir()
    image = work / f"{kind}.img"
    mounted = False
    why = ""
    try:
        if os.geteuid() != 0:
            why = "not root"
        elif shutil.which(f"mkfs.{kind}") is None:
            why = f"mkfs.{kind} not found"
        else:
            subprocess.run(["truncate", "-s", IMAGE_SIZE, str(image)], check=True)
            mk = subprocess.run(
                # No lazy init: ext4lazyinit would zero inode tables in the
                # background during the measurements. One inode per 4 KiB: a
                # load run writes hundreds of thousands of small files.
                [
                    f"mkfs.{kind}",
                    "-q",
                    "-F",
                    "-i",
                    "4096",
                    "-E",
                    "lazy_itable_init=0,lazy_journal_init=0",
                    str(image),
                ]
                if kind == "ext4"
                else [f"mkfs.{kind}", "-q", "-f", str(image)],
                capture_output=True,
                text=True,
            )
            if mk.returncode == 0:
                mt = subprocess.run(
                    ["mount", "-o", "loop", str(image), str(mnt)], capture_output=True, text=True
                )
                mounted = mt.returncode == 0
                why = "" if mounted else f"mount failed: {mt.stderr.strip()}"
            else:
                why = f"mkfs failed: {mk.stderr.strip()}"
        if mounted:
            mnt.chmod(0o755)
            yield mnt, f"loop-mounted {kind} image (journal, default options) on {_root_fs()}"
        else:
            yield mnt, f"plain directory on {_root_fs()} ({why}; not representative)"
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=False)
        shutil.rmtree(work, ignore_errors=True)


def _root_fs() -> str:
    try:
        out = subprocess.run(
            ["findmnt", "-no", "FSTYPE,SOURCE", "-T", "/var/tmp"], capture_output=True, text=True
        ).stdout.split()
        return f"{out[1]} ({out[0]})" if len(out) == 2 else "unknown"
    except OSError:
        return "unknown"
