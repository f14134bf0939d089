"""A real agent (vxlan, SQLite) in a network of 300 fake leases: valid records for hosts
that don't exist, on the testbed's underlay range. It programs every peer; a round of
renewals of all 300 makes it reconcile nothing; a changed lease reaches its kernel."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Callable

import pytest

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


def wait_for(what: str, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_an_agent_among_300_fake_leases() -> None:
    with Testbed(hosts=1, containers_per_host=0, config=CONFIG) as tb:
        store_path = tb.store_url.removeprefix("sqlite://")
        host = tb.hosts[0]

        async def write(leases: list[Lease], *, renew: bool = False) -> None:
            store = SqliteLeaseStore(store_path)
            try:
                for x in leases:
                    await (store.renew_lease(x, 3600) if renew else store.create_lease(x, 3600))
            finally:
                await store.close()

        asyncio.run(write([fake(i) for i in range(FAKES)]))
        tb.start_agent(host)
        wait_for("all fake peers programmed", lambda: len(tb.weft_routes(host)) == FAKES)
        neigh = tb.run(host.netns, ["ip", "neigh", "show", "nud", "permanent"]).stdout
        fdb = tb.run(host.netns, ["bridge", "fdb", "show", "dev", "weft.vx1"]).stdout
        assert neigh.count("lladdr 02:5c:") == FAKES
        assert fdb.count("dst 198.18.") == FAKES

        # A renewal round of every lease: the store sends 300 events, the agent applies none.
        wait_for("the start-up passes to settle", lambda: "agent running" in tb.agent_log(host))
        time.sleep(0.5)
        requested = tb.agent_log(host).count("reconcile requested")
        asyncio.run(write([fake(i) for i in range(FAKES)], renew=True))
        time.sleep(1.0)
        assert tb.agent_log(host).count("reconcile requested") == requested

        # One peer restarts with a new VTEP MAC: that change, and only it, reaches the kernel;
        # the deletion of its old FDB entry is the agent's own, so it asks for no repair pass.
        before_change = len(tb.agent_log(host))
        changed = fake(7, mac_suffix=0x42)
        asyncio.run(write([changed], renew=True))
        wait_for("the new MAC in the neighbour table", lambda: "00:42" in tb.run(
            host.netns, ["ip", "neigh", "show", str(changed.subnet.network_address)]).stdout)
        time.sleep(1.0)
        assert "neighbour removed on" not in tb.agent_log(host)[before_change:]

        # A peer leaves and another joins: the ingress filter follows by set elements (no
        # flush), and weft's own element deletions wake no repair pass.
        def members() -> str:
            return tb.run(host.netns, ["nft", "list", "set", "inet", "weft-ingress",
                                       "members"]).stdout

        def nft_wakeups() -> int:
            return tb.agent_log(host).count("netfilter rules removed")

        time.sleep(0.5)
        woken = nft_wakeups()
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
        time.sleep(1.0)
        assert nft_wakeups() == woken

        # An element deleted by hand is still noticed and put back.
        kept = fake(5)
        tb.run(host.netns, ["nft", "delete", "element", "inet", "weft-ingress", "members",
                            f"{{ {kept.public_ip} }}"])
        wait_for("the hand-deleted member back", lambda: f"{kept.public_ip}," in
                 members().replace(" }", ","))
        assert nft_wakeups() > woken
