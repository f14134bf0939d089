"""This host's lease: acquired at start, renewed while the agent runs, recovered when it
ran out, moved when another host took its subnet meanwhile; never lost to a store that is
away or refuses us (the data plane stays, `weft status` says so).

    acquire ──▶ leave the previous subnet (if moved) ──▶ take ──▶ renew ...
                                                                   │ record gone
                                                                   ▼
                           keep it (overwritten) ◀── recover: same subnet, or move
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from enum import Enum
from ipaddress import IPv6Address
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weft.agent.health import Health, Notice
from weft.agent.leasing import acquire_lease
from weft.agent.metrics import AgentMetrics
from weft.agent.retry import Backoff, StoreRetry
from weft.agent.store_watch import OwnDeletions
from weft.core.config import IPAddress, IPNetwork, NetworkConfig
from weft.core.constants import CNI_BRIDGE
from weft.core.errors import LeaseNotFound, StoreError, StoreUnavailable, UsageError
from weft.core.lease import Lease, held_by, parse_lease, same_peer
from weft.host.netlink import Netlink
from weft.integrations.subnet_env import read_subnet_env
from weft.store import LeaseStore

if TYPE_CHECKING:
    from weft.agent.reconciler import Request

log = logging.getLogger("weft.agent")


@dataclass
class OwnLease:
    """This host's lease as the keeper holds it, and the overlay MTU taking it gave."""

    lease: Lease
    mtu: int = 0


async def acquire(store: LeaseStore, config: NetworkConfig, public_ip: IPAddress,
                  backend_data: Mapping[str, Any], ttl: float, retry: StoreRetry,
                  host_id: str = "",
                  public_ipv6: IPv6Address | None = None,
                  backend_v6_data: Mapping[str, Any] | None = None
                  ) -> tuple[Lease, list[Lease], int]:
    """Reclaim or acquire a lease at start; also the listing it was chosen by and its
    revision (the view starts from it: at 5,000 leases a second listing was a tenth of
    the join). In dual stack the lease holds both subnets, PublicIPv6 and BackendV6Data
    (the backend's data: its devices carry both families)."""
    listings: list[tuple[list[Lease], int]] = []
    lease, reclaimed = await retry.call(
        "acquire lease",
        lambda: acquire_lease(store, config, public_ip, config.backend.type,
                              backend_data, ttl,
                              on_list=lambda *listing: listings.append(listing),
                              host_id=host_id,
                              public_ipv6=public_ipv6,
                              backend_v6_data=(backend_v6_data or backend_data)
                              if config.dual_stack else None),
    )
    log.info("lease reclaimed" if reclaimed else "lease acquired",
             extra={"subnet": str(lease.subnet), "public_ip": str(public_ip),
                    **({"ipv6_subnet": str(lease.ipv6_subnet)} if lease.ipv6_subnet else {}),
                    "expires_in": round(lease.expires_in(time.time()))})
    leases, revision = listings[-1]
    return lease, leases, revision


def _as_stored(lease: Lease) -> Lease:
    """`lease` as the store's record of it reads back (JSON types: a tuple in BackendData
    is a list there), so our own renewal never looks like someone else's write."""
    return parse_lease(lease.key, lease.to_json(), lease.expiration)


class _Conflict(Enum):
    PUT_BACK = "put back"  # written over while our lease runs: ours goes back
    WAIT = "wait"  # deleted, then taken by another host: kept, said, until it goes


class LeaseKeeper:
    def __init__(self, own: OwnLease, store: LeaseStore, config: NetworkConfig,
                 public_ip: IPAddress, *, ttl: float, activate: Callable[[Lease], int],
                 on_taken: Callable[[Lease], Awaitable[None]],
                 record: Callable[[IPNetwork], Lease | None], request: Request,
                 retry: StoreRetry, health: Health, metrics: AgentMetrics,
                 host_id: str = "", deletions: OwnDeletions | None = None,
                 known_taken: Callable[[], Collection[IPNetwork]] = frozenset,
                 public_ipv6: IPv6Address | None = None) -> None:
        self.own = own
        self.public_ipv6 = public_ipv6
        self.host_id = host_id  # this host's identity (weft.agent.identity)
        # Whether the watch saw our subnet's record deleted since we last wrote it.
        self.deletions = deletions if deletions is not None else OwnDeletions()
        self.deletions.written(own.lease.subnet)
        # The subnets live peers are known to hold (never taken when moving).
        self.known_taken = known_taken
        self.store = store
        self.config = config
        self.public_ip = public_ip
        self.ttl = ttl
        self.activate = activate  # the backend's own address and MTU for a lease
        self.on_taken = on_taken  # the rest of the host follows a new lease (masquerade)
        self.record = record  # what the store holds for a subnet, as the watch last saw it
        self.request = request
        self.retry = retry
        self.health = health
        self.metrics = metrics
        self._renew_now = asyncio.Event()

    @property
    def lease(self) -> Lease:
        return self.own.lease

    async def leave_previous_subnet(self, subnet_file: Path) -> None:
        """A host back after its lease expired and another host took the subnet gets a
        new one; the old one (named by the subnet.env it wrote) must leave its data plane,
        or two hosts answer for the same container addresses."""
        try:
            env = read_subnet_env(subnet_file)
        except UsageError:
            return  # none, or not ours to read: nothing is known about a previous subnet
        previous = env.subnet
        if env.ipv6_subnet not in (None, self.lease.ipv6_subnet):
            assert env.ipv6_subnet is not None
            await _release_lost_subnet(env.ipv6_subnet)
        if previous == self.lease.subnet:
            return
        stranded = await _release_lost_subnet(previous)
        self._note_moved(previous, self.lease.subnet, stranded)

    async def take(self, lease: Lease) -> None:
        """Make `lease` this host's: the backend's own address and MTU, the masquerade
        table (subnet.env follows at the next host pass)."""
        self.own.lease = lease
        self.deletions.written(lease.subnet)
        self.metrics.lease_expiry.set(lease.expiration)
        self.own.mtu = await asyncio.to_thread(self.activate, lease)
        await self.on_taken(lease)

    def check_record(self) -> None:
        """The store watch saw a change: our subnet gone from the store, held by someone
        else, or our record written by something else, means renew (put back, or move)
        now, not at the next renewal."""
        held = self.record(self.lease.subnet)
        if held is None or not same_peer(held, _as_stored(self.lease)):
            self._renew_now.set()

    def reassert(self) -> None:
        """Renew now, whatever the view says (the store went back in time or lost history:
        our record may be gone, or an older one, with no event to say so)."""
        self._renew_now.set()

    def retry_in(self, backoff: Backoff) -> float:
        """The next retry of a failed renewal: backed off, but never past a quarter of what
        is left of the lease (a store back before the lease ends gets a renewal in time),
        and once it ended, a quarter of the TTL (the store may still hold the record: a
        restarted etcd gives its leases a full TTL again, and a renewal must land first)."""
        remaining = self.lease.expires_in(time.time())
        horizon = remaining if remaining > 0 else self.ttl
        return min(backoff.next(), max(0.5, horizon / 4))

    async def run(self) -> None:
        backoff = Backoff()
        put_back = Backoff()  # a record written over again and again is put back slower
        retry = False  # a renewal that failed on the store is tried again, not at renew_at
        while True:
            delay = 0.0 if retry else max(0.0, self.lease.renew_at(self.ttl) - time.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._renew_now.wait()
            self._renew_now.clear()
            retry = False
            try:
                try:
                    renewed: Lease | None = await self.store.renew_lease(self.lease, self.ttl)
                except LeaseNotFound:
                    conflict = self._overwritten()
                    if conflict is _Conflict.WAIT:
                        # Wait for the record to go (the watch wakes us) or our lease to end.
                        await self._wait(min(backoff.next(),
                                             max(0.5, self.lease.expires_in(time.time()))))
                        continue
                    renewed = None
                    if conflict is _Conflict.PUT_BACK:
                        renewed = await self._put_back(put_back)
            except StoreError as exc:
                # Unreachable, or a refusal (a record rewritten under every attempt, its
                # permissions changed): ask again soon, while the lease runs. Also a renewal
                # asked for early (our record went away): waiting for the scheduled time
                # would leave this host without a lease for hours.
                wait = self.retry_in(backoff)
                if isinstance(exc, StoreUnavailable):
                    self.retry.unavailable()
                    log.warning("lease renewal failed; retrying",
                                extra={"error": str(exc), "retry_in": round(wait, 2)})
                else:
                    self.retry.refused(Notice.STORE, "lease renewal", exc)
                await asyncio.sleep(wait)
                retry = True
                continue
            lease = renewed if renewed is not None else await self._recover()
            self.deletions.written(lease.subnet)
            self.health.clear(Notice.STORE)
            backoff.reset()
            self.own.lease = lease
            self.metrics.lease_expiry.set(lease.expiration)
            self.metrics.lease_renewals.inc()
            log.info("lease renewed", extra={"subnet": str(lease.subnet),
                                             "expires_in": round(lease.expires_in(time.time()))})

    async def _wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._renew_now.wait()

    async def _put_back(self, backoff: Backoff) -> Lease:
        """Write our record back over what something else wrote while our lease runs. A
        writer that keeps at it is met more slowly each time (no write storm), and said
        in `weft status` as what this host cannot fix."""
        lease, held = self.lease, self.record(self.lease.subnet)
        named = held.public_ip if held is not None else "another host"
        if backoff.current:  # overwritten again since the last put-back
            message = (f"the store's record of this host's subnet {lease.subnet} keeps being "
                       f"written over by something else (last naming {named}) while this "
                       "host's lease runs; this host puts it back each time: find the writer")
            if self.health.notice(Notice.LEASE_CONFLICT, message):
                log.error("lease record overwritten again", extra={
                    "subnet": str(lease.subnet), "claimed_by": str(named), "error": message})
            await asyncio.sleep(min(backoff.next(), max(0.5, lease.expires_in(time.time()) / 4)))
        else:
            backoff.next()
        restored = await self.store.restore_lease(lease, self.ttl)
        log.warning("own lease record was written over by something else; put it back",
                    extra={"subnet": str(lease.subnet), "claimed_by": str(named)})
        return restored

    def _overwritten(self) -> _Conflict | None:
        """Our subnet's record names another holder while our lease still runs. Another weft
        host's (with an identity): the lower identity keeps the subnet, the other moves.
        Otherwise no host takes a subnet before its lease expires (create-if-absent), so
        something else wrote it: put ours back. If the record was deleted first, something
        may have taken the subnet as free: keep it (moving would strand every container
        here) and say so; if that record is still there when our lease ends, it is a
        takeover after all. None: recover (take it back if free, else move)."""
        lease = self.lease
        held = self.record(lease.subnet)
        if (held is None or held_by(held, lease)
                or lease.expires_in(time.time()) <= 0):
            if self.health.clear(Notice.LEASE_CONFLICT):
                log.info("lease conflict cleared", extra={"subnet": str(lease.subnet)})
            return None
        if held.host_id:
            # Another weft host's lease (it created the subnet while ours was gone from the
            # store: deleted, or lost in a restore): both leases run, and both agents see
            # the same two identities, so the same one yields on both sides, at once
            # (neither waits out a TTL with two hosts on one subnet, nor do they fight).
            if lease.host_id and lease.host_id < held.host_id:
                return _Conflict.PUT_BACK
            log.error("another host holds this host's subnet too; the lower identity keeps "
                      "it: moving", extra={"subnet": str(lease.subnet),
                                           "claimed_by": str(held.public_ip),
                                           "other_host": held.host_id})
            return None
        if not self.deletions(lease.subnet):
            return _Conflict.PUT_BACK
        message = (f"the store's record of this host's subnet {lease.subnet} names "
                   f"{held.public_ip} while this host's lease still runs: written by "
                   "something else; this host keeps its subnet (delete the record to clear "
                   "this)")
        if self.health.notice(Notice.LEASE_CONFLICT, message):
            log.error("lease record overwritten; keeping the subnet",
                      extra={"subnet": str(lease.subnet), "claimed_by": str(held.public_ip),
                             "error": message})
        return _Conflict.WAIT

    async def _recover(self) -> Lease:
        """Our lease expired (the store was away longer than the TTL, or the host came back
        late). Take the same subnet back if it is free; if another host took it, this host
        must stop answering for it at once and move to a new subnet."""
        old = self.lease
        log.error("lease lost; trying to take the same subnet back",
                  extra={"subnet": str(old.subnet)})
        created = await self.retry.call(
            "recreate lease", lambda: self.store.create_lease(old, self.ttl),
            refusals=Notice.STORE, cap=self._retry_cap())
        if created is not None:
            return created
        stranded = "none"
        for subnet in old.subnets:  # at once, before a new one is leased
            left = await _release_lost_subnet(subnet)
            if subnet == old.subnet:
                stranded = left
        config = self.config
        lease, _ = await self.retry.call(
            "acquire lease",
            lambda: acquire_lease(self.store, config, self.public_ip, config.backend.type,
                                  old.backend_data, self.ttl, host_id=self.host_id,
                                  known_taken=self.known_taken, refuse_shared=False,
                                  public_ipv6=old.public_ipv6,
                                  backend_v6_data=old.backend_v6_data),
            refusals=Notice.STORE, cap=self._retry_cap())
        await self.take(lease)
        self._note_moved(old.subnet, lease.subnet, stranded)
        log.info("lease acquired", extra={"subnet": str(lease.subnet)})
        self.request("new lease", host=True)
        return lease

    def _retry_cap(self) -> float:
        """Retries to take a lease back stay as close as a renewal's after its end."""
        return max(0.5, self.ttl / 4)

    def _note_moved(self, old: IPNetwork, new: IPNetwork, stranded: str) -> None:
        # Not "taken while away": the lease may also have ended, or its record gone, with
        # this host running; what is known is that it no longer holds the subnet.
        self.health.notice(Notice.LEASE, f"this host no longer holds subnet {old} (its "
                                         "lease ended or another host holds it); it holds "
                                         f"{new} now; containers left in {old}: {stranded} "
                                         "(restart them to renumber)")


async def _release_lost_subnet(subnet: IPNetwork) -> str:
    """Stop answering for a subnet another host holds now (its gateway address leaves
    the container bridge) and say which local containers that strands (returned too)."""
    addresses, ports = await asyncio.to_thread(_release_subnet, subnet)
    stranded = ", ".join(addresses) if addresses else "none"
    if ports > len(addresses):
        # Containers that never talked to the host have no neighbour entry to name them.
        stranded += (f" ({ports} containers on {CNI_BRIDGE} in all; the others' addresses "
                     "are not known to the host)")
    log.error("this host's previous subnet is held by another host now; released it",
              extra={"subnet": str(subnet),
                     "stranded_containers": stranded,
                     "action": "restart the stranded containers to give them addresses "
                               "in the new subnet"})
    return stranded


def _release_subnet(subnet: IPNetwork) -> tuple[list[str], int]:
    """Stop answering for a subnet this host no longer holds: its gateway address leaves
    the container bridge. Returns the containers (neighbours on the bridge, in any state)
    left in it, and how many ports the bridge has (one per container)."""
    with Netlink() as nl:
        bridge = nl.link(CNI_BRIDGE)
        if bridge is None:
            return [], 0
        stranded = sorted(str(n.ip) for n in nl.neighbours(bridge.index, permanent=False)
                          if n.ip in subnet)
        ports = nl.bridge_ports(bridge.index)
        nl.remove_addresses_in(bridge.index, subnet)
    return stranded, ports
