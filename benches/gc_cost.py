"""Time ``serve``'s main process spends in Python's cycle collector, per message.

Starts ``serve`` with a ``sitecustomize`` (on ``PYTHONPATH``, in a temporary
directory) that times every collection with ``gc.callbacks`` and writes the
totals at exit, sends a warm-up and ``--messages`` messages with
``smtp-source -L -s 8``, and prints collections, objects freed and collector
time per generation, the latter also per message (warm-up included).

    .venv/bin/python -m benches.gc_cost [--size 65536] [--messages 3000]
        [--src OTHER_CHECKOUT/src ...]

Cyclic garbage left by each session shows as objects freed by the
collector; a session freed by reference counting leaves none.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from delivery_executor.testing import ServerProcess

from .cpu_cost import send

_REPO = Path(__file__).resolve().parent.parent
_WARM = 300

_SITE = """\
import atexit, gc, json, os, sys, time
_out = os.environ.get("GC_COST_OUT")
if _out and "serve" in sys.orig_argv:
    st = {"n": [0, 0, 0], "s": [0.0, 0.0, 0.0], "freed": [0, 0, 0], "t0": 0.0}
    def _cb(phase, info):
        if phase == "start":
            st["t0"] = time.perf_counter()
        else:
            g = info["generation"]
            st["n"][g] += 1
            st["freed"][g] += info["collected"]
            st["s"][g] += time.perf_counter() - st["t0"]
    gc.callbacks.append(_cb)
    atexit.register(lambda: open(_out, "w").write(json.dumps(st)))
"""


def measure(src: Path, size: int, count: int) -> dict[str, list[float]]:
    """The collector's totals in one ``serve`` run of ``_WARM + count`` messages."""
    with tempfile.TemporaryDirectory(prefix="gc-cost-") as tmp:
        site = Path(tmp) / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(_SITE)
        out = Path(tmp) / "gc.json"
        path = os.pathsep.join([str(site), str(src), str(_REPO)])
        env = {**os.environ, "PYTHONPATH": path, "GC_COST_OUT": str(out)}
        args = ["--log-level", "WARNING", "--max-connections-per-ip", "0"]
        with ServerProcess(Path(tmp) / "mail", *args, env=env, start_timeout=30) as s:
            send(s.port, size, _WARM)
            send(s.port, size, count)
            s.stop()
        result: dict[str, list[float]] = json.loads(out.read_text())
        return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benches.gc_cost", description=__doc__)
    p.add_argument("--size", type=int, default=65536)
    p.add_argument("--messages", type=int, default=3000)
    p.add_argument("--src", type=Path, action="append", default=[])
    a = p.parse_args(argv)
    for src in a.src or [_REPO / "src"]:
        st = measure(src, a.size, a.messages)
        per = sum(st["s"]) * 1e6 / (a.messages + _WARM)
        print(
            f"{src}: collections {st['n']}, objects freed {st['freed']},"
            f" ms {[round(x * 1e3, 1) for x in st['s']]} (generations 0, 1, 2):"
            f" {per:.1f} µs per message",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
