"""The non-root path, end to end: a system-python venv, serve as a service user, swaks --socket.

What an admin does (README, "Deploy behind Postfix"): ``/usr/bin/python3 -m
venv``, ``pip install`` the project, run ``serve`` as an unprivileged user on
a UNIX socket in a directory that user owns. The interpreter from
``tasks.py`` may sit under a home directory other users cannot read, which
is why the venv here comes from the system python (DESIGN.md §8).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from delivery_executor.testing import ServerProcess

from .helpers import children

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(os.geteuid() != 0, reason="creating a user and switching to it needs root"),
]

REPO = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"
MESSAGE = b"Subject: exact\r\nX-Test: 1\r\n\r\nline one\r\n.dot line\r\nend\r\n"


def _need(name: str) -> str:
    path = shutil.which(name) or (
        f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else ""
    )
    if not path:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is missing in CI: .ci/run should have installed it")
        pytest.skip(f"{name} not installed")
    return path


@pytest.fixture
def service_user() -> Iterator[pwd.struct_passwd]:
    """A fresh system user with its own group, deleted afterwards."""
    name = f"de-ci-{os.getpid()}"
    subprocess.run(
        ["useradd", "--system", "--user-group", "--no-create-home",
         "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True, timeout=60)


@pytest.fixture
def base() -> Iterator[Path]:
    """A world-traversable directory (pytest's tmp_path is not: /tmp/pytest-of-root is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="de-svc-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _install(base: Path) -> Path:
    """A venv from the system python with the project installed by its own pip; its bin/."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"no {SYSTEM_PYTHON}")
    version = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info >= (3, 11))"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if version.stdout.strip() != "True":
        pytest.skip(f"{SYSTEM_PYTHON} is older than 3.11")
    # A copy of what a release holds, so the build leaves nothing in the work tree.
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE-MIT", "LICENSE-APACHE"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(
        REPO / "src" / "delivery_executor",
        src / "src" / "delivery_executor",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    venv = base / "venv"
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", str(venv)], check=True, timeout=300)
    res = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", str(src)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if res.returncode != 0:
        pytest.fail(f"pip install failed:\n{res.stdout}\n{res.stderr}")
    return venv / "bin"


def _uid_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    m = re.search(r"^Uid:\s+(\d+)\s+(\d+)", status, re.M)
    assert m is not None
    assert m.group(1) == m.group(2)  # real and effective: fully switched
    return int(m.group(1))


def test_installed_serve_runs_as_a_service_user(
    base: Path, service_user: pwd.struct_passwd
) -> None:
    """Installed with the system python, run as a new user: swaks delivers; files are the user's."""
    swaks = _need("swaks")
    setpriv = _need("setpriv")
    bin_dir = _install(base)
    uid, gid = service_user.pw_uid, service_user.pw_gid
    for sub in ("run", "mail"):
        (base / sub).mkdir(mode=0o750)
        os.chown(base / sub, uid, gid)
    sock, root = base / "run" / "lmtp", base / "mail"
    as_user = [setpriv, f"--reuid={uid}", f"--regid={gid}", "--init-groups", "--"]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}
    message = base / "message.eml"
    message.write_bytes(MESSAGE)
    with ServerProcess(
        root, "--hostname", "mx.test", listen=[f"unix:{sock}"], env=env,
        prefix=as_user, program=[str(bin_dir / "delivery-executor")],
    ) as srv:  # fmt: skip
        assert _uid_of(srv.proc.pid) == uid
        (helper,) = children(srv.proc.pid)
        assert b"delivery_executor.writers._helper" in Path(f"/proc/{helper}/cmdline").read_bytes()
        assert _uid_of(helper) == uid
        assert os.stat(sock).st_uid == uid
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
        res = subprocess.run(
            [swaks, "--socket", str(sock), "--protocol", "LMTP", "--from", "s@example.net",
             "--to", "alice@example.org", "--data", f"@{message}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert res.returncode == 0, res.stdout + res.stderr
        assert "250 2.0.0 <alice@example.org> Ok: delivered as" in res.stdout
        assert srv.stop() == 0
    assert any("summary: delivered 1, failed 0" in line for line in srv.lines)
    assert not sock.exists()
    (path,) = (root / "example.org" / "alice" / "new").iterdir()
    st = path.stat()
    assert (st.st_uid, st.st_gid) == (uid, gid)
    assert stat.S_IMODE(st.st_mode) == 0o600
    data = path.read_bytes()
    # Our trace headers come first; then the message as sent, dot-unstuffed. Line
    # endings are compared loosely: the store may keep CRLF or write LF (Dovecot's way).
    sent = MESSAGE.replace(b"\r\n", b"\n").rstrip(b"\n")
    assert data.replace(b"\r\n", b"\n").rstrip(b"\n").endswith(sent)
    assert b"by mx.test (delivery-executor)" in data
    shebang = (bin_dir / "delivery-executor").read_text().splitlines()[0]
    assert shebang.startswith(f"#!{bin_dir}/python")  # the system-python venv, not the test's
