"""weft bench: the arithmetic, qperf's output, the outputs, and one real short bench."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import chart_bars, namespaces_left_by, requires
from weft_lab.bench.cpu import CLK_TCK, CpuMeter
from weft_lab.bench.qperf import qperf_server, run_qperf
from weft_lab.bench.stats import (
    BenchError,
)
from weft_lab.testbed import RUNS_DIR, list_netns


@pytest.mark.netns
def test_short_real_bench_measures_every_figure_and_leaves_nothing(tmp_path: Path) -> None:
    before = set(list_netns())
    out, chart = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = subprocess.Popen(
        [sys.executable, "-m", "weft", "bench", "--backends",
         "flannel-vxlan,vxlan,flannel-host-gw,host-gw,udp-minimal,nosuch",
         "--rate", "1gbit", "--secs", "1", "--reps", "1", "--json", str(out),
         "--chart", str(chart), "--attach", "ptp"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr
    data = json.loads(out.read_text())
    assert (data["rate"], data["secs"], data["reps"], data["attach"]) == ("1gbit", 1, 1, "ptp")
    assert [r["name"] for r in data["results"]] == [
        "native", "flannel-vxlan", "vxlan", "flannel-host-gw", "host-gw", "udp-minimal"]
    assert [s["name"] for s in data["skipped"]] == ["nosuch"]
    assert "registry" in data["skipped"][0]["reason"]
    for result in data["results"]:
        runs = result["runs"]
        # native before each other row
        assert len(runs) == (len(data["results"]) - 1 if result["name"] == "native" else 1)
        for figure in ("bw_MBps", "lat_us", "cpu_s", "cpu_s_per_GB"):
            assert all(isinstance(r[figure], float) and r[figure] > 0 for r in runs), result
        assert result["bw_MBps"]["median"] == pytest.approx(
            statistics.median(r["bw_MBps"] for r in runs), rel=1e-3)
        assert result["bw_pct"] > 0
        assert result["lat_pct"] > 0
        # Shaped to 1 Gbit/s = 125 MB/s on the wire: payload cannot exceed it.
        assert all(r["bw_MBps"] < 126 for r in runs), result
    assert data["results"][0]["bw_pct"] == data["results"][0]["lat_pct"] == 100
    assert "TCP BW (MB/s)" in stdout
    assert "skipped nosuch" in stdout
    # a bar pair per row but native
    assert chart_bars(str(chart))["bw_bars"] == chart_bars(str(chart))["lat_bars"] == 5
    assert namespaces_left_by(before, proc.pid) == []


@pytest.mark.netns
def test_short_ipv6_bench_measures_each_row_over_ipv6_beside_ipv4(tmp_path: Path) -> None:
    """`--ipv6`: native, the hand-built kernel path and the backend each measured over IPv6
    too, in the same run, qperf aimed at the far end's IPv6 address (the progress names
    it); the reference's IPv6 half is its own kernel path (routes via the IPv6 underlay)."""
    import ipaddress
    import re

    before = set(list_netns())
    out = tmp_path / "bench.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "weft", "bench", "--backends", "kernel-routes,host-gw",
         "--ipv6", "--rate", "1gbit", "--secs", "1", "--reps", "1", "--json", str(out),
         "--attach", "ptp"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["results"]] == [
        "native", "native/ipv6", "kernel-routes", "kernel-routes/ipv6", "host-gw",
        "host-gw/ipv6"]
    assert data["skipped"] == []
    for result in data["results"]:
        assert all(r["bw_MBps"] > 0 and r["lat_us"] > 0 for r in result["runs"]), result
    servers = dict(re.findall(r"^\s*(\S+) ready: .* -> (\S+) in ", stderr, re.MULTILINE))
    for name, server in servers.items():
        assert ipaddress.ip_address(server).version == (6 if name.endswith("/ipv6") else 4)
    assert set(servers) == {r["name"] for r in data["results"]}
    assert namespaces_left_by(before, proc.pid) == []


# --- the edges, on real processes ---------------------------------------------------------


def _qperf_pids(netns: str) -> list[str]:
    pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True,
                          check=True).stdout.split()
    return [p for p in pids if Path(f"/proc/{p}/comm").read_text().strip() == "qperf"]


@pytest.mark.netns
def test_qperf_server_measures_then_is_killed_even_when_the_block_fails(scratch_netns: str) -> None:
    with qperf_server(scratch_netns):
        figures = run_qperf(scratch_netns, "127.0.0.1", ["tcp_bw", "tcp_lat"], 1)
    assert figures.bw_MBps is not None
    assert figures.bw_MBps > 0
    assert figures.lat_us is not None
    assert figures.lat_us > 0
    assert _qperf_pids(scratch_netns) == []
    seen = []

    def fail_while_serving() -> None:
        with qperf_server(scratch_netns):
            seen.extend(_qperf_pids(scratch_netns))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_while_serving()
    assert len(seen) == 1
    assert _qperf_pids(scratch_netns) == []


@pytest.mark.netns
def test_qperf_without_a_server_is_a_bench_error(scratch_netns: str) -> None:
    with pytest.raises(BenchError, match="failed to connect"):
        run_qperf(scratch_netns, "127.0.0.1", ["tcp_bw"], 1)


@pytest.mark.netns
def test_cpu_meter_counts_a_busy_process_in_the_namespace(scratch_netns: str) -> None:
    meter = CpuMeter([scratch_netns])
    busy = subprocess.Popen(["ip", "netns", "exec", scratch_netns, sys.executable, "-c",
                             "import time\nend = time.process_time() + 0.6\n"
                             "while time.process_time() < end: pass\n"
                             "print('done', flush=True)\ntime.sleep(30)"],
                            stdout=subprocess.PIPE, text=True)
    assert busy.stdout is not None
    try:
        before = meter.snapshot()  # may already hold part of the 0.6 s
        # The loop is done (it says so) and the process sleeps, still alive.
        assert busy.stdout.readline() == "done\n"
        after = meter.snapshot()
        used = CpuMeter.seconds(before, after)
        total = sum(after.processes.values()) / CLK_TCK
    finally:
        busy.kill()
        busy.wait()
    assert busy.pid in after.processes
    assert 0.55 <= total <= 1.0  # the 0.6 s loop plus interpreter start-up
    assert 0 <= used <= total + 0.3  # ksoftirqd adds a little, machine-wide


@pytest.mark.netns
def test_pinned_testbed_agents_and_their_threads_stay_on_their_host_cpu() -> None:
    from weft_lab.testbed import Testbed

    config = json.dumps({"Network": "198.19.0.0/16", "Backend": {"Type": "udp"}})
    with Testbed(hosts=2, containers_per_host=0, config=config, agent_cpus=(0,),
                 log_level="info") as tb:
        tb.start()
        for host in tb.hosts:
            assert host.agent is not None
            # `ip netns exec` and `taskset` exec, so the pid is the agent's; every thread,
            # and the udp forwarder process the agent starts, inherits the mask
            forwarder = tb.host_status(host)["backend_status"]["forwarder_pid"]
            for pid, least in ((host.agent.pid, 1), (forwarder, 3)):
                tasks = list(Path(f"/proc/{pid}/task").iterdir())
                assert len(tasks) >= least, tasks  # the forwarder: main + its two threads
                for task in tasks:
                    status = (task / "status").read_text()
                    assert "Cpus_allowed_list:\t0\n" in status, task


@pytest.mark.netns
@requires(Path("/usr/sbin/dockerd").exists() and Path("/bin/busybox").exists(),
          "needs Debian's docker.io and busybox-static "
          "(scripts/setup.sh --runtimes installs them)")
def test_short_bench_with_docker_containers_beside_namespaces(tmp_path: Path) -> None:
    """`weft bench --runtime docker`: qperf between docker containers on two hosts, in the
    same rounds as native and the bare-namespace testbed (figures: docs/benchmarks.md, not here)."""
    before = set(list_netns())
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "weft", "bench", "--runtime", "docker", "--backends", "vxlan",
         "--rate", "1gbit", "--secs", "1", "--reps", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["results"]] == ["native", "vxlan", "vxlan/docker"]
    assert not data["skipped"]
    left = [n for n in set(list_netns()) - before
            if not (RUNS_DIR / n.removeprefix("weft-").split("-", 1)[0]).exists()]
    assert not left  # every namespace the bench made is gone (others' runs keep a run dir)


@pytest.mark.netns
@pytest.mark.parametrize("row", ["flannel-vxlan", "flannel-host-gw"])
def test_flannel_rows_carry_flannels_rules_and_track_overlay_traffic(row: str) -> None:
    """The peer rows are built as flannel leaves a host: its iptables rules (read back from
    the kernel as `iptables -S` prints them), its device for vxlan, containers that reach
    each other, and the overlay's packets in conntrack (flannel's masquerade tracks all)."""
    import contextlib

    from weft_lab.bench.flannel import flannel_rules, restore_payload
    from weft_lab.bench.references import BENCH_NETWORK, REFERENCES, host_subnet
    from weft_lab.bench.runner import _reference

    with contextlib.ExitStack() as stack:
        target = _reference(stack, REFERENCES[row], None, "ptp")[row]
        tb = target.testbed
        h1 = tb.hosts[0]
        want = [ln for ln in restore_payload(flannel_rules(BENCH_NETWORK, host_subnet(h1)))
                .splitlines() if ln.startswith("-A")]
        got = [ln for table in ("nat", "filter") for ln in tb.run(
            h1.netns, ["iptables", "-t", table, "-S"]).stdout.splitlines()
            if "flanneld" in ln]
        assert got == want
        if row == "flannel-vxlan":
            link = tb.run(h1.netns, ["ip", "-d", "link", "show", "flannel.1"]).stdout
            for word in ("mtu 1450", "vxlan id 1 ", "dstport 8472", "nolearning",
                         " udpcsum"):
                assert word in link, link
        c1, c2 = tb.containers
        assert tb.ping(c1.netns, c2.ip)
        tracked = tb.run(h1.netns, ["cat", "/proc/net/nf_conntrack"]).stdout
        assert f"src={c1.ip} dst={c2.ip}" in tracked, tracked
