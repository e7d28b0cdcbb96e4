"""Dovecot's conventions over real sessions: PIPELINING, enhanced codes, folders, sizes."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosmtpd
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from delivery_executor import DeliveryExecutor, MailboxResolver, Maildir
from delivery_executor.smtp import DeliveryHandler, SessionFactory
from delivery_executor.smtp.handler import to_lf
from delivery_executor.smtp.protocol import EXTENSIONS, with_enhanced_code
from delivery_executor.testing import send_message

from .helpers import listening

pytestmark = pytest.mark.timeout(60)

CODED = re.compile(r"\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")


@contextlib.asynccontextmanager
async def server(
    root: Path, *, lmtp: bool = True, resolver_kwargs: dict[str, Any] | None = None
) -> AsyncIterator[int]:
    """Our protocol, handler and executor on 127.0.0.1:<ephemeral>, delivering under ``root``."""
    loop = asyncio.get_running_loop()
    ex = DeliveryExecutor()
    handler = DeliveryHandler(ex, MailboxResolver(root, **(resolver_kwargs or {})))
    factory = SessionFactory(
        handler, lmtp=lmtp, max_connections=8, loop=loop, data_size_limit=10_000,
        enable_SMTPUTF8=True,
    )  # fmt: skip
    async with listening(factory, ex) as port:
        yield port


class Client:
    """A raw line client: writes what it is told, reads replies one at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, port: int) -> AsyncIterator[Client]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            yield cls(reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def reply(self) -> list[str]:
        """One reply's lines (a multi-line reply ends at ``NNN <text>``)."""
        lines: list[str] = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), 10)
            assert raw, f"connection closed; got {lines}"
            line = raw.decode().rstrip("\r\n")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return lines

    async def send(self, data: str | bytes) -> None:
        self.writer.write(data.encode() if isinstance(data, str) else data)
        await self.writer.drain()

    async def command(self, line: str) -> list[str]:
        await self.send(line + "\r\n")
        return await self.reply()


def new_files(root: Path, *parts: str) -> list[Path]:
    box = root.joinpath(*parts)
    return [e.path for e in Maildir.open(box).scan_new()] if (box / "new").exists() else []


# -- PIPELINING -------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("lmtp", [True, False])
async def test_pipelined_client_gets_every_reply_in_order(tmp_path: Path, lmtp: bool) -> None:
    """Pipelined MAIL/RCPT×3/DATA, then body+RSET/NOOP/QUIT: every reply right, in order."""
    async with server(tmp_path, lmtp=lmtp) as port, Client.connect(port) as c:
        await c.reply()
        hello = await c.command(f"{'LHLO' if lmtp else 'EHLO'} client.example")
        assert "250-PIPELINING" in hello
        await c.send(
            "MAIL FROM:<s@example.net>\r\nRCPT TO:<a@example.org>\r\n"
            "RCPT TO:<../x@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
        )
        group = [(await c.reply())[0] for _ in range(5)]
        assert [r[:9] for r in group] == [
            "250 2.1.0", "250 2.1.5", "553 5.1.3", "250 2.1.5", "354 End d",
        ]  # fmt: skip
        await c.send("Subject: piped\r\n\r\nhello\r\n.\r\nRSET\r\nNOOP\r\nQUIT\r\n")
        data = [(await c.reply())[0] for _ in range(2 if lmtp else 1)]
        tail = [(await c.reply())[0] for _ in range(3)]
    if lmtp:
        assert data[0].startswith("250 2.0.0 <a@example.org> Ok: delivered as ")
        assert data[1].startswith("250 2.0.0 <b@example.org> Ok: delivered as ")
    else:
        assert data[0].startswith("250 2.0.0 Ok: delivered to 2 mailbox(es)")
    assert [r[:9] for r in tail] == ["250 2.0.0", "250 2.0.0", "221 2.0.0"]
    for user in ("a", "b"):
        (path,) = new_files(tmp_path, "example.org", user)
        assert path.read_bytes().endswith(b"Subject: piped\n\nhello\n")


@pytest.mark.asyncio
async def test_pipelined_group_after_a_refused_mail_stays_in_step(tmp_path: Path) -> None:
    """A refused MAIL in a pipelined group: its RCPTs and DATA are refused in order."""
    async with server(tmp_path) as port, Client.connect(port) as c:
        await c.reply()
        await c.command("LHLO client.example")
        await c.send(
            "MAIL FROM:<s@example.net> BOGUS=1\r\nRCPT TO:<a@example.org>\r\nDATA\r\nNOOP\r\n"
        )
        group = [(await c.reply())[0] for _ in range(4)]
    assert [r[:9] for r in group] == ["555 5.5.4", "503 5.5.1", "503 5.5.1", "250 2.0.0"]
    assert new_files(tmp_path, "example.org", "a") == []


@pytest.mark.asyncio
@pytest.mark.parametrize("lmtp", [True, False])
async def test_the_test_client_pipelines_like_postfix(tmp_path: Path, lmtp: bool) -> None:
    """testing.send_message(pipelining=True): one group, right replies, even when all fail."""
    async with server(tmp_path, lmtp=lmtp) as port:
        rcpts = ["a@example.org", "../x@example.org", "b@example.org"]
        replies = await send_message(
            "127.0.0.1", port, mail_from="s@example.net", rcpts=rcpts,
            body=b"Subject: piped\r\n\r\n.dot\r\n", lmtp=lmtp, pipelining=True,
        )  # fmt: skip
        refused = await send_message(
            "127.0.0.1", port, mail_from="s@example.net", rcpts=["../y@example.org"],
            body=b"x", lmtp=lmtp, pipelining=True,
        )  # fmt: skip
    assert [(r.rcpt, r.code) for r in replies] == [
        ("a@example.org", 250), ("../x@example.org", 553), ("b@example.org", 250),
    ]  # fmt: skip
    assert [(r.rcpt, r.code) for r in refused] == [("../y@example.org", 553)]
    for user in ("a", "b"):
        (path,) = new_files(tmp_path, "example.org", user)
        assert path.read_bytes().endswith(b"Subject: piped\n\n.dot\n")


# -- ENHANCEDSTATUSCODES ----------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("lmtp", [True, False])
async def test_hello_advertises_pipelining_and_enhanced_codes_once(
    tmp_path: Path, lmtp: bool
) -> None:
    """LHLO/EHLO lists PIPELINING and ENHANCEDSTATUSCODES once each, before the last line."""
    async with server(tmp_path, lmtp=lmtp) as port, Client.connect(port) as c:
        greeting = await c.reply()
        hello = await c.command(f"{'LHLO' if lmtp else 'EHLO'} client.example")
        again = await c.command(f"{'LHLO' if lmtp else 'EHLO'} client.example")
    assert greeting[0].startswith("220 ") and not CODED.match(greeting[0])  # RFC 2034: exempt
    for reply in (hello, again):
        keywords = [line[4:] for line in reply]
        for ext in EXTENSIONS:
            assert keywords.count(ext) == 1
        assert reply[-1].startswith("250 ")
        assert all(line.startswith("250-") for line in reply[:-1])
        assert not any(CODED.match(line) for line in reply)  # hello replies stay bare


# Every command aiosmtpd answers itself (and some it passes to our handler),
# in an order that reaches each of its replies: none may lack an enhanced code.
SESSION = [
    "NOOP", "MAIL FROM:<s@example.net>", "{hello}", "{hello} client.example", "HELP",
    "HELP MAIL", "HELP BOGUS", "VRFY a@example.org", "VRFY", "EXPN list", "BOGUS stuff",
    "", "STARTTLS", "AUTH PLAIN", "RCPT TO:<a@example.org>", "DATA",
    "MAIL FROM:<s@example.net> BOGUS=1", "MAIL FROM:<s@example.net> SIZE=99999999",
    "MAIL FROM:<s@example.net> BODY=9BIT", "MAIL FROM:<s@example.net> SMTPUTF8=x",
    "MAIL FROM:", "MAIL FROM:<>", "MAIL FROM:<s@example.net>", "MAIL FROM:<s@example.net>",
    "RCPT TO:", "RCPT TO:<../x@example.org>", "RCPT TO:<nobody@[1.2.3.4]>",
    "RCPT TO:<a@example.org>", "DATA x", "X" * 2000, "RSET x", "RSET", "QUIT x", "QUIT",
]  # fmt: skip


@pytest.mark.asyncio
@pytest.mark.parametrize("lmtp", [True, False])
async def test_every_reply_carries_an_enhanced_code(tmp_path: Path, lmtp: bool) -> None:
    """Every 2xx/4xx/5xx reply has an RFC 3463 code, bar the greeting and HELO/EHLO/LHLO's."""
    hello = "LHLO" if lmtp else "EHLO"
    seen: list[tuple[str, str]] = []
    async with server(tmp_path, lmtp=lmtp) as port, Client.connect(port) as c:
        await c.reply()
        for cmd in SESSION:
            cmd = cmd.format(hello=hello)
            reply = await c.command(cmd)
            if cmd == f"{hello} client.example":
                continue
            seen += [(cmd, line) for line in reply]
            if cmd == "RSET":  # a full transaction, with a refused and a big body
                for line in ("MAIL FROM:<s@example.net>", "RCPT TO:<a@example.org>",
                             "RCPT TO:<b@example.org>", "DATA"):  # fmt: skip
                    seen += [(line, r) for r in await c.command(line)]
                await c.send(b"Subject: t\r\n\r\n" + b"y" * 20_000 + b"\r\n.\r\n")
                for _ in range(2 if lmtp else 1):
                    seen += [("DATA end", r) for r in await c.reply()]
                if not lmtp:
                    seen += [("HELO", r) for r in await c.command("HELO client.example")]
    bare = [
        (cmd, line)
        for cmd, line in seen
        if not line.startswith("3") and not CODED.match(line) and cmd != "HELO"
    ]
    assert not bare, f"replies without an enhanced code: {bare}"
    assert any(line.startswith("552 5.3.4") for _, line in seen)
    assert any(line.startswith("500 5.5.2 Error: command not recognized") for _, line in seen)
    helo = [line for cmd, line in seen if cmd == "HELO"]
    assert lmtp or (len(helo) == 1 and helo[0].startswith("250 ") and not CODED.match(helo[0]))


def _aiosmtpd_reply_literals() -> list[str]:
    """Every string constant in aiosmtpd's protocol code that starts like a 2xx-5xx reply."""
    found = []
    for name in ("smtp.py", "lmtp.py"):
        tree = ast.parse((Path(aiosmtpd.__file__).parent / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr) and node.values:
                first = node.values[0]
                value = first.value if isinstance(first, ast.Constant) else None
            elif isinstance(node, ast.Constant):
                value = node.value
            else:
                continue
            if isinstance(value, str) and re.match(r"[245]\d\d[ -]", value):
                found.append(value)
    return found


def test_every_aiosmtpd_reply_text_gets_a_code() -> None:
    """Each reply text in aiosmtpd's source, run through our rewrite, has an enhanced code."""
    literals = _aiosmtpd_reply_literals()
    assert len(literals) > 40  # the source was really read
    for text in literals:
        assert CODED.match(with_enhanced_code(text)), text


def test_with_enhanced_code_keeps_codes_and_multiline_replies() -> None:
    """Coded lines pass unchanged; each line of a multi-line reply is fixed on its own."""
    assert with_enhanced_code("250 2.1.5 Ok") == "250 2.1.5 Ok"
    assert with_enhanced_code("250 OK") == "250 2.0.0 OK"
    assert with_enhanced_code("221 Bye") == "221 2.0.0 Bye"
    assert with_enhanced_code("354 End data with <CR><LF>.<CR><LF>").startswith("354 End")
    assert with_enhanced_code("503 Error: need MAIL command") == (
        "503 5.5.1 Error: need MAIL command"
    )
    assert with_enhanced_code('500 Error: command "SECRET" not recognized') == (
        "500 5.5.2 Error: command not recognized"
    )
    assert with_enhanced_code("250 2.0.0 a\r\n451 busy") == "250 2.0.0 a\r\n451 4.3.0 busy"
    assert with_enhanced_code("599 odd") == "599 5.0.0 odd"


# -- sizes in names, detail folders -------------------------------------------


@given(
    st.binary(max_size=64) | st.lists(st.sampled_from([b"\r", b"\n", b"x", b"\r\n"])).map(b"".join)
)
@example(b"\r\r\n")
@example(b"a\r")
@example(b"\r\n\r")
def test_to_lf_is_replace_crlf_by_lf(body: bytes) -> None:
    """The fast LF conversion gives exactly bytes.replace's result, bare CRs included."""
    assert to_lf(body) == body.replace(b"\r\n", b"\n")


@pytest.mark.asyncio
async def test_names_carry_lf_sizes(tmp_path: Path) -> None:
    """A stored copy's name ends in ,S=<bytes on disk>,W=<bytes with CRLF>."""
    async with server(tmp_path) as port, Client.connect(port) as c:
        await c.reply()
        await c.command("LHLO client.example")
        for line in ("MAIL FROM:<s@example.net>", "RCPT TO:<a@example.org>", "DATA"):
            await c.command(line)
        await c.send("Subject: sizes\r\n\r\none\r\ntwo\r\n.\r\n")
        assert (await c.reply())[0].startswith("250 2.0.0")
    (path,) = new_files(tmp_path, "example.org", "a")
    data = path.read_bytes()
    m = re.search(r",S=(\d+),W=(\d+)$", path.name)
    assert m, path.name
    assert int(m.group(1)) == len(data)
    assert int(m.group(2)) == len(data) + data.count(b"\n")


@pytest.mark.asyncio
async def test_detail_goes_to_an_existing_folder_else_inbox(tmp_path: Path) -> None:
    """alice+Lists lands in .Lists (it exists); alice+nope in INBOX; a dotted one is refused."""
    Maildir.create(tmp_path / "example.org" / "alice" / ".Lists")
    kwargs = {"recipient_delimiter": "+", "detail_to_folder": True}
    async with server(tmp_path, resolver_kwargs=kwargs) as port, Client.connect(port) as c:
        await c.reply()
        await c.command("LHLO client.example")
        await c.command("MAIL FROM:<s@example.net>")
        rcpts = ["alice+Lists@example.org", "Alice+nope@example.org", "alice+.x@example.org"]
        replies = [(await c.command(f"RCPT TO:<{r}>"))[0] for r in rcpts]
        assert await c.command("DATA") == ["354 End data with <CR><LF>.<CR><LF>"]
        await c.send("Subject: f\r\n\r\nfoldered\r\n.\r\n")
        data = [(await c.reply())[0] for _ in range(2)]
    assert [r[:9] for r in replies] == ["250 2.1.5", "250 2.1.5", "553 5.1.3"]
    assert "may not start with a dot" in replies[2]
    assert all(d.startswith("250 2.0.0") for d in data)
    (in_folder,) = new_files(tmp_path, "example.org", "alice", ".Lists")
    (in_inbox,) = new_files(tmp_path, "example.org", "alice")
    assert b"Delivered-To: alice+Lists@example.org\n" in in_folder.read_bytes()
    assert b"Delivered-To: Alice+nope@example.org\n" in in_inbox.read_bytes()
    assert not (tmp_path / "example.org" / "alice" / ".nope").exists()
