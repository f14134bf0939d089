"""Self-healing and trust hold for IPv6 as for IPv4, on a dual-stack vxlan network: an IPv6
route or neighbour deleted under a running agent comes back; a forged IPv6-in-VXLAN frame
from a non-member never reaches a container and is counted (and on udp, a forged datagram
to its IPv6 underlay socket); a record whose IPv6 half is poisoned is that peer's error
while the good peers keep both families. 2001:db8::/32 only
inside the test's namespaces."""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from forged import PACKETS, heard_during
from helpers import sqlite_delete, sqlite_put, wait_for
from weft.backends.udp.control import CONTROL_SOCKET, request
from weft_lab.testbed import Container, Host, Testbed

pytestmark = pytest.mark.netns

CONFIG = json.dumps({"Network": "198.19.0.0/16", "EnableIPv6": True,
                     "IPv6Network": "2001:db8:1::/48", "Backend": {"Type": "vxlan"}})
DEVICE = "weft.vx1"
FORGERIES = 40
WAIT = 30.0


@pytest.fixture(scope="module")
def bed() -> Iterator[Testbed]:
    """One testbed for the module: two hosts, one container each, resync every 2 s."""
    with Testbed(hosts=2, containers_per_host=1, config=CONFIG,
                 agent_args=["--resync-interval", "2"], log_level="info") as tb:
        tb.start()
        yield tb


def until(condition: Callable[[], bool], what: str) -> None:
    wait_for(what, condition, WAIT)


def routes6(tb: Testbed, host: Host) -> dict[str, dict[str, Any]]:
    out = tb.run(host.netns, ["ip", "-6", "-j", "route", "show", "proto", "87"]).stdout
    return {r["dst"]: r for r in json.loads(out or "[]")}


def neighbours6(tb: Testbed, host: Host) -> dict[str, str]:
    out = tb.run(host.netns, ["ip", "-6", "-j", "neigh", "show", "dev", DEVICE,
                              "nud", "permanent"]).stdout
    return {n["dst"]: n["lladdr"] for n in json.loads(out or "[]")}


def pings6(tb: Testbed, src: Container, dst: Container) -> bool:
    assert dst.ip6 is not None
    target = dst.ip6
    return bool(wait_for(f"{src.name} to ping {target}", lambda: tb.ping(src.netns, target),
                         WAIT, interval=0))


def test_an_ipv6_route_and_neighbour_deleted_under_the_agent_come_back(bed: Testbed) -> None:
    tb = bed
    h1, h2 = tb.hosts
    c1, c2 = tb.containers
    peer = next(x for x in tb.leases() if x.public_ip == h2.underlay_ip)
    six = str(peer.ipv6_subnet)
    route = routes6(tb, h1)[six]
    gateway = route["gateway"]
    assert neighbours6(tb, h1)[gateway]
    tb.run(h1.netns, ["ip", "-6", "route", "del", six])
    until(lambda: six in routes6(tb, h1), "the IPv6 route to come back")
    assert routes6(tb, h1)[six] == route
    tb.run(h1.netns, ["ip", "-6", "neigh", "del", gateway, "dev", DEVICE])
    until(lambda: gateway in neighbours6(tb, h1), "the IPv6 neighbour to come back")
    assert pings6(tb, c1, c2)
    assert tb.host_status(h1)["errors"] == {}


# Sends COUNT VXLAN frames (to host TARGET:8472, inner destination MAC = its VTEP MAC)
# carrying an IPv6/UDP packet SRC -> DST:7777 with payload b"forged-<tag>".
FORGER6 = PACKETS + textwrap.dedent("""
    target, count, src, dst, tag, mac = sys.argv[1:7]
    packet = inner_ipv6(src, dst, b"forged-" + tag.encode())
    frame = (struct.pack("!II", 0x08000000, 1 << 8) + bytes.fromhex(mac.replace(":", ""))
             + bytes.fromhex("02aabbccddee") + b"\\x86\\xdd" + packet)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(int(count)):
        s.sendto(frame, (target, 8472))
    print("sent", count, flush=True)
""")



def dropped(tb: Testbed, host: Host) -> dict[str, int]:
    counts: dict[str, int] = tb.host_status(host)["ingress"]["dropped"]
    return counts


def test_a_forged_ipv6_in_vxlan_frame_from_a_non_member_is_dropped_and_counted(
        bed: Testbed) -> None:
    tb = bed
    _, h2 = tb.hosts
    c1, c2 = tb.containers
    intruder = tb.add_underlay_node("intr6", "198.18.0.98")
    link = json.loads(tb.run(h2.netns, ["ip", "-j", "link", "show", DEVICE]).stdout)
    mac = str(link[0]["address"])
    before = dropped(tb, h2).get("non_member", 0)

    def forge() -> None:
        out = tb.run(intruder, ["/usr/bin/python3", "-c", FORGER6, str(h2.underlay_ip),
                                str(FORGERIES), str(c1.ip6), str(c2.ip6), "outsider", mac])
        assert "sent" in out.stdout

    assert heard_during(c2, forge, family=6) == []
    assert dropped(tb, h2)["non_member"] - before == FORGERIES
    # Control: with the filter gone (the agent paused, or it would put it back at once) the
    # very same frames reach the container, so the drop above is the filter's doing.
    assert h2.agent is not None
    h2.agent.send_signal(19)  # SIGSTOP
    try:
        tb.run(h2.netns, ["nft", "delete", "table", "inet", "weft-ingress"])
        heard = heard_during(c2, forge, family=6)
    finally:
        h2.agent.send_signal(18)  # SIGCONT
    assert heard.count("forged-outsider") > 0, heard
    until(lambda: "non_member" in dropped(tb, h2), "the ingress filter to come back")
    assert pings6(tb, c1, c2)


# Sends COUNT datagrams of weft's udp encapsulation from SOURCE:PORT (an IPv6 underlay
# address) to TARGET:PORT, each carrying an IPv6/UDP packet SRC -> DST:7777.
UDP_FORGER6 = PACKETS + textwrap.dedent("""
    source, target, port, count, src, dst, tag = sys.argv[1:8]
    datagram = weft_udp(inner_ipv6(src, dst, b"forged-" + tag.encode()))
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.bind((source, int(port)))
    for _ in range(int(count)):
        s.sendto(datagram, (target, int(port)))
    print("sent", count, flush=True)
""")


def test_udp_hears_only_members_on_the_ipv6_underlay() -> None:
    """udp on a dual underlay carries the IPv6 overlay on a second socket, on the IPv6
    underlay. A non-member's datagrams there (from the member port, carrying a member's
    IPv6 source) are dropped by the ingress filter and counted (`non_member`); with the
    filter gone, by the forwarder's own member check, counted on its IPv6 socket
    (`unknown_peer`); no container hears one either way."""
    config = json.dumps({"Network": "198.19.0.0/16", "EnableIPv6": True,
                         "IPv6Network": "2001:db8:1::/48", "Backend": {"Type": "udp"}})
    with Testbed(hosts=2, containers_per_host=1, config=config, underlay="dual",
                 agent_args=["--resync-interval", "2"]) as tb:
        tb.start()
        _, h2 = tb.hosts
        c1, c2 = tb.containers
        assert pings6(tb, c1, c2)
        intruder = tb.add_underlay_node("intr6", "198.18.0.98")
        tb.run(intruder, ["ip", "addr", "add", "2001:db8:ff::98/64", "dev", "eth0", "nodad"])

        def forge() -> None:
            out = tb.run(intruder, ["/usr/bin/python3", "-c", UDP_FORGER6, "2001:db8:ff::98",
                                    str(h2.underlay_ip6), "8285", str(FORGERIES), str(c1.ip6),
                                    str(c2.ip6), "outsider"])
            assert "sent" in out.stdout

        def refused() -> int:  # the forwarder's own count, asked directly (no agent needed)
            status, _ = request(h2.state_dir / CONTROL_SOCKET, {"op": "status"})
            return int(status["ipv6_underlay"]["rx"]["drops"].get("unknown_peer", 0))

        before = dropped(tb, h2).get("non_member", 0)
        assert heard_during(c2, forge, family=6) == []
        assert dropped(tb, h2)["non_member"] - before == FORGERIES
        assert refused() == 0  # the filter took them all
        assert h2.agent is not None
        h2.agent.send_signal(19)  # SIGSTOP: or it would put the filter back at once
        try:
            tb.run(h2.netns, ["nft", "delete", "table", "inet", "weft-ingress"])
            heard = heard_during(c2, forge, family=6)
            wait_for("the forwarder to count them", lambda: refused() == FORGERIES, WAIT,
                     seen=refused)
        finally:
            h2.agent.send_signal(18)  # SIGCONT
        assert heard == []
        until(lambda: "non_member" in dropped(tb, h2), "the ingress filter to come back")
        assert pings6(tb, c1, c2)


def record(public_ip: str, **extra: object) -> str:
    value: dict[str, object] = {"PublicIP": public_ip, "BackendType": "vxlan",
                                "BackendData": {"VNI": 1, "VtepMAC": "02:00:00:00:02:01"},
                                "BackendV6Data": {"VNI": 1, "VtepMAC": "02:00:00:00:02:01"}}
    value.update(extra)
    return json.dumps(value)


# key, value, what the error says: each a poisoned IPv6 half of an otherwise good record.
POISONED = [
    ("subnets/198.19.201.0-24", record("198.18.0.201"), "no IPv6 subnet"),
    ("subnets/198.19.202.0-24&2001:db8:2:1::-64", record("198.18.0.202"),
     "is not a /64 of IPv6Network"),
    ("subnets/198.19.203.0-24&2001:db8:1:cb::-64",
     record("198.18.0.203", PublicIPv6="ff02::1"), "PublicIPv6 ff02::1 is not a unicast"),
    ("subnets/198.19.204.0-24&2001:db8:1:cc::-64",
     record("198.18.0.204", BackendV6Data={"VtepMAC": "zz"}), "BackendV6Data: VtepMAC"),
]


@pytest.mark.parametrize(("key", "value", "why"), POISONED,
                         ids=[p[2] for p in POISONED])
def test_a_poisoned_ipv6_half_is_that_peers_error(bed: Testbed, key: str, value: str,
                                                   why: str) -> None:
    tb = bed
    c1, c2 = tb.containers
    before = {h.name: routes6(tb, h) for h in tb.hosts}
    subnet = key.removeprefix("subnets/").split("&")[0].replace("-", "/")
    sqlite_put(tb.run_dir / "store.db", key, value, time.time() + 3600)
    try:
        for host in tb.hosts:
            until(reports(tb, host, subnet), f"{host.name} to report {subnet}")
            assert why in tb.host_status(host)["errors"][subnet]
        assert pings6(tb, c1, c2)
        assert pings6(tb, c2, c1)
        assert {h.name: routes6(tb, h) for h in tb.hosts} == before
    finally:
        sqlite_delete(tb.run_dir / "store.db", key)
    for host in tb.hosts:
        until(reports(tb, host, None), f"{host.name} to clear the error")


def reports(tb: Testbed, host: Host, subnet: str | None) -> Callable[[], bool]:
    """Whether `host` reports an error for `subnet` (None: no error at all)."""
    def check() -> bool:
        errors = tb.host_status(host)["errors"]
        return errors == {} if subnet is None else subnet in errors
    return check
