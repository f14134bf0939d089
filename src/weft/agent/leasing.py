"""Acquiring a lease: the short conversation between the pure choice and the store.

Reclaim the lease this host held before (its identity's, or an old record at its public
IP) if it is still there; refuse to start when another host's live lease names this
host's address; otherwise pick a free subnet and create it. Creation is create-if-absent in
the store, so when two hosts pick the same subnet at once one of them loses and simply picks
again.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Collection, Mapping
from ipaddress import IPv6Address
from typing import Any

from weft.core.config import IPAddress, IPNetwork, NetworkConfig
from weft.core.errors import AddressInUse, LeaseNotFound, NetworkFull
from weft.core.lease import Lease, address_holder, choose_pair, find_reclaimable
from weft.store.base import LeaseStore

log = logging.getLogger("weft.core.lease")

# Every retry follows a lost race, and every race is lost to a host that now holds a
# subnet, so this bounds the loop for networks of any size without a timer.
_MAX_ATTEMPTS = 1000


async def acquire_lease(
    store: LeaseStore,
    config: NetworkConfig,
    public_ip: IPAddress,
    backend_type: str,
    backend_data: Mapping[str, Any],
    ttl: float,
    rng: random.Random | None = None,
    on_list: Callable[[list[Lease], int], None] | None = None,
    host_id: str = "",
    known_taken: Callable[[], Collection[IPNetwork]] = frozenset,
    refuse_shared: bool = True,
    *,
    public_ipv6: IPv6Address | None = None,
    backend_v6_data: Mapping[str, Any] | None = None,
) -> tuple[Lease, bool]:
    """Return (lease, reclaimed). Raises NetworkFull when no subnet is free, and
    AddressInUse when another host (another identity) holds a live lease naming
    `public_ip`: that host is never disturbed. `on_list` is given each listing read (with
    its revision): the agent starts its view from the last one and watches from its
    revision, instead of listing thousands of leases again. `known_taken`: subnets live
    peers are known to hold though the listing lacks them (a store restored from an older
    snapshot): never chosen. `refuse_shared=False`: a running agent moving, which has a data
    plane to keep and reports rather than refuses."""
    rng = rng or random.Random()
    for _ in range(_MAX_ATTEMPTS):
        leases, revision = await store.list_leases()
        if on_list is not None:
            on_list(leases, revision)
        if refuse_shared:
            _refuse_shared_address(leases, public_ip, host_id)
        previous = find_reclaimable(config, leases, public_ip, host_id)
        for stale in leases:
            # This host's lease of the other shape (the network went dual stack, or back):
            # released, as flannel does, or peers would report it for its whole TTL.
            if stale.public_ip == public_ip and (not host_id or stale.host_id in ("", host_id)) \
                    and (stale.ipv6_subnet is not None) != config.dual_stack:
                log.info("releasing this host's lease of another shape",
                         extra={"subnet": str(stale.subnet)})
                await store.delete_lease(stale.subnet, stale.ipv6_subnet)
        v6 = None if backend_v6_data is None else dict(backend_v6_data)
        if previous is not None:
            wanted = Lease(previous.subnet, public_ip, backend_type, dict(backend_data),
                           ipv6_subnet=previous.ipv6_subnet, public_ipv6=public_ipv6,
                           backend_v6_data=v6, host_id=host_id)
            try:
                return await store.renew_lease(wanted, ttl), True
            except LeaseNotFound:
                continue  # it expired between list and renew: look again
        # Subnets live peers are known to hold though the listing lacks them count as taken.
        known = [Lease(s, public_ip, "") for s in known_taken()]
        subnet, ipv6_subnet = choose_pair(config, [*leases, *known], rng)
        created = await store.create_lease(
            Lease(subnet, public_ip, backend_type, dict(backend_data), ipv6_subnet=ipv6_subnet,
                  public_ipv6=public_ipv6, backend_v6_data=v6, host_id=host_id), ttl
        )
        if created is not None:
            if refuse_shared:
                await _check_alone(store, created, on_list)
            return created, False
        log.debug("subnet taken by another host meanwhile; choosing again",
                  extra={"subnet": str(subnet)})
    raise NetworkFull(f"could not acquire a subnet in {config.network} after {_MAX_ATTEMPTS} tries")


async def check_address_free(store: LeaseStore, public_ip: IPAddress, host_id: str) -> None:
    """Refuse (AddressInUse) before anything on the host changes when another host's live
    lease names this host's address; `acquire_lease` looks again."""
    leases, _ = await store.list_leases()
    _refuse_shared_address(leases, public_ip, host_id)


def _refuse_shared_address(leases: list[Lease], public_ip: IPAddress, host_id: str) -> None:
    if not host_id:
        return
    now = time.time()
    holder = address_holder(leases, public_ip, host_id, now)
    if holder is not None:
        left = f" for {holder.expires_in(now):.0f} s more" if holder.expiration else ""
        raise AddressInUse(
            f"this host's address {public_ip} is in another host's live lease: subnet "
            f"{holder.subnet} is held by host {holder.host_id}{left}; give this host its "
            "own address (--public-ip, --iface), or, if that host "
            f"is this one with a lost state directory, delete the record {holder.key} or "
            "wait for it to expire")


async def _check_alone(store: LeaseStore, created: Lease,
                       on_list: Callable[[list[Lease], int], None] | None) -> None:
    """Two hosts with one address that start at once each miss the other in their first
    listing: after creating, look again; whoever sees the other gives its new lease back
    and refuses (both may: neither had a data plane yet)."""
    if not created.host_id:
        return
    leases, revision = await store.list_leases()
    try:
        _refuse_shared_address(leases, created.public_ip, created.host_id)
    except AddressInUse:
        await store.delete_lease(created.subnet, created.ipv6_subnet)
        raise
    if on_list is not None:
        on_list(leases, revision)
