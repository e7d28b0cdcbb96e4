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
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from delivery_executor.testing import ServerProcess

__all__ = ["ServeHost", "group_members", "kill_group", "require_unshare"]


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


class ServeHost(ServerProcess):
    """:class:`ServerProcess` on ``address:port``, as host ``hostname`` if given."""

    def __init__(
        self,
        root: Path,
        address: str,
        port: int,
        *args: str,
        hostname: str | None = None,
        start_timeout: float = 20,
    ) -> None:
        prefix: list[str] = []
        if hostname is not None:
            # unshare execs sh, sh execs python: one PID all along, so the
            # process group ServerProcess makes is the server's own.
            script = 'hostname "$1" && shift && exec "$@"'
            prefix = [require_unshare(), "--uts", "sh", "-c", script, "sh", hostname]
        self.address = address
        self.hostname = hostname
        super().__init__(
            root, *args, host=address, port=port, prefix=prefix, start_timeout=start_timeout
        )
        self.pgid = self.proc.pid
        self.pid = self.pids[0]

    def kill(self) -> None:
        """SIGKILL the whole host (its process group: server and helper); wait until it is gone."""
        kill_group(self.proc)
