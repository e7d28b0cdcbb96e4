"""The load table's key rows again, driven by Postfix's ``smtp-source`` (C, almost no CPU).

Our own load generator is Python and takes a share of the 2 cores; a client
that costs little shows what the servers do with the whole machine. For each
message size and server, one server starts on a fresh file system, receives
``smtp-source -L -s 32 -m N -l SIZE`` (N chosen to last about ``--seconds``),
and msg/s is N over the wall time of the run, after a warm-up run.

    .venv/bin/python -m benches.smtp_source [--seconds 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from delivery_executor.testing import ServerProcess

from .benchfs import bench_filesystem
from .load import WORKLOADS, _count_files, _dovecot, _env, _server_args

SIZES = {"500 B": 500, "64 KiB": 64 * 1024, "1 MiB": 1024 * 1024}
MODES = ("noop-stock", "noop", "executor", "dovecot")
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"


def _source(port: int, size: int, count: int) -> float:
    """Seconds for ``count`` messages of ``size`` bytes over 32 LMTP sessions."""
    cmd = [SMTP_SOURCE, "-L", "-s", "32", "-m", str(count), "-l", str(size)]
    cmd += ["-f", "load@example.net", "-t", "alice@example.org", f"127.0.0.1:{port}"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, timeout=600, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def run_cell(base: Path, label: str, mode: str, seconds: float) -> dict[str, Any]:
    size = SIZES[label]
    root = base / f"ss-{mode}-{size}-{len(os.listdir(base))}"
    guess = {500: 1500, 65536: 600, 1048576: 80}[size]  # msg/s, to size the runs
    count = max(200, int(guess * seconds))
    if mode == "dovecot":
        with _dovecot(root) as port:
            _source(port, size, count // 10)
            elapsed = _source(port, size, count)
        on_disk = _count_files(root / "mail")
    else:
        args, _, command = _server_args(mode, WORKLOADS["32 conns/1 box"], True, root)
        with ServerProcess(root, *args, env=_env(), start_timeout=30, program=command or ()) as s:
            _source(s.port, size, count // 10)
            elapsed = _source(s.port, size, count)
            s.stop(signal.SIGTERM, timeout=120)
        on_disk = _count_files(root)
    return {"size": label, "mode": mode, "messages": count, "msg_s": count / elapsed,
            "on_disk": on_disk}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benches.smtp_source", description=__doc__)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    rows = []
    with bench_filesystem() as (base, description):
        print(f"file system: {description}; client: {SMTP_SOURCE} -L -s 32", flush=True)
        for label in SIZES:
            for mode in a.modes.split(","):
                row = run_cell(base, label, mode, a.seconds)
                print(f"{label:<7} {mode:<11} {row['msg_s']:8.0f} msg/s  ({row['messages']} msgs,"
                      f" {row['on_disk']} on disk)", flush=True)  # fmt: skip
                rows.append(row)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
