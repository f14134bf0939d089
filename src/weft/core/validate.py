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
from weft.core.lease import Lease, subnet_in_range

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


@dataclass(frozen=True)
class ValidatedView:
    peers: dict[IPNetwork, Lease]                              # usable, own lease excluded
    errors: dict[str, str] = field(default_factory=dict)       # subnet -> why not


def lease_problem(lease: Lease, ctx: TrustContext) -> str | None:
    """Why `lease` must not reach the kernel, or None. Own lease: see `validate_view`."""
    config, subnet, ip = ctx.config, lease.subnet, lease.public_ip
    if not subnet_in_range(config, subnet):
        return (f"subnet {subnet} is not a /{config.length} of Network {config.network} "
                f"between {config.first_subnet.network_address} and "
                f"{config.last_subnet.network_address}")
    for underlay in ctx.underlay_networks:
        if underlay.version == subnet.version and subnet.overlaps(underlay):
            return f"subnet {subnet} overlaps this host's underlay {underlay}"
    if (ip.is_multicast or ip.is_unspecified or ip.is_loopback or ip.is_link_local
            or (ip.is_reserved and ip.version == 4 and int(ip) == 0xFFFFFFFF)):
        return f"PublicIP {ip} is not a unicast host address"
    if ip == ctx.host_ip:
        return f"PublicIP {ip} is this host's own address"
    if ip.version != ctx.host_ip.version:
        return f"PublicIP {ip} is IPv{ip.version}, this host's underlay is IPv{ctx.host_ip.version}"
    if ip in config.network:
        return f"PublicIP {ip} is inside the overlay Network {config.network}"
    size = len(json.dumps(dict(lease.backend_data)))
    if size > MAX_BACKEND_DATA:
        return f"BackendData is {size} bytes of JSON; at most {MAX_BACKEND_DATA} are accepted"
    return ctx.data_problem(lease.backend_type, lease.backend_data)


class ValidationMemo:
    """`lease_problem` answers kept from the last pass, per subnet, for the same lease
    value under the same trust context: a store event re-checks only the lease it changed
    (the per-lease checks are most of a pass's cost at thousands of leases). Pure: a dict.
    The cross-lease check (one PublicIP, two leases) is not memoised: it always runs."""

    def __init__(self) -> None:
        self._ctx: TrustContext | None = None
        self._answers: dict[IPNetwork, tuple[Lease, str | None]] = {}

    def begin(self, ctx: TrustContext) -> dict[IPNetwork, tuple[Lease, str | None]]:
        """The answers usable under `ctx` (none if it changed); a pass replaces them.
        The clock is no part of it: `lease_problem` never reads `now`."""
        ctx = replace(ctx, now=0.0)
        if ctx != self._ctx:
            self._ctx, self._answers = ctx, {}
        answers, self._answers = self._answers, {}
        return answers

    def keep(self, lease: Lease, problem: str | None) -> None:
        self._answers[lease.subnet] = (lease, problem)


def validate_view(leases: Iterable[Lease], ctx: TrustContext,
                  previous: Collection[IPNetwork] | Mapping[IPNetwork, Lease] = (),
                  memo: ValidationMemo | None = None) -> ValidatedView:
    """The peers that may reach the kernel. Two leases naming one PublicIP cannot both be
    right: the one accepted before stays (a running cluster is not moved by a forged
    record); between two new ones, neither is used until one goes away. Likewise a
    subnet's PublicIP cannot change while the accepted lease runs: hosts only take a
    subnet whose lease expired or was released (create-if-absent), so an overwrite is a
    record written by something else, refused while the accepted lease lasts. With
    `memo`, an unchanged lease is not checked again (the same answer, from the last pass)."""
    peers: dict[IPNetwork, Lease] = {}
    errors: dict[str, str] = {}
    accepted = previous if isinstance(previous, Mapping) else {}
    known = memo.begin(ctx) if memo is not None else {}
    for lease in leases:
        if lease.subnet == ctx.own_subnet:
            continue  # this host's own subnet: the agent's lease logic decides about it
        before = accepted.get(lease.subnet)
        if (before is not None and before.public_ip != lease.public_ip
                and before.expiration > ctx.now):
            errors[str(lease.subnet)] = (
                f"PublicIP {lease.public_ip} overwrote the running lease of "
                f"{before.public_ip} (not released, not expired); keeping {before.public_ip}")
            peers[lease.subnet] = before
            continue
        cached = known.get(lease.subnet)
        if cached is not None and (cached[0] is lease or cached[0] == lease):
            problem = cached[1]
        else:
            problem = lease_problem(lease, ctx)
        if memo is not None:
            memo.keep(lease, problem)
        if problem is not None:
            errors[str(lease.subnet)] = problem
        else:
            peers[lease.subnet] = lease
    by_ip: dict[IPAddress, list[Lease]] = {}
    for lease in peers.values():
        by_ip.setdefault(lease.public_ip, []).append(lease)
    for ip, claims in by_ip.items():
        if len(claims) < 2:
            continue
        kept = [c for c in claims if c.subnet in previous][:1]
        for claim in claims:
            if claim not in kept:
                others = ", ".join(str(c.subnet) for c in claims if c is not claim)
                errors[str(claim.subnet)] = f"PublicIP {ip} is also claimed by {others}"
                del peers[claim.subnet]
    return ValidatedView(peers, errors)
