"""Dual stack in namespaces: every container gets an IPv4 and an IPv6 address and reaches
every other container by both (2001:db8::/32 inside the namespaces only)."""

from __future__ import annotations

import ipaddress
import json

import pytest

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
