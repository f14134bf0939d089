"""How the kernel treats DF on a UDP socket (IP_MTU_DISCOVER and its IPv6 twin).

Here, below the backends, because two edges need it: the udp backend's underlay socket
(weft.backends.udp.bind: never fragment, never shrink) and the probe socket both probers
use (weft.host.probe_socket: DF set, so an answer proves the path's MTU).
"""

from __future__ import annotations

import socket
from typing import Final

# Socket options the socket module does not name on every build.
IP_MTU_DISCOVER: Final = 10
IPV6_MTU_DISCOVER: Final = 23
IP_PMTUDISC_DO: Final = 2  # set DF, follow the learned path MTU
IP_PMTUDISC_PROBE: Final = 3  # set DF, ignore learned path MTU: never fragment, never shrink


def set_path_mtu_discovery(sock: socket.socket, family: int, mode: int) -> None:
    """IP_MTU_DISCOVER (or its IPv6 twin) on `sock`: how the kernel treats DF."""
    if family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, mode)
    else:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, mode)
