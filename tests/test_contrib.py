"""contrib/: the systemd units parse, hold what a safe deployment needs, pass systemd-analyze."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from delivery_executor import cli

pytestmark = pytest.mark.timeout(60)

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"
SERVICE = CONTRIB / "delivery-executor.service"
SOCKET = CONTRIB / "delivery-executor.socket"


def _unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """section -> key -> values (systemd allows a key several times); comments dropped."""
    out: dict[str, dict[str, list[str]]] = {}
    section: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = out.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"{path.name}: key outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line}"
        section.setdefault(key.strip(), []).append(value.strip())
    return out


def _serve_args(service: dict[str, dict[str, list[str]]]) -> tuple[str, list[str]]:
    (exec_start,) = service["Service"]["ExecStart"]
    binary, command, *args = shlex.split(exec_start)
    assert command == "serve"
    return binary, args


def test_service_unit_has_what_a_safe_deployment_needs() -> None:
    """Own user, ProtectSystem=strict, the root writable, SIGTERM stop longer than the grace."""
    unit = _unit(SERVICE)
    svc = unit["Service"]
    assert svc["User"][0] not in ("", "root", "0")
    assert svc["ProtectSystem"] == ["strict"]
    assert svc["NoNewPrivileges"] == ["yes"]
    _, args = _serve_args(unit)
    root = args[args.index("--root") + 1]
    assert root in svc["ReadWritePaths"][0].split()
    assert svc.get("KillSignal", ["SIGTERM"]) == ["SIGTERM"]
    grace = float(args[args.index("--grace") + 1]) if "--grace" in args else 10.0
    assert float(svc["TimeoutStopSec"][0]) > grace
    assert "-HUP" in svc["ExecReload"][0]
    assert svc["RestartPreventExitStatus"] == ["2"]  # config errors: a restart will not help
    assert unit["Install"]["WantedBy"]


def test_service_execstart_options_are_valid() -> None:
    """ExecStart runs serve with options our parser accepts, and leaves listening to the socket."""
    binary, args = _serve_args(_unit(SERVICE))
    assert binary.endswith("/bin/delivery-executor")
    parser = cli._Parser(prog="delivery-executor")
    sub = parser.add_subparsers(dest="command")
    cli._add_serve(sub)
    parsed = parser.parse_args(["serve", *args])  # SystemExit(2) if an option is wrong
    assert parsed.listen is None, "the socket unit (or the default) decides where it listens"


def test_socket_unit_gives_postfix_a_private_unix_socket() -> None:
    """The socket unit listens on a UNIX path inside Postfix's chroot, for Postfix only."""
    sock = _unit(SOCKET)["Socket"]
    (path,) = sock["ListenStream"]
    assert path.startswith("/var/spool/postfix/private/")
    assert sock["SocketUser"] == ["postfix"]
    assert sock["SocketMode"] == ["0600"]
    assert sock["FileDescriptorName"] != ["tls"]  # plain LMTP; "tls" would mean implicit TLS


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd-analyze verify accepts both units without a warning (binary path made real)."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed (Debian: systemd); the parse tests still ran")
    real = Path(sys.executable).with_name("delivery-executor")
    if not real.exists():
        pytest.skip(f"no {real} to stand in for /opt/delivery-executor/bin/delivery-executor")
    text = SERVICE.read_text().replace("/opt/delivery-executor/bin/delivery-executor", str(real))
    (tmp_path / SERVICE.name).write_text(text)
    shutil.copy(SOCKET, tmp_path / SOCKET.name)
    res = subprocess.run(
        [tool, "verify", str(tmp_path / SERVICE.name), str(tmp_path / SOCKET.name)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == "", res.stderr
