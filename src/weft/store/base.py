"""The lease store seam: the narrow interface every store implements.

    config:  get_config / put_config             the network config JSON
    leases:  list_leases -> (leases, revision)   a consistent snapshot
             create_lease                        create-if-absent, with a TTL
             renew_lease                         reset the TTL (and update the value)
             restore_lease                       write a holder's record back
             delete_lease                        release
    watch:   watch(since)                        every change after `since`, in order

Stores do not pick subnets (that is `weft.core.lease`), do not touch the kernel and do not
write files on the host. Both implementations share the flannel key layout in
`weft.core.constants`.
"""

from __future__ import annotations

import hashlib
import logging
import math
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
        subnet is no longer held by this lease's holder (`weft.core.lease.held_by`: its
        host identity, or its public IP for a record without one): it expired or was
        taken."""
        ...

    async def restore_lease(self, lease: Lease, ttl: float) -> Lease:
        """Write `lease` back with a fresh TTL over whatever its subnet's record holds now:
        for its holder, whose running lease something else wrote over."""
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


def record_key(key: object) -> str:
    """A stored key as text, whatever type its row holds."""
    if isinstance(key, bytes | bytearray | memoryview):
        return bytes(key).decode("utf-8", errors="replace")
    return key if isinstance(key, str) else repr(key)


def parse_record(key: str, value: object, expiration: object = 0.0) -> Lease:
    """A stored record as a Lease, or LeaseFormatError: the value must be text or bytes of
    at most MAX_RECORD_BYTES, the expiry a finite number of seconds."""
    if not isinstance(value, str | bytes):
        raise LeaseFormatError(f"lease record {key[:200]!r} holds a {type(value).__name__}, "
                               "not JSON text")
    if len(value) > MAX_RECORD_BYTES:
        raise LeaseFormatError(f"lease record {key[:200]!r} is {len(value)} bytes; "
                               f"at most {MAX_RECORD_BYTES} are read")
    if (not isinstance(expiration, int | float) or isinstance(expiration, bool)
            or not math.isfinite(expiration)):
        raise LeaseFormatError(f"lease record {key[:200]!r} has expiry {str(expiration)[:40]!r}"
                               ", not a number of seconds")
    if len(key) > MAX_KEY_CHARS:
        raise LeaseFormatError(f"lease key {key[:200]!r}... is {len(key)} characters long")
    return parse_lease(key, value, float(expiration))


# A canonical subnet key is at most ~55 characters (an IPv6 one); longer ones are refused
# before their text reaches an error message.
MAX_KEY_CHARS = 256


def _shown(key: str) -> str:
    """How a rejected record's key is kept and reported: a key longer than MAX_KEY_CHARS
    (etcd allows 1.5 MB) by its start and a digest, so status and memory stay small."""
    if len(key) <= MAX_KEY_CHARS:
        return key
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{key[:200]}…sha256:{digest}"

# Kept (and logged) at most this many: a flood of bad keys must not grow memory or status.
MAX_REJECTED = 1000


class RejectedRecords:
    """Records under the subnets prefix that are not leases (a bad key or value written by
    something else), by key, with why. Each store keeps them from its listings and its
    watch, so the agent can report them in `weft status` like a peer's error (logging
    each once) until the key is deleted or holds a valid lease."""

    def __init__(self) -> None:
        self.by_key: dict[str, str] = {}

    def parse(self, key: object, value: object, expiration: object = 0.0) -> Lease | None:
        """The lease, or None (and the reason kept, logged once per key and reason). One
        over MAX_RECORD_BYTES is dropped unparsed. Whatever a record holds, nothing but
        that record's error comes out: the row types too are what something else wrote
        (SQLite keeps any type in any column)."""
        text = record_key(key)
        key = _shown(text)
        try:
            lease = parse_record(text, value, expiration)
        except Exception as exc:  # anything a record makes the parsing raise is its own
            reason = str(exc) if isinstance(exc, LeaseFormatError) else (
                f"lease record {key[:200]!r} does not parse: {type(exc).__name__}: "
                f"{str(exc)[:200]}")
            if self.by_key.get(key) != reason and len(self.by_key) < MAX_REJECTED:
                log.warning("skipping lease record that does not parse",
                            extra={"error": reason})
                self.by_key[key] = reason
            return None
        self.by_key.pop(key, None)
        return lease

    def deleted(self, key: object) -> None:
        self.by_key.pop(_shown(record_key(key)), None)

    def replace(self, other: RejectedRecords) -> None:
        """A full listing replaces what the watch collected."""
        self.by_key = dict(other.by_key)

