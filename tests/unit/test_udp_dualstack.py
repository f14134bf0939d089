"""The udp forwarder in dual stack, its real loops over its own seams (as
test_udp_forwarder_loops): one peer table per family, the IPv6 half's packets routed by
their IPv6 subnet, an IPv6 source held to the member that leases it."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import os
import select
import socket
import struct
from collections.abc import Iterator

import pytest

from helpers import wait_for
from weft.backends.udp.bind import open_bind
from weft.backends.udp.forwarder import Forwarder
from weft.backends.udp.plan import UdpPlan, plan
from weft.core.lease import Lease

LOOPBACK = ipaddress.IPv4Address("127.0.0.1")
WAIT = 10.0


def lease(n: int, port: int) -> Lease:
    return Lease(ipaddress.ip_network(f"198.19.{n}.0/24"), LOOPBACK, "udp", {"Port": port},
                 ipv6_subnet=ipaddress.IPv6Network(f"2001:db8:1:{n}::/64"))


def ipv6_stream(src: str, dst: str, payload: bytes) -> bytes:
    """A TUN read of a small IPv6 UDP packet: a zero virtio-net header, then the packet
    (built here rather than by weft)."""
    udp = struct.pack("!HHHH", 4444, 7777, 8 + len(payload), 0) + payload
    header = struct.pack("!IHBB16s16s", 6 << 28, len(udp), 17, 64,
                         ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed)
    return bytes(10) + header + udp


def ipv4_stream(src: str, dst: str, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", 4444, 7777, 8 + len(payload), 0) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                         ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    total = sum(struct.unpack("!10H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return bytes(10) + header[:10] + struct.pack("!H", ~total & 0xFFFF) + header[12:] + udp


class FakeTun:
    def __init__(self, name: str) -> None:
        self.name = name
        self.end, self.kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.kernel.settimeout(WAIT)
        self.csum = self.tso = False
        self.notes: list[str] = []

    @property
    def fd(self) -> int:
        return self.end.fileno()

    def wake(self) -> None:
        self.kernel.send(b"")

    def close(self) -> None:
        self.end.close()


def both_families_cross(a_tun: FakeTun, b_tun: FakeTun) -> None:
    """A ping of each family from A's TUN device arrives whole at B's."""
    for packet in (ipv6_stream("2001:db8:1:1::5", "2001:db8:1:2::7", b"ping6"),
                   ipv4_stream("198.19.1.5", "198.19.2.7", b"ping4")):
        a_tun.kernel.send(packet)
        assert b_tun.kernel.recv(0x20000) == packet


@pytest.fixture
def pair() -> Iterator[tuple[tuple[Forwarder, FakeTun], tuple[Forwarder, FakeTun],
                             socket.socket]]:
    with contextlib.ExitStack() as stack:
        member = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        member.bind((str(LOOPBACK), 0))
        made = []
        for name in ("a", "b"):
            tun = FakeTun(name)
            stack.callback(tun.kernel.close)
            stack.callback(tun.end.close)
            bind = open_bind(LOOPBACK, 0, False)
            stack.callback(bind.close)
            forwarder = Forwarder(tun, bind, 1500, 4, 24)
            stack.callback(forwarder.close)
            made.append((forwarder, tun))
        (a, _), (b, _) = made
        a.set_peers(plan([lease(2, b.bind.port)], own_ip=ipaddress.ip_address("198.18.0.1"),
                         default_port=8285, version=4, subnet_len=24,
                         ipv6_subnet_len=64).table)
        b.set_peers(plan([lease(1, a.bind.port), lease(3, member.getsockname()[1])],
                         own_ip=ipaddress.ip_address("198.18.0.2"), default_port=8285,
                         version=4, subnet_len=24, ipv6_subnet_len=64).table)
        for forwarder, _ in made:
            forwarder.start()
        yield made[0], made[1], member


def test_both_families_cross_and_an_ipv6_source_is_held_to_its_holder(pair: tuple[
        tuple[Forwarder, FakeTun], tuple[Forwarder, FakeTun], socket.socket]) -> None:
    (a, a_tun), (b, b_tun), member = pair
    both_families_cross(a_tun, b_tun)
    # No peer holds 2001:db8:1:9::/64: nowhere to send it.
    a_tun.kernel.send(ipv6_stream("2001:db8:1:1::5", "2001:db8:1:9::7", b"lost"))
    wait_for("the no_route drop", lambda: a.tx.drops.get("no_route") == 1, WAIT,
             interval=0.001)
    # The member holding 2001:db8:1:3::/64 may not send as A's IPv6 subnet.
    spoofed = ipv6_stream("2001:db8:1:1::5", "2001:db8:1:2::7", b"x")
    member.sendto(bytes((0x11, 0, 1, 0)) + struct.pack("!I", 7) + spoofed,
                  ("127.0.0.1", b.bind.port))
    wait_for("the spoofed_source drop", lambda: b.rx.drops.get("spoofed_source") == 1, WAIT,
             interval=0.001, seen=lambda: b.rx.drops)
    assert not select.select([b_tun.kernel], [], [], 0)[0]
    honest = ipv6_stream("2001:db8:1:3::9", "2001:db8:1:2::7", b"member")
    member.sendto(bytes((0x11, 0, 1, 0)) + struct.pack("!I", 8) + honest,
                  ("127.0.0.1", b.bind.port))
    assert b_tun.kernel.recv(0x20000) == honest
    assert b.peers.describe() == {"198.19.1.0/24": f"127.0.0.1:{a.bind.port}",
                                  "198.19.3.0/24": f"127.0.0.1:{member.getsockname()[1]}",
                                  "2001:db8:1:1::/64": f"127.0.0.1:{a.bind.port}",
                                  "2001:db8:1:3::/64": f"127.0.0.1:{member.getsockname()[1]}"}


def test_a_dual_stack_table_crosses_the_control_channel_whole() -> None:
    """The forwarder is a process of its own: the IPv6 half travels with the table."""
    from weft.backends.udp.control import decode_table, encode_table

    table = plan([lease(2, 9000), lease(3, 9001)], own_ip=ipaddress.ip_address("198.18.0.1"),
                 default_port=8285, version=4, subnet_len=24, ipv6_subnet_len=64).table
    back = decode_table(json.loads(json.dumps(encode_table(table))))
    assert back == table
    assert back.six is not None
    assert back.six.members == table.members
    assert back.describe() == table.describe()
    with pytest.raises(ValueError, match="dual-stack peer table"):
        decode_table({**encode_table(table), "six": encode_table(table)})  # IPv4 in six


# --- the IPv6 half over the IPv6 underlay ------------------------------------------------

LOOPBACK6 = ipaddress.IPv6Address("::1")
OWN6 = ipaddress.IPv6Address("2001:db8:ff::1")


def dual_lease(n: int, port: int, *, ipv6: str | None, port6: int | None) -> Lease:
    """Host n's lease: IPv4 underlay 198.18.0.n, an IPv6 underlay address `ipv6` (None:
    none) and BackendV6Data naming `port6` as its IPv6 socket's (None: its forwarder has
    none, an earlier weft's, which copies its BackendData there)."""
    return Lease(ipaddress.ip_network(f"198.19.{n}.0/24"), ipaddress.ip_address(f"198.18.0.{n}"),
                 "udp", {"Port": port}, ipv6_subnet=ipaddress.IPv6Network(f"2001:db8:1:{n}::/64"),
                 public_ipv6=None if ipv6 is None else ipaddress.IPv6Address(ipv6),
                 backend_v6_data={"Port": port} if port6 is None
                 else {"Port": port6, "IPv6Socket": True})


def test_the_ipv6_half_takes_the_ipv6_underlay_only_where_both_ends_listen_there() -> None:
    both = dual_lease(2, 8285, ipv6="2001:db8:ff::2", port6=8285)
    # An IPv6 underlay address, but a forwarder without a socket there (an earlier
    # version): its IPv6 half rides IPv4, or it would never arrive.
    silent = dual_lease(3, 8285, ipv6="2001:db8:ff::3", port6=None)
    lone = dual_lease(4, 8300, ipv6=None, port6=None)
    peers = [both, silent, lone]

    def plan_of(own_ipv6: ipaddress.IPv6Address | None) -> UdpPlan:
        return plan(peers, own_ip=ipaddress.ip_address("198.18.0.1"), default_port=8285,
                    version=4, subnet_len=24, ipv6_subnet_len=64, own_ipv6=own_ipv6)

    planned = plan_of(OWN6)
    table = planned.table
    assert table.six is not None
    assert table.describe() == {
        "198.19.2.0/24": "198.18.0.2:8285", "198.19.3.0/24": "198.18.0.3:8285",
        "198.19.4.0/24": "198.18.0.4:8300",
        "2001:db8:1:2::/64": "[2001:db8:ff::2]:8285",
        "2001:db8:1:3::/64": "198.18.0.3:8285", "2001:db8:1:4::/64": "198.18.0.4:8300"}
    assert planned.over_ipv4 == {
        "2001:db8:1:3::/64": "peer 2001:db8:ff::3 has no IPv6 underlay socket (no "
                             "BackendV6Data IPv6Socket: a forwarder of an earlier weft)",
        "2001:db8:1:4::/64": "peer 198.18.0.4 has no IPv6 underlay address (no PublicIPv6)"}
    # Both tables know every member of either family: a stranger is one to both.
    assert table.members == table.six.members == {
        ("198.18.0.2", 8285), ("198.18.0.3", 8285), ("198.18.0.4", 8300),
        ("2001:db8:ff::2", 8285)}
    # This host without an IPv6 underlay socket: everything over IPv4, as before.
    four = plan_of(None)
    assert four.over_ipv4 == {}  # nothing to explain: this host has no IPv6 socket
    assert all(":" not in ip for ip, _ in four.table.members)
    from weft.backends.udp.control import decode_table, encode_table
    assert decode_table(json.loads(json.dumps(encode_table(table)))) == table


def tcp6_super_packet(src: str, dst: str, payload: bytes) -> bytes:
    """A TUN read of an IPv6 TCP super-packet (TSO: segments of 1428 bytes, the checksum
    at csum_start + csum_offset)."""
    vnet = struct.pack("<BBHHHH", 1, 4, 60, 1428, 40, 16)  # NEEDS_CSUM, GSO_TCPV6
    tcp = struct.pack("!HHIIBBHHH", 4444, 7777, 1, 0, 5 << 4, 0x18, 0xFFFF, 0, 0) + payload
    header = struct.pack("!IHBB16s16s", 6 << 28, len(tcp), 6, 64,
                         ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed)
    return vnet + header + tcp


@pytest.fixture(params=[True, False], ids=["offloads", "no-offloads"])
def dual(request: pytest.FixtureRequest) -> Iterator[tuple[
        tuple[Forwarder, FakeTun], tuple[Forwarder, FakeTun]]]:
    """Two forwarders each with a socket on 127.0.0.1 and one on ::1 (their IPv6
    underlay), each holding the other as its peer over both."""
    with contextlib.ExitStack() as stack:
        made = []
        for name in ("a", "b"):
            tun = FakeTun(name)
            stack.callback(tun.kernel.close)
            stack.callback(tun.end.close)
            bind = open_bind(LOOPBACK, 0, request.param)
            stack.callback(bind.close)
            bind6 = open_bind(LOOPBACK6, bind.port, request.param)
            stack.callback(bind6.close)
            forwarder = Forwarder(tun, bind, 1500, 4, 24, bind6)
            stack.callback(forwarder.close)
            made.append((forwarder, tun))
        (a, _), (b, _) = made
        for n, (me, other) in ((1, (a, b)), (2, (b, a))):
            peer = dual_lease(3 - n, other.bind.port, ipv6="::1", port6=other.bind.port)
            peer = dataclasses.replace(peer, public_ip=LOOPBACK)
            me.set_peers(plan([peer], own_ip=ipaddress.ip_address(f"198.18.0.{n}"),
                              default_port=8285, version=4, subnet_len=24, ipv6_subnet_len=64,
                              own_ipv6=OWN6).table)
        for forwarder, _ in made:
            forwarder.start()
        yield made[0], made[1]


def test_ipv6_packets_cross_the_ipv6_underlay_and_ipv4_ones_the_ipv4_underlay(dual: tuple[
        tuple[Forwarder, FakeTun], tuple[Forwarder, FakeTun]]) -> None:
    (a, a_tun), (b, b_tun) = dual
    assert a.peers.describe()["2001:db8:1:2::/64"] == f"[::1]:{b.bind.port}"
    both_families_cross(a_tun, b_tun)
    # A super-packet over IPv6 is cut for the IPv6 underlay: 1500 - 40 - 8 per datagram.
    big = tcp6_super_packet("2001:db8:1:1::5", "2001:db8:1:2::7", os.urandom(20000))
    a_tun.kernel.send(big)
    assert b_tun.kernel.recv(0x20000) == big
    wait_for("B to count what it received", lambda: b.rx6.as_dict()["packets"] == 2,
             WAIT, interval=0.001, seen=lambda: b.status())
    assert a.tx6.as_dict()["packets"] == 2
    assert a.tx6.datagrams == b.rx6.datagrams == -(-len(big) // (1500 - 48 - 8))
    assert a.tx.as_dict()["packets"] == b.rx.as_dict()["packets"] == 1  # the IPv4 ping
    status = b.status()
    assert status["rx"]["packets"] == 3  # the totals hold both underlays
    assert status["ipv6_underlay"]["rx"]["packets"] == 2
    assert status["ipv6_underlay"]["address"] == "::1"
    assert status["counters"]["ipv6_underlay_rx_packets"] == 2
    assert status["counters"]["rx_packets"] == 3


def test_the_ipv6_socket_hears_members_only_and_holds_each_to_its_subnet(dual: tuple[
        tuple[Forwarder, FakeTun], tuple[Forwarder, FakeTun]]) -> None:
    (a, _), (b, b_tun) = dual
    honest = ipv6_stream("2001:db8:1:1::5", "2001:db8:1:2::7", b"x")
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as stranger:
        stranger.bind(("::1", 0))
        stranger.sendto(bytes((0x11, 0, 1, 0)) + struct.pack("!I", 7) + honest,
                        ("::1", b.bind6.port if b.bind6 else 0))
        wait_for("the unknown_peer drop", lambda: b.rx6.drops.get("unknown_peer") == 1, WAIT,
                 interval=0.001, seen=lambda: b.rx6.drops)
    # A's IPv4 endpoint is a member, but A's IPv6 subnet comes from its IPv6 one only.
    a.bind.sock.sendto(bytes((0x11, 0, 1, 0)) + struct.pack("!I", 8) + honest,
                       ("127.0.0.1", b.bind.port))
    wait_for("the spoofed_source drop", lambda: b.rx.drops.get("spoofed_source") == 1, WAIT,
             interval=0.001, seen=lambda: b.rx.drops)
    assert not select.select([b_tun.kernel], [], [], 0)[0]
    assert b.status()["rx"]["drops"] == {"unknown_peer": 1, "spoofed_source": 1}


def test_the_ingress_filter_admits_each_members_ipv6_socket_by_address_and_port() -> None:
    from ingress_plans import ingress_plan_for
    from weft.backends.registry import parse_config
    from weft.host.ingress_rules import ingress_delta, ingress_ruleset, ingress_update

    config = parse_config('{"Network": "198.19.0.0/16", "EnableIPv6": true, "IPv6Network": '
                          '"2001:db8:1::/48", "Backend": {"Type": "udp"}}')
    own = dual_lease(1, 8285, ipv6=str(OWN6), port6=8285)
    both = dual_lease(2, 8285, ipv6="2001:db8:ff::2", port6=8300)
    silent = dual_lease(3, 8285, ipv6="2001:db8:ff::3", port6=None)
    ingress = ingress_plan_for(config, own.public_ip, own, [both, silent], public_ipv6=OWN6)
    assert ingress.members6 == frozenset({(ipaddress.ip_address("2001:db8:ff::2"), 8300)})
    script = ingress_ruleset(ingress)
    for line in ("add set inet weft-ingress members6 { type ipv6_addr . inet_service; }",
                 "add element inet weft-ingress members6 { 2001:db8:ff::2 . 8300 }",
                 "add rule inet weft-ingress encap ip6 saddr . udp sport @members6 accept",
                 "add rule inet weft-ingress encap ip6 daddr . udp dport @members6 counter "
                 "name to_peer_port drop"):
        assert line in script, line
    # A peer that starts listening on its IPv6 underlay address joins by a set element.
    after = ingress_update(config, own.public_ip, ingress, [silent],
                           [dual_lease(3, 8285, ipv6="2001:db8:ff::3", port6=8285)])
    assert ingress_delta(ingress, after).script == (
        "add element inet weft-ingress members6 { 2001:db8:ff::3 . 8285 }\n")


def test_the_forwarder_spec_names_its_ipv6_socket_only_when_it_has_one() -> None:
    from weft.backends.udp.control import ForwarderSpec
    from weft.backends.udp.daemon import _parse

    one = ForwarderSpec("weft.udp0", "198.18.0.1", 8285, 1500, 4, 24, True)
    # As a forwarder of an earlier version says it: an upgrade is handed over, not replaced.
    assert "bind_ipv6" not in one.as_dict()
    assert one.sockets == 1
    two = dataclasses.replace(one, bind_ipv6=str(OWN6))
    assert two.as_dict()["bind_ipv6"] == str(OWN6)
    assert two.sockets == 2
    for spec in (one, two):
        assert _parse(["--state-dir", "/x", *spec.argv()])[1] == spec


def test_the_ipv6_socket_binds_an_address_not_yet_usable() -> None:
    """At boot the IPv6 underlay address may be tentative (duplicate address detection)
    when the forwarder starts: its socket binds anyway (as to an address not here at all),
    where a plain bind would fail and take the IPv4 data plane down with it."""
    from weft.core.errors import KernelError

    absent = ipaddress.ip_address("2001:db8:ffff::1")  # on no interface: a bind, no traffic
    with pytest.raises(KernelError, match="open UDP socket"):
        open_bind(absent, 0, False)
    bind = open_bind(absent, 0, False, freebind=True)
    bind.close()
