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
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from ipaddress import IPv6Address
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weft.agent.health import Health, Notice
from weft.agent.leasing import acquire_lease
from weft.agent.metrics import AgentMetrics
from weft.agent.retry import Backoff, StoreRetry
from weft.core.config import IPAddress, IPNetwork, NetworkConfig
from weft.core.constants import CNI_BRIDGE
from weft.core.errors import LeaseNotFound, StoreError, StoreUnavailable, UsageError
from weft.core.lease import Lease
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


class LeaseKeeper:
    def __init__(self, own: OwnLease, store: LeaseStore, config: NetworkConfig,
                 public_ip: IPAddress, *, ttl: float, activate: Callable[[Lease], int],
                 on_taken: Callable[[Lease], Awaitable[None]],
                 record: Callable[[IPNetwork], Lease | None], request: Request,
                 retry: StoreRetry, health: Health, metrics: AgentMetrics,
                 public_ipv6: IPv6Address | None = None) -> None:
        self.own = own
        self.public_ipv6 = public_ipv6
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
        await _release_lost_subnet(previous)
        self._note_moved(previous, self.lease.subnet)

    async def take(self, lease: Lease) -> None:
        """Make `lease` this host's: the backend's own address and MTU, the masquerade
        table (subnet.env follows at the next host pass)."""
        self.own.lease = lease
        self.metrics.lease_expiry.set(lease.expiration)
        self.own.mtu = await asyncio.to_thread(self.activate, lease)
        await self.on_taken(lease)

    def check_record(self) -> None:
        """The store watch saw a change: our subnet gone from the store, or held by someone
        else, means renew (or move) now, not at the next renewal."""
        held = self.record(self.lease.subnet)
        if held is None or held.public_ip != self.lease.public_ip:
            self._renew_now.set()

    async def run(self) -> None:
        backoff = Backoff()
        retry = False  # a renewal that failed on the store is tried again, not at renew_at
        while True:
            delay = 0.0 if retry else max(0.0, self.lease.renew_at(self.ttl) - time.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._renew_now.wait()
            self._renew_now.clear()
            retry = False
            try:
                renewed: Lease | None = await self.store.renew_lease(self.lease, self.ttl)
            except LeaseNotFound:
                if self._overwritten():
                    # Wait for the record to go (the watch wakes us) or our lease to end.
                    wait = min(backoff.next(), max(0.5, self.lease.expires_in(time.time())))
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await self._renew_now.wait()
                    continue
                renewed = None  # recovered below, outside this handler
            except StoreError as exc:
                # Unreachable, or a refusal (a record rewritten under every attempt, its
                # permissions changed): ask again soon, while the lease runs. Also a renewal
                # asked for early (our record went away): waiting for the scheduled time
                # would leave this host without a lease for hours.
                remaining = self.lease.expires_in(time.time())
                step = backoff.next()
                wait = min(step, max(0.5, remaining / 4)) if remaining > 0 else step
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
            self.health.clear(Notice.STORE)
            backoff.reset()
            self.own.lease = lease
            self.metrics.lease_expiry.set(lease.expiration)
            self.metrics.lease_renewals.inc()
            log.info("lease renewed", extra={"subnet": str(lease.subnet),
                                             "expires_in": round(lease.expires_in(time.time()))})

    def _overwritten(self) -> bool:
        """Our subnet's record names another host while our lease still runs. No host
        takes a subnet before its lease expires (create-if-absent), so something else
        wrote it: keep the subnet (moving would strand every container here) and say so;
        if the record is still there when our lease ends, it is a takeover after all."""
        lease = self.lease
        held = self.record(lease.subnet)
        if (held is None or held.public_ip == lease.public_ip
                or lease.expires_in(time.time()) <= 0):
            if self.health.clear(Notice.LEASE_CONFLICT):
                log.info("lease conflict cleared", extra={"subnet": str(lease.subnet)})
            return False
        message = (f"the store's record of this host's subnet {lease.subnet} names "
                   f"{held.public_ip} while this host's lease still runs: written by "
                   "something else; this host keeps its subnet (delete the record to clear "
                   "this)")
        if self.health.notice(Notice.LEASE_CONFLICT, message):
            log.error("lease record overwritten; keeping the subnet",
                      extra={"subnet": str(lease.subnet), "claimed_by": str(held.public_ip),
                             "error": message})
        return True

    async def _recover(self) -> Lease:
        """Our lease expired (the store was away longer than the TTL, or the host came back
        late). Take the same subnet back if it is free; if another host took it, this host
        must stop answering for it at once and move to a new subnet."""
        old = self.lease
        log.error("lease lost; trying to take the same subnet back",
                  extra={"subnet": str(old.subnet)})
        created = await self.retry.call(
            "recreate lease", lambda: self.store.create_lease(old, self.ttl),
            refusals=Notice.STORE)
        if created is not None:
            return created
        for subnet in old.subnets:  # at once, before a new one is leased
            await _release_lost_subnet(subnet)
        config = self.config
        lease, _ = await self.retry.call(
            "acquire lease",
            lambda: acquire_lease(self.store, config, self.public_ip, config.backend.type,
                                  old.backend_data, self.ttl, public_ipv6=old.public_ipv6,
                                  backend_v6_data=old.backend_v6_data),
            refusals=Notice.STORE)
        await self.take(lease)
        self._note_moved(old.subnet, lease.subnet)
        log.info("lease acquired", extra={"subnet": str(lease.subnet)})
        self.request("new lease", host=True)
        return lease

    def _note_moved(self, old: IPNetwork, new: IPNetwork) -> None:
        self.health.notice(Notice.LEASE, f"subnet {old} was taken by another host while "
                                         f"this one was away; now {new}")


async def _release_lost_subnet(subnet: IPNetwork) -> None:
    """Stop answering for a subnet another host holds now (its gateway address leaves
    the container bridge) and say which local containers that strands."""
    stranded = await asyncio.to_thread(_release_subnet, subnet)
    log.error("this host's previous subnet is held by another host now; released it",
              extra={"subnet": str(subnet),
                     "stranded_containers": ", ".join(stranded) or "none",
                     "action": "restart the stranded containers to give them addresses "
                               "in the new subnet"})


def _release_subnet(subnet: IPNetwork) -> list[str]:
    """Stop answering for a subnet this host no longer holds: its gateway address leaves
    the container bridge. Returns the containers (neighbours on the bridge) left in it."""
    with Netlink() as nl:
        bridge = nl.link(CNI_BRIDGE)
        if bridge is None:
            return []
        stranded = sorted(str(n.ip) for n in nl.neighbours(bridge.index, permanent=False)
                          if n.ip in subnet)
        nl.remove_addresses_in(bridge.index, subnet)
    return stranded
