"""Acquiring a lease: the short conversation between the pure choice and the store.

Reclaim the lease this public IP held before if it is still there; otherwise pick a free
subnet and create it. Creation is create-if-absent in the store, so when two hosts pick
the same subnet at once one of them loses and simply picks again.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from ipaddress import IPv6Address
from typing import Any

from weft.core.config import IPAddress, NetworkConfig
from weft.core.errors import LeaseNotFound, NetworkFull
from weft.core.lease import Lease, choose_pair, find_reclaimable
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
    *,
    public_ipv6: IPv6Address | None = None,
    backend_v6_data: Mapping[str, Any] | None = None,
) -> tuple[Lease, bool]:
    """Return (lease, reclaimed). Raises NetworkFull when no subnet is free. `on_list` is
    given each listing read (with its revision): the agent starts its view from the last
    one and watches from its revision, instead of listing thousands of leases again."""
    rng = rng or random.Random()
    for _ in range(_MAX_ATTEMPTS):
        leases, revision = await store.list_leases()
        if on_list is not None:
            on_list(leases, revision)
        previous = find_reclaimable(config, leases, public_ip)
        for stale in leases:
            # This host's lease of the other shape (the network went dual stack, or back):
            # released, as flannel does, or peers would report it for its whole TTL.
            if stale.public_ip == public_ip and \
                    (stale.ipv6_subnet is not None) != config.dual_stack:
                log.info("releasing this host's lease of another shape",
                         extra={"subnet": str(stale.subnet)})
                await store.delete_lease(stale.subnet, stale.ipv6_subnet)
        v6 = None if backend_v6_data is None else dict(backend_v6_data)
        if previous is not None:
            wanted = Lease(previous.subnet, public_ip, backend_type, dict(backend_data),
                           ipv6_subnet=previous.ipv6_subnet, public_ipv6=public_ipv6,
                           backend_v6_data=v6)
            try:
                return await store.renew_lease(wanted, ttl), True
            except LeaseNotFound:
                continue  # it expired between list and renew: look again
        subnet, ipv6_subnet = choose_pair(config, leases, rng)
        created = await store.create_lease(
            Lease(subnet, public_ip, backend_type, dict(backend_data), ipv6_subnet=ipv6_subnet,
                  public_ipv6=public_ipv6, backend_v6_data=v6), ttl
        )
        if created is not None:
            return created, False
        log.debug("subnet taken by another host meanwhile; choosing again",
                  extra={"subnet": str(subnet)})
    raise NetworkFull(f"could not acquire a subnet in {config.network} after {_MAX_ATTEMPTS} tries")
