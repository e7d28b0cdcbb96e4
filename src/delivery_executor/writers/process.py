"""Batch writing in a helper process: the file work leaves the event loop's GIL.

In a Python server the event-loop thread is the bottleneck. A thread of the
same process costs the loop a GIL hand-off at every syscall it makes (four or
five per message); writing on the loop costs the loop the syscalls
themselves. :class:`ProcessWriter` sends each batch, framed, over a pipe to a
helper process (``python -m delivery_executor.writers._helper``) that runs
:func:`~delivery_executor.writers.write_batch` on the other core, and awaits
its reply. The loop pays one pipe write and one read per batch.

If the helper dies, every batch it held fails with ``BrokenPipeError`` (its
messages may or may not be on disk: the caller was not told they are, so a
retry can duplicate but never lose) and the next batch starts a new helper.

Wire format, integers big-endian, each frame prefixed by its ``u32`` length.
Request: ``u32 batch``, ``u32 blobs``, per blob ``u32 len``, ``u32 extra``
(its LF count minus its CRLF count when the sender knows it, from
:func:`~delivery_executor.store.names.known_line_ends`, else ``0xFFFFFFFF``:
the helper then counts for ``,W=``) and its bytes, ``u32 groups``, per group
``u16 len, path`` (UTF-8, surrogateescape; a flagged group's is ``path NUL
letters``, a NUL being no path's), ``u32 count``, per message ``u8 parts``
and per part ``u32 blob``. A buffer shared by several messages (one body for
many recipients) is one blob, sent once.
Reply: ``u32 batch``, ``u32 syncs``, ``u32 groups``, per group either ``u8 0,
u32 count`` and per id ``u16 len, name``, or ``u8 1, i32 errno, u16 len,
strerror, u16 len, filename, u16 len, filename2`` (an ``OSError``; an empty
filename is none), or ``u8 2, u16 len, text``
(any other exception, reported as ``RuntimeError``). A batch whose frame would
pass 4 GiB fails with ``ValueError`` before anything is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import os
import signal
import struct
import sys
from collections.abc import Sequence
from typing import BinaryIO, TypeAlias

from ..fsops import OS_OPS, FsOps
from ..heap import keep_heap
from ..store import MessageId, StoreOptions, SyncMode
from ..store.names import known_extra, known_line_ends_of
from ..validate import count
from .base import (
    PROCESS_THREAD_ABOVE,
    AnyGroup,
    BatchResult,
    GroupResult,
    ThreadPool,
    body_key,
    check_thread_above,
    goes_to_thread,
    write_batch,
)

__all__ = [
    "ProcessWriter",
    "decode_reply",
    "decode_request",
    "encode_reply",
    "encode_request",
    "serve_batches",
]

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_REPLY_HEAD = struct.Struct(">III")  # batch, syncs, groups
_BLOB_HEAD = struct.Struct(">II")  # len, extra
_ERR = struct.Struct(">Bi")
_FRAME_MAX = 0xFFFFFFFF
_UNKNOWN = 0xFFFFFFFF  # a blob's extra not known (a real one is below its length)
MAX_PARTS = 0xFF
"""Parts one message may have in a request frame (a ``u8`` count)."""


def _s(text: str) -> bytes:
    # Paths are under PATH_MAX (checked at deliver()); only error texts get cut.
    raw = text.encode("utf-8", "surrogateescape")[:0xFFFF]
    return _U16.pack(len(raw)) + raw


def encode_request(batch: int, groups: Sequence[AnyGroup]) -> list[bytes | memoryview]:
    """Frame one batch as a list of buffers to write in order (bodies are not copied)."""
    return _frame(batch, *_index(groups))


def _index(groups: Sequence[AnyGroup]) -> tuple[list[memoryview], bytes, int]:
    """The batch's bodies for the wire, each shared body once; the references that
    place them in the groups; and the most parts any one message has."""
    blobs: list[memoryview] = []
    index: dict[int, int] = {}
    refs: list[bytes] = [_U32.pack(len(groups))]
    widest = 0
    for group in groups:
        messages = group[1]
        refs.append(_s(group[0] if len(group) == 2 else f"{group[0]}\0{group[2]}"))
        refs.append(_U32.pack(len(messages)))
        for parts in messages:
            widest = max(widest, len(parts))
            refs.append(_U8.pack(len(parts) & 0xFF))  # over 255: refused by _frame
            for part in parts:
                key = body_key(part)  # one blob per body, however many copies carry it
                i = index.get(key)
                if i is None:
                    i = index[key] = len(blobs)
                    blobs.append(part)
                refs.append(_U32.pack(i))
    return blobs, b"".join(refs), widest


def _frame(
    batch: int, blobs: list[memoryview], tail: bytes, widest: int
) -> list[bytes | memoryview]:
    """The frame of an indexed batch; ``ValueError`` if the helper cannot take it."""
    if widest > MAX_PARTS:
        raise ValueError(f"a message has {widest} parts; the helper takes {MAX_PARTS}")
    size = 8 + len(tail) + sum(4 + blob.nbytes for blob in blobs)
    size += 4 * len(blobs)  # each blob's extra
    if size > _FRAME_MAX:  # checked first: a blob's own u32 length could not even be packed
        raise ValueError(f"batch of {size} bytes is too large for the helper's 4 GiB frame")
    out: list[bytes | memoryview] = [_U32.pack(size), _U32.pack(batch), _U32.pack(len(blobs))]
    for blob in blobs:
        extra = known_extra(blob)
        out.append(_BLOB_HEAD.pack(blob.nbytes, _UNKNOWN if extra is None else extra))
        out.append(blob)
    out.append(tail)
    return out


class _Reader:
    """Fields of a frame held in memory (views: nothing is copied)."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes | bytearray | memoryview) -> None:
        self.buf = memoryview(buf)
        self.pos = 0

    def take(self, n: int) -> bytes | memoryview:
        out = self.buf[self.pos : self.pos + n]
        if len(out) != n:
            raise ValueError("truncated frame")
        self.pos += n
        return out

    def blob(self, n: int) -> memoryview:
        # A copy of its own, as bytes: the store scans it for ,S=/,W= in place.
        return memoryview(bytes(self.take(n)))

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(_U16.unpack(self.take(2))[0])

    def u32(self) -> int:
        return int(_U32.unpack(self.take(4))[0])

    def text(self) -> str:
        return bytes(self.take(self.u16())).decode("utf-8", "surrogateescape")


class _StreamReader(_Reader):
    """Fields read straight from a buffered stream: each blob is read into its own
    ``bytes`` (one copy of the batch, not a frame buffer and then the blobs)."""

    __slots__ = ("stream",)

    def __init__(self, stream: BinaryIO) -> None:
        super().__init__(b"")
        self.stream = stream

    def take(self, n: int) -> bytes:
        out = self.stream.read(n)  # a BufferedReader reads until n bytes or the end
        if len(out) != n:
            raise ValueError("truncated frame")
        self.pos += n
        return out

    def blob(self, n: int) -> memoryview:
        return memoryview(self.take(n))


Known: TypeAlias = "list[tuple[bytes, int]]"
"""Blobs whose line-end count came with them, and that count."""


def decode_request(payload: bytes | bytearray | memoryview) -> tuple[int, list[AnyGroup]]:
    """The batch id and groups of a request payload (without its length prefix)."""
    batch, groups, _ = _decode_request(_Reader(payload))
    return batch, groups


def _decode_request(r: _Reader) -> tuple[int, list[AnyGroup], Known]:
    batch = r.u32()
    blobs: list[memoryview] = []
    known: Known = []
    for _ in range(r.u32()):
        size, extra = r.u32(), r.u32()
        blob = r.blob(size)
        blobs.append(blob)
        if extra != _UNKNOWN:
            known.append((blob.obj, extra))  # type: ignore[arg-type]  # blob() views a bytes
    groups: list[AnyGroup] = []
    for _ in range(r.u32()):
        path, flagged, info = r.text().partition("\0")
        messages = [tuple(blobs[r.u32()] for _ in range(r.u8())) for _ in range(r.u32())]
        groups.append((path, messages, info) if flagged else (path, messages))
    return batch, groups, known


def read_request(stream: BinaryIO) -> tuple[int, list[AnyGroup], Known] | None:
    """The next framed request from ``stream``; ``None`` at the end of input.

    Also the blobs whose line-end count the frame carries. ``ValueError`` if a
    frame's fields do not add up to its length.
    """
    head = stream.read(4)
    if len(head) < 4:
        return None
    size = _U32.unpack(head)[0]
    r = _StreamReader(stream)
    try:
        request = _decode_request(r)
    except ValueError:
        return None  # the input ended inside a frame: the parent is gone
    if r.pos != size:
        raise ValueError(f"request frame of {size} bytes held {r.pos}")
    return request


def encode_reply(batch: int, results: Sequence[GroupResult], syncs: int) -> bytes:
    """Frame one batch's results (ids or errors, per group) and its sync count."""
    parts = [_REPLY_HEAD.pack(batch, syncs, len(results))]
    for res in results:
        if isinstance(res, OSError):
            parts.append(_ERR.pack(1, res.errno or 0))
            parts.append(_s(res.strerror or str(res)))
            parts.append(_s("" if res.filename is None else os.fsdecode(res.filename)))
            parts.append(_s("" if res.filename2 is None else os.fsdecode(res.filename2)))
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
        kind = r.u8()
        if kind == 0:
            results.append([MessageId(r.text()) for _ in range(r.u32())])
        elif kind == 1:
            r.pos -= 1
            _, err = _ERR.unpack(r.take(_ERR.size))
            strerror = r.text()
            filename = r.text() or None
            filename2 = r.text() or None
            # OSError(errno, ...) picks the matching subclass (FileNotFoundError, ...).
            results.append(OSError(err, strerror, filename, None, filename2))
        else:
            results.append(RuntimeError(f"in the writer process: {r.text()}"))
    return batch, (results, syncs)


def child_main(sync: SyncMode, *, size_in_names: bool = True) -> int:
    """The helper's loop: read a batch, write it durably, reply; exit at end of input.

    SIGINT and SIGTERM are ignored: a Ctrl-C or a service manager signals the
    whole process group, and the parent ends the helper by closing its input
    once the batches it sent are done.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    keep_heap()  # each batch's blobs reuse the last one's memory (heap.py)
    return serve_batches(sys.stdin.buffer, sys.stdout.buffer, sync, size_in_names=size_in_names)


def serve_batches(
    stdin: BinaryIO,
    stdout: BinaryIO,
    sync: SyncMode,
    *,
    size_in_names: bool = True,
    ops: FsOps = OS_OPS,
) -> int:
    """:func:`child_main`'s loop over any streams; returns 0 at end of input.

    Tests run it in-process with a tracing ``ops`` to check the helper's own
    path (frame decoding, :func:`write_batch`, reply) for crash safety.
    """
    options = StoreOptions(sync, size_in_names, ops)
    while (request := read_request(stdin)) is not None:
        batch, groups, known = request
        try:
            # The sender's line-end counts: ,W= without a pass over the bytes here.
            with known_line_ends_of(known):
                results, syncs = write_batch(groups, options=options)
        except Exception as exc:  # a bug: report it to the batch, keep serving
            results, syncs = [exc] * len(groups), 0
        stdout.write(encode_reply(batch, results, syncs))
        stdout.flush()
    return 0


_PIPE_SIZE = 1 << 20
THREAD_ABOVE = PROCESS_THREAD_ABOVE
"""The former name of :data:`~delivery_executor.writers.base.PROCESS_THREAD_ABOVE`."""


def _widen_pipe(stdin: asyncio.StreamWriter | None) -> None:
    # A pipe holds 64 KiB by default: a batch of 1 MiB messages then crossed
    # in hundreds of writes, each a wake-up of the other process. Linux lets
    # a pipe grow to /proc/sys/fs/pipe-max-size (1 MiB by default).
    pipe = stdin.get_extra_info("pipe") if stdin is not None else None
    if pipe is None or not hasattr(fcntl, "F_SETPIPE_SZ"):
        return
    with contextlib.suppress(OSError):
        fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_SIZE)


class _Helper:
    """One helper process, its reply reader and the batches it holds."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.proc: asyncio.subprocess.Process | None = None
        self.reader: asyncio.Task[None] | None = None
        self.waiting: dict[int, asyncio.Future[BatchResult]] = {}
        self.starting: asyncio.Lock | None = None
        self.restarts = 0
        self.batches = 0

    async def ensure(self) -> asyncio.subprocess.Process:
        """The running helper, started (again) if it is not."""
        if self.starting is None:
            self.starting = asyncio.Lock()
        async with self.starting:
            proc, reader = self.proc, self.reader
            if proc is not None and proc.returncode is None and reader and not reader.done():
                return proc
            if proc is not None:
                self.restarts += 1
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
            )
            _widen_pipe(self.proc.stdin)
            self.reader = asyncio.get_running_loop().create_task(
                self._read_replies(self.proc), name="delivery-helper-reader"
            )
            return self.proc

    async def send(self, batch: int, frame: list[bytes | memoryview]) -> BatchResult:
        proc = await self.ensure()
        fut: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
        self.waiting[batch] = fut
        self.batches += 1
        assert proc.stdin is not None
        try:
            proc.stdin.writelines(frame)
            await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as exc:
            self.waiting.pop(batch, None)
            raise BrokenPipeError(exc.errno, "the writer process is gone") from exc
        return await fut

    async def _read_replies(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        try:
            while True:
                head = await proc.stdout.readexactly(4)
                payload = await proc.stdout.readexactly(_U32.unpack(head)[0])
                batch, result = decode_reply(payload)
                fut = self.waiting.pop(batch, None)
                if fut is not None and not fut.done():
                    fut.set_result(result)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
            err = BrokenPipeError(errno.EPIPE, f"the writer process ended: {exc!r}")
            waiting, self.waiting = self.waiting, {}
            for fut in waiting.values():
                if not fut.done():
                    fut.set_exception(err)

    async def aclose(self) -> None:
        """Close the helper's input and wait for it to exit (it finishes its batch)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        if self.reader is not None:
            with contextlib.suppress(BaseException):
                await self.reader


class ProcessWriter:
    """A batch writer whose file work runs in helper processes (see the module doc).

    Use it as ``DeliveryExecutor(writer="process")`` or
    ``DeliveryExecutor(writer=ProcessWriter(sync))``. ``helpers`` processes
    (an interpreter's memory each) write batches side by side, each batch going to the one
    holding the fewest; started by :meth:`start` or at the first batch. Costs
    one copy of each batch through a pipe, and one pipe write and read on the
    loop per batch.
    """

    max_parts: int = MAX_PARTS
    """Parts one message may have; ``DeliveryExecutor.deliver`` refuses more."""
    stores_flags = True
    """Takes flagged groups (see :data:`~delivery_executor.writers.base.FlaggedGroup`)."""

    def __init__(
        self,
        sync: SyncMode = "auto",
        *,
        python: str | None = None,
        size_in_names: bool = True,
        helpers: int = 1,
        thread_above: int | None = PROCESS_THREAD_ABOVE,
        options: StoreOptions | None = None,
    ) -> None:
        opts = StoreOptions.of(options, sync, size_in_names=size_in_names)
        if opts.ops is not OS_OPS:
            raise ValueError(
                "ProcessWriter writes with the os module's calls: options.ops must be OS_OPS"
            )
        helpers = count("helpers", helpers)
        self.options = opts
        self.thread_above = check_thread_above(thread_above)
        self._threads = ThreadPool(4, "delivery-write")
        self.python = python or sys.executable
        names = [] if opts.size_in_names else ["--plain-names"]
        argv = [self.python, "-m", "delivery_executor.writers._helper", "--sync", opts.sync, *names]
        self._helpers = [_Helper(argv) for _ in range(helpers)]
        self._next = 0

    @property
    def sync(self) -> SyncMode:
        """The sync form (``options.sync``)."""
        return self.options.sync

    @property
    def size_in_names(self) -> bool:
        """Whether names carry ``,S=``/``,W=`` (``options.size_in_names``)."""
        return self.options.size_in_names

    def __repr__(self) -> str:
        pids = [h.proc.pid if h.proc is not None else None for h in self._helpers]
        waiting = sum(len(h.waiting) for h in self._helpers)
        return f"<ProcessWriter sync={self.sync!r} pids={pids} waiting={waiting}>"

    @property
    def restarts(self) -> int:
        """Helpers started again after one died."""
        return sum(h.restarts for h in self._helpers)

    @property
    def pids(self) -> list[int | None]:
        """The helpers' process ids (``None`` for one not running)."""
        return [h.proc.pid if h.proc is not None else None for h in self._helpers]

    async def start(self) -> None:
        """Start the helpers now and check that they answer; ``OSError`` if they cannot run.

        ``serve`` calls this at start-up, so that an interpreter the service
        user cannot run is reported there rather than as a ``451`` per message.
        """
        try:
            for helper in self._helpers:
                await asyncio.wait_for(helper.send(0, encode_request(0, [])), 30)
        except (OSError, TimeoutError) as exc:
            raise OSError(
                getattr(exc, "errno", None) or errno.ECHILD,
                f"the writer helper ({self.python} -m delivery_executor.writers._helper)"
                f" did not start: {exc}",
            ) from exc

    async def acommit(self, groups: Sequence[AnyGroup]) -> BatchResult:
        """Send the batch to the least busy helper and await its results.

        A batch of more than ``thread_above`` body bytes (counted as
        :func:`~delivery_executor.writers.base.goes_to_thread` does: a body
        shared by several copies once, as it crosses the pipe; ``None`` for
        never) is written in a thread of this process instead: big bodies are
        mostly syscalls that release the GIL, copying them through the pipe
        costs more than it saves, and big batches then reach the disk side by
        side rather than one after another behind one helper.
        """
        if goes_to_thread(groups, self.thread_above):
            whole = functools.partial(write_batch, options=self.options)
            return await self._threads.run(whole, groups)
        blobs, tail, widest = _index(groups)
        batch = (self._next + 1) & 0xFFFFFFFF
        frame = _frame(batch, blobs, tail, widest)  # ValueError before any state changes
        self._next = batch
        helper = min(self._helpers, key=lambda h: len(h.waiting))
        return await helper.send(batch, frame)

    async def aclose(self) -> None:
        """Close the helpers' input and wait for them to exit (each finishes its batch)."""
        await asyncio.gather(*(h.aclose() for h in self._helpers))
        self._threads.close()
