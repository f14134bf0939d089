"""The host's own gateway address on the container bridge is converged state like the rest
(issue 25): put back when someone deletes it, and moved with the subnet; the notice of a
move names the containers it strands."""

from __future__ import annotations

import json
import signal
import time

import pytest

from helpers import Record, measure, sqlite_put, wait_alive
from helpers import network_config as config
from weft.core.constants import CNI_BRIDGE
from weft_lab.testbed import Host, Testbed

pytestmark = pytest.mark.netns


def bridge_addresses(tb: Testbed, host: Host) -> list[str]:
    out = tb.run(host.netns, ["ip", "-j", "addr", "show", "dev", CNI_BRIDGE]).stdout
    return [a["local"] for link in json.loads(out or "[]") for a in link.get("addr_info", [])
            if a.get("family") == "inet"]


def gateway(subnet: str) -> str:
    return subnet.rsplit(".", 1)[0] + ".1"


def test_the_gateway_deleted_from_the_bridge_is_put_back(record_property: Record) -> None:
    with Testbed(hosts=2, containers_per_host=1, config=config("vxlan")) as tb:
        tb.start()
        h1 = tb.hosts[0]
        gw = gateway(tb.host_status(h1)["subnet"])
        assert gw in bridge_addresses(tb, h1)
        measure(tb, record_property, f"gateway address deleted from {CNI_BRIDGE}",
                lambda: tb.run(h1.netns, ["ip", "addr", "del", f"{gw}/24", "dev", CNI_BRIDGE]),
                lambda: gw in bridge_addresses(tb, h1),
                src=tb.containers[1], dst=tb.containers[0])
        assert "host state repaired" in tb.agent_log(h1)


def test_after_a_move_the_new_gateway_is_on_the_bridge_and_the_notice_names_the_stranded(
        ) -> None:
    ttl = 3.0
    with Testbed(hosts=2, containers_per_host=1, config=config("vxlan"), lease_ttl=ttl) as tb:
        tb.start()
        h1 = tb.hosts[0]
        c1, c2 = tb.containers
        assert tb.ping(c2.netns, c1.ip)  # h1 knows its container (a neighbour on the bridge)
        old = tb.host_status(h1)["subnet"]
        assert tb.stop_agent(h1, signal.SIGKILL) != 0
        wait_alive(tb, "the lease expired",
                   lambda: all(str(x.subnet) != old for x in tb.leases()), timeout=ttl + 10)
        taker = json.dumps({"PublicIP": "198.18.0.99", "BackendType": "vxlan",
                            "BackendData": {"VNI": 1, "VtepMAC": "02:00:00:00:00:99"}})
        sqlite_put(tb.run_dir / "store.db", f"subnets/{old.replace('/', '-')}", taker,
                   time.time() + 3600, "198.18.0.99")
        tb.start_agent(h1)

        def moved() -> bool:
            try:
                return tb.host_status(h1)["subnet"] not in (None, old)
            except Exception:
                return False

        wait_alive(tb, "moved to a new subnet", moved)
        new = tb.host_status(h1)["subnet"]
        # The new subnet's gateway on the bridge (a container attached now gets it as its
        # router), the old one gone.
        wait_alive(tb, "the new gateway on the bridge",
                   lambda: bridge_addresses(tb, h1) == [gateway(new)],
                   seen=lambda: bridge_addresses(tb, h1))
        notice = tb.host_status(h1)["notices"]["lease"]
        assert f"no longer holds subnet {old}" in notice, notice
        assert f"containers left in {old}: {c1.ip}" in notice, notice
        assert "taken by another host while this one was away" not in notice
