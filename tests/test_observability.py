"""Watching ``serve`` run: Prometheus metrics (one process and several), per-copy log lines
in text and JSON, and no message data in the log at any level."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from delivery_executor import DeliveryExecutor, Maildir
from delivery_executor.server.metrics import BATCH_BOUNDS, DeliveryCollector, Snapshot, _bucketize
from delivery_executor.stats import Buckets, HistogramCounts
from delivery_executor.testing import ServerProcess, free_port, send_message

pytestmark = pytest.mark.timeout(120)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
_SUMMARY = re.compile(r"summary: delivered (\d+), failed (\d+), batches (\d+)")


def parse(text: str) -> Samples:
    """Prometheus text → {(sample name, sorted labels): value}."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        return parse(resp.read().decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(f"delivery_executor_{name}", tuple(sorted(labels.items())))]


def body(token: str, msgid: str | None = None) -> bytes:
    head = f"Message-ID: {msgid}\r\n" if msgid else ""
    return f"{head}Subject: {token}\r\n\r\nline one\r\nline two\r\n".encode()


async def send(port: int, rcpts: list[str], data: bytes) -> list[int]:
    replies = await send_message(
        "127.0.0.1", port, mail_from="s@example.net", rcpts=rcpts, body=data
    )
    return [r.code for r in replies]


def summaries(srv: ServerProcess) -> list[tuple[int, int, int]]:
    return [
        (int(m.group(1)), int(m.group(2)), int(m.group(3)))
        for line in srv.lines
        if (m := _SUMMARY.search(line))
    ]


# -- metrics -----------------------------------------------------------------


def test_metrics_count_deliveries_rejections_batches_and_connections(tmp_path: Path) -> None:
    """One process: counters, histograms, gauges and the info metric match what happened."""
    mport = free_port()
    with ServerProcess(tmp_path / "mail", "--metrics", f"127.0.0.1:{mport}") as srv:

        async def run() -> Samples:
            for i in range(3):
                codes = await send(srv.port, ["a@example.org", "../x@example.org", "b@x.org"],
                                   body(f"m{i}"))  # fmt: skip
                assert codes == [250, 553, 250]
            _, idle = await asyncio.open_connection("127.0.0.1", srv.port)
            try:
                for _ in range(50):  # the session is counted once it is set up
                    samples = await asyncio.to_thread(scrape, mport)
                    if value(samples, "connections") == 1:
                        return samples
                    await asyncio.sleep(0.1)
                raise AssertionError("the open connection was never counted")
            finally:
                idle.close()

        samples = asyncio.run(run())
        assert srv.stop() == 0
    ((delivered, failed, batches),) = summaries(srv)
    assert (delivered, failed) == (6, 0)
    assert value(samples, "delivered_total") == 6
    assert value(samples, "failed_total") == 0
    assert value(samples, "rcpt_rejected_total") == 3
    assert value(samples, "batch_size_count") == batches
    assert value(samples, "batch_size_sum") == 6
    assert value(samples, "flush_seconds_count") == batches
    assert value(samples, "delivery_seconds_count") == 6
    assert value(samples, "batch_size_bucket", le="+Inf") == batches
    assert value(samples, "delivery_seconds_bucket", le="+Inf") == 6
    assert value(samples, "queue_depth") == 0
    assert value(samples, "queued_bytes") == 0
    ((_, labels),) = [k for k in samples if k[0] == "delivery_executor_info"]
    info = dict(labels)
    assert info["line_endings"] == "lf"
    assert info["size_in_names"] == "true"
    assert info["protocol"] == "lmtp"
    assert info["version"]


def test_metrics_add_up_across_two_workers(tmp_path: Path) -> None:
    """--workers 2: the parent's endpoint sums both workers' counters and live gauges."""
    mport = free_port()
    with ServerProcess(tmp_path / "mail", "--metrics", f"127.0.0.1:{mport}", workers=2) as srv:

        async def run() -> Samples:
            sem = asyncio.Semaphore(8)

            async def one(i: int) -> list[int]:
                async with sem:
                    return await send(srv.port, [f"u{i % 5}@example.org"], body(f"w{i}"))

            codes = await asyncio.gather(*(one(i) for i in range(40)))
            assert all(c == [250] for c in codes)
            idle = [(await asyncio.open_connection("127.0.0.1", srv.port))[1] for _ in range(6)]
            try:
                for _ in range(100):  # workers report once a second
                    samples = await asyncio.to_thread(scrape, mport)
                    if (value(samples, "delivered_total"), value(samples, "connections")) == (
                        40,
                        6,
                    ):
                        return samples
                    await asyncio.sleep(0.1)
                raise AssertionError(f"sums never reached 40 and 6: {samples}")
            finally:
                for w in idle:
                    w.close()

        samples = asyncio.run(run())
        assert srv.stop() == 0
    per_worker = summaries(srv)
    assert len(per_worker) == 2
    assert all(d > 0 for d, _, _ in per_worker), per_worker  # both really took mail
    assert value(samples, "delivered_total") == sum(d for d, _, _ in per_worker) == 40
    assert value(samples, "batch_size_sum") == 40
    assert value(samples, "delivery_seconds_count") == 40
    assert value(samples, "batch_size_count") == sum(b for _, _, b in per_worker)
    assert value(samples, "workers") == 2
    assert dict(next(k for k in samples if k[0] == "delivery_executor_info")[1])["workers"] == "2"


def test_metrics_without_prometheus_client_is_a_clear_error(tmp_path: Path) -> None:
    """--metrics without prometheus_client: exit 1 and one line naming the extra to install."""
    blocker = tmp_path / "blocker" / "prometheus_client"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    env = {**os.environ, "PYTHONPATH": str(blocker.parent)}
    for workers in ("1", "2"):
        res = subprocess.run(
            [sys.executable, "-m", "delivery_executor", "serve", "--root", str(tmp_path / "m"),
             "--listen", f"127.0.0.1:{free_port()}", "--workers", workers,
             "--metrics", "127.0.0.1:0"],
            capture_output=True, text=True, timeout=60, env=env,
        )  # fmt: skip
        assert res.returncode == 2, res.stderr  # a start-up error, like a bad option
        assert "pip install '/path/to/checkout[metrics]'" in res.stderr  # not on an index
        assert "'.[metrics]'" in res.stderr
        assert "Traceback" not in res.stderr


def test_metrics_address_must_be_host_port(tmp_path: Path) -> None:
    """A malformed --metrics value exits 2 naming the value."""
    res = subprocess.run(
        [sys.executable, "-m", "delivery_executor", "serve", "--metrics", "9100"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert res.returncode == 2
    assert "expected HOST:PORT, got '9100'" in res.stderr


def test_collector_sums_counters_over_all_and_gauges_over_live() -> None:
    """Counters and histograms of exited workers still count; their gauges do not."""
    hist = Buckets((0.1, 1.0))
    hist.observe(0.05)
    a = Snapshot(pid=1, delivered=5, connections=3, batch_size=_bucketize({1: 2, 3: 1}),
                 delivery_seconds=hist.snapshot())  # fmt: skip
    b = Snapshot(pid=2, delivered=7, connections=4, batch_size=_bucketize({2: 1}),
                 delivery_seconds=hist.snapshot())  # fmt: skip
    assert Snapshot.from_json(a.to_json()) == a
    collector = DeliveryCollector(lambda: [(a, True), (b, False)], {"version": "t"})
    samples: Samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in collector.collect()
        for s in family.samples
    }
    assert value(samples, "delivered_total") == 12
    assert value(samples, "connections") == 3
    assert value(samples, "workers") == 1
    assert value(samples, "batch_size_count") == 4
    assert value(samples, "batch_size_sum") == 7
    assert value(samples, "batch_size_bucket", le="1.0") == 2
    assert value(samples, "batch_size_bucket", le="2.0") == 3
    assert value(samples, "delivery_seconds_bucket", le="0.1") == 2
    assert value(samples, "delivery_seconds_sum") == pytest.approx(0.1)


def test_bucketize_and_buckets_put_bounds_in_their_own_bucket() -> None:
    """A value equal to a bound counts in that bucket (Prometheus' le), above all in +Inf."""
    h = _bucketize({1: 1, 2: 1, 3: 1, 5000: 2})
    assert h.counts[:3] == (1, 1, 1) and h.counts[-1] == 2
    assert h.bounds == BATCH_BOUNDS and h.sum == 10006
    b = Buckets((1.0, 2.0))
    for v in (0.5, 1.0, 1.5, 3.0):
        b.observe(v)
    assert b.snapshot() == HistogramCounts((1.0, 2.0), (2, 1, 1), 6.0)


@pytest.mark.asyncio
async def test_executor_records_every_flush_in_its_histogram(tmp_path: Path) -> None:
    """ExecutorStats.flush_seconds counts each batch write once, since start."""
    async with DeliveryExecutor(writer="loop") as ex:
        await asyncio.gather(*(ex.deliver(tmp_path / f"m{i % 3}", b"x\r\n") for i in range(20)))
        stats = ex.stats()
    assert stats.flush_seconds.count == stats.batches > 0
    assert stats.flush_seconds.sum > 0


# -- logs -----------------------------------------------------------------------

_TEXT_LINE = re.compile(
    r"INFO delivery_executor\.delivery: msgid=(\S+) from=<([^>]*)> to=<([^>]*)>"
    r" size=(\d+) saved as (\S+) \((\d+\.\d) ms\)$"
)


def stored(root: Path) -> dict[str, bytes]:
    """Every file in every new/ under ``root``: name → bytes."""
    return {p.name: p.read_bytes() for p in root.rglob("new/*")}


def test_one_log_line_per_copy_like_dovecot(tmp_path: Path) -> None:
    """Each delivered copy logs msgid, from, to, size and name; they match the file."""
    with ServerProcess(tmp_path / "mail") as srv:
        codes = asyncio.run(send(srv.port, ["a@example.org", "../x@example.org", "b@example.org"],
                                 body("logged", "<id.1@example.net>")))  # fmt: skip
        assert codes == [250, 553, 250]
        assert asyncio.run(send(srv.port, ["c@example.org"], body("no id"))) == [250]
        assert srv.stop() == 0
    files = stored(tmp_path / "mail")
    found = [m for line in srv.lines if (m := _TEXT_LINE.search(line))]
    assert [(m[1], m[2], m[3]) for m in found] == [
        ("<id.1@example.net>", "s@example.net", "a@example.org"),
        ("<id.1@example.net>", "s@example.net", "b@example.org"),
        ("unspecified", "s@example.net", "c@example.org"),
    ]
    assert sorted(m[5] for m in found) == sorted(files)
    for m in found:
        assert int(m[4]) == len(files[m[5]])


def test_json_log_lines_carry_the_fields(tmp_path: Path) -> None:
    """--log-format json: every log line is a JSON object; deliveries have their fields."""
    with ServerProcess(tmp_path / "mail", "--log-format", "json") as srv:
        assert asyncio.run(send(srv.port, ["a@example.org"], body("j", "<j@x>"))) == [250]
        assert srv.stop() == 0
    records = [json.loads(line) for line in srv.lines if line.startswith("{")]
    ours = [line for line in srv.lines if not line.startswith("{")]
    assert all(re.match(r"(listening on|summary:)", line) for line in ours), ours
    (rec,) = [r for r in records if r["logger"] == "delivery_executor.delivery"]
    (name, data), *_ = stored(tmp_path / "mail").items()
    assert rec["level"] == "INFO"
    assert (rec["msgid"], rec["from"], rec["to"], rec["name"]) == (
        "<j@x>", "s@example.net", "a@example.org", name,
    )  # fmt: skip
    assert rec["size"] == len(data)
    assert isinstance(rec["ms"], float)
    assert rec["message"].startswith("msgid=<j@x> from=<s@example.net> to=<a@example.org>")
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d{4}$", rec["time"])


def test_debug_log_never_contains_message_data(tmp_path: Path) -> None:
    """--log-level debug logs aiosmtpd's debug lines but no body text, even misplaced ones."""
    marker = "Zq7mark" + os.urandom(4).hex()
    secret = "c2VjcmV0" + os.urandom(4).hex()
    with ServerProcess(tmp_path / "mail", "--log-level", "debug") as srv:

        async def run() -> None:
            data = f"Subject: {marker}\r\n\r\n{marker} first\r\n.{marker}\r\nend\r\n".encode()
            assert await send(srv.port, ["a@example.org"], data) == [250]
            # A client that does not wait for 354: its DATA is refused (no recipient),
            # so its body is read as commands.
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            writer.write(
                f"LHLO c\r\nAUTH PLAIN {secret}\r\nMAIL FROM:<s@x.org>\r\n"
                f"RCPT TO:<../x@example.org>\r\nDATA\r\n{marker} as a command\r\n"
                f"Subject: {marker}\r\n.\r\nQUIT\r\n".encode()
            )
            while await asyncio.wait_for(reader.readline(), 10):
                pass  # until the server closes after QUIT
            writer.close()

        asyncio.run(run())
        assert srv.stop() == 0
    log = "\n".join(srv.lines)
    assert marker not in log
    assert secret not in log
    assert " DEBUG mail.log: " in log  # debug logging really was on
    assert "bytes not logged" in log


def test_bad_log_level_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """An unknown --log-level exits 2 with one line, no traceback."""
    res = subprocess.run(
        [sys.executable, "-m", "delivery_executor", "serve", "--root", str(tmp_path),
         "--log-level", "chatty"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert res.returncode == 2
    (line,) = res.stderr.strip().splitlines()
    assert "--log-level" in line and "'chatty'" in line


def test_size_names_and_line_endings_flags(tmp_path: Path) -> None:
    """--no-size-names --line-endings crlf store plain names and CRLF; a bad combo exits 2."""
    with ServerProcess(tmp_path / "mail", "--no-size-names", "--line-endings", "crlf") as srv:
        assert asyncio.run(send(srv.port, ["a@example.org"], body("crlf"))) == [250]
        assert srv.stop() == 0
    ((name, data),) = stored(tmp_path / "mail").items()
    assert ",S=" not in name
    assert data.endswith(b"Subject: crlf\r\n\r\nline one\r\nline two\r\n")
    assert Maildir.open(tmp_path / "mail" / "example.org" / "a").scan_new()
    res = subprocess.run(
        [sys.executable, "-m", "delivery_executor", "serve", "--detail-to-folder"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert res.returncode == 2
    assert "--detail-to-folder needs --recipient-delimiter" in res.stderr
