"""The udp forwarder in dual stack, its real loops over its own seams (as
test_udp_forwarder_loops): one peer table per family, the IPv6 half's packets routed by
their IPv6 subnet, an IPv6 source held to the member that leases it."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import select
import socket
import struct
from collections.abc import Iterator

import pytest

from helpers import wait_for
from weft.backends.udp.bind import open_bind
from weft.backends.udp.forwarder import Forwarder
from weft.backends.udp.plan import plan
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
    six = ipv6_stream("2001:db8:1:1::5", "2001:db8:1:2::7", b"ping6")
    a_tun.kernel.send(six)
    assert b_tun.kernel.recv(0x20000) == six
    four = ipv4_stream("198.19.1.5", "198.19.2.7", b"ping4")
    a_tun.kernel.send(four)
    assert b_tun.kernel.recv(0x20000) == four
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
