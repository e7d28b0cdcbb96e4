"""The DATA path's fewer passes: LF conversion with its count, sizes the store takes from it."""

from __future__ import annotations

import asyncio
import contextlib
import tracemalloc
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from delivery_executor import DeliveryExecutor, MailboxResolver
from delivery_executor._native import speedups as native
from delivery_executor.smtp import DeliveryHandler, SessionFactory
from delivery_executor.smtp import handler as handler_module
from delivery_executor.smtp import reader as reader_module
from delivery_executor.smtp.handler import LineEndings, to_lf, to_lf_counted, to_lf_counted_py
from delivery_executor.store import names
from delivery_executor.store.names import known_line_ends, size_suffix
from delivery_executor.testing import send_message

from .helpers import files_in

pytestmark = pytest.mark.timeout(60)

# Bodies rich in the bytes that matter: CR, LF, CRLF, dots at line starts.
nasty = st.binary(max_size=80) | st.lists(
    st.sampled_from([b"\r", b"\n", b"x", b".", b"\r\n", b"\r\n.", b"\r\r\n"]), max_size=60
).map(b"".join)


def counted(data: bytes) -> int:
    """W - S as size_suffix has always counted it: LFs minus CRLFs."""
    return data.count(b"\n") - data.count(b"\r\n")


@given(nasty)
@example(b"\r\r\n")
@example(b"a\r")
@example(b"\r")
@example(b"x\rx\n")  # as many bare CRs as bare LFs
def test_to_lf_counted_is_to_lf_and_its_count(body: bytes) -> None:
    """The conversion is to_lf's byte for byte, and its count is the one size_suffix makes."""
    lf, extra = to_lf_counted(body)
    assert lf == to_lf(body) == body.replace(b"\r\n", b"\n")
    assert extra == counted(lf)
    assert to_lf_counted_py(body) == (lf, extra)  # the fallback of the C pass too


@given(nasty.map(lambda b: b.replace(b"\r\n", b"\0").replace(b"\n", b"").replace(b"\0", b"\r\n")))
@example(b"a\r\r\nb\r\n")  # a bare CR before a line end
@example(b"x\r\n\ry")
@example(b"\r")
def test_to_lf_counted_without_bare_lf_matches_the_general_path(body: bytes) -> None:
    """Told there is no bare LF, the one-translate path gives the general path's bytes and count."""
    assert to_lf_counted_py(body, True) == to_lf_counted_py(body) == to_lf_counted(body, True)


@given(nasty, nasty, st.integers(0, 3))
@example(b"h\r", b"\nbody\r\n", 0)  # a CRLF split between head and body
def test_known_line_ends_give_the_counted_suffix(head: bytes, body: bytes, cut: int) -> None:
    """With the body's count known, the suffix is the one counting gives, for any split of parts."""
    lf, extra = to_lf_counted(body)
    parts: tuple[memoryview, ...] = (memoryview(head), memoryview(lf))
    if cut:  # the head split too: known and counted parts mixed
        parts = (memoryview(head)[:cut], memoryview(head)[cut:], memoryview(lf))
    expected = size_suffix(parts)
    assert expected == size_suffix((memoryview(head + lf),))
    with known_line_ends(lf, extra):
        assert size_suffix(parts) == expected


def test_known_count_is_used_and_then_forgotten() -> None:
    """Inside the block the given count is taken (not recounted); after it, counting resumes."""
    data = b"a\nb\nc\n" * 1000
    view = (memoryview(data),)
    with known_line_ends(data, 7):
        assert size_suffix(view) == f",S={len(data)},W={len(data) + 7}"
        # A view of part of the object is not the whole object: counted.
        assert (
            size_suffix((memoryview(data)[1:],)) == f",S={len(data) - 1},W={len(data) - 1 + 3000}"
        )
    assert size_suffix(view) == f",S={len(data)},W={len(data) + 3000}"
    assert not names._KNOWN


@contextlib.asynccontextmanager
async def serving(root: Path, **kwargs: Any) -> AsyncIterator[tuple[int, DeliveryHandler]]:
    """An LMTP server on 127.0.0.1:<ephemeral> delivering under ``root``."""
    loop = asyncio.get_running_loop()
    writer = kwargs.pop("writer", "loop")
    ex = DeliveryExecutor(writer=writer)
    handler = DeliveryHandler(ex, MailboxResolver(root), **kwargs)
    factory = SessionFactory(
        handler, lmtp=True, loop=loop, max_connections=16, data_size_limit=handler.max_message_size
    )
    srv = await loop.create_server(factory, "127.0.0.1", 0)
    try:
        yield srv.sockets[0].getsockname()[1], handler
    finally:
        srv.close()
        await srv.wait_closed()
        await ex.aclose()


BODIES = [
    b"Subject: odd\r\n\r\na\rb\r\nc\nd\r\n\r\r\n",
    b"Subject: dots\r\n\r\n.x\r\n..\r\nend\r\n",
    b"Subject: big\r\n\r\n" + b"line of text\r\n" * 5000 + b"bare\nlf\r\n",
    b"x\r\n",
    b"",
]


@pytest.mark.asyncio
@pytest.mark.parametrize("writer", ["loop", "thread", "process"])
@pytest.mark.parametrize("line_endings", ["lf", "crlf"])
async def test_stored_names_carry_the_sizes_of_their_bytes(
    tmp_path: Path, writer: str, line_endings: str
) -> None:
    """Every writer and line-ending mode names each file with the ,S=,W= of the bytes it holds."""
    async with serving(tmp_path, writer=writer, line_endings=line_endings) as (port, _):
        for body in BODIES:
            replies = await send_message(
                "127.0.0.1", port, mail_from="s@example.net",
                rcpts=["a@example.org", "b@example.org"], body=body, lmtp=True,
            )  # fmt: skip
            assert all(r.code == 250 for r in replies), replies
    assert not names._KNOWN
    for who in ("a", "b"):
        d = tmp_path / "example.org" / who / "new"
        assert len(files_in(d)) == len(BODIES)
        for n in files_in(d):
            data = (d / n).read_bytes()
            assert n.endswith(size_suffix((memoryview(data),))), n


@pytest.mark.asyncio
@pytest.mark.parametrize("line_endings", ["lf", "crlf"])
async def test_handler_hands_its_count_to_the_store(
    tmp_path: Path, line_endings: LineEndings
) -> None:
    """In either mode the body's right count is known to the store while it is delivered."""
    seen: list[bool] = []

    class Spy:
        takes_parts = True

        async def deliver(self, path: str, message: object) -> object:
            assert isinstance(message, tuple)
            body = message[-1]
            known = names._KNOWN.get(id(body))
            seen.append(known is not None and known == (body, counted(body)))
            return "id"

    handler = DeliveryHandler(Spy(), MailboxResolver(tmp_path), line_endings=line_endings)
    loop = asyncio.get_running_loop()
    factory = SessionFactory(handler, lmtp=True, loop=loop, max_connections=16)
    srv = await loop.create_server(factory, "127.0.0.1", 0)
    try:
        port = srv.sockets[0].getsockname()[1]
        body = b"Subject: s\r\n\r\n" + b"text\r\n" * 300 + b"bare\nLF\r\n"
        replies = await send_message(
            "127.0.0.1", port, mail_from="s@example.net", rcpts=["a@example.org"], body=body
        )
    finally:
        srv.close()
        await srv.wait_closed()
    assert [r.code for r in replies] == [250]
    assert seen == [True]
    assert not names._KNOWN


@pytest.mark.asyncio
@pytest.mark.uvloop
@pytest.mark.skipif(native is None, reason="the C helpers are not built")
@pytest.mark.parametrize(
    ("body", "hint"),
    [
        (b"Subject: s\r\n\r\n" + b"text\r\n" * 300 + b".dot\r\n", 303),
        (b"Subject: s\r\n\r\n" + b"text\r\n" * 300 + b"bare\nLF\r\n", -1),
    ],
    ids=["counted", "bare-lf"],
)
async def test_the_readers_line_count_spares_the_conversion_its_count(
    tmp_path: Path, body: bytes, hint: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader's count of CRLFs reaches the C conversion; a bare LF leaves it to count.

    With the count, the body goes from the reader's raw buffer straight to the
    C (``unstuff_to_lf``: unstuffed and converted in one copy, the CRLF body
    never made); after a bare LF, the handler converts the made body
    (``to_lf_counted``) and counts there.
    """
    c = native
    assert c is not None
    hints: list[tuple[str, int]] = []

    class Spy:
        def find_dot_or_bare_lf_counted(self, buf: bytes, pos: int) -> tuple[int, int]:
            raise AssertionError("not used by the handler")

        def judge_lines(self, buf: bytes, start: int, end: int, width: int) -> tuple[int, bool]:
            raise AssertionError("not used by the handler")

        def to_lf_counted(self, data: bytes, crlf: int = -1) -> tuple[bytes, int]:
            hints.append(("to_lf_counted", crlf))
            assert c is not None
            return c.to_lf_counted(data, crlf)

        def unstuff_to_lf(
            self, buf: bytearray, start: int, dots: list[int], crlf: int
        ) -> tuple[bytes, int] | None:
            hints.append(("unstuff_to_lf", crlf))
            assert c is not None
            return c.unstuff_to_lf(buf, start, dots, crlf)

    monkeypatch.setattr(handler_module, "speedups", Spy())
    monkeypatch.setattr(reader_module, "speedups", Spy())
    made: list[int] = []
    make = reader_module._Body.content

    def content(self: reader_module._Body) -> bytes:
        made.append(1)
        return make(self)

    monkeypatch.setattr(reader_module._Body, "content", content)
    ex = DeliveryExecutor()
    handler = DeliveryHandler(ex, MailboxResolver(tmp_path))
    loop = asyncio.get_running_loop()
    factory = SessionFactory(handler, lmtp=True, loop=loop, max_connections=4)
    srv = await loop.create_server(factory, "127.0.0.1", 0)
    try:
        port = srv.sockets[0].getsockname()[1]
        replies = await send_message(
            "127.0.0.1", port, mail_from="s@example.net", rcpts=["a@example.org"], body=body
        )
    finally:
        srv.close()
        await srv.wait_closed()
        await ex.aclose()
    assert [r.code for r in replies] == [250]
    assert hints == [("unstuff_to_lf", hint) if hint >= 0 else ("to_lf_counted", hint)]
    assert len(made) == (0 if hint >= 0 else 1)  # counted: the CRLF body is never made
    if hint >= 0:
        assert hint == body.count(b"\r\n")
    (name,) = files_in(tmp_path / "example.org" / "a" / "new")
    stored = (tmp_path / "example.org" / "a" / "new" / name).read_bytes()
    assert stored.endswith(body.replace(b"\r\n", b"\n"))
    assert name.endswith(size_suffix((memoryview(stored),)))


@pytest.mark.parametrize(
    "line",
    [b"\r\n", b"line of text\r\n", b"a" * 78 + b"\r\n"],
    ids=["empty-lines", "short-lines", "long-lines"],
)
@pytest.mark.parametrize("tail", [b"", b"bare\rCR\r\n", b"x\r"])
def test_either_cr_delete_gives_the_same_bytes_and_count(line: bytes, tail: bytes) -> None:
    """Short lines (translate) or long (replace), a bare CR past the sample or not: same result."""
    body = line * (64 * 1024 // len(line)) + tail
    lf, extra = to_lf_counted_py(body, True)
    assert to_lf_counted(body, True) == (lf, extra)
    assert lf == body.replace(b"\r\n", b"\n") == to_lf(body)
    assert extra == counted(lf)


@pytest.mark.parametrize("convert", [to_lf_counted, to_lf_counted_py], ids=["default", "python"])
def test_cr_delete_of_long_lines_makes_no_transient_copy(
    convert: Callable[[bytes, bool], tuple[bytes, int]],
) -> None:
    """Deleting the CRs of 4 MiB of 80-byte lines peaks at about one result, not three copies."""
    body = (b"a" * 78 + b"\r\n") * (4 * 1024 * 1024 // 80)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        lf, extra = convert(body, True)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert extra == len(body) - len(lf) == body.count(b"\r\n")
    assert peak < 1.25 * len(lf)  # the old bytearray(body).translate(...) path held ~3 bodies
