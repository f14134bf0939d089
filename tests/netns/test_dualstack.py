"""Dual stack in namespaces: every container gets an IPv4 and an IPv6 address and reaches
every other container by both (2001:db8::/32 inside the namespaces only)."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from helpers import metric, scrape, wait_for
from weft.backends.wireguard.uapi import UapiDevice
from weft.core.errors import WeftError
from weft_lab.nodes import Container, Host
from weft_lab.testbed import Testbed

pytestmark = pytest.mark.netns

NETWORK6 = "2001:db8:1::/48"


def dual_config(backend: str, **options: object) -> str:
    return json.dumps({"Network": "198.19.0.0/16", "EnableIPv6": True,
                       "IPv6Network": NETWORK6, "Backend": {"Type": backend, **options}})


def check_mesh(tb: Testbed) -> None:
    """Each container holds one address of each family, of its host's two subnets, and
    every pair reaches each other by both."""
    leases = {lease.public_ip: lease for lease in tb.leases()}
    assert len({lease.ipv6_subnet for lease in leases.values()}) == len(tb.hosts)
    for c in tb.containers:
        lease = leases[c.host.underlay_ip]
        assert c.ip in lease.subnet
        assert lease.ipv6_subnet is not None
        assert c.ip6 is not None
        assert c.ip6 in lease.ipv6_subnet
        routes = tb.run(c.netns, ["ip", "-6", "route", "show", "default"]).stdout
        assert routes.startswith("default via"), routes
    for family in (False, True):
        matrix = tb.connectivity(ipv6=family)
        assert all(matrix.values()), (family, [p for p, ok in matrix.items() if not ok])


def test_vxlan_dual_stack_mesh_over_an_ipv4_underlay() -> None:
    with Testbed(hosts=3, containers_per_host=2, config=dual_config("vxlan")) as tb:
        tb.start()
        check_mesh(tb)
        env = tb.hosts[0].subnet_env_path.read_text()
        assert f"FLANNEL_IPV6_NETWORK={NETWORK6}\n" in env
        assert "FLANNEL_IPV6_SUBNET=2001:db8:1:" in env
        status = tb.host_status(tb.hosts[0])
        assert status["errors"] == {}
        # ip6 masquerade for IPv6 leaving the network, beside IPv4's.
        tables = tb.run(tb.hosts[0].netns, ["nft", "list", "tables"]).stdout
        assert "table ip6 weft" in tables
        assert "table ip weft" in tables
        ipaddress.ip_network(NETWORK6)  # the test's own range is in 2001:db8::/32


@pytest.mark.parametrize("backend", ["udp", "wireguard"])
def test_dual_stack_mesh_over_an_ipv4_underlay(backend: str) -> None:
    with Testbed(hosts=3, containers_per_host=2, config=dual_config(backend)) as tb:
        tb.start()
        check_mesh(tb)


def test_host_gw_dual_stack_routes_ipv6_via_ipv6_next_hops_on_a_dual_underlay() -> None:
    with Testbed(hosts=3, containers_per_host=2, config=dual_config("host-gw"),
                 underlay="dual") as tb:
        tb.start()
        check_mesh(tb)
        leases = {lease.public_ip: lease for lease in tb.leases()}
        routes = routes6(tb, tb.hosts[0])
        for peer in tb.hosts[1:]:
            six = leases[peer.underlay_ip].ipv6_subnet
            assert routes[str(six)]["gateway"] == str(peer.underlay_ip6)
            assert routes[str(six)]["dev"] == "eth0"


def test_host_gw_ipv6_over_an_ipv4_only_underlay_is_said_at_config_time_and_per_peer() -> None:
    with Testbed(hosts=2, containers_per_host=0, config=dual_config("host-gw")) as tb:
        said = tb.operator("config", "set", "-", input=dual_config("host-gw"))
        assert ("host-gw routes 2001:db8:1::/48 via IPv6 next hops (the kernel takes no "
                "IPv4 next hop for an IPv6 route)") in " ".join(said.stderr.split())
        for host in tb.hosts:
            tb.start_agent(host)
        for host in tb.hosts:
            tb.wait_subnet_env(host)
        status = wait_for_errors(tb, tb.hosts[0], 1)
        assert "eth0 has no IPv6 address, and host-gw routes 2001:db8:1::/48" in \
            status["notices"]["underlay"]
        (error,) = status["errors"].values()
        assert "publishes no PublicIPv6" in error
        # The IPv4 half still routes.
        peer = next(lease for lease in tb.leases() if lease.public_ip == tb.hosts[1].underlay_ip)
        assert str(peer.subnet) in tb.weft_routes(tb.hosts[0])


def reaches(tb: Testbed, netns: str, dst: object, timeout: float = 30.0) -> bool:
    """Whether a ping from `netns` reaches `dst` (the agents converge meanwhile: the
    condition waited on, not a time); fails after `timeout`."""
    return bool(wait_for(f"{netns} to reach {dst}", lambda: tb.ping(netns, dst), timeout,
                         interval=0))


def routes6(tb: Testbed, host: Host) -> dict[str, dict[str, object]]:
    """weft's IPv6 routes on `host`, by destination."""
    out = tb.run(host.netns, ["ip", "-6", "-j", "route", "show", "proto", "87"]).stdout
    return {r["dst"]: r for r in json.loads(out or "[]")}


def wait_for_errors(tb: Testbed, host: Host, count: int, timeout: float = 30.0
                    ) -> dict[str, Any]:
    """The host's status once it reports `count` peer errors (or fail after `timeout`)."""
    def enough() -> dict[str, Any]:
        status = tb.host_status(host)
        return status if len(status["errors"]) >= count else {}

    found: dict[str, Any] = wait_for(f"{host.name} to report {count} peer errors", enough,
                                     timeout, ignore=(OSError, WeftError))
    return found


@pytest.mark.parametrize("backend", ["vxlan", "udp", "wireguard"])
def test_an_ipv6_only_underlay_carries_both_families(backend: str) -> None:
    with Testbed(hosts=2, containers_per_host=1, config=dual_config(backend),
                 underlay="ipv6") as tb:
        tb.start()
        check_mesh(tb)
        assert all(lease.public_ip.version == 6 for lease in tb.leases())
        # No IPv4 on the underlay at all: every packet between hosts is IPv6.
        assert "inet " not in tb.run(tb.hosts[0].netns, ["ip", "-4", "addr", "show", "eth0"]
                                     ).stdout


def test_a_mixed_underlay_routes_ipv6_where_it_can_and_says_where_not() -> None:
    """host-gw on three hosts, the third without IPv6 on its underlay: the first two route
    each other's IPv6 subnets, and every pair with the third reaches it over IPv4 and says
    in status why its IPv6 half cannot be routed."""
    with Testbed(hosts=3, containers_per_host=1, config=dual_config("host-gw"),
                 underlay="dual", ipv4_only_hosts=1) as tb:
        for host in tb.hosts:
            tb.start_agent(host)
        for host in tb.hosts:
            tb.wait_subnet_env(host)
        for c in tb.containers:
            tb.attach(c)
        a, b, lone = tb.containers
        first, _, third = tb.hosts
        assert reaches(tb, a.netns, b.ip6)
        assert reaches(tb, b.netns, a.ip6)
        for src, dst in ((a, lone), (lone, a), (b, lone)):
            assert reaches(tb, src.netns, dst.ip)  # IPv4 between every pair
        leases = {lease.public_ip: lease for lease in tb.leases()}
        status = wait_for_errors(tb, first, 1)
        assert status["errors"] == {str(leases[third.underlay_ip].subnet): (
            f"peer {third.underlay_ip} publishes no PublicIPv6, and the kernel routes IPv6 "
            f"subnet {leases[third.underlay_ip].ipv6_subnet} only via an IPv6 next hop")}
        lonely = wait_for_errors(tb, third, 2)
        assert "eth0 has no IPv6 address" in lonely["notices"]["underlay"]
        assert all("(no IPv6 address)" in error for error in lonely["errors"].values())


def test_auto_dual_stack_mesh_chooses_per_family() -> None:
    """auto on a dual underlay: host-gw carries both families between the hosts (IPv6 via
    each peer's IPv6 address), and status names each peer's plane per family."""
    with Testbed(hosts=3, containers_per_host=2, config=dual_config("auto"),
                 underlay="dual", agent_args=["--metrics-addr", "127.0.0.1:9464"]) as tb:
        tb.start()
        check_mesh(tb)
        paths = tb.host_status(tb.hosts[0])["backend_status"]["paths"]
        assert {(p["plane"], p["ipv6_plane"]) for p in paths.values()} == {
            ("host-gw", "host-gw")}
        # Both families in the metrics: the peers' subnets per family, auto's IPv6 plane.
        scraped = scrape(tb.hosts[0].netns)
        assert metric(scraped, "weft_peer_subnets", family="ipv4") == 2
        assert metric(scraped, "weft_peer_subnets", family="ipv6") == 2
        for subnet in paths:
            assert metric(scraped, "weft_peer_ipv6_data_plane", peer=subnet,
                          plane="host-gw") == 1
            assert metric(scraped, "weft_peer_ipv6_data_plane", peer=subnet,
                          plane="vxlan") == 0


DOCKER = shutil.which("dockerd") is not None and Path("/bin/busybox").exists()
PODMAN = shutil.which("podman") is not None and Path("/bin/busybox").exists()


@pytest.mark.skipif(not DOCKER, reason="needs Debian's docker.io and busybox-static")
def test_docker_containers_get_both_addresses_through_weft_docker_opts() -> None:
    with Testbed(hosts=2, containers_per_host=1, config=dual_config("vxlan"),
                 runtime="docker", log_level="info") as tb:
        tb.start()
        flags = tb.weft("docker-opts", "--subnet-file", str(tb.hosts[0].subnet_env_path),
                        "--format", "flags").stdout
        lease = next(x for x in tb.leases() if x.public_ip == tb.hosts[0].underlay_ip)
        assert f"--ipv6 --fixed-cidr-v6={lease.ipv6_subnet}" in flags
        check_container_pings(tb)


@pytest.mark.skipif(not PODMAN, reason="needs Debian's podman and busybox-static")
def test_podman_containers_get_both_addresses_through_weft_cni() -> None:
    with Testbed(hosts=2, containers_per_host=1, config=dual_config("vxlan"),
                 runtime="podman", log_level="info") as tb:
        tb.start()
        check_container_pings(tb)


def check_container_pings(tb: Testbed) -> None:
    """Each container (the runtime's own) holds an address of each of its host's subnets
    and pings the other by both, from inside (its own busybox)."""
    leases = {lease.public_ip: lease for lease in tb.leases()}
    for c in tb.containers:
        lease = leases[c.host.underlay_ip]
        assert c.ip in lease.subnet
        assert c.ip6 is not None
        assert lease.ipv6_subnet is not None
        assert c.ip6 in lease.ipv6_subnet
    a, b = tb.containers
    for src, dst in ((a, b), (b, a)):
        for target in (dst.ip, dst.ip6):
            wait_for(f"{src.name} to ping {target} from inside",
                     pinger(tb, src, str(target)), 30, interval=0)


def pinger(tb: Testbed, src: Container, target: str) -> Callable[[], bool]:
    """Whether one busybox ping from inside `src` reaches `target`."""
    def once() -> bool:
        return tb.container_exec(src, ["ping", "-c", "1", "-W", "2", target], check=False,
                                 timeout=20).returncode == 0
    return once


def test_vxlan_carries_ipv6_over_the_ipv6_underlay_where_both_ends_have_one() -> None:
    """A mixed underlay on vxlan (the third host IPv4-only): the first two hosts send each
    other's IPv6 subnets through the IPv6 underlay device (to the peer's PublicIPv6), every
    pair with the third through the IPv4 one; both families reach every container."""
    with Testbed(hosts=3, containers_per_host=1, config=dual_config("vxlan"),
                 underlay="dual", ipv4_only_hosts=1) as tb:
        tb.start()
        check_mesh(tb)
        leases = {lease.public_ip: lease for lease in tb.leases()}
        first, second, third = tb.hosts
        assert leases[second.underlay_ip].public_ipv6 == second.underlay_ip6
        assert leases[third.underlay_ip].public_ipv6 is None
        routes = routes6(tb, first)
        assert routes[str(leases[second.underlay_ip].ipv6_subnet)]["dev"] == "weft.vx1v6"
        assert routes[str(leases[third.underlay_ip].ipv6_subnet)]["dev"] == "weft.vx1"
        fdb = tb.run(first.netns, ["bridge", "fdb", "show", "dev", "weft.vx1v6"]).stdout
        assert f"dst {second.underlay_ip6}" in fdb
        # The lone host has no IPv6 device: its IPv6 overlay rides IPv4 to everyone.
        assert "weft.vx1v6" not in tb.run(third.netns, ["ip", "-br", "link"]).stdout
        # MTU: one for the containers, leaving room for the IPv6 underlay's header.
        assert "FLANNEL_MTU=1430\n" in first.subnet_env_path.read_text()
        assert "FLANNEL_MTU=1450\n" in third.subnet_env_path.read_text()
        assert tb.host_status(first)["ingress"]["dropped"].get("non_member", 0) == 0
        # The IPv6 underlay device is weft's too: deleted, it comes back with its MAC.
        mac6 = json.loads(tb.run(first.netns, ["ip", "-j", "link", "show", "weft.vx1v6"]
                                 ).stdout)[0]["address"]
        tb.run(first.netns, ["ip", "link", "del", "weft.vx1v6"])
        wait_for("weft.vx1v6 to come back with its MAC", lambda: mac6 in tb.run(
            first.netns, ["ip", "link", "show"]).stdout and "weft.vx1v6" in tb.run(
            first.netns, ["ip", "-br", "link"]).stdout, 30)
        a, b, _ = tb.containers
        assert reaches(tb, a.netns, b.ip6)


WG6 = "weft.wg0v6"  # wireguard's device on the IPv6 underlay
WIREGUARD_GO = dual_config("wireguard", Implementation="wireguard-go")


# Datagrams from a machine without a lease to a host's IPv6 WireGuard port.
SEND6 = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
for _ in range(int(sys.argv[2])):
    s.sendto(b"not-wireguard", (sys.argv[1], 51821))
"""


# Another program's socket on a UDP port (both families), held until its stdin closes.
HOLD = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind(("::", int(sys.argv[1])))
print("held", flush=True)
sys.stdin.read()
"""


@pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="needs wireguard-go")
def test_a_held_listen_port_v6_leaves_the_ipv4_overlay_to_the_ipv4_device() -> None:
    """ListenPortV6 (51821) held by another program when the agent starts: the IPv6
    underlay device cannot listen, status says so naming the port, and the IPv4 overlay
    works all the same; the port freed, the device comes up and carries the IPv6 half."""
    with Testbed(hosts=2, containers_per_host=1, config=WIREGUARD_GO, underlay="dual") as tb:
        first, second = tb.hosts
        first.agent_args.extend(["--resync-interval", "1"])  # the pace of the retry
        holder = subprocess.Popen(["ip", "netns", "exec", first.netns, sys.executable, "-c",
                                   HOLD, "51821"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline() == "held\n"
            tb.start(hosts=[second])  # converged means no errors: the first has one
            tb.start_agent(first)
            tb.wait_subnet_env(first)
            a, b = tb.containers
            tb.attach(a)
            assert reaches(tb, a.netns, b.ip)
            assert "ListenPortV6 51821" in tb.host_status(first)["backend_status"][
                "ipv6_underlay"]["error"]
            wait_for("the health error", lambda: "ListenPortV6 51821" in tb.host_status(
                first)["errors"].get(WG6, ""), 30)
        finally:
            holder.communicate("")  # its stdin closed: it lets the port go
        wait_for(f"{WG6} to serve", lambda: "error" not in tb.host_status(first)[
            "backend_status"]["ipv6_underlay"], 30)
        tb.wait_converged(30)  # no errors left
        assert reaches(tb, a.netns, b.ip6)


def udp_counter(tb: Testbed, host: Host, match: str) -> Callable[[], int]:
    """Packets arriving at `host` that `match` (an nft expression), counted by a table of
    the test's own in its namespace: what crosses the underlay, independent of weft. Each
    match its own named counter."""
    name = "c" + hashlib.sha256(match.encode()).hexdigest()[:12]
    tb.run(host.netns, ["nft", "add", "table", "inet", "counted"])
    tb.run(host.netns, ["nft", "add chain inet counted in { type filter hook input priority 0; }"])
    tb.run(host.netns, ["nft", "add", "counter", "inet", "counted", name])
    tb.run(host.netns, ["nft", f"add rule inet counted in {match} counter name {name}"])

    def packets() -> int:
        listing = tb.run(host.netns, ["nft", "list", "counter", "inet", "counted", name]).stdout
        return sum(int(n) for n in re.findall(r"packets (\d+)", listing))
    return packets


def test_udp_carries_ipv6_over_the_ipv6_underlay_where_both_ends_have_one() -> None:
    """A mixed underlay on udp (the third host IPv4-only): the first two hosts send each
    other's IPv6 subnets over the IPv6 underlay (the forwarder's second socket, to the
    peer's PublicIPv6), every pair with the third over IPv4; both families reach every
    container, and status says which underlay each peer's IPv6 half uses."""
    # No peer probes: the counters below must move only with the test's pings.
    with Testbed(hosts=3, containers_per_host=1, config=dual_config("udp"),
                 underlay="dual", ipv4_only_hosts=1,
                 agent_args=["--probe-period", "0"]) as tb:
        tb.start()
        check_mesh(tb)
        leases = {lease.public_ip: lease for lease in tb.leases()}
        first, second, third = tb.hosts
        a, b, lone = tb.containers
        six = {h.name: str(leases[h.underlay_ip].ipv6_subnet) for h in tb.hosts}
        status = tb.host_status(first)["backend_status"]
        assert status["peers"][six[second.name]] == f"[{second.underlay_ip6}]:8285"
        assert status["peers"][six[third.name]] == f"{third.underlay_ip}:8285"
        assert status["ipv6_underlay"]["address"] == str(first.underlay_ip6)
        assert status["ipv6_underlay"]["over_ipv4"] == {six[third.name]: (
            f"peer {third.underlay_ip} has no IPv6 underlay address (no PublicIPv6)")}
        lonely = tb.host_status(third)["backend_status"]["ipv6_underlay"]
        assert lonely["address"] is None
        assert "rides the one socket over IPv4" in lonely["why"]
        # Which underlay the datagrams take, counted by the kernel of the receiving hosts.
        over6 = udp_counter(tb, second, f"ip6 saddr {first.underlay_ip6} udp dport 8285")
        over4 = udp_counter(tb, second, f"ip saddr {first.underlay_ip} udp dport 8285")
        to_lone = udp_counter(tb, third, f"ip saddr {first.underlay_ip} udp dport 8285")
        assert b.ip6 is not None
        assert lone.ip6 is not None
        assert tb.ping(a.netns, b.ip6, count=3)
        assert over6() >= 3
        assert over4() == 0
        assert tb.ping(a.netns, b.ip, count=3)
        assert over4() >= 3
        assert tb.ping(a.netns, lone.ip6, count=3)
        assert to_lone() >= 3
        # The receiving forwarder counts them on its IPv6 socket; the filter let them in.
        received = tb.host_status(second)["backend_status"]["ipv6_underlay"]["rx"]
        assert received["packets"] >= 3
        assert received["drops"] == {}
        for host in tb.hosts:
            assert tb.host_status(host)["ingress"]["dropped"].get("non_member", 0) == 0
        # MTU: one for the containers, leaving room for the IPv6 underlay's header.
        assert "FLANNEL_MTU=1434\n" in first.subnet_env_path.read_text()
        assert "FLANNEL_MTU=1454\n" in third.subnet_env_path.read_text()
        # A full-size IPv6 packet fits (1434 - 40 - 8 bytes of ICMPv6 payload), DF set.
        assert tb.run(a.netns, ["ping", "-6", "-c", "1", "-W", "2", "-M", "do", "-s", "1386",
                                str(b.ip6)], check=False).returncode == 0
        # Self-healing: the TUN device deleted, the forwarder opens it and both sockets
        # anew (its counters start again), and the IPv6 half takes the IPv6 underlay again.
        tb.run(first.netns, ["ip", "link", "del", "weft.udp0"])
        assert reaches(tb, a.netns, b.ip6)
        again = tb.host_status(first)["backend_status"]
        assert again["ipv6_underlay"]["tx"]["packets"] >= 1
        assert again["ipv6_underlay"]["over_ipv4"] == status["ipv6_underlay"]["over_ipv4"]


@pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="needs wireguard-go")
def test_wireguard_carries_ipv6_over_the_ipv6_underlay_where_both_ends_have_one() -> None:
    """A mixed underlay on wireguard (the third host IPv4-only): the first two hosts carry
    each other's IPv6 subnets on a second WireGuard device to the peer's PublicIPv6 (its
    packets counted on the IPv6 underlay), every pair with the third over IPv4 and status
    says why; the second device deleted by hand comes back."""
    with Testbed(hosts=3, containers_per_host=1, config=WIREGUARD_GO, underlay="dual",
                 ipv4_only_hosts=1) as tb:
        tb.start()
        check_mesh(tb)
        leases = {lease.public_ip: lease for lease in tb.leases()}
        first, second, third = tb.hosts
        a, b, _ = tb.containers
        assert second.underlay_ip6 is not None
        routes = routes6(tb, first)
        assert routes[NETWORK6]["dev"] == WG6
        assert routes[str(leases[third.underlay_ip].ipv6_subnet)]["dev"] == "weft.wg0"
        # The IPv6 device's one peer is the second host, at its IPv6 underlay address and
        # the port its BackendV6Data names (flannel's layout).
        device6 = UapiDevice(WG6, first.run_dir / "wireguard")
        (peer6,) = device6.read().peers.values()
        assert peer6.endpoint == (second.underlay_ip6, 51821)
        assert peer6.allowed_ips == {leases[second.underlay_ip].ipv6_subnet}
        # On the wire: the IPv6 overlay from the first host arrives at the second as UDP
        # over IPv6 to the IPv6 device's port.
        over6 = udp_counter(tb, second, f"ip6 saddr {first.underlay_ip6} udp dport 51821")
        before = over6()
        assert tb.ping(a.netns, b.ip6, count=5, wait=2)
        assert over6() - before >= 5
        # Status: which underlay each peer's IPv6 half uses, on both kinds of host.
        six = tb.host_status(first)["backend_status"]["ipv6_underlay"]
        assert six["device"] == WG6
        assert six["peer_count"] == 1
        assert six["counters"]["rx_bytes"] > 0
        assert six["counters"]["tx_bytes"] > 0
        assert six["over_ipv4"] == {str(leases[third.underlay_ip].ipv6_subnet):
                                    "the peer publishes no PublicIPv6"}
        lone = tb.host_status(third)["backend_status"]["ipv6_underlay"]
        assert lone["device"] is None
        assert "rides weft.wg0" in lone["why"]
        # MTU: one for the containers, leaving room for the IPv6 underlay's header.
        assert "FLANNEL_MTU=1420\n" in first.subnet_env_path.read_text()
        assert "FLANNEL_MTU=1440\n" in third.subnet_env_path.read_text()
        assert tb.host_status(second)["ingress"]["dropped"].get("non_member", 0) == 0
        # The IPv6 device's port takes members only: a machine without a lease sending to
        # it over the IPv6 underlay is dropped and counted.
        intruder = tb.add_underlay_node("intr6", "198.18.0.98")
        tb.run(intruder, ["ip", "addr", "add", "2001:db8:ff::98/64", "dev", "eth0", "nodad"])
        tb.run(intruder, ["/usr/bin/python3", "-c", SEND6, str(second.underlay_ip6), "3"])
        wait_for("3 non-member packets counted", lambda: tb.host_status(second)["ingress"][
            "dropped"].get("non_member", 0) == 3, 10)
        # The IPv6 device is weft's too: deleted (its wireguard-go exits), it comes back,
        # served, with its peer, and carries the IPv6 overlay again.
        pid = six["wireguard_go_pid"]
        pid4 = tb.host_status(first)["backend_status"]["wireguard_go_pid"]
        tb.run(first.netns, ["ip", "link", "del", WG6])
        wait_for(f"{WG6} to come back with its peer", lambda: tb.run(
            first.netns, ["ip", "-br", "link"]).stdout.count(WG6) == 1 and len(
            device6.read().peers) == 1, 30, ignore=(WeftError,))
        assert reaches(tb, a.netns, b.ip6)
        revived = tb.host_status(first)["backend_status"]["ipv6_underlay"]["wireguard_go_pid"]
        assert revived not in (None, pid)
        # An agent restart adopts both devices' wireguard-go as they run.
        tb.stop_agent(first)
        tb.start_agent(first)
        tb.wait_converged(30)
        again = tb.host_status(first)["backend_status"]
        assert again["ipv6_underlay"]["wireguard_go_pid"] == revived
        assert again["wireguard_go_pid"] == pid4
        assert reaches(tb, a.netns, b.ip6)
