"""Server CPU per message, mode against mode: what Sieve costs ``serve`` (issue 21).

    .venv/bin/python -m benches.sieve_cost [--messages 3000] [--rounds 5] \\
        [--modes executor,sieve-none,executor-sieve20] [--profile DIR] [--baseline TREE]

Throughput says little on a shared machine; CPU seconds per message of the
server's processes (``serve`` and its writer helpers, user and system apart,
from ``/proc/PID/stat``) over a fixed count of messages do. Each round starts
one server per mode, back to back (every other round in reverse order), warms
it with ``--warmup`` messages, then sends ``--messages`` messages (LMTP, 498
bytes, 8 connections, 100 mailboxes) through :mod:`benches.loadgen` and reads
the CPU the server's processes used meanwhile. Prints per mode the median over
the rounds of µs per message: the serve process's user and system time (Sieve
runs there, on the event loop), its helpers' (the writer processes), the
total, and the ratios of the user time and of the total to the first mode's.
``--profile DIR`` records the serve process of the last round with ``py-spy
record -f raw``. ``--baseline TREE`` (a checkout of an older commit) adds each
mode run from ``TREE/src`` as ``<mode>@base``, interleaved with the current
code's, so old and new are compared back to back; ``--current TREE`` runs the
other modes from ``TREE/src`` instead of this checkout (a snapshot, so that
editing here does not change a run in progress).

Modes: ``executor`` (serve's defaults), ``sieve-none`` (``--sieve``, no
script anywhere: what a recipient without one pays), ``executor-sieve20``
(a 20-rule ``--sieve-before`` script, benches/sieve20.sieve, that files
nothing the load sends).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from delivery_executor.testing import ServerProcess

_REPO = Path(__file__).resolve().parent.parent
MODES: dict[str, list[str]] = {
    "executor": [],
    "sieve-none": ["--sieve"],
    "executor-sieve20": ["--sieve-before", str(_REPO / "benches" / "sieve20.sieve")],
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


def _load(port: int, messages: int) -> None:
    cmd = [sys.executable, "-m", "benches.loadgen", "--port", str(port), "--conns", "8"]
    cmd += ["--mailboxes", "100", "--size", "498", "--duration", "600", "--warmup", "0"]
    cmd += ["--max-messages", str(messages)]
    subprocess.run(cmd, check=True, capture_output=True, cwd=_REPO, env=_env(), timeout=900)


def _one(
    base: Path,
    mode: str,
    messages: int,
    warmup: int,
    profile: Path | None,
    tree: tuple[Path | None, Path | None],
) -> tuple[float, float, float]:
    """µs per message of the serve process (user, system) and of its helpers, for ``mode``."""
    name, _, old = mode.partition("@")
    root = Path(tempfile.mkdtemp(dir=base, prefix=f"{name}-"))
    args = ["--log-level", "WARNING", "--max-connections", "256", "--max-connections-per-ip", "0"]
    env = _env(tree[1] if old else tree[0])
    with ServerProcess(root, *args, *MODES[name], env=env, start_timeout=30) as server:
        _load(server.port, warmup)
        spy = None
        if profile is not None:
            out = profile / f"{name}{'-base' if old else ''}.txt"
            argv = ["py-spy", "record", "-r", "200", "-f", "raw", "-o", str(out)]
            spy = subprocess.Popen(
                [*argv, "-p", str(server.proc.pid), "--nonblocking"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        u0, s0, o0 = _cpu(server.proc.pid)
        _load(server.port, messages)
        u1, s1, o1 = _cpu(server.proc.pid)
        if spy is not None:
            spy.send_signal(2)
            spy.wait(60)
        server.stop(timeout=120)
    shutil.rmtree(root, ignore_errors=True)
    per = 1e6 / messages
    return (u1 - u0) * per, (s1 - s0) * per, (o1 - o0) * per


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benches.sieve_cost", description=__doc__)
    p.add_argument("--messages", type=int, default=3000)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--profile", type=Path, default=None)
    p.add_argument("--baseline", type=Path, default=None)
    p.add_argument("--current", type=Path, default=None)
    a = p.parse_args(argv)
    modes = a.modes.split(",")
    if a.baseline is not None:
        modes = [x for m in modes for x in (f"{m}@base", m)]
    got: dict[str, list[tuple[float, float, float]]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory(prefix="sieve-cost-") as tmp:
        for r in range(a.rounds):
            # Every other round in reverse order: a drift of the machine's load
            # within a round does not favour the modes run first.
            for m in modes if r % 2 == 0 else modes[::-1]:
                last = r == a.rounds - 1
                prof = a.profile if last else None
                trees = (a.current, a.baseline)
                got[m].append(_one(Path(tmp), m, a.messages, a.warmup, prof, trees))
                u, s, o = got[m][-1]
                print(
                    f"round {r} {m:<22} user {u:5.0f} sys {s:5.0f} helpers {o:5.0f}",
                    file=sys.stderr,
                )
    med = {m: [statistics.median(x[i] for x in got[m]) for i in range(3)] for m in modes}
    tot = {m: statistics.median(sum(x) for x in got[m]) for m in modes}
    print(f"µs of CPU per message, median of {a.rounds} rounds; ratios to {modes[0]}")
    print(f"{'mode':<22} {'user':>5} {'sys':>5} {'helpers':>7} {'total':>6}  user÷  total÷")
    for m in modes:
        u, s, o = med[m]
        ru, rt = u / med[modes[0]][0], tot[m] / tot[modes[0]]
        print(f"{m:<22} {u:5.0f} {s:5.0f} {o:7.0f} {tot[m]:6.0f}  {ru:5.2f}  {rt:5.2f}")


if __name__ == "__main__":
    main()
