"""The hostile-load bench (benches/hostile.py) runs and reports every figure; not its speed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benches.hostile import main

pytestmark = pytest.mark.timeout(150)


def test_quick_run_reports_every_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--quick: every good message gets 250, every slow client is closed, RSS figures are there."""
    out = tmp_path / "hostile.json"
    assert main(["--quick", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    a, b = report["A"], report["B"]
    # A: every good message acknowledged, each one a delivery on the server's side.
    assert a["good_250"] == a["good_messages"] == 16
    assert a["good_other_codes"] == {}
    assert a["delivered"] == a["good_messages"]  # no slow client's message was delivered
    assert "--trusted-networks ''" in a["serve_args"]
    # The slow clients were still open while the good ones ran, and the server closed them all.
    assert a["slow_open_when_good_done"] == a["slow_clients"]
    assert a["slow_closed"] == a["slow_clients"]
    assert set(a["slow_replies"]) == {"421 4.4.2 Connection too slow, closing"}
    assert 0 < a["slow_closed_after_min_s"] <= a["slow_closed_after_max_s"]
    assert 0 < a["good_p50_ms"] <= a["good_max_ms"]
    # B: memory figures from /proc, a normal client served meanwhile.
    assert 0 < b["rss_before_mib"] <= b["rss_peak_mib"] <= b["hwm_mib"]
    assert b["rss_after_mib"] > 0
    assert b["normal_messages"] >= 1
    assert b["normal_250"] == b["normal_messages"]
    assert b["delivered"] == b["normal_messages"] + 1  # and the warm-up message
    assert 0 < b["normal_p50_ms"] <= b["normal_total_max_ms"]
    assert b["bytes_sent_per_client_max"] > 0
    assert b["waited_for_abort"] is False  # --quick does not wait out the 30 s stall
    text = capsys.readouterr().out
    for label in ("good messages answered 250", "server VmRSS before / peak / after", "421 4.4.2"):
        assert label in text
