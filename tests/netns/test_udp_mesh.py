"""The udp backend on the testbed: a full mesh, and a host leaving stops its traffic."""

from __future__ import annotations

import json
import signal

import pytest

from weft_lab.testbed import Testbed

pytestmark = pytest.mark.netns

CONFIG = json.dumps({"Network": "198.19.0.0/16", "Backend": {"Type": "udp", "Port": 8300}})


def test_three_hosts_two_containers_full_mesh_over_udp() -> None:
    with Testbed(hosts=3, containers_per_host=2, config=CONFIG) as tb:
        tb.start()
        matrix = tb.connectivity()
        assert all(matrix.values()), [pair for pair, ok in matrix.items() if not ok]
        leases = tb.leases()
        assert {lease.backend_type for lease in leases} == {"udp"}
        for host in tb.hosts:
            status = tb.host_status(host)["backend_status"]
            others = {str(lease.subnet): f"{lease.public_ip}:8300" for lease in leases
                      if lease.public_ip != host.underlay_ip}
            assert status["peers"] == others
            assert status["port"] == 8300
            # 2 local containers each pinged the 4 remote ones (and were pinged back)
            assert status["tx"]["packets"] >= 8
            assert status["rx"]["packets"] >= 8
            assert status["rx"]["drops"].get("unknown_peer", 0) == 0
            assert status["tx"]["drops"].get("no_route", 0) == 0  # no IPv6 chatter on the TUN
            # the same counters, flat, as the agent exports them to Prometheus
            assert status["counters"]["tx_packets"] == status["tx"]["packets"]
        env = tb.hosts[0].subnet_env_path.read_text()
        assert "FLANNEL_MTU=1454" in env  # 1500 - overhead("udp"), the one place it lives


def test_a_host_leaving_stops_its_traffic_at_once() -> None:
    # No peer probes: the forwarder's datagram count below must move only with the ping.
    with Testbed(hosts=3, containers_per_host=1, config=CONFIG,
                 agent_args=["--release-on-exit", "--probe-period", "0"]) as tb:
        tb.start()
        stay, leave = tb.containers[0], tb.containers[2]
        assert tb.ping(stay.netns, leave.ip)
        leaving = leave.host
        subnet = next(str(lease.subnet) for lease in tb.leases()
                      if lease.public_ip == leaving.underlay_ip)
        assert tb.stop_agent(leaving, signal.SIGTERM) == 0
        tb.wait_converged(20, hosts=tb.hosts[:2])
        for host in tb.hosts[:2]:
            assert subnet not in tb.host_status(host)["backend_status"]["peers"]
        # The leaving host removed its device; peers no longer send it anything.
        assert "weft.udp0" not in tb.run(leaving.netns, ["ip", "-br", "link"]).stdout
        before = tb.host_status(stay.host)["backend_status"]["tx"]
        assert not tb.ping(stay.netns, leave.ip, wait=1)
        after = tb.host_status(stay.host)["backend_status"]["tx"]
        assert after["drops"].get("no_route", 0) > before["drops"].get("no_route", 0)
        assert after["datagrams"] == before["datagrams"]
        assert tb.ping(stay.netns, tb.containers[1].ip)  # the others still talk
