"""Route helpers the plans share. Pure."""

from __future__ import annotations

from weft.core.config import IPNetwork
from weft.core.dataplane import Route
from weft.core.host import UnderlayFacts
from weft.core.lease import Lease


def direct_route(peer: Lease, underlay: UnderlayFacts) -> Route | str:
    """The route to `peer`'s subnet straight through the underlay, or why there is none.
    An IPv6 subnet needs an IPv6 next hop (the kernel takes no IPv4 one for an IPv6
    route): over an IPv4 underlay, the peer's PublicIPv6."""
    if peer.subnet.version != peer.public_ip.version:
        return _via_ipv6(peer, peer.subnet, underlay)
    if not underlay.on_link(peer.public_ip):
        subnets = ", ".join(str(a.network) for a in underlay.addresses) or "no address"
        return (
            f"peer {peer.public_ip} is not on this host's L2 subnet ({subnets}); "
            "host-gw needs every host on one segment: use vxlan for this network"
        )
    return Route(peer.subnet, peer.public_ip, underlay.index)


def direct_ipv6_route(peer: Lease, underlay: UnderlayFacts) -> Route | str:
    """The route to a dual-stack `peer`'s IPv6 subnet straight through the underlay: via
    its PublicIPv6 on this host's IPv6 segment, or why there is none."""
    assert peer.ipv6_subnet is not None
    return _via_ipv6(peer, peer.ipv6_subnet, underlay)


def _via_ipv6(peer: Lease, subnet: IPNetwork, underlay: UnderlayFacts) -> Route | str:
    if subnet.version != 6:
        # An IPv4 subnet of a peer on an IPv6 underlay (an IPv4 route via an IPv6 gateway,
        # RTA_VIA, is not used).
        return (f"peer {peer.public_ip} has no IPv4 underlay address: IPv4 subnet {subnet} is "
                "routed straight only via an IPv4 next hop")
    via = peer.public_ip if peer.public_ip.version == 6 else peer.public_ipv6
    if via is None:
        return (f"peer {peer.public_ip} publishes no PublicIPv6, and the kernel routes "
                f"IPv6 subnet {subnet} only via an IPv6 next hop")
    if not underlay.on_link(via):
        six = ", ".join(str(a.network) for a in underlay.addresses if a.version == 6)
        return (f"peer {peer.public_ip}'s IPv6 address {via} is not on this host's IPv6 "
                f"segment ({six or 'no IPv6 address'}); host-gw needs every host on one "
                "segment: use vxlan for this network")
    return Route(subnet, via, underlay.index)
