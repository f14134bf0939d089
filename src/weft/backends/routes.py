"""Route helpers the plans share. Pure."""

from __future__ import annotations

from weft.core.dataplane import Route
from weft.core.host import UnderlayFacts
from weft.core.lease import Lease


def direct_route(peer: Lease, underlay: UnderlayFacts) -> Route | str:
    """The route to `peer`'s subnet straight through the underlay, or why there is none."""
    if not underlay.on_link(peer.public_ip):
        subnets = ", ".join(str(a.network) for a in underlay.addresses) or "no address"
        return (
            f"peer {peer.public_ip} is not on this host's L2 subnet ({subnets}); "
            "host-gw needs every host on one segment: use vxlan for this network"
        )
    return Route(peer.subnet, peer.public_ip, underlay.index)


def direct_ipv6_route(peer: Lease, underlay: UnderlayFacts) -> Route | str:
    """The route to a dual-stack `peer`'s IPv6 subnet straight through the underlay: via
    its PublicIPv6 on this host's IPv6 segment (the kernel takes no IPv4 next hop for an
    IPv6 route), or why there is none."""
    assert peer.ipv6_subnet is not None
    via = peer.public_ipv6 if peer.public_ip.version == 4 else peer.public_ip
    if via is None:
        return (f"peer {peer.public_ip} publishes no PublicIPv6: an IPv6 route needs an "
                "IPv6 next hop")
    if not underlay.on_link(via):
        six = ", ".join(str(a.network) for a in underlay.addresses if a.version == 6)
        return (f"peer {peer.public_ip}'s PublicIPv6 {via} is not on this host's IPv6 "
                f"segment ({six or 'no IPv6 address'})")
    return Route(peer.ipv6_subnet, via, underlay.index)
