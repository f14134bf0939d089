"""weft bench: the arithmetic, qperf's output, and the outputs (one real short bench is in
tests/netns/test_bench.py: it needs namespaces)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from helpers import chart_bars, weft
from weft.core.errors import UsageError
from weft_lab.bench.qperf import parse_qperf
from weft_lab.bench.report import render_table, write_chart, write_json
from weft_lab.bench.stats import (
    NATIVE,
    BenchError,
    BenchReport,
    Run,
    Skipped,
    Spread,
    parse_rate,
    pct,
    schedule,
    summarise,
    tbf_args,
    ticks_delta,
)

# --- schedule ---------------------------------------------------------------------------


def test_schedule_interleaves_native_before_every_backend_run_in_rounds() -> None:
    slots = [(s.round, s.name) for s in schedule(["vxlan", "host-gw"], 2)]
    assert slots == [(0, "native"), (0, "vxlan"), (0, "native"), (0, "host-gw"),
                     (1, "native"), (1, "vxlan"), (1, "native"), (1, "host-gw")]


def test_schedule_with_no_backends_still_measures_native() -> None:
    assert [(s.round, s.name) for s in schedule([], 3)] == [(0, NATIVE), (1, NATIVE), (2, NATIVE)]


@given(st.lists(st.sampled_from(["vxlan", "host-gw", "udp", "wireguard"]), unique=True,
                min_size=1), st.integers(1, 6))
def test_schedule_pairs_every_backend_run_with_the_native_run_just_before(
        backends: list[str], reps: int) -> None:
    slots = schedule(backends, reps)
    assert len(slots) == 2 * len(backends) * reps
    for i, slot in enumerate(slots):
        if slot.name != NATIVE:
            assert slots[i - 1].name == NATIVE
            assert slots[i - 1].round == slot.round
    for name in backends:  # every backend once per round, rounds in order
        assert [s.round for s in slots if s.name == name] == list(range(reps))


@pytest.mark.parametrize(("backends", "reps", "message"), [
    (["vxlan"], 0, "--reps 0"),
    (["native"], 1, "native is always measured"),
])
def test_schedule_rejects_bad_input(backends: list[str], reps: int, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        schedule(backends, reps)


# --- figures ------------------------------------------------------------------------------


def run(round_: int, bw: float, lat: float, cpu: float = 1.0, secs: float = 2.0) -> Run:
    return Run(round_, bw, lat, cpu, secs)


def test_percentages_are_against_the_native_medians_of_the_same_run() -> None:
    report = summarise("1gbit", 2, 3, {
        "native": [run(0, 100, 10), run(0, 120, 30), run(1, 110, 20), run(1, 90, 25),
                   run(2, 105, 15)],
        "vxlan": [run(0, 95, 13), run(1, 104.5, 11.5), run(2, 10, 100)],
    })
    native, vxlan = report.results
    assert native.name == "native"
    assert (native.bw.median, native.bw.min, native.bw.max) == (105, 90, 120)
    assert (native.lat.median, native.lat.min, native.lat.max) == (20, 10, 30)
    assert (native.bw_pct, native.lat_pct) == (100, 100)
    assert vxlan.bw == Spread(95, 10, 104.5)
    assert vxlan.bw_pct == pytest.approx(100 * 95 / 105)
    assert vxlan.lat_pct == pytest.approx(100 * 13 / 20)


def test_cpu_per_gb_is_cpu_seconds_over_the_bytes_the_bw_test_moved() -> None:
    r = run(0, bw=500, lat=10, cpu=3.0, secs=4)  # 500 MB/s for 4 s = 2 GB
    assert r.gb_moved == 2.0
    assert r.cpu_s_per_GB == 1.5
    report = summarise(None, 4, 3, {"native": [r, run(1, 1000, 10, 1.0, 4), run(2, 250, 10, 3.0, 4)]})
    assert report.results[0].cpu_s_per_GB == 1.5  # median of 1.5, 0.25, 3.0


@pytest.mark.parametrize(("field", "value"), [("bw", 0.0), ("lat", -1.0), ("cpu", 0.0), ("bw", math.nan)])
def test_a_figure_that_is_not_positive_is_an_error_not_a_result(field: str, value: float) -> None:
    args = {"bw": 100.0, "lat": 10.0, "cpu": 1.0} | {field: value}
    with pytest.raises(BenchError, match="positive"):
        Run(0, args["bw"], args["lat"], args["cpu"], 1.0)


def test_no_native_runs_is_an_error() -> None:
    with pytest.raises(BenchError, match="no native runs"):
        summarise(None, 1, 1, {"vxlan": [run(0, 1, 1)]})


@given(st.lists(st.floats(0.001, 1e6), min_size=1, max_size=30))
def test_spread_brackets_its_median(values: list[float]) -> None:
    s = Spread.of(values)
    assert s.min <= s.median <= s.max
    assert (s.min, s.max) == (min(values), max(values))


@given(st.floats(0.001, 1e6), st.floats(0.001, 1e6))
def test_pct_of_itself_is_100_and_scales_linearly(value: float, reference: float) -> None:
    assert pct(reference, reference) == pytest.approx(100)
    assert pct(value, reference) * reference == pytest.approx(100 * value)


def test_ticks_delta_counts_new_processes_whole_and_survives_pid_reuse() -> None:
    before = {1: 100, 2: 50, 3: 70}
    after = {1: 130, 2: 5, 4: 9}  # 2 was reused by a new process, 3 exited, 4 is new
    assert ticks_delta(before, after) == 30 + 5 + 9


# --- rates and shaping --------------------------------------------------------------------


@pytest.mark.parametrize(("text", "bits"), [("1gbit", 10**9), ("500mbit", 5 * 10**8),
                                            ("2.5Gbit", 25 * 10**8), ("100000kbit", 10**8)])
def test_parse_rate(text: str, bits: int) -> None:
    assert parse_rate(text) == bits


@pytest.mark.parametrize("text", ["1gbps", "fast", "1 gbit", "", "10bit", "-1gbit"])
def test_parse_rate_rejects_what_tc_would_misread(text: str) -> None:
    with pytest.raises(UsageError, match="--rate"):
        parse_rate(text)


def test_tbf_bucket_holds_two_gso_packets_at_1gbit_and_1ms_above() -> None:
    assert tbf_args(10**9) == ["tbf", "rate", "1000000000bit", "burst", "131072",
                               "latency", "10ms"]
    assert tbf_args(40 * 10**9)[4] == str(5_000_000)  # 1 ms at 40 Gbit/s


# --- qperf's output -----------------------------------------------------------------------

QPERF_UU = "tcp_bw:\n    bw  =  2218786816 bytes/sec\ntcp_lat:\n    latency  =  6867 ns\n"
QPERF_DEFAULT = "tcp_bw:\n    bw  =  2.35 GB/sec\ntcp_lat:\n    latency  =  6.61 us\n"
QPERF_VERBOSE = """tcp_bw:
    bw              =  117 MB/sec
    msg_rate        =  27.9 K/sec
    time            =     1 sec
    send_cost       =  1.08 sec/GB
tcp_lat:
    latency        =  0.372 ms
    msg_rate       =   146 K/sec
"""


@pytest.mark.parametrize(("text", "bw", "lat"), [
    (QPERF_UU, 2218.786816, 6.867),
    (QPERF_DEFAULT, 2350.0, 6.61),
    (QPERF_VERBOSE, 117.0, 372.0),
    ("tcp_bw:\n    bw  =  928 Mb/sec\n", 116.0, None),
    ("tcp_lat:\n    latency  =  1.5 sec\n", None, 1.5e6),
    ("tcp_bw:\n198.19.1.2: failed to connect\n", None, None),
])
def test_parse_qperf_units(text: str, bw: float | None, lat: float | None) -> None:
    figures = parse_qperf(text)
    assert figures.bw_MBps == (pytest.approx(bw) if bw is not None else None)
    assert figures.lat_us == (pytest.approx(lat) if lat is not None else None)


@pytest.mark.parametrize(("text", "message"), [
    ("tcp_bw:\n    bw  =  3 furlongs/sec\n", "unit I do not know"),
    ("tcp_lat:\n    latency  =  4 fortnights\n", "unit I do not know"),
    ("tcp_bw:\n    bw  =  0 bytes/sec\n", "measured nothing"),
])
def test_parse_qperf_rejects_what_it_cannot_trust(text: str, message: str) -> None:
    with pytest.raises(BenchError, match=message):
        parse_qperf(text)


# --- outputs ------------------------------------------------------------------------------


def sample_report() -> BenchReport:
    return summarise("1gbit", 2, 2, {
        "native": [run(0, 116, 91.8), run(1, 118, 90)],
        "vxlan": [run(0, 112, 129), run(1, 111, 120)],
    }, [Skipped("wireguard", "no kernel module and no wireguard-go")])


def test_json_has_the_issue_shape(tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    write_json(sample_report(), str(path))
    data = json.loads(path.read_text())
    assert set(data) == {"rate", "secs", "reps", "attach", "results", "skipped"}
    assert (data["rate"], data["secs"], data["reps"]) == ("1gbit", 2, 2)
    for result in data["results"]:
        assert set(result) == {"name", "bw_MBps", "lat_us", "bw_pct", "lat_pct",
                               "cpu_s_per_GB", "runs"}
        assert set(result["bw_MBps"]) == set(result["lat_us"]) == {"median", "min", "max"}
        assert len(result["runs"]) == 2
    assert data["skipped"] == [{"name": "wireguard", "reason": "no kernel module and no wireguard-go"}]


def test_table_has_the_seed_columns_and_lists_skipped() -> None:
    console = Console(record=True, width=200)
    render_table(sample_report(), console)
    text = console.export_text()
    for col in ("Name", "TCP BW (MB/s)", "TCP Lat (µs)", "BW %", "Lat %", "CPU s/GB"):
        assert col in text
    assert "117 (116–118)" in text  # median (min–max)
    assert "skipped wireguard: no kernel module" in text


def test_chart_has_a_pair_of_bars_per_backend(tmp_path: Path) -> None:
    path = tmp_path / "bench.png"
    report = summarise("1gbit", 2, 1, {
        "native": [run(0, 116, 91.8)], "vxlan": [run(0, 112, 129)],
        "host-gw": [run(0, 114, 100)], "udp": [run(0, 60, 200)],
    }, [])
    write_chart(report, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # 120 dpi; 1.6 in per backend + 2 in wide (4 in at least), 4.2 in high.
    assert chart_bars(str(path)) == {"size": (816, 504), "bw_bars": 3, "lat_bars": 3}
    write_chart(sample_report(), str(path))  # one backend
    assert chart_bars(str(path)) == {"size": (480, 504), "bw_bars": 1, "lat_bars": 1}


def test_bad_cli_arguments_fail_before_building_anything() -> None:
    proc = weft("bench", "--rate", "1gbps", "--backends", "vxlan")
    assert proc.returncode == 1
    assert "--rate '1gbps'" in proc.stderr
    proc = weft("bench", "--backends", "vxlan,vxlan")
    assert proc.returncode == 1
    assert "vxlan listed twice" in proc.stderr
    proc = weft("bench", "--backends", "vxlan", "--attach", "macvlan")
    assert proc.returncode == 1
    assert "--attach 'macvlan'" in proc.stderr
