"""The load table's key rows again, driven by Postfix's ``smtp-source`` (C, almost no CPU).

Our own load generator is Python and takes a share of the 2 cores; a client
that costs little shows what the servers do with the whole machine. For each
cell (message size, recipients per message) and server, one server starts on
a fresh file system, receives ``smtp-source -L -s 32 -m N -l SIZE [-r RCPTS]``
(N chosen to last about ``--seconds``), and msg/s is N over the wall time of
the run, after a warm-up run. The servers' CPU (user and system, every
process of the server: workers, writer helpers, Dovecot's children) is read
from ``/proc`` around the measured run and reported per message.

``--rounds R`` repeats every cell R times with the modes interleaved, so that
a ratio between two servers is taken within one round, minutes apart at most,
on a machine whose speed drifts; the summary gives each ratio's median.

    .venv/bin/python -m benches.smtp_source [--seconds 10] [--rounds 1] [--json out.json]
        [--cells "500 B,64 KiB,1 MiB,64 KiB x10"] [--modes noop-stock,noop,executor,dovecot]
        [--keep-mail]

Each run's mail is counted, then removed: kept, the later cells of a run
measured this VM's slower writes with the earlier cells' files in the page
cache (``--keep-mail`` shows it; :mod:`benches.cached_write`, BUDGETS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from delivery_executor.testing import ServerProcess

from .benchfs import bench_filesystem
from .load import WORKLOADS, _dovecot, _env, _server_args, count_and_clear

# cell name -> (bytes, recipients per message)
CELLS = {
    "500 B": (500, 1),
    "64 KiB": (64 * 1024, 1),
    "1 MiB": (1024 * 1024, 1),
    "64 KiB x10": (64 * 1024, 10),
}
MODES = ("noop-stock", "noop", "executor", "dovecot")
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
_TICK = os.sysconf("SC_CLK_TCK")


def _source(port: int, size: int, count: int, rcpts: int) -> float:
    """Seconds for ``count`` messages of ``size`` bytes over 32 LMTP sessions."""
    cmd = [SMTP_SOURCE, "-L", "-s", "32", "-m", str(count), "-l", str(size), "-r", str(rcpts)]
    cmd += ["-f", "load@example.net", "-t", "alice@example.org", f"127.0.0.1:{port}"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, timeout=600, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _tree_cpu(root_pid: int) -> tuple[float, float]:
    """User and system seconds of ``root_pid`` and its live descendants, reaped children included.

    Each process counts its own time plus that of the children it has
    reaped (``cutime``/``cstime``), so a child that exits during the run is
    counted by its parent; one that exits unreaped is lost (rare here).
    """
    stats: dict[int, tuple[int, int, int]] = {}  # pid -> (ppid, user ticks, sys ticks)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        fields = raw[raw.rindex(b")") + 2 :].split()
        # fields[0] is state (field 3); ppid is field 4, utime..cstime fields 14-17.
        ppid = int(fields[1])
        user = int(fields[11]) + int(fields[13])
        system = int(fields[12]) + int(fields[14])
        stats[int(entry.name)] = (ppid, user, system)
    tree = {root_pid}
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _, _) in stats.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    user = sum(stats[p][1] for p in tree if p in stats)
    system = sum(stats[p][2] for p in tree if p in stats)
    return user / _TICK, system / _TICK


def run_cell(
    base: Path, cell: str, mode: str, seconds: float, keep: bool = False
) -> dict[str, Any]:
    """One server, a warm-up and one measured ``smtp-source`` run; msg/s and CPU per message.

    The run's mail is counted and removed, unless ``keep`` (``--keep-mail``).
    """
    size, rcpts = CELLS[cell]
    root = base / f"ss-{mode}-{size}-{rcpts}-{len(os.listdir(base))}"
    guess = {500: 1500, 65536: 600, 1048576: 80}[size] // rcpts  # msg/s, to size the runs
    count = max(200, int(guess * seconds))
    if mode == "dovecot":
        with _dovecot(root) as (port, pid):
            _source(port, size, count // 10, rcpts)
            cpu0 = _tree_cpu(pid)
            elapsed = _source(port, size, count, rcpts)
            cpu1 = _tree_cpu(pid)
        on_disk = count_and_clear(root, root / "mail", keep)
    else:
        args, workers, command = _server_args(mode, WORKLOADS["32 conns/1 box"], True, root)
        server = ServerProcess(
            root, *args, workers=workers, env=_env(), start_timeout=30, program=command or ()
        )
        with server:
            _source(server.port, size, count // 10, rcpts)
            cpu0 = _tree_cpu(server.proc.pid)
            elapsed = _source(server.port, size, count, rcpts)
            cpu1 = _tree_cpu(server.proc.pid)
            server.stop(signal.SIGTERM, timeout=120)
        on_disk = count_and_clear(root, keep=keep)
    user_ms = (cpu1[0] - cpu0[0]) * 1000 / count
    sys_ms = (cpu1[1] - cpu0[1]) * 1000 / count
    return {"cell": cell, "size": size, "rcpts": rcpts, "mode": mode, "messages": count,
            "msg_s": count / elapsed, "user_ms": user_ms, "sys_ms": sys_ms,
            "on_disk": on_disk}  # fmt: skip


def _summary(rows: list[dict[str, Any]], modes: list[str]) -> None:
    """Median msg/s and CPU per cell and mode, and each mode's median ratio to Dovecot per round."""
    print("\ncell        mode                  msg/s  user ms  sys ms  ÷ dovecot (median; rounds)")
    for cell in dict.fromkeys(r["cell"] for r in rows):
        here = [r for r in rows if r["cell"] == cell]
        dove = {r["round"]: r["msg_s"] for r in here if r["mode"] == "dovecot"}
        for mode in modes:
            mine = [r for r in here if r["mode"] == mode]
            if not mine:
                continue
            ratios = [r["msg_s"] / dove[r["round"]] for r in mine if r["round"] in dove]
            each = [round(x, 2) for x in ratios]
            ratio = f"{statistics.median(ratios):.2f}× {each}" if ratios else ""
            print(f"{cell:<11} {mode:<20} {statistics.median(r['msg_s'] for r in mine):7.0f}"
                  f" {statistics.median(r['user_ms'] for r in mine):8.2f}"
                  f" {statistics.median(r['sys_ms'] for r in mine):7.2f}  {ratio}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benches.smtp_source", description=__doc__)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--cells", default="500 B,64 KiB,1 MiB")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--json", type=Path)
    p.add_argument(
        "--keep-mail",
        action="store_true",
        help="keep each run's mail on the bench image (as before 2026-12-06's third session)",
    )
    a = p.parse_args(argv)
    cells = a.cells.split(",")
    modes = a.modes.split(",")
    for cell in cells:
        if cell not in CELLS:
            p.error(f"unknown cell {cell!r}; choose from {', '.join(CELLS)}")
    rows = []
    failed = 0
    with bench_filesystem() as (base, description):
        print(f"file system: {description}; client: {SMTP_SOURCE} -L -s 32", flush=True)
        for rnd in range(a.rounds):
            for cell in cells:
                # Alternate the order of the modes between rounds, so that no mode
                # always runs first (or last) on a warming or filling disk.
                for mode in modes if rnd % 2 == 0 else modes[::-1]:
                    try:
                        row = run_cell(base, cell, mode, a.seconds, a.keep_mail)
                        row["round"] = rnd
                    except subprocess.CalledProcessError as exc:
                        # smtp-source stops at the first error reply (its stderr
                        # above says which); the cell has no figure this round,
                        # and the other cells still run.
                        print(f"r{rnd} {cell:<10} {mode:<20} FAILED: {exc}", flush=True)
                        failed += 1
                        continue
                    print(f"r{rnd} {cell:<10} {mode:<20} {row['msg_s']:7.0f} msg/s"
                          f"  user {row['user_ms']:.2f} ms  sys {row['sys_ms']:.2f} ms/msg"
                          f"  ({row['messages']} msgs, {row['on_disk']} on disk)",
                          flush=True)  # fmt: skip
                    rows.append(row)
    _summary(rows, modes)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    if failed:
        print(f"{failed} run(s) failed: their cells lack that round", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
