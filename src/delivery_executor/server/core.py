"""The server's core: :func:`serve`, the async server (:class:`ServerConfig`: :mod:`.config`).

One process runs one event loop holding the executor and its listening
sockets, so no request crosses threads. ``workers > 1`` (see :mod:`.run`)
forks that many such processes over the same listeners, each with its own
executor.

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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..executor import (
    DEFAULT_MAX_QUEUED_BYTES,
    DeliveryExecutor,
)
from ..recipients import MailboxResolver
from ..sieve.hook import SieveFilter
from ..smtp import DeliveryHandler, SessionFactory
from ..smtp.handler import SHUTTING_DOWN
from ..userdb import UserdbResolver, quota_for, resolver_for
from .checks import StartupError, check_scripts
from .config import DEFAULT_MAX_CONNECTIONS, ServerConfig, metric_labels
from .identity import banner, default_hostname
from .listeners import (
    DEFAULT_LISTEN,
    BoundListener,
    ListenSpec,
    bind_all,
    release,
    start_serving,
)
from .metrics import failed_copies, start_metrics
from .signals import Running
from .tls import TlsManager, tls_for
from .tmp_cleanup import TmpCleaner

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "SHUTTING_DOWN",
    "Running",
    "ServerConfig",
    "ServerSummary",
    "load_handler_factory",
    "serve",
]

REPLY_WAIT = 5.0
"""Seconds past ``--grace`` that a session whose copy is being delivered gets for its reply."""

_log = logging.getLogger("delivery_executor.server")
_HEADER_SLACK = 64 * 1024  # our prepended headers, on top of the message size


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
        size_in_names=config.size_in_names,
    )


def _handler(
    config: ServerConfig, executor: DeliveryExecutor, hostname: str, cleaner: TmpCleaner
) -> tuple[object, MailboxResolver]:
    resolver = resolver_for(config) or MailboxResolver(
        config.root,
        domains=config.domains,
        recipient_delimiter=config.recipient_delimiter,
        existing_only=config.existing_only,
        detail_to_folder=config.detail_to_folder,
    )
    if config.handler is not None:
        return load_handler_factory(config.handler)(executor, resolver, config), resolver
    handler = DeliveryHandler(
        quota_for(config, executor, resolver) or executor,
        resolver,
        max_message_size=config.max_message_size,
        add_headers=config.add_headers,
        hostname=hostname,
        line_endings=config.line_endings,
        duplicate_window=config.duplicate_window,
        watcher=cleaner,
        sieve=_sieve(config, resolver),
    )
    return handler, resolver


def _sieve(config: ServerConfig, resolver: MailboxResolver | None = None) -> SieveFilter | None:
    """The Sieve filter ``config`` asks for, or ``None`` (no cost per delivery).

    With a userdb resolver, a user's script is where its record puts it
    (:meth:`UserdbResolver.sieve_script`). :class:`StartupError` for an admin
    script that is missing.
    """
    if not (config.sieve or config.sieve_before or config.sieve_after or config.sieve_default):
        return None
    check_scripts(
        (*config.sieve_before, *config.sieve_after, *filter(None, [config.sieve_default]))
    )
    sieve = SieveFilter(
        before=config.sieve_before,
        after=config.sieve_after,
        default=config.sieve_default,
        user_scripts=True,
        recipient_delimiter=config.recipient_delimiter or "+",
        user_script=resolver.sieve_script if isinstance(resolver, UserdbResolver) else None,
    )
    for p in (*config.sieve_before, *config.sieve_after, *filter(None, [config.sieve_default])):
        sieve.cache.get(os.fspath(p))  # compile now: an error is logged at start-up
    return sieve


async def serve(
    config: ServerConfig,
    stop: asyncio.Event,
    *,
    on_ready: Callable[[Running], None] | None = None,
    listeners: Sequence[BoundListener] | None = None,
) -> ServerSummary:
    """Listen and deliver until ``stop`` is set, then drain and return a summary.

    ``listeners`` are sockets bound beforehand (:func:`.listeners.bind_all`);
    without them ``serve`` binds ``config.listen`` itself and closes them (and
    removes its UNIX socket files) when done. ``on_ready`` is called once all
    listen. After ``stop``: the listeners close, open sessions get up to
    ``config.grace`` seconds to finish, then the executor flushes everything it
    accepted. Raises :class:`StartupError` for a listener, certificate or
    writer helper that cannot be set up.
    """
    started = time.monotonic()
    owned = listeners is None
    if listeners is None:
        specs = list(config.listen) or [ListenSpec.parse(DEFAULT_LISTEN)]
        listeners = bind_all(
            specs,
            1,
            reuse_port=config.reuse_port,
            socket_mode=config.socket_mode,
            socket_gid=config.socket_gid,
        )[0]
    try:
        return await _serve(config, stop, list(listeners), on_ready, started)
    finally:
        if owned:
            release(listeners)


def _sessions(
    config: ServerConfig,
    handler: object,
    hostname: str,
    tls: TlsManager | None,
    loop: asyncio.AbstractEventLoop,
) -> SessionFactory:
    """The protocol factory: aiosmtpd's options and our caps and fairness rules."""
    return SessionFactory(
        handler,
        lmtp=config.lmtp,
        max_connections=config.max_connections,
        loop=loop,
        data_size_limit=config.max_message_size,
        enable_SMTPUTF8=True,
        hostname=hostname,
        ident=banner(config.lmtp, config.banner_version),
        tls_context=tls.context if tls is not None else None,
        require_starttls=config.require_starttls,
        max_connections_per_ip=config.max_connections_per_ip,
        session_timeout=config.session_timeout,
        min_rate=config.min_rate,
        max_pending_bytes=config.max_pending_bytes,
        trusted_networks=config.trusted_networks,
        dsn=config.dsn,
    )


async def _end_sessions(factory: SessionFactory, handler: object, grace: float) -> None:
    """The stop, for sessions: no new transaction, ``grace`` s to finish, then 421 and close.

    Once the stop begins, MAIL gets ``421 4.3.2`` (:attr:`DeliveryHandler.stopping`).
    After ``grace`` s a session still open gets :data:`SHUTTING_DOWN` (RFC 5321
    3.8) and is closed, at once if it is between commands or sending DATA;
    one whose handler is running (a copy being made durable) first gets its
    reply, for at most :data:`REPLY_WAIT` s more, so that the client is not
    told to resend a message that was delivered.
    """
    if isinstance(handler, DeliveryHandler):
        handler.stopping = True
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(factory.idle.wait(), grace)
    if not factory.live:
        return
    _log.warning("%d sessions still open after %.1f s; closing", factory.live, grace)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + REPLY_WAIT
    while True:
        late = loop.time() >= deadline
        for guard in list(factory.sessions):
            if late or not guard.hooks:
                guard.close(SHUTTING_DOWN)
        if late or not factory.sessions:
            return
        await asyncio.sleep(0.02)


async def _serve(
    config: ServerConfig,
    stop: asyncio.Event,
    bound: list[BoundListener],
    on_ready: Callable[[Running], None] | None,
    started: float,
) -> ServerSummary:
    loop = asyncio.get_running_loop()
    tls = tls_for(
        config.tls_cert,
        config.tls_key,
        needed=config.require_starttls or any(s.implicit_tls for s in config.listen),
    )
    executor = _executor(config)
    hostname = config.hostname or default_hostname()  # once: greeting and Received lines
    cleaner = TmpCleaner()  # tmp/ leftovers of killed writes, off the loop (see .tmp_cleanup)
    handler, resolver = _handler(config, executor, hostname, cleaner)
    factory = _sessions(config, handler, hostname, tls, loop)
    try:
        await executor.start()  # the writer helper answers, or we say why now
    except OSError as exc:
        await executor.aclose()
        raise StartupError(str(exc)) from exc
    async with executor:
        metrics = await start_metrics(
            config.metrics, metric_labels(config), executor, handler, factory
        )
        servers: list[asyncio.AbstractServer] = []
        try:
            for b in bound:
                servers.append(await start_serving(loop, b, factory, tls))
        except BaseException:
            for server in servers:
                server.close()
            if metrics is not None:  # its HTTP thread and port would outlive the failure
                await metrics.aclose()
            raise
        if on_ready is not None:
            on_ready(Running(bound, executor, factory, tls, started))
        try:
            await stop.wait()
        finally:
            for server in servers:
                server.close()
            await _end_sessions(factory, handler, config.grace)
    await asyncio.to_thread(cleaner.close)  # a cleanup under way finishes; queued ones are dropped
    if metrics is not None:  # after the drain: a worker's last snapshot counts everything
        await metrics.aclose()
    if isinstance(resolver, UserdbResolver):
        await resolver.aclose()
    stats = executor.stats()
    return ServerSummary(
        delivered=stats.delivered,
        failed=failed_copies(stats.failed, handler),
        batches=stats.batches,
        mean_batch_size=stats.mean_batch_size,
        syncs=stats.syncs,
        refused_connections=factory.refused,
        seconds=time.monotonic() - started,
    )
