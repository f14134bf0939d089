"""Every backend's plan from a table of lease sets: leases + host facts -> kernel objects."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

import pytest

from weft.backends.hostgw import plan as hostgw
from weft.backends.udp import plan as udp
from weft.backends.vxlan import plan as vxlan
from weft.backends.vxlan.options import VxlanOptions
from weft.core.dataplane import FdbEntry, Neighbour, Route
from weft.core.host import UnderlayFacts
from weft.core.lease import Lease

UNDERLAY = UnderlayFacts(2, (ipaddress.ip_interface("198.18.0.1/24"),))
DEVICE = 7
MAC_A = "02:00:00:00:00:0a"


def lease(subnet: str, ip: str, backend: str = "vxlan",
          data: Mapping[str, Any] | None = None) -> Lease:
    if data is None:
        data = {"VtepMAC": MAC_A} if backend == "vxlan" else {}
    return Lease(ipaddress.ip_network(subnet), ipaddress.ip_address(ip), backend, data)


net = ipaddress.ip_network
addr = ipaddress.ip_address


def test_vxlan_one_route_neighbour_and_fdb_entry_per_peer() -> None:
    got = vxlan.plan(VxlanOptions(), [lease("198.19.2.0/24", "198.18.0.2")],
                     vxlan.VxlanFacts(DEVICE, UNDERLAY))
    assert got.routes == {Route(net("198.19.2.0/24"), addr("198.19.2.0"), DEVICE, onlink=True)}
    assert got.neighbours == {Neighbour(addr("198.19.2.0"), MAC_A, DEVICE)}
    assert got.fdb == {FdbEntry(MAC_A, addr("198.18.0.2"), DEVICE)}
    assert got.errors == {}


@pytest.mark.parametrize(("peer", "error"), [
    (lease("198.19.2.0/24", "198.18.0.2", "udp", {"Port": 8285}), "runs backend 'udp'"),
    (lease("198.19.2.0/24", "198.18.0.2", "vxlan", {}), "publishes no VtepMAC"),
    (lease("198.19.2.0/24", "198.18.0.2", "vxlan", {"VtepMAC": 5}), "publishes no VtepMAC"),
])
def test_vxlan_a_peer_it_cannot_use_is_that_peers_error_only(peer: Lease, error: str) -> None:
    good = lease("198.19.3.0/24", "198.18.0.3")
    got = vxlan.plan(VxlanOptions(), [peer, good], vxlan.VxlanFacts(DEVICE, UNDERLAY))
    assert error in got.errors["198.19.2.0/24"]
    assert {r.dst for r in got.routes} == {net("198.19.3.0/24")}


def test_vxlan_direct_routing_uses_a_plain_route_on_the_segment_only() -> None:
    peers = [lease("198.19.2.0/24", "198.18.0.2"), lease("198.19.3.0/24", "198.18.5.3")]
    got = vxlan.plan(VxlanOptions(DirectRouting=True), peers, vxlan.VxlanFacts(DEVICE, UNDERLAY))
    assert Route(net("198.19.2.0/24"), addr("198.18.0.2"), UNDERLAY.index) in got.routes
    assert Route(net("198.19.3.0/24"), addr("198.19.3.0"), DEVICE, onlink=True) in got.routes
    assert {f.dst for f in got.fdb} == {addr("198.18.5.3")}


def test_hostgw_routes_via_peers_on_the_segment_and_reports_the_rest() -> None:
    peers = [lease("198.19.2.0/24", "198.18.0.2", "host-gw"),
             lease("198.19.3.0/24", "198.18.7.3", "host-gw")]
    got = hostgw.plan(peers, UNDERLAY)
    assert got.routes == {Route(net("198.19.2.0/24"), addr("198.18.0.2"), UNDERLAY.index)}
    assert "not on this host's L2 subnet" in got.errors["198.19.3.0/24"]


def test_hostgw_no_peers_no_routes() -> None:
    assert hostgw.plan([], UNDERLAY) == hostgw.RoutePlan(frozenset(), {})


def test_udp_table_has_every_usable_peer_and_skips_our_own_lease() -> None:
    peers = [lease("198.19.1.0/24", "198.18.0.1", "udp"),           # ourselves
             lease("198.19.2.0/24", "198.18.0.2", "udp", {"Port": 9000}),
             lease("198.19.3.0/24", "198.18.0.3", "udp"),
             lease("198.19.4.0/24", "198.18.0.4", "vxlan"),
             lease("198.19.5.0/24", "2001:db8::5", "udp"),
             lease("198.19.6.0/24", "198.18.0.6", "udp", {"Port": "x"})]
    got = udp.plan(peers, own_ip=addr("198.18.0.1"), default_port=8285, version=4, subnet_len=24)
    assert got.table.describe() == {"198.19.2.0/24": "198.18.0.2:9000",
                                    "198.19.3.0/24": "198.18.0.3:8285"}
    assert set(got.errors) == {"198.19.4.0/24", "198.19.5.0/24", "198.19.6.0/24"}
