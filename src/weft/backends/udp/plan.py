"""The `udp` forwarder's peer table, pure: which public IP carries which inner subnet.

The table is immutable and replaced as a whole on every reconcile (one reference
assignment, atomic for the forwarder threads), so a peer that leaves stops receiving and
sending at once.  Lookups are O(1): mask the inner address down to its subnet and look the
integer up in a dict. In dual stack the table of the IPv4 half carries the IPv6 half's as
`six` (the same members): a packet of the table's own version costs no extra lookup.

Where both hosts have an IPv6 underlay address beside an IPv4 PublicIP (the lease's
PublicIPv6, and BackendV6Data naming the port its forwarder listens on there), the peer's
IPv6 subnet goes to that IPv6 endpoint (the forwarder's second socket, on this host's IPv6
underlay address); otherwise to its IPv4 endpoint, as its IPv4 subnet does. The members
are then every endpoint of either family.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from weft.backends.base import backend_mismatch
from weft.backends.udp.options import IPV6_SOCKET
from weft.core.config import IPAddress, IPNetwork
from weft.core.lease import Lease

Endpoint = tuple[str, int]


class PeerDataError(ValueError):
    """A peer lease's BackendData cannot be used (reported per peer by reconcile)."""


@dataclass(frozen=True)
class Peer:
    subnet: IPNetwork
    public_ip: IPAddress
    port: int


def peer_port(backend_data: Mapping[str, Any], default: int) -> int:
    """The UDP port a peer listens on, from its lease's BackendData ({"Port": 8285})."""
    port = backend_data.get("Port", default)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise PeerDataError(f"BackendData Port {port!r} is not a UDP port (1-65535)")
    return port


@dataclass(frozen=True)
class PeerTable:
    """Inner subnet -> peer endpoint, for one network (IPv4 or IPv6) and one SubnetLen."""

    version: int
    subnet_len: int
    # masked inner address (int) -> (public ip, port) of the host that holds that subnet
    routes: Mapping[int, Endpoint] = field(default_factory=dict)
    # (public ip as the socket layer spells it, port) of every member: the only senders
    # heard. The port too: any process on a member host could send from its IP, only the
    # member's forwarder sends from its port.
    members: frozenset[Endpoint] = frozenset()
    # the subnet mask as an integer; computed once, read for every packet
    mask: int = field(init=False, repr=False, compare=False)
    # Dual stack: the IPv6 half's table (its members are this table's), for packets of the
    # other version than `version`; None otherwise.
    six: PeerTable | None = None

    def __post_init__(self) -> None:
        bits = 32 if self.version == 4 else 128
        object.__setattr__(self, "mask", ((1 << self.subnet_len) - 1) << (bits - self.subnet_len))

    @classmethod
    def build(cls, version: int, subnet_len: int, peers: Iterable[Peer]) -> PeerTable:
        routes: dict[int, Endpoint] = {}
        members: set[Endpoint] = set()
        for peer in peers:
            if peer.subnet.version != version or peer.subnet.prefixlen != subnet_len:
                raise PeerDataError(f"subnet {peer.subnet} is not a /{subnet_len} of IPv{version}")
            endpoint = (str(peer.public_ip), peer.port)
            routes[int(peer.subnet.network_address)] = endpoint
            members.add(endpoint)
        return cls(version, subnet_len, routes, frozenset(members))

    def route(self, inner_destination: int) -> Endpoint | None:
        """Where to send a packet for this inner address, or None (no peer holds it)."""
        return self.routes.get(inner_destination & self.mask)

    def owns(self, sender: Endpoint, inner_source: int) -> bool:
        """Does the member at `sender` (ip, port) hold the subnet of this inner source?"""
        return self.routes.get(inner_source & self.mask) == sender

    def describe(self) -> dict[str, str]:
        net = ipaddress.IPv4Network if self.version == 4 else ipaddress.IPv6Network
        described = {
            str(net((addr, self.subnet_len))): describe_endpoint(endpoint)
            for addr, endpoint in sorted(self.routes.items())
        }
        return described if self.six is None else described | self.six.describe()


    def for_version(self, version: int) -> PeerTable | None:
        """The table for inner packets of IP `version`: this one, its IPv6 half, or none."""
        if version == self.version:
            return self
        return self.six if version == 6 else None


def over_ipv6(endpoint: Endpoint) -> bool:
    """Whether `endpoint` is an IPv6 one (as the socket layer spells it)."""
    return ":" in endpoint[0]


def describe_endpoint(endpoint: Endpoint) -> str:
    """`ip:port`, an IPv6 address in brackets (RFC 3986)."""
    ip, port = endpoint
    return f"[{ip}]:{port}" if over_ipv6(endpoint) else f"{ip}:{port}"


@dataclass(frozen=True)
class UdpPlan:
    table: PeerTable
    errors: Mapping[str, str] = field(default_factory=dict)  # peer subnet -> why not
    # With this host's IPv6 underlay socket: peer IPv6 subnet -> why it rides IPv4.
    over_ipv4: Mapping[str, str] = field(default_factory=dict)


def plan(peers: Sequence[Lease], *, own_ip: IPAddress, default_port: int, version: int,
         subnet_len: int, ipv6_subnet_len: int | None = None,
         own_ipv6: IPAddress | None = None) -> UdpPlan:
    """The forwarder's table from the peer leases; a lease it cannot use is that peer's
    error. `ipv6_subnet_len`: a dual-stack network's (each peer's IPv6 subnet goes to the
    same endpoint as its IPv4 one, or, with `own_ipv6`, this host's IPv6 underlay address
    its forwarder listens on, to the peer's own IPv6 endpoint where it publishes one)."""
    errors: dict[str, str] = {}
    over_ipv4: dict[str, str] = {}
    accepted: list[Peer] = []
    accepted6: list[Peer] = []
    for lease in peers:
        if lease.public_ip == own_ip:
            continue  # our own lease: local traffic never enters the tunnel
        problem = backend_mismatch(lease, "udp")
        if problem is None and lease.public_ip.version != own_ip.version:
            problem = (f"peer {lease.public_ip} is IPv{lease.public_ip.version}, this host's "
                       f"underlay is IPv{own_ip.version}")
        if problem is None:
            try:
                peer = Peer(lease.subnet, lease.public_ip,
                            peer_port(lease.backend_data, default_port))
            except PeerDataError as exc:
                problem = f"peer {lease.public_ip}: {exc}"
            else:
                accepted.append(peer)
                if ipv6_subnet_len is not None and lease.ipv6_subnet is not None:
                    half, why = _ipv6_half(lease, peer, own_ipv6)
                    accepted6.append(half)
                    if why is not None:
                        over_ipv4[str(half.subnet)] = why
        if problem is not None:
            errors[str(lease.subnet)] = problem
    table = PeerTable.build(version, subnet_len, accepted)
    if ipv6_subnet_len is not None:
        six = PeerTable.build(6, ipv6_subnet_len, accepted6)
        members = table.members | six.members
        table = dataclasses.replace(table, members=members,
                                    six=dataclasses.replace(six, members=members))
    return UdpPlan(table, errors, over_ipv4)


def _ipv6_half(lease: Lease, peer: Peer, own_ipv6: IPAddress | None
               ) -> tuple[Peer, str | None]:
    """Where the peer's IPv6 subnet goes: its IPv6 endpoint when both ends have an IPv6
    underlay and the peer's forwarder listens there (its BackendV6Data's Port beside
    IPv6Socket true, which a host without that second socket never publishes: an earlier
    weft copies its BackendData there), else its IPv4 one; and, when this host has the
    IPv6 socket, why not that."""
    assert lease.ipv6_subnet is not None
    over_ipv4 = Peer(lease.ipv6_subnet, peer.public_ip, peer.port)
    if own_ipv6 is None:
        return over_ipv4, None
    if lease.public_ipv6 is None:
        return over_ipv4, f"peer {lease.public_ip} has no IPv6 underlay address (no PublicIPv6)"
    if lease.backend_v6_data is None or lease.backend_v6_data.get(IPV6_SOCKET) is not True:
        return over_ipv4, (f"peer {lease.public_ipv6} has no IPv6 underlay socket (no "
                           f"BackendV6Data {IPV6_SOCKET}: a forwarder of an earlier weft)")
    try:
        port = peer_port(lease.backend_v6_data, peer.port)
    except PeerDataError as exc:  # the validator refuses it first; IPv4 still carries it
        return over_ipv4, f"peer {lease.public_ipv6}: BackendV6Data {exc}"
    return Peer(lease.ipv6_subnet, lease.public_ipv6, port), None
