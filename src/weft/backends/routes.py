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
