"""Connection admission and session limits for ``loop.create_server``.

:class:`SessionFactory` is the protocol factory ``serve`` listens with. It
keeps a slow or idle client from holding slots that normal clients need:

- **caps**: at most ``max_connections`` sessions, and at most
  ``max_connections_per_ip`` from one peer (an IPv4 address, or an IPv6 /64,
  the block one subscriber gets). Unix-socket peers and peers in
  ``trusted_networks`` (default: loopback) are exempt from the per-peer cap
  and from ``min_rate``: the MTA in front is one client that opens many
  sessions (Postfix exempts ``$mynetworks`` from its own client limits the
  same way). Past a cap a connection gets ``421 4.3.2`` and is closed. A
  session stops counting as soon as it has ended: after its ``221``, or its
  peer's close, not when the loop later runs ``connection_lost``.
- **room when full**: a new connection that finds every slot taken closes the
  worst session that is idle at a command boundary after ``evict_idle`` s idle
  in all, or half a second behind ``min_rate`` (``421 4.3.2 ... closing an
  idle or slow connection``), and takes its slot; only if there is none is it
  refused. A client mid-transaction at a normal pace is never chosen.
- **a minimum rate**: while the server waits on a client (for the rest of a
  command line it has started, for DATA until the final dot, or for the client
  to read our replies) the client must send ``min_rate`` bytes per second on
  average over the session, once that waiting passes ``rate_grace`` s; else
  ``421 4.4.2 Connection too slow``. Time between commands does not count:
  aiosmtpd's idle timeout (300 s) covers it.
- **a session deadline**: ``session_timeout`` s after it connected, a session
  gets ``421 4.4.2 Session time limit exceeded`` (deferred while a message is
  being delivered).
- **a DATA budget** (:class:`~.data_budget.DataBudget`): bytes held in DATA
  across sessions, at most ``max_pending_bytes``; see :mod:`.protocol`.
- **unread replies**: a client that sends commands without reading the
  replies fills our write buffer; past :data:`WRITE_HIGH` bytes (asyncio's
  flow control: ``pause_writing``) the session stops reading and running
  commands, so at most ``WRITE_HIGH`` plus one reply waits for it, and at most
  one socket read of its input is held. If it has read nothing for
  ``write_stall`` s, the connection is aborted (a reply could not reach it),
  whatever its peer's trust; never while a message is being delivered.

A one-byte-per-second client is therefore closed after about ``rate_grace``
s of such trickling (about 12 s at the defaults), or at once when the server is
full and a new client needs the slot. Cost: one timer per session per second
and an O(sessions) scan when a connection arrives at a full server.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
from collections.abc import Callable, Iterable
from typing import Any, Protocol, cast

from .. import validate
from .data_budget import DataBudget, DataHold
from .protocol import DeliveryLMTP, DeliverySMTP

__all__ = [
    "DEFAULT_MAX_CONNECTIONS_PER_IP",
    "DEFAULT_MIN_RATE",
    "DEFAULT_SESSION_TIMEOUT",
    "DEFAULT_TRUSTED_NETWORKS",
    "Clock",
    "SessionFactory",
    "SessionGuard",
    "TooManyConnections",
    "parse_networks",
    "peer_key",
    "trusted_networks_option",
]

_log = logging.getLogger("delivery_executor.smtp")

DEFAULT_MAX_CONNECTIONS_PER_IP = 32
"""Sessions per peer: an MTA's usual concurrency to one destination (Postfix: 20) fits."""
DEFAULT_TRUSTED_NETWORKS = ("127.0.0.0/8", "::1/128")
"""Peers exempt from the per-peer cap and from ``min_rate``: loopback, where the MTA runs."""
DEFAULT_SESSION_TIMEOUT = 600.0
"""Seconds a session may last: twice Postfix's 300 s connection reuse limit, so
a reused Postfix connection always ends first."""
DEFAULT_MIN_RATE = 500
"""Bytes/s a client must average while the server waits on it (Apache
mod_reqtimeout's MinRate)."""
RATE_GRACE = 10.0
"""Seconds of waiting on a client before :data:`DEFAULT_MIN_RATE` applies."""
EVICT_IDLE = 5.0
"""Seconds idle (in all) after which a session idle now may be closed to make room."""
EVICT_BEHIND = 0.5
"""Seconds behind ``min_rate`` after which a session may be closed to make room."""
WRITE_HIGH = 64 * 1024
"""Bytes of unread replies after which a session stops reading (asyncio's default mark)."""
WRITE_STALL = 30.0
"""Seconds a session may keep unread replies past :data:`WRITE_HIGH` before it is aborted."""
DATA_WAIT = 30.0
"""Seconds a DATA command waits for room in the DATA budget before ``451 4.3.1``."""

_FULL = "421 4.3.2 Too many connections, try again later"
_FULL_PEER = "421 4.3.2 Too many connections from your address, try again later"
_EVICTED = "421 4.3.2 Server full, closing an idle or slow connection"
_SLOW = "421 4.4.2 Connection too slow, closing"
_DEADLINE = "421 4.4.2 Session time limit exceeded, closing"
_STALLED = "421 4.4.2 Replies not read, closing"  # logged: it could not reach the client


class Timer(Protocol):
    """A scheduled call (:class:`asyncio.TimerHandle`)."""

    def cancel(self) -> None: ...


class Clock(Protocol):
    """What the session limits read the time from and schedule their checks on.

    The event loop by default; a test passes a clock it advances by hand, so
    that deadlines and rates are checked without waiting for real time.
    """

    def time(self) -> float: ...

    def call_later(self, delay: float, callback: Callable[[], object]) -> Timer: ...


_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(networks: Iterable[str | _Network]) -> tuple[_Network, ...]:
    """Networks from CIDR strings (``"10.0.0.0/8"``, ``"::1"``); ``ValueError`` naming a bad one."""
    if isinstance(networks, str):
        raise TypeError(f"trusted_networks must be a sequence of networks, not {networks!r}")
    parsed = []
    for net in networks:
        if isinstance(net, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            parsed.append(net)
            continue
        try:
            parsed.append(ipaddress.ip_network(str(net).strip(), strict=False))
        except ValueError:
            raise ValueError(f"not an IP network: {net!r}") from None
    return tuple(parsed)


def trusted_networks_option(value: str) -> tuple[str, ...]:
    """``--trusted-networks``: comma-separated CIDRs (``""``: none); ``ValueError`` if bad."""
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    return tuple(str(net) for net in parse_networks(items))


_PEER_CACHE = 4096  # hosts remembered by SessionFactory._classify (then it starts again)


def _peer_ip(peer: object) -> _Address | str | None:
    """The peer's address (IPv4-mapped IPv6 as IPv4), its host string if not an IP; None: Unix."""
    if not isinstance(peer, tuple) or not peer or not isinstance(peer[0], str):
        return None
    host = peer[0].partition("%")[0]  # fe80::1%eth0
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _key(ip: _Address | str | None) -> str | None:
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return None if ip is None else str(ip)


def peer_key(peer: object) -> str | None:
    """The key a peer is counted under: its IPv4 address or IPv6 /64; ``None`` for Unix sockets.

    An IPv4-mapped IPv6 address counts as the IPv4 address.
    """
    return _key(_peer_ip(peer))


class TooManyConnections(asyncio.Protocol):
    """Answers ``421 4.3.2`` and closes: what a connection over a cap gets."""

    def __init__(self, reply: str = _FULL) -> None:
        self.reply = reply

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast, not isinstance: uvloop's transports are not asyncio.WriteTransport subclasses.
        writer = cast(asyncio.WriteTransport, transport)
        writer.write(self.reply.encode() + b"\r\n")
        writer.close()


class _Gate(asyncio.Protocol):
    """What a new connection talks to until it is admitted: knows its peer, decides."""

    __slots__ = ("factory", "overrides")

    def __init__(self, factory: SessionFactory, overrides: dict[str, Any]) -> None:
        self.factory = factory
        self.overrides = overrides

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        proto = self.factory._admit(transport, self.overrides)
        if proto is None:
            return
        # The bound on unread replies, the same on every loop (cast: uvloop's
        # transports are not asyncio.WriteTransport subclasses).
        cast(asyncio.WriteTransport, transport).set_write_buffer_limits(high=WRITE_HIGH)
        transport.set_protocol(proto)
        proto.connection_made(transport)


class SessionGuard:
    """One session's clocks against the factory's limits (see the module doc).

    The protocol reports what happens (:meth:`received`, :meth:`hook`,
    :meth:`data_started`, :meth:`data_done`, :meth:`paused`); a timer checks the
    session deadline and the minimum rate once per ``tick``.
    """

    __slots__ = (
        "_timer",
        "busy",
        "busy_since",
        "bytes_in",
        "closed",
        "factory",
        "hold",
        "hooks",
        "idle",
        "idle_since",
        "in_data",
        "kept",
        "key",
        "partial",
        "paused_since",
        "proto",
        "started",
        "trusted",
        "waiting",
        "write_paused",
    )

    def __init__(
        self, factory: SessionFactory, proto: Any, key: str | None, trusted: bool = False
    ) -> None:
        now = factory.clock.time()
        self.factory = factory
        self.proto = proto
        self.key = key  # counted under it; None: not counted (Unix socket, trusted network)
        self.trusted = trusted  # exempt from min_rate
        self.started = now
        self.bytes_in = 0
        self.busy = 0.0  # seconds the server has waited on this client, so far
        self.busy_since: float | None = None
        self.idle = 0.0  # seconds spent waiting for a next command, so far
        self.idle_since: float | None = now
        self.partial = False  # the last bytes received end inside a line
        self.in_data = False
        self.hooks = 0  # handler hooks running (delivering, resolving): our time, not theirs
        self.write_paused = False
        self.paused_since: float | None = None  # when our writes last became blocked
        self.hold: DataHold | None = None
        self.waiting: asyncio.Task[None] | None = None
        self.kept: list[bytes] = []  # received, waiting for room in the DATA budget
        self.closed = False
        self._timer: Timer | None = factory.clock.call_later(factory.tick, self._tick)

    # -- events from the protocol

    def received(self, data: bytes) -> bool:
        """Bytes arrived: False if they must wait for DATA budget before the reader gets them.

        Bytes that do not fit the transfer's reservation are kept back (with
        reading paused, at most about one socket read) until it grows, then
        handed to the protocol's ``feed``.
        """
        self.bytes_in += len(data)
        self.partial = not data.endswith(b"\n")
        self._update()
        hold = self.hold
        if hold is None or not self.in_data:
            return True
        hold.used += len(data)
        if self.waiting is None and hold.try_cover():
            return True
        self.kept.append(data)
        self._pause()
        if self.waiting is None:
            self.waiting = self.factory.loop.create_task(self._grow(hold), name="data-budget")
            self._update()
        return False

    def hook(self, running: bool, command: str = "") -> None:
        """A handler hook starts or ends; the DATA hook also ends the client's DATA."""
        self.hooks += 1 if running else -1
        if command == "DATA":
            self.in_data = False
        self._update()

    def data_started(self) -> None:
        """The server said 354: the client owes us the message."""
        self.in_data = True
        self._update()

    def data_done(self) -> None:
        """The DATA command is over, however it ended."""
        self.in_data = False
        self._update()

    def paused(self, paused: bool) -> None:
        """Our writes are blocked (the client does not read) or flow again.

        While they are, the session reads nothing more: its unread replies
        stay under the transport's high-water mark plus one reply.
        """
        self.write_paused = paused
        self.paused_since = self.factory.clock.time() if paused else None
        self._update()
        if paused:
            self._pause()
        else:
            self._resume()

    def stop(self) -> None:
        """The connection is gone: stop the clocks and give the slot back (idempotent)."""
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.waiting is not None:
            self.waiting.cancel()
        self.kept = []
        if self.hold is not None:
            self.hold.close()
        self.factory._release(self)

    # -- clocks

    def _update(self) -> None:
        now = self.factory.clock.time()
        if self.busy_since is not None:
            self.busy += now - self.busy_since
        if self.idle_since is not None:
            self.idle += now - self.idle_since
        # While a transfer waits for DATA budget, the client is not the one late.
        owed = self.write_paused or (
            not self.hooks and self.waiting is None and (self.in_data or self.partial)
        )
        self.busy_since = now if owed else None
        ours = self.hooks or self.waiting is not None  # the server is the one busy
        self.idle_since = None if owed or ours else now

    def behind(self) -> float:
        """Seconds of waiting the bytes received do not pay for at ``min_rate`` (0: none)."""
        rate = self.factory.min_rate
        if not rate or self.trusted:
            return 0.0
        return max(0.0, self.busy - self.bytes_in / rate)

    def _tick(self) -> None:
        self._timer = None
        if self.closed:
            return
        self._update()
        f = self.factory
        now = f.clock.time()
        if not self.hooks:  # never cut a message being delivered
            if now - self.started >= f.session_timeout:
                f.timed_out += 1
                self.close(_DEADLINE)
                return
            if f.min_rate and self.busy >= f.rate_grace and self.behind() > 0:  # 0 if trusted
                f.too_slow += 1
                self.close(_SLOW)
                return
            if self.paused_since is not None and now - self.paused_since >= f.write_stall:
                f.write_stalled += 1
                self.close(_STALLED)
                return
        self._timer = f.clock.call_later(f.tick, self._tick)

    def eviction_score(self) -> float:
        """How much this session deserves to make room (0: it does not).

        Idle now, at a command boundary, after ``evict_idle`` s idle in all
        (a client sending a NOOP every few seconds adds up too); or
        :data:`EVICT_BEHIND` s behind ``min_rate``.
        """
        if self.closed or self.hooks or self.waiting is not None:
            return 0.0
        self._update()
        if self.idle_since is not None and self.idle >= self.factory.evict_idle:
            return self.idle
        behind = self.behind()
        return behind if behind >= EVICT_BEHIND else 0.0

    def close(self, reply: str) -> None:
        """Answer ``reply`` and close the connection; the slot is free at once.

        A client that does not read its replies cannot get this one: its
        connection is aborted, so the unread bytes are freed too (a close
        would keep them until it reads).
        """
        _log.info("%r: %s", getattr(self.proto.session, "peer", None), reply)
        transport = self.proto.transport
        if transport is not None and not transport.is_closing():
            if self.write_paused:
                transport.abort()
            else:
                transport.write(reply.encode() + b"\r\n")
                transport.close()
        self.stop()

    # -- the DATA budget

    def _pause(self) -> None:
        transport = self.proto.transport
        if transport is not None and not transport.is_closing():
            transport.pause_reading()

    def _resume(self) -> None:
        """Read again, unless another reason to pause still holds."""
        if self.waiting is not None or self.write_paused or self.closed:
            return
        transport = self.proto.transport
        reader = getattr(self.proto, "_reader", None)
        # aiosmtpd's StreamReader pauses reading itself when its buffer is
        # full; resuming then would override it (it resumes on its own later).
        paused_itself = getattr(reader, "_paused", False)
        if transport is not None and not transport.is_closing() and not paused_itself:
            transport.resume_reading()

    async def _grow(self, hold: DataHold) -> None:
        try:
            async with asyncio.timeout(self.factory.data_wait):
                while (need := hold.shortfall()) and not hold.closed:
                    await hold.grow(need)
        except TimeoutError:
            self.waiting = None
            self.factory.budget_closed += 1
            self.close("421 4.3.1 Too much mail data pending on this server, closing")
            return
        self.waiting = None
        self._update()
        kept, self.kept = self.kept, []
        for data in kept:
            self.proto.feed(data)
        self._resume()


class SessionFactory:
    """A ``loop.create_server`` protocol factory with caps, fairness rules and a DATA budget.

    Parameters (see the module doc for what each rule does):
        handler: the aiosmtpd handler each session gets.
        lmtp: :class:`DeliveryLMTP` if true, else :class:`DeliverySMTP`.
        max_connections: live sessions at most.
        max_connections_per_ip: sessions per peer at most (``0``: no cap).
        session_timeout: seconds a session may last.
        min_rate: bytes/s a client must average while the server waits on it
            (``0``: no rate rule).
        rate_grace: seconds of such waiting before ``min_rate`` applies.
        evict_idle: seconds idle after which a session may be closed to make room.
        max_pending_bytes: the DATA budget across sessions (default: 4 ×
            ``data_size_limit``; at least ``data_size_limit``).
        data_wait: seconds a DATA command waits for budget before ``451 4.3.1``.
        write_stall: seconds a session may leave :data:`WRITE_HIGH` bytes of
            replies unread before its connection is aborted.
        trusted_networks: peers exempt from ``max_connections_per_ip`` and
            ``min_rate`` (CIDR strings or ``ipaddress`` networks; default
            loopback). Unix-socket peers always are.
        clock: the time and timers of the rules above (default: ``loop``);
            the DATA budget's ``data_wait`` always runs on the loop.
        **smtp_kwargs: passed to every protocol (``data_size_limit``, ...).

    ``live`` counts open sessions; ``refused``, ``evicted``, ``timed_out``,
    ``too_slow``, ``budget_closed`` and ``write_stalled`` count what the rules did.
    """

    def __init__(
        self,
        handler: object,
        *,
        lmtp: bool,
        max_connections: int,
        loop: asyncio.AbstractEventLoop,
        max_connections_per_ip: int = DEFAULT_MAX_CONNECTIONS_PER_IP,
        session_timeout: float = DEFAULT_SESSION_TIMEOUT,
        min_rate: int = DEFAULT_MIN_RATE,
        rate_grace: float = RATE_GRACE,
        evict_idle: float = EVICT_IDLE,
        max_pending_bytes: int | None = None,
        data_wait: float = DATA_WAIT,
        write_stall: float = WRITE_STALL,
        trusted_networks: Iterable[str | _Network] = DEFAULT_TRUSTED_NETWORKS,
        clock: Clock | None = None,
        **smtp_kwargs: Any,
    ) -> None:
        validate.count("max_connections", max_connections)
        validate.count("max_connections_per_ip", max_connections_per_ip, minimum=0)
        validate.count("min_rate", min_rate, minimum=0)
        limits = {
            name: validate.seconds(name, value, positive=True, infinite=True)  # inf: no limit
            for name, value in (
                ("session_timeout", session_timeout),
                ("rate_grace", rate_grace),
                ("evict_idle", evict_idle),
                ("data_wait", data_wait),
                ("write_stall", write_stall),
            )
        }
        self.trusted_networks = parse_networks(trusted_networks)
        # host string -> (trusted, the key it is counted under): an MTA opens
        # many sessions from one address, parsed and matched once, not per session.
        self._peers: dict[str, tuple[bool, str | None]] = {}
        self.handler = handler
        self.cls = DeliveryLMTP if lmtp else DeliverySMTP
        self.max_connections = max_connections
        self.max_connections_per_ip = max_connections_per_ip
        self.session_timeout = limits["session_timeout"]
        self.min_rate = min_rate
        self.rate_grace = limits["rate_grace"]
        self.evict_idle = limits["evict_idle"]
        self.data_wait = limits["data_wait"]
        self.write_stall = limits["write_stall"]
        self.tick = max(
            0.05, min(1.0, self.rate_grace / 4, self.session_timeout / 4, self.write_stall / 4)
        )
        self.loop = loop
        self.clock: Clock = loop if clock is None else clock
        self.smtp_kwargs = smtp_kwargs
        limit = smtp_kwargs.get("data_size_limit") or 33554432  # aiosmtpd's default
        if max_pending_bytes is None:
            max_pending_bytes = 4 * limit
        # Smaller, and one message of the allowed size could hold more than is counted.
        validate.count("max_pending_bytes", max_pending_bytes, minimum=limit)
        self.budget = DataBudget(max_pending_bytes)
        self.sessions: set[SessionGuard] = set()
        self.per_peer: dict[str, int] = {}
        self.refused = 0
        self.evicted = 0
        self.timed_out = 0
        self.too_slow = 0
        self.budget_closed = 0
        self.write_stalled = 0
        self.idle = asyncio.Event()
        """Set while no session is open."""
        self.idle.set()

    @property
    def live(self) -> int:
        """Open sessions."""
        return len(self.sessions)

    def __call__(self) -> asyncio.BaseProtocol:
        return _Gate(self, {})

    def variant(self, **smtp_kwargs: Any) -> Callable[[], asyncio.BaseProtocol]:
        """A factory for another listener: these protocol options changed, caps shared.

        E.g. an implicit-TLS listener: ``variant(tls_context=None,
        require_starttls=False)``, since its connections are already encrypted.
        """
        return functools.partial(_Gate, self, smtp_kwargs)

    def _admit(self, transport: asyncio.BaseTransport, overrides: dict[str, Any]) -> Any:
        """The session for a new connection, or ``None`` after answering it 421."""
        trusted, key = self._classify(transport.get_extra_info("peername"))
        refusal = None
        cap = self.max_connections_per_ip
        if key is not None and cap and self.per_peer.get(key, 0) >= cap:
            refusal = _FULL_PEER
        elif len(self.sessions) >= self.max_connections and not self._evict():
            refusal = _FULL
        if refusal is not None:
            self.refused += 1
            TooManyConnections(refusal).connection_made(transport)
            return None
        kwargs = {**self.smtp_kwargs, **overrides} if overrides else self.smtp_kwargs
        proto = self.cls(self.handler, loop=self.loop, **kwargs)
        guard = SessionGuard(self, proto, key, trusted)
        proto.guard = guard
        self.sessions.add(guard)
        if key is not None:
            self.per_peer[key] = self.per_peer.get(key, 0) + 1
        self.idle.clear()
        return proto

    def _classify(self, peer: object) -> tuple[bool, str | None]:
        """(trusted, key counted under) for a peer; Unix sockets are trusted. Cached per host."""
        host = peer[0] if isinstance(peer, tuple) and peer and isinstance(peer[0], str) else None
        if host is None:
            return True, None
        got = self._peers.get(host)
        if got is None:
            ip = _peer_ip(peer)
            trusted = ip is None or (
                not isinstance(ip, str) and any(ip in net for net in self.trusted_networks)
            )
            got = (trusted, None if trusted else _key(ip))
            if len(self._peers) >= _PEER_CACHE:
                self._peers.clear()
            self._peers[host] = got
        return got

    def _evict(self) -> bool:
        scores = [(g.eviction_score(), g) for g in self.sessions]
        score, worst = max(scores, key=lambda sg: sg[0], default=(0.0, None))
        if worst is None or score <= 0:
            return False
        self.evicted += 1
        worst.close(_EVICTED)
        return True

    def _release(self, guard: SessionGuard) -> None:
        if guard not in self.sessions:
            return
        self.sessions.discard(guard)
        if guard.key is not None:
            left = self.per_peer[guard.key] - 1
            if left:
                self.per_peer[guard.key] = left
            else:
                del self.per_peer[guard.key]
        if not self.sessions:
            self.idle.set()
