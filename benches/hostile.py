"""Hostile-load figures for README's "Hostile clients" section (issue 24).

    .venv/bin/python -m benches.hostile [--quick] [--json out.json]

Loopback only; ``serve`` runs in a child process
(:class:`delivery_executor.testing.ServerProcess`) on a scratch root, once per
scenario:

A. **Slow DATA clients.** ``serve --max-size 1048576 --trusted-networks ''``:
   loopback is trusted by default (exempt from ``--min-rate``), so the
   trusted list is emptied to treat these clients as an external attacker
   would be treated. Each slow client connects from its own address
   (127.0.0.2, 127.0.0.3, ...: one per peer, under the default per-peer cap),
   goes LHLO, MAIL (every other one declaring ``SIZE=1048576``), RCPT, DATA
   and then trickles a few bytes a second. Once all are in DATA, good
   clients (from 127.0.0.1, one connection each, messages in turn of 64 KiB
   and 500 B) send their messages. Reported: good latency (from the last
   byte of the message handed to the socket to its ``250``) p50 and max,
   good messages answered ``250``, slow clients still open when the good
   ones finished, and each slow client's closing reply and when it came
   (seconds after it connected).
B. **Clients that pipeline and never read.** ``serve`` at its defaults. Each
   client (small socket buffers, as an attacker who wants the server to hold
   the replies would choose) sends LHLO and then HELP lines (79 bytes of
   reply for 6 sent) in 16 KiB chunks, never reading, until it has sent
   enough for replies that fill twice what the kernel buffers for the server
   (tcp_wmem's maximum: the server's send buffer grows to it before its own
   64 KiB high-water mark is reached), or, past half of that, its sends have
   not progressed for 8 s (2 s with ``--quick``); 40 s at most (8 s).
   Meanwhile a normal client sends a 500-byte message on a new connection
   every second (every half second with ``--quick``). Reported: the server
   process's VmRSS before, at its peak (sampled every 0.2 s, and VmHWM) and
   after the clients are gone, its CPU time, the normal messages' latency
   (DATA end to ``250``, and connect to ``250``), and when each pipelining
   client's connection was reset (``TCP_INFO``'s state, no read), counted
   from its connect. The unread-reply stall (30 s) is a ``SessionFactory``
   argument, not a ``serve`` option: the full run waits up to 60 s after the
   sending for every reset; ``--quick`` does not wait and closes the clients
   itself.

Every loop is bounded in count and time: the full run takes about one to
two and a half minutes (B waits for the resets), ``--quick`` about 20 s.
Exit status 1 if a good or normal message was not answered ``250``, a slow
client was not closed by the server, or (full run) a pipelining client was
not reset in time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from delivery_executor.stats import percentile
from delivery_executor.testing import ServerProcess, dot_stuff

__all__ = ["PLANS", "Plan", "format_report", "main", "run"]

_HOST = "127.0.0.1"
_STEP = 30.0  # seconds any one command or reply may take before the bench gives up on it
_TCP_CLOSE = 7  # tcpi_state after a reset (linux/tcp_states.h)
_WRITE_STALL = 30.0  # SessionFactory's default; serve has no option for it


@dataclass(frozen=True)
class Plan:
    slow: int  # slow DATA clients
    trickle: int  # bytes each sends per second once in DATA
    slow_limit: float  # seconds after which a slow client still open gives up
    good_clients: int
    good_messages: int  # in all, split over the good clients
    pipeliners: int
    # No progress for this long (the server's loop is busy, or it stopped
    # reading this client): the pipeliner stops sending.
    blocked_after: float
    fill_limit: float  # seconds the pipeliners may send in all
    wait_abort: float  # seconds to wait for the server to abort them (0: do not)
    normal_every: float  # a normal message every so many seconds meanwhile
    normal_max: int


PLANS = {
    "full": Plan(50, 3, 40.0, 8, 80, 16, 8.0, 40.0, 60.0, 1.0, 120),
    "quick": Plan(10, 3, 20.0, 4, 16, 2, 2.0, 8.0, 0.0, 0.5, 10),
}


class _Conn:
    """A line-level LMTP client with timed reads."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, source: str | None = None) -> _Conn:
        local = (source, 0) if source else None
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(_HOST, port, local_addr=local), _STEP
        )
        return cls(reader, writer)

    async def reply(self, within: float = _STEP) -> tuple[int, str]:
        """The next reply (code, last line); (0, "closed") at EOF; TimeoutError past ``within``."""
        while True:
            line = await asyncio.wait_for(self.reader.readline(), within)
            if not line:
                return 0, "closed"
            text = line.decode("ascii", "replace").rstrip("\r\n")
            if text[3:4] != "-":
                return int(text[:3]) if text[:3].isdigit() else 0, text

    async def command(self, line: str, want: int) -> None:
        self.writer.write(line.encode() + b"\r\n")
        code, text = await self.reply()
        if code != want:
            raise RuntimeError(f"{line!r}: {text}")

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


# --- A: slow DATA clients and good clients ------------------------------------------


@dataclass
class _Slow:
    closed_after: float | None = None  # seconds after connecting; None: still open at the limit
    reply: str = ""
    bytes_sent: int = 0


async def _slow_client(port: int, i: int, plan: Plan, in_data: asyncio.Event) -> _Slow:
    out = _Slow()
    t0 = time.monotonic()
    conn = await _Conn.open(port, f"127.0.0.{2 + i}")
    try:
        if (await conn.reply())[0] != 220:
            raise RuntimeError("no greeting")
        await conn.command("LHLO slow.invalid", 250)
        size = " SIZE=1048576" if i % 2 else ""
        await conn.command(f"MAIL FROM:<slow{i}@attacker.invalid>{size}", 250)
        await conn.command(f"RCPT TO:<slow{i}@example.org>", 250)
        await conn.command("DATA", 354)
        in_data.set()
        trickle = b"X-Slow: " + b"x" * 10_000
        while time.monotonic() - t0 < plan.slow_limit:
            chunk = trickle[out.bytes_sent % 8000 :][: plan.trickle]
            try:
                conn.writer.write(chunk)
                out.bytes_sent += len(chunk)
                _, text = await conn.reply(within=1.0)
            except TimeoutError:
                continue  # nothing from the server this second: trickle on
            except ConnectionError as exc:
                text = f"reset ({exc.__class__.__name__})"
            out.closed_after = time.monotonic() - t0
            out.reply = text
            break
        return out
    finally:
        await conn.close()


def _body(subject: bytes, size: int) -> bytes:
    """About ``size`` bytes: a header and 78-byte lines (under any line limit)."""
    line = b"y" * 76 + b"\r\n"
    return b"Subject: " + subject + b"\r\n\r\n" + line * max(1, size // len(line))


async def _good_client(port: int, n: int, k: int, latencies: list[float]) -> Counter[int]:
    codes: Counter[int] = Counter()
    conn = await _Conn.open(port)
    try:
        if (await conn.reply())[0] != 220:
            raise RuntimeError("no greeting")
        await conn.command("LHLO good.invalid", 250)
        for j in range(n):
            size = 64 * 1024 if (j + k) % 2 == 0 else 500
            body = _body(b"good", size)
            await conn.command("MAIL FROM:<good@example.net>", 250)
            await conn.command(f"RCPT TO:<good{k}@example.org>", 250)
            await conn.command("DATA", 354)
            conn.writer.write(dot_stuff(body))
            await conn.writer.drain()
            t = time.monotonic()
            code, _ = await conn.reply()
            latencies.append((time.monotonic() - t) * 1000)
            codes[code] += 1
        conn.writer.write(b"QUIT\r\n")
        await conn.reply()
    finally:
        await conn.close()
    return codes


async def _scenario_a(port: int, plan: Plan) -> dict[str, Any]:
    events = [asyncio.Event() for _ in range(plan.slow)]
    slow = [asyncio.create_task(_slow_client(port, i, plan, ev)) for i, ev in enumerate(events)]
    await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in events)), _STEP)
    await asyncio.sleep(1.0)  # every slow client is in DATA and has trickled a little
    t_good = time.monotonic()
    latencies: list[float] = []
    per = plan.good_messages // plan.good_clients
    counts = await asyncio.wait_for(
        asyncio.gather(*(_good_client(port, per, k, latencies) for k in range(plan.good_clients))),
        plan.slow_limit + _STEP,
    )
    good_seconds = time.monotonic() - t_good
    open_at_end = sum(not t.done() or t.result().closed_after is None for t in slow)
    results = await asyncio.wait_for(asyncio.gather(*slow), plan.slow_limit + _STEP)
    codes: Counter[int] = sum(counts, Counter())
    latencies.sort()
    closed = [r.closed_after for r in results if r.closed_after is not None]
    return {
        "slow_clients": plan.slow,
        "slow_with_size": plan.slow // 2,
        "trickle_bytes_per_s": plan.trickle,
        "good_clients": plan.good_clients,
        "good_messages": per * plan.good_clients,
        "good_250": codes.get(250, 0),
        "good_other_codes": {str(c): n for c, n in codes.items() if c != 250},
        "good_p50_ms": round(percentile(latencies, 0.5), 1),
        "good_max_ms": round(latencies[-1], 1) if latencies else 0.0,
        "good_seconds": round(good_seconds, 2),
        "slow_open_when_good_done": open_at_end,
        "slow_closed": len(closed),
        "slow_closed_after_min_s": round(min(closed), 1) if closed else None,
        "slow_closed_after_max_s": round(max(closed), 1) if closed else None,
        "slow_replies": dict(Counter(r.reply or "still open" for r in results)),
    }


# --- B: clients that pipeline and never read --------------------------------------


def _status_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def _since(t: float | None, t0: float) -> float | None:
    return None if t is None else round(t - t0, 1)


def _local_port(sock: socket.socket) -> int | None:
    try:
        return int(sock.getsockname()[1])
    except OSError:
        return None


def _server_queues(port: int) -> dict[int, tuple[int, int]]:
    """Peer port → (Recv-Q, Send-Q) of the server's established sockets, from ``ss``; {} if none."""
    try:
        out = subprocess.run(
            ["ss", "-Htn", "state", "established", f"( sport = :{port} )"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    queues = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[3].rpartition(":")[2].isdigit():
            queues[int(fields[3].rpartition(":")[2])] = (int(fields[0]), int(fields[1]))
    return queues


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tcp_state(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    return int(struct.unpack("B", info[:1])[0])


@dataclass
class _Pipe:
    sock: socket.socket
    sent: int = 0
    connected_at: float = 0.0
    blocked_at: float | None = None  # when its sends stopped going through
    aborted_at: float | None = None


def _help_cap() -> int:
    """Bytes of HELP lines whose replies fill twice what the kernel may buffer for us.

    The server's send buffer grows up to tcp_wmem's maximum (4 MiB by
    default) before its own 64 KiB high-water mark is reached; more input
    than this would only wait unread in its receive buffer.
    """
    try:
        with open("/proc/sys/net/ipv4/tcp_wmem") as f:
            wmem = int(f.read().split()[2])
    except (OSError, IndexError, ValueError):
        wmem = 4 << 20
    return 2 * (wmem + (128 << 10)) * 6 // 79


async def _pipeliner(port: int, plan: Plan, pipes: list[_Pipe], cap: int) -> None:
    """LHLO, then HELP lines (79 bytes of reply for 6 sent) until blocked or the cap."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    pipe = _Pipe(sock)
    pipes.append(pipe)  # closed by the caller, whatever happens here
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    sock.setblocking(False)
    await asyncio.wait_for(loop.sock_connect(sock, (_HOST, port)), _STEP)
    pipe.connected_at = time.monotonic()
    chunk = b"HELP\r\n" * (16 * 1024 // 6)
    first = b"LHLO pipeliner.invalid\r\n"
    while pipe.sent < cap:
        try:
            await asyncio.wait_for(loop.sock_sendall(sock, first + chunk), plan.blocked_after)
        except TimeoutError:
            # Under half the cap, the server's loop may only be busy with the
            # others (it runs each one's buffered commands in one go): go on.
            if pipe.sent < cap // 2:
                continue
            pipe.blocked_at = time.monotonic() - plan.blocked_after
            return
        except ConnectionError:
            return
        pipe.sent += len(first + chunk)
        first = b""


async def _normal_message(port: int, k: int) -> tuple[int, float, float]:
    """One 500-byte message on a new connection: code, ms DATA end → reply, ms in all."""
    t0 = time.monotonic()
    conn = await _Conn.open(port)
    try:
        if (await conn.reply())[0] != 220:
            raise RuntimeError("no greeting")
        await conn.command("LHLO normal.invalid", 250)
        await conn.command("MAIL FROM:<normal@example.net>", 250)
        await conn.command(f"RCPT TO:<normal{k}@example.org>", 250)
        await conn.command("DATA", 354)
        conn.writer.write(dot_stuff(_body(b"normal", 500)))
        await conn.writer.drain()
        t = time.monotonic()
        code, _ = await conn.reply()
        now = time.monotonic()
        conn.writer.write(b"QUIT\r\n")
        await conn.reply()
        return code, (now - t) * 1000, (now - t0) * 1000
    finally:
        await conn.close()


async def _normal_loop(
    port: int, plan: Plan, stop: asyncio.Event, out: list[tuple[int, float, float]]
) -> None:
    for k in range(1, plan.normal_max + 1):
        out.append(await _normal_message(port, k))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), plan.normal_every)
        if stop.is_set():
            return


async def _watch(
    pid: int, pipes: list[_Pipe], peak: list[int], stop: asyncio.Event, done: asyncio.Event
) -> None:
    """Every 0.2 s: the server's VmRSS (its maximum into ``peak``), which clients were reset.

    Sets ``done`` once every client has been reset.
    """
    while not stop.is_set():
        peak[0] = max(peak[0], _status_kib(pid)["VmRSS"])
        now = time.monotonic()
        for p in pipes:
            if p.aborted_at is None and p.sock.fileno() >= 0 and _tcp_state(p.sock) == _TCP_CLOSE:
                p.aborted_at = now
        if pipes and all(p.aborted_at is not None for p in pipes):
            done.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)


async def _scenario_b(port: int, pid: int, plan: Plan) -> dict[str, Any]:
    await _normal_message(port, 0)  # the delivery path is loaded before the baseline
    before = _status_kib(pid)
    cpu0 = _cpu_seconds(pid)
    cap = _help_cap()
    peak = [before["VmRSS"]]
    pipes: list[_Pipe] = []
    normal: list[tuple[int, float, float]] = []
    stop = asyncio.Event()
    t0 = time.monotonic()
    all_aborted = asyncio.Event()
    watcher = asyncio.create_task(_watch(pid, pipes, peak, stop, all_aborted))
    normals = asyncio.create_task(_normal_loop(port, plan, stop, normal))
    try:
        senders = [
            asyncio.create_task(_pipeliner(port, plan, pipes, cap)) for _ in range(plan.pipeliners)
        ]
        _, late = await asyncio.wait(senders, timeout=plan.fill_limit)
        for task in late:  # still sending at the limit: they stop here, unread
            task.cancel()
        for task in senders:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        filled = time.monotonic() - t0
        if plan.wait_abort:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_aborted.wait(), plan.wait_abort)
        else:
            await asyncio.sleep(plan.normal_every * 2)
        stop.set()
        await asyncio.wait_for(normals, _STEP * 2)
        await watcher
        at_peak = _status_kib(pid)
        queues = _server_queues(port)
        clients = [
            {
                "sent": p.sent,
                "blocked_after_s": _since(p.blocked_at, p.connected_at),
                "reset_after_s": _since(p.aborted_at, p.connected_at),
                # The server's kernel queues for it when the wait ended (gone if reset).
                "server_recv_q_send_q": queues.get(_local_port(p.sock) or 0),
            }
            for p in pipes
        ]
        held = [queues.get(_local_port(p.sock) or 0) for p in pipes]
        send_q_max = max((q[1] for q in held if q), default=None)
    finally:
        stop.set()
        for p in pipes:
            p.sock.close()
        for task in (normals, watcher):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    await asyncio.sleep(1.0)  # the server sees our close (quick) or has freed the aborted ones
    after = _status_kib(pid)
    data_ms = sorted(n[1] for n in normal)
    total_ms = sorted(n[2] for n in normal)
    stalls = [p.aborted_at - p.connected_at for p in pipes if p.aborted_at]
    cpu = _cpu_seconds(pid) - cpu0
    return {
        "pipeliners": plan.pipeliners,
        "bytes_sent_per_client_max": max(p.sent for p in pipes),
        "bytes_cap_per_client": cap,
        "blocked": sum(p.blocked_at is not None for p in pipes),
        "server_cpu_s": round(cpu, 1),
        "fill_seconds": round(filled, 2),
        "rss_before_mib": round(before["VmRSS"] / 1024, 1),
        "rss_peak_mib": round(peak[0] / 1024, 1),
        "hwm_mib": round(at_peak["VmHWM"] / 1024, 1),
        "rss_after_mib": round(after["VmRSS"] / 1024, 1),
        "normal_messages": len(normal),
        "normal_250": sum(n[0] == 250 for n in normal),
        "normal_p50_ms": round(percentile(data_ms, 0.5), 1),
        "normal_max_ms": round(data_ms[-1], 1) if data_ms else 0.0,
        "normal_total_p50_ms": round(percentile(total_ms, 0.5), 1),
        "normal_total_max_ms": round(total_ms[-1], 1) if total_ms else 0.0,
        "waited_for_abort": bool(plan.wait_abort),
        "write_stall_s": _WRITE_STALL,
        "aborted": sum(p.aborted_at is not None for p in pipes),
        "not_reset_send_q_max": send_q_max,
        # From the client's connect; write_stall counts from when the server
        # stopped reading it, which the client cannot see.
        "aborted_after_min_s": round(min(stalls), 1) if stalls else None,
        "aborted_after_max_s": round(max(stalls), 1) if stalls else None,
        "clients": clients,
    }


# --- running and reporting ---------------------------------------------------------


def run(plan: Plan, root: Path) -> dict[str, Any]:
    """Both scenarios, each with its own ``serve``; the figures as a dict."""
    report: dict[str, Any] = {}
    args_a = ["--log-level", "WARNING", "--max-size", "1048576", "--trusted-networks", ""]
    with ServerProcess(root / "a", *args_a) as srv:
        report["A"] = asyncio.run(_scenario_a(srv.port, plan))
        report["A"]["serve_args"] = " ".join(a or repr(a) for a in args_a)
        srv.stop()
        report["A"]["delivered"] = srv.delivered()
    args_b = ["--log-level", "WARNING"]
    with ServerProcess(root / "b", *args_b) as srv:
        report["B"] = asyncio.run(_scenario_b(srv.port, srv.pids[0], plan))
        report["B"]["serve_args"] = " ".join(args_b)
        srv.stop()
        report["B"]["delivered"] = srv.delivered()
    return report


def format_report(r: dict[str, Any]) -> str:
    """The figures as a small table, one line per figure."""
    a, b = r["A"], r["B"]
    rows = [
        (
            f"A. {a['slow_clients']} slow DATA clients ({a['trickle_bytes_per_s']} B/s,"
            f" {a['slow_with_size']} with SIZE=1048576) + {a['good_messages']} good messages"
            f" ({a['good_clients']} clients, 64 KiB and 500 B)",
            "",
        ),
        ("   serve", f"{a['serve_args']}  (loopback untrusted: min-rate applies)"),
        ("   good messages answered 250", f"{a['good_250']} / {a['good_messages']}"),
        ("   good latency p50 / max", f"{a['good_p50_ms']} / {a['good_max_ms']} ms"),
        ("   slow clients open when good ones done", f"{a['slow_open_when_good_done']}"),
        (
            "   slow clients closed by the server",
            f"{a['slow_closed']} / {a['slow_clients']}, after"
            f" {a['slow_closed_after_min_s']}-{a['slow_closed_after_max_s']} s from connect",
        ),
    ]
    rows += [(f"     {n} x", reply) for reply, n in sorted(a["slow_replies"].items())]
    stall = (
        f"{b['aborted']} / {b['pipeliners']}, {b['aborted_after_min_s']}-"
        f"{b['aborted_after_max_s']} s after connecting (write_stall"
        f" {b['write_stall_s']:g} s, SessionFactory's default)"
        if b["waited_for_abort"]
        else "not waited for (--quick; write_stall is 30 s): closed by the bench"
    )
    rows += [
        (
            f"B. {b['pipeliners']} clients pipelining HELP, never reading"
            f" (up to {b['bytes_sent_per_client_max']} B each)",
            "",
        ),
        ("   serve", f"{b['serve_args'] or '(defaults)'}"),
        (
            "   clients whose sends blocked (server busy or not reading)",
            f"{b['blocked']} / {b['pipeliners']}",
        ),
        ("   server CPU meanwhile", f"{b['server_cpu_s']} s"),
        (
            "   server VmRSS before / peak / after",
            f"{b['rss_before_mib']} / {b['rss_peak_mib']} / {b['rss_after_mib']} MiB"
            f" (VmHWM {b['hwm_mib']} MiB)",
        ),
        ("   normal messages meanwhile: 250", f"{b['normal_250']} / {b['normal_messages']}"),
        (
            "     DATA end to 250: p50 / max",
            f"{b['normal_p50_ms']} / {b['normal_max_ms']} ms",
        ),
        (
            "     connect to 250: p50 / max",
            f"{b['normal_total_p50_ms']} / {b['normal_total_max_ms']} ms",
        ),
        ("   aborted by the server", stall),
        (
            "   not reset: replies in the server's kernel",
            f"{b['pipeliners'] - b['aborted']}"
            + (f", Send-Q up to {q} B" if (q := b["not_reset_send_q_max"]) else ""),
        ),
    ]
    width = max(len(k) for k, v in rows if v)
    return "\n".join(f"{k:<{width}}  {v}" if v else k for k, v in rows)


def ok(r: dict[str, Any]) -> bool:
    """Every good and normal message answered 250, every slow client closed by the server."""
    a, b = r["A"], r["B"]
    return (
        a["good_250"] == a["good_messages"]
        and a["slow_closed"] == a["slow_clients"]
        and b["normal_250"] == b["normal_messages"] > 0
        and (not b["waited_for_abort"] or b["aborted"] == b["pipeliners"])
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benches.hostile", description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer clients, no 30 s stall wait")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    a = p.parse_args(argv)
    plan = PLANS["quick" if a.quick else "full"]
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        report = run(plan, Path(tmp))
    report["plan"] = asdict(plan) | {"name": "quick" if a.quick else "full"}
    print(format_report(report))
    if a.json:
        a.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if ok(report) else 1


if __name__ == "__main__":
    sys.exit(main())
