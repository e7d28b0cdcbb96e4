"""The SMTP/LMTP load benchmark: the original's table, beside the baselines.

    .venv/bin/python -m benches.load --duration 10 --warmup 2 [--json out.json] [--plot out.png]

(``python3 tasks.py loadbench ...`` runs the same.) For each workload and mode,
in one run on one fresh file system: start ``serve`` in a child process on
loopback (:class:`delivery_executor.testing.ServerProcess`), drive it from a
separate load-generator process (:mod:`benches.loadgen`: C closed-loop
clients, a new connection per message), stop it with SIGTERM, read its
summary, and check that every copy the load generator saw acknowledged is a
file in ``new/``.

Modes:
    noop          the server discards mail: the protocol ceiling (--handler benches.baselines:noop)
    per-message   naive durable delivery (aiofiles write, fsync, rename, fsync dir)
                  (--handler benches.baselines:per_message)
    window-1      the executor with the original's fixed 10 ms window, 1 flush at a time
    window-2      the same with 2 concurrent flushes (the original 1.1 default)
    executor      our defaults (eager policy, sync auto, batches written by a helper process)
    executor-loop the same, batches written on the loop with the syncs in a thread (--writer loop)
    executor-w2   our defaults, --workers 2 (two server processes on one port)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from delivery_executor.testing import ServerProcess

from .benchfs import bench_filesystem

__all__ = ["MODES", "WORKLOADS", "Row", "format_table", "main", "run_cell"]

MODES: dict[str, list[str]] = {
    "noop": ["--handler", "benches.baselines:noop"],
    "per-message": ["--handler", "benches.baselines:per_message"],
    "window-1": ["--policy", "window", "--max-concurrent-flushes", "1"],
    "window-2": ["--policy", "window", "--max-concurrent-flushes", "2"],
    "executor": [],
    "executor-loop": ["--writer", "loop"],
    "executor-w2": ["--workers", "2"],
}
WORKLOADS: dict[str, tuple[int, int]] = {  # name: (connections, recipients)
    "32 conns, 1 rcpt": (32, 1),
    "32 conns, 1000 rcpts": (32, 1000),
    "1 conn, 1 rcpt": (1, 1),
}
_SUMMARY = re.compile(r"summary: delivered (\d+), failed (\d+), batches (\d+), .* syncs (\d+)")
_REPO = Path(__file__).resolve().parent.parent


@dataclass
class Row:
    workload: str
    mode: str
    msg_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    errors: int
    mean_batch: float
    syncs_per_s: float
    acked: int
    on_disk: int
    cdf_ms: list[float]


def _env() -> dict[str, str]:
    # The baselines live in benches/, beside the package: make them importable.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO), env.get("PYTHONPATH")]))
    return env


def _count_files(root: Path) -> int:
    n = 0
    for dirpath, _, filenames in os.walk(root):
        if os.path.basename(dirpath) == "new":
            n += len(filenames)
    return n


def _load(
    port: int, conns: int, rcpts: int, duration: float, warmup: float, lmtp: bool, host: str
) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benches.loadgen", "--host", host, "--port", str(port)]
    cmd += ["--conns", str(conns), "--recipients", str(rcpts)]
    cmd += ["--duration", str(duration), "--warmup", str(warmup)]
    cmd += [] if lmtp else ["--smtp"]
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=duration + warmup + 120, cwd=_REPO, env=_env()
    )
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr}")
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def run_cell(
    base: Path, workload: str, mode: str, duration: float, warmup: float, lmtp: bool
) -> Row:
    """One server, one load run, one verified row."""
    conns, rcpts = WORKLOADS[workload]
    root = base / f"{mode}-{conns}-{rcpts}-{os.getpid()}-{len(os.listdir(base))}"
    args = [*MODES[mode], "--log-level", "WARNING", *([] if lmtp else ["--smtp"])]
    workers = 2 if "--workers" in args else 1
    if workers > 1:
        i = args.index("--workers")
        del args[i : i + 2]
    with ServerProcess(root, *args, workers=workers, env=_env(), start_timeout=30) as server:
        res = _load(server.port, conns, rcpts, duration, warmup, lmtp, "127.0.0.1")
        server.stop(signal.SIGTERM, timeout=60)
    sums = [m for line in server.lines if (m := _SUMMARY.search(line))]
    delivered = sum(int(m.group(1)) for m in sums)
    batches = sum(int(m.group(3)) for m in sums)
    syncs = sum(int(m.group(4)) for m in sums)
    return Row(
        workload=workload,
        mode=mode,
        msg_s=res["msg_s"],
        p50_ms=res["p50_ms"],
        p90_ms=res["p90_ms"],
        p99_ms=res["p99_ms"],
        p999_ms=res["p999_ms"],
        max_ms=res["max_ms"],
        errors=res["errors"],
        mean_batch=delivered / batches if batches else 0.0,
        syncs_per_s=(syncs / delivered * res["msg_s"]) if delivered else 0.0,
        acked=res["acked_total"],
        on_disk=_count_files(root),
        cdf_ms=res["cdf_ms"],
    )


def format_table(rows: list[Row]) -> str:
    head = (
        f"{'workload':<21} {'mode':<12} {'msg/s':>7} {'p50':>6} {'p90':>6} {'p99':>6}"
        f" {'p99.9':>6} {'max':>6} {'batch':>6} {'syncs/s':>8} {'on disk/acked':>15}"
    )
    out = [head, "-" * len(head)]
    for r in rows:
        disk = f"{r.on_disk}/{r.acked}" if r.mode not in ("noop", "target") else "-"
        out.append(
            f"{r.workload:<21} {r.mode:<12} {r.msg_s:>7.0f} {r.p50_ms:>6.1f} {r.p90_ms:>6.1f}"
            f" {r.p99_ms:>6.1f} {r.p999_ms:>6.1f} {r.max_ms:>6.1f} {r.mean_batch:>6.1f}"
            f" {r.syncs_per_s:>8.0f} {disk:>15}"
        )
    out.append("latencies in ms; 'on disk/acked' = files in new/ over copies acknowledged (250)")
    return "\n".join(out)


def _plot(rows: list[Row], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install 'delivery-executor[plot]')", file=sys.stderr)
        return
    workloads = list(dict.fromkeys(r.workload for r in rows))
    fig, axes = plt.subplots(1, len(workloads) + 1, figsize=(6 * (len(workloads) + 1), 4.5))
    for ax, wl in zip(axes, workloads, strict=False):
        for r in (r for r in rows if r.workload == wl):
            ax.plot(r.cdf_ms, [i / 200 for i in range(1, 201)], label=r.mode)
        ax.set_xscale("log")
        ax.set_title(f"latency CDF: {wl}")
        ax.set_xlabel("ms")
        ax.legend(fontsize=8)
    ax = axes[-1]
    modes = list(dict.fromkeys(r.mode for r in rows))
    width = 0.8 / max(1, len(workloads))
    for i, wl in enumerate(workloads):
        vals = [next((r.msg_s for r in rows if r.mode == m and r.workload == wl), 0) for m in modes]
        ax.bar([x + i * width for x in range(len(modes))], vals, width, label=wl)
    ax.set_xticks(
        [x + width * (len(workloads) - 1) / 2 for x in range(len(modes))], modes, rotation=30
    )
    ax.set_title("msg/s")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benches.load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per cell")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    p.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated, from: " + ", ".join(MODES)
    )
    p.add_argument(
        "--workloads",
        default="all",
        help="'all' or indexes, e.g. 0,2 (" + "; ".join(WORKLOADS) + ")",
    )
    p.add_argument("--smtp", action="store_true", help="SMTP instead of LMTP")
    p.add_argument("--target", help="HOST:PORT of an external server to drive instead")
    p.add_argument("--json", type=Path, help="write the rows as JSON here")
    p.add_argument("--plot", type=Path, help="write latency CDFs and msg/s as a PNG here")
    a = p.parse_args(argv)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        p.error(f"unknown mode(s) {bad}; choose from {list(MODES)}")
    names = list(WORKLOADS)
    workloads = names if a.workloads == "all" else [names[int(i)] for i in a.workloads.split(",")]
    lmtp = not a.smtp
    rows: list[Row] = []
    if a.target:
        host, _, port = a.target.rpartition(":")
        for i, wl in enumerate(workloads, 1):
            conns, rcpts = WORKLOADS[wl]
            print(f"[{i}/{len(workloads)}] {a.target}: {wl} ...", flush=True)
            res = _load(int(port), conns, rcpts, a.duration, a.warmup, lmtp, host)
            rows.append(
                Row(
                    wl, "target", res["msg_s"], res["p50_ms"], res["p90_ms"], res["p99_ms"],
                    res["p999_ms"], res["max_ms"], res["errors"], 0.0, 0.0, res["acked_total"], 0,
                    res["cdf_ms"],
                )
            )  # fmt: skip
        print(format_table(rows))
    else:
        with bench_filesystem() as (base, description):
            print(f"file system: {description}", flush=True)
            cells = [(wl, m) for wl in workloads for m in modes]
            for i, (wl, mode) in enumerate(cells, 1):
                print(f"[{i}/{len(cells)}] {wl:<21} {mode:<12}", end=" ", flush=True)
                row = run_cell(base, wl, mode, a.duration, a.warmup, lmtp)
                print(f"{row.msg_s:7.0f} msg/s  p99 {row.p99_ms:6.1f} ms", flush=True)
                rows.append(row)
        print(format_table(rows))
        print(f"file system: {description}")
    if a.json:
        a.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    if a.plot:
        _plot(rows, a.plot)
    failed = [r for r in rows if r.mode not in ("noop", "target") and r.on_disk < r.acked]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
