"""Failure isolation: a broken Maildir fails only its own messages, in every path and sync form."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .isolation import HOWS, SYNCS, Outcome, run, run_all

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
_WANT = {
    "new-removed": errno.ENOENT,
    "new-unreadable": errno.EACCES,
    "root-is-file": errno.ENOTDIR,
}


def check(base: Path, breakage: str, outcomes: list[Outcome]) -> None:
    """Only b's messages failed, each with the breakage's errno naming b; the rest are on disk."""
    assert len(outcomes) == 8
    b = base / "b"
    for o in outcomes:
        if o["box"] != "b":
            assert "id" in o, f"a healthy Maildir failed: {o}"
            assert (base / o["box"] / "new" / o["id"]).read_bytes() == o["body"].encode()
            continue
        assert o.get("errno") == _WANT[breakage], o
        if breakage == "root-is-file":  # creating the tmp file fails
            assert o["filename"].startswith(f"{b}/tmp/"), o
        else:  # the move into new/ fails
            assert o["filename"].startswith(f"{b}/tmp/"), o
            assert o["filename2"].startswith(f"{b}/new/"), o
    if breakage != "root-is-file":
        assert os.listdir(b / "tmp") == []  # the failed group's tmp files are gone


@pytest.mark.parametrize("sync", SYNCS)
@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("breakage", ["new-removed", "root-is-file"])
def test_a_broken_maildir_fails_only_itself(
    tmp_path: Path, breakage: str, how: str, sync: str
) -> None:
    """A Maildir whose new/ is gone or whose path is now a file fails alone in one batch."""
    base = tmp_path / "mail"
    check(base, breakage, run(base, breakage, how, sync))  # type: ignore[arg-type]


_PR_CAPBSET_DROP = 24
_DAC_CAPS = (1, 2, 3)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER


def _drop_dac_override() -> None:  # pragma: no cover - runs in the child before exec
    # Root passes every permission check through these capabilities; without
    # them in the bounding set, the child (and the writer helper it starts) is
    # held to the mode bits like any user. Unlike setuid(nobody), it can still
    # run this interpreter, which lives under /root.
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in _DAC_CAPS:
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            os._exit(99)


def test_an_unreadable_new_fails_only_itself_for_an_unprivileged_user(tmp_path: Path) -> None:
    """chmod 000 new/, as a user the mode bits bind: EACCES for it alone, in all 12 ways."""
    base = tmp_path / "mail"
    if os.geteuid() != 0:
        results = run_all(base, "new-unreadable")
    else:
        proc = subprocess.run(
            [sys.executable, "-m", "tests.isolation", str(base), "new-unreadable"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=100,
            preexec_fn=_drop_dac_override,
        )
        if proc.returncode == 99:
            pytest.skip("cannot drop CAP_DAC_OVERRIDE from the bounding set here")
        assert proc.returncode == 0, proc.stderr
        results = json.loads(proc.stdout)
    assert sorted(results) == sorted(f"{h}/{s}" for h in HOWS for s in SYNCS)
    for key, outcomes in results.items():
        how, sync = key.split("/")
        check(base / f"{how}-{sync}", "new-unreadable", outcomes)
