"""The `udp` backend's underlay socket: creation, buffers, DF, and the UDP GSO/GRO offloads.

`open_bind` gives the forwarder a bound `UdpBind` (wireguard-go's `conn.Bind`): the socket
its loops send from and receive on, and which offloads the kernel granted.  The forwarder
never opens a socket itself; a test hands it one bound to 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from dataclasses import dataclass, field
from typing import Final

from weft.core.config import IPAddress
from weft.core.errors import KernelError
from weft.host.path_mtu import IP_PMTUDISC_PROBE, set_path_mtu_discovery
from weft.host.probe_socket import IP_FREEBIND

# --- linux/udp.h ----------------------------------------------------------------------------
SOL_UDP: Final = 17
UDP_SEGMENT: Final = 103
UDP_GRO: Final = 104
# --- socket options the socket module does not name on every build ----------------------
SO_SNDBUFFORCE: Final = 32
SO_RCVBUFFORCE: Final = 33
# The kernel's limit on segments per GSO send (UDP_MAX_SEGMENTS; 64 on older kernels).
MAX_GSO_SEGMENTS: Final = 64
# Largest UDP payload of one send: 64 KiB minus the UDP and (for IPv4) IP headers.  A
# 64 KiB super-packet plus its chunk headers exceeds it and takes two sends.  Capping the
# TUN's gso_max_size instead would avoid that, but then the kernel segments forwarded
# container traffic in software before the TUN: measured 10x slower.
MAX_UDP_PAYLOAD: Final = {4: 0xFFFF - 8 - 20, 6: 0xFFFF - 8}
IP_UDP_HEADERS: Final = {4: 20 + 8, 6: 40 + 8}
SOCKET_BUFFER: Final = 8 << 20


@dataclass
class UdpBind:
    """A bound underlay socket as the forwarder uses it: `sock`, its address, which UDP
    offloads the kernel granted, and `notes` on any that are off (why)."""

    sock: socket.socket
    ip: IPAddress
    port: int
    gso: bool = False
    gro: bool = False
    notes: list[str] = field(default_factory=list)

    def wake(self) -> None:
        """Make a blocked recvmsg return: shutting the receive side returns it empty at
        once (the kernel reports ENOTCONN for an unconnected socket but does it anyway)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RD)

    def close(self) -> None:
        self.sock.close()


def open_bind(bind_ip: IPAddress, port: int, offloads: bool,
              freebind: bool = False) -> UdpBind:
    """A UDP socket bound to `bind_ip`:`port` (0: any free port), with big buffers, DF on
    every datagram, and UDP GSO/GRO unless `offloads` is off or the kernel refuses.
    `freebind`: bound even while the address is not (yet) usable here."""
    family = socket.AF_INET if bind_ip.version == 4 else socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        if freebind:  # IP_FREEBIND is the socket's, whatever its family (as IPV6_FREEBIND)
            sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        for force, plain in (
            (SO_RCVBUFFORCE, socket.SO_RCVBUF),
            (SO_SNDBUFFORCE, socket.SO_SNDBUF),
        ):
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)
        # Never let the kernel IP-fragment a datagram: a too-big send fails loudly instead.
        set_path_mtu_discovery(sock, family, IP_PMTUDISC_PROBE)
        sock.bind((str(bind_ip), port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise KernelError(
                f"UDP port {port} on {bind_ip} is in use; stop the other user or set Backend.Port"
            ) from None
        raise KernelError(f"open UDP socket {bind_ip}:{port}: {exc}") from None
    bind = UdpBind(sock, bind_ip, sock.getsockname()[1])
    if offloads:
        try:
            sock.setsockopt(SOL_UDP, UDP_SEGMENT, 0)  # probe only: segment size is per send
            bind.gso = True
        except OSError as exc:
            bind.notes.append(f"UDP_SEGMENT refused: {exc.strerror}")
        try:
            sock.setsockopt(SOL_UDP, UDP_GRO, 1)
            bind.gro = True
        except OSError as exc:
            bind.notes.append(f"UDP_GRO refused: {exc.strerror}")
    return bind
