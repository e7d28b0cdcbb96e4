"""Where serve listens: address forms, UNIX sockets, several listeners, workers, systemd."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from delivery_executor import Maildir
from delivery_executor.server import ListenSpec, StartupError
from delivery_executor.server.listeners import bind_all, release, start_serving
from delivery_executor.testing import ServerProcess, send_message

from .helpers import children

pytestmark = pytest.mark.timeout(120)

_SUMMARY = re.compile(r"summary: delivered (\d+), failed (\d+)")

# Plays systemd: moves the sockets passed as argv fds to 3, 4, ... and sets
# LISTEN_PID (its own pid, kept by exec), LISTEN_FDS and LISTEN_FDNAMES.
_ACTIVATE = """
import fcntl, os, sys
n = int(sys.argv[1])
given = [int(x) for x in sys.argv[2 : 2 + n]]
copies = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in given]  # clear of 3..
for i, fd in enumerate(copies):
    os.dup2(fd, 3 + i, inheritable=True)
for fd in set(given + copies) - set(range(3, 3 + n)):
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(n), LISTEN_FDNAMES="lmtp:lmtp")
os.execv(sys.argv[2 + n], sys.argv[2 + n :])
"""


def _body(token: str) -> bytes:
    return f"Subject: {token}\r\n\r\ntoken {token}\r\n".encode()


def _new(root: Path, user: str = "alice") -> list[Path]:
    box = root / "example.org" / user
    return [e.path for e in Maildir.open(box).scan_new()] if box.exists() else []


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for UNIX sockets (sun_path holds 107 bytes; tmp_path can be longer)."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="de-sock-", dir="/tmp"))
    yield d
    shutil.rmtree(d)


@pytest.mark.parametrize(
    ("text", "kind", "canonical"),
    [
        ("127.0.0.1:2525", "tcp", "127.0.0.1:2525"),
        (":24", "tcp", "127.0.0.1:24"),
        ("[::1]:0", "tcp", "[::1]:0"),
        ("localhost:25", "tcp", "localhost:25"),
        ("unix:/run/x/lmtp", "unix", "unix:/run/x/lmtp"),
        ("fd:3", "fd", "fd:3"),
    ],
)
def test_listen_spec_parses_each_form(text: str, kind: str, canonical: str) -> None:
    """HOST:PORT, [IPv6]:PORT, unix:PATH and fd:N parse to the right kind and print back."""
    spec = ListenSpec.parse(text)
    assert spec.kind == kind
    assert str(spec) == canonical


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("nonsense", "expected HOST:PORT"),
        ("::1:25", "an IPv6 address goes in brackets"),
        ("[::1]25", "expected HOST:PORT"),
        ("[::g]:25", "not an IPv6 address"),
        ("127.0.0.1:65536", "port must be 0-65535"),
        ("127.0.0.1:-1", "port must be 0-65535"),
        ("unix:", "needs a path"),
        ("unix:/" + "x" * 120, "longer than 107 bytes"),
        ("fd:2", "descriptor number >= 3"),
        ("fd:x", "descriptor number >= 3"),
    ],
)
def test_listen_spec_rejects_bad_addresses(text: str, says: str) -> None:
    """Malformed addresses raise ValueError saying what is wrong."""
    with pytest.raises(ValueError, match=re.escape(says)):
        ListenSpec.parse(text)


def test_unix_socket_mode_stale_file_replaced_and_removed_at_release(sock_dir: Path) -> None:
    """A stale socket file is replaced; the new one has the asked mode; release removes it."""
    path = sock_dir / "lmtp"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a dead server's socket file: nobody listens
    [[bound]] = bind_all([ListenSpec.parse(f"unix:{path}")], 1, socket_mode=0o640)
    try:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o640
        assert bound.address == f"unix:{path}"
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(path))  # it listens already, before any loop serves it
    finally:
        release([bound])
    assert not path.exists()


def test_regular_file_and_live_socket_are_never_replaced(sock_dir: Path) -> None:
    """A regular file at the socket path, or a socket someone listens on, is an error; kept."""
    path = sock_dir / "lmtp"
    path.write_bytes(b"precious")
    with pytest.raises(StartupError, match="is not a socket; refusing to replace it"):
        bind_all([ListenSpec.parse(f"unix:{path}")], 1)
    assert path.read_bytes() == b"precious"
    path.unlink()
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(path))
        live.listen()
        with pytest.raises(StartupError, match="another server is listening there"):
            bind_all([ListenSpec.parse(f"unix:{path}")], 1)
        assert stat.S_ISSOCK(os.stat(path).st_mode)
    path.unlink()


def test_release_keeps_a_socket_file_a_newer_instance_made(sock_dir: Path) -> None:
    """release() removes only the very socket file it created, not a replacement."""
    path = sock_dir / "lmtp"
    [[bound]] = bind_all([ListenSpec.parse(f"unix:{path}")], 1)
    path.unlink()
    with socket.socket(socket.AF_UNIX) as newer:
        newer.bind(str(path))
        release([bound])
        assert path.exists()
    path.unlink()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another group needs root")
def test_socket_group_is_applied(sock_dir: Path) -> None:
    """--socket-group: the socket file belongs to that group."""
    path = sock_dir / "lmtp"
    [[bound]] = bind_all([ListenSpec.parse(f"unix:{path}")], 1, socket_gid=65534)
    try:
        assert os.stat(path).st_gid == 65534
    finally:
        release([bound])


@pytest.mark.skipif(os.geteuid() != 0, reason="a directory of another group needs root")
def test_a_setgid_directory_gives_the_group_without_chown(
    sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a directory setgid to the group, --socket-group needs no chown (no membership)."""
    box = sock_dir / "sg"
    box.mkdir()
    os.chown(box, -1, 65534)
    box.chmod(0o2750)

    def refuse(*args: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "chown", refuse)
    [[bound]] = bind_all([ListenSpec.parse(f"unix:{box / 'lmtp'}")], 1, socket_gid=65534)
    try:
        assert os.stat(box / "lmtp").st_gid == 65534
    finally:
        release([bound])


def test_unix_socket_errors_say_what_to_do(sock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing directory and a refused --socket-group each get a hint, not just errno text."""
    with pytest.raises(StartupError, match=r"the directory .*/nowhere does not exist"):
        bind_all([ListenSpec.parse(f"unix:{sock_dir / 'nowhere' / 'lmtp'}")], 1)

    def refuse(*args: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "chown", refuse)
    gid = next(g for g in (65534, 0, 1) if g != os.stat(sock_dir).st_gid)
    with pytest.raises(StartupError, match=r"Operation not permitted \(giving the socket to "
                       r"group \S+ needs membership of that group; or make .* setgid"):  # fmt: skip
        bind_all([ListenSpec.parse(f"unix:{sock_dir / 'lmtp'}")], 1, socket_gid=gid)


def test_workers_get_own_tcp_sockets_and_share_unix_ones(sock_dir: Path) -> None:
    """bind_all for 2 workers: 2 SO_REUSEPORT TCP sockets on one port, 1 shared UNIX socket."""
    specs = [ListenSpec.parse("127.0.0.1:0"), ListenSpec.parse(f"unix:{sock_dir / 's'}")]
    (a_tcp, a_unix), (b_tcp, b_unix) = bind_all(specs, 2)
    try:
        assert a_tcp is not b_tcp
        assert a_tcp.sock.getsockname() == b_tcp.sock.getsockname()
        assert a_tcp.sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
        assert a_unix is b_unix
    finally:
        release([a_tcp, a_unix, b_tcp, b_unix])


def test_tcp_bind_error_is_one_clear_line() -> None:
    """A port in use without SO_REUSEPORT: StartupError naming the address."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartupError, match=rf"cannot listen on 127\.0\.0\.1:{port}: "):
            bind_all([ListenSpec.parse(f"127.0.0.1:{port}")], 1)


def test_serve_on_tcp_ipv6_and_unix_at_once(tmp_path: Path, sock_dir: Path) -> None:
    """Three --listen at once: one message through each lands; the socket is 0660, then gone."""
    path = sock_dir / "lmtp"
    root = tmp_path / "mail"
    listen = ["127.0.0.1:0", "[::1]:0", f"unix:{path}"]
    with ServerProcess(root, listen=listen) as srv:
        assert srv.addresses[2] == f"unix:{path}"
        assert srv.addresses[1].startswith("[::1]:")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660

        targets = [("127.0.0.1", srv.ports[0], None), ("::1", srv.ports[1], None), ("", 0, path)]

        async def send() -> list[int]:
            codes = []
            for i, (host, port, sock) in enumerate(targets):
                replies = await send_message(
                    host, port, mail_from="s@x.org", rcpts=["alice@example.org"],
                    body=_body(f"m{i}"), path=None if sock is None else str(sock),
                )  # fmt: skip
                codes.append(replies[0].code)
            return codes

        assert asyncio.run(send()) == [250, 250, 250]
        assert srv.stop() == 0
    assert not path.exists()
    assert sorted(p.read_bytes().split(b"token ")[1][:2] for p in _new(root)) == [
        b"m0",
        b"m1",
        b"m2",
    ]
    (summary,) = [m for line in srv.lines if (m := _SUMMARY.search(line))]
    assert summary.group(1) == "3"


def test_two_workers_on_a_unix_socket_and_tcp(tmp_path: Path, sock_dir: Path) -> None:
    """--workers 2 over a shared UNIX socket plus TCP: all 40 land, both drain, file removed."""
    path = sock_dir / "lmtp"
    root = tmp_path / "mail"
    with ServerProcess(root, listen=["127.0.0.1:0", f"unix:{path}"], workers=2) as srv:
        assert len(set(srv.pids)) == 2
        assert srv.addresses.count(f"unix:{path}") == 2

        async def load() -> int:
            async def one(i: int) -> bool:
                replies = await send_message(
                    "127.0.0.1", srv.port, mail_from="s@x.org", rcpts=[f"u{i % 4}@example.org"],
                    body=_body(f"m{i}"), path=str(path) if i % 2 else None,
                )  # fmt: skip
                return replies[0].code == 250

            return sum(await asyncio.gather(*(one(i) for i in range(40))))

        assert asyncio.run(load()) == 40
        assert srv.stop() == 0
    assert not path.exists()
    assert sum(len(_new(root, f"u{k}")) for k in range(4)) == 40
    assert sum(int(m.group(1)) for line in srv.lines if (m := _SUMMARY.search(line))) == 40
    assert "workers exited: [0, 0]" in srv.lines


def test_systemd_socket_activation_with_two_workers(tmp_path: Path, sock_dir: Path) -> None:
    """LISTEN_FDS sockets (UNIX and TCP) are served by both workers; no child inherits them."""
    root = tmp_path / "mail"
    path = sock_dir / "lmtp"
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(path))
    unix.listen()
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    fds = [unix.fileno(), tcp.fileno()]
    prefix = [sys.executable, "-c", _ACTIVATE, "2", *map(str, fds)]
    try:
        with ServerProcess(
            root, listen=[], listeners=2, workers=2, prefix=prefix, pass_fds=fds
        ) as srv:
            assert sorted(set(srv.addresses)) == sorted(
                {f"unix:{path}", f"127.0.0.1:{tcp.getsockname()[1]}"}
            )
            for worker in set(srv.pids):
                (helper,) = children(worker)  # the writer helper
                assert b"writers._helper" in Path(f"/proc/{helper}/cmdline").read_bytes()
                assert b"LISTEN_FDS=" not in Path(f"/proc/{helper}/environ").read_bytes()

            async def load() -> int:
                ok = 0
                for i in range(10):
                    replies = await send_message(
                        "127.0.0.1", tcp.getsockname()[1], mail_from="s@x.org",
                        rcpts=["alice@example.org"], body=_body(f"m{i}"),
                        path=str(path) if i % 2 else None,
                    )  # fmt: skip
                    ok += replies[0].code == 250
                return ok

            assert asyncio.run(load()) == 10
            assert srv.stop(signal.SIGTERM) == 0
        assert len(_new(root)) == 10
        assert path.exists(), "systemd's socket file is systemd's to remove"
    finally:
        unix.close()
        tcp.close()


def test_listen_on_an_inherited_fd(tmp_path: Path) -> None:
    """--listen fd:N serves a listening socket handed down by the parent; fd:N of a file fails."""
    root = tmp_path / "mail"
    with socket.socket() as tcp:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        fd, port = tcp.fileno(), tcp.getsockname()[1]
        with ServerProcess(root, listen=[f"fd:{fd}"], pass_fds=[fd]) as srv:
            assert srv.addresses == [f"127.0.0.1:{port}"]
            assert _deliver_one(port) == 250
            assert srv.stop() == 0
    assert len(_new(root)) == 1
    with open(tmp_path / "f", "w") as f:
        res = subprocess.run(
            [sys.executable, "-m", "delivery_executor", "serve", "--root", str(root),
             "--listen", f"fd:{f.fileno()}"],
            pass_fds=[f.fileno()], capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert res.returncode == 2
        err = f"fd:{f.fileno()}: not a socket: Socket operation on non-socket\n"
        assert res.stderr.endswith(err)
        assert res.stderr.count("\n") == 1


def _deliver_one(port: int) -> int:
    replies = asyncio.run(
        send_message(
            "127.0.0.1", port, mail_from="s@x.org", rcpts=["alice@example.org"], body=_body("x")
        )
    )
    return replies[0].code


@pytest.mark.uvloop
@pytest.mark.asyncio
async def test_tcp_connections_are_accepted_with_nagle_off() -> None:
    """A TCP listener's connections have TCP_NODELAY, on asyncio too (else 40 ms stalls)."""
    [[bound]] = bind_all([ListenSpec.parse("127.0.0.1:0")], 1)
    seen: list[int] = []

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            sock = transport.get_extra_info("socket")
            seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    loop = asyncio.get_running_loop()
    server = await start_serving(loop, bound, Probe, None)
    try:
        reader, writer = await asyncio.open_connection(*bound.sock.getsockname()[:2])
        await reader.read()
        writer.close()
        await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()
    assert seen and seen[0] != 0
