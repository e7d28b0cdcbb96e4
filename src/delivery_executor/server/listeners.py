"""Where ``serve`` listens: TCP (IPv4, IPv6), UNIX sockets, inherited and systemd sockets.

Addresses (:meth:`ListenSpec.parse`): ``HOST:PORT``, ``[IPv6]:PORT``,
``unix:/path`` and ``fd:N`` (a listening socket inherited as file descriptor
``N``, e.g. from inetd-style supervisors). systemd socket activation
(``LISTEN_PID``/``LISTEN_FDS``, descriptors from 3 on) adds its sockets; one
named ``tls`` (``FileDescriptorName=tls``) is served with implicit TLS.

**Workers.** The process that starts ``serve`` binds every listener once
(:func:`bind_all`), so that a bind error is reported before any worker runs,
then forks the workers. A TCP listener gets one socket per worker, each bound
with ``SO_REUSEPORT``: the kernel spreads new connections over the workers'
own accept queues. A UNIX, ``fd:`` or systemd socket is one socket that all
workers share and compete to accept from (Linux has no ``SO_REUSEPORT`` for
UNIX sockets; a busy worker may take more than its share).

**UNIX sockets** are created with ``--socket-mode`` (default 0660) from the
start (the umask is set around ``bind``), optionally chowned to a group. A
file already at the path is removed only if it is a socket nobody listens on
(connect refused); a live socket or any other kind of file is an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import ipaddress
import os
import re
import socket
import stat
import sys
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .checks import StartupError
from .tls import TlsManager, implicit_tls

__all__ = [
    "DEFAULT_LISTEN",
    "BoundListener",
    "ListenSpec",
    "adopt_fd",
    "bind_all",
    "release",
    "start_serving",
    "systemd_listeners",
]

DEFAULT_LISTEN = "127.0.0.1:2525"
BACKLOG = 1024
"""Pending connections per listener. asyncio's default is 100: a burst of a few
hundred connects overflowed it, and those clients waited out SYN retries
(1 s, then 3 s), which showed as a p99 of 2 s with 256 or 1,000 sessions."""
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes with its NUL
_SD_LISTEN_FDS_START = 3
_BRACKETED = re.compile(r"\[([^\]]+)\]:(\d{1,5})")


@dataclass(frozen=True, slots=True)
class ListenSpec:
    """One ``--listen``/``--tls-listen`` value, parsed; nothing is bound yet."""

    kind: Literal["tcp", "unix", "fd"]
    host: str = ""
    port: int = 0
    path: str = ""
    fd: int = -1
    implicit_tls: bool = False

    @classmethod
    def parse(cls, text: str, *, implicit_tls: bool = False) -> ListenSpec:
        """``HOST:PORT``, ``[IPv6]:PORT``, ``unix:PATH`` or ``fd:N``; ``ValueError`` if not."""
        if text.startswith("unix:"):
            path = os.path.abspath(text[5:]) if text[5:] else ""
            if not path:
                raise ValueError("unix: needs a path, e.g. unix:/run/delivery-executor/lmtp")
            if len(os.fsencode(path)) > _SUN_PATH_MAX:
                raise ValueError(f"socket path longer than {_SUN_PATH_MAX} bytes: {path}")
            return cls("unix", path=path, implicit_tls=implicit_tls)
        if text.startswith("fd:"):
            if not text[3:].isdigit() or int(text[3:]) < 3:
                raise ValueError(f"fd: needs a descriptor number >= 3, got {text!r}")
            return cls("fd", fd=int(text[3:]), implicit_tls=implicit_tls)
        if m := _BRACKETED.fullmatch(text):
            host, port = m.group(1), m.group(2)
            try:
                ipaddress.IPv6Address(host.partition("%")[0])
            except ValueError:
                raise ValueError(f"not an IPv6 address in brackets: {text!r}") from None
        else:
            host, sep, port = text.rpartition(":")
            if ":" in host and "[" not in host:
                raise ValueError(f"an IPv6 address goes in brackets, as in [::1]:25: {text!r}")
            if not sep or "[" in host:
                raise ValueError(
                    f"expected HOST:PORT, [IPv6]:PORT, unix:PATH or fd:N, got {text!r}"
                )
            host = host or "127.0.0.1"
        if not port.isdigit() or int(port) > 65535:
            raise ValueError(f"port must be 0-65535, got {text!r}")
        return cls("tcp", host=host, port=int(port), implicit_tls=implicit_tls)

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.kind == "fd":
            return f"fd:{self.fd}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(eq=False)
class BoundListener:
    """A listening socket and what to serve on it.

    ``unlink`` is set for a UNIX socket file this process created: :func:`release`
    removes it, but only while the path still is that very socket (device and
    inode), never one a newer instance put there.
    """

    sock: socket.socket
    implicit_tls: bool = False
    unlink: tuple[str, int, int] | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        """Where it listens, as ``--listen`` spells it (the real port, if 0 was asked)."""
        name = self.sock.getsockname()
        if self.sock.family == socket.AF_UNIX:
            return f"unix:{os.fsdecode(name) if name else '(unnamed)'}"
        host, port = name[:2]
        return f"[{host}]:{port}" if self.sock.family == socket.AF_INET6 else f"{host}:{port}"


def _resolve(host: str, port: int) -> tuple[socket.AddressFamily, tuple[object, ...]]:
    # A name binds its first address only: one --listen, one socket (give several
    # --listen for several addresses).
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    return family, addr


def _bind_tcp(spec: ListenSpec, port: int, reuse_port: bool) -> BoundListener:
    try:
        family, addr = _resolve(spec.host, port)
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only
        # when their proto says TCP; with Nagle on, every reply waited for the
        # client's delayed ACK, and serve on asyncio ran far slower than on uvloop.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    except OSError as exc:
        raise StartupError(f"cannot listen on {spec}: {exc.strerror or exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio does
        sock.bind(addr)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {spec}: {exc.strerror or exc}") from exc
    return BoundListener(sock, spec.implicit_tls)


def _clear_stale_socket(path: str) -> None:
    """Remove a socket file nobody listens on; refuse anything else at ``path``."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StartupError(f"unix:{path}: {exc.strerror}") from exc
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"unix:{path} exists and is not a socket; refusing to replace it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # stale: left by a process that died
        except OSError as exc:
            raise StartupError(f"unix:{path}: cannot tell if it is in use: {exc}") from exc
        else:
            raise StartupError(f"unix:{path}: another server is listening there")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _unix_hint(path: str, gid: int | None, exc: OSError) -> str:
    """``exc``'s reason, with what an admin most likely has to do about it."""
    why = exc.strerror or str(exc)
    parent = os.path.dirname(path) or "."
    if exc.errno == errno.ENOENT and not os.path.isdir(parent):
        return f"{why} (the directory {parent} does not exist; create it first)"
    if exc.errno == errno.EPERM and gid is not None:
        try:
            group = grp.getgrgid(gid).gr_name
        except KeyError:
            group = str(gid)
        return (
            f"{why} (giving the socket to group {group} needs membership of that group;"
            f" or make {parent} setgid to it and drop --socket-group)"
        )
    return why


def _bind_unix(spec: ListenSpec, mode: int, gid: int | None) -> BoundListener:
    _clear_stale_socket(spec.path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # The file is born with `mode`: no moment where it is wider than asked.
        old = os.umask(0o777 & ~mode)
        try:
            sock.bind(spec.path)
        finally:
            os.umask(old)
        st = os.stat(spec.path)
        if gid is not None and st.st_gid != gid:  # a setgid directory may have done it
            os.chown(spec.path, -1, gid)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {spec}: {_unix_hint(spec.path, gid, exc)}") from exc
    return BoundListener(sock, spec.implicit_tls, (spec.path, st.st_dev, st.st_ino))


def adopt_fd(fd: int, *, implicit_tls: bool = False, what: str = "") -> BoundListener:
    """An inherited listening socket; :class:`StartupError` if ``fd`` is not one."""
    what = what or f"fd:{fd}"
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise StartupError(f"{what}: not a socket: {exc.strerror}") from exc
    ok = sock.type == socket.SOCK_STREAM and sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_ACCEPTCONN
    )
    if not ok:
        sock.detach()  # not ours to close
        raise StartupError(f"{what}: not a listening stream socket")
    sock.set_inheritable(False)
    return BoundListener(sock, implicit_tls)


def systemd_listeners(environ: MutableMapping[str, str] | None = None) -> list[BoundListener]:
    """The sockets systemd passed (``LISTEN_FDS``), if meant for this process.

    Removes ``LISTEN_PID``, ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` from the
    environment either way, so that no child takes them again.
    """
    env = os.environ if environ is None else environ
    pid, count = env.pop("LISTEN_PID", None), env.pop("LISTEN_FDS", None)
    names = env.pop("LISTEN_FDNAMES", "").split(":")
    if pid is None or count is None or not pid.isdigit() or int(pid) != os.getpid():
        return []
    if not count.isdigit():
        raise StartupError(f"LISTEN_FDS={count!r} is not a number")
    out = []
    for i in range(int(count)):
        fd = _SD_LISTEN_FDS_START + i
        tls = i < len(names) and names[i] == "tls"
        out.append(adopt_fd(fd, implicit_tls=tls, what=f"systemd socket fd:{fd}"))
    return out


def bind_all(
    specs: Sequence[ListenSpec],
    copies: int,
    *,
    reuse_port: bool = False,
    socket_mode: int = 0o660,
    socket_gid: int | None = None,
) -> list[list[BoundListener]]:
    """Bind each spec; ``copies`` lists, one per worker (see the module doc).

    TCP specs get a socket per copy (``SO_REUSEPORT`` when ``copies > 1`` or
    ``reuse_port``; port 0 becomes the first copy's port); the others are one
    shared :class:`BoundListener`. On error everything bound so far is
    released and :class:`StartupError` raised.
    """
    out: list[list[BoundListener]] = [[] for _ in range(copies)]
    try:
        for spec in specs:
            if spec.kind == "tcp":
                first = _bind_tcp(spec, spec.port, reuse_port or copies > 1)
                port = first.sock.getsockname()[1]
                out[0].append(first)
                for k in range(1, copies):
                    out[k].append(_bind_tcp(spec, port, True))
                continue
            if spec.kind == "unix":
                shared = _bind_unix(spec, socket_mode, socket_gid)
            else:
                shared = adopt_fd(spec.fd, implicit_tls=spec.implicit_tls)
            for lst in out:
                lst.append(shared)
    except BaseException:
        release(b for lst in out for b in lst)
        raise
    return out


def release(listeners: Iterable[BoundListener], *, unlink: bool = True) -> None:
    """Close each socket once; remove the UNIX socket files we created (if still ours)."""
    seen: set[int] = set()
    for b in listeners:
        if id(b) in seen:
            continue
        seen.add(id(b))
        b.sock.close()
        if unlink and b.unlink is not None:
            path, dev, ino = b.unlink
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if (st.st_dev, st.st_ino) == (dev, ino):
                    os.unlink(path)


async def start_serving(
    loop: asyncio.AbstractEventLoop,
    bound: BoundListener,
    factory: Callable[[], asyncio.BaseProtocol],
    tls: TlsManager | None,
) -> asyncio.AbstractServer:
    """Accept connections on ``bound`` with ``factory`` (TLS first if it is implicit-TLS)."""
    context = None
    if bound.implicit_tls:
        if tls is None:
            raise StartupError(f"{bound.address}: implicit TLS needs --tls-cert and --tls-key")
        factory, context = implicit_tls(factory), tls.context
    if bound.sock.family != socket.AF_UNIX:
        return await loop.create_server(factory, sock=bound.sock, ssl=context, backlog=BACKLOG)
    extra: dict[str, Any] = {}
    if sys.version_info >= (3, 13):
        # The socket file is ours to remove (release()), or systemd's: never the
        # loop's, which on 3.13 removes it at close (asyncio, and uvloop >= 0.21).
        extra["cleanup_socket"] = False
    try:
        return await loop.create_unix_server(
            factory, sock=bound.sock, ssl=context, backlog=BACKLOG, **extra
        )
    except TypeError:
        if not extra:
            raise
        # A loop without the option (an older uvloop) does not remove the file either.
        return await loop.create_unix_server(factory, sock=bound.sock, ssl=context, backlog=BACKLOG)
