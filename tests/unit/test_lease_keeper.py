"""The agent's parts that follow the store, handed a real SQLite store and callbacks of their
own: the lease keeper (a record gone is taken back at once; a record another host wrote
over a running lease is refused, loudly, until it goes) and the store view the watch keeps
(what counts as a change, what the next pass validates again)."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bounded import run
from weft.agent.health import Health, Notice
from weft.agent.lease_keeper import LeaseKeeper, OwnLease
from weft.agent.metrics import AgentMetrics
from weft.agent.retry import StoreRetry
from weft.agent.store_watch import StoreView
from weft.backends.registry import parse_config
from weft.core.config import IPNetwork
from weft.core.events import EventKind, LeaseEvent
from weft.core.lease import Lease
from weft.store.sqlite import SqliteLeaseStore

CONFIG = parse_config('{"Network": "198.19.0.0/16", "SubnetLen": 24}')
SUBNET = ipaddress.ip_network("198.19.1.0/24")
OURS = Lease(SUBNET, ipaddress.ip_address("198.18.0.1"), "vxlan", {"VtepMAC": "02:00:00:00:00:01"})
THEIRS = Lease(SUBNET, ipaddress.ip_address("198.18.0.9"), "vxlan",
               {"VtepMAC": "02:00:00:00:00:09"})


async def _until(predicate: Callable[[], bool]) -> None:
    """Poll: the keeper changes its state on the loop, with no event to await."""
    async with asyncio.timeout(10.0):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def keeper_on(store: SqliteLeaseStore, lease: Lease, records: dict[IPNetwork, Lease],
              health: Health, requests: list[str]) -> LeaseKeeper:
    taken: list[Lease] = []

    async def on_taken(new: Lease) -> None:
        taken.append(new)

    def request(reason: str, *, host: bool = False, full: bool = True) -> None:
        requests.append(reason)

    return LeaseKeeper(OwnLease(lease), store, CONFIG, OURS.public_ip, ttl=60,
                       activate=lambda _: 1450, on_taken=on_taken, record=records.get,
                       request=request, retry=StoreRetry(health, lambda: None), health=health,
                       metrics=AgentMetrics())


def test_a_record_gone_is_taken_back_at_once(tmp_path: Path) -> None:
    async def scenario() -> tuple[Lease | None, Lease, list[str]]:
        store = SqliteLeaseStore(str(tmp_path / "store.db"))
        created = await store.create_lease(OURS, 60)
        assert created is not None
        requests: list[str] = []
        keeper = keeper_on(store, created, {}, Health(), requests)
        await store.delete_lease(SUBNET)
        async with asyncio.TaskGroup() as tg:
            renewing = tg.create_task(keeper.run())
            keeper.check_record()  # the watch saw the deletion: now, not at renew time
            await _until(lambda: keeper.lease.expiration != created.expiration)
            renewing.cancel()
        leases, _ = await store.list_leases()
        await store.close()
        return next(iter(leases), None), keeper.lease, requests

    held, lease, requests = run(scenario())
    assert held is not None
    assert (held.subnet, held.public_ip) == (SUBNET, OURS.public_ip)
    assert lease.subnet == SUBNET
    assert requests == []  # the same subnet: nothing of the data plane moves


def test_a_record_written_over_a_running_lease_is_refused_until_it_goes(tmp_path: Path) -> None:
    async def scenario() -> tuple[dict[str, Any], dict[str, Any], Lease]:
        store = SqliteLeaseStore(str(tmp_path / "store.db"))
        created = await store.create_lease(OURS, 60)
        assert created is not None
        await store.delete_lease(SUBNET)
        assert await store.create_lease(THEIRS, 60) is not None  # written by something else
        records = {SUBNET: THEIRS}
        health = Health()
        keeper = keeper_on(store, created, records, health, [])
        async with asyncio.TaskGroup() as tg:
            renewing = tg.create_task(keeper.run())
            keeper.check_record()
            await _until(lambda: Notice.LEASE_CONFLICT in health.notices)
            conflict = health.status()["notices"]
            await store.delete_lease(SUBNET)  # the record goes: the lease is ours again
            records.clear()
            keeper.check_record()
            await _until(lambda: keeper.lease.expiration != created.expiration)
            renewing.cancel()
        await store.close()
        return conflict, health.status()["notices"], keeper.lease

    conflict, after, lease = run(scenario())
    assert "names 198.18.0.9 while this host's lease still runs" in conflict["lease_conflict"]
    assert after == {}
    assert (lease.subnet, lease.public_ip) == (SUBNET, OURS.public_ip)


def put(lease: Lease, revision: int) -> LeaseEvent:
    return LeaseEvent(EventKind.PUT, lease.subnet, revision, lease)


def test_the_store_view_tells_a_change_from_a_renewal() -> None:
    view = StoreView([OURS], 3)
    other = Lease(ipaddress.ip_network("198.19.2.0/24"), ipaddress.ip_address("198.18.0.2"),
                  "vxlan", {"VtepMAC": "02:00:00:00:00:02"})
    assert view.apply([put(other, 4)], {})
    assert not view.apply([put(other.with_expiration(99.0), 5)], {})  # a renewal
    bad = {"/weft/subnets/x": "not a subnet key"}
    assert view.apply([], bad)  # an empty batch: only the records that are not leases moved
    assert not view.apply([put(other.with_expiration(100.0), 6)], bad)
    assert view.apply([put(other.with_expiration(101.0), 7)], {})  # the bad record went
    assert view.apply([LeaseEvent(EventKind.DELETE, other.subnet, 8)], {})
    assert view.revision == 8
    assert view.take_changes() == ({other.subnet}, {other.subnet})
    assert view.take_changes() == (set(), set())


def test_a_relist_names_every_subnet_before_and_after() -> None:
    view = StoreView([OURS], 3)
    other = Lease(ipaddress.ip_network("198.19.2.0/24"), ipaddress.ip_address("198.18.0.2"),
                  "vxlan", {})
    view.relist([other], 9)
    assert view.revision == 9
    assert view.record(SUBNET) is None
    assert view.take_changes() == ({SUBNET, other.subnet}, set())
