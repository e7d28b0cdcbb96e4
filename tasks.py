#!/usr/bin/env python3
"""Project tasks that need nothing but python3: each one sets up .venv itself.

python3 tasks.py demo        deliver through the executor and `serve` into ./demo-maildir
python3 tasks.py test        ruff, mypy --strict and the test suite
                             (--cov: with line coverage, child processes included)
python3 tasks.py bench       the microbenchmarks (see BUDGETS.md)
python3 tasks.py loadbench   the SMTP/LMTP load table (python -m benches.load; see BUDGETS.md)
python3 tasks.py mutate      check that the tests kill each known mutant (python -m tests.mutants)
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / "bin"
LINTED = ("src", "tests", "benches", "examples", "tasks.py")
BUILD_INPUTS = ("pyproject.toml", "src/delivery_executor/_speedups.c")


def _run(*cmd: str | os.PathLike[str]) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], cwd=ROOT, check=True)


def ensure_venv() -> None:
    """Create .venv and install the project with its extras (compiling its C helpers).

    Once per change of pyproject.toml or of the C source, so that an edited
    ``_speedups.c`` is rebuilt before the tests run.
    """
    stamp = VENV / ".installed"
    digest = hashlib.sha256()
    for source in BUILD_INPUTS:
        digest.update((ROOT / source).read_bytes())
    want = digest.hexdigest()
    if stamp.exists() and stamp.read_text() == want:
        return
    if not (BIN / "python").exists():
        _run(sys.executable, "-m", "venv", VENV)
    _run(BIN / "python", "-m", "pip", "install", "-q", "--upgrade", "pip")
    _run(BIN / "python", "-m", "pip", "install", "-q", "-e", ".[dev,bench,metrics,userdb]")
    stamp.write_text(want)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "bench", "loadbench", "mutate"):
        print(__doc__, file=sys.stderr)
        return 2
    task, rest = argv[0], argv[1:]
    ensure_venv()
    try:
        if task == "demo":
            _run(BIN / "python", "-m", "benches.demo", *rest)
        elif task == "loadbench":
            _run(BIN / "python", "-m", "benches.load", *rest)
        elif task == "mutate":
            _run(BIN / "python", "-m", "tests.mutants", *rest)
        elif task == "test":
            _run(BIN / "ruff", "check", *LINTED)
            _run(BIN / "ruff", "format", "--check", *LINTED)
            _run(BIN / "mypy", "--strict")
            if "--cov" in rest:
                rest.remove("--cov")
                _run(BIN / "coverage", "erase")
                try:
                    _run(BIN / "coverage", "run", "-m", "pytest", *rest)
                finally:
                    _run(BIN / "coverage", "combine", "-q")
                    _run(BIN / "coverage", "report")
            else:
                _run(BIN / "pytest", *rest)
        else:
            _run(
                BIN / "pytest",
                "benches",
                "-o",
                "python_files=bench_*.py",
                "-s",  # bench_executor prints its table
                *rest,
            )
    except subprocess.CalledProcessError as exc:
        return exc.returncode or 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
