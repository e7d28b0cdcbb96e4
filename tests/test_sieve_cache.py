"""What Sieve costs per delivery, counted (never timed): script stats bounded by the recheck
interval, a plain keep routed as a plain delivery, headers parsed once per message."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from delivery_executor import DeliveryExecutor, MailboxResolver, Maildir
from delivery_executor.sieve import hook, message
from delivery_executor.sieve.hook import Route, SieveFilter
from delivery_executor.sieve.message import MessageView
from delivery_executor.smtp import DeliveryHandler, SessionFactory
from delivery_executor.testing import send_message

from .helpers import files_in, listening

pytestmark = pytest.mark.timeout(30)

MSG = b"From: a@b.example\nSubject: hi\n\nbody\n"
NO_MATCH = (
    'require ["fileinto", "imap4flags", "variables"];\n'
    'if header :contains "X-Spam-Flag" "YES" { fileinto "Junk"; stop; }\n'
    'if address :domain :is "from" "list.example" { addflag "\\\\Seen"; fileinto "L"; }\n'
)


def count_stats(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every os.stat the Sieve hook makes."""
    seen: list[str] = []
    real = os.stat

    def stat(path: str) -> os.stat_result:
        seen.append(path)
        return real(path)

    monkeypatch.setattr(hook, "_stat", stat)
    return seen


def test_scripts_are_stat_ed_once_per_recheck_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """200 deliveries within the interval: one stat per path (the missing user script too);
    after the interval a new user script and an edited admin script take effect."""
    md = tmp_path / "bob"
    Maildir.create(md)
    Maildir.create(md / ".A")
    before = tmp_path / "before.sieve"
    before.write_text(NO_MATCH)
    f = SieveFilter(before=[before], recheck=0.2)
    stats = count_stats(monkeypatch)
    for _ in range(200):
        assert f.route(str(md), MSG, "a@b.example", "bob@x") is None
    assert sorted(stats) == sorted([str(before), str(md / hook.USER_SCRIPT)])
    (md / hook.USER_SCRIPT).write_text('require "fileinto";\nfileinto "A";\n')
    assert f.route(str(md), MSG, "a@b.example", "bob@x") is None  # not looked at yet
    time.sleep(0.25)
    assert f.route(str(md), MSG, "a@b.example", "bob@x") == [Route(str(md / ".A"))]
    assert len(stats) == 4


def test_no_script_costs_no_syscall_per_delivery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--sieve with no script anywhere: after the first delivery, none stats a file."""
    md = tmp_path / "carol"
    Maildir.create(md)
    f = SieveFilter()  # the default interval: 1 s
    assert f.cache.recheck == hook.DEFAULT_RECHECK == 1.0
    stats = count_stats(monkeypatch)
    for _ in range(100):
        assert f.route(str(md), MSG, "a@b.example", "carol@x") is None
    assert stats == [str(md / hook.USER_SCRIPT)]


def test_recheck_is_checked() -> None:
    """A negative, infinite or non-number interval is a ValueError naming it."""
    for bad in (-1, float("inf"), float("nan"), "1"):
        with pytest.raises(ValueError, match="recheck"):
            SieveFilter(recheck=bad)  # type: ignore[arg-type]


def test_plain_keep_is_a_plain_delivery_but_flags_and_folders_route(tmp_path: Path) -> None:
    """A script that keeps without flags gives None (no plan, no route); with a flag or a
    fileinto it gives routes as before."""
    md = tmp_path / "bob"
    Maildir.create(md)
    Maildir.create(md / ".L")
    (md / hook.USER_SCRIPT).write_text(NO_MATCH)
    f = SieveFilter(recheck=0)
    assert f.route(str(md), MSG, "a@b.example", "bob@x") is None
    listed = MSG.replace(b"a@b.example", b"x@list.example")
    assert f.route(str(md), listed, "a@b.example", "bob@x") == [Route(str(md / ".L"), "S")]
    (md / hook.USER_SCRIPT).write_text('require "imap4flags";\naddflag "\\\\Flagged";\n')
    assert f.route(str(md), MSG, "a@b.example", "bob@x") == [Route(str(md), "F")]


def test_message_view_parses_headers_lazily_and_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """No parse until a header is read; one parse however many reads; size needs none."""
    calls: list[bytes] = []
    real = message._parse_headers

    def parse(raw: bytes) -> dict[str, list[str]]:
        calls.append(raw)
        return real(raw)

    monkeypatch.setattr(message, "_parse_headers", parse)
    view = MessageView.parse(MSG)
    assert view.size == len(MSG) and calls == []
    assert view.header_values("subject") == ["hi"]
    assert view.raw_values("From") == ["a@b.example"]
    assert view.header_values("x-missing") == [] and view.addresses("from") == [
        ("a@b.example", True)
    ]
    assert calls == [MSG]


@pytest.mark.asyncio
async def test_one_parse_per_message_for_all_recipients(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LMTP, one message to three users with scripts: their evaluations share one parse."""
    calls: list[bytes] = []
    real = message._parse_headers

    def parse(raw: bytes) -> dict[str, list[str]]:
        calls.append(raw)
        return real(raw)

    monkeypatch.setattr(message, "_parse_headers", parse)
    root = tmp_path / "mail"
    users = ["a", "b", "c"]
    for u in users:
        Maildir.create(root / "example.org" / u)
        (root / "example.org" / u / hook.USER_SCRIPT).write_text(NO_MATCH)
    ex = DeliveryExecutor()
    handler = DeliveryHandler(ex, MailboxResolver(root), sieve=SieveFilter())
    factory = SessionFactory(handler, lmtp=True, max_connections=4, loop=asyncio.get_running_loop())
    async with listening(factory, ex) as port:
        replies = await send_message(
            "127.0.0.1",
            port,
            mail_from="s@example.net",
            rcpts=[f"{u}@example.org" for u in users],
            body=b"From: x@y.example\r\nSubject: hi\r\n\r\nbody\r\n",
        )
    assert [r.code for r in replies] == [250, 250, 250], replies
    assert len(calls) == 1
    for u in users:
        assert len(files_in(root / "example.org" / u / "new")) == 1
