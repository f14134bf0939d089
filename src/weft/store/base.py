"""The lease store seam: the narrow interface every store implements.

    config:  get_config / put_config             the network config JSON
    leases:  list_leases -> (leases, revision)   a consistent snapshot
             create_lease                        create-if-absent, with a TTL
             renew_lease                         reset the TTL (and update the value)
             delete_lease                        release
    watch:   watch(since)                        every change after `since`, in order

Stores do not pick subnets (that is `weft.core.lease`), do not touch the kernel and do not
write files on the host. Both implementations share the flannel key layout in
`weft.core.constants`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Protocol

from weft.core.config import IPNetwork
from weft.core.constants import MAX_RECORD_BYTES
from weft.core.events import LeaseEvent
from weft.core.lease import Lease, LeaseFormatError, parse_lease

log = logging.getLogger("weft.store")


class LeaseStore(Protocol):
    """What the agent, the CLI and the tests need from a store."""

    async def get_config(self) -> str | None:
        """The network config JSON, or None if none was set."""
        ...

    async def put_config(self, text: str) -> None: ...

    async def list_leases(self) -> tuple[list[Lease], int]:
        """Every live lease (records that don't parse are logged and skipped) and the
        store revision of that snapshot, to `watch` from."""
        ...

    async def create_lease(self, lease: Lease, ttl: float) -> Lease | None:
        """Create the lease if its subnet is free; return it with its expiration set, or
        None when another host holds the subnet. Atomic across hosts."""
        ...

    async def renew_lease(self, lease: Lease, ttl: float) -> Lease:
        """Store `lease`'s value again with a fresh TTL. Raises LeaseNotFound when the
        subnet is no longer held by this lease's public IP (it expired or was taken)."""
        ...

    async def delete_lease(self, subnet: IPNetwork) -> None:
        """Release a subnet; releasing one that is already gone is not an error."""
        ...

    def watch(self, since: int) -> AsyncIterator[list[LeaseEvent]]:
        """Yield every change after revision `since`, in order, in batches; expiries
        included. Raises WatchCompacted if that history is gone (resync with a list)."""
        ...

    async def close(self) -> None: ...


_oversized_logged: set[str] = set()


def lease_or_none(key: str, value: str | bytes, expiration: float = 0.0) -> Lease | None:
    """Parse a stored record; one that doesn't parse is logged and skipped, never fatal.
    One over MAX_RECORD_BYTES is dropped unparsed (logged once per key, not per event)."""
    if len(value) > MAX_RECORD_BYTES:
        if key not in _oversized_logged and len(_oversized_logged) < 10_000:
            _oversized_logged.add(key)
            log.warning("dropping oversized lease record", extra={
                "key": key[:200], "bytes": len(value), "limit": MAX_RECORD_BYTES})
        return None
    try:
        return parse_lease(key, value, expiration)
    except LeaseFormatError as exc:
        log.warning("skipping lease record that does not parse", extra={"error": str(exc)})
        return None
