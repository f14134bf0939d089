"""Backend plans of dual-stack peers: both halves of each lease become kernel objects, and
an IPv6 subnet is routed straight only via an IPv6 next hop on this host's segment."""

from __future__ import annotations

import ipaddress

from weft.backends.hostgw import plan as hostgw
from weft.backends.routes import direct_route
from weft.backends.vxlan import plan as vxlan
from weft.backends.vxlan.options import VxlanOptions
from weft.backends.wireguard.plan import peer_sets
from weft.core.dataplane import FdbEntry, Neighbour, Route
from weft.core.host import UnderlayFacts
from weft.core.lease import Lease

net = ipaddress.ip_network
addr = ipaddress.ip_address
V4_ONLY = UnderlayFacts(2, (ipaddress.ip_interface("198.18.0.1/24"),))
DUAL = UnderlayFacts(2, (ipaddress.ip_interface("198.18.0.1/24"),
                         ipaddress.ip_interface("2001:db8:ff::1/64")))
MAC, MAC6 = "02:00:00:00:00:0a", "02:00:00:00:00:1a"


def peer(n: int, backend: str = "vxlan", public_ipv6: str | None = None,
         data: dict[str, object] | None = None) -> Lease:
    return Lease(net(f"198.19.{n}.0/24"), addr(f"198.18.0.{n}"), backend,
                 data if data is not None else {"VtepMAC": MAC},
                 ipv6_subnet=ipaddress.IPv6Network(f"2001:db8:1:{n}::/64"),
                 public_ipv6=ipaddress.IPv6Address(public_ipv6) if public_ipv6 else None,
                 backend_v6_data={"VtepMAC": MAC6} if backend == "vxlan" else None)


def test_vxlan_routes_both_halves_through_the_device_to_one_public_ip() -> None:
    """No IPv6 underlay device: the IPv6 half rides the IPv4 device, to the peer's IPv4
    device's MAC (BackendV6Data's is its IPv6 device's, which this path never reaches)."""
    got = vxlan.plan(VxlanOptions(), [peer(2)], vxlan.VxlanFacts(7, V4_ONLY))
    ll = addr("fe80::ff:fe00:a")  # MAC's EUI-64 link-local address
    assert got.routes == {Route(net("198.19.2.0/24"), addr("198.19.2.0"), 7, onlink=True),
                          Route(net("2001:db8:1:2::/64"), ll, 7)}
    assert got.neighbours == {Neighbour(addr("198.19.2.0"), MAC, 7), Neighbour(ll, MAC, 7)}
    assert got.fdb == {FdbEntry(MAC, addr("198.18.0.2"), 7)}
    assert got.errors == {}


def test_vxlan_carries_ipv6_over_the_ipv6_underlay_where_both_ends_have_one() -> None:
    facts = vxlan.VxlanFacts(7, DUAL, device6_index=9)
    both = vxlan.plan(VxlanOptions(), [peer(2, public_ipv6="2001:db8:ff::2")], facts)
    ll6 = addr("fe80::ff:fe00:1a")  # MAC6's: the peer's IPv6 underlay device
    assert Route(net("2001:db8:1:2::/64"), ll6, 9) in both.routes
    assert Neighbour(ll6, MAC6, 9) in both.neighbours
    assert both.fdb == {FdbEntry(MAC, addr("198.18.0.2"), 7),
                        FdbEntry(MAC6, addr("2001:db8:ff::2"), 9)}
    # A peer without an IPv6 underlay address: its IPv6 half over the IPv4 device.
    lone = vxlan.plan(VxlanOptions(), [peer(3)], facts)
    assert Route(net("2001:db8:1:3::/64"), addr("fe80::ff:fe00:a"), 7) in lone.routes
    assert lone.fdb == {FdbEntry(MAC, addr("198.18.0.3"), 7)}


def test_vxlan_direct_routing_takes_ipv6_straight_only_via_an_ipv6_next_hop() -> None:
    options = VxlanOptions(DirectRouting=True)
    on_segment = vxlan.plan(options, [peer(2, public_ipv6="2001:db8:ff::2")],
                            vxlan.VxlanFacts(7, DUAL))
    assert on_segment.routes == {Route(net("198.19.2.0/24"), addr("198.18.0.2"), 2),
                                 Route(net("2001:db8:1:2::/64"), addr("2001:db8:ff::2"), 2)}
    # No PublicIPv6: the IPv6 half falls back to the VXLAN device, the IPv4 half is direct.
    without = vxlan.plan(options, [peer(2)], vxlan.VxlanFacts(7, DUAL))
    assert without.routes == {Route(net("198.19.2.0/24"), addr("198.18.0.2"), 2),
                              Route(net("2001:db8:1:2::/64"), addr("fe80::ff:fe00:a"), 7)}


def test_hostgw_routes_ipv6_via_the_peers_ipv6_address_and_reports_a_half_it_cannot() -> None:
    peers = [peer(2, "host-gw", "2001:db8:ff::2", {}), peer(3, "host-gw", None, {}),
             peer(4, "host-gw", "2001:db8:77::4", {})]
    got = hostgw.plan(peers, DUAL)
    assert got.routes == {
        Route(net("198.19.2.0/24"), addr("198.18.0.2"), 2),
        Route(net("2001:db8:1:2::/64"), addr("2001:db8:ff::2"), 2),
        Route(net("198.19.3.0/24"), addr("198.18.0.3"), 2),  # the IPv4 half still works
        Route(net("198.19.4.0/24"), addr("198.18.0.4"), 2)}
    assert "publishes no PublicIPv6" in got.errors["198.19.3.0/24"]
    assert "2001:db8:77::4 is not on this host's IPv6 segment (2001:db8:ff::/64)" in \
        got.errors["198.19.4.0/24"]
    # A host without IPv6 on its underlay says so for every peer's IPv6 half.
    alone = hostgw.plan(peers[:1], V4_ONLY)
    assert "(no IPv6 address)" in alone.errors["198.19.2.0/24"]


def test_an_ipv6_network_over_an_ipv4_underlay_is_no_direct_route_but_why() -> None:
    """The bug of issue 28: a route to an IPv6 subnet via an IPv4 gateway, which the kernel
    refuses ("Numerical result out of range") for every peer."""
    six_only = Lease(net("2001:db8:1:1e::/64"), addr("198.18.0.11"), "host-gw", {})
    route = direct_route(six_only, V4_ONLY)
    assert isinstance(route, str)
    assert "the kernel routes IPv6 subnet 2001:db8:1:1e::/64 only via an IPv6 next hop" in route
    with_v6 = Lease(net("2001:db8:1:1e::/64"), addr("198.18.0.11"), "host-gw", {},
                    public_ipv6=ipaddress.IPv6Address("2001:db8:ff::11"))
    assert direct_route(with_v6, DUAL) == Route(net("2001:db8:1:1e::/64"),
                                                addr("2001:db8:ff::11"), 2)


def test_wireguard_allows_both_subnets_of_a_peer() -> None:
    from weft.backends.wireguard.keys import PrivateKey

    key = PrivateKey.generate().public_key()
    own = PrivateKey.generate().public_key()
    sets = peer_sets([peer(2, "wireguard", data={"PublicKey": key.to_base64()})],
                     own, 51820, 0, None)
    assert sets.errors == {}
    assert sets.peers[key].allowed_ips == {net("198.19.2.0/24"), net("2001:db8:1:2::/64")}


def test_wireguard_sends_ipv6_on_the_ipv6_device_only_where_both_ends_have_one() -> None:
    """This host has the IPv6 underlay device: a peer with one too (PublicIPv6 and a
    BackendV6Data Port) gets its IPv6 subnet there, to [PublicIPv6]:Port, and only its IPv4
    subnet on the IPv4 device; a peer without (no PublicIPv6, or BackendV6Data that is
    BackendData's copy: an older weft) keeps both on the IPv4 device, and says why."""
    from weft.backends.wireguard.keys import PrivateKey

    own = PrivateKey.generate().public_key()
    k2, k3, k4 = (PrivateKey.generate().public_key() for _ in range(3))

    def wg(n: int, key: str, public_ipv6: str | None, data6: dict[str, object]) -> Lease:
        lease = peer(n, "wireguard", public_ipv6, {"PublicKey": key})
        return Lease(lease.subnet, lease.public_ip, "wireguard", lease.backend_data,
                     ipv6_subnet=lease.ipv6_subnet, public_ipv6=lease.public_ipv6,
                     backend_v6_data=data6)

    both = wg(2, k2.to_base64(), "2001:db8:ff::2", {"PublicKey": k2.to_base64(), "Port": 51821})
    lone = wg(3, k3.to_base64(), None, {"PublicKey": k3.to_base64()})
    older = wg(4, k4.to_base64(), "2001:db8:ff::4", {"PublicKey": k4.to_base64()})
    sets = peer_sets([both, lone, older], own, 51820, 0, None, ipv6_underlay=True)
    assert sets.errors == {}
    assert sets.peers[k2].allowed_ips == {net("198.19.2.0/24")}
    assert sets.peers[k2].endpoint == (addr("198.18.0.2"), 51820)
    assert sets.peers6[k2].allowed_ips == {net("2001:db8:1:2::/64")}
    assert sets.peers6[k2].endpoint == (addr("2001:db8:ff::2"), 51821)
    assert set(sets.peers6) == {k2}
    assert sets.peers[k3].allowed_ips == {net("198.19.3.0/24"), net("2001:db8:1:3::/64")}
    assert sets.peers[k4].allowed_ips == {net("198.19.4.0/24"), net("2001:db8:1:4::/64")}
    assert sets.over_ipv4 == {
        net("2001:db8:1:3::/64"): "the peer publishes no PublicIPv6",
        net("2001:db8:1:4::/64"): "the peer has no WireGuard device on the IPv6 underlay "
                                  "(no BackendV6Data Port)"}
    # Without the IPv6 device here, every peer's IPv6 subnet rides the IPv4 device.
    plain = peer_sets([both, lone], own, 51820, 0, None)
    assert plain.peers6 == {}
    assert plain.over_ipv4 == {}
    assert plain.peers[k2].allowed_ips == {net("198.19.2.0/24"), net("2001:db8:1:2::/64")}


def test_wireguard_ipv6_port_and_its_ingress_rule() -> None:
    """ListenPortV6 (flannel's, 51821) is the IPv6 device's; never ListenPort's. UDP to it
    takes the encapsulation port's member check, where members6 exists."""
    import pydantic
    import pytest

    from weft.backends.registry import backend_facts, parse_config
    from weft.backends.wireguard.options import WireguardOptions, wireguard_data_problem
    from weft.host.ingress_rules import ingress_plan, ingress_ruleset

    assert WireguardOptions().port6 == 51821
    assert WireguardOptions(ListenPort=51821).port6 == 51822
    assert WireguardOptions(ListenPortV6=4000).port6 == 4000
    with pytest.raises(pydantic.ValidationError, match="ListenPortV6 5 is ListenPort's too"):
        WireguardOptions(ListenPort=5, ListenPortV6=5)
    assert wireguard_data_problem({"PublicKey": "A" * 43 + "=", "Port": "51821"}) == \
        "Port '51821' is not a UDP port (1-65535)"
    config = parse_config('{"Network": "198.19.0.0/16", "EnableIPv6": true, '
                          '"IPv6Network": "2001:db8:1::/48", "Backend": {"Type": "wireguard"}}')
    facts = backend_facts(config.backend, "eth0", dual_stack=True)
    assert facts.tunnels == ("weft.wg0", "weft.wg0v6")
    assert (facts.encap_port, facts.encap_port6) == (51820, 51821)
    own, a = peer(1), peer(2, public_ipv6="2001:db8:ff::2")
    script = ingress_ruleset(ingress_plan(config, addr("198.18.0.1"), own, [a], port=51820,
                                          public_ipv6=addr("2001:db8:ff::1"), port6=51821))
    assert "add rule inet weft-ingress prerouting udp dport 51821 jump encap" in script
    # No IPv6 underlay address here: no such device, no rule.
    alone = ingress_ruleset(ingress_plan(config, addr("198.18.0.1"), own, [a], port=51820,
                                         port6=51821))
    assert "51821" not in alone


def test_auto_chooses_per_peer_and_per_family() -> None:
    """A peer on this host's segment with a PublicIPv6 there: both families on host-gw.
    One on the segment without: IPv4 on host-gw, IPv6 on vxlan (the next candidate that
    carries it). One off the segment: both on vxlan."""
    from weft.backends.auto import plan as auto
    from weft.backends.auto.options import AutoOptions

    data = {"hostgw": {}, "vxlan": {"VtepMAC": MAC, "Port": 8472}, "udp": {"Port": 8285}}
    near6 = peer(2, "auto", "2001:db8:ff::2", data)
    near = peer(3, "auto", None, data)
    far = Lease(net("198.19.4.0/24"), addr("198.18.9.4"), "auto", data,
                ipv6_subnet=ipaddress.IPv6Network("2001:db8:1:4::/64"), backend_v6_data=data)
    peers = [near6, near, far]
    paths = {p.subnet: auto.initial(auto.candidates(p, DUAL)) for p in peers}
    got = auto.plan(AutoOptions(), peers, paths, auto.AutoFacts(7, 8, DUAL),
                    own_ip=addr("198.18.0.1"), version=4, subnet_len=24, ipv6_subnet_len=64)
    assert got.ipv6_planes == {near6.subnet: "host-gw", near.subnet: "vxlan",
                               far.subnet: "vxlan"}
    assert Route(net("2001:db8:1:2::/64"), addr("2001:db8:ff::2"), 2) in got.main
    assert Route(net("2001:db8:1:3::/64"), addr("fe80::ff:fe00:a"), 7) in got.main
    assert Route(net("198.19.3.0/24"), addr("198.18.0.3"), 2) in got.main
    # Every plane's own table carries each family it can, for the probes and fallbacks.
    assert {r.dst for r in got.tables["udp"]} == {s for p in peers for s in p.subnets}
    assert got.udp_peers.six is not None
    assert len(got.udp_peers.six.routes) == 3


def test_ingress_accepts_the_members_ipv6_underlay_addresses_and_guards_ipv6_sources() -> None:
    from weft.backends.registry import parse_config
    from weft.host.ingress_rules import (
        ingress_delta,
        ingress_plan,
        ingress_ruleset,
        ingress_update,
        same_shape,
    )

    config = parse_config('{"Network": "198.19.0.0/16", "EnableIPv6": true, '
                          '"IPv6Network": "2001:db8:1::/48"}')
    own = peer(1)
    a, b = peer(2, public_ipv6="2001:db8:ff::2"), peer(3)
    plan = ingress_plan(config, addr("198.18.0.1"), own, [a], port=8472,
                        public_ipv6=addr("2001:db8:ff::1"))
    assert plan.members6 == frozenset({(addr("2001:db8:ff::2"), 8472)})
    script = ingress_ruleset(plan)
    for line in ("add element inet weft-ingress members6 { 2001:db8:ff::2 }",
                 "add rule inet weft-ingress encap ip6 saddr @members6 accept",
                 "add element inet weft-ingress subnets6 { 2001:db8:1:1::/64, "
                 "2001:db8:1:2::/64 }",
                 "add rule inet weft-ingress prerouting ip6 saddr 2001:db8:1::/48 ip6 saddr "
                 "!= @subnets6 counter name spoofed_source drop"):
        assert line in script, line
    assert "notrack" not in script  # the conntrack decision made none
    # Untracked: a member's encapsulated packets to this host's IPv6 underlay address skip
    # conntrack as the IPv4 underlay's do (the masquerade table untracks those it sends).
    from weft.host.untrack import Untrack

    untracked = ingress_ruleset(ingress_plan(
        config, addr("198.18.0.1"), own, [a], port=8472, public_ipv6=addr("2001:db8:ff::1"),
        untrack=Untrack(addr("198.19.1.0"), addr("198.18.0.1"), 8472,
                        addr("2001:db8:ff::1"))))
    assert "add rule inet weft-ingress encap ip6 daddr 2001:db8:ff::1 ip6 saddr @members6 " \
        "notrack accept" in untracked
    after = ingress_update(config, addr("198.18.0.1"), plan, [], [b])
    assert same_shape(plan, after)
    assert "add element inet weft-ingress subnets6 { 2001:db8:1:3::/64 }" in \
        ingress_delta(plan, after).script
    # A single-family network's table is what it was: no IPv6 sets or rules.
    v4 = parse_config('{"Network": "198.19.0.0/16"}')
    single = ingress_ruleset(ingress_plan(v4, addr("198.18.0.1"),
                                          Lease(net("198.19.1.0/24"), addr("198.18.0.1"),
                                                "vxlan", {}), [], port=8472))
    assert "ip6" not in single
    assert "subnets6" not in single
