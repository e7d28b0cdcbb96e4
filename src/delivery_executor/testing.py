"""Tools for testing a delivery set-up: an LMTP-aware client and a ``serve`` process.

- :func:`send_message`: one message over one connection. Unlike
  ``smtplib.LMTP`` it reads one reply per accepted recipient after DATA
  (RFC 2033), so it can check a server's LMTP replies one by one.
- :class:`ServerProcess`: ``delivery-executor serve`` as a child process, in
  its own process group, with its output captured line by line; the project's
  tests and benchmarks start every server through it. It waits for each
  listener's ``listening on ADDRESS (LMTP, pid N)`` line, where ADDRESS is
  ``HOST:PORT``, ``[IPv6]:PORT`` or ``unix:PATH``.
"""

from __future__ import annotations

import asyncio
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

__all__ = [
    "Reply",
    "SMTPClientError",
    "ServerProcess",
    "dot_stuff",
    "free_port",
    "send_message",
]


class SMTPClientError(Exception):
    """The server answered a command the client cannot go on after."""


@dataclass(frozen=True, slots=True)
class Reply:
    """One recipient's outcome: the RCPT reply if refused there, else its DATA reply."""

    rcpt: str
    code: int
    text: str

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300


def dot_stuff(body: bytes) -> bytes:
    """``body`` with CRLF line ends, leading dots doubled, and the final ``.`` line."""
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    if body.startswith(b"."):
        body = b"." + body
    return body.replace(b"\r\n.", b"\r\n..") + b".\r\n"


async def _reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise SMTPClientError("connection closed by the server")
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        lines.append(text[4:])
        if len(text) < 4 or text[3] != "-":
            return int(text[:3]), "\n".join(lines)


async def send_message(
    host: str,
    port: int,
    *,
    mail_from: str,
    rcpts: list[str],
    body: bytes,
    lmtp: bool = True,
    helo: str = "client.invalid",
    data: bytes | None = None,
    path: str | None = None,
    pipelining: bool = False,
) -> list[Reply]:
    """One connection, one message: greet, MAIL, RCPT each, DATA, QUIT.

    ``pipelining``: send MAIL, every RCPT and DATA as one group and then read
    their replies, as Postfix's LMTP and SMTP clients do (RFC 2920); else
    wait for each reply before the next command.

    ``path``: connect to this UNIX socket instead of ``host:port``. ``data``,
    if given, is sent after DATA as it is (already dot-stuffed and ending in
    the lone ``.`` line) instead of ``dot_stuff(body)``: load generators
    prepare it once. Returns one :class:`Reply` per recipient, in order.
    Raises :class:`SMTPClientError` when the greeting, HELO or MAIL is refused,
    and ``OSError`` when the connection fails.
    """
    if path is not None:
        reader, writer = await asyncio.open_unix_connection(path)
    else:
        reader, writer = await asyncio.open_connection(host, port)
    try:
        hello = "LHLO" if lmtp else "EHLO"
        await _expect(reader, writer, None, 220, "greeting")
        await _expect(reader, writer, f"{hello} {helo}", 250, hello)
        payload = dot_stuff(body) if data is None else data
        if pipelining:
            group = [f"MAIL FROM:<{mail_from}>", *(f"RCPT TO:<{r}>" for r in rcpts), "DATA", ""]
            writer.write("\r\n".join(group).encode())
        await _expect(
            reader, writer, None if pipelining else f"MAIL FROM:<{mail_from}>", 250, "MAIL"
        )
        results: list[Reply | None] = []
        for rcpt in rcpts:
            if not pipelining:
                writer.write(f"RCPT TO:<{rcpt}>\r\n".encode())
            code, text = await _reply(reader)
            results.append(None if code == 250 else Reply(rcpt, code, text))
        accepted = [i for i, r in enumerate(results) if r is None]
        if accepted or pipelining:
            replies = await _data(reader, writer, payload, len(accepted), lmtp, sent=pipelining)
            for i, (code, text) in zip(accepted, replies, strict=True):
                results[i] = Reply(rcpts[i], code, text)
        writer.write(b"QUIT\r\n")
        try:
            await _reply(reader)
        except SMTPClientError:
            pass
        return [r for r in results if r is not None]
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def _expect(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    line: str | None,
    want: int,
    what: str,
) -> None:
    if line is not None:
        writer.write(line.encode() + b"\r\n")
    code, text = await _reply(reader)
    if code != want:
        raise SMTPClientError(f"{what}: {code} {text}")


async def _data(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    payload: bytes,
    n: int,
    lmtp: bool,
    *,
    sent: bool = False,
) -> list[tuple[int, str]]:
    """DATA for ``n`` accepted recipients: one reply each (LMTP), or one shared (SMTP).

    ``sent``: the DATA command went out already (in a pipelined group).
    """
    if not sent:
        writer.write(b"DATA\r\n")
    code, text = await _reply(reader)
    if code != 354:
        return [(code, text)] * n
    writer.write(payload)
    if lmtp:
        return [await _reply(reader) for _ in range(n)]
    return [await _reply(reader)] * n


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_LISTEN = re.compile(
    r"listening on (?P<address>unix:(?P<path>.+?)|\[?(?P<host>[\w.:]+?)\]?:(?P<port>\d+))"
    r" \((?P<proto>LMTP|SMTP), pid (?P<pid>\d+)\)"
)


class ServerProcess:
    """``python -m delivery_executor serve`` with its output captured line by line.

    ``listen`` replaces the default ``--listen host:port`` (an empty list: no
    ``--listen`` at all, e.g. for systemd sockets). Waits (up to
    ``start_timeout`` s) until every worker prints a line for each listener:
    one per ``listen`` entry and ``--tls-listen`` in ``args``, or
    ``listeners`` if given. ``port``/``ports`` tell the TCP ports,
    ``addresses`` every address, ``pids`` the server processes (one per
    line). ``stop()`` signals it and collects the rest of its output (the
    summary); leaving the ``with`` block SIGKILLs whatever of its process
    group is left. ``AssertionError`` if it does not start; nothing is left
    running then. ``preexec_fn`` and ``pass_fds`` go to ``subprocess.Popen``;
    ``prefix`` goes before the command (a wrapper that ends in ``exec``);
    ``program`` replaces ``python -m delivery_executor`` (e.g. an installed
    ``delivery-executor``).
    """

    def __init__(
        self,
        root: Path,
        *args: str,
        host: str = "127.0.0.1",
        port: int = 0,
        workers: int = 1,
        env: dict[str, str] | None = None,
        start_timeout: float = 20.0,
        listen: Sequence[str] | None = None,
        listeners: int | None = None,
        preexec_fn: Callable[[], object] | None = None,
        pass_fds: Sequence[int] = (),
        prefix: Sequence[str] = (),
        program: Sequence[str] = (),
    ) -> None:
        self.root = root
        if listen is None:
            listen = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
        if listeners is None:
            listeners = len(listen) + sum(a == "--tls-listen" for a in args)
        program = program or [sys.executable, "-m", "delivery_executor"]
        cmd = [*prefix, *program, "serve", "--root", str(root)]
        for address in listen:
            cmd += ["--listen", address]
        cmd += ["--workers", str(workers), *args]
        # Its own process group: kill() reaches the workers and writer helpers too.
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
            env=env,
            preexec_fn=preexec_fn,
            pass_fds=pass_fds,
        )
        self.lines: list[str] = []
        # A thread feeds a queue: select() on a buffered pipe misses lines that
        # already sit in Python's buffer.
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()
        self.ports: list[int] = []
        self.addresses: list[str] = []
        self.pids: list[int] = []
        try:
            self._wait_listening(workers * listeners, start_timeout)
        except BaseException:
            self.__exit__()  # a failed start must not leave servers behind
            raise
        self.port = self.ports[0] if self.ports else 0

    def _wait_listening(self, lines: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.addresses) < lines:
            m = _LISTEN.search(self.readline(deadline - time.monotonic()))
            if m:
                self.addresses.append(m.group("address"))
                if m.group("port") is not None:
                    self.ports.append(int(m.group("port")))
                self.pids.append(int(m.group("pid")))

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

    @property
    def summary(self) -> str | None:
        """serve's ``summary: delivered ...`` line, once it has stopped."""
        return next((line for line in self.lines if line.startswith("summary:")), None)

    def delivered(self) -> int:
        """The ``delivered N`` count of the summary line (``AssertionError`` if none)."""
        summary = self.summary
        assert summary is not None, f"no summary line: {self.lines}"
        m = re.search(r"delivered (\d+)", summary)
        assert m, summary
        return int(m.group(1))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()  # also any worker or helper still running after a clean stop
        self._reader.join(10)  # EOF once every writer of the pipe has exited
        if self.proc.stdout is not None:
            self.proc.stdout.close()
