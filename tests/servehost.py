"""``delivery-executor serve`` as one mail host: an address, a port and, if asked, a host name.

With ``hostname=...`` the server runs in its own UTS namespace
(``unshare --uts``), so ``socket.gethostname()``, and with it the host part of
every file name it writes, is that name. Each server leads its own process
group (its helper writer process is in it too), so :meth:`ServeHost.kill`
takes down the whole "host" at once, by process group id, and the namespace
goes with its last process.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

__all__ = ["ServeHost", "group_members", "kill_group", "require_unshare"]

_LISTEN = re.compile(r"listening on ([\d.]+):(\d+) \((LMTP|SMTP), pid (\d+)\)")


def require_unshare() -> str:
    """The path of ``unshare``; skip unless we are root and a UTS namespace can be made."""
    if os.geteuid() != 0:
        pytest.skip("needs root: hosts are UTS/PID namespaces made with unshare")
    path = shutil.which("unshare")
    if path is None:
        pytest.skip("unshare (util-linux) is not installed")
    res = subprocess.run(
        [path, "--uts", "--pid", "--fork", "true"], capture_output=True, text=True, timeout=30
    )
    if res.returncode != 0:
        pytest.skip(f"cannot make UTS/PID namespaces here: {res.stderr.strip()}")
    return path


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group ``pgid``, from /proc.

    A process whose parent died is reaped by init, which may take a moment
    here; an exited, unreaped process holds nothing, so it is not counted.
    """
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry))
    return members


def kill_group(proc: subprocess.Popen[str], timeout: float = 10) -> None:
    """SIGKILL process group ``proc.pid`` (one we started), reap ``proc``, wait for the rest."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout)
    deadline = time.monotonic() + timeout
    while group_members(proc.pid):
        if time.monotonic() > deadline:
            raise AssertionError(f"process group {proc.pid} still has {group_members(proc.pid)}")
        time.sleep(0.02)


class ServeHost:
    """``python -m delivery_executor serve`` on ``address:port``, as host ``hostname`` if given."""

    def __init__(
        self,
        root: Path,
        address: str,
        port: int,
        *args: str,
        hostname: str | None = None,
        start_timeout: float = 20,
    ) -> None:
        self.root = root
        self.address = address
        self.port = port
        self.hostname = hostname
        cmd = [sys.executable, "-m", "delivery_executor", "serve", "--root", str(root)]
        cmd += ["--listen", f"{address}:{port}", *args]
        if hostname is not None:
            # unshare execs sh, sh execs python: one PID all along, so the
            # process group we make is the server's own.
            script = 'hostname "$1" && shift && exec "$@"'
            cmd = [require_unshare(), "--uts", "sh", "-c", script, "sh", hostname, *cmd]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        self.pgid = self.proc.pid
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()
        self.pid = 0
        deadline = time.monotonic() + start_timeout
        try:
            while not self.pid:
                m = _LISTEN.search(self.readline(deadline - time.monotonic()))
                if m:
                    self.pid = int(m.group(4))
        except BaseException:
            self.close()  # a failed start must not leave a server behind
            raise

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
            raise AssertionError(f"no output from serve in time; so far: {self.lines}") from None
        assert line is not None, f"serve exited ({self.proc.poll()}); output: {self.lines}"
        self.lines.append(line)
        return line

    def _drain(self) -> None:
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                return
            if line is not None:
                self.lines.append(line)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, wait for the exit and the rest of the output; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"serve did not stop in {timeout} s: {self.lines}") from None
        self._reader.join(10)
        self._drain()
        return code

    def kill(self) -> None:
        """SIGKILL the whole host (its process group: server and helper); wait until it is gone."""
        kill_group(self.proc)

    @property
    def summary(self) -> str | None:
        """serve's ``summary: delivered ...`` line, once it has stopped."""
        return next((line for line in self.lines if line.startswith("summary:")), None)

    def delivered(self) -> int:
        """The ``delivered N`` count from the summary line."""
        summary = self.summary
        assert summary is not None, f"no summary line: {self.lines}"
        m = re.search(r"delivered (\d+)", summary)
        assert m, summary
        return int(m.group(1))

    def close(self) -> None:
        """Kill whatever of this host is still running and close its output."""
        self.kill()
        self._reader.join(10)
        self._drain()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> ServeHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
