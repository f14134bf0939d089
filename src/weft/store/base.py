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
from ipaddress import IPv6Network
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

    async def delete_lease(self, subnet: IPNetwork,
                           ipv6_subnet: IPv6Network | None = None) -> None:
        """Release a subnet (a dual-stack lease: both, named by the two halves of its key);
        releasing one that is already gone is not an error."""
        ...

    def watch(self, since: int) -> AsyncIterator[list[LeaseEvent]]:
        """Yield every change after revision `since`, in order, in batches; expiries
        included (a batch is empty when only `rejected` changed). Raises WatchCompacted
        if that history is gone (resync with a list)."""
        ...

    async def close(self) -> None: ...

    def starting(self, deadline: float | None) -> None:
        """Requests made from now on may take up to `deadline` seconds (an agent's start,
        when its host is busiest); None: the store's own deadline again."""
        ...

    @property
    def rejected(self) -> RejectedRecords:
        """The records under the subnets prefix that are not leases, as last seen."""
        ...


# Kept (and logged) at most this many: a flood of bad keys must not grow memory or status.
MAX_REJECTED = 1000


class RejectedRecords:
    """Records under the subnets prefix that are not leases (a bad key or value written by
    something else), by key, with why. Each store keeps them from its listings and its
    watch, so the agent can report them in `weft status` like a peer's error (logging
    each once) until the key is deleted or holds a valid lease."""

    def __init__(self) -> None:
        self.by_key: dict[str, str] = {}

    def parse(self, key: str, value: str | bytes, expiration: float = 0.0) -> Lease | None:
        """The lease, or None (and the reason kept, logged once per key and reason). One
        over MAX_RECORD_BYTES is dropped unparsed."""
        try:
            if len(value) > MAX_RECORD_BYTES:
                raise LeaseFormatError(f"lease record {key[:200]!r} is {len(value)} bytes; "
                                       f"at most {MAX_RECORD_BYTES} are read")
            lease = parse_lease(key, value, expiration)
        except LeaseFormatError as exc:
            if self.by_key.get(key) != str(exc) and len(self.by_key) < MAX_REJECTED:
                log.warning("skipping lease record that does not parse",
                            extra={"error": str(exc)})
                self.by_key[key] = str(exc)
            return None
        self.by_key.pop(key, None)
        return lease

    def deleted(self, key: str) -> None:
        self.by_key.pop(key, None)

    def replace(self, other: RejectedRecords) -> None:
        """A full listing replaces what the watch collected."""
        self.by_key = dict(other.by_key)

