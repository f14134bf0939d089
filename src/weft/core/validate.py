"""Every lease from the store is checked here, in one pure place, before it can reach a plan.

The store is outside weft's trust: anything with write access (or a bug, or a host that
came back late) can put a record there. A lease that fails is that peer's error, reported
per peer; every other peer keeps working and nothing of this host's own is ever replaced.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from weft.core.config import IPAddress, IPNetwork, NetworkConfig
from weft.core.lease import Lease, held_by, same_peer, subnet_range

DataCheck = Callable[[str, Mapping[str, Any]], str | None]

# Every backend's data is a few short fields (a MAC, a key, a port); a record far larger
# is not a lease, and would be carried into every pass, status answer and log line.
MAX_BACKEND_DATA = 4096  # bytes of JSON


@dataclass(frozen=True)
class TrustContext:
    """What a lease is checked against: the config and this host's own facts."""

    config: NetworkConfig
    host_ip: IPAddress
    own_subnet: IPNetwork | None
    underlay_networks: tuple[IPNetwork, ...]
    data_problem: DataCheck  # per backend: MAC, key, port (weft.backends.registry)
    now: float = 0.0  # seconds since the epoch: whether an accepted lease still runs
    own_ipv6_subnet: IPNetwork | None = None  # dual stack: this host's IPv6 subnet
    host_ipv6: IPAddress | None = None  # this host's IPv6 underlay address, if it has one


@dataclass(frozen=True)
class ValidatedView:
    peers: dict[IPNetwork, Lease]                              # usable, own lease excluded
    errors: dict[str, str] = field(default_factory=dict)       # subnet -> why not


def lease_problem(lease: Lease, ctx: TrustContext,
                  in_range: Callable[[IPNetwork], bool] | None = None) -> str | None:
    """Why `lease` must not reach the kernel, or None. Own lease: see `validate_view`.
    `in_range`: `subnet_range(ctx.config)`, computed once for a pass over many leases
    (building the range's bounds was half of a 5,000-lease pass)."""
    config, subnet, ip = ctx.config, lease.subnet, lease.public_ip
    if not (in_range or subnet_range(config))(subnet):
        return (f"subnet {subnet} is not a /{config.length} of Network {config.network} "
                f"between {config.first_subnet.network_address} and "
                f"{config.last_subnet.network_address}")
    problem = _overlaps_underlay("subnet", subnet, ctx) or _ipv6_half(lease, ctx)
    if problem is not None:
        return problem
    if (problem := _not_unicast("PublicIP", ip)) is not None:
        return problem
    if ip == ctx.host_ip:
        return f"PublicIP {ip} is this host's own address"
    if ip.version != ctx.host_ip.version:
        return f"PublicIP {ip} is IPv{ip.version}, this host's underlay is IPv{ctx.host_ip.version}"
    if (problem := _in_overlay("PublicIP", ip, config)) is not None:
        return problem
    return _data_problem("BackendData", lease.backend_type, lease.backend_data, ctx)


def _ipv6_half(lease: Lease, ctx: TrustContext) -> str | None:
    """The IPv6 half of a dual-stack lease (IPv6Subnet, PublicIPv6, BackendV6Data): a bad
    one is the whole peer's error, as a bad IPv4 half is."""
    six, subnet6 = ctx.config.ipv6, lease.ipv6_subnet
    if six is None:
        if subnet6 is not None:
            return (f"IPv6 subnet {subnet6} in a network that is not dual stack "
                    "(EnableIPv6 is not true)")
    elif subnet6 is None:
        return (f"no IPv6 subnet: the network is dual stack, its key must be "
                f"{lease.subnet.network_address}-{lease.subnet.prefixlen}&<IPv6 subnet>")
    elif six.index(subnet6) is None:
        return (f"IPv6 subnet {subnet6} is not a /{six.length} of IPv6Network {six.network} "
                f"between {six.first.network_address} and {six.last.network_address}")
    elif subnet6 == ctx.own_ipv6_subnet:
        return f"IPv6 subnet {subnet6} is this host's own"
    elif (problem := _overlaps_underlay("IPv6 subnet", subnet6, ctx)) is not None:
        return problem
    ip6 = lease.public_ipv6
    if ip6 is not None:
        if (problem := _not_unicast("PublicIPv6", ip6)) is not None:
            return problem
        if ip6 == ctx.host_ipv6 or ip6 == ctx.host_ip:
            return f"PublicIPv6 {ip6} is this host's own address"
        if (problem := _in_overlay("PublicIPv6", ip6, ctx.config)) is not None:
            return problem
    if lease.backend_v6_data is not None:
        return _data_problem("BackendV6Data", lease.backend_type, lease.backend_v6_data, ctx)
    return None


def _in_overlay(name: str, ip: IPAddress, config: NetworkConfig) -> str | None:
    for network, key in zip(config.networks, ("Network", "IPv6Network"), strict=False):
        if ip in network:
            return f"{name} {ip} is inside the overlay {key} {network}"
    return None


def _overlaps_underlay(what: str, subnet: IPNetwork, ctx: TrustContext) -> str | None:
    low, high = _bounds(subnet)  # not `overlaps`: it builds addresses, per lease per pass
    for underlay in ctx.underlay_networks:
        if underlay.version == subnet.version:
            u_low, u_high = _bounds(underlay)
            if low <= u_high and u_low <= high:
                return f"{what} {subnet} overlaps this host's underlay {underlay}"
    return None


def _not_unicast(name: str, ip: IPAddress) -> str | None:
    if (ip.is_multicast or ip.is_unspecified or ip.is_loopback or ip.is_link_local
            or (ip.is_reserved and ip.version == 4 and int(ip) == 0xFFFFFFFF)):
        return f"{name} {ip} is not a unicast host address"
    return None


def _data_problem(name: str, backend_type: str, data: Mapping[str, Any],
                  ctx: TrustContext) -> str | None:
    size = len(json.dumps(dict(data)))
    if size > MAX_BACKEND_DATA:
        return f"{name} is {size} bytes of JSON; at most {MAX_BACKEND_DATA} are accepted"
    problem = ctx.data_problem(backend_type, data)
    if problem is None or name == "BackendData":
        return problem
    return f"{name}: {problem}"


def _bounds(network: IPNetwork) -> tuple[int, int]:
    low = int(network.network_address)
    return low, low + (1 << (network.max_prefixlen - network.prefixlen)) - 1


def _without(previous: Mapping[IPNetwork, Lease],
             released: Collection[IPNetwork]) -> Mapping[IPNetwork, Lease]:
    """The last view less the released subnets (a copy in C and k pops, not a Python
    walk of N entries per store event)."""
    if not released:
        return previous
    kept = dict(previous)
    for subnet in released:
        kept.pop(subnet, None)
    return kept


_NAMED = 3  # other claimants an error names: k claims naming all others are O(k^2) text


def _some(claims: list[Lease], claim: Lease) -> str:
    """The first few other claims of one address, and how many more (k forged records on
    one address must cost O(k), not O(k^2), at every event touching it)."""
    others = [str(c.subnet) for c in claims[:_NAMED + 1] if c is not claim][:_NAMED]
    more = len(claims) - 1 - len(others)
    return ", ".join(others) + (f" and {more} more" if more else "")


Claim = tuple[str, IPAddress | IPNetwork]  # what only one host may hold, by field name


def _claims(lease: Lease) -> list[Claim]:
    claims: list[Claim] = [("PublicIP", lease.public_ip)]
    if lease.public_ipv6 is not None:
        claims.append(("PublicIPv6", lease.public_ipv6))
    if lease.ipv6_subnet is not None:
        claims.append(("IPv6 subnet", lease.ipv6_subnet))
    return claims


def _order(lease: Lease) -> tuple[int, int, int]:
    return lease.subnet.version, int(lease.subnet.network_address), lease.subnet.prefixlen


class ViewKeeper:
    """The validated view, kept by difference between passes (pure: dicts, no I/O).

    `full` checks every lease (start, resync, repair); `update` only the subnets a store
    event named: per-lease checks for those (and for the few subnets refused as an
    overwrite, whose answer moves with the clock), the duplicate-PublicIP check only for
    the addresses they held or claim (a by-PublicIP index), so a store event costs what it
    changed, not O(N) `ipaddress` hashing. Both give the view `validate_view` gives."""

    def __init__(self) -> None:
        self._ctx: TrustContext | None = None  # the last pass's, its clock left out
        self._answers: dict[IPNetwork, tuple[Lease, str | None]] = {}  # lease_problem's
        self._candidates: dict[IPNetwork, Lease] = {}  # passed the per-lease stage
        self._stage_errors: dict[IPNetwork, str] = {}  # per-lease and overwrite errors
        self._overwrites: set[IPNetwork] = set()  # refused while the accepted lease runs
        # Candidates by what only one host may hold (PublicIP; in dual stack also
        # PublicIPv6 and the IPv6 subnet), and those held back by a twin, per claim.
        self._by_ip: dict[Claim, dict[IPNetwork, None]] = {}
        self._duplicates: dict[IPNetwork, dict[Claim, str]] = {}
        self.view = ValidatedView({})

    def full(self, leases: Iterable[Lease], ctx: TrustContext,
             previous: Collection[IPNetwork] | Mapping[IPNetwork, Lease] | None = None,
             released: Collection[IPNetwork] = ()) -> ValidatedView:
        """Every lease checked (an unchanged one's answer taken from the last pass).
        `released`: subnets whose record was deleted since the last pass (released or
        expired): a new holder there took a free subnet, not a running lease."""
        if previous is None:
            previous = self.view.peers
        if isinstance(previous, Mapping):
            previous = _without(previous, released)
        elif released:
            previous = set(previous) - set(released)
        self._begin(ctx)
        accepted = previous if isinstance(previous, Mapping) else {}
        known, self._answers = self._answers, {}
        self._candidates, self._stage_errors, self._overwrites = {}, {}, set()
        self._by_ip, self._duplicates = {}, {}
        in_range = subnet_range(ctx.config)
        for lease in leases:
            self._stage(lease, ctx, accepted, known, in_range)
        for claim, claims in list(self._by_ip.items()):
            if len(claims) > 1:
                self._group(claim, previous)
        errors = {str(s): e for s, e in self._stage_errors.items()}
        errors.update((str(s), next(iter(e.values()))) for s, e in self._duplicates.items())
        peers = {s: c for s, c in self._candidates.items() if s not in self._duplicates}
        self.view = ValidatedView(peers, errors)
        return self.view

    def update(self, leases: Mapping[IPNetwork, Lease], changed: Iterable[IPNetwork],
               ctx: TrustContext, released: Collection[IPNetwork] = ()
               ) -> tuple[ValidatedView, set[IPNetwork] | None]:
        """The view after the store changed the leases of `changed` (put or deleted), and
        the subnets whose view entry may differ (None: all, after a new trust context).
        `released` as for `full` (each of them is in `changed`)."""
        if replace(ctx, now=0.0) != self._ctx:
            return self.full(leases.values(), ctx, released=released), None
        before = self.view
        previous = _without(before.peers, released)
        touched = set(changed) | self._overwrites | set(released)
        ips: set[Claim] = set()
        in_range = subnet_range(ctx.config)
        for subnet in touched:
            lease = leases.get(subnet)
            held = self._candidates.get(subnet)
            if (lease is not None and held is not None and subnet not in self._overwrites
                    and same_peer(held, lease)):
                # A renewal: the same peer, a later expiry; no check reads the expiry.
                self._candidates[subnet] = lease
                self._answers[subnet] = (lease, None)
                continue
            self._drop(subnet)
            if held is not None:
                ips.update(_claims(held))
            if lease is None:
                self._answers.pop(subnet, None)
                continue
            self._stage(lease, ctx, previous, self._answers, in_range)
            if (now := self._candidates.get(subnet)) is not None:
                ips.update(_claims(now))
        for ip in ips:
            touched.update(self._group(ip, previous))
        peers, errors = dict(previous), dict(before.errors)
        for subnet in touched:
            key = str(subnet)
            peers.pop(subnet, None)
            errors.pop(key, None)
            candidate = self._candidates.get(subnet)
            twins = self._duplicates.get(subnet)
            problem = next(iter(twins.values())) if twins else self._stage_errors.get(subnet)
            if candidate is not None and subnet not in self._duplicates:
                peers[subnet] = candidate
            if problem is not None:
                errors[key] = problem
        self.view = ValidatedView(peers, errors)
        return self.view, touched

    def _begin(self, ctx: TrustContext) -> None:
        """Answers kept only under the same trust context (the clock is no part of it:
        `lease_problem` never reads `now`)."""
        ctx = replace(ctx, now=0.0)
        if ctx != self._ctx:
            self._ctx, self._answers = ctx, {}

    def _stage(self, lease: Lease, ctx: TrustContext, accepted: Mapping[IPNetwork, Lease],
               known: Mapping[IPNetwork, tuple[Lease, str | None]],
               in_range: Callable[[IPNetwork], bool]) -> None:
        """The per-lease checks of one lease: a candidate or that subnet's error."""
        subnet = lease.subnet
        if subnet == ctx.own_subnet:
            return  # this host's own subnet: the agent's lease logic decides about it
        before = accepted.get(subnet)
        # The same holder at a new address (its identity, weft.core.lease.held_by) has
        # moved, not been overwritten: followed.
        if (before is not None and not held_by(lease, before)
                and before.expiration > ctx.now):
            self._overwrites.add(subnet)
            # The running lease stays whole, unchecked against the current context: it is
            # what a later pass refuses the overwrite by (a view holds only usable peers).
            self._stage_errors[subnet] = (
                f"PublicIP {lease.public_ip} overwrote the running lease of "
                f"{before.public_ip} (not released, not expired); keeping {before.public_ip}")
            self._add(before)
            return
        cached = known.get(subnet)
        if cached is not None and same_peer(cached[0], lease):
            problem = cached[1]
        else:
            problem = lease_problem(lease, ctx, in_range)
        self._answers[subnet] = (lease, problem)
        if problem is not None:
            self._stage_errors[subnet] = problem
        else:
            self._add(lease)

    def _add(self, candidate: Lease) -> None:
        self._candidates[candidate.subnet] = candidate
        for claim in _claims(candidate):
            self._by_ip.setdefault(claim, {})[candidate.subnet] = None

    def _drop(self, subnet: IPNetwork) -> None:
        held = self._candidates.pop(subnet, None)
        if held is not None:
            for claim in _claims(held):
                claims = self._by_ip.get(claim, {})
                claims.pop(subnet, None)
                if not claims:
                    self._by_ip.pop(claim, None)
        self._stage_errors.pop(subnet, None)
        self._duplicates.pop(subnet, None)
        self._overwrites.discard(subnet)

    def _group(self, what: Claim,
               previous: Collection[IPNetwork] | Mapping[IPNetwork, Lease]) -> list[IPNetwork]:
        """The duplicate check of one PublicIP (or PublicIPv6, or IPv6 subnet): two
        candidates naming it cannot both be right. The one accepted before stays (a running
        cluster is not moved by a forged record); between new ones, none is used until one
        goes away. Returns its subnets."""
        subnets = list(self._by_ip.get(what, ()))
        for subnet in subnets:
            twins = self._duplicates.get(subnet)
            if twins is not None:
                twins.pop(what, None)
                if not twins:
                    del self._duplicates[subnet]
        if len(subnets) < 2:
            return subnets
        claims = sorted((self._candidates[s] for s in subnets), key=_order)
        held = [c for c in claims if c.subnet in previous]
        if len(held) > 1 and isinstance(previous, Mapping):
            # Two were peers before (one moved to this address): the one that had it stays.
            held = [c for c in held if what in _claims(previous[c.subnet])] or held
        kept = held[0] if held else None  # in subnet order: the same whatever came first
        for claim in claims:
            if claim is not kept:
                self._duplicates.setdefault(claim.subnet, {})[what] = (
                    f"{what[0]} {what[1]} is also claimed by " + _some(claims, claim))
        return subnets


def validate_view(leases: Iterable[Lease], ctx: TrustContext,
                  previous: Collection[IPNetwork] | Mapping[IPNetwork, Lease] = ()
                  ) -> ValidatedView:
    """The peers that may reach the kernel, from nothing kept (`ViewKeeper.full` of a new
    keeper). Two leases naming one PublicIP cannot both be right: the one accepted before
    stays (a running cluster is not moved by a forged record); between two new ones,
    neither is used until one goes away. Likewise a subnet's PublicIP cannot change while
    the accepted lease runs: hosts only take a subnet whose lease expired or was released
    (create-if-absent), so an overwrite is a record written by something else, refused
    while the accepted lease lasts."""
    return ViewKeeper().full(leases, ctx, previous)
