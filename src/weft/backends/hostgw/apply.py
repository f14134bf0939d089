"""host-gw: plain kernel routes to each peer's subnet via the peer's public IP.

The fastest data plane there is (no encapsulation at all), but every host must be on one
L2 segment: a peer whose public IP is not on a connected subnet of the underlay cannot be
a gateway, and is reported as an error for that peer, not a crash.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from weft.backends.base import HostContext, ReconcileResult, converge
from weft.core.config import IPAddress, NetworkConfig
from weft.core.constants import overhead
from weft.core.lease import Lease
from weft.host.netlink import Netlink, Route


def direct_route(nl: Netlink, host: HostContext, peer: Lease) -> Route | str:
    """The route to `peer`'s subnet straight through the underlay, or why there is none."""
    link = nl.link(host.underlay_ifname)
    if link is None:
        return f"underlay interface {host.underlay_ifname} is gone"
    if not on_link(peer.public_ip, nl.addresses(link.index)):
        return (
            f"peer {peer.public_ip} is not on this host's L2 subnet "
            f"({', '.join(str(a.network) for a in nl.addresses(link.index))}); "
            "host-gw needs every host on one segment: use vxlan for this network"
        )
    return Route(peer.subnet, peer.public_ip, link.index)


def on_link(ip: IPAddress, addresses: Sequence[Any]) -> bool:
    return any(ip in a.network and ip != a.ip for a in addresses)


class HostGwBackend:
    def __init__(self, config: NetworkConfig, host: HostContext) -> None:
        self.config = config
        self.host = host
        self._last = ReconcileResult()

    def prepare(self) -> Mapping[str, Any]:
        return {}

    def activate(self, lease: Lease) -> int:
        return self.config.backend.mtu or self.host.underlay_mtu - overhead("host-gw")

    def reconcile(self, peers: Sequence[Lease]) -> ReconcileResult:
        errors: dict[str, str] = {}
        desired: set[Route] = set()
        with Netlink() as nl:
            for peer in peers:
                route = direct_route(nl, self.host, peer)
                if isinstance(route, str):
                    errors[str(peer.subnet)] = route
                else:
                    desired.add(route)
            actual = nl.routes(self.config.network.version)
            result = converge(desired, actual, nl.replace_route, nl.delete_route,
                              lambda r: str(r.dst))
        result.errors.update(errors)
        self._last = result
        return result

    def status(self) -> Mapping[str, Any]:
        return {"implementation": "kernel routes"}

    def close(self) -> None:
        pass

    def teardown(self) -> None:
        with Netlink() as nl:
            nl.delete_routes(self.config.network.version)
