"""Hosts share one overlay: full mesh, restarts without loss, hosts leaving (kernel state)."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys

import pytest

from helpers import (
    DATA_PLANES,
    check_data_plane,
    requires,
    source_seen,
    wait_for,
    weft_forward_accepts,
)
from helpers import network_config as config
from weft.host.forward_accept import COMMENT as FORWARD_COMMENT
from weft_lab.testbed import RUNS_DIR, Testbed, list_netns

pytestmark = pytest.mark.netns


@pytest.mark.parametrize(("backend", "attach"), [
    ("vxlan", "bridge"), ("host-gw", "bridge"), ("vxlan", "ptp"), ("host-gw", "ptp")])
def test_three_hosts_two_containers_full_mesh(backend: str, attach: str) -> None:
    with Testbed(hosts=3, containers_per_host=2, config=config(backend), attach=attach) as tb:
        tb.start()
        leases = tb.leases()
        assert len({lease.subnet for lease in leases}) == 3
        for c in tb.containers:  # each container's address is from its host's subnet
            lease = next(lease for lease in leases if lease.public_ip == c.host.underlay_ip)
            assert c.ip in lease.subnet
        matrix = tb.connectivity()
        assert all(matrix.values()), [pair for pair, ok in matrix.items() if not ok]
        env = tb.hosts[0].subnet_env_path.read_text()
        assert "FLANNEL_NETWORK=198.19.0.0/16" in env
        assert ("FLANNEL_MTU=1450" if backend == "vxlan" else "FLANNEL_MTU=1500") in env


def test_vxlan_direct_routing_uses_plain_routes_on_one_segment() -> None:
    with Testbed(hosts=2, containers_per_host=1,
                 config=config("vxlan", DirectRouting=True)) as tb:
        tb.start()
        (route,) = tb.weft_routes(tb.hosts[0]).values()
        assert route["dev"] == "eth0"
        assert route["gateway"] == str(tb.hosts[1].underlay_ip)
        assert all(tb.connectivity().values())


def test_ping_across_an_agent_restart_loses_nothing() -> None:
    with Testbed(hosts=2, containers_per_host=1, config=config("vxlan")) as tb:
        tb.start()
        out = tb.ping_across_agent_restarts(tb.containers[0], tb.containers[1])
        assert " 0% packet loss" in out, out
        for host in tb.hosts:
            assert "lease reclaimed" in tb.agent_log(host)


def test_host_that_releases_its_lease_disappears_from_every_peer() -> None:
    with Testbed(hosts=3, containers_per_host=0, config=config("vxlan"),
                 agent_args=["--release-on-exit"]) as tb:
        tb.start()
        leaving = tb.hosts[2]
        subnet = next(str(lease.subnet) for lease in tb.leases()
                      if lease.public_ip == leaving.underlay_ip)
        assert subnet in tb.weft_routes(tb.hosts[0])
        assert tb.stop_agent(leaving, signal.SIGTERM) == 0
        tb.wait_converged(20, hosts=tb.hosts[:2])
        for i in (0, 1):
            assert subnet not in tb.weft_routes(tb.hosts[i])
            neigh = tb.run(tb.hosts[i].netns, ["ip", "neigh", "show", "dev", "weft.vx1"]).stdout
            assert subnet.split("/")[0] not in neigh
        # The host that left removed its own data plane too, and its firewall rules.
        links = tb.run(leaving.netns, ["ip", "-br", "link"]).stdout
        assert "weft.vx1" not in links
        assert "weft" not in tb.run(leaving.netns, ["nft", "list", "tables"]).stdout
        assert FORWARD_COMMENT not in forward_chain(tb, leaving.netns)


def test_expired_lease_disappears_from_every_peer() -> None:
    with Testbed(hosts=3, containers_per_host=0, config=config("host-gw"), lease_ttl=3) as tb:
        tb.start()
        gone = tb.hosts[2]
        subnet = next(str(lease.subnet) for lease in tb.leases()
                      if lease.public_ip == gone.underlay_ip)
        tb.stop_agent(gone, signal.SIGKILL)  # dies without releasing: only expiry removes it
        wait_for("the expired lease's routes gone", lambda: all(
            subnet not in tb.weft_routes(tb.hosts[i]) for i in (0, 1)), 30, interval=0.2,
            seen=lambda: [tb.weft_routes(tb.hosts[i]) for i in (0, 1)])
        # Meanwhile the living hosts kept renewing their 3 s leases.
        assert {str(lease.public_ip) for lease in tb.leases()} == {
            str(h.underlay_ip) for h in tb.hosts[:2]}


def test_restart_removes_stale_entries_it_owns_and_nothing_else() -> None:
    with Testbed(hosts=2, containers_per_host=0, config=config("host-gw")) as tb:
        tb.start()
        h = tb.hosts[0]
        tb.stop_agent(h)
        # A route weft left from an earlier run (its protocol) and one somebody else made.
        tb.run(h.netns, ["ip", "route", "add", "198.19.250.0/24", "via", "198.18.0.99",
                         "proto", "87"])
        tb.run(h.netns, ["ip", "route", "add", "198.19.251.0/24", "via", "198.18.0.99"])
        tb.start_agent(h)
        tb.wait_converged(20)
        assert "198.19.250.0/24" not in tb.weft_routes(tb.hosts[0])
        routes = tb.run(h.netns, ["ip", "route"]).stdout
        assert "198.19.251.0/24 via 198.18.0.99" in routes


def test_host_gw_peer_off_segment_is_an_error_for_that_peer_only() -> None:
    with Testbed(hosts=2, containers_per_host=0, config=config("host-gw")) as tb:
        tb.start()
        # A lease from a host on another L2 subnet, written as another agent would.
        # The store is reachable from the operator's machine (exit 1 if not); 3: no agent
        # runs on that machine.
        assert tb.operator("status", check=False).returncode == 3
        sys_argv = [sys.executable, "-c", (
            "import asyncio, ipaddress; from weft.store import open_store; "
            "from weft.core.lease import Lease\n"
            "async def m():\n"
            f"    s = open_store({tb.store_url!r})\n"
            "    await s.create_lease(Lease(ipaddress.ip_network('198.19.200.0/24'), "
            "ipaddress.ip_address('198.18.7.9'), 'host-gw'), 600)\n"
            "    await s.close()\n"
            "asyncio.run(m())")]
        tb.run(tb.underlay, sys_argv)
        wait_for("the off-segment peer reported", lambda: tb.host_status(tb.hosts[0])["errors"],
                 30)
        status = tb.host_status(tb.hosts[0])
        assert "198.19.200.0/24" in status["errors"]
        assert "not on this host's L2 subnet" in str(status["errors"])
        assert tb.hosts[0].agent is not None
        assert tb.hosts[0].agent.poll() is None
        assert str(tb.hosts[1].underlay_ip) in str(
            tb.run(tb.hosts[0].netns, ["ip", "route", "show", "proto", "87"]).stdout)


def test_demo_exits_zero_and_leaves_no_namespace() -> None:
    proc = subprocess.run([sys.executable, "-m", "weft", "demo"], capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all 30 pairs reached each other" in proc.stdout
    run_id = re.search(r"weft demo run (\w+):", proc.stdout)
    assert run_id is not None, proc.stdout
    # Other runs may be in progress at the same time; this run's names carry its id.
    assert not [n for n in list_netns() if n.startswith(f"weft-{run_id[1]}-")]
    assert not (RUNS_DIR / run_id[1]).exists()


def test_metrics_and_one_json_log_line_per_event() -> None:
    with Testbed(hosts=3, containers_per_host=0, config=config("vxlan"), log_level="info",
                 agent_args=["--metrics-addr", "127.0.0.1:9464"]) as tb:
        tb.start()
        scrape = tb.run(tb.hosts[0].netns, [
            sys.executable, "-c",
            "import urllib.request; print(urllib.request.urlopen("
            "'http://127.0.0.1:9464/metrics', timeout=5).read().decode())"]).stdout
        assert "weft_peers 2.0" in scrape
        assert re.search(r"weft_lease_expiry_timestamp_seconds [0-9.e+]+", scrape)
        assert re.search(r"weft_reconcile_total [1-9]", scrape)
        assert "weft_reconcile_duration_seconds_count" in scrape
        assert "weft_reconcile_errors_total 0.0" in scrape
        events = [json.loads(line) for line in tb.agent_log(tb.hosts[0]).splitlines()
                  if line.startswith("{")]
        names = [e["event"] for e in events]
        assert "lease acquired" in names
        assert names.count("peer added") == 2
        added = [e for e in events if e["event"] == "peer added"]
        assert {e["public_ip"] for e in added} == {str(h.underlay_ip) for h in tb.hosts[1:]}


def test_periodic_resync_repairs_a_route_someone_deleted() -> None:
    with Testbed(hosts=2, containers_per_host=0, config=config("host-gw"),
                 agent_args=["--resync-interval", "1"]) as tb:
        tb.start()
        (route,) = tb.weft_routes(tb.hosts[0])
        tb.run(tb.hosts[0].netns, ["ip", "route", "del", route])
        wait_for("the route put back", lambda: route in tb.weft_routes(tb.hosts[0]), 30,
                 interval=0.2)


def test_traffic_leaving_the_overlay_is_masqueraded_and_overlay_traffic_is_not() -> None:
    with Testbed(hosts=2, containers_per_host=1, config=config("vxlan")) as tb:
        tb.start()
        c1, c2 = tb.containers
        outside = tb.add_underlay_node("out", "198.18.0.200")
        # to a machine outside the overlay: the host's own address (weft's nftables table;
        # weft-cni then tells the delegate not to masquerade a second time)
        assert source_seen(tb, c1.netns, outside, "198.18.0.200") == str(c1.host.underlay_ip)
        # between containers the source is kept
        assert source_seen(tb, c1.netns, c2.netns, c2.ip) == str(c1.ip)


def forward_chain(tb: Testbed, netns: str) -> str:
    return tb.run(netns, ["iptables", "-w", "5", "-S", "FORWARD"]).stdout


@requires(shutil.which("iptables") is not None, "needs iptables")
@pytest.mark.parametrize("plane", list(DATA_PLANES))
def test_overlay_crosses_a_forward_chain_that_drops_like_dockers(plane: str) -> None:
    with Testbed(hosts=2, containers_per_host=1, config=config("vxlan"),
                 agent_args=DATA_PLANES[plane]) as tb:
        for host in tb.hosts:  # what Docker >= 1.13 does to every host it runs on
            tb.run(host.netns, ["iptables", "-w", "5", "-P", "FORWARD", "DROP"])
        tb.start()
        check_data_plane(tb, plane)
        c1, c2 = tb.containers
        assert all(tb.connectivity().values())
        rules = forward_chain(tb, c2.host.netns)
        assert rules.count(FORWARD_COMMENT) == weft_forward_accepts(), rules
        # Without weft's two rules the same chain drops the overlay: they are what works.
        # The agent puts its rules back as soon as it sees them go, so it is stopped first
        # (SIGTERM leaves the data plane standing, but for the fast path, which it takes
        # off: the chain is then what every overlay packet crosses, on both data planes).
        tb.stop_agent(c2.host)
        for rule in reversed(rules.splitlines()):
            if FORWARD_COMMENT in rule:
                tb.run(c2.host.netns, ["sh", "-c", "iptables -w 5 " +
                                       rule.replace("-A FORWARD", "-D FORWARD", 1)])
        assert FORWARD_COMMENT not in forward_chain(tb, c2.host.netns)
        assert not tb.ping(c1.netns, c2.ip, wait=1)
        # What an earlier run left for a device this one does not use (dual stack's second
        # tunnel, since turned off) is weft's too, and goes; the user's own rule stays.
        stale = ["-d", "198.19.0.0/16", "-i", "weft.vx1v6", "-m", "comment", "--comment",
                 FORWARD_COMMENT, "-j", "ACCEPT"]
        users = ["-d", "198.19.0.0/16", "-i", "weft.vx1v6", "-j", "ACCEPT"]
        for spec in (stale, users):
            tb.run(c2.host.netns, ["iptables", "-w", "5", "-A", "FORWARD", *spec])
        # The agent back: its rules are back (exactly those), and the overlay crosses the
        # chain again.
        tb.start_agent(c2.host)
        wait_for("the restarted agent's FORWARD accepts",
                 lambda: forward_chain(tb, c2.host.netns).count(FORWARD_COMMENT)
                 == weft_forward_accepts(),
                 timeout=60, seen=lambda: forward_chain(tb, c2.host.netns))
        wait_for("a ping across the chain again", lambda: tb.ping(c1.netns, c2.ip, wait=1),
                 timeout=60, seen=lambda: tb.agent_log(c2.host)[-2000:])
        assert "-A FORWARD -d 198.19.0.0/16 -i weft.vx1v6 -j ACCEPT" in \
            forward_chain(tb, c2.host.netns)
