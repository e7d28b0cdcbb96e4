"""CPU per message of every ``serve`` process (main, workers, helpers), user and system apart.

Starts ``serve`` (default options: LMTP, the process writer) in a fresh
directory, sends a warm-up and then ``--messages`` messages of each size with
Postfix's ``smtp-source -L -s 8``, and reads ``utime``/``stime`` of every
process of the server's session from ``/proc`` before and after the measured
run. A cost, not a rate: it stays meaningful on a shared machine.

    .venv/bin/python -m benches.cpu_cost [--sizes 65536,1048576] [--messages 200]
        [--runs 3] [--src OTHER_CHECKOUT/src] [--pure] [-- extra serve options]

``--src`` runs another checkout's package (an A/B on the same machine);
``--pure`` adds this checkout with its C helpers off (``DELIVERY_EXECUTOR_PURE=1``).
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
_TICK = os.sysconf("SC_CLK_TCK")
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"


def session_cpu(sid: int) -> tuple[float, float, int]:
    """User and system CPU seconds and minor faults of the live processes of session ``sid``."""
    user = system = faults = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        # fields[0] is field 3 (state): session is field 6, utime 14, stime 15.
        if int(fields[3]) == sid:
            faults += int(fields[7])
            user += int(fields[11])
            system += int(fields[12])
    return user / _TICK, system / _TICK, faults


def send(port: int, size: int, count: int, timeout: float = 600) -> None:
    """``count`` messages of ``size`` bytes over 8 LMTP sessions, with Postfix's smtp-source."""
    cmd = [SMTP_SOURCE, "-L", "-s", "8", "-m", str(count), "-l", str(size)]
    cmd += ["-f", "load@example.net", "-t", "alice@example.org", f"127.0.0.1:{port}"]
    subprocess.run(cmd, check=True, timeout=timeout, stdout=subprocess.DEVNULL)


def measure(
    src: Path | None, size: int, count: int, extra: list[str], pure: bool = False
) -> tuple[float, float, float]:
    """(user ms, system ms, minor faults) per message of ``count`` messages of ``size`` bytes."""
    env = dict(os.environ)
    if pure:
        env["DELIVERY_EXECUTOR_PURE"] = "1"
    paths = [str(src)] if src else []
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(_REPO), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory(prefix="cpu-cost-") as tmp:
        root = Path(tmp)
        args = ["--log-level", "WARNING", "--max-connections-per-ip", "0", *extra]
        with ServerProcess(root, *args, env=env, start_timeout=30) as s:
            send(s.port, size, max(8, count // 10))
            u0, s0, f0 = session_cpu(s.proc.pid)
            send(s.port, size, count)
            u1, s1, f1 = session_cpu(s.proc.pid)
            s.stop()
    return (u1 - u0) * 1000 / count, (s1 - s0) * 1000 / count, (f1 - f0) / count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benches.cpu_cost", description=__doc__)
    p.add_argument("--sizes", default="65536,1048576")
    p.add_argument("--messages", type=int, default=200)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--src", type=Path, action="append", default=[])
    p.add_argument("--pure", action="store_true", help="also this checkout without C helpers")
    p.add_argument("extra", nargs="*")
    a = p.parse_args(argv)
    variants: list[tuple[Path | None, bool]] = [(src, False) for src in a.src] or [(None, False)]
    if a.pure:
        variants.append((None, True))
    for size in (int(x) for x in a.sizes.split(",")):
        got: dict[int, list[tuple[float, float, float]]] = {i: [] for i in range(len(variants))}
        for _ in range(a.runs):  # interleaved: A, B, A, B...
            for i, (src, pure) in enumerate(variants):
                got[i].append(measure(src, size, a.messages, a.extra, pure))
        for i, (src, pure) in enumerate(variants):
            label = "this checkout, pure Python" if pure else (src or "this checkout")
            us = [u for u, _, _ in got[i]]
            ss = [s for _, s, _ in got[i]]
            fs = [f for _, _, f in got[i]]
            print(
                f"{size:>8} B  {label}: user {statistics.median(us):.2f} ms"
                f"  sys {statistics.median(ss):.2f} ms  faults {statistics.median(fs):.0f}"
                f" per message (median of {a.runs}; user {', '.join(f'{u:.2f}' for u in us)};"
                f" sys {', '.join(f'{x:.2f}' for x in ss)})",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
