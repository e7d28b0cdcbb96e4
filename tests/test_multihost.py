"""Several ``serve`` hosts behind one Postfix, delivering into ONE shared Maildir root (issue 13).

Three "hosts", each ``serve --lmtp`` in its own UTS namespace with its own
host name (mx-a, mx-b, mx-c) on its own loopback address (127.0.0.2-4), all
on the same port and all writing into one Maildir root, as MX hosts sharing
a mail store would. A private Postfix spreads LMTP over them; the
distribution is Postfix's, our code knows nothing of it:

    transport_maps = pipemap:{randmap:{order0, ..., order5}, inline:{
        {order0 = lmtp:[127.0.0.2]:P, [127.0.0.3]:P, [127.0.0.4]:P},
        {order1 = lmtp:[127.0.0.2]:P, [127.0.0.4]:P, [127.0.0.3]:P}, ...}}

randmap picks one order of the next-hop list per recipient look-up, and
the list (Postfix 3.5+) fails over to the next host in it. Neither alone is
enough with Postfix 3.7: a next-hop list alone is failover-only (everything
goes to its first host, DESIGN.md §8), and ``randmap:{lmtp:[a]:P, ...}`` of
single hosts shares the load but does not fail over: the last two messages
for one mailbox went back to the dead host on every retry, once a second, for
about 30 s (seen here; apparently the resolver client's one-entry cache
answers a repeated look-up without asking randmap again). randmap
keeps ``{...}`` around a result that holds commas, hence the ``pipemap`` via
``inline``.

Messages are told apart by Postfix's (long, never reused) queue id in its
Received header. A copy is *acknowledged* when its file name appears in a
``status=sent (250 ... delivered as NAME)`` log line: Postfix had our 250.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from .postfix import (
    Delivered,
    PrivatePostfix,
    count_new_files,
    free_port_on,
    need,
    read_maildirs,
    run_tool,
    wait_for,
)
from .servehost import ServeHost, require_unshare

pytestmark = [pytest.mark.timeout(170), pytest.mark.root]

DOMAIN = "example.org"
SENDER = f"sender@{DOMAIN}"
HOSTS = {"mx-a": "127.0.0.2", "mx-b": "127.0.0.3", "mx-c": "127.0.0.4"}
MAILBOXES = 200
PER_MAILBOX = 10
TOTAL = MAILBOXES * PER_MAILBOX
# Every order of the hosts is a next-hop list; randmap picks one per look-up.
ORDERS = list(itertools.permutations(HOSTS.values()))
CONCURRENCY = 8  # lmtp_destination_concurrency_limit: deliveries at once per next-hop list
SENDERS = 8  # smtp-source processes at once


@dataclass
class Cluster:
    root: Path
    port: int
    hosts: dict[str, ServeHost]
    postfix: PrivatePostfix


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """Three serve hosts in UTS namespaces and a private Postfix spreading LMTP over them.

    Indirect parametrisation adds ``serve`` options to every host.
    """
    extra: tuple[str, ...] = tuple(getattr(request, "param", ()))
    require_unshare()
    need("smtp-source")
    port = free_port_on(*HOSTS.values())
    root = tmp_path / "mail"
    with contextlib.ExitStack() as stack:  # unwinds Postfix first, then every host
        hosts = {
            name: stack.enter_context(
                ServeHost(root, addr, port, "--lmtp", "--domain", DOMAIN, *extra, hostname=name)
            )
            for name, addr in HOSTS.items()
        }
        for name, host in hosts.items():
            assert f"listening on {HOSTS[name]}:{port} (LMTP, pid {host.pid})" in host.lines[-1]
        pf = stack.enter_context(
            PrivatePostfix(
                # transport_maps routes every recipient; this only catches a mistake.
                virtual_transport="error:5.3.0 transport_maps did not route this",
                domains=(DOMAIN,),
                settings={
                    "transport_maps": transport_maps(port),
                    "lmtp_destination_concurrency_limit": str(CONCURRENCY),
                },
            )
        )
        yield Cluster(root, port, hosts, pf)


def transport_maps(port: int) -> str:
    """randmap over every order of the list of hosts: load sharing with failover.

    Every permutation, not only the rotations, so that when one host dies its
    share fails over evenly to all the others instead of to its successor alone.
    """
    keys = [f"order{i}" for i in range(len(ORDERS))]
    inline = ", ".join(
        f"{{{key} = lmtp:" + ", ".join(f"[{addr}]:{port}" for addr in order) + "}"
        for key, order in zip(keys, ORDERS, strict=True)
    )
    return f"pipemap:{{randmap:{{{', '.join(keys)}}}, inline:{{{inline}}}}}"


def mailbox(i: int) -> str:
    return f"user{i:03d}@{DOMAIN}"


def send_all(pf: PrivatePostfix, pool: ThreadPoolExecutor) -> list[Future[object]]:
    """smtp-source once per mailbox (10 messages, 2 sessions), SENDERS at a time."""
    tool = need("smtp-source")

    def one(i: int) -> object:
        return run_tool(
            [tool, "-s", "2", "-m", str(PER_MAILBOX), "-l", "300", "-f", SENDER,
             "-t", mailbox(i), f"{pf.address}:{pf.smtp_port}"],
            timeout=120,
        )  # fmt: skip

    return [pool.submit(one, i) for i in range(MAILBOXES)]


@dataclass
class Outcome:
    files: list[Delivered]
    per_host: Counter[str]
    copies: Counter[str]  # queue id -> copies in the Maildirs
    acknowledged: set[str]  # file names Postfix logged as "250 ... delivered as NAME"

    @property
    def duplicates(self) -> dict[str, int]:
        return {q: n for q, n in self.copies.items() if n > 1}


def collect(cluster: Cluster) -> Outcome:
    """Read every file back and check what must hold whatever happened to the hosts."""
    pf = cluster.postfix
    accepted = pf.accepted_ids()
    assert len(accepted) == len(set(accepted)) == TOTAL, len(accepted)
    files = read_maildirs(cluster.root)

    # Names: unique across hosts, each carrying the host that wrote it, which
    # is also the host named in that copy's own Received line.
    names = [f.name for f in files]
    assert len(set(names)) == len(names), "two files share a name"
    for f in files:
        assert f.host in HOSTS, f.name
        assert f" by {f.host} (delivery-executor) with LMTP" in (f.header("Received") or ""), f.data
        assert f.header("Delivered-To") == f.mailbox
        assert f.header("To") == f"<{f.mailbox}>"

    # Whole: every copy holds the same smtp-source body.
    reference = files[0].body
    assert reference.startswith(b"1XXXX") and len(reference.replace(b"\n", b"\r\n")) >= 300
    assert all(f.body == reference for f in files)

    # Nothing lost: every accepted message has a copy, and nothing else is there.
    copies = Counter(f.queue_id or "(none)" for f in files)
    assert set(copies) == set(accepted), (len(copies), len(set(copies) ^ set(accepted)))
    # Nothing acknowledged is lost: each "delivered as NAME" that Postfix got is a file.
    acknowledged = {d.text.rsplit(" ", 1)[1] for d in pf.deliveries() if d.status == "sent"}
    assert acknowledged <= set(names), acknowledged - set(names)
    assert pf.count_status("bounced") == 0
    return Outcome(files, Counter(f.host for f in files), copies, acknowledged)


def tmp_leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("*/*/tmp/*"))


def test_three_hosts_share_the_load_and_deliver_each_message_once(cluster: Cluster) -> None:
    """2,000 messages to 200 mailboxes via 3 hosts: each lands once, all hosts share."""
    pf = cluster.postfix
    with ThreadPoolExecutor(SENDERS) as pool:
        for fut in send_all(pf, pool):
            fut.result()
    pf.wait_queue_empty(90, flush_every=3)
    wait_for(lambda: pf.count_status("sent") >= TOTAL, 20, f"{TOTAL} status=sent lines")
    for host in cluster.hosts.values():
        assert host.stop() == 0

    out = collect(cluster)
    dup_count = sum(n - 1 for n in out.duplicates.values())
    print(f"\nper-host delivered {dict(sorted(out.per_host.items()))}; duplicates {dup_count}")
    assert not out.duplicates, out.duplicates
    assert len(out.files) == TOTAL
    assert {f.name for f in out.files} == out.acknowledged  # every copy was acknowledged
    assert pf.count_status("sent") == TOTAL
    for name, host in cluster.hosts.items():
        # Every host took a real share (randmap: 1/3 each on average).
        assert out.per_host[name] >= TOTAL // 10, out.per_host
        assert host.delivered() == out.per_host[name], host.summary
    assert tmp_leftovers(cluster.root) == []
    # And every mailbox got its 10.
    assert Counter(f.mailbox for f in out.files) == Counter(
        {mailbox(i): PER_MAILBOX for i in range(MAILBOXES)}
    )


def test_sigkill_one_host_mid_run_loses_nothing(cluster: Cluster) -> None:
    """SIGKILL mx-b mid-run: nothing lost; duplicates only from mx-b, at most its in-flight."""
    pf = cluster.postfix
    victim = "mx-b"
    with ThreadPoolExecutor(SENDERS) as pool:
        futures = send_all(pf, pool)
        wait_for(lambda: count_new_files(cluster.root) >= TOTAL // 3, 60, "a third delivered")
        at_kill = count_new_files(cluster.root)
        cluster.hosts[victim].kill()  # the whole host: server and helper, at once
        for fut in futures:
            fut.result()
    pf.wait_queue_empty(90, flush_every=2)
    # One acknowledged delivery per message; postlogd may lag a moment.
    wait_for(lambda: pf.count_status("sent") >= TOTAL, 20, f"{TOTAL} status=sent lines")
    for name, host in cluster.hosts.items():
        if name != victim:
            assert host.stop() == 0

    out = collect(cluster)
    victim_addr = HOSTS[victim]
    # In flight when it died: the sessions Postfix lost on the victim, and of
    # those the ones that had sent the whole message (Postfix: "may be sent
    # more than once").
    lost = [(q, what) for q, peer, what in pf.lost_sessions() if victim_addr in peer]
    in_flight = {q for q, _ in lost}
    after_data = {q for q, what in lost if "may be sent more than once" in what}
    unacknowledged = [f for f in out.files if f.name not in out.acknowledged]
    dups = out.duplicates
    print(
        f"\nkilled {victim} after {at_kill} files; per-host delivered "
        f"{dict(sorted(out.per_host.items()))}; sessions lost on {victim}: {len(in_flight)}, "
        f"{len(after_data)} of them after the whole message; duplicates "
        f"{sum(n - 1 for n in dups.values())} {sorted(dups)}; unacknowledged copies "
        f"{[f.name for f in unacknowledged]}; status=deferred lines "
        f"{pf.count_status('deferred')}; tmp leftovers {len(tmp_leftovers(cluster.root))}"
    )
    for q, what in lost:
        print(f"  {q}: lost connection with {victim_addr} while {what}")

    # Zero lost (collect checked every accepted message has a copy), and every
    # host had a share, the victim before it died.
    assert all(out.per_host[name] > 0 for name in HOSTS), out.per_host
    # At least once: a second copy exists only where Postfix never had the
    # first one's 250, i.e. the victim wrote it and died before replying. Such
    # a copy is complete (checked in collect) and its message is in the
    # Maildirs acknowledged once more, by a survivor.
    assert len(out.files) == TOTAL + sum(n - 1 for n in dups.values())
    assert {f.queue_id for f in unacknowledged} == set(dups)
    for f in unacknowledged:
        assert f.host == victim, f.name
        assert dups[f.queue_id or ""] == 2
    # Bounded by what was in flight on the victim: only a message whose whole
    # body had reached it can have been written there. That is one
    # transaction per LMTP session, and at most CONCURRENCY deliveries at once
    # per next-hop list that starts with the victim (2 of the 6 orders).
    # (Lost sessions "while sending MAIL FROM" are cached idle ones found dead
    # on reuse after the kill: nothing of theirs was written.)
    assert set(dups) <= after_data, (set(dups), after_data)
    lists_to_victim = sum(1 for order in ORDERS if order[0] == victim_addr)
    assert len(after_data) <= CONCURRENCY * lists_to_victim
    for name, host in cluster.hosts.items():
        if name != victim:
            assert host.delivered() == out.per_host[name], host.summary
    # Leftovers of the killed helper can sit in tmp/ (never in new/); only the victim's.
    assert all(
        name.partition(",S=")[0].endswith(f".{victim}") for name in tmp_leftovers(cluster.root)
    )


@pytest.mark.parametrize("cluster", [("--duplicate-window", "3600")], indirect=True)
def test_sigkill_with_duplicate_window_leaves_no_duplicate(cluster: Cluster) -> None:
    """--duplicate-window on every host, SIGKILL mx-b mid-run: nothing lost and 0 duplicates."""
    pf = cluster.postfix
    victim = "mx-b"
    with ThreadPoolExecutor(SENDERS) as pool:
        futures = send_all(pf, pool)
        wait_for(lambda: count_new_files(cluster.root) >= TOTAL // 3, 60, "a third delivered")
        cluster.hosts[victim].kill()
        for fut in futures:
            fut.result()
    pf.wait_queue_empty(90, flush_every=2)
    wait_for(lambda: pf.count_status("sent") >= TOTAL, 20, f"{TOTAL} status=sent lines")
    for name, host in cluster.hosts.items():
        if name != victim:
            assert host.stop() == 0

    out = collect(cluster)  # every accepted message has a copy: nothing lost
    suppressed = [
        d for d in pf.deliveries() if d.status == "sent" and "already delivered as" in d.text
    ]
    after_data = {
        q for q, peer, what in pf.lost_sessions()
        if HOSTS[victim] in peer and "may be sent more than once" in what
    }  # fmt: skip
    print(
        f"\nper-host delivered {dict(sorted(out.per_host.items()))}; sessions lost on {victim}"
        f" after the whole message: {len(after_data)}; resends suppressed: {len(suppressed)};"
        f" duplicates {sum(n - 1 for n in out.duplicates.values())}"
    )
    assert not out.duplicates, out.duplicates
    assert len(out.files) == TOTAL
    assert {f.name for f in out.files} == out.acknowledged  # the victim's too, via a survivor
    for d in suppressed:  # a survivor acknowledged a copy the victim had written
        (f,) = [f for f in out.files if f.name == d.text.rsplit(" ", 1)[1]]
        assert f.host == victim and f.queue_id == d.queue_id and f.mailbox == d.recipient
