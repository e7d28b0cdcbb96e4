"""``delivery-executor serve``: a durable Maildir delivery server over LMTP or SMTP.

One process runs one event loop holding the executor and the listening
socket, so no request crosses threads. ``workers > 1`` starts that many such
processes on one port with ``SO_REUSEPORT``, each with its own executor.

``--handler MODULE:FACTORY`` (``ServerConfig.handler``) replaces the delivery
handler with ``FACTORY(executor, resolver, config)``, any aiosmtpd handler:
the benchmark's baselines plug in this way.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .executor import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_CONCURRENT_FLUSHES,
    DEFAULT_MAX_QUEUED_BYTES,
    DEFAULT_MAX_WAIT,
    BatchPolicy,
    DeliveryExecutor,
    WriterName,
)
from .recipients import MailboxResolver
from .smtp import DEFAULT_MAX_MESSAGE_SIZE, DeliveryHandler, SessionFactory
from .smtp.sessions import (
    DEFAULT_MAX_CONNECTIONS_PER_IP,
    DEFAULT_MIN_RATE,
    DEFAULT_SESSION_TIMEOUT,
)
from .store import SyncMode

__all__ = ["DEFAULT_MAX_CONNECTIONS", "ServerConfig", "ServerSummary", "run_server", "serve"]

DEFAULT_MAX_CONNECTIONS = 256

_log = logging.getLogger("delivery_executor.server")
_HEADER_SLACK = 64 * 1024  # our prepended headers, on top of the message size


@dataclass
class ServerConfig:
    """Everything ``serve`` needs; the CLI flags map one to one."""

    root: Path
    host: str = "127.0.0.1"
    port: int = 2525
    lmtp: bool = True
    domains: Sequence[str] | None = None
    recipient_delimiter: str | None = None
    existing_only: bool = False
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_batch: int = DEFAULT_MAX_BATCH
    max_wait: float = DEFAULT_MAX_WAIT
    max_concurrent_flushes: int = DEFAULT_MAX_CONCURRENT_FLUSHES
    policy: BatchPolicy = "eager"
    sync: SyncMode = "auto"
    add_headers: bool = True
    reuse_port: bool = False
    grace: float = 10.0
    """Seconds to let open sessions finish after a stop signal."""
    workers: int = 1
    writer: WriterName = "process"
    """Where batches are written: ``"process"`` (a helper process, the default:
    the loop keeps its core), ``"loop"`` (on the loop, syncs in a thread) or
    ``"thread"``."""
    handler: str | None = None
    """``"module:factory"``: ``factory(executor, resolver, config)`` returns the
    aiosmtpd handler to use instead of :class:`DeliveryHandler`."""
    # -- hostile load (SessionFactory; see delivery_executor.smtp.sessions)
    max_connections_per_ip: int = DEFAULT_MAX_CONNECTIONS_PER_IP
    """Sessions per peer (IPv4 address or IPv6 /64); 0: no cap."""
    session_timeout: float = DEFAULT_SESSION_TIMEOUT
    """Seconds a session may last."""
    min_rate: int = DEFAULT_MIN_RATE
    """Bytes/s a client must average while the server waits on it; 0: no rule."""
    max_pending_bytes: int | None = None
    """Bytes held in DATA across sessions; ``None``: 4 × ``max_message_size``."""


@dataclass(frozen=True)
class ServerSummary:
    """What one server process did, printed when it stops."""

    delivered: int
    failed: int
    batches: int
    mean_batch_size: float
    syncs: int
    refused_connections: int
    seconds: float

    def line(self) -> str:
        return (
            f"summary: delivered {self.delivered}, failed {self.failed}, batches {self.batches},"
            f" mean batch size {self.mean_batch_size:.2f}, syncs {self.syncs},"
            f" refused connections {self.refused_connections}, up {self.seconds:.1f} s"
        )


def load_handler_factory(spec: str) -> Callable[..., object]:
    """``"package.module:name"`` → that callable; ``ValueError`` saying what is wrong."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"--handler must be MODULE:FACTORY, not {spec!r}")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"--handler {spec}: {exc}") from exc
    if not callable(factory):
        raise ValueError(f"--handler {spec}: {name} is not callable")
    return factory  # type: ignore[no-any-return]


def _executor(config: ServerConfig) -> DeliveryExecutor:
    return DeliveryExecutor(
        max_batch=config.max_batch,
        max_wait=config.max_wait,
        max_concurrent_flushes=config.max_concurrent_flushes,
        policy=config.policy,
        sync=config.sync,
        writer=config.writer,
        max_queued_bytes=max(
            DEFAULT_MAX_QUEUED_BYTES, 2 * (config.max_message_size + _HEADER_SLACK)
        ),
        max_message_size=config.max_message_size + _HEADER_SLACK,
    )


def _handler(
    config: ServerConfig, executor: DeliveryExecutor, hostname: str
) -> tuple[object, MailboxResolver]:
    resolver = MailboxResolver(
        config.root,
        domains=config.domains,
        recipient_delimiter=config.recipient_delimiter,
        existing_only=config.existing_only,
    )
    if config.handler is not None:
        return load_handler_factory(config.handler)(executor, resolver, config), resolver
    handler = DeliveryHandler(
        executor,
        resolver,
        max_message_size=config.max_message_size,
        add_headers=config.add_headers,
        hostname=hostname,
    )
    return handler, resolver


async def serve(
    config: ServerConfig,
    stop: asyncio.Event,
    *,
    on_ready: Callable[[str, int], None] | None = None,
) -> ServerSummary:
    """Listen and deliver until ``stop`` is set, then drain and return a summary.

    After ``stop``: the listening socket closes, open sessions get up to
    ``config.grace`` seconds to finish, then the executor flushes everything it
    accepted. Raises ``OSError`` if the address cannot be bound or the writer
    helper cannot start.
    """
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    executor = _executor(config)
    hostname = socket.getfqdn()  # one look-up, for the greeting and our Received lines
    handler, _ = _handler(config, executor, hostname)
    factory = SessionFactory(
        handler,
        lmtp=config.lmtp,
        max_connections=config.max_connections,
        loop=loop,
        data_size_limit=config.max_message_size,
        enable_SMTPUTF8=True,
        hostname=hostname,
        max_connections_per_ip=config.max_connections_per_ip,
        session_timeout=config.session_timeout,
        min_rate=config.min_rate,
        max_pending_bytes=config.max_pending_bytes,
    )
    async with executor:
        server = await loop.create_server(
            factory, config.host, config.port, reuse_port=config.reuse_port or None
        )
        host, port = server.sockets[0].getsockname()[:2]
        if on_ready is not None:
            on_ready(host, port)
        try:
            await stop.wait()
        finally:
            server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(factory.idle.wait(), config.grace)
            if factory.live:
                _log.warning(
                    "%d sessions still open after %.1f s; closing", factory.live, config.grace
                )
    stats = executor.stats()
    return ServerSummary(
        delivered=stats.delivered,
        failed=stats.failed,
        batches=stats.batches,
        mean_batch_size=stats.mean_batch_size,
        syncs=stats.syncs,
        refused_connections=factory.refused,
        seconds=time.monotonic() - started,
    )


def _say(line: str) -> None:
    # One write per line: worker processes share the parent's stdout, and
    # print() writes the text and its newline separately, so lines interleave.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _run_one(config: ServerConfig) -> int:
    """Run one server process until SIGINT/SIGTERM; print where it listens and a summary."""

    async def main() -> ServerSummary:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        proto = "LMTP" if config.lmtp else "SMTP"

        def ready(host: str, port: int) -> None:
            _say(
                f"listening on {host}:{port} ({proto}, pid {os.getpid()}),"
                f" delivering into {config.root}"
            )

        return await serve(config, stop, on_ready=ready)

    summary = asyncio.run(main())
    _say(summary.line())
    return 0


def _run_workers(config: ServerConfig, argv: Sequence[str]) -> int:
    """Start ``config.workers`` processes on one port; forward signals; wait for all."""
    child_argv = [
        sys.executable,
        "-m",
        "delivery_executor",
        *argv,
        "--workers",
        "1",
        "--reuse-port",
    ]
    children = [subprocess.Popen(child_argv) for _ in range(config.workers)]

    def forward(signum: int, _frame: object) -> None:
        for c in children:
            if c.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    c.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [c.wait() for c in children]
    bad = [c for c in codes if c != 0]
    _say(f"workers exited: {codes}")
    return bad[0] if bad else 0


def run_server(config: ServerConfig, argv: Sequence[str] = ()) -> int:
    """The ``serve`` command: one process, or ``workers`` of them sharing the port."""
    if config.workers > 1:
        if config.port == 0:
            raise ValueError("--workers > 1 needs a fixed port (not 0) to share")
        return _run_workers(config, argv)
    return _run_one(config)
