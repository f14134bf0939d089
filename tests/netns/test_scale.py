"""A real agent (vxlan, SQLite) in a network of 300 fake leases: valid records for hosts
that don't exist, on the testbed's underlay range. It programs every peer; a round of
renewals of all 300 makes it reconcile nothing; a changed lease reaches its kernel."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from helpers import wait_alive, wait_for
from weft.core.lease import Lease
from weft.store.sqlite import SqliteLeaseStore
from weft_lab.testbed import Testbed

pytestmark = pytest.mark.netns

FAKES = 300
CONFIG = '{"Network": "198.19.0.0/16", "SubnetLen": 26, "Backend": {"Type": "vxlan"}}'
SUBNETS = list(ipaddress.IPv4Network("198.19.0.0/16").subnets(new_prefix=26))


def fake(i: int, mac_suffix: int = 1) -> Lease:
    subnet = SUBNETS[-1 - i]
    # subnets from the top of the network down (the agent takes one from the bottom), public
    # IPs on 198.18.1.0 onwards: inside the underlay range, off every real host's link.
    return Lease(subnet, ipaddress.ip_address(f"198.18.{1 + i // 250}.{1 + i % 250}"),
                 "vxlan", {"VtepMAC": f"02:5c:{i // 256:02x}:{i % 256:02x}:00:{mac_suffix:02x}"})


def test_an_agent_among_300_fake_leases() -> None:
    # No peer probes: 300 fake peers that never answer are the probes' own test
    # (test_scale_bench); here they would only load the agent and fill its log.
    with Testbed(hosts=1, containers_per_host=0, config=CONFIG,
                 agent_args=["--probe-period", "0"]) as tb:
        store_path = tb.store_url.removeprefix("sqlite://")
        host = tb.hosts[0]

        async def write(leases: list[Lease], *, renew: bool = False) -> None:
            store = SqliteLeaseStore(store_path)
            try:
                for x in leases:
                    await (store.renew_lease(x, 3600) if renew else store.create_lease(x, 3600))
            finally:
                await store.close()

        async def store_revision() -> int:
            store = SqliteLeaseStore(store_path)
            try:
                return (await store.list_leases())[1]
            finally:
                await store.close()

        def seen_up_to(revision: int) -> bool:
            """The agent's watch handled the store up to `revision` (its status says so):
            whatever those events ask of it, it has asked by now."""
            return int(tb.host_status(host)["revision"]) >= revision

        asyncio.run(write([fake(i) for i in range(FAKES)]))
        tb.start_agent(host)
        wait_for("all fake peers programmed", lambda: len(tb.weft_routes(host)) == FAKES)
        neigh = tb.run(host.netns, ["ip", "neigh", "show", "nud", "permanent"]).stdout
        fdb = tb.run(host.netns, ["bridge", "fdb", "show", "dev", "weft.vx1"]).stdout
        assert neigh.count("lladdr 02:5c:") == FAKES
        assert fdb.count("dst 198.18.") == FAKES

        # A renewal round of every lease: the store sends 300 events, the agent applies none.
        wait_for("the start-up passes to settle", lambda: "agent running" in tb.agent_log(host))
        start_revision = asyncio.run(store_revision())
        wait_for("the agent to see the whole store", lambda: seen_up_to(start_revision)
                 and len(tb.host_status(host)["peers"]) == FAKES, seen=lambda: tb.host_status(host))
        requested = tb.agent_log(host).count("reconcile requested")
        asyncio.run(write([fake(i) for i in range(FAKES)], renew=True))
        renewed_revision = asyncio.run(store_revision())
        assert renewed_revision >= start_revision + FAKES
        # Every renewal handled (the thing the count below waits for), and none asked for
        # a pass.
        wait_for("the agent to handle the 300 renewals", lambda: seen_up_to(renewed_revision),
                 seen=lambda: tb.host_status(host)["revision"])
        assert tb.agent_log(host).count("reconcile requested") == requested

        # One peer restarts with a new VTEP MAC: that change, and only it, reaches the kernel;
        # the deletion of its old FDB entry is the agent's own, so it asks for no repair pass.
        before_change = len(tb.agent_log(host))
        changed = fake(7, mac_suffix=0x42)
        asyncio.run(write([changed], renew=True))
        wait_for("the new MAC in the neighbour table", lambda: "00:42" in tb.run(
            host.netns, ["ip", "neigh", "show", str(changed.subnet.network_address)]).stdout)
        # A barrier: a route deleted by hand comes after the kernel's echo of that deletion
        # on the same rtnetlink stream, so once the agent has put it back, it has read the
        # echo too.
        barrier = str(fake(9).subnet)
        tb.run(host.netns, ["ip", "route", "del", barrier])
        wait_for("the hand-deleted route back", lambda: barrier in tb.weft_routes(host))
        assert "neighbour removed on" not in tb.agent_log(host)[before_change:]

        # A peer leaves and another joins: the ingress filter follows by set elements (no
        # flush), and weft's own element deletions wake no repair pass.
        def members() -> str:
            return tb.run(host.netns, ["nft", "list", "set", "inet", "weft-ingress",
                                       "members"]).stdout

        def nft_wakeups() -> int:
            return tb.agent_log(host).count("netfilter rules removed")

        woken = nft_wakeups()  # the barrier's pass above is done: nothing of it is pending
        gone, joined = fake(3), fake(FAKES)

        async def swap() -> None:
            store = SqliteLeaseStore(store_path)
            try:
                await store.delete_lease(gone.subnet)
                await store.create_lease(joined, 3600)
            finally:
                await store.close()

        asyncio.run(swap())

        def swapped() -> bool:
            listed = members()
            return f"{joined.public_ip}," in listed.replace(" }", ",") and \
                f"{gone.public_ip}," not in listed.replace(" }", ",")

        wait_for("the ingress members to follow", swapped)
        wait_for("the joined peer's route", lambda: str(joined.subnet) in tb.run(
            host.netns, ["ip", "route", "show", "proto", "87"]).stdout)

        # A barrier: a FORWARD rule added by hand (a wake-up of another kind) comes after
        # weft's own deletions on the `nft monitor` stream, so once the agent has asked for
        # a pass for it, it has read those too.
        rule = ["FORWARD", "-s", "198.18.250.1/32", "-j", "ACCEPT"]
        since = len(tb.agent_log(host))
        tb.run(host.netns, ["iptables", "-w", "5", "-A", *rule])
        wait_for("the hand-added FORWARD rule seen",
                 lambda: "FORWARD rule added" in tb.agent_log(host)[since:])
        assert nft_wakeups() == woken
        tb.run(host.netns, ["iptables", "-w", "5", "-D", *rule])
        wait_for("the hand-deleted FORWARD rule seen", lambda: nft_wakeups() > woken)

        # An element deleted by hand is still noticed (not taken for an echo of weft's own)
        # and put back. A wake-up is logged only when no pass is pending, and the pass the
        # hand-deleted rule asked for may not have started yet: then that pass puts the
        # member back and the deletion's wake-up is folded into it, so the deletion is
        # repeated until one meets an idle worker. Put back at once when the watcher sees
        # it, at the latest by the next resync (60 s) if an event were lost: the test waits
        # for that, and fails below unless some deletion woke a pass of its own.
        kept = fake(5)
        noticed = []
        for _ in range(3):
            woken = nft_wakeups()
            tb.run(host.netns, ["nft", "delete", "element", "inet", "weft-ingress", "members",
                                f"{{ {kept.public_ip} }}"])
            wait_alive(tb, "the hand-deleted member back", lambda: f"{kept.public_ip}," in
                       members().replace(" }", ","), timeout=75,
                       seen=lambda: tb.agent_log(host)[-4000:])
            noticed.append(nft_wakeups() > woken)
            if noticed[-1]:
                break
        assert any(noticed), "a hand-deleted member woke no pass (taken for weft's own echo)"
