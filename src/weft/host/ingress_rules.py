"""The underlay ingress filter, pure: leases -> the nftables script that guards this host.

Two guards in one table (`inet weft-ingress`), both rebuilt from the lease view on every
reconcile (level-based: a hand-deleted table or a stale member is repaired by the next pass):

- **Encapsulation port only from members** (vxlan, udp, wireguard): a packet to the
  backend's UDP port is accepted only from a member's public IP (for udp: its IP *and*
  port, from its lease); everything else to that port is dropped and counted, whether it is
  for this host (`non_member`) or on its way from a local container to a peer's port
  (`to_peer_port`): masquerade would give it this host's address, which peers accept, so it
  must die here, before postrouting.
- **Overlay source only from where it can come** (every backend, host-gw included): a
  packet claiming an overlay source must name a leased subnet and arrive on the interface
  the route back to that source uses (a strict reverse-path check, `fib saddr . iif`), so
  a peer's subnet only through the tunnel device, this host's only from its containers'
  side. Not one interface name: a second underlay link is covered too (`spoofed_source`).

In dual stack the overlay-source guard holds for the IPv6 network too (its own set of
leased subnets, `subnets6`, and the same rules in `ip6`).

Counters are named objects, so replacing the rules and set elements keeps their values.
Pure: no I/O; the edge (`weft.host.ingress`) runs the script and reads the counters.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from weft.core.config import IPAddress, IPNetwork, NetworkConfig
from weft.core.lease import Lease, subnet_range
from weft.host.untrack import Untrack

INGRESS_TABLE = "weft-ingress"
COUNTERS = ("non_member", "to_peer_port", "spoofed_source")
_CHAIN = "prerouting"
_ENCAP = "encap"  # the encapsulation port's rules, jumped to by UDP to that port only


@dataclass(frozen=True)
class IngressPlan:
    backend: str
    network: IPNetwork
    underlay_version: int
    port: int | None  # the encapsulation port; None: host-gw, nothing encapsulated
    by_port: bool  # udp: a member is (IP, port)
    members: frozenset[tuple[IPAddress, int]]  # (public IP, port) of every peer
    subnets: frozenset[IPNetwork]  # every leased subnet, this host's included
    # auto: a peer may send on another plane than ours back to it, so a peer's source
    # is checked against every device a plane arrives on (not the reverse route's one),
    # while this host's own subnet still only comes from its containers' side.
    peer_iifs: frozenset[str] = frozenset()
    own: IPNetwork | None = None
    # Overlay <-> overlay and this host's encapsulated packets skip conntrack (the
    # masquerade decision). Done here, in the one base chain every packet walks anyway,
    # instead of in a second table's chain on the same hook.
    untrack: Untrack | None = None
    # Dual stack: the IPv6 network and this host's IPv6 subnet (`subnets` holds the
    # leased subnets of both families).
    network6: IPNetwork | None = None
    own6: IPNetwork | None = None
    # Dual stack over an IPv4 underlay on a host with an IPv6 underlay address too: the
    # members' IPv6 underlay addresses (encapsulated IPv6 overlay arrives from them, vxlan's
    # second device, wireguard's), with `by_port` their ports (udp's second socket, the
    # port from each peer's BackendV6Data); None: no such set.
    members6: frozenset[tuple[IPAddress, int]] | None = None
    # The encapsulation port on the IPv6 underlay when it is another (wireguard's second
    # device): UDP to it takes the same member check, against `members6`.
    port6: int | None = None
    # With `by_port`: the key a peer's BackendV6Data must hold as true for its port to be
    # a member6 (the backend's facts: a copy of BackendData there names no such socket).
    marker6: str | None = None


def _peer_port(lease: Lease, default: int, data: Mapping[str, Any] | None = None
               ) -> int | None:
    port = (lease.backend_data if data is None else data).get("Port", default)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        return None  # the backend reports this peer's bad data; it is no member here
    return port


def ingress_plan(config: NetworkConfig, public_ip: IPAddress, own: Lease,
                 peers: Iterable[Lease], *, port: int | None, by_port: bool = False,
                 peer_iifs: Iterable[str] = (), untrack: Untrack | None = None,
                 public_ipv6: IPAddress | None = None,
                 port6: int | None = None, marker6: str | None = None) -> IngressPlan:
    """The plan for this host. `port`, `by_port`, `peer_iifs`, `port6` and `marker6` are
    the backend's facts (`weft.backends.base.BackendFacts`: its encapsulation port, members
    as (address, port), the devices a peer's source may arrive on, the IPv6 underlay's port
    if it is another, the key that says a peer listens there). Peers are validated leases; one of
    another IP version or with an unusable port is left out (it cannot send to us)."""
    members, subnets = _elements(config, public_ip, peers, port, by_port)
    six = config.ipv6
    own6 = own.ipv6_subnet if six is not None else None
    members6 = None
    if public_ipv6 is not None and port is not None and six is not None:
        members6 = frozenset(_members6(peers, public_ipv6, port, by_port, marker6))
    return IngressPlan(config.backend.type, config.network, public_ip.version,
                       port, by_port, frozenset(members),
                       frozenset(subnets | {own.subnet} | ({own6} if own6 else set())),
                       peer_iifs=frozenset(peer_iifs), own=own.subnet, untrack=untrack,
                       network6=six.network if six is not None else None, own6=own6,
                       members6=members6,
                       port6=port6 if members6 is not None and port6 != port else None,
                       marker6=marker6)


def _members6(peers: Iterable[Lease], public_ipv6: IPAddress | None, port: int,
              by_port: bool, marker6: str | None = None) -> set[tuple[IPAddress, int]]:
    """(IPv6 underlay address, port) of the peers that have one; `by_port`: only those
    whose BackendV6Data names the port their IPv6 socket listens on (and holds `marker6`
    as true, if given)."""
    members: set[tuple[IPAddress, int]] = set()
    for p in peers:
        if p.public_ipv6 is None or p.public_ipv6 == public_ipv6:
            continue
        if not by_port:
            members.add((p.public_ipv6, port))
        elif p.backend_v6_data is not None and (
                marker6 is None or p.backend_v6_data.get(marker6) is True):
            peer_port = _peer_port(p, port, p.backend_v6_data)
            if peer_port is not None:
                members.add((p.public_ipv6, peer_port))
    return members


def ingress_update(config: NetworkConfig, public_ip: IPAddress, plan: IngressPlan,
                   removed: Iterable[Lease], added: Iterable[Lease]) -> IngressPlan:
    """`plan` after a store event: `removed` are the changed peers' old leases, `added`
    their new ones (a changed peer is in both). O(changed) Python work: the elements of a
    validated view are one per peer (no two peers share a PublicIP or a subnet, and this
    host's own are no peer's), so taking a removed peer's out takes no one else's."""
    removed, added = list(removed), list(added)
    gone_members, gone_subnets = _elements(config, public_ip, removed, plan.port, plan.by_port)
    came_members, came_subnets = _elements(config, public_ip, added, plan.port, plan.by_port)
    members6 = plan.members6
    if members6 is not None and plan.port is not None:  # changed peers are never this host
        members6 = ((members6 - _members6(removed, None, plan.port, plan.by_port, plan.marker6))
                    | _members6(added, None, plan.port, plan.by_port, plan.marker6))
    return dataclasses.replace(plan, members=(plan.members - gone_members) | came_members,
                               subnets=(plan.subnets - gone_subnets) | came_subnets,
                               members6=members6)


def _elements(config: NetworkConfig, public_ip: IPAddress, peers: Iterable[Lease],
              port: int | None, by_port: bool
              ) -> tuple[set[tuple[IPAddress, int]], set[IPNetwork]]:
    """The members and subnets elements `peers` give."""
    members: set[tuple[IPAddress, int]] = set()
    subnets: set[IPNetwork] = set()
    in_range = subnet_range(config)
    six = config.ipv6
    for peer in peers:
        if in_range(peer.subnet):
            subnets.add(peer.subnet)
        if six is not None and peer.ipv6_subnet is not None \
                and six.index(peer.ipv6_subnet) is not None:
            subnets.add(peer.ipv6_subnet)
        if port is None or peer.public_ip == public_ip:
            continue
        if peer.public_ip.version != public_ip.version:
            continue
        peer_port = _peer_port(peer, port) if by_port else port
        if peer_port is not None:
            members.add((peer.public_ip, peer_port))
    return members, subnets


def ingress_ruleset(plan: IngressPlan) -> str:
    """The nft script: create what is missing, then replace set elements and rules in the
    same transaction (never half-applied; counters keep counting).

    Rule order is for the common packet: UDP to the encapsulation port jumps to its own
    chain (one rule for every other packet instead of three), and a source in this host's
    own subnet is done right after its reverse-path check. Every accept before the general
    checks accepts only packets those checks would pass too."""
    t = f"inet {INGRESS_TABLE}"
    ul = "ip" if plan.underlay_version == 4 else "ip6"
    ul_type = "ipv4_addr" if plan.underlay_version == 4 else "ipv6_addr"
    ov = "ip" if plan.network.version == 4 else "ip6"
    ov_type = "ipv4_addr" if plan.network.version == 4 else "ipv6_addr"
    members = member_elements(plan)
    if plan.by_port:
        member_type = f"{ul_type} . inet_service"
        match = f"{ul} saddr . udp sport @members"
        to_member = f"{ul} daddr . udp dport @members"
        member6_type, saddr6, daddr6 = ("ipv6_addr . inet_service", "ip6 saddr . udp sport",
                                        "ip6 daddr . udp dport")
    else:
        member_type = ul_type
        match = f"{ul} saddr @members"
        to_member = f"{ul} daddr @members"
        member6_type, saddr6, daddr6 = "ipv6_addr", "ip6 saddr", "ip6 daddr"
    untrack = plan.untrack
    # Packets to the host's own overlay address stay tracked: replies to what this host
    # masqueraded into the overlay must meet their conntrack entry.
    notrack = f"{ov} daddr != {untrack.own_address} notrack " if untrack else ""
    lines = [f"add table {t}"]
    lines += [f"add counter {t} {name}" for name in COUNTERS]
    lines += [
        f"add set {t} members {{ type {member_type}; }}",
        f"flush set {t} members",
        f"add set {t} subnets {{ type {ov_type}; flags interval; }}",
        f"flush set {t} subnets",
        *([f"add set {t} members6 {{ type {member6_type}; }}", f"flush set {t} members6"]
          if plan.members6 is not None else []),
        *([f"add set {t} subnets6 {{ type ipv6_addr; flags interval; }}",
           f"flush set {t} subnets6"] if plan.network6 is not None else []),
        f"add chain {t} {_CHAIN} {{ type filter hook prerouting priority raw; policy accept; }}",
        f"flush chain {t} {_CHAIN}",
    ]
    if plan.port is not None:
        lines += [f"add chain {t} {_ENCAP}", f"flush chain {t} {_ENCAP}"]
    else:
        # A backend without an encapsulation port (host-gw after vxlan): the chain's one
        # jump went with the flush above, so the chain itself can go in the same transaction.
        lines += [f"add chain {t} {_ENCAP}", f"delete chain {t} {_ENCAP}"]
    if plan.members:
        lines.append(f"add element {t} members {{ {', '.join(sorted(members))} }}")
    if plan.members6:
        lines.append(f"add element {t} members6 "
                     f"{{ {', '.join(sorted(member_elements(plan, 'members6')))} }}")
    lines.append(f"add element {t} subnets {{ {', '.join(sorted(subnet_elements(plan)))} }}")
    if plan.network6 is not None:
        lines.append(f"add element {t} subnets6 "
                     f"{{ {', '.join(sorted(subnet_elements(plan, 'subnets6')))} }}")
    rule = f"add rule {t} {_CHAIN}"
    if plan.port is not None:
        p = plan.port
        encap = f"add rule {t} {_ENCAP}"
        lines.append(f"{rule} udp dport {p} jump {_ENCAP}")
        if plan.port6 is not None:
            lines.append(f"{rule} udp dport {plan.port6} jump {_ENCAP}")
        if untrack is not None and untrack.public_ip.version == plan.underlay_version \
                and plan.underlay_version == plan.network.version:
            lines.append(f"{encap} {ul} daddr {untrack.public_ip} {match} notrack accept")
        lines.append(f"{encap} {match} accept")
        if plan.members6 is not None:
            for address, _ in untrack.encapsulations(6) if untrack is not None else ():
                lines.append(f"{encap} ip6 daddr {address} {saddr6} @members6 notrack accept")
            lines.append(f"{encap} {saddr6} @members6 accept")
        lines += [
            f"{encap} fib daddr type local counter name non_member drop",
            f"{encap} {to_member} counter name to_peer_port drop",
        ]
        if plan.members6 is not None:
            lines.append(f"{encap} {daddr6} @members6 counter name to_peer_port drop")
    lines.append(f"{rule} iif lo accept")  # the host talking to itself
    if plan.own is not None:
        # This host's own subnet (its containers' side: most of what it forwards): the
        # strict reverse-path check, then done; the leased-subnets rule would pass it.
        lines += [
            f"{rule} {ov} saddr {plan.own} fib saddr . iif oif missing "
            "counter name spoofed_source drop",
            f"{rule} {ov} saddr {plan.own} "
            + (f"{ov} daddr {plan.network} {notrack}" if untrack else "") + "accept",
        ]
    lines.append(f"{rule} {ov} saddr {plan.network} {ov} saddr != @subnets "
                 "counter name spoofed_source drop")
    if plan.peer_iifs and plan.own is not None:
        iifs = ", ".join(f'"{name}"' for name in sorted(plan.peer_iifs))
        lines.append(f"{rule} {ov} saddr {plan.network} {ov} saddr != {plan.own} "
                     f"iifname != {{ {iifs} }} counter name spoofed_source drop")
    else:
        lines.append(f"{rule} {ov} saddr {plan.network} fib saddr . iif oif missing "
                     "counter name spoofed_source drop")
    if untrack is not None:
        lines.append(f"{rule} {ov} saddr {plan.network} {ov} daddr {plan.network} "
                     + notrack.rstrip())
    if plan.network6 is not None:
        lines += _ipv6_guard(rule, plan.network6, plan.own6, plan.own, plan.peer_iifs)
    return "\n".join(lines) + "\n"


def _ipv6_guard(rule: str, network: IPNetwork, own: IPNetwork | None,
                own_v4: IPNetwork | None, peer_iifs: frozenset[str]) -> list[str]:
    """The overlay-source guard for a dual-stack network's IPv6 half: the IPv4 rules'
    twins in `ip6`, against `subnets6` (its overlay traffic stays tracked)."""
    lines: list[str] = []
    if own is not None:
        lines += [f"{rule} ip6 saddr {own} fib saddr . iif oif missing "
                  "counter name spoofed_source drop",
                  f"{rule} ip6 saddr {own} accept"]
    lines.append(f"{rule} ip6 saddr {network} ip6 saddr != @subnets6 "
                 "counter name spoofed_source drop")
    if peer_iifs and own is not None:
        iifs = ", ".join(f'"{name}"' for name in sorted(peer_iifs))
        lines.append(f"{rule} ip6 saddr {network} ip6 saddr != {own} "
                     f"iifname != {{ {iifs} }} counter name spoofed_source drop")
    else:
        lines.append(f"{rule} ip6 saddr {network} fib saddr . iif oif missing "
                     "counter name spoofed_source drop")
    return lines


def reset_script() -> str:
    """Remove the table whole (a host leaving, or a set whose type must change)."""
    return f"table inet {INGRESS_TABLE} {{}}\ndelete table inet {INGRESS_TABLE}\n"


def member_elements(plan: IngressPlan, name: str = "members") -> frozenset[str]:
    """A members set's elements as nft prints them: `IP`, or `IP . port` (udp); `members`
    holds the underlay's family, `members6` dual stack's IPv6 underlay addresses."""
    pairs = plan.members if name == "members" else plan.members6 or frozenset()
    if plan.by_port:
        return frozenset(f"{ip} . {port}" for ip, port in pairs)
    return frozenset(str(ip) for ip, _ in pairs)


def subnet_elements(plan: IngressPlan, name: str = "subnets") -> frozenset[str]:
    """A subnets set's elements as nft prints them (a one-address prefix without `/N`):
    `subnets` holds `network`'s family, `subnets6` a dual-stack network's IPv6 half."""
    version = plan.network.version if name == "subnets" else 6
    return frozenset(_nft_prefix(s) for s in plan.subnets if s.version == version)


def _nft_prefix(subnet: IPNetwork) -> str:
    return str(subnet.network_address) if subnet.prefixlen == subnet.max_prefixlen else str(subnet)


def same_shape(old: IngressPlan, new: IngressPlan) -> bool:
    """Only members or subnets differ: the table can follow by set elements alone."""
    def blank(plan: IngressPlan) -> IngressPlan:
        six = None if plan.members6 is None else frozenset[tuple[IPAddress, int]]()
        return dataclasses.replace(plan, members=frozenset(), subnets=frozenset(),
                                   members6=six)
    return blank(old) == blank(new)


@dataclass(frozen=True)
class IngressDelta:
    """Set elements to delete and add so that a table written for `old` holds `new`."""

    script: str  # one nft transaction; empty when nothing differs
    deleted: tuple[str, ...]  # the `delete element` lines `nft monitor` will echo, one each


def ingress_delta(old: IngressPlan, new: IngressPlan) -> IngressDelta:
    """The difference between two plans of the same shape (`same_shape`) as element
    updates: O(changed), no flush, so the sets keep every other element and the chain its
    counters. Deletions go first: a subnet that moves between two leases is never in twice
    (an interval set refuses an overlapping element)."""
    assert same_shape(old, new)
    t = f"inet {INGRESS_TABLE}"
    lines: list[str] = []
    deleted: list[str] = []
    added: list[str] = []
    # The difference first, on the plans' own values; only it is formatted (O(changed)).
    gone = dataclasses.replace(old, members=old.members - new.members,
                               subnets=old.subnets - new.subnets)
    came = dataclasses.replace(new, members=new.members - old.members,
                               subnets=new.subnets - old.subnets)
    sets = [("members", member_elements(gone), member_elements(came)),
            ("subnets", subnet_elements(gone), subnet_elements(came))]
    if old.members6 is not None and new.members6 is not None:
        gone6 = dataclasses.replace(old, members6=old.members6 - new.members6)
        came6 = dataclasses.replace(new, members6=new.members6 - old.members6)
        sets.append(("members6", member_elements(gone6, "members6"),
                     member_elements(came6, "members6")))
    if new.network6 is not None:
        sets.append(("subnets6", subnet_elements(gone, "subnets6"),
                     subnet_elements(came, "subnets6")))
    for name, before, after in sets:
        for element in sorted(before - after):
            line = f"delete element {t} {name} {{ {element} }}"
            lines.append(line)
            deleted.append(line)
        added += [f"add element {t} {name} {{ {e} }}" for e in sorted(after - before)]
    lines += added
    return IngressDelta("\n".join(lines) + "\n" if lines else "", tuple(deleted))


_ELEMENTS = re.compile(r"^(\s*)elements = \{([^}]*)\}\n", re.MULTILINE)
_SET_NAME = re.compile(r"^\s*set (\S+) \{", re.MULTILINE)


def split_listing(text: str) -> tuple[str, dict[str, frozenset[str]]]:
    """`nft list table` text -> (the table without its set elements, the elements of each
    set). Rules and set definitions are compared as text; elements as sets, since nft
    prints them in an order and line wrapping of its own."""
    elements: dict[str, frozenset[str]] = {}
    names = [(m.start(), m.group(1)) for m in _SET_NAME.finditer(text)]
    for match in _ELEMENTS.finditer(text):
        owner = [name for start, name in names if start < match.start()]
        if owner:
            items = (" ".join(e.split()) for e in match.group(2).split(","))
            elements[owner[-1]] = frozenset(e for e in items if e)
    return _ELEMENTS.sub("", text), elements
