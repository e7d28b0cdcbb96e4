"""systemd readiness (sd_notify): serve says READY=1 once listening and STOPPING=1 on
SIGTERM, from the main process only, one process or several workers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from delivery_executor.server import notify
from delivery_executor.testing import ServerProcess

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket playing systemd's notification socket (a short path)."""
    directory = tempfile.mkdtemp(prefix="de-notify-", dir="/tmp")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    try:
        yield sock, path
    finally:
        sock.close()
        os.unlink(path)
        os.rmdir(directory)


def receive(sock: socket.socket) -> tuple[list[str], int]:
    """One datagram: its lines and the sender's pid (SCM_CREDENTIALS)."""
    data, ancillary, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(12))
    pid = -1
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid = int.from_bytes(payload[:4], "little")
    return data.decode().split("\n"), pid


@pytest.mark.parametrize("workers", [1, 2])
def test_ready_then_stopping_from_the_main_process(
    tmp_path: Path, notify_socket: tuple[socket.socket, str], workers: int
) -> None:
    """READY=1 (with a STATUS) once serving, STOPPING=1 on SIGTERM; both from the main pid."""
    sock, path = notify_socket
    env = {**os.environ, "NOTIFY_SOCKET": path}
    with ServerProcess(tmp_path / "mail", workers=workers, env=env) as srv:
        ready, sender = receive(sock)
        assert ready[0] == "READY=1"
        assert ready[1].startswith("STATUS=") and str(tmp_path / "mail") in ready[1]
        assert sender == srv.proc.pid
        srv.proc.send_signal(signal.SIGTERM)
        stopping, sender = receive(sock)
        assert stopping == ["STOPPING=1"]
        assert sender == srv.proc.pid
        assert srv.stop() == 0
    sock.settimeout(0.5)
    with pytest.raises(TimeoutError):  # nothing from the workers or the writer helpers
        sock.recv(4096)


_NESTED = """
import os, signal, subprocess, threading, time
from delivery_executor.server import notify, run
calls = []
def told(*states):
    calls.append(states)
    if len(calls) == 1:  # a second SIGTERM arrives while systemd is being told of the first
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # its Python handler runs here, nested in the first
    return True
notify.notify = told
worker = subprocess.Popen(["sleep", "30"])
threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
run._supervise([worker.pid], None)
print(calls.count(("STOPPING=1",)))
"""


def test_the_supervisor_says_stopping_once_even_if_a_signal_interrupts_it() -> None:
    """A SIGTERM that nests in the supervisor's first SIGTERM handler sends no second STOPPING."""
    out = subprocess.run(
        [sys.executable, "-c", _NESTED], capture_output=True, text=True, timeout=30, check=True
    )
    assert out.stdout.splitlines()[-1] == "1", out.stdout + out.stderr  # STOPPING=1 sent once


def test_notify_speaks_abstract_sockets_and_ignores_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """'@name' is an abstract socket; unset or unknown forms send nothing and return False."""
    name = f"de-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.notify("READY=1") is True
        assert sock.recv(100) == b"READY=1"
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert notify.notify("READY=1") is False
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert notify.notify("READY=1") is False


def test_a_notify_socket_that_is_gone_is_a_warning_not_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A dead $NOTIFY_SOCKET: notify() logs a warning and returns False."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert notify.notify("READY=1") is False
    assert "cannot notify systemd" in caplog.text
