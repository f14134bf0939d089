"""etcd failing under weft: members crash, the whole cluster goes away, history is compacted.

Two levels. The store alone, against real etcd processes on loopback: an unreachable etcd
is a clear StoreUnavailable; with one member of three killed, requests and watches move
to another member and no event is lost or repeated; a member left without a leader is
unavailable, never a refusal; across a restart of the whole cluster
a watch resumes where it stopped. Then whole agents, in the namespace testbed, with a
3-member cluster inside the run's underlay namespace: a member dies and the agents keep
renewing and a new host still joins; etcd dies entirely and the overlay keeps carrying
traffic, a host started meanwhile waits and joins when etcd is back; agents cut off from
etcd while a lease is deleted and the history compacted resync and drop that peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from bounded import run
from etcd_server import (
    ROOT_USER,
    enable_auth,
    etcd_cluster,
    leader_index,
    requires_etcd,
    unique_prefix,
)
from helpers import DATA_PLANES, FASTPATH_TOOLS, await_for, record_figure, wait_for
from weft.core.constants import DEFAULT_ETCD_PREFIX
from weft.core.errors import StoreUnavailable, WatchCompacted
from weft.core.events import LeaseEvent
from weft.core.lease import Lease
from weft.store.etcd import EtcdLeaseStore
from weft_lab.etcd_local import LocalEtcd, free_loopback_port
from weft_lab.testbed import Testbed, netns_exec, sh

pytestmark = pytest.mark.etcd

NET = "198.19.{}.0/24"


def lease(i: int) -> Lease:
    import ipaddress

    return Lease(ipaddress.ip_network(NET.format(i)), ipaddress.ip_address(f"198.18.0.{i}"),
                 "vxlan", {})


# --- the store alone, on loopback -------------------------------------------------------


def test_unreachable_etcd_is_a_clear_store_unavailable() -> None:
    dead = [free_loopback_port(), free_loopback_port()]  # nothing listens there
    url = "etcd://" + ",".join(f"127.0.0.1:{p}" for p in dead)

    async def main() -> None:
        store = EtcdLeaseStore.from_url(url)
        try:
            with pytest.raises(StoreUnavailable) as failed:
                await store.list_leases()
        finally:
            await store.close()
        message = str(failed.value)
        assert "cannot reach etcd to list leases" in message
        for port in dead:  # every endpoint was tried, and is named
            assert f"127.0.0.1:{port}" in message

    run(main())


@pytest.fixture
def three_members() -> Iterator[LocalEtcd]:
    with etcd_cluster(members=3) as cluster:
        yield cluster


@contextlib.asynccontextmanager
async def _writer_and_watcher(url: str, prefix: str
                              ) -> AsyncIterator[tuple[EtcdLeaseStore, EtcdLeaseStore]]:
    """Two clients of one cluster, as two hosts would be: one writes, one watches."""
    writer = EtcdLeaseStore.from_url(url, prefix=prefix)
    watcher = EtcdLeaseStore.from_url(url, prefix=prefix)
    try:
        yield writer, watcher
    finally:
        await writer.close()
        await watcher.close()


async def _collect(store: EtcdLeaseStore, since: int, count: int,
                   out: list[LeaseEvent]) -> None:
    watch = store.watch(since)
    try:
        async for batch in watch:
            out.extend(batch)
            if len(out) >= count:
                return
    finally:
        await watch.aclose()


@requires_etcd
@pytest.mark.parametrize("victim", ["first endpoint", "leader"])
def test_one_member_killed_requests_and_watch_move_to_another(
    three_members: LocalEtcd, victim: str, record_property: Callable[[str, object], None]
) -> None:
    # The first endpoint: where both clients are connected. The leader: an election.
    doomed = 0 if victim == "first endpoint" else leader_index(three_members)
    prefix = unique_prefix()
    slowest = 0.0

    async def main() -> None:
        nonlocal slowest
        async with _writer_and_watcher(three_members.url, prefix) as (writer, watcher):
            _, start = await writer.list_leases()
            seen: list[LeaseEvent] = []
            async with asyncio.TaskGroup() as group:
                group.create_task(_collect(watcher, start, 6, seen))
                for i in (1, 2, 3):
                    assert await writer.create_lease(lease(i), 60) is not None

                async def seen_three() -> bool:
                    return len(seen) >= 3

                # The watch delivered the first three: it is live when the member dies.
                await await_for("the first three events", seen_three, 30, interval=0.05)
                await asyncio.to_thread(three_members.kill, doomed)
                for i in (4, 5, 6):  # no error reaches the caller
                    started = time.monotonic()
                    assert await writer.create_lease(lease(i), 60) is not None
                    slowest = max(slowest, time.monotonic() - started)
            subnets = [str(e.subnet) for e in seen]
            assert subnets == [NET.format(i) for i in range(1, 7)]  # none lost, none twice
            leases, _ = await writer.list_leases()
            assert len(leases) == 6

    run(main())
    # At worst one timed-out attempt: a figure for the docs, not a bound.
    record_figure(record_property, f"etcd: slowest write after the {victim} member died",
                  slowest)


@requires_etcd
def test_a_member_without_a_leader_is_unavailable_not_a_refusal(
    three_members: LocalEtcd,
) -> None:
    # etcd ends a stream (a keep-alive, a watch) at once on a member that has no leader
    # (weft asks for `hasleader`); grpc.aio then often reports its own failed write of the
    # request (INTERNAL) instead of etcd's UNAVAILABLE; a keep-alive caught there while the
    # leader goes runs out of its deadline, which etcd may report as UNKNOWN. Either way the
    # member cannot serve us now: taken for a refusal, it stopped an agent renewing right
    # after its leader died.
    prefix = unique_prefix()
    lone = three_members.members[2]

    async def main() -> None:
        store = EtcdLeaseStore.from_url(f"etcd://{lone.endpoint}", prefix=prefix)
        try:
            held = await store.create_lease(lease(1), 60)
            assert held is not None
            for i in (0, 1):
                await asyncio.to_thread(three_members.kill, i)
            async def leaderless() -> bool:  # the member knows (it may have been the leader)
                try:
                    await store.renew_lease(held, 60)
                except StoreUnavailable:
                    return True
                return False

            await await_for("the lone member to know it has no leader", leaderless, 30)
            for _ in range(40):  # a keep-alive stream each
                with pytest.raises(StoreUnavailable):
                    await store.renew_lease(held, 60)
            for _ in range(8):  # a watch never raises: it reconnects until a leader is back
                watch = store.watch(1)
                try:
                    with pytest.raises(TimeoutError):
                        async with asyncio.timeout(0.4):
                            await anext(watch)
                finally:
                    await watch.aclose()
        finally:
            await store.close()

    run(main())


class _Count(logging.Handler):
    """Counts the log records whose message starts with `text`."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text, self.count = text, 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += record.getMessage().startswith(self.text)


@requires_etcd
def test_watch_resumes_across_a_restart_of_the_whole_cluster(three_members: LocalEtcd) -> None:
    prefix = unique_prefix()
    interruptions = _Count("etcd watch interrupted")
    store_log = logging.getLogger("weft.store.etcd")
    store_log.addHandler(interruptions)
    store_log.setLevel(logging.WARNING)

    async def main() -> None:
        async with _writer_and_watcher(three_members.url, prefix) as (writer, watcher):
            _, start = await writer.list_leases()
            seen: list[LeaseEvent] = []
            async with asyncio.TaskGroup() as group:
                group.create_task(_collect(watcher, start, 2, seen))
                assert await writer.create_lease(lease(1), 60) is not None

                async def seen_one() -> bool:
                    return len(seen) >= 1

                await await_for("the first event", seen_one, 30, interval=0.05)
                for i in range(3):
                    await asyncio.to_thread(three_members.kill, i)
                with pytest.raises(StoreUnavailable):
                    await writer.create_lease(lease(2), 60)

                async def retried() -> bool:
                    return interruptions.count >= 2

                # The watch keeps retrying meanwhile: twice against the dead cluster.
                await await_for("the watch to retry twice", retried, 60, interval=0.05)
                for i in range(3):
                    await asyncio.to_thread(three_members.restart, i, wait=False)
                await asyncio.to_thread(three_members.wait_healthy)
                async def written() -> bool:  # the cluster may still be electing a leader
                    try:
                        assert await writer.create_lease(lease(2), 60) is not None
                    except StoreUnavailable:
                        return False
                    return True

                await await_for("a write once a leader is elected", written, 30, interval=0.2)
            assert [str(e.subnet) for e in seen] == [NET.format(1), NET.format(2)]

    try:
        run(main())
    finally:
        store_log.removeHandler(interruptions)


async def _first_batch(store: EtcdLeaseStore, since: int) -> list[LeaseEvent]:
    watch = store.watch(since)
    try:
        async with asyncio.timeout(10):
            return await anext(watch)
    finally:
        await watch.aclose()


@requires_etcd
def test_compaction_right_at_a_deletion_is_reported_not_swallowed() -> None:
    # etcd drops a deletion's tombstone when compacting at exactly its revision, and only
    # calls a watch compacted when it starts below the compaction revision: a watcher
    # that had seen everything up to the revision before must still learn of it.
    prefix = unique_prefix()

    async def main(cluster: LocalEtcd) -> None:
        store = EtcdLeaseStore.from_url(cluster.url, prefix=prefix)
        try:
            assert await store.create_lease(lease(1), 60) is not None
            _, seen_up_to = await store.list_leases()
            cluster.etcdctl("del", f"{prefix}/subnets/198.19.1.0-24")
            _, deleted_at = await store.list_leases()
            assert deleted_at == seen_up_to + 1
            cluster.etcdctl("compact", str(deleted_at))
            with pytest.raises(WatchCompacted):
                await _first_batch(store, seen_up_to)
        finally:
            await store.close()

    with etcd_cluster() as cluster:
        run(main(cluster))


# --- whole agents in the namespace testbed ----------------------------------------------


def _join(tb: Testbed, index: int) -> None:
    host = tb.hosts[index]
    tb.wait_subnet_env(host, 60)
    for c in tb.containers:
        if c.host is host:
            tb.attach(c)
    tb.wait_converged(60)


def _renewals(tb: Testbed, index: int) -> int:
    return tb.agent_log(tb.hosts[index]).count("lease renewed")


def _interruptions(tb: Testbed, index: int) -> int:
    return tb.agent_log(tb.hosts[index]).count("etcd watch interrupted")


def _ping(tb: Testbed, src: str, dst: object, seconds: float) -> subprocess.Popen[str]:
    count = int(seconds / 0.1)
    return subprocess.Popen(
        netns_exec(src, ["ping", "-i", "0.1", "-c", str(count), "-W", "1", str(dst)]),
        stdout=subprocess.PIPE, text=True,
    )


@requires_etcd
@pytest.mark.netns
def test_member_killed_agents_keep_renewing_and_a_new_host_joins() -> None:
    with Testbed(hosts=3, containers_per_host=1, store="etcd", etcd_members=3, lease_ttl=4) as tb:
        tb.start(hosts=tb.hosts[:2])
        subnets = {h.name: tb.host_status(h)["subnet"] for h in tb.hosts[:2]}
        tb.etcd.kill(0)  # the first endpoint: where every agent is connected
        before = [_renewals(tb, i) for i in (0, 1)]
        # 4 s leases renew every 2 s.
        wait_for("three renewals on each host", lambda: all(
            _renewals(tb, i) >= before[i] + 3 for i in (0, 1)), 60, interval=0.2,
            seen=lambda: (before, [_renewals(tb, i) for i in (0, 1)]))
        for i in (0, 1):
            assert "lease lost" not in tb.agent_log(tb.hosts[i])
        tb.start_agent(tb.hosts[2])
        _join(tb, 2)
        assert {h.name: tb.host_status(h)["subnet"] for h in tb.hosts[:2]} == subnets
        c1, _, c3 = tb.containers
        assert tb.ping(c1.netns, c3.ip, count=3)
        assert tb.ping(c3.netns, c1.ip, count=3)


@requires_etcd
@pytest.mark.netns
@pytest.mark.parametrize("plane", list(DATA_PLANES))
def test_etcd_gone_traffic_flows_a_new_host_waits_and_joins_when_it_returns(plane: str) -> None:
    with Testbed(hosts=3, containers_per_host=1, store="etcd", etcd_members=3, lease_ttl=30,
                 agent_args=DATA_PLANES[plane]) as tb:
        tb.start(hosts=tb.hosts[:2])
        for host in tb.hosts[:2]:
            status = tb.host_status(host)["fastpath"]
            assert status["active"] == (plane == "fastpath" and FASTPATH_TOOLS), status
        c1, c2, c3 = tb.containers
        wait_for("traffic before etcd goes", lambda: tb.ping(c1.netns, c2.ip), 30)
        ping = _ping(tb, c1.netns, c2.ip, seconds=12)
        try:
            for i in range(3):
                tb.etcd.kill(i)
            late = tb.hosts[2]
            tb.start_agent(late)  # a host that boots while etcd is down

            def retried_twice() -> bool:
                tb.check_alive(late)  # it waits, it does not give up
                return tb.agent_log(late).count("store unavailable; retrying") >= 2

            wait_for("the late host to retry the store twice", retried_twice, 60,
                     seen=lambda: tb.agent_log(late)[-2000:])
            assert not late.subnet_env_path.exists()
            for i in range(3):
                tb.etcd.restart(i, wait=False)
            tb.etcd.wait_healthy()
            out, _ = ping.communicate(timeout=30)
        finally:
            ping.kill()
        assert " 0% packet loss" in out, out
        _join(tb, 2)  # the late host got a lease; the others added it
        assert tb.ping(c1.netns, c3.ip, count=3)
        assert tb.ping(c3.netns, c2.ip, count=3)


@requires_etcd
@pytest.mark.netns
def test_agents_cut_off_while_a_lease_goes_and_history_is_compacted_resync() -> None:
    with Testbed(hosts=3, containers_per_host=0, store="etcd", etcd_members=3, lease_ttl=60) as tb:
        tb.start()
        gone = tb.hosts[2]
        subnet = tb.host_status(gone)["subnet"]
        assert all(subnet in tb.weft_routes(tb.hosts[i]) for i in (0, 1))
        tb.stop_agent(gone, signal.SIGKILL)  # its lease stays until deleted
        ports = ", ".join(str(m.client_port) for m in tb.etcd.members)
        interrupted = [_interruptions(tb, i) for i in (0, 1)]
        # The hosts can no longer reach etcd (every packet from the bridge to etcd's client
        # ports refused); the operator, local to etcd, still can.
        cut = (f"table inet weft_cut {{\n chain input {{\n"
               f"  type filter hook input priority 0;\n"
               f'  iifname "br0" tcp dport {{ {ports} }} reject with tcp reset\n }}\n}}\n')
        sh(netns_exec(tb.underlay, ["nft", "-f", "-"]), input=cut)
        # grpc's keepalive (every 10 s) finds the agents' watch streams dead.
        wait_for("each agent's watch found dead", lambda: all(
            _interruptions(tb, i) > interrupted[i] for i in (0, 1)), 60, interval=0.2,
            seen=lambda: (interrupted, [_interruptions(tb, i) for i in (0, 1)]))
        prefix = "/weft/network"
        key = f"{prefix}/subnets/{subnet.replace('/', '-')}"
        assert tb.etcd.etcdctl("del", key).stdout.strip() == "1"
        status = json.loads(tb.etcd.etcdctl("endpoint", "status", "-w", "json").stdout)
        revision = max(s["Status"]["header"]["revision"] for s in status)
        tb.etcd.etcdctl("compact", str(revision))
        tb.run(tb.underlay, ["nft", "delete", "table", "inet", "weft_cut"])
        wait_for("the deleted lease's routes gone", lambda: all(
            subnet not in tb.weft_routes(tb.hosts[i]) for i in (0, 1)), 60, interval=0.2,
            seen=lambda: tb.agent_log(tb.hosts[0])[-3000:])
        tb.wait_converged(30, hosts=tb.hosts[:2])
        for i in (0, 1):
            assert "watch history compacted; resyncing" in tb.agent_log(tb.hosts[i])


@requires_etcd
@pytest.mark.netns
def test_a_store_that_refuses_the_agent_keeps_it_running_and_it_renews_once_allowed() -> None:
    """Permissions taken away from running agents (an operator's mistake, or a store
    someone else controls): every renewal is refused, not unreachable. The agents stay up
    with their subnets and data plane and say so; the refusal outlasts their leases, which
    etcd then expires (peers drop each other, as for any expired lease); allowed to read
    but not to write, each finds its record gone and keeps asking; once allowed again,
    each takes its own subnet back and traffic flows."""
    ttl = 10
    with Testbed(hosts=2, containers_per_host=1, store="etcd", lease_ttl=ttl,
                 agent_args=["--etcd-username", "weft", "--etcd-password", "secret",
                             "--etcd-allow-plaintext-auth"]) as tb:
        grant = ("weft", f"{DEFAULT_ETCD_PREFIX}/", "--prefix=true")
        enable_auth(tb.etcd, grant[1])
        tb.start(hosts=tb.hosts[:2])
        subnets = [tb.host_status(h)["subnet"] for h in tb.hosts]
        c1, c2 = tb.containers
        tb.etcd.etcdctl(ROOT_USER, "role", "revoke-permission", *grant)

        def alive() -> None:
            for host in tb.hosts:
                assert host.agent is not None
                assert host.agent.poll() is None, tb.agent_log(host)[-3000:]

        def notices() -> list[dict[str, str]]:
            alive()
            return [tb.host_status(h)["notices"] for h in tb.hosts]

        # Leases renew at half their TTL: every agent is refused while its lease still
        # runs (its peer is still there: peers drop each other when leases expire).
        wait_for("every agent refused", lambda: all("store" in n for n in notices()),
                 3 * ttl, interval=0.2, seen=notices)
        for i, host in enumerate(tb.hosts):
            status = tb.host_status(host)
            assert status["subnet"] == subnets[i]
            assert status["peers"], status  # refused while the leases still run
            assert "permission denied" in status["notices"]["store"], status["notices"]
        assert tb.ping(c1.netns, c2.ip, count=3)  # the data plane carries on meanwhile
        # Refused past the leases' end: etcd expires them and the peers drop each other.
        def peers() -> list[list[str]]:
            alive()
            return [tb.host_status(h)["peers"] for h in tb.hosts]

        wait_for("the expired leases dropped", lambda: not any(peers()), 6 * ttl,
                 interval=0.5, seen=peers)
        for host in tb.hosts:
            log = tb.agent_log(host)
            assert "agent stopped" not in log
            # Said when it starts, not on every retry (a refusal answers at once).
            assert log.count("store refused; retrying") <= 3, log[-3000:]
        # Read again, not write: each agent finds its record gone and cannot recreate it.
        tb.etcd.etcdctl(ROOT_USER, "role", "grant-permission", grant[0], "read", *grant[1:])
        wait_for("each agent unable to recreate its lease", lambda: all(
            "recreate lease" in n.get("store", "") for n in notices()), 6 * ttl,
            interval=0.2, seen=notices)
        alive()
        tb.etcd.etcdctl(ROOT_USER, "role", "grant-permission", grant[0], "readwrite", *grant[1:])
        tb.wait_converged(60)
        statuses = [tb.host_status(h) for h in tb.hosts]
        assert [s["subnet"] for s in statuses] == subnets  # each took its own back
        assert not any("store" in s["notices"] for s in statuses)
        assert tb.ping(c1.netns, c2.ip, count=3)
        assert tb.ping(c2.netns, c1.ip, count=3)
