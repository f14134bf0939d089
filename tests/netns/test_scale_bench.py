"""`weft bench scale`, tiny: two real agents among 50 fake leases on SQLite. Its JSON has
every figure, each sane (not timed: the values only have to be possible), and the run
leaves no namespace behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import namespaces_left_by
from weft_lab.testbed import list_netns

pytestmark = pytest.mark.netns


def test_tiny_scale_bench_reports_every_figure(tmp_path: Path) -> None:
    before = set(list_netns())
    out = tmp_path / "scale.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "weft", "bench", "scale", "--leases", "50", "--agents", "2",
         "--stores", "sqlite", "--events", "4", "--storm", "0", "--json", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "event → kernel" in stdout  # the table
    report = json.loads(out.read_text())
    assert (report["leases"], report["agents"]) == (50, 2)
    r = report["stores"]["sqlite"]
    for spread in (r["join_s"], r["event_to_kernel_ms"], r["rss_mb"]):
        assert 0 < spread["min"] <= spread["median"] <= spread["max"]
    assert len(r["event_to_kernel_ms"]["per_agent_max"]) == 2
    assert r["events"] == 4
    assert set(r["cpu_s_per_event_per_agent"]) == {"min", "median", "max"}
    assert r["rss_mb"]["max"] < 1000
    rr = r["renewal_round"]
    assert rr["renewals"] == 52  # 50 fakes and the two the events added
    # Renewals with unchanged data: the agents reconcile nothing (the store is SQLite, the
    # writer runs a handful of statements per renewal).
    assert rr["reconciles"] == 0, rr["reconcile_reasons"]
    assert 1 <= rr["store_requests_per_renewal"] < 20
    probes = r["probes"]  # 51 peers that never answer, each probed every 2 s: ~51 packets/s
    assert probes["peers"] == 51
    assert 0 < probes["packets_per_s_per_agent"]["max"] <= probes["max_packets_per_second"]
    assert set(probes["cpu_s_per_s_per_agent"]) == {"min", "median", "max"}
    assert "storm" not in report
    assert not namespaces_left_by(before, proc.pid)  # other engineers' runs may come and go
