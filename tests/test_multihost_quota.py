"""Quota with several ``serve`` hosts on ONE shared Maildir root (issue 20, "Several hosts").

Two hosts (mx-a, mx-b: UTS namespaces on 127.0.0.2 and .3, the harness of
``test_multihost.py``), both with ``--quota-rule *:messages=LIMIT``. Each
host checks a copy against the shared ``maildirsize`` plus its OWN copies in
flight, not the other host's: two hosts writing to one mailbox at once can
both take its last free places. The test measures that over-delivery
(copies acknowledged past the limit) with concurrent writers to the same
users through both hosts, then shows that per-user host affinity (every
message of a user to one host, what the README's Postfix ``transport_maps``
does) leaves none.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from delivery_executor.testing import send_message

from .postfix import PrivatePostfix, free_port_on, need, read_maildirs, run_tool, wait_for
from .servehost import ServeHost, require_unshare

pytestmark = [pytest.mark.timeout(170), pytest.mark.root]

DOMAIN = "example.org"
HOSTS = {"mx-a": "127.0.0.2", "mx-b": "127.0.0.3"}
LIMIT = 10  # messages per mailbox
USERS = 4
WRITERS_PER_HOST = 4  # concurrent LMTP clients per user and host
PER_WRITER = 5  # messages each, one connection per message
BODY = b"From: s@example.net\r\nSubject: quota race\r\n\r\n" + b"x" * 400 + b"\r\n"


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """Two serve hosts with the same quota rule on one shared root; yields (root, port)."""
    require_unshare()
    port = free_port_on(*HOSTS.values())
    root = tmp_path / "mail"
    args = ("--lmtp", "--domain", DOMAIN, "--quota-rule", f"*:messages={LIMIT}")
    with contextlib.ExitStack() as stack:
        for name, addr in HOSTS.items():
            stack.enter_context(ServeHost(root, addr, port, *args, hostname=name))
        yield root, port


async def _writer(addr: str, port: int, rcpt: str, replies: Counter[tuple[str, int]]) -> None:
    for _ in range(PER_WRITER):
        (reply,) = await send_message(
            addr, port, mail_from="s@example.net", rcpts=[rcpt], body=BODY, lmtp=True
        )
        replies[(rcpt, reply.code)] += 1


async def _run(port: int, prefix: str, affinity: bool) -> Counter[tuple[str, int]]:
    """Every user gets 2 * WRITERS_PER_HOST concurrent writers: split over both hosts,
    or (affinity) all on the user's one host."""
    replies: Counter[tuple[str, int]] = Counter()
    addrs = list(HOSTS.values())
    tasks = []
    for u in range(USERS):
        rcpt = f"{prefix}{u}@{DOMAIN}"
        for w in range(2 * WRITERS_PER_HOST):
            addr = addrs[u % 2] if affinity else addrs[w % 2]
            tasks.append(_writer(addr, port, rcpt, replies))
    async with asyncio.timeout(120):
        await asyncio.gather(*tasks)
    return replies


def _stored(root: Path, local: str) -> list[str]:
    md = root / DOMAIN / local
    return [n for sub in ("new", "cur") for n in os.listdir(md / sub)]


def _over(root: Path, prefix: str, replies: Counter[tuple[str, int]]) -> list[int]:
    """Per user: copies acknowledged past LIMIT; checks every 250 is a file and the
    rest got Dovecot's 552 5.2.2."""
    over = []
    for u in range(USERS):
        rcpt = f"{prefix}{u}@{DOMAIN}"
        ok, full = replies[(rcpt, 250)], replies[(rcpt, 552)]
        assert ok + full == 2 * WRITERS_PER_HOST * PER_WRITER, replies
        assert len(_stored(root, f"{prefix}{u}")) == ok  # every 250 is on disk, nothing else
        assert ok >= LIMIT  # the mailbox was filled
        over.append(ok - LIMIT)
    return over


@pytest.mark.asyncio
async def test_two_hosts_over_deliver_without_affinity_and_never_with_it(
    hosts: tuple[Path, int],
) -> None:
    """Same users through both hosts at once: copies past the limit possible (measured);
    each user's mail through one host (affinity): exactly LIMIT accepted, 0 over."""
    root, port = hosts
    spread = _over(root, "spread", await _run(port, "spread", affinity=False))
    pinned = _over(root, "pinned", await _run(port, "pinned", affinity=True))
    attempts = 2 * WRITERS_PER_HOST * PER_WRITER
    print(
        f"\n{USERS} users, limit {LIMIT} messages, {attempts} attempts each,"
        f" {2 * WRITERS_PER_HOST} writers at once per user: over-delivery without affinity"
        f" {spread} (total {sum(spread)}), with affinity {pinned}"
    )
    assert pinned == [0] * USERS
    assert all(n >= 0 for n in spread)


def affinity_map(path: Path, port: int) -> str:
    """The README's regexp transport map: local parts a-m to mx-a first, the rest to mx-b
    first, each with the other host as failover."""
    a, b = HOSTS["mx-a"], HOSTS["mx-b"]
    path.write_text(
        f"/^[a-m]/ lmtp:[{a}]:{port}, [{b}]:{port}\n/./ lmtp:[{b}]:{port}, [{a}]:{port}\n"
    )
    return f"regexp:{path}"


def test_postfix_transport_map_affinity_gives_exact_quota(
    hosts: tuple[Path, int], tmp_path: Path
) -> None:
    """A real Postfix with the README's per-user transport map: every copy of a user is
    written by its host, exactly LIMIT are delivered per user, the rest bounce 552."""
    root, port = hosts
    tool = need("smtp-source")
    users = {"alice": "mx-a", "mike": "mx-a", "nina": "mx-b", "zoe": "mx-b"}
    per_user = 2 * LIMIT  # two smtp-source runs of LIMIT messages each, at once
    with PrivatePostfix(
        virtual_transport="error:5.3.0 transport_maps did not route this",
        domains=(DOMAIN,),
        settings={
            "transport_maps": affinity_map(tmp_path / "lmtp_affinity", port),
            "lmtp_destination_concurrency_limit": "8",
        },
    ) as pf:

        def one(user: str) -> object:
            # Null sender: a 552 becomes status=bounced, with no bounce message to route.
            return run_tool(
                [tool, "-s", "2", "-m", str(LIMIT), "-l", "300", "-f", "",
                 "-t", f"{user}@{DOMAIN}", f"{pf.address}:{pf.smtp_port}"],
                timeout=60,
            )  # fmt: skip

        with ThreadPoolExecutor(8) as pool:
            for fut in [pool.submit(one, u) for u in users for _ in range(2)]:
                fut.result()
        total = per_user * len(users)
        wait_for(
            lambda: pf.count_status("sent") + pf.count_status("bounced") >= total,
            90,
            f"{total} final statuses",
        )
        deliveries = pf.deliveries()
    sent = Counter(d.recipient.partition("@")[0] for d in deliveries if d.status == "sent")
    bounced = [d for d in deliveries if d.status == "bounced"]
    assert all(d.dsn == "5.2.2" for d in bounced), bounced[:3]
    assert len(bounced) == total - LIMIT * len(users)
    print(f"\naffinity through Postfix: delivered {dict(sent)}, bounced 552: {len(bounced)}")
    files = read_maildirs(root)
    assert Counter(f.mailbox.partition("@")[0] for f in files) == {u: LIMIT for u in users}
    assert sent == {u: LIMIT for u in users}
    for f in files:
        assert f.host == users[f.mailbox.partition("@")[0]], f.name  # affinity held
