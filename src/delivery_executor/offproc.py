"""Batch writing in a helper process: the file work leaves the event loop's GIL.

In a Python server the event loop thread is the bottleneck. Writing a batch in
a thread of the same process costs the loop a GIL handoff at every syscall
the thread makes (four or five per message); writing it on the loop costs the
loop the syscalls themselves. :class:`ProcessWriter` sends each batch, framed,
over a pipe to a helper process (``python -m delivery_executor._writerproc``) that
runs the same :class:`~delivery_executor.writer.MaildirWriter` on the other
core, and awaits its reply. The loop pays one pipe write and one read per batch.

If the helper dies, every batch it held fails with ``BrokenPipeError`` (its
messages may or may not be on disk: the caller was not told they are, so a
retry can duplicate but never lose) and the next batch starts a new helper.

Wire format, all integers big-endian. Request: ``u32 length``, ``u32 batch``,
``u16 groups``, then per group ``u16 len, path (UTF-8, surrogateescape)``,
``u32 count``, per message ``u32 len, body``. Reply: ``u32 length``,
``u32 batch``, ``u32 syncs``, ``u16 groups``, then per group either ``u8 0,
u32 count`` and per id ``u16 len, name``, or ``u8 1, i32 errno, u16 len,
strerror, u16 len, filename`` (an ``OSError``), or ``u8 2, u16 len, text``
(any other exception, reported as ``RuntimeError``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import struct
import sys
from collections.abc import Sequence
from typing import BinaryIO

from .maildir import MessageId, SyncMode
from .writer import BatchResult, GroupResult, MaildirWriter, Offload

__all__ = ["ProcessWriter", "decode_reply", "decode_request", "encode_reply", "encode_request"]

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_HEAD = struct.Struct(">IH")  # batch, groups
_REPLY_HEAD = struct.Struct(">IIH")  # batch, syncs, groups
_ERR = struct.Struct(">Bi")


def _s(text: str) -> bytes:
    # Paths are under PATH_MAX (checked at deliver()); only error texts get cut.
    raw = text.encode("utf-8", "surrogateescape")[:0xFFFF]
    return _U16.pack(len(raw)) + raw


def encode_request(batch: int, groups: Sequence[tuple[str, Sequence[memoryview]]]) -> bytes:
    """Frame one batch: its id and every group's path and bodies."""
    parts: list[bytes | memoryview] = [b"", _HEAD.pack(batch, len(groups))]
    for path, bodies in groups:
        parts.append(_s(path))
        parts.append(_U32.pack(len(bodies)))
        for body in bodies:
            parts.append(_U32.pack(body.nbytes))
            parts.append(body)
    payload = b"".join(parts)
    return _U32.pack(len(payload)) + payload


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, n: int) -> bytes:
        out = self.buf[self.pos : self.pos + n]
        if len(out) != n:
            raise ValueError("truncated frame")
        self.pos += n
        return out

    def u16(self) -> int:
        return int(_U16.unpack(self.take(2))[0])

    def u32(self) -> int:
        return int(_U32.unpack(self.take(4))[0])

    def text(self) -> str:
        return self.take(self.u16()).decode("utf-8", "surrogateescape")


def decode_request(payload: bytes) -> tuple[int, list[tuple[str, list[memoryview]]]]:
    """The batch id and groups of a request payload (without its length prefix)."""
    r = _Reader(payload)
    batch, n = _HEAD.unpack(r.take(_HEAD.size))
    view = memoryview(payload)
    groups = []
    for _ in range(n):
        path = r.text()
        bodies = []
        for _ in range(r.u32()):
            size = r.u32()
            bodies.append(view[r.pos : r.pos + size])
            r.take(size)
        groups.append((path, bodies))
    return batch, groups


def encode_reply(batch: int, results: Sequence[GroupResult], syncs: int) -> bytes:
    """Frame one batch's results (ids or errors, per group) and its sync count."""
    parts = [_REPLY_HEAD.pack(batch, syncs, len(results))]
    for res in results:
        if isinstance(res, OSError):
            parts.append(_ERR.pack(1, res.errno or 0))
            parts.append(_s(res.strerror or str(res)))
            parts.append(_s("" if res.filename is None else os.fsdecode(res.filename)))
        elif isinstance(res, BaseException):
            parts.append(b"\x02" + _s(f"{type(res).__name__}: {res}"))
        else:
            parts.append(b"\x00" + _U32.pack(len(res)))
            parts.extend(_s(mid.name) for mid in res)
    payload = b"".join(parts)
    return _U32.pack(len(payload)) + payload


def decode_reply(payload: bytes) -> tuple[int, BatchResult]:
    """The batch id and ``(results, syncs)`` of a reply payload."""
    r = _Reader(payload)
    batch, syncs, n = _REPLY_HEAD.unpack(r.take(_REPLY_HEAD.size))
    results: list[GroupResult] = []
    for _ in range(n):
        kind = r.take(1)[0]
        if kind == 0:
            results.append([MessageId(r.text()) for _ in range(r.u32())])
        elif kind == 1:
            r.pos -= 1
            _, err = _ERR.unpack(r.take(_ERR.size))
            strerror = r.text()
            filename = r.text() or None
            # OSError(errno, ...) picks the matching subclass (FileNotFoundError, ...).
            results.append(OSError(err, strerror, filename))
        else:
            results.append(RuntimeError(f"in the writer process: {r.text()}"))
    return batch, (results, syncs)


def _read_exactly(stream: BinaryIO, n: int) -> bytes | None:
    chunks = []
    while n:
        chunk = stream.read(n)
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def child_main(sync: SyncMode) -> int:
    """The helper's loop: read a batch, write it durably, reply; exit at end of input.

    SIGINT and SIGTERM are ignored: a Ctrl-C or a service manager signals the
    whole process group, and the parent ends the helper by closing its input
    once the batches it sent are done.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    writer = MaildirWriter(sync)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        head = _read_exactly(stdin, 4)
        if head is None:
            return 0
        payload = _read_exactly(stdin, _U32.unpack(head)[0])
        if payload is None:
            return 0
        batch, groups = decode_request(payload)
        try:
            results, syncs = writer(groups)
        except Exception as exc:  # a bug: report it to the batch, keep serving
            results, syncs = [exc] * len(groups), 0
        stdout.write(encode_reply(batch, results, syncs))
        stdout.flush()


class ProcessWriter:
    """A batch writer whose file work runs in a helper process (see the module doc).

    Use it as ``DeliveryExecutor(writer=ProcessWriter())``; the executor awaits
    :meth:`acommit` and closes the helper in :meth:`aclose`. Costs one helper
    process (about 20 MB), started at the first batch.
    """

    def __init__(self, sync: SyncMode = "auto") -> None:
        self._local = MaildirWriter(sync)  # validates sync here, not in the helper
        self.sync: SyncMode = sync
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: dict[int, asyncio.Future[BatchResult]] = {}
        self._next = 0
        self._starting: asyncio.Lock | None = None
        self.restarts = 0

    def __repr__(self) -> str:
        pid = self._proc.pid if self._proc is not None else None
        return f"<ProcessWriter sync={self.sync!r} pid={pid} waiting={len(self._waiting)}>"

    def __call__(self, groups: Sequence[tuple[str, Sequence[memoryview]]]) -> BatchResult:
        """Blocking use (``offload="all"``): write in this thread instead."""
        return self._local(groups)

    async def acommit(
        self, groups: Sequence[tuple[str, Sequence[memoryview]]], offload: Offload
    ) -> BatchResult:
        """Send the batch to the helper and await its results."""
        proc = await self._ensure()
        batch = self._next = (self._next + 1) & 0xFFFFFFFF
        fut: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
        self._waiting[batch] = fut
        assert proc.stdin is not None
        try:
            proc.stdin.write(encode_request(batch, groups))
            await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as exc:
            self._waiting.pop(batch, None)
            raise BrokenPipeError(exc.errno, "the writer process is gone") from exc
        return await fut

    async def _ensure(self) -> asyncio.subprocess.Process:
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if (
                self._proc is not None
                and self._proc.returncode is None
                and self._reader is not None
                and not self._reader.done()
            ):
                return self._proc
            if self._proc is not None:
                self.restarts += 1
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "delivery_executor._writerproc", "--sync", self.sync,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            self._reader = asyncio.get_running_loop().create_task(
                self._read_replies(self._proc), name="delivery-offproc-reader"
            )
            return self._proc

    async def _read_replies(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        try:
            while True:
                head = await proc.stdout.readexactly(4)
                payload = await proc.stdout.readexactly(_U32.unpack(head)[0])
                batch, result = decode_reply(payload)
                fut = self._waiting.pop(batch, None)
                if fut is not None and not fut.done():
                    fut.set_result(result)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
            err = BrokenPipeError(32, f"the writer process ended: {exc!r}")
            waiting, self._waiting = self._waiting, {}
            for fut in waiting.values():
                if not fut.done():
                    fut.set_exception(err)

    async def aclose(self) -> None:
        """Close the helper's input and wait for it to exit (it finishes its batch)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        if self._reader is not None:
            with contextlib.suppress(BaseException):
                await self._reader
