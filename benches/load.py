"""The SMTP/LMTP load benchmark: the original's table, beside the baselines and Dovecot.

    .venv/bin/python -m benches.load --workloads base --duration 10 --warmup 2 \\
        [--json out.json] [--plot out.png]

(``python3 tasks.py loadbench ...`` runs the same.) For each workload and mode,
in one run on one fresh file system (a loop-mounted ext4 with a journal, as
root): start the server in a child process on loopback
(:class:`delivery_executor.testing.ServerProcess`), drive it from a separate
load-generator process (:mod:`benches.loadgen`: closed-loop clients, a new
connection per message), note the peak RSS of every server process, stop it
with SIGTERM, read its summary, and check that every copy the load generator
saw acknowledged is a file in ``new/``.

Modes:
    noop-stock    aiosmtpd's own SMTP/LMTP classes, discarding: the stock ceiling
    noop          serve's protocol classes, discarding: our protocol ceiling
    per-message   naive durable delivery (aiofiles write, fsync, rename, fsync dir)
    window-1      the executor with the original's fixed 10 ms window, 1 flush at a time
    window-2      the same with 2 concurrent flushes (the original 1.1 default)
    executor      serve's defaults (eager batching, sync auto, a helper writer process)
    executor-loop the same, batches written on the loop, syncs in a thread (--writer loop)
    executor-w2   serve's defaults with --workers 2
    executor-bare serve with CRLF kept and plain names (--line-endings crlf --no-size-names)
    executor-logged  serve's defaults with the per-delivery INFO log line, to a file
    executor-userdb  serve's defaults, recipients looked up in a 10,000-user passwd-file,
                  quota on (``maildirsize`` kept per mailbox)
    executor-sieve20 serve's defaults with a 20-rule ``--sieve-before`` script
                  (benches/sieve20.sieve) that files nothing the load sends
    dovecot       Dovecot's LMTP, mail_fsync=always (benches/dovecot-lmtp.conf), started here
A mode name ending in ``@asyncio`` or ``@uvloop`` runs that mode on that loop.

Workloads are named, or picked by family: ``base`` (the original's three),
``size`` (4 KiB, 64 KiB, 1 MiB, mixed), ``rcpts`` (10 recipients per message),
``conns`` (1, 32, 256, 1,000 sessions); ``all`` is every one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from delivery_executor.testing import ServerProcess, free_port

from .benchfs import bench_filesystem

__all__ = ["MODES", "WORKLOADS", "Row", "Workload", "format_table", "main", "run_cell"]

_REPO = Path(__file__).resolve().parent.parent
_STOCK = [sys.executable, "-m", "benches.stock_server"]  # takes serve's options, ignores most

MODES: dict[str, list[str]] = {
    "noop-stock": [],
    "noop": ["--handler", "benches.baselines:noop"],
    "per-message": ["--handler", "benches.baselines:per_message"],
    "window-1": ["--policy", "window", "--max-concurrent-flushes", "1"],
    "window-2": ["--policy", "window", "--max-concurrent-flushes", "2"],
    "executor": [],
    "executor-loop": ["--writer", "loop"],
    "executor-w2": ["--workers", "2"],
    "executor-thread": ["--writer", "thread"],
    "executor-w2-loop": ["--workers", "2", "--writer", "loop"],
    "executor-w2-thread": ["--workers", "2", "--writer", "thread"],
    "executor-w1": ["--workers", "1"],
    "executor-syncfs": ["--sync", "syncfs"],  # two syncfs per batch, not the writeback form
    "executor-bare": ["--line-endings", "crlf", "--no-size-names"],
    "executor-logged": ["--log-level", "INFO", "--log-file", "{root}.log"],
    "executor-userdb": ["--userdb", "passwd-file:{root}.users", "--quota-rule", "*:storage=10G"],
    # A 20-rule Sieve script that the load's messages never match (issue 21's row).
    "executor-sieve20": ["--sieve-before", str(_REPO / "benches" / "sieve20.sieve")],
    "dovecot": [],
}
_EXTERNAL = ("noop-stock", "noop", "dovecot", "target")  # no executor summary, no disk check


@dataclass(frozen=True)
class Workload:
    name: str
    family: str
    conns: int
    mailboxes: int
    rcpts: int
    size: str  # bytes, or "mixed"


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("32 conns/1 box", "base", 32, 1, 1, "498"),
        Workload("32 conns/1000 boxes", "base", 32, 1000, 1, "498"),
        Workload("1 conn/1 box", "base", 1, 1, 1, "498"),
        Workload("4 KiB", "size", 32, 1000, 1, str(4 * 1024)),
        Workload("64 KiB", "size", 32, 1000, 1, str(64 * 1024)),
        Workload("1 MiB", "size", 32, 1000, 1, str(1024 * 1024)),
        Workload("mixed sizes", "size", 32, 1000, 1, "mixed"),
        Workload("10 rcpts/msg", "rcpts", 32, 1000, 10, "498"),
        Workload("1 conn", "conns", 1, 1000, 1, "498"),
        Workload("32 conns", "conns", 32, 1000, 1, "498"),
        Workload("256 conns", "conns", 256, 1000, 1, "498"),
        Workload("1000 conns", "conns", 1000, 1000, 1, "498"),
    )
}
_SUMMARY = re.compile(r"summary: delivered (\d+), failed (\d+), batches (\d+), .* syncs (\d+)")


@dataclass
class Row:
    workload: str
    mode: str
    msg_s: float
    copies_s: float
    mb_s: float
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
    rss_mib: float
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


def count_and_clear(root: Path, mail: Path | None = None, keep: bool = False) -> int:
    """The files in every ``new/`` under ``mail`` (default ``root``); then ``root`` is removed.

    A run's mail is only counted. Kept, the cells of one run could fill the
    8 GiB bench image (1 MiB messages write about 700 MB per cell: the last
    cells failed with ENOSPC), and before that the later cells measured this
    VM's writes with the earlier cells' files in the page cache, several
    times slower (:mod:`benches.cached_write`, BUDGETS.md).
    """
    n = _count_files(mail or root)
    if keep:  # for a caller that looks at the mail (the tests)
        return n
    shutil.rmtree(root, ignore_errors=True)
    Path(f"{root}.users").unlink(missing_ok=True)
    # The deletion dirties bitmaps, directories and inode tables: written now,
    # not by the next cell's first syncfs.
    os.sync()
    return n


def _peak_rss_mib(pgid: int) -> float:
    """Sum of VmHWM over the live processes of process group ``pgid`` (server, workers, helpers)."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pgid:
                continue
            with open(f"/proc/{entry.name}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1])
        except (OSError, ValueError):
            continue
    return total / 1024


def _load(
    port: int, wl: Workload, duration: float, warmup: float, lmtp: bool, host: str = "127.0.0.1"
) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benches.loadgen", "--host", host, "--port", str(port)]
    cmd += ["--conns", str(wl.conns), "--mailboxes", str(wl.mailboxes), "--rcpts", str(wl.rcpts)]
    cmd += ["--size", wl.size, "--duration", str(duration), "--warmup", str(warmup)]
    cmd += [] if lmtp else ["--smtp"]
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=duration + warmup + 300, cwd=_REPO, env=_env()
    )
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr}")
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def _server_args(
    mode: str, wl: Workload, lmtp: bool, root: Path
) -> tuple[list[str], int, list[str] | None]:
    base, _, loop = mode.partition("@")
    own = [a.replace("{root}", str(root)) for a in MODES[base]]
    args = ["--log-level", "WARNING", *own, *([] if lmtp else ["--smtp"])]
    # Every session comes from 127.0.0.1 here: no per-address cap.
    args += ["--max-connections", str(max(256, wl.conns + 64)), "--max-connections-per-ip", "0"]
    if loop:
        args += ["--loop", loop]
    workers = 1
    if "--workers" in args:
        i = args.index("--workers")
        workers = int(args[i + 1])
        del args[i : i + 2]
    return args, workers, (_STOCK if base == "noop-stock" else None)


@contextlib.contextmanager
def _dovecot(root: Path) -> Iterator[tuple[int, int]]:
    """Dovecot's LMTP (benches/dovecot-lmtp.conf) on a free port, mail under ``root``.

    Yields the port and the master's pid (its children are the LMTP processes).
    """
    binary = shutil.which("dovecot") or "/usr/sbin/dovecot"
    port = free_port()
    for sub in ("mail", "run", "state"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    mail = pwd.getpwnam("mail")
    os.chown(root / "mail", mail.pw_uid, mail.pw_gid)
    conf = (_REPO / "benches" / "dovecot-lmtp.conf").read_text()
    conf = conf.replace("@BASE@", str(root)).replace("port = 10024", f"port = {port}")
    (root / "dovecot.conf").write_text(conf)
    proc = subprocess.Popen([binary, "-F", "-c", str(root / "dovecot.conf")])
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dovecot did not start: {(root / 'dovecot.log').read_text()}")
            time.sleep(0.1)
        yield port, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


USERS = 10_000


def users_file(root: Path) -> None:
    """The 10,000-user passwd-file that the userdb mode names (the load's addresses among them)."""
    users = ["alice@example.org", *(f"user{k}@example.org" for k in range(USERS - 1))]
    Path(f"{root}.users").write_text("".join(f"{u}::::::\n" for u in users))


def run_cell(
    base: Path,
    workload: str,
    mode: str,
    duration: float,
    warmup: float,
    lmtp: bool,
    keep: bool = False,
) -> Row:
    """One server, one load run, one verified row; its mail is removed unless ``keep``."""
    wl = WORKLOADS[workload]
    root = base / f"{mode.replace('@', '-')}-{len(os.listdir(base))}"
    if mode == "dovecot":
        with _dovecot(root) as (port, _):
            res = _load(port, wl, duration, warmup, lmtp)
        return _row(wl, mode, res, [], count_and_clear(root, root / "mail", keep), 0.0)
    if mode.partition("@")[0] == "executor-userdb":
        users_file(root)
    args, workers, command = _server_args(mode, wl, lmtp, root)
    server = ServerProcess(
        root, *args, workers=workers, env=_env(), start_timeout=30, program=command or ()
    )
    with server:
        res = _load(server.port, wl, duration, warmup, lmtp)
        rss = _peak_rss_mib(os.getpgid(server.proc.pid))
        server.stop(signal.SIGTERM, timeout=120)
    return _row(wl, mode, res, server.lines, count_and_clear(root, keep=keep), rss)


def _row(
    wl: Workload, mode: str, res: dict[str, Any], lines: list[str], on_disk: int, rss: float
) -> Row:
    sums = [m for line in lines if (m := _SUMMARY.search(line))]
    delivered = sum(int(m.group(1)) for m in sums)
    batches = sum(int(m.group(3)) for m in sums)
    syncs = sum(int(m.group(4)) for m in sums)
    return Row(
        workload=wl.name,
        mode=mode,
        msg_s=res["msg_s"],
        copies_s=res["copies_s"],
        mb_s=res["mb_s"],
        p50_ms=res["p50_ms"],
        p90_ms=res["p90_ms"],
        p99_ms=res["p99_ms"],
        p999_ms=res["p999_ms"],
        max_ms=res["max_ms"],
        errors=res["errors"],
        mean_batch=delivered / batches if batches else 0.0,
        syncs_per_s=(syncs / delivered * res["copies_s"]) if delivered else 0.0,
        acked=res["acked_total"],
        on_disk=on_disk,
        rss_mib=rss,
        cdf_ms=res["cdf_ms"],
    )


def format_table(rows: list[Row]) -> str:
    head = (
        f"{'workload':<20} {'mode':<16} {'msg/s':>7} {'copies/s':>8} {'MB/s':>6} {'p50':>6}"
        f" {'p99':>6} {'p99.9':>6} {'batch':>5} {'syncs/s':>7} {'RSS MiB':>7} {'on disk/acked':>15}"
    )
    out = [head, "-" * len(head)]
    for r in rows:
        noop = r.mode.startswith("noop") or r.mode == "target"
        disk = "-" if noop else f"{r.on_disk}/{r.acked}"
        rss = f"{r.rss_mib:7.0f}" if r.rss_mib else "      -"
        out.append(
            f"{r.workload:<20} {r.mode:<16} {r.msg_s:>7.0f} {r.copies_s:>8.0f} {r.mb_s:>6.1f}"
            f" {r.p50_ms:>6.1f} {r.p99_ms:>6.1f} {r.p999_ms:>6.1f} {r.mean_batch:>5.1f}"
            f" {r.syncs_per_s:>7.0f} {rss} {disk:>15}"
            + (f"  ({r.errors} errors)" if r.errors else "")
        )
    out.append(
        "latencies in ms; RSS = peak of every server process, summed;"
        " 'on disk/acked' = files in new/ over copies acknowledged (250)"
    )
    return "\n".join(out)


def _plot(rows: list[Row], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install 'delivery-executor[plot]')", file=sys.stderr)
        return
    families = list(
        dict.fromkeys(WORKLOADS[r.workload].family for r in rows if r.workload in WORKLOADS)
    )
    fig, axes = plt.subplots(len(families), 2, figsize=(14, 4.5 * len(families)), squeeze=False)
    for (ax_rate, ax_p99), family in zip(axes, families, strict=True):
        fam = [r for r in rows if WORKLOADS[r.workload].family == family]
        workloads = list(dict.fromkeys(r.workload for r in fam))
        modes = list(dict.fromkeys(r.mode for r in fam))
        width = 0.8 / max(1, len(modes))
        for i, mode in enumerate(modes):
            xs = [x + i * width for x in range(len(workloads))]
            pick = {r.workload: r for r in fam if r.mode == mode}
            rate = [pick[w].copies_s if w in pick else 0 for w in workloads]
            p99 = [pick[w].p99_ms if w in pick else 0 for w in workloads]
            color = plt.get_cmap("tab20")(i % 20)
            ax_rate.bar(xs, rate, width, label=mode, color=color)
            ax_p99.bar(xs, p99, width, label=mode, color=color)
        for ax, title in ((ax_rate, "copies/s"), (ax_p99, "p99 ms")):
            ax.set_xticks(
                [x + width * (len(modes) - 1) / 2 for x in range(len(workloads))], workloads
            )
            ax.set_title(f"{family}: {title}")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def _pick_workloads(spec: str) -> list[str]:
    if spec == "all":
        return list(WORKLOADS)
    out: list[str] = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        family = [n for n, w in WORKLOADS.items() if w.family == item]
        if family:
            out += family
        elif item in WORKLOADS:
            out.append(item)
        else:
            raise ValueError(f"unknown workload or family {item!r}: {list(WORKLOADS)}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benches.load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per cell")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    p.add_argument(
        "--modes", default="noop,per-message,window-1,window-2,executor,executor-loop,executor-w2"
    )
    p.add_argument("--workloads", default="base", help="names or families, comma-separated")
    p.add_argument("--smtp", action="store_true", help="SMTP instead of LMTP")
    p.add_argument("--target", help="HOST:PORT of an external server to drive instead")
    p.add_argument("--json", type=Path, help="write the rows as JSON here")
    p.add_argument("--plot", type=Path, help="write per-family charts as a PNG here")
    a = p.parse_args(argv)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [m for m in modes if m.partition("@")[0] not in MODES]
    if bad:
        p.error(f"unknown mode(s) {bad}; choose from {list(MODES)}")
    try:
        workloads = _pick_workloads(a.workloads)
    except ValueError as exc:
        p.error(str(exc))
    lmtp = not a.smtp
    rows: list[Row] = []
    if a.target:
        host, _, port = a.target.rpartition(":")
        for i, name in enumerate(workloads, 1):
            print(f"[{i}/{len(workloads)}] {a.target}: {name} ...", flush=True)
            res = _load(int(port), WORKLOADS[name], a.duration, a.warmup, lmtp, host)
            rows.append(_row(WORKLOADS[name], "target", res, [], 0, 0.0))
        print(format_table(rows))
    else:
        with bench_filesystem() as (base, description):
            print(f"file system: {description}", flush=True)
            cells = [(wl, m) for wl in workloads for m in modes]
            for i, (wl, mode) in enumerate(cells, 1):
                print(f"[{i}/{len(cells)}] {wl:<20} {mode:<16}", end=" ", flush=True)
                row = run_cell(base, wl, mode, a.duration, a.warmup, lmtp)
                print(f"{row.msg_s:7.0f} msg/s  p99 {row.p99_ms:6.1f} ms", flush=True)
                rows.append(row)
        print(format_table(rows))
        print(f"file system: {description}")
    if a.json:
        a.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    if a.plot:
        _plot(rows, a.plot)
    lost = [r for r in rows if r.mode.partition("@")[0] not in _EXTERNAL and r.on_disk < r.acked]
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
