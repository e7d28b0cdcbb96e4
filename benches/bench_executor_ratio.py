"""The executor's two target ratios in one run, with CPU per message beside them.

32 callers deliver 500-byte messages to one Maildir. Three contenders, all
durable, on the same file system, interleaved round by round (medians kept):

  per-message  each caller awaits ``asyncio.to_thread(Maildir.deliver)``
  executor     ``DeliveryExecutor()`` defaults (eager batching, loop writer)
  batch(32)    the store alone: ``Maildir.deliver_batch`` of 32 bodies, back
               to back, in one thread (the rate the executor's batches can reach)

It prints msg/s, ``executor / per-message`` (issue 23's target: >= 4) and
``executor / batch(32)`` (target: >= 0.9), and each contender's CPU seconds per
message (user and system, the whole process, threads included).

    .venv/bin/python -m benches.bench_executor_ratio [--messages 6400] [--rounds 5]
        [--tmpfs] [--json out.json]

On a shared machine msg/s mean little: compare the CPU columns. ``--tmpfs``
runs on /dev/shm, where the syncs cost next to nothing, so the CPU columns are
the Python path alone (what the executor adds is ``executor - batch(32)``).
``--only executor-null`` measures the executor with a writer that touches no
file. For instruction counts, run one contender under callgrind at two message
counts and divide the difference (BUDGETS.md has the command).

``--fake-sync-ms N`` runs on /dev/shm with every sync replaced by a simulated
commit of N ms (``--fake-disk journal``, the default: one commit at a time,
concurrent syncs merged into the next; ``parallel``: each sync sleeps on its
own; see ``benches/simdisk.py``). The pipeline then shows as structure rather
than noisy msg/s: per contender the disk's busy share, syncs per commit, idle
gaps between commits and, for the executor, batch sizes and the share of time
with 0, 1, 2... flushes in flight. ``--timeline out.json`` keeps the raw
commits and flushes of the last round.

``--sync-calls`` also times each sync call the executor's loop writer makes
in its thread (wall time, by kind: the writeback of a batch's files, the
last ``fsync``) and prints their p50 and p90 over the run; run it with
``PYTHONPATH=<other tree>/src`` to compare two trees.

``--ab SRC`` interleaves this tree with another's ``src`` (e.g. a
``git worktree add`` of the base commit) round by round, each round in a
fresh subprocess, and prints both sets of medians: before/after in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import delivery_executor
from delivery_executor import DeliveryExecutor, Maildir, MessageId
from delivery_executor.writers import BatchResult, Group, LoopWriter

from .benchfs import bench_filesystem
from .simdisk import MODELS, SimDisk, TimedWriter, Timeline, fake_syncs, format_structure, summarise

BODY = (b"From: bench@example.org\r\nSubject: x\r\n\r\n" + b"x" * 500)[:500]
CALLERS = 32
CONTENDERS = ("per-message", "executor", "batch(32)")
EXTRA = ("executor-null",)  # the executor alone: a writer that touches no file (--only)


class _NullWriter:
    """Answers every batch with made-up ids at once: what is left is the executor's own path."""

    async def acommit(self, groups: Sequence[Group]) -> BatchResult:
        return [[MessageId(f"n{i}") for i in range(len(m))] for _, m in groups], 0

    async def aclose(self) -> None:
        return None


@contextmanager
def _timed_sync_calls(into: dict[str, list[float]]) -> Iterator[None]:
    """While inside, the loop writer's sync calls append their wall time to ``into[kind]``."""
    from delivery_executor.writers import local

    real = getattr(local, "run_sync_call")  # noqa: B009 (not exported; patched here)

    def timed(ops: Any, call: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return real(ops, call)
        finally:
            kind = "writeback" if isinstance(call[1], tuple) else str(call[0])
            into.setdefault(kind, []).append(time.perf_counter() - t0)

    setattr(local, "run_sync_call", timed)  # noqa: B010
    try:
        yield
    finally:
        setattr(local, "run_sync_call", real)  # noqa: B010


def format_sync_calls(calls: dict[str, list[float]]) -> str:
    out = []
    for kind, times in sorted(calls.items()):
        t = sorted(times)
        p50, p90 = t[len(t) // 2] * 1e6, t[int(len(t) * 0.9)] * 1e6
        out.append(
            f"sync call {kind:<10} {len(t):>6} calls  p50 {p50:>6.0f} us  p90 {p90:>6.0f} us"
        )
    return "\n".join(out)


def _cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)  # every thread of the process
    return r.ru_utime, r.ru_stime


async def _per_message(md: Maildir, messages: int) -> int:
    per = messages // CALLERS

    async def caller() -> None:
        for _ in range(per):
            await asyncio.to_thread(md.deliver, BODY)

    await asyncio.gather(*(caller() for _ in range(CALLERS)))
    return per * CALLERS


async def _executor(
    md: Maildir, messages: int, *, null: bool = False, timeline: Timeline | None = None
) -> int:
    per = messages // CALLERS
    path = str(md.path)
    writer: Any = _NullWriter() if null else "loop"
    if timeline is not None:
        writer = TimedWriter(LoopWriter() if writer == "loop" else writer, timeline)
    async with DeliveryExecutor(writer=writer) as ex:

        async def caller() -> None:
            for _ in range(per):
                await ex.deliver(path, BODY)

        await asyncio.gather(*(caller() for _ in range(CALLERS)))
    return per * CALLERS


def _batches(md: Maildir, messages: int) -> int:
    bodies = [BODY] * CALLERS
    for _ in range(messages // CALLERS):
        md.deliver_batch(bodies)
    return messages // CALLERS * CALLERS


def run_one(
    contender: str, where: Path, messages: int, timeline: Timeline | None = None
) -> dict[str, Any]:
    """One measurement: msg/s and CPU microseconds per message (user, system).

    With ``timeline`` (a simulated disk), also the run's structure (:func:`summarise`).
    """
    md = Maildir.cached(where)  # created up front, and found by the executor's writer
    os.sync()  # its metadata flushed, so the first batch does not pay for it
    u0, s0 = _cpu()
    t0 = time.perf_counter()
    if contender == "per-message":
        n = asyncio.run(_per_message(md, messages))
    elif contender == "executor":
        n = asyncio.run(_executor(md, messages, timeline=timeline))
    elif contender == "executor-null":
        n = asyncio.run(_executor(md, messages, null=True))
    else:
        n = _batches(md, messages)
    t1 = time.perf_counter()
    u1, s1 = _cpu()
    out: dict[str, Any] = {
        "msg_s": n / (t1 - t0),
        "user_us": (u1 - u0) / n * 1e6,
        "sys_us": (s1 - s0) / n * 1e6,
    }
    if timeline is not None:
        out["structure"] = summarise(timeline, (t0, t1))
    return out


def run_all(
    root: Path,
    messages: int,
    rounds: int,
    contenders: Sequence[str] = CONTENDERS,
    timeline: Timeline | None = None,
) -> dict[str, Any]:
    """Each contender ``rounds`` times, interleaved; medians, and the two ratios if all ran.

    With ``timeline`` (a simulated disk), each contender's structure in its median round.
    """
    samples: dict[str, list[dict[str, Any]]] = {c: [] for c in contenders}
    for r in range(rounds):
        for c in contenders:
            if timeline is not None:
                timeline.clear()
            samples[c].append(run_one(c, root / f"{c}-{r}", messages, timeline))
    keys = ("msg_s", "user_us", "sys_us")
    rows = {c: {k: statistics.median(s[k] for s in samples[c]) for k in keys} for c in contenders}
    out: dict[str, Any] = {"rows": rows, "messages": messages, "rounds": rounds}
    if timeline is not None:
        out["structure"] = {
            c: sorted(samples[c], key=lambda s: float(s["msg_s"]))[len(samples[c]) // 2][
                "structure"
            ]
            for c in contenders
        }
    if all(c in rows for c in CONTENDERS):
        ex = rows["executor"]["msg_s"]
        out["executor_over_per_message"] = ex / rows["per-message"]["msg_s"]
        out["executor_over_batch32"] = ex / rows["batch(32)"]["msg_s"]
    return out


def format_result(result: dict[str, Any]) -> str:
    out = [f"{'contender':<13} {'msg/s':>8} {'user us/msg':>11} {'sys us/msg':>10}"]
    for c, row in result["rows"].items():
        out.append(f"{c:<13} {row['msg_s']:>8.0f} {row['user_us']:>11.1f} {row['sys_us']:>10.1f}")
    if "executor_over_batch32" in result:
        per, b32 = result["executor_over_per_message"], result["executor_over_batch32"]
        out.append(f"executor / per-message: {per:.2f}  (target >= 4)")
        out.append(f"executor / batch(32):   {b32:.2f}  (target >= 0.9)")
    if "structure" in result:
        out.append(format_structure(result["structure"]))
    return "\n".join(out)


@contextmanager
def _tmpfs() -> Iterator[tuple[Path, str]]:
    with tempfile.TemporaryDirectory(prefix="de-ratio-", dir="/dev/shm") as where:
        yield Path(where), "tmpfs (/dev/shm): syncs cost next to nothing; compare CPU columns"


def _ab(argv: list[str], src: Path, rounds: int) -> int:
    """``rounds`` x (this tree, then ``src``), each in a subprocess; both sets of medians."""
    here = Path(__file__).resolve().parents[1] / "src"
    trees = {"this tree": here, str(src): src.resolve()}
    samples: dict[str, list[dict[str, Any]]] = {t: [] for t in trees}
    with tempfile.TemporaryDirectory(prefix="de-ab-") as tmp:
        for r in range(rounds):
            for name, path in trees.items():
                out = Path(tmp) / f"{r}-{len(samples[name])}-{path.name}.json"
                env = {**os.environ, "PYTHONPATH": str(path)}
                cmd = [sys.executable, "-m", "benches.bench_executor_ratio", *argv]
                cmd += ["--rounds", "1", "--json", str(out)]
                subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
                samples[name].append(json.loads(out.read_text()))
    for name, runs in samples.items():
        runs.sort(key=lambda r: float(r.get("executor_over_per_message", 0.0)))
        median = runs[len(runs) // 2]
        print(
            f"== {name} ({median['library']}), median round of {len(runs)} by executor/per-message"
        )
        print(format_result(median))
        ratios = [
            (
                round(r.get("executor_over_per_message", 0), 2),
                round(r.get("executor_over_batch32", 0), 2),
            )
            for r in runs
        ]
        print(f"   every round (executor/per-message, executor/batch(32)): {ratios}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=6400, help="messages per contender run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tmpfs", action="store_true", help="on /dev/shm (CPU cost only)")
    parser.add_argument(
        "--fake-sync-ms",
        type=float,
        help="on /dev/shm, every sync a simulated commit of this many ms (see benches/simdisk.py)",
    )
    parser.add_argument("--fake-disk", choices=MODELS, default="journal")
    parser.add_argument("--timeline", type=Path, help="the last round's commits and flushes")
    parser.add_argument("--ab", type=Path, metavar="SRC", help="interleave with another tree's src")
    parser.add_argument(
        "--only",
        choices=CONTENDERS + EXTRA,
        action="append",
        help="run only this contender (repeatable); e.g. one per run under callgrind",
    )
    parser.add_argument(
        "--sync-calls", action="store_true", help="time the executor's sync calls (p50, p90)"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.ab is not None:
        raw = list(sys.argv[1:] if argv is None else argv)
        i = raw.index("--ab")
        return _ab(raw[:i] + raw[i + 2 :], args.ab, args.rounds)
    timeline = Timeline() if args.fake_sync_ms is not None else None
    with contextlib.ExitStack() as stack:
        if timeline is not None:
            disk = SimDisk(args.fake_sync_ms, args.fake_disk, timeline)
            stack.enter_context(fake_syncs(disk))
            root, description = stack.enter_context(_tmpfs())
            description = (
                f"tmpfs (/dev/shm) with simulated syncs: {args.fake_disk},"
                f" {args.fake_sync_ms:g} ms per commit"
            )
        elif args.tmpfs:
            root, description = stack.enter_context(_tmpfs())
        else:
            root, description = stack.enter_context(bench_filesystem())
        print(f"file system: {description}", flush=True)
        calls: dict[str, list[float]] = {}
        if args.sync_calls:
            stack.enter_context(_timed_sync_calls(calls))
        result = run_all(root, args.messages, args.rounds, args.only or CONTENDERS, timeline)
    print(format_result(result))
    if calls:
        print(format_sync_calls(calls))
    library = str(Path(delivery_executor.__file__).parent)
    if args.json:
        args.json.write_text(
            json.dumps({"filesystem": description, "library": library, **result}, indent=2)
        )
    if args.timeline and timeline is not None:
        args.timeline.write_text(
            json.dumps({"commits": timeline.commits, "flushes": timeline.flushes})
        )
    return 0


def test_executor_ratios(bench_root: Path) -> None:
    """One short round of the three contenders; prints the two ratios."""
    where = bench_root / "ratios"
    where.mkdir()
    result = run_all(where, 1280, 1)
    print("\n" + format_result(result))
    assert all(row["msg_s"] > 0 for row in result["rows"].values())


if __name__ == "__main__":
    sys.exit(main())
