"""Server CPU per message, mode against mode: what Sieve or userdb+quota costs ``serve``.

    .venv/bin/python -m benches.sieve_cost [--messages 3000] [--rounds 5] \\
        [--modes executor,sieve-none,executor-sieve20] [--profile DIR] [--baseline TREE] \\
        [--conns 8] [--mailboxes 100] [--fs] [--strace]

Throughput says little on a shared machine; CPU seconds per message of the
server's processes (``serve`` and its writer helpers, user and system apart,
from ``/proc/PID/stat``) over a fixed count of messages do. Each round starts
one server per mode, back to back (every other round in reverse order), warms
it with ``--warmup`` messages, then sends ``--messages`` messages (LMTP, 498
bytes, 8 connections, 100 mailboxes) through :mod:`benches.loadgen` and reads
the CPU the server's processes used meanwhile (``--conns`` and ``--mailboxes``
change the load's shape: the load table's "32 conns/1000 boxes" is ``--conns
32 --mailboxes 1000``). Prints per mode the median over
the rounds of µs per message: the serve process's user and system time (Sieve
runs there, on the event loop), its helpers' (the writer processes), the
total, and the ratios of the user time and of the total to the first mode's.
``--profile DIR`` records the serve process of the last round with ``py-spy
record -f raw``. ``--baseline TREE`` (a checkout of an older commit) adds each
mode run from ``TREE/src`` as ``<mode>@base``, interleaved with the current
code's, so old and new are compared back to back; ``--current TREE`` runs the
other modes from ``TREE/src`` instead of this checkout (a snapshot, so that
editing here does not change a run in progress).

``--fs`` runs every server on a fresh loop-mounted ext4 with a journal
(:mod:`benches.benchfs`, as the load table does; needs root) and adds the
loop device's writes per message (``/sys/block/loopN/stat``: requests and
KiB, the journal's included; the file system is ``syncfs``-ed before and after
the measured run, so deferred writeback is counted). ``--strace`` adds one
more unmeasured run per round under ``strace -c -f`` (the serve process with
its threads, and each helper) and prints the syscalls per message of each,
by name: counts, not times (strace slows the server, so batches may grow).

Modes: ``executor`` (serve's defaults), ``sieve-none`` (``--sieve``, no
script anywhere: what a recipient without one pays), ``executor-sieve20``
(a 20-rule ``--sieve-before`` script, benches/sieve20.sieve, that files
nothing the load sends), ``executor-userdb`` (the load table's row: a
10,000-user passwd-file, :func:`benches.load.users_file`, and
``--quota-rule *:storage=10G``), ``userdb-noquota`` (the same passwd-file
without a quota rule: splits the row's cost between the userdb and quota).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from delivery_executor.testing import ServerProcess

from .benchfs import bench_filesystem
from .load import users_file

_REPO = Path(__file__).resolve().parent.parent
MODES: dict[str, list[str]] = {
    "executor": [],
    "sieve-none": ["--sieve"],
    "executor-sieve20": ["--sieve-before", str(_REPO / "benches" / "sieve20.sieve")],
    "executor-userdb": ["--userdb", "passwd-file:{root}.users", "--quota-rule", "*:storage=10G"],
    "userdb-noquota": ["--userdb", "passwd-file:{root}.users"],
}
_TICK = os.sysconf("SC_CLK_TCK")


def _env(tree: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    first = [str(tree / "src")] if tree is not None else []
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*first, str(_REPO), env.get("PYTHONPATH")]))
    return env


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from a /proc scan."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    parents[int(entry.name)] = int(f.read().rpartition(")")[2].split()[1])
            except (OSError, ValueError):
                continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(c for c, pp in parents.items() if pp == p)
    return out


def _cpu(pid: int) -> tuple[float, float, float]:
    """(user, system) seconds of ``pid`` itself, and all of its live descendants'."""
    user = system = others = 0.0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        u, s = int(fields[11]) / _TICK, int(fields[12]) / _TICK  # utime, stime
        if p == pid:
            user, system = u, s
        else:
            others += u + s
    return user, system, others


_SUMMARY = re.compile(r"delivered (\d+), failed \d+, batches (\d+)")


def _load(port: int, messages: int, conns: int, mailboxes: int) -> None:
    cmd = [sys.executable, "-m", "benches.loadgen", "--port", str(port), "--conns", str(conns)]
    cmd += ["--mailboxes", str(mailboxes), "--size", "498", "--duration", "600", "--warmup", "0"]
    cmd += ["--max-messages", str(messages)]
    subprocess.run(cmd, check=True, capture_output=True, cwd=_REPO, env=_env(), timeout=900)


def _loop_device(path: Path) -> str | None:
    """``loopN`` if ``path`` is on a loop-mounted file system, else ``None``."""
    out = subprocess.run(
        ["findmnt", "-no", "SOURCE", "-T", str(path)], capture_output=True, text=True
    ).stdout.strip()
    name = os.path.basename(out)
    return name if name.startswith("loop") and os.path.exists(f"/sys/block/{name}/stat") else None


def _writes(dev: str | None, path: Path) -> tuple[int, int]:
    """(write requests, sectors written) of ``dev`` after a ``syncfs`` of ``path``'s file
    system (so that writeback still pending is counted); zeros without a device."""
    if dev is None:
        return 0, 0
    fd = os.open(path, os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), "syncfs")
    finally:
        os.close(fd)
    with open(f"/sys/block/{dev}/stat") as f:
        fields = f.read().split()
    return int(fields[4]), int(fields[6])  # write I/Os, write sectors


@contextlib.contextmanager
def _straced(pids: list[int], out: Path) -> Iterator[list[Path]]:
    """``strace -c -f`` attached to each of ``pids`` (with their threads) meanwhile;
    yields the files the counts land in (``out.<pid>``), written when it stops."""
    files = [out.with_name(f"{out.name}.{pid}") for pid in pids]
    procs = [
        subprocess.Popen(
            ["strace", "-c", "-f", "-o", str(f), "-p", str(pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pid, f in zip(pids, files, strict=True)
    ]
    try:
        for proc in procs:  # wait until attached: strace says so on stderr
            assert proc.stderr is not None
            proc.stderr.readline()
        yield files
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        for proc in procs:
            proc.wait(60)


def _syscalls(path: Path) -> collections.Counter[str]:
    """Calls by syscall name from one ``strace -c`` table."""
    calls: collections.Counter[str] = collections.Counter()
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text().splitlines():
            f = line.split()
            if len(f) >= 5 and f[3].isdigit() and f[-1] != "total":
                calls[f[-1]] += int(f[3])
    return calls


class _Result:
    """One measured run: figures per message, and syscalls per message by process."""

    def __init__(self) -> None:
        self.per: dict[str, float] = {}
        self.calls: dict[str, collections.Counter[str]] = {}


def _one(
    base: Path,
    mode: str,
    a: argparse.Namespace,
    profile: Path | None,
    dev: str | None,
) -> _Result:
    """Per message of one server's measured run of ``mode``: µs of the serve process
    (user, system) and of its helpers; disk writes; syscalls (``a.strace``)."""
    name, _, old = mode.partition("@")
    root = Path(tempfile.mkdtemp(dir=base, prefix=f"{name}-"))
    if name in ("executor-userdb", "userdb-noquota"):
        users_file(root)
    args = ["--log-level", "WARNING", "--max-connections", "256", "--max-connections-per-ip", "0"]
    args += [x.replace("{root}", str(root)) for x in MODES[name]]
    env = _env(a.baseline if old else a.current)
    n = a.messages
    got = _Result()
    with ServerProcess(root, *args, env=env, start_timeout=30) as server:
        _load(server.port, a.warmup, a.conns, a.mailboxes)
        spy = None
        if profile is not None:
            out = profile / f"{name}{'-base' if old else ''}.txt"
            argv = ["py-spy", "record", "-r", "200", "-f", "raw", "-o", str(out)]
            spy = subprocess.Popen(
                [*argv, "-p", str(server.proc.pid), "--nonblocking"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        w0 = _writes(dev, base)
        u0, s0, o0 = _cpu(server.proc.pid)
        _load(server.port, n, a.conns, a.mailboxes)
        u1, s1, o1 = _cpu(server.proc.pid)
        w1 = _writes(dev, base)
        if spy is not None:
            spy.send_signal(2)
            spy.wait(60)
        per = 1e6 / n
        got.per.update(user=(u1 - u0) * per, sys=(s1 - s0) * per, helpers=(o1 - o0) * per)
        got.per.update(writes=(w1[0] - w0[0]) / n, kib=(w1[1] - w0[1]) / 2 / n)
        if a.strace:
            pids = _tree(server.proc.pid)
            with _straced(pids, base / f"strace-{name}") as files:
                _load(server.port, n, a.conns, a.mailboxes)
            for pid, f in zip(pids, files, strict=True):
                calls = _syscalls(f)
                f.unlink(missing_ok=True)
                who = "serve" if pid == server.proc.pid else "helpers"
                got.calls.setdefault(who, collections.Counter()).update(calls)
        server.stop(timeout=120)
        m = _SUMMARY.search(server.summary or "")
        got.per["batch"] = int(m.group(1)) / max(1, int(m.group(2))) if m else 0.0
    shutil.rmtree(root, ignore_errors=True)
    return got


def _med(runs: list[_Result], key: str) -> float:
    return statistics.median(r.per[key] for r in runs)


def _serve(r: _Result) -> float:
    return r.per["user"] + r.per["sys"]


def _total(r: _Result) -> float:
    return r.per["user"] + r.per["sys"] + r.per["helpers"]


def _report(a: argparse.Namespace, modes: list[str], got: dict[str, list[_Result]]) -> None:
    print(
        f"µs of CPU per message, median of {a.rounds} rounds ({a.conns} conns,"
        f" {a.mailboxes} mailboxes); ratios to the first mode of the same tree"
    )
    head = f"{'mode':<22} {'user':>5} {'sys':>5} {'serve':>5} {'helpers':>7} {'total':>6}"
    head += "  serve÷ total÷  batch" + ("  writes/msg KiB/msg" if a.fs else "")
    print(head)
    for m in modes:
        ref = next(x for x in modes if x.endswith("@base") == m.endswith("@base"))
        runs, rr = got[m], got[ref]
        serve, tot = statistics.median(map(_serve, runs)), statistics.median(map(_total, runs))
        rserve, rtot = statistics.median(map(_serve, rr)), statistics.median(map(_total, rr))
        line = (
            f"{m:<22} {_med(runs, 'user'):5.0f} {_med(runs, 'sys'):5.0f} {serve:5.0f}"
            f" {_med(runs, 'helpers'):7.0f} {tot:6.0f}  {serve / rserve:6.3f} {tot / rtot:6.3f}"
            f" {_med(runs, 'batch'):6.1f}"
        )
        if a.fs:
            line += f"  {_med(runs, 'writes'):10.2f} {_med(runs, 'kib'):7.2f}"
        print(line)
    if not a.strace:
        return
    print("\nsyscalls per message (strace -c -f; median over rounds; helpers summed)")
    for m in modes:
        for who in ("serve", "helpers"):
            per = [r.calls.get(who, collections.Counter()) for r in got[m]]
            med = {k: statistics.median(c[k] for c in per) / a.messages for k in set().union(*per)}
            total = statistics.median(sum(c.values()) for c in per) / a.messages
            top = sorted(((v, k) for k, v in med.items() if v >= 0.005), reverse=True)
            print(f"{m:<22} {who:<7} {total:6.2f}: " + ", ".join(f"{k} {v:.2f}" for v, k in top))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benches.sieve_cost", description=__doc__)
    p.add_argument("--messages", type=int, default=3000)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--modes", default="executor,sieve-none,executor-sieve20")
    p.add_argument("--conns", type=int, default=8)
    p.add_argument("--mailboxes", type=int, default=100)
    p.add_argument("--profile", type=Path, default=None)
    p.add_argument("--baseline", type=Path, default=None)
    p.add_argument("--current", type=Path, default=None)
    p.add_argument("--fs", action="store_true", help="a loop-mounted ext4; disk writes too")
    p.add_argument("--strace", action="store_true", help="syscalls per message too")
    a = p.parse_args(argv)
    modes = a.modes.split(",")
    bad = [m for m in modes if m not in MODES]
    if bad:
        p.error(f"unknown mode(s) {bad}; choose from {list(MODES)}")
    if a.baseline is not None:
        modes = [x for m in modes for x in (f"{m}@base", m)]
    got: dict[str, list[_Result]] = {m: [] for m in modes}
    with contextlib.ExitStack() as stack:
        if a.fs:
            tmp, description = stack.enter_context(bench_filesystem())
            print(f"file system: {description}", file=sys.stderr)
        else:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sieve-cost-")))
        dev = _loop_device(tmp) if a.fs else None
        if a.fs and dev is None:
            print("no loop device: disk writes not measured", file=sys.stderr)
        for r in range(a.rounds):
            # Every other round in reverse order: a drift of the machine's load
            # within a round does not favour the modes run first.
            for m in modes if r % 2 == 0 else modes[::-1]:
                prof = a.profile if r == a.rounds - 1 else None
                got[m].append(_one(tmp, m, a, prof, dev))
                g = got[m][-1].per
                print(
                    f"round {r} {m:<22} user {g['user']:5.0f} sys {g['sys']:5.0f}"
                    f" helpers {g['helpers']:5.0f} batch {g['batch']:5.1f}"
                    f" writes {g['writes']:5.2f} KiB {g['kib']:6.2f}",
                    file=sys.stderr,
                    flush=True,
                )
    _report(a, modes, got)


if __name__ == "__main__":
    main()
