"""``serve`` as a command: start-up checks, then one server process or forked workers.

:func:`run_server` does, in order:

1. start-up checks (:class:`StartupError`, one line, before anything
   listens): ``--root`` created and written to, the TLS files loaded, the
   event loop available;
2. binds every listener: systemd's sockets, then ``--listen`` and
   ``--tls-listen`` (``127.0.0.1:2525`` if there are none); then settles the
   host name (a ``localhost`` warning is logged once, not once per worker);
3. with one worker, serves in this process; with ``workers > 1``, forks them
   (each serves its share of the sockets, see :mod:`.listeners`), forwards
   TERM, INT, HUP and USR1 to them, and waits. A worker that exits without
   being asked makes the parent stop the others and exit non-zero, so that a
   supervisor (systemd ``Restart=on-failure``) restarts the whole service.

Each server process prints ``listening on ADDRESS (LMTP, pid N), delivering
into ROOT`` per listener once it accepts connections, and a ``summary:`` line
when it has drained: on stdout, and with ``--log-file`` in that file too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

from .. import userdb
from ..heap import keep_heap
from ..logs import logs_to_file
from . import notify, signals
from .checks import StartupError, check_root, check_scripts
from .config import metric_labels
from .core import ServerConfig, ServerSummary, serve
from .identity import default_hostname
from .listeners import (
    DEFAULT_LISTEN,
    BoundListener,
    ListenSpec,
    bind_all,
    release,
    systemd_listeners,
)
from .loops import loop_factory, run
from .metrics import WorkerMetrics, start_worker_metrics
from .signals import Running
from .tls import tls_for

__all__ = ["run_server"]

_log = logging.getLogger("delivery_executor.server")


def _say(line: str) -> None:
    # One write per line: worker processes share the parent's stdout, and
    # print() writes the text and its newline separately, so lines interleave.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    if logs_to_file():  # --log-file: the admin reads the file, not our stdout
        _log.info("%s", line)


class _Controls:
    """What the signal handlers of one server process act on."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.running: Running | None = None

    def ready(self, running: Running) -> None:
        self.running = running
        proto = "LMTP" if self.config.lmtp else "SMTP"
        for b in running.listeners:
            tls = " with implicit TLS" if b.implicit_tls else ""
            _say(
                f"listening on {b.address} ({proto}, pid {os.getpid()}){tls},"
                f" delivering into {self.config.root}"
            )
        notify.notify("READY=1", f"STATUS=delivering into {self.config.root}")

    def stop(self, stop: asyncio.Event) -> None:
        if not stop.is_set():  # a second SIGTERM is not news to systemd
            notify.notify("STOPPING=1")
        stop.set()

    def reload(self) -> None:
        count = signals.reopen_log_files()
        _log.info("SIGHUP: reopened %d log file(s)", count)
        if userdb.reload_all():
            _log.info("SIGHUP: user databases will be read again")
        if self.running is not None:
            self.running.reload_tls()

    def report(self) -> None:
        if self.running is not None:
            _log.info("%s", self.running.stats_line())


def _run_one(config: ServerConfig, listeners: Sequence[BoundListener]) -> int:
    """Serve on ``listeners`` in this process until SIGINT/SIGTERM; print the summary."""

    async def main() -> ServerSummary:
        stop = asyncio.Event()
        controls = _Controls(config)
        signals.take_over(
            asyncio.get_running_loop(),
            stop=lambda: controls.stop(stop),
            reload=controls.reload,
            report=controls.report,
        )
        return await serve(config, stop, on_ready=controls.ready, listeners=listeners)

    summary = run(main, config.loop)
    _say(summary.line())
    return 0


def _worker(
    config: ServerConfig, mine: list[BoundListener], every: list[BoundListener]
) -> NoReturn:
    """A forked worker's whole life: close the others' sockets, serve, ``_exit``."""
    code = 1
    try:
        # Another worker's TCP socket kept open here would stay in the
        # SO_REUSEPORT group after that worker died, and take connections
        # nobody accepts.
        notify.forget()  # the supervisor speaks to systemd, not each worker
        keep = {id(b) for b in mine}
        release((b for b in every if id(b) not in keep), unlink=False)
        code = _run_one(config, mine)
    except StartupError as exc:
        sys.stderr.write(f"delivery-executor serve: worker {os.getpid()}: {exc}\n")
        code = 2
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            logging.shutdown()  # a log file's buffered lines (logs.BlockFileHandler)
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)  # never run the parent's cleanup in a child


def _supervise(pids: list[int], metrics: WorkerMetrics | None) -> int:
    """Forward signals to the workers, wait for all; stop the rest if one ends on its own."""
    live = set(pids)
    if metrics is not None:
        metrics.start(live)
    codes: dict[int, int] = {}
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            # Marked before notifying: a second signal can run this handler
            # again inside notify() (Python handlers nest), and must not repeat it.
            first, stopping = not stopping, True
            if first:
                notify.notify("STOPPING=1")
        if signum == signal.SIGHUP:
            signals.reopen_log_files()
        for pid in list(live):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    for sig in signals.HANDLED:
        signal.signal(sig, forward)
    signals.unblock()
    while live:
        pid, status = os.waitpid(-1, 0)
        if pid not in live:
            continue
        live.discard(pid)
        codes[pid] = os.waitstatus_to_exitcode(status)
        if not stopping:
            stopping = True
            _log.error("worker %d exited (%d) unasked; stopping the others", pid, codes[pid])
            for other in list(live):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(other, signal.SIGTERM)
    if metrics is not None:
        metrics.close()
    ordered = [codes[p] for p in pids]
    _say(f"workers exited: {ordered}")
    bad = [c for c in ordered if c != 0]
    return (bad[0] if bad[0] > 0 else 1) if bad else 0


def _run_workers(config: ServerConfig, per_worker: list[list[BoundListener]]) -> int:
    """Fork one worker per socket list; this process only supervises them."""
    every = [b for lst in per_worker for b in lst]
    metrics = start_worker_metrics(
        config.metrics, metric_labels(config)
    )  # before the fork: workers inherit where to report
    signals.block()  # until forward() is installed; each worker unblocks in take_over()
    sys.stdout.flush()
    sys.stderr.flush()
    pids = []
    for mine in per_worker:
        pid = os.fork()
        if pid == 0:
            _worker(config, mine, every)
        pids.append(pid)
    for b in every:
        b.sock.close()  # the workers hold them; UNIX socket files are removed at the end
    # The sockets listen already: connections wait in their backlog for a worker.
    notify.notify("READY=1", f"STATUS={len(pids)} workers delivering into {config.root}")
    return _supervise(pids, metrics)


def _prepare(config: ServerConfig) -> None:
    """The start-up checks that come before binding (see the module doc)."""
    if config.workers < 1:
        raise StartupError(f"--workers must be >= 1, not {config.workers}")
    check_root(config.root)
    check_scripts(
        (*config.sieve_before, *config.sieve_after, *filter(None, [config.sieve_default]))
    )
    try:
        loop_factory(config.loop)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    needed = config.require_starttls or any(s.implicit_tls for s in config.listen)
    tls_for(config.tls_cert, config.tls_key, needed=needed)  # a bad certificate: reported now


def run_server(config: ServerConfig) -> int:
    """The ``serve`` command: check, bind, serve (in workers if asked); the exit status.

    Raises :class:`StartupError` when it cannot start (see :mod:`.checks`).
    """
    _prepare(config)
    keep_heap()  # big buffers reused, not mapped and faulted in per message (heap.py)
    inherited = systemd_listeners()
    if config.tls_cert is None and any(b.implicit_tls for b in inherited):
        release(inherited)
        raise StartupError("a systemd socket named 'tls' needs --tls-cert and --tls-key")
    specs = list(config.listen)
    if not specs and not inherited:
        specs = [ListenSpec.parse(DEFAULT_LISTEN)]
    try:
        per_worker = bind_all(
            specs,
            config.workers,
            reuse_port=config.reuse_port,
            socket_mode=config.socket_mode,
            socket_gid=config.socket_gid,
        )
    except BaseException:
        release(inherited)
        raise
    for lst in per_worker:
        lst[:0] = inherited
    # Settled once, after every check (a failed start prints one line only), so
    # that a localhost warning is logged once and not by each worker.
    config = dataclasses.replace(config, hostname=config.hostname or default_hostname())
    try:
        if config.workers == 1:
            return _run_one(config, per_worker[0])
        return _run_workers(config, per_worker)
    finally:
        release(b for lst in per_worker for b in lst)
