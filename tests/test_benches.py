"""The load benchmark's own machinery: cells, baselines, Dovecot, the external target mode."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from benches.benchfs import bench_filesystem
from benches.load import format_table, main, run_cell
from benches.loadgen import body_pool

from delivery_executor.testing import ServerProcess

pytestmark = pytest.mark.timeout(120)

_SUMMARY = re.compile(r"summary: delivered (\d+)")


def test_executor_cell_counts_match_the_disk(tmp_path: Path) -> None:
    """One cell: serve and the load generator in processes; every acked copy is on disk."""
    row = run_cell(tmp_path, "32 conns/1000 boxes", "executor", 1.0, 0.2, lmtp=True)
    assert row.errors == 0
    assert row.msg_s > 0
    assert row.acked >= row.msg_s * 1.0  # the warm-up's deliveries count too
    assert row.on_disk == row.acked
    assert row.mean_batch >= 1
    assert row.rss_mib > 10  # the server and its helper were measured
    assert "32 conns/1000 boxes" in format_table([row])


def test_a_cell_leaves_no_mail_behind(tmp_path: Path) -> None:
    """After a cell is counted its Maildirs are removed: a run's cells cannot fill the image."""
    row = run_cell(tmp_path, "1 conn/1 box", "executor", 0.5, 0.1, lmtp=True)
    assert row.acked > 0 and row.on_disk == row.acked
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]


def test_ten_recipient_cell_counts_copies(tmp_path: Path) -> None:
    """10 recipients per message: copies are ten times the messages, all on disk."""
    row = run_cell(tmp_path, "10 rcpts/msg", "executor", 1.0, 0.2, lmtp=True)
    assert row.errors == 0
    assert row.copies_s == pytest.approx(10 * row.msg_s)
    assert row.on_disk == row.acked


@pytest.mark.parametrize("mode", ["executor-userdb", "executor-sieve20"])
def test_userdb_and_sieve_cells_deliver_where_the_plain_one_does(tmp_path: Path, mode: str) -> None:
    """The userdb+quota and Sieve modes deliver every acked copy into <root>/<domain>/<user>."""
    row = run_cell(tmp_path, "32 conns/1000 boxes", mode, 1.0, 0.2, lmtp=True, keep=True)
    assert row.errors == 0
    assert row.acked > 0 and row.on_disk == row.acked
    (cell,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    users = [p for p in (cell / "example.org").iterdir() if (p / "new").is_dir()]
    assert users and all(p.name.startswith("user") for p in users)
    if mode == "executor-userdb":  # quota on: each mailbox keeps its maildirsize
        assert all((p / "maildirsize").read_text().startswith("10737418240S") for p in users)


def test_stock_noop_and_ours_both_serve(tmp_path: Path) -> None:
    """noop-stock (aiosmtpd's classes) and noop (ours) answer the same load without errors."""
    for mode in ("noop-stock", "noop"):
        # 2 s: the stock reader takes 64 KiB line by line; a loaded machine may finish none in less.
        row = run_cell(tmp_path, "64 KiB", mode, 2.0, 0.2, lmtp=True)
        assert row.errors == 0, mode
        assert row.msg_s > 0, mode
        assert row.on_disk == 0  # nothing stored


def test_mixed_sizes_follow_the_stated_distribution() -> None:
    """The mixed pool is seeded: same bodies each run, mostly small, a few of megabytes."""
    pool = body_pool("mixed", n=400)
    assert pool == body_pool("mixed", n=400)
    small = sum(1 for b in pool if len(b) <= 8 * 1024)
    big = sum(1 for b in pool if len(b) > 128 * 1024)
    assert 0.5 < small / len(pool) < 0.7
    assert 0 < big / len(pool) < 0.1
    assert max(len(b) for b in pool) <= 4 * 1024 * 1024


@pytest.mark.skipif(os.geteuid() != 0, reason="Dovecot runs its LMTP as the mail user: needs root")
@pytest.mark.skipif(shutil.which("dovecot") is None and not os.path.exists("/usr/sbin/dovecot"),
                    reason="dovecot not installed (Debian: dovecot-lmtpd)")  # fmt: skip
def test_dovecot_cell_delivers_into_its_own_maildirs() -> None:
    """The dovecot mode starts Dovecot's LMTP here and its deliveries are counted on disk."""
    with bench_filesystem() as (base, _):  # a place the mail user can reach
        row = run_cell(base, "1 conn/1 box", "dovecot", 0.5, 0.1, lmtp=True)
    assert row.errors == 0
    assert row.msg_s > 0
    assert row.on_disk == row.acked


def test_target_mode_drives_an_external_server(tmp_path: Path) -> None:
    """--target loads a server it did not start and writes its row as JSON."""
    out = tmp_path / "rows.json"
    with ServerProcess(tmp_path / "mail") as srv:
        code = main(
            ["--target", f"127.0.0.1:{srv.port}", "--duration", "0.5", "--warmup", "0.1",
             "--workloads", "1 conn/1 box", "--json", str(out)]
        )  # fmt: skip
        assert srv.stop() == 0
    assert code == 0
    (row,) = json.loads(out.read_text())
    assert row["mode"] == "target"
    assert row["workload"] == "1 conn/1 box"
    assert row["msg_s"] > 0
    assert row["errors"] == 0
    delivered = sum(int(m.group(1)) for line in srv.lines if (m := _SUMMARY.search(line)))
    assert delivered >= row["msg_s"] * 0.5  # the measured half second, at least


def test_sync_forms_bench_runs_and_restores_auto(capsys: pytest.CaptureFixture[str]) -> None:
    """benches.sync_forms prints every form per size and leaves AUTO_SYNCFS_MIN_FILES as it was."""
    from benches import sync_forms

    from delivery_executor.store import commit

    assert sync_forms.main(["--rounds", "2", "--sizes", "1,2"]) == 0
    out = capsys.readouterr().out
    for n in (1, 2):
        line = next(x for x in out.splitlines() if x.startswith(f"N = {n}:"))
        assert all(f in line for f in ("auto", "fsync", "syncfs", "writeback-1"))
    assert "one message, idle" in out and "one message, busy neighbour" in out
    assert commit.AUTO_SYNCFS_MIN_FILES == 2
