"""The agent's parts that follow the store, handed a real SQLite store and callbacks of their
own: the lease keeper (a record gone is taken back at once; a record another host wrote
over a running lease is refused, loudly, until it goes) and the store view the watch keeps
(what counts as a change, what the next pass validates again)."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from bounded import run
from weft.agent.health import Health, Notice
from weft.agent.lease_keeper import LeaseKeeper, OwnLease
from weft.agent.metrics import AgentMetrics
from weft.agent.retry import StoreRetry
from weft.agent.store_watch import OwnDeletions, StoreView
from weft.backends.registry import parse_config
from weft.core.config import IPNetwork
from weft.core.events import EventKind, LeaseEvent
from weft.core.lease import Lease
from weft.store.sqlite import SqliteLeaseStore

CONFIG = parse_config('{"Network": "198.19.0.0/16", "SubnetLen": 24}')
SUBNET = ipaddress.ip_network("198.19.1.0/24")
HOST_ID = "0123456789abcdef0123456789abcdef"
OURS = Lease(SUBNET, ipaddress.ip_address("198.18.0.1"), "vxlan", {"VtepMAC": "02:00:00:00:00:01"},
             host_id=HOST_ID)
THEIRS = Lease(SUBNET, ipaddress.ip_address("198.18.0.9"), "vxlan",
               {"VtepMAC": "02:00:00:00:00:09"}, host_id="f" * 32)


async def _until(predicate: Callable[[], bool]) -> None:
    """Poll: the keeper changes its state on the loop, with no event to await."""
    async with asyncio.timeout(10.0):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def keeper_on(store: SqliteLeaseStore, lease: Lease, records: dict[IPNetwork, Lease],
              health: Health, requests: list[str],
              deletions: OwnDeletions | None = None) -> LeaseKeeper:
    taken: list[Lease] = []

    async def on_taken(new: Lease) -> None:
        taken.append(new)

    def request(reason: str, *, host: bool = False, full: bool = True) -> None:
        requests.append(reason)

    return LeaseKeeper(OwnLease(lease), store, CONFIG, OURS.public_ip, ttl=60,
                       activate=lambda _: 1450, on_taken=on_taken, record=records.get,
                       request=request, retry=StoreRetry(health, lambda: None), health=health,
                       metrics=AgentMetrics(), host_id=HOST_ID, deletions=deletions)


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


def test_a_record_written_over_a_running_lease_is_put_back(tmp_path: Path) -> None:
    async def scenario() -> tuple[Lease, Lease, dict[str, Any]]:
        store = SqliteLeaseStore(str(tmp_path / "store.db"))
        created = await store.create_lease(OURS, 60)
        assert created is not None
        await store.restore_lease(THEIRS, 60)  # written over, no deletion between
        records = {SUBNET: THEIRS}
        health = Health()
        keeper = keeper_on(store, created, records, health, [])
        async with asyncio.TaskGroup() as tg:
            renewing = tg.create_task(keeper.run())
            keeper.check_record()
            await _until(lambda: keeper.lease.expiration != created.expiration)
            renewing.cancel()
        leases, _ = await store.list_leases()
        await store.close()
        return leases[0], keeper.lease, health.status()["notices"]

    held, lease, notices = run(scenario())
    assert (held.public_ip, held.host_id, held.backend_data) == (
        OURS.public_ip, HOST_ID, OURS.backend_data)
    assert lease.subnet == SUBNET
    assert notices == {}  # fixed, nothing left to say


def test_a_record_of_another_host_after_a_deletion_is_refused_until_it_goes(
        tmp_path: Path) -> None:
    async def scenario() -> tuple[dict[str, Any], dict[str, Any], Lease]:
        store = SqliteLeaseStore(str(tmp_path / "store.db"))
        created = await store.create_lease(OURS, 60)
        assert created is not None
        await store.delete_lease(SUBNET)
        legacy = replace(THEIRS, host_id="")  # something without an identity wrote it
        assert await store.create_lease(legacy, 60) is not None
        records = {SUBNET: legacy}
        health = Health()
        deletions = OwnDeletions()
        keeper = keeper_on(store, created, records, health, [], deletions)
        deletions.deleted = True  # the watch saw the deletion
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


def test_a_sqlite_store_replaced_by_an_older_copy_is_told_to_the_watcher(tmp_path: Path) -> None:
    import shutil

    import pytest

    from weft.core.errors import StoreRewound

    async def scenario() -> None:
        path = tmp_path / "store.db"
        store = SqliteLeaseStore(str(path))
        await store.create_lease(OURS, 60)
        await store.close()
        shutil.copy(path, tmp_path / "backup.db")
        store = SqliteLeaseStore(str(path))
        await store.create_lease(Lease(ipaddress.ip_network("198.19.2.0/24"),
                                       THEIRS.public_ip, "vxlan"), 60)
        _, seen = await store.list_leases()
        await store.close()
        shutil.copy(tmp_path / "backup.db", path)  # the restore
        store = SqliteLeaseStore(str(path))
        try:
            with pytest.raises(StoreRewound, match="behind revision"):
                await anext(aiter(store.watch(seen)))
        finally:
            await store.close()

    run(scenario())


def test_a_relist_after_the_store_went_back_keeps_the_lost_live_leases_aside() -> None:
    other = Lease(ipaddress.ip_network("198.19.2.0/24"), ipaddress.ip_address("198.18.0.2"),
                  "vxlan", {}, expiration=200.0)
    gone = Lease(ipaddress.ip_network("198.19.3.0/24"), ipaddress.ip_address("198.18.0.3"),
                 "vxlan", {}, expiration=50.0)
    view = StoreView([OURS.with_expiration(200.0), other, gone], 9)
    view.relist([OURS.with_expiration(200.0)], 5, rewound_at=100.0)
    assert other.subnet not in view.leases  # the data plane follows the store...
    assert view.live_subnets(100.0) == {SUBNET, other.subnet}  # ...but it is never taken
    assert view.live_subnets(300.0) == set()


def test_two_weft_hosts_on_one_subnet_the_lower_identity_keeps_it(tmp_path: Path) -> None:
    """Both leases run (the other created the subnet while ours was gone from the store):
    each side sees the same two identities, so exactly one moves, at once."""
    async def scenario(ours: Lease, theirs: Lease) -> tuple[Lease, Lease]:
        store = SqliteLeaseStore(str(tmp_path / f"{ours.host_id[:4]}.db"))
        created = await store.create_lease(ours, 60)
        assert created is not None
        await store.delete_lease(SUBNET)
        assert await store.create_lease(theirs, 60) is not None
        keeper = keeper_on(store, created, {SUBNET: theirs}, Health(), [])
        keeper.host_id = ours.host_id
        async with asyncio.TaskGroup() as tg:
            renewing = tg.create_task(keeper.run())
            keeper.check_record()
            await _until(lambda: keeper.lease.expiration != created.expiration)
            renewing.cancel()
        held = next(lease for lease in (await store.list_leases())[0]
                    if lease.subnet == SUBNET)
        await store.close()
        return keeper.lease, held

    low, high = OURS, replace(OURS, host_id="f" * 32)
    other_low = replace(THEIRS, host_id="0" * 32)
    kept, held = run(scenario(low, replace(THEIRS, host_id="f" * 32)))
    assert (kept.subnet, held.host_id) == (SUBNET, HOST_ID)  # ours put back
    moved, held = run(scenario(high, other_low))
    assert moved.subnet != SUBNET  # the higher identity moved
    assert held.host_id == "0" * 32  # and left the other's record alone


def test_two_hosts_at_one_address_that_start_at_once_do_not_both_run(tmp_path: Path) -> None:
    """Each misses the other in its first listing: after creating, it looks again, and
    one that sees the other's live lease at its address gives its own back and refuses."""
    import pytest

    from weft.agent.leasing import acquire_lease
    from weft.core.errors import AddressInUse

    other = Lease(ipaddress.ip_network("198.19.9.0/24"), OURS.public_ip, "vxlan",
                  host_id="f" * 32)

    class Racing(SqliteLeaseStore):
        """The other host creates its lease between our first listing and our create."""

        raced = False

        async def create_lease(self, lease: Lease, ttl: float) -> Lease | None:
            if not self.raced:
                self.raced = True
                await super().create_lease(other, ttl)
            return await super().create_lease(lease, ttl)

    async def scenario() -> list[Lease]:
        store = Racing(str(tmp_path / "store.db"))
        try:
            with pytest.raises(AddressInUse, match=f"held by host {'f' * 32}"):
                await acquire_lease(store, CONFIG, OURS.public_ip, "vxlan", {}, 60,
                                    host_id=HOST_ID)
            return (await store.list_leases())[0]
        finally:
            await store.close()

    left = run(scenario())
    assert [lease.host_id for lease in left] == ["f" * 32]  # ours given back
