"""The udp forwarder's real loops over its own seams, as any user, with no capabilities.

Each forwarder is handed a socketpair in place of its TUN device (an AF_UNIX datagram
pair frames like a TUN fd with IFF_VNET_HDR: one stream per read, one per write; the
test holds the kernel's end) and the real `open_bind` socket on 127.0.0.1, with and
without the UDP offloads.  A stream written into one "device" must come out of the
other exactly; what the receiving forwarder refuses must be counted and go nowhere.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from weft.backends.udp.bind import open_bind
from weft.backends.udp.forwarder import Forwarder
from weft.backends.udp.plan import Peer, PeerTable

LOOPBACK = ipaddress.IPv4Address("127.0.0.1")
MTU = 1500  # underlay: datagrams of 1472 bytes, 1464 of them a stream's
SUBNET_A = ipaddress.IPv4Network("198.19.1.0/24")
SUBNET_B = ipaddress.IPv4Network("198.19.2.0/24")
SUBNET_M = ipaddress.IPv4Network("198.19.3.0/24")  # the test's own member socket holds it
WAIT = 10.0  # bound on any wait: a lost packet fails the test instead of hanging it


@dataclass
class SocketpairDevice:
    """Stands in for a TUN device: the forwarder reads and writes `end`, the test
    plays the kernel on `kernel`."""

    name: str
    end: socket.socket
    kernel: socket.socket
    csum: bool = False
    tso: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def fd(self) -> int:
        return self.end.fileno()

    def wake(self) -> None:
        self.kernel.send(b"")  # as the TUN's broadcast to itself: the blocked read returns

    def close(self) -> None:
        self.end.close()


@dataclass
class Host:
    forwarder: Forwarder
    device: SocketpairDevice

    @property
    def endpoint(self) -> tuple[str, int]:
        return (str(LOOPBACK), self.forwarder.bind.port)

    def send(self, stream: bytes) -> None:
        """The kernel hands the forwarder one stream read from the TUN."""
        self.device.kernel.send(stream)

    def received(self) -> bytes:
        """The next stream the forwarder wrote into the TUN."""
        return self.device.kernel.recv(0x20000)

    def written(self) -> bool:
        """Has the forwarder written a stream into the TUN that the test has not read?"""
        readable, _, _ = select.select([self.device.kernel], [], [], 0)
        return bool(readable)


def ipv4(src: str, dst: str, protocol: int, payload: bytes) -> bytes:
    """An IPv4 packet, built here rather than by weft."""
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0, 64, protocol, 0,
                         ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    total = sum(struct.unpack("!10H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return header[:10] + struct.pack("!H", ~total & 0xFFFF) + header[12:] + payload


def udp_stream(src: str, dst: str, payload: bytes) -> bytes:
    """What a TUN read returns for a small UDP packet: a zero virtio-net header + IPv4."""
    udp = struct.pack("!HHHH", 4444, 7777, 8 + len(payload), 0) + payload
    return bytes(10) + ipv4(src, dst, 17, udp)


def tso_stream(src: str, dst: str, payload: bytes) -> bytes:
    """What a TUN read returns for a TCP super-packet (TSO): a virtio-net header asking for
    segments of 1448 bytes and the checksum at csum_start + csum_offset, then IPv4/TCP."""
    vnet = struct.pack("<BBHHHH", 1, 1, 40, 1448, 20, 16)  # NEEDS_CSUM, GSO_TCPV4
    tcp = struct.pack("!HHIIBBHHH", 4444, 7777, 1, 0, 5 << 4, 0x18, 0xFFFF, 0, 0)
    return vnet + ipv4(src, dst, 6, tcp + payload)


def encapsulated(stream: bytes) -> bytes:
    """`stream` as one datagram of weft's udp encapsulation, built here rather than by
    weft: header (version 1, data, chunk 0 of 1, packet id) then the stream."""
    return bytes((0x11, 0, 1, 0)) + struct.pack("!I", 7) + stream


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"waited {WAIT} s for {what}"
        time.sleep(0.001)


@pytest.fixture(params=[True, False], ids=["offloads", "no-offloads"])
def hosts(request: pytest.FixtureRequest) -> Iterator[tuple[Host, Host, socket.socket]]:
    """Two forwarders, each holding the other's subnet as its one peer, and a socket of the
    test's that B counts as a member too (holding SUBNET_M); all on 127.0.0.1."""
    offloads: bool = request.param
    made: list[Host] = []
    with contextlib.ExitStack() as stack:
        member = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        member.bind((str(LOOPBACK), 0))
        for name in ("a", "b"):
            end, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            stack.enter_context(end)
            stack.enter_context(kernel)
            kernel.settimeout(WAIT)
            device = SocketpairDevice(f"fake-{name}", end, kernel)
            bind = open_bind(LOOPBACK, 0, offloads)
            stack.callback(bind.close)
            forwarder = Forwarder(device, bind, MTU, 4, SUBNET_A.prefixlen)
            stack.callback(forwarder.close)  # before its sockets close: it wakes on them
            made.append(Host(forwarder, device))
        a, b = made
        a.forwarder.set_peers(PeerTable.build(4, 24, [Peer(SUBNET_B, LOOPBACK, b.endpoint[1])]))
        b.forwarder.set_peers(PeerTable.build(4, 24, [
            Peer(SUBNET_A, LOOPBACK, a.endpoint[1]),
            Peer(SUBNET_M, LOOPBACK, member.getsockname()[1]),
        ]))
        for host in made:
            assert host.forwarder.in_force.udp_gso is offloads
            host.forwarder.start()
        yield a, b, member
        for host in made:
            host.forwarder.close()
            assert not host.forwarder.running  # close() woke both blocked threads


def test_a_packet_read_from_one_device_is_written_to_the_other_as_it_was(
    hosts: tuple[Host, Host, socket.socket],
) -> None:
    a, b, _ = hosts
    there = udp_stream("198.19.1.5", "198.19.2.7", b"ping")
    a.send(there)
    assert b.received() == there
    back = udp_stream("198.19.2.7", "198.19.1.5", b"pong")
    b.send(back)
    assert a.received() == back
    def counted(host: Host) -> bool:
        counters = host.forwarder.flat_counters()
        return counters["tx_packets"] == counters["rx_packets"] == 1

    wait_for(lambda: counted(a) and counted(b), "both to count one packet each way")
    for host in (a, b):
        counters = host.forwarder.flat_counters()
        assert counters["tx_bytes"] == counters["rx_bytes"] == len(there) - 10  # inner bytes
        assert counters["tx_datagrams"] == counters["tx_batches"] == 1, counters


def test_a_super_packet_crosses_in_chunks_and_arrives_whole(
    hosts: tuple[Host, Host, socket.socket],
) -> None:
    a, b, _ = hosts
    stream = tso_stream("198.19.1.5", "198.19.2.7", os.urandom(30000))
    a.send(stream)
    assert b.received() == stream
    wait_for(lambda: a.forwarder.tx.packets == b.forwarder.rx.packets == 1,
             "both to count the stream")
    chunks = -(-len(stream) // (MTU - 28 - 8))
    tx, rx = a.forwarder.tx, b.forwarder.rx
    assert tx.datagrams == rx.datagrams == chunks, (tx, rx)
    if a.forwarder.in_force.udp_gso:  # one sendmsg with UDP_SEGMENT; GRO glues them back
        assert tx.batches == 1, tx
        assert rx.batches < rx.datagrams, rx
    else:  # the switch is off: a system call per datagram both ways
        assert tx.batches == rx.batches == chunks, (tx, rx)


def test_a_non_members_datagram_is_counted_and_goes_nowhere(
    hosts: tuple[Host, Host, socket.socket],
) -> None:
    a, b, _ = hosts
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
        stranger.bind((str(LOOPBACK), 0))
        # Well-formed, and claiming A's subnet: only the sender's (ip, port) gives it away.
        stranger.sendto(encapsulated(udp_stream("198.19.1.5", "198.19.2.7", b"x")),
                        b.endpoint)
        wait_for(lambda: b.forwarder.rx.drops == {"unknown_peer": 1}, "the drop to count")
    assert not b.written()
    assert b.forwarder.rx.as_dict()["packets"] == 0
    honest = udp_stream("198.19.1.5", "198.19.2.7", b"y")  # and A still gets through
    a.send(honest)
    assert b.received() == honest


GOOD = udp_stream("198.19.3.9", "198.19.2.7", b"member")
MALFORMED = [
    pytest.param(bytes((0x11, 0, 1, 7)) + bytes(4) + GOOD, "malformed", id="reserved-byte"),
    pytest.param(bytes((0x21, 0, 1, 0)) + bytes(4) + GOOD, "bad_version", id="version-2"),
    pytest.param(encapsulated(GOOD)[:12], "truncated", id="cut-short"),
    pytest.param(encapsulated(GOOD[:-1]), "truncated", id="ip-length-wrong"),
    pytest.param(encapsulated(udp_stream("198.19.1.5", "198.19.2.7", b"x")), "spoofed_source",
                 id="source-not-its-subnet"),
]


@pytest.mark.parametrize(("datagram", "reason"), MALFORMED)
def test_a_members_bad_datagram_is_counted_by_reason_and_goes_nowhere(
    hosts: tuple[Host, Host, socket.socket], datagram: bytes, reason: str,
) -> None:
    _, b, member = hosts
    member.sendto(datagram, b.endpoint)
    wait_for(lambda: b.forwarder.rx.drops == {reason: 1}, f"the {reason} drop to count")
    assert not b.written()
    member.sendto(encapsulated(GOOD), b.endpoint)  # the member's good one still arrives
    assert b.received() == GOOD


def test_a_released_forwarder_passes_on_what_it_holds_and_reads_no_more(
    hosts: tuple[Host, Host, socket.socket],
) -> None:
    """A hand-over: A's device and socket are another forwarder's too from now on. The
    packet A's blocked read takes still reaches B; after it A reads nothing, so the next
    stream stays on the device for the new owner."""
    a, b, _ = hosts
    a.forwarder.release(grace=0)  # both of A's threads are blocked in their reads
    first = udp_stream("198.19.1.5", "198.19.2.7", b"held")
    a.send(first)
    assert b.received() == first
    wait_for(lambda: not a.forwarder._threads[0].is_alive(), "A's send thread to end")
    second = udp_stream("198.19.1.5", "198.19.2.7", b"the new owner's")
    a.send(second)
    assert a.device.end.recv(0x20000) == second  # still there: A's thread took it not
    assert not b.written()
