"""Run ``delivery-executor serve`` as a child process for end-to-end tests."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from delivery_executor.bench import free_port

__all__ = ["ServerProcess", "free_port"]

_LISTEN = re.compile(r"listening on ([\d.]+):(\d+) \((LMTP|SMTP), pid (\d+)\)")


class ServerProcess:
    """``python -m delivery_executor serve`` with its output captured line by line."""

    def __init__(self, root: Path, *args: str, port: int = 0, workers: int = 1) -> None:
        self.root = root
        cmd = [sys.executable, "-m", "delivery_executor", "serve", "--root", str(root)]
        cmd += ["--listen", f"127.0.0.1:{port}", "--workers", str(workers), *args]
        # Its own process group: kill() reaches the workers and writer helpers too.
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        self.lines: list[str] = []
        # A thread feeds a queue: select() on a buffered pipe misses lines that
        # already sit in Python's buffer.
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()
        self.ports: list[int] = []
        self.pids: list[int] = []
        deadline = time.monotonic() + 20
        try:
            while len(self.ports) < workers:
                line = self.readline(deadline - time.monotonic())
                m = _LISTEN.search(line)
                if m:
                    self.ports.append(int(m.group(2)))
                    self.pids.append(int(m.group(4)))
        except BaseException:
            self.__exit__()  # a failed start must not leave servers behind
            raise
        self.port = self.ports[0]

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def readline(self, timeout: float) -> str:
        """The next output line; AssertionError if none comes in ``timeout`` s or on exit."""
        try:
            line = self._queue.get(timeout=max(timeout, 0.01))
        except queue.Empty:
            raise AssertionError(
                f"no output from the server in time; so far: {self.lines}"
            ) from None
        assert line is not None, f"server exited ({self.proc.poll()}); output: {self.lines}"
        self.lines.append(line)
        return line

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Signal the server, collect the rest of its output and return its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"server did not stop in {timeout} s: {self.lines}") from None
        self._reader.join(10)
        while (line := self._queue.get_nowait() if not self._queue.empty() else None) is not None:
            self.lines.append(line)
        return code

    def kill(self) -> None:
        """SIGKILL every process of the server at once: parent, workers, helpers."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()  # also any worker or helper still running after a clean stop
        self._reader.join(10)  # EOF once every writer of the pipe has exited
        if self.proc.stdout is not None:
            self.proc.stdout.close()
