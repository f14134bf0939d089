"""The echoes a backend's removals name (`weft.backends.bulk.apply_tables`) cover every
event the agent's kernel watcher makes of the kernel's messages for them, so the agent
takes its own deletions for its own: routes of the main table and of auto's tables, IPv6,
FDB entries on a weft device. (A permanent neighbour's deletion is announced too; the
kernel seen here reports it as NUD_FAILED, which the watcher ignores, so that echo waits
unmatched until the next full pass, where it can only match that same neighbour.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.netns

SCRIPT = r"""
import asyncio, collections, ipaddress, subprocess
from pyroute2.iproute.linux import AsyncIPRoute
from pyroute2.netlink.rtnl import (RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE, RTMGRP_LINK,
                                   RTMGRP_NEIGH)
from weft.agent.triggers import kernel_removal
from weft.backends.base import delta
from weft.backends.bulk import apply_tables
from weft.core.dataplane import FdbEntry, Neighbour, Route
from weft.core.kernel_events import NeighbourRemoved

def sh(*args):
    subprocess.run(args, check=True)

sh("ip", "link", "add", "weft.t0", "type", "vxlan", "id", "7", "dstport", "4789", "nolearning")
sh("ip", "link", "set", "weft.t0", "up")
sh("ip", "address", "add", "198.19.1.0/32", "dev", "weft.t0")
sh("ip", "-6", "address", "add", "2001:db8:1::/128", "dev", "weft.t0")
index = int(open("/sys/class/net/weft.t0/ifindex").read())
net, ip = ipaddress.ip_network, ipaddress.ip_address
routes = frozenset({
    Route(net("198.19.3.0/24"), ip("198.19.3.0"), index, onlink=True),
    Route(net("198.19.4.0/24"), ip("198.19.4.0"), index, onlink=True,
          table=0x5702),  # > 255, as auto's tables
    Route(net("2001:db8:3::/64"), None, index)})
neighbours = frozenset({Neighbour(ip("198.19.3.0"), "02:00:00:00:00:03", index)})
fdb = frozenset({FdbEntry("02:00:00:00:00:03", ip("198.18.0.3"), index)})
added = apply_tables(delta(routes, frozenset()), delta(neighbours, frozenset()),
                     delta(fdb, frozenset()), "weft.t0")
assert not added.errors, added.errors

async def main():
    async with AsyncIPRoute() as ipr:
        await ipr.bind(groups=RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE
                       | RTMGRP_IPV6_ROUTE)
        devices = {}
        async for link in await ipr.get_links():
            devices[link["index"]] = link.get_attr("IFLA_IFNAME") or ""
        removed = await asyncio.to_thread(
            apply_tables, delta(frozenset(), routes), delta(frozenset(), neighbours),
            delta(frozenset(), fdb), "weft.t0")
        assert not removed.errors, removed.errors
        expected = collections.Counter(removed.echoes)
        shown = collections.Counter(e for e in removed.echoes
                                    if not isinstance(e, NeighbourRemoved))
        seen = collections.Counter()
        async with asyncio.timeout(10):
            while not shown <= seen:
                async for msg in ipr.get():
                    event = kernel_removal(msg, devices, "weft")
                    if event is not None:
                        seen[event] += 1
        assert seen <= expected, (seen, removed.echoes)
        print(sorted(type(e).__name__ for e in removed.echoes))

asyncio.run(main())
"""


def test_the_echoes_of_own_removals_are_the_events_the_kernel_sends(scratch_netns: str) -> None:
    out = subprocess.run(["ip", "netns", "exec", scratch_netns, sys.executable, "-c", SCRIPT],
                         capture_output=True, text=True, check=False, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(["FdbRemoved", "NeighbourRemoved", "RouteRemoved",
                                      "RouteRemoved", "RouteRemoved"])
