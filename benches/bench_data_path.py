"""The DATA path alone, on a fixed input, for an instruction count (not a timing).

N messages of about 1 MiB (76-byte lines and one stuffed line) go through
``DeliveryLMTP`` over an in-memory transport in 64 KiB reads: the bulk reader,
the handler's body preparation (``--line-endings``) and the store's
``,S=``/``,W=`` suffix, without disk or sockets. Run it under callgrind with
N and with 0 messages; the difference divided by N is the path's cost per
message::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python -m benches.bench_data_path 5 lf
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

from delivery_executor import MailboxResolver
from delivery_executor.smtp import DeliveryHandler
from delivery_executor.smtp.protocol import DeliveryLMTP
from delivery_executor.store.commit import check_message
from delivery_executor.store.names import size_suffix

_LINE = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod te\r\n"
BODY = b"Subject: x\r\n\r\n" + _LINE * (1048576 // len(_LINE)) + b"..dot line\r\n"


class _Store:
    """A deliverer that only computes what the store would put in the name."""

    takes_parts = True

    def __init__(self) -> None:
        self.suffixes: list[str] = []

    async def deliver(self, path: str, message: Any, /) -> object:
        self.suffixes.append(size_suffix(check_message(message)))
        return "id"


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False

    def write(self, data: Any) -> None:
        self.out += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name in ("peername", "sockname") else default


async def _spin(rounds: int) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


async def run(n: int, line_endings: Any) -> list[str]:
    """Send ``n`` messages through one session; return the suffixes the store computed."""
    store = _Store()
    with tempfile.TemporaryDirectory() as root:
        handler = DeliveryHandler(store, MailboxResolver(Path(root)), line_endings=line_endings)
        proto = DeliveryLMTP(handler, loop=asyncio.get_running_loop(), data_size_limit=64 << 20)
        transport = _Transport()
        proto.connection_made(transport)
        proto.data_received(b"LHLO x\r\n")
        stream = BODY + b".\r\n"
        for _ in range(n):
            proto.data_received(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
            await _spin(5)
            for i in range(0, len(stream), 65536):
                proto.data_received(stream[i : i + 65536])
                await _spin(1)
            await _spin(20)
        proto.data_received(b"QUIT\r\n")
        await _spin(5)
    if len(store.suffixes) != n:
        raise SystemExit(f"{len(store.suffixes)} of {n} delivered: {bytes(transport.out[-300:])!r}")
    return store.suffixes


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    mode = sys.argv[2] if len(sys.argv) > 2 else "lf"
    print(asyncio.run(run(count, mode))[:1])
