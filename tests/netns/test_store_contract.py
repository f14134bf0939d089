"""One contract, every store: the same cases run on the SQLite store and on a real etcd.

What the agent relies on from a store, whatever is behind it: the config round-trips;
create-if-absent holds under concurrency (20 hosts at once get 20 distinct subnets, the
21st a clear NetworkFull); a restarted host reclaims its subnet; a lease that is not
renewed is gone for everyone and watchers see it go; a watcher sees every change in
order and can replay history from a revision; a corrupt record is skipped, not fatal;
history that was compacted away makes a watch raise WatchCompacted.

The etcd cases run against one `etcd` process for the session (started on free loopback
ports by tests/etcd_server.py); each test gets its own key prefix.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import weft.store.sqlite
from bounded import run
from etcd_server import etcd_cluster, requires_etcd, unique_prefix
from helpers import await_for, sqlite_put
from weft.agent.leasing import acquire_lease
from weft.backends.registry import parse_config
from weft.core.config import IPNetwork
from weft.core.errors import LeaseNotFound, NetworkFull, WatchCompacted
from weft.core.events import EventKind, LeaseEvent
from weft.core.lease import Lease
from weft.store.base import LeaseStore
from weft.store.etcd import EtcdLeaseStore
from weft.store.sqlite import SqliteLeaseStore
from weft_lab.etcd_local import LocalEtcd

NET = ipaddress.ip_network


def ip(text: str) -> Any:
    return ipaddress.ip_address(text)


# Exactly 20 host subnets: 198.19.1.0/24 .. 198.19.20.0/24.
TWENTY_SUBNETS = (
    '{"Network": "198.19.0.0/16", "SubnetLen": 24, '
    '"SubnetMin": "198.19.1.0", "SubnetMax": "198.19.20.0", "Backend": {"Type": "vxlan"}}'
)
WAIT = 20.0  # upper bound for anything a watcher should see; tests finish far sooner


@dataclass
class StoreUnderTest:
    """How the contract reaches one kind of store, including behind its back."""

    name: str
    open: Callable[[], LeaseStore]
    write_raw: Callable[[str, str], None]  # (key relative to the prefix, value)
    make_history_compacted: Callable[[LeaseStore, Lease], Awaitable[None]]


# --- the two stores ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[LocalEtcd]:
    with etcd_cluster(members=1) as cluster:
        yield cluster


def _sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> StoreUnderTest:
    path = tmp_path / "store.db"

    def write_raw(key: str, value: str) -> None:
        # Straight into the tables, as a buggy or foreign writer would, event included.
        sqlite_put(path, key, value, time.time() + 3600)

    async def compact(store: LeaseStore, lease: Lease) -> None:
        # The store compacts every 1000th event down to HISTORY_EVENTS; make that small
        # and write past the next multiple of 1000.
        monkeypatch.setattr(weft.store.sqlite, "HISTORY_EVENTS", 10)
        _, start = await store.list_leases()
        for _ in range(1000 - start % 1000 + 5):
            await store.renew_lease(lease, 60)

    return StoreUnderTest("sqlite", lambda: SqliteLeaseStore(path), write_raw, compact)


def _etcd(cluster: LocalEtcd) -> StoreUnderTest:
    prefix = unique_prefix()

    def write_raw(key: str, value: str) -> None:
        cluster.etcdctl("put", f"{prefix}/{key}", value)  # the real etcdctl

    async def compact(store: LeaseStore, lease: Lease) -> None:
        for _ in range(3):
            await store.renew_lease(lease, 60)
        _, revision = await store.list_leases()
        cluster.etcdctl("compact", str(revision))

    return StoreUnderTest(
        "etcd", lambda: EtcdLeaseStore.from_url(cluster.url, prefix=prefix), write_raw, compact
    )


@pytest.fixture(
    params=["sqlite", pytest.param("etcd", marks=[pytest.mark.etcd, requires_etcd])]
)
def kind(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> StoreUnderTest:
    if request.param == "sqlite":
        return _sqlite(tmp_path, monkeypatch)
    return _etcd(request.getfixturevalue("etcd_server"))


# --- helpers ----------------------------------------------------------------------------


class opened:
    """`async with opened(kind) as store`: a store connection, closed afterwards."""

    def __init__(self, kind: StoreUnderTest) -> None:
        self.store = kind.open()

    async def __aenter__(self) -> LeaseStore:
        return self.store

    async def __aexit__(self, *exc: object) -> None:
        await self.store.close()


def lease(subnet: str, public_ip: str, **data: Any) -> Lease:
    return Lease(NET(subnet), ip(public_ip), "vxlan", data)


async def collect(
    watch: AsyncIterator[list[LeaseEvent]], until: Callable[[list[LeaseEvent]], bool],
    seen: list[LeaseEvent] | None = None,
) -> list[LeaseEvent]:
    """Events from a watch until `until(events so far)` holds (or WAIT runs out); into
    `seen` as they come, when given."""
    seen = [] if seen is None else seen
    try:
        async with asyncio.timeout(WAIT):
            async for batch in watch:
                seen.extend(batch)
                if until(seen):
                    return seen
    finally:
        aclose = getattr(watch, "aclose", None)
        if aclose is not None:
            await aclose()
    return seen


def summary(events: list[LeaseEvent]) -> list[tuple[str, IPNetwork]]:
    return [(e.kind.value, e.subnet) for e in events]


# --- the contract -----------------------------------------------------------------------


def test_config_round_trips(kind: StoreUnderTest) -> None:
    async def main() -> None:
        async with opened(kind) as store:
            assert await store.get_config() is None
            await store.put_config(TWENTY_SUBNETS)
            async with opened(kind) as other:  # another host reads what this one wrote
                assert await other.get_config() == TWENTY_SUBNETS
            await store.put_config('{"Network": "198.19.0.0/16"}')
            assert await store.get_config() == '{"Network": "198.19.0.0/16"}'

    run(main())


def test_lease_lifecycle_create_once_renew_by_owner_only_delete(kind: StoreUnderTest) -> None:
    async def main() -> None:
        async with opened(kind) as store:
            mine = lease("198.19.3.0/24", "198.18.0.3", VtepMAC="02:00:00:00:00:03")
            before = time.time()
            created = await store.create_lease(mine, ttl=600)
            assert created is not None
            assert before + 598 <= created.expiration <= time.time() + 602
            # Create-if-absent: the subnet is taken now, for anyone.
            assert await store.create_lease(lease("198.19.3.0/24", "198.18.0.4"), 600) is None

            leases, revision = await store.list_leases()
            assert revision > 0
            assert [(x.subnet, x.public_ip, dict(x.backend_data)) for x in leases] == [
                (NET("198.19.3.0/24"), ip("198.18.0.3"), {"VtepMAC": "02:00:00:00:00:03"})
            ]
            # Expiry as the store knows it, for leases read back too.
            assert time.time() + 500 < leases[0].expiration <= time.time() + 602

            with pytest.raises(LeaseNotFound, match=r"198\.19\.3\.0/24"):
                await store.renew_lease(lease("198.19.3.0/24", "198.18.0.4"), 600)
            renewed = await store.renew_lease(
                lease("198.19.3.0/24", "198.18.0.3", VtepMAC="02:00:00:00:00:33"), ttl=1200
            )
            assert renewed.expiration > time.time() + 1100
            leases, _ = await store.list_leases()
            assert [dict(x.backend_data) for x in leases] == [{"VtepMAC": "02:00:00:00:00:33"}]

            await store.delete_lease(NET("198.19.3.0/24"))
            await store.delete_lease(NET("198.19.3.0/24"))  # already gone: not an error
            assert (await store.list_leases())[0] == []
            with pytest.raises(LeaseNotFound):
                await store.renew_lease(mine, 600)

    run(main())


def test_twenty_concurrent_hosts_get_twenty_subnets_and_the_21st_a_clear_network_full(
    kind: StoreUnderTest,
) -> None:
    config = parse_config(TWENTY_SUBNETS)

    async def main() -> None:
        stores = [kind.open() for _ in range(21)]
        try:
            results = await asyncio.gather(
                *(
                    acquire_lease(stores[i], config, ip(f"198.18.0.{i + 1}"), "vxlan", {}, 600)
                    for i in range(20)
                )
            )
            subnets = [got.subnet for got, _ in results]
            assert len(set(subnets)) == 20
            assert set(subnets) == {NET(f"198.19.{i}.0/24") for i in range(1, 21)}
            assert not any(reclaimed for _, reclaimed in results)

            leases, _ = await stores[0].list_leases()
            held = {x.subnet: x.public_ip for x in leases}
            assert held == {got.subnet: got.public_ip for got, _ in results}

            with pytest.raises(NetworkFull) as full:
                await acquire_lease(stores[20], config, ip("198.18.0.21"), "vxlan", {}, 600)
            message = str(full.value)
            assert "198.19.0.0/16" in message
            assert "all 20 /24 subnets" in message
        finally:
            for store in stores:
                await store.close()

    run(main())


def test_restarted_host_reclaims_its_subnet_with_new_backend_data(kind: StoreUnderTest) -> None:
    config = parse_config(TWENTY_SUBNETS)

    async def main() -> None:
        async with opened(kind) as first_run:
            before, reclaimed = await acquire_lease(
                first_run, config, ip("198.18.0.7"), "vxlan", {"VtepMAC": "02:aa"}, 600
            )
            assert not reclaimed
        async with opened(kind) as other_host:
            theirs, _ = await acquire_lease(other_host, config, ip("198.18.0.8"), "vxlan", {}, 600)
        async with opened(kind) as second_run:  # the same host after a restart
            after, reclaimed = await acquire_lease(
                second_run, config, ip("198.18.0.7"), "vxlan", {"VtepMAC": "02:bb"}, 600
            )
            assert reclaimed
            assert after.subnet == before.subnet != theirs.subnet
            leases, _ = await second_run.list_leases()
            by_subnet = {x.subnet: x for x in leases}
            assert dict(by_subnet[before.subnet].backend_data) == {"VtepMAC": "02:bb"}
            assert len(leases) == 2

    run(main())


def test_expired_lease_is_gone_for_everyone_and_watchers_see_it_deleted(
    kind: StoreUnderTest,
) -> None:
    async def main() -> None:
        async with opened(kind) as owner, opened(kind) as watcher, opened(kind) as reader:
            keep = await owner.create_lease(lease("198.19.2.0/24", "198.18.0.2"), ttl=600)
            # 2 s: etcd's smallest TTL with its default election timeout.
            short = await owner.create_lease(lease("198.19.9.0/24", "198.18.0.9"), ttl=2)
            assert keep is not None
            assert short is not None
            _, revision = await reader.list_leases()
            events = await collect(
                watcher.watch(revision),
                until=lambda seen: any(e.kind is EventKind.DELETE for e in seen),
            )
            assert summary(events) == [("delete", NET("198.19.9.0/24"))]
            assert time.time() >= short.expiration - 0.5
            leases, _ = await reader.list_leases()
            assert [x.subnet for x in leases] == [NET("198.19.2.0/24")]
            with pytest.raises(LeaseNotFound):
                await owner.renew_lease(lease("198.19.9.0/24", "198.18.0.9"), 600)

    run(main())


def test_watch_sees_every_change_in_order_and_replays_history(kind: StoreUnderTest) -> None:
    a, b = NET("198.19.4.0/24"), NET("198.19.5.0/24")
    expected = [("put", a), ("put", b), ("put", a), ("delete", b)]

    async def main() -> None:
        async with opened(kind) as host, opened(kind) as watcher, opened(kind) as late:
            _, start = await host.list_leases()

            async def changes() -> None:
                await host.create_lease(lease(str(b), "198.18.0.5"), 600)
                await host.renew_lease(lease(str(a), "198.18.0.4", VtepMAC="02:44"), 600)
                await host.delete_lease(b)

            delivered: list[LeaseEvent] = []

            async def first_delivered() -> bool:
                return bool(delivered)

            async with asyncio.TaskGroup() as group:
                live = group.create_task(collect(
                    watcher.watch(start), until=lambda seen: len(seen) >= 4, seen=delivered))
                await host.create_lease(lease(str(a), "198.18.0.4"), 600)
                # Once the watch has delivered the first change it is running: the next
                # three reach it live, not replayed.
                await await_for("the watch to deliver the first change", first_delivered,
                                WAIT, interval=0.02)
                group.create_task(changes())
            events = live.result()
            assert summary(events) == expected
            revisions = [e.revision for e in events]
            assert revisions == sorted(revisions)
            assert len(set(revisions)) == 4
            assert events[2].lease is not None
            assert dict(events[2].lease.backend_data) == {"VtepMAC": "02:44"}
            assert events[3].lease is None

            # A watcher started afterwards from the same revision replays the history...
            replay = await collect(late.watch(start), until=lambda seen: len(seen) >= 4)
            assert [(e.kind, e.subnet, e.revision) for e in replay] == [
                (e.kind, e.subnet, e.revision) for e in events
            ]
            # ...and one from a revision in the middle gets exactly what came after it.
            tail = await collect(late.watch(revisions[1]), until=lambda seen: len(seen) >= 2)
            assert [e.revision for e in tail] == revisions[2:]

    run(main())


def test_corrupt_records_are_skipped_not_fatal(kind: StoreUnderTest) -> None:
    config = parse_config(TWENTY_SUBNETS)

    async def main() -> None:
        async with opened(kind) as store, opened(kind) as watcher:
            good = await store.create_lease(lease("198.19.1.0/24", "198.18.0.1"), 600)
            assert good is not None
            _, start = await store.list_leases()
            kind.write_raw("subnets/198.19.6.0-24", "{this is not json")
            kind.write_raw("subnets/198.19.8.0-24", '{"PublicIP": "not an address"}')
            kind.write_raw("subnets/garbage-key", '{"PublicIP": "198.18.0.99"}')
            await store.create_lease(lease("198.19.10.0/24", "198.18.0.10"), 600)

            leases, _ = await store.list_leases()
            assert sorted(x.subnet for x in leases) == [NET("198.19.1.0/24"), NET("198.19.10.0/24")]
            # The watcher skips the three bad records and still delivers what follows.
            events = await collect(watcher.watch(start), until=lambda seen: len(seen) >= 1)
            assert summary(events) == [("put", NET("198.19.10.0/24"))]
            # Hosts still acquire leases, never the subnets the bad records sit on.
            got, _ = await acquire_lease(store, config, ip("198.18.0.11"), "vxlan", {}, 600)
            assert got.subnet not in (NET("198.19.6.0/24"), NET("198.19.8.0/24"))

    run(main())


def test_watch_from_compacted_history_raises_watch_compacted(kind: StoreUnderTest) -> None:
    async def main() -> None:
        async with opened(kind) as store, opened(kind) as watcher:
            held = lease("198.19.12.0/24", "198.18.0.12")
            assert await store.create_lease(held, 600) is not None
            _, old = await store.list_leases()
            await kind.make_history_compacted(store, held)

            with pytest.raises(WatchCompacted) as compacted:
                await collect(watcher.watch(old), until=lambda seen: True)
            assert compacted.value.revision == old
            assert compacted.value.oldest > old + 1

            # The way out: list again and watch from that list's revision.
            leases, now = await watcher.list_leases()
            assert [x.subnet for x in leases] == [held.subnet]
            async with asyncio.TaskGroup() as group:
                live = group.create_task(
                    collect(watcher.watch(now), until=lambda seen: len(seen) >= 1)
                )
                # Live or replayed from `now` (whichever comes first), the deletion comes.
                await store.delete_lease(held.subnet)
            assert summary(live.result()) == [("delete", held.subnet)]

    run(main())


# --- dual stack: one lease, both families ----------------------------------------------

# Eight pairs: 198.19.1.0/24 .. 198.19.8.0/24 beside 2001:db8:1:1::/64 .. 2001:db8:1:8::/64.
EIGHT_PAIRS = (
    '{"Network": "198.19.0.0/16", "SubnetMin": "198.19.1.0", "SubnetMax": "198.19.8.0", '
    '"EnableIPv6": true, "IPv6Network": "2001:db8:1::/48", "IPv6SubnetMin": "2001:db8:1:1::", '
    '"IPv6SubnetMax": "2001:db8:1:ff::"}'
)


def test_dual_stack_hosts_lease_both_families_in_one_record(kind: StoreUnderTest) -> None:
    config = parse_config(EIGHT_PAIRS)
    assert config.capacity == 8

    async def main() -> None:
        stores = [kind.open() for _ in range(9)]
        try:
            _, revision = await stores[0].list_leases()
            results = await asyncio.gather(*(
                acquire_lease(stores[i], config, ip(f"198.18.0.{i + 1}"), "vxlan", {}, 600,
                              public_ipv6=ip(f"2001:db8:ff::{i + 1}"), backend_v6_data={})
                for i in range(8)))
            got = [lease for lease, _ in results]
            # Racing hosts settle on distinct pairs, each the n-th of both ranges.
            assert {(x.subnet, x.ipv6_subnet) for x in got} == {
                (NET(f"198.19.{n}.0/24"), NET(f"2001:db8:1:{n}::/64")) for n in range(1, 9)}
            with pytest.raises(NetworkFull, match="no free pair of subnets"):
                await acquire_lease(stores[8], config, ip("198.18.0.9"), "vxlan", {}, 600)
            # The record is flannel's: one key naming both subnets, PublicIPv6 in the value.
            leases, _ = await stores[0].list_leases()
            by_ip = {x.public_ip: x for x in leases}
            first = by_ip[ip("198.18.0.1")]
            assert first.key == (f"subnets/{first.subnet.network_address}-24"
                                 f"&{first.ipv6_subnet.network_address}-64")  # type: ignore[union-attr]
            assert first.public_ipv6 == ip("2001:db8:ff::1")
            # Renewed and reclaimed whole, by the same host after a restart.
            renewed = await stores[0].renew_lease(first, 1200)
            assert renewed.expiration > time.time() + 1100
            again, reclaimed = await acquire_lease(stores[8], config, ip("198.18.0.1"),
                                                   "vxlan", {}, 600, backend_v6_data={})
            assert reclaimed
            assert (again.subnet, again.ipv6_subnet) == (first.subnet, first.ipv6_subnet)
            # Released whole, and a watcher sees that lease's subnet go.
            await stores[0].delete_lease(first.subnet, first.ipv6_subnet)
            leases, _ = await stores[0].list_leases()
            assert first.subnet not in {x.subnet for x in leases}
            assert len(leases) == 7
            seen = await collect(stores[1].watch(revision), lambda events: any(
                e.kind is EventKind.DELETE for e in events))
            assert ("delete", first.subnet) in summary(seen)
            puts = [e.lease for e in seen if e.kind is EventKind.PUT and e.lease is not None]
            assert {x.ipv6_subnet for x in puts} == {x.ipv6_subnet for x in got}
        finally:
            for store in stores:
                await store.close()

    run(main())


def test_a_dual_stack_record_flannel_wrote_is_read(kind: StoreUnderTest) -> None:
    async def main() -> None:
        async with opened(kind) as store:
            await store.list_leases()  # the store made (SQLite's tables)
            await asyncio.to_thread(kind.write_raw, *RECORD)
            leases, _ = await store.list_leases()
            assert [(x.subnet, x.ipv6_subnet, x.public_ipv6, dict(x.backend_v6_data or {}))
                    for x in leases] == [(NET("198.19.4.0/24"), NET("2001:db8:1:4::/64"),
                                          ip("2001:db8:ff::4"),
                                          {"VNI": 1, "VtepMAC": "02:00:00:00:00:14"})]

    run(main())


RECORD = ("subnets/198.19.4.0-24&2001:db8:1:4::-64",
          '{"PublicIP":"198.18.0.4","PublicIPv6":"2001:db8:ff::4",'
          '"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:04"},'
          '"BackendV6Data":{"VNI":1,"VtepMAC":"02:00:00:00:00:14"}}')
