"""The probe socket and its counters: what auto's per-plane prober (weft.backends.auto.probe)
and the peer-health prober (weft.agent.prober) share.

Both send full-size datagrams with DF set from this host's overlay address, with a small
one beside each, and answer their peers' probes; neither may let anything from the wire
raise out of its thread. So both open the socket the same way, size their probes the same
way, count the same things, treat the same send errors as a plain miss and drain their
sockets the same way. Here, below the backends, so the agent's prober does not reach into
one backend for it. What a probe says (the wire format) and what a prober does with an
answer stay with each prober.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final, TypeVar

from weft.core.config import IPAddress
from weft.core.constants import IP_HEADER, UDP_HEADER
from weft.host.path_mtu import IP_PMTUDISC_DO, set_path_mtu_discovery

IP_FREEBIND: Final = 15  # not named by Python's socket module
IP_UDP: Final = {version: IP_HEADER[version] + UDP_HEADER for version in (4, 6)}
# Beside each full-size probe, one of the smallest size every IPv4 path carries: answered
# while the full one is not, it says the path MTU is the problem, not the path.
SMALL_PACKET: Final = 576
# A send that fails with one of these is a miss like any other, not news: the route's MTU
# is smaller (EMSGSIZE), the path or the overlay address is gone for now, a firewall said no.
QUIET_SEND_ERRORS: Final = frozenset({
    errno.EMSGSIZE, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EPERM, errno.EAGAIN,
    errno.ECONNREFUSED, errno.EINVAL, errno.EADDRNOTAVAIL})

P = TypeVar("P")


@dataclass
class ProbeCounters:
    sent: int = 0
    answered: int = 0
    send_errors: int = 0
    requests_answered: int = 0
    dropped_non_member: int = 0
    dropped_malformed: int = 0
    dropped_unexpected: int = 0


def probe_socket(version: int, own: IPAddress, port: int, mark: int | None) -> socket.socket:
    """A non-blocking UDP socket bound to `own`:`port` (0: any), DF on every datagram,
    marked with `mark` (SO_MARK: the routing table that carries it) unless None."""
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        # The overlay address may be (re)assigned after we bind: bind to it anyway.
        sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        set_path_mtu_discovery(sock, family, IP_PMTUDISC_DO)
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        sock.bind((str(own), port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def probe_payloads(mtu: int, version: int) -> tuple[int, int]:
    """The UDP payload of a full-size probe (a datagram of `mtu` bytes) and of its small
    companion (SMALL_PACKET, or less on a path whose MTU is smaller still)."""
    payload = mtu - IP_UDP[version]
    return payload, min(payload, SMALL_PACKET - IP_UDP[version])


def ipaddress_of(text: str) -> IPAddress:
    """A sender's address as recvfrom gives it (an IPv6 one may carry a %zone)."""
    return ipaddress.ip_address(text.split("%")[0])


def send_probe(sock: socket.socket, data: bytes, to: tuple[str, int], counters: ProbeCounters,
               log: logging.Logger, failed: str, fields: Mapping[str, str]) -> bool:
    """Send one probe, counted; whether it left. A failed send is a miss (counted), logged
    as `failed` with `fields` unless it is among QUIET_SEND_ERRORS."""
    counters.sent += 1
    try:
        sock.sendto(data, to)
    except OSError as exc:
        counters.send_errors += 1
        if exc.errno not in QUIET_SEND_ERRORS:
            log.warning(failed, extra={**fields, "error": str(exc)})
        return False
    return True


def received(sock: socket.socket) -> Iterator[tuple[bytes, tuple[str, int]]]:
    """Every datagram queued on the non-blocking `sock`, until none is left."""
    while True:
        try:
            data, sender = sock.recvfrom(0x10000)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # an ICMP error queued on the socket: a miss, found at its timeout
            return
        yield data, sender


def parse(data: bytes, sender: tuple[str, int], decode: Callable[[bytes], P],
          counters: ProbeCounters) -> tuple[P, IPAddress] | None:
    """The probe in `data` and the address it came from; None, counted as malformed, for
    a datagram `decode` refuses (a ValueError) or a sender that is no address."""
    try:
        return decode(data), ipaddress_of(sender[0])
    except ValueError:
        counters.dropped_malformed += 1
        return None
