"""Instructions per message in ``serve``'s main process, under callgrind: a CPU cost without noise.

Starts ``serve`` (default options) under ``valgrind --tool=callgrind`` twice
per tree, sends a warm-up and then ``--counts`` messages (say 0 and 300)
with ``smtp-source -L -s 8``, and divides the difference of the two totals
by the difference of the counts: start-up and shutdown cancel out. Only the
main process is counted (the writer helper runs natively). Instructions are
not time (a ``rep movsb`` copy counts one per byte), but on these noisy VMs
they settle a 5 % question that ``benches.cpu_cost`` cannot.

    .venv/bin/python -m benches.instructions [--sizes 500,65536] [--counts 0,300]
        [--src OTHER_CHECKOUT/src ...]

``--src`` measures another checkout's package (repeat it for an A/B: e.g.
``--src /tmp/base/src --src src``, the base with its C helpers built in place).
Needs valgrind; a run of 300 messages of 64 KiB takes about a minute.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from delivery_executor.testing import ServerProcess

from .cpu_cost import send

_REPO = Path(__file__).resolve().parent.parent


def total(src: Path, size: int, count: int) -> int:
    """Instructions of a whole ``serve`` run (start, 30 warm-up messages, ``count`` more, stop)."""
    with tempfile.TemporaryDirectory(prefix="instr-") as tmp:
        out = Path(tmp) / "callgrind.out"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(_REPO)])}
        prefix = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
        args = ["--log-level", "WARNING", "--max-connections-per-ip", "0"]
        with ServerProcess(
            Path(tmp) / "mail", *args, env=env, start_timeout=300, prefix=prefix
        ) as s:
            send(s.port, size, 30)
            if count:
                send(s.port, size, count, timeout=1800)
            s.stop(timeout=300)
        for line in out.read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError(f"no totals in callgrind's output for {src}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benches.instructions", description=__doc__)
    p.add_argument("--sizes", default="500,65536")
    p.add_argument("--counts", default="0,300")
    p.add_argument("--src", type=Path, action="append", default=[])
    a = p.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind not found", file=sys.stderr)
        return 2
    low, high = (int(x) for x in a.counts.split(","))
    for size in (int(x) for x in a.sizes.split(",")):
        for src in a.src or [_REPO / "src"]:
            per = (total(src, size, high) - total(src, size, low)) / (high - low)
            print(f"{size:>8} B  {src}: {per / 1e6:.3f} M instructions per message", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
