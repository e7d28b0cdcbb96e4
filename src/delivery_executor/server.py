"""``delivery-executor serve``: a durable Maildir delivery server over LMTP or SMTP.

One process runs one event loop holding the executor and the listening
socket (aiosmtpd's ``Controller`` would run its own loop in a thread, which
the executor's futures cannot cross). ``workers > 1`` starts that many such
processes on one port with ``SO_REUSEPORT``, each with its own executor.
"""

from __future__ import annotations

import asyncio
import contextlib
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

from .baselines import NoopHandler, PerMessageHandler
from .executor import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_CONCURRENT_FLUSHES,
    DEFAULT_MAX_QUEUED_BYTES,
    DEFAULT_MAX_WAIT,
    BatchPolicy,
    DeliveryExecutor,
)
from .maildir import SyncMode
from .offproc import ProcessWriter
from .recipients import MailboxResolver
from .smtp import DEFAULT_MAX_MESSAGE_SIZE, DeliveryHandler, SessionFactory

__all__ = ["ServerConfig", "ServerSummary", "run_server", "serve"]

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
    max_connections: int = 256
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
    offload: str = "process"
    """Where batches are written: ``"process"`` (a helper process, the default:
    the loop keeps its core), ``"syncs"`` (on the loop, syncs in a thread) or
    ``"all"`` (in a thread)."""
    mode: str = "executor"
    """``"executor"``, or a benchmark baseline: ``"noop"``, ``"per-message"``."""


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


async def serve(
    config: ServerConfig,
    stop: asyncio.Event,
    *,
    on_ready: Callable[[str, int], None] | None = None,
) -> ServerSummary:
    """Listen and deliver until ``stop`` is set, then drain and return a summary.

    After ``stop``: the listening socket closes, open sessions get up to
    ``config.grace`` seconds to finish, then the executor flushes everything it
    accepted. Raises ``OSError`` if the address cannot be bound.
    """
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    executor = DeliveryExecutor(
        config.max_batch,
        config.max_wait,
        config.max_concurrent_flushes,
        policy=config.policy,
        sync=config.sync,
        offload="all" if config.offload == "all" else "syncs",
        writer=ProcessWriter(config.sync) if config.offload == "process" else None,
        max_queued_bytes=max(
            DEFAULT_MAX_QUEUED_BYTES, 2 * (config.max_message_size + _HEADER_SLACK)
        ),
        max_message_size=config.max_message_size + _HEADER_SLACK,
    )
    resolver = MailboxResolver(
        config.root,
        domains=config.domains,
        recipient_delimiter=config.recipient_delimiter,
        existing_only=config.existing_only,
    )
    hostname = socket.getfqdn()  # one look-up, for the greeting and our Received lines
    handler: object
    if config.mode == "executor":
        handler = DeliveryHandler(
            executor,
            resolver,
            max_message_size=config.max_message_size,
            add_headers=config.add_headers,
            hostname=hostname,
        )
    elif config.mode == "noop":
        handler = NoopHandler()
    elif config.mode == "per-message":
        handler = PerMessageHandler(resolver)
    else:
        raise ValueError(f"mode must be executor, noop or per-message, not {config.mode!r}")
    factory = SessionFactory(
        handler,
        lmtp=config.lmtp,
        max_connections=config.max_connections,
        loop=loop,
        data_size_limit=config.max_message_size,
        enable_SMTPUTF8=True,
        hostname=hostname,
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
    delivered = stats.delivered
    if isinstance(handler, (NoopHandler, PerMessageHandler)):
        delivered = handler.accepted
    return ServerSummary(
        delivered=delivered,
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

    # No uvloop option: it changes msg/s by less than the noise (DESIGN.md §4), and
    # started from a background shell job it ignored our SIGTERM handler.
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
