"""``serve`` cleans ``tmp/`` leftovers: at first use of a Maildir, then once a day, off the loop."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from delivery_executor import Maildir
from delivery_executor.server import ServerConfig
from delivery_executor.server.core import serve
from delivery_executor.server.listeners import ListenSpec
from delivery_executor.server.metrics import DeliveryCollector, Snapshot, take_snapshot
from delivery_executor.server.signals import Running
from delivery_executor.server.tmp_cleanup import CLEAN_INTERVAL, TmpCleaner
from delivery_executor.store import names

pytestmark = pytest.mark.timeout(60)

HOUR = 3600.0
BODY = b"Subject: s\r\n\r\nbody\r\n.\r\n"


def _leftovers(md: Maildir) -> dict[str, Path]:
    """Four tmp/ files: ours and another host's, 40 h old and 1 h old."""
    tmp = md.path / "tmp"
    files = {
        "old-mine": tmp / (names.unique_name() + ",S=1,W=1"),
        "old-theirs": tmp / "1795000000.M1P42Q7.mx-b.example.org,S=1,W=1",
        "new-mine": tmp / (names.unique_name() + ",S=1,W=1"),
        "new-theirs": tmp / "1795000000.M2P42Q8.mx-b.example.org,S=1,W=1",
    }
    now = time.time()
    for key, f in files.items():
        f.write_bytes(b"partial")
        age = (40 if key.startswith("old") else 1) * HOUR
        os.utime(f, (now - age, now - age))
    return files


async def _deliver(port: int, rcpt: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        replies = []
        for line in (
            None, b"LHLO c\r\n", b"MAIL FROM:<s@x.org>\r\n",
            f"RCPT TO:<{rcpt}>\r\n".encode(), b"DATA\r\n", BODY, b"QUIT\r\n",
        ):  # fmt: skip
            if line is not None:
                writer.write(line)
            while (raw := await reader.readline())[3:4] == b"-":
                pass
            replies.append(raw.decode().rstrip())
        return replies[5]
    finally:
        writer.close()


@pytest.mark.asyncio
async def test_serve_removes_stale_tmp_files_at_first_delivery_and_counts_them(
    tmp_path: Path,
) -> None:
    """Old tmp/ files (40 h, any host) go at the first delivery, 1 h old ones stay; counted."""
    md = Maildir.create(tmp_path / "example.org" / "alice")
    files = _leftovers(md)
    config = ServerConfig(
        root=tmp_path, listen=[ListenSpec.parse("127.0.0.1:0")], writer="loop", hostname="mx.t"
    )
    stop = asyncio.Event()
    ready: asyncio.Future[Running] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(config, stop, on_ready=ready.set_result))
    try:
        running = await asyncio.wait_for(asyncio.shield(ready), 20)
        port = running.listeners[0].sock.getsockname()[1]
        handler = running.sessions.handler
        cleaner = getattr(handler, "watcher", None)
        assert isinstance(cleaner, TmpCleaner)
        assert (await _deliver(port, "alice@example.org")).startswith("250")
        await asyncio.to_thread(cleaner.wait, 10)
        left = sorted(p.name for p in (md.path / "tmp").iterdir())
        assert left == sorted([files["new-mine"].name, files["new-theirs"].name])
        assert len(md.scan_new()) == 1
        assert take_snapshot(running.executor, handler, running.sessions).tmp_cleaned == 2
        # Within the day: a new leftover is not looked for again.
        late = md.path / "tmp" / "1795000000.M3P42Q9.mx-b.example.org"
        late.write_bytes(b"x")
        os.utime(late, (time.time() - 40 * HOUR,) * 2)
        assert (await _deliver(port, "alice@example.org")).startswith("250")
        await asyncio.to_thread(cleaner.wait, 10)
        assert late.exists()
        assert take_snapshot(running.executor, handler, running.sessions).tmp_cleaned == 2
    finally:
        stop.set()
    await asyncio.wait_for(task, 20)


def test_cleaner_runs_once_per_interval_per_maildir_in_its_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """note() queues a Maildir once, again only after the interval; never scans on the caller."""
    now = [1000.0]
    cleaner = TmpCleaner(clock=lambda: now[0])
    a = Maildir.create(tmp_path / "a")
    b = Maildir.create(tmp_path / "b")
    threads: list[tuple[str, int]] = []
    real = Maildir.cleanup_tmp

    def spy(self: Maildir, *args: object, **kw: object) -> int:
        threads.append((self.path.name, threading.get_ident()))
        return real(self, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Maildir, "cleanup_tmp", spy)
    try:
        for _ in range(3):
            cleaner.note(str(a.path))
            cleaner.note(str(b.path))
        cleaner.note(str(tmp_path / "missing"))  # not a Maildir yet: nothing to do, no error
        cleaner.wait(10)
        assert sorted(name for name, _ in threads) == ["a", "b"]
        now[0] += CLEAN_INTERVAL - 1
        cleaner.note(str(a.path))
        cleaner.wait(10)
        assert len(threads) == 2
        now[0] += 1
        cleaner.note(str(a.path))
        cleaner.wait(10)
        assert [name for name, _ in threads].count("a") == 2
        assert threading.get_ident() not in {t for _, t in threads}
    finally:
        cleaner.close()
    assert cleaner.removed == 0
    with pytest.raises(ValueError, match="interval"):
        TmpCleaner(interval=0)


def test_the_counter_is_exported_as_tmp_cleaned_total() -> None:
    """The Prometheus output has delivery_executor_tmp_cleaned_total, summed over processes."""
    collector = DeliveryCollector(
        lambda: [(Snapshot(pid=1, tmp_cleaned=3), True), (Snapshot(pid=2, tmp_cleaned=4), False)],
        {"version": "x"},
    )
    values = {s.name: s.value for metric in collector.collect() for s in metric.samples}
    assert values["delivery_executor_tmp_cleaned_total"] == 7
    assert Snapshot.from_json(Snapshot(tmp_cleaned=5).to_json()).tmp_cleaned == 5
