"""vxlan's plan: per peer, a route, a neighbour and an FDB entry. Pure.

Per peer: a route to its subnet via the peer's VTEP address (its subnet's network address)
onlink through the VXLAN device, a permanent neighbour entry mapping that address to the
peer's VTEP MAC, and an FDB entry sending that MAC to the peer's public IP. With
DirectRouting, a peer on the same L2 subnet gets a plain route instead.

In dual stack the peer's IPv6 subnet is routed via the link-local address (EUI-64, what
its device calls itself) of a VTEP MAC, with a neighbour entry for it: where both hosts
have an IPv6 underlay address beside an IPv4 PublicIP, through a second VXLAN device on
the IPv6 underlay, to the peer's PublicIPv6 and its BackendV6Data VtepMAC (flannel's
flannel-v6 device); otherwise through the same device as its IPv4 subnet, to the same
public IP and MAC (inner packets of either family ride it). Link-local, not the IPv6 subnet's
network address: the kernel checks an IPv6 `onlink` gateway against the main table and
refuses it while another plane's route covers it there (auto's tables, a plane switch),
and checks a link-local one against nothing. With DirectRouting the IPv6 subnet is routed
straight only via a PublicIPv6 on this host's IPv6 segment.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from weft.backends.base import Delta, backend_mismatch, delta
from weft.backends.routes import direct_ipv6_route, direct_route
from weft.backends.vxlan.options import VxlanOptions
from weft.core.dataplane import FdbEntry, Neighbour, Route
from weft.core.host import UnderlayFacts
from weft.core.lease import Lease


@dataclass(frozen=True)
class VxlanFacts:
    device_index: int
    underlay: UnderlayFacts
    # Dual stack with an IPv6 underlay address beside an IPv4 PublicIP: the second VXLAN
    # device, on the IPv6 underlay, that carries the IPv6 overlay to peers with one too.
    device6_index: int | None = None


@dataclass(frozen=True)
class VxlanPlan:
    fdb: frozenset[FdbEntry]
    neighbours: frozenset[Neighbour]
    routes: frozenset[Route]
    errors: Mapping[str, str] = field(default_factory=dict)  # peer subnet -> why not


@dataclass(frozen=True)
class VxlanDelta:
    """A change to the three tables, in the order it is applied: stale routes, neighbours
    and FDB entries go first, then FDB, neighbours and routes are added (a new route never
    points at an unknown MAC)."""

    fdb: Delta[FdbEntry]
    neighbours: Delta[Neighbour]
    routes: Delta[Route]
    errors: Mapping[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.fdb) + len(self.neighbours) + len(self.routes)


def neighbour_key(n: Neighbour) -> object:
    return (n.ip, n.ifindex)  # the kernel keeps one neighbour per address and device


def route_key(r: Route) -> object:
    return r.dst  # `replace` keeps one weft route per destination


def difference(wanted: VxlanPlan, actual: VxlanPlan) -> VxlanDelta:
    """What turns `actual` into `wanted`: the full reconcile's plan against a dump."""
    return VxlanDelta(delta(wanted.fdb, actual.fdb),
                      delta(wanted.neighbours, actual.neighbours, neighbour_key),
                      delta(wanted.routes, actual.routes, route_key), wanted.errors)


def incremental(options: VxlanOptions, removed: Sequence[Lease], added: Sequence[Lease],
                facts: VxlanFacts) -> VxlanDelta:
    """The change a store event makes, from the changed peers alone (their old leases in
    `removed`, new ones in `added`). Every entry belongs to one peer (its subnet, its VTEP
    address, its public IP), so the entries of the other peers cannot change."""
    return difference(plan(options, added, facts), plan(options, removed, facts))


def link_local(mac: str) -> ipaddress.IPv6Address:
    """fe80::/64 with the EUI-64 interface id of `mac` (universal/local bit flipped)."""
    octets = bytes.fromhex(mac.replace(":", ""))
    eui = bytes((octets[0] ^ 0x02,)) + octets[1:3] + b"\xff\xfe" + octets[3:6]
    return ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + eui)


def plan(options: VxlanOptions, peers: Sequence[Lease], facts: VxlanFacts) -> VxlanPlan:
    fdb: set[FdbEntry] = set()
    neighbours: set[Neighbour] = set()
    routes: set[Route] = set()
    errors: dict[str, str] = {}
    for peer in peers:
        mac = peer.backend_data.get("VtepMAC")
        problem = backend_mismatch(peer, "vxlan")
        if problem is None and not isinstance(mac, str):
            problem = f"peer {peer.public_ip} publishes no VtepMAC"
        if problem is not None:
            errors[str(peer.subnet)] = problem
            continue
        assert isinstance(mac, str)
        # (subnet, VTEP MAC, device, outer destination, the direct route if any)
        halves = [(peer.subnet, mac, facts.device_index, peer.public_ip, direct_route)]
        if peer.ipv6_subnet is not None:
            mac6 = (peer.backend_v6_data or {}).get("VtepMAC")
            if facts.device6_index is not None and peer.public_ipv6 is not None \
                    and isinstance(mac6, str):
                # Both ends have an IPv6 underlay: its own device, to its PublicIPv6.
                halves.append((peer.ipv6_subnet, mac6, facts.device6_index, peer.public_ipv6,
                               direct_ipv6_route))
            else:
                # Over the IPv4 device, to the MAC of the peer's IPv4 device.
                halves.append((peer.ipv6_subnet, mac, facts.device_index, peer.public_ip,
                               direct_ipv6_route))
        for subnet, vtep_mac, device, outer, direct_to in halves:
            if options.direct_routing:
                direct = direct_to(peer, facts.underlay)
                if isinstance(direct, Route):
                    routes.add(direct)
                    continue
            vtep = subnet.network_address if subnet is peer.subnet else link_local(vtep_mac)
            # A link-local gateway is on the link by definition (no `onlink` to ask for).
            routes.add(Route(subnet, vtep, device, onlink=not vtep.is_link_local))
            neighbours.add(Neighbour(vtep, vtep_mac, device))
            fdb.add(FdbEntry(vtep_mac, outer, device))
    return VxlanPlan(frozenset(fdb), frozenset(neighbours), frozenset(routes), errors)
