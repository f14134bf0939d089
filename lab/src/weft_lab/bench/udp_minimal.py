"""The bench's `udp-minimal` reference: the least a Python TUN forwarder can do.

One blocking thread per direction, `os.read` -> `sock.send` and `sock.recv` -> `os.write`,
one peer (a connected socket), nothing else: no weft header, no checks, no counters.  The
TUN keeps `IFF_VNET_HDR` and TSO, so a super-packet travels as ONE UDP datagram that the
kernel IP-fragments on the underlay — exactly what weft's forwarder must not do.  It only
exists so that `weft bench` can show what weft's guarantees cost; never use it for real.

    python -m weft_lab.bench.udp_minimal DEVICE BIND_IP PORT PEER_IP PEER_PORT
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import threading

from weft.backends.udp.tun import (
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUNSETOFFLOAD,
    open_tun,
)


def main(argv: list[str]) -> int:
    device, bind_ip, port, peer_ip, peer_port = argv
    tun = open_tun(device)
    fcntl.ioctl(tun, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    sock.bind((bind_ip, int(port)))
    sock.connect((peer_ip, int(peer_port)))

    def tun_to_udp() -> None:
        while True:
            try:  # noqa: SIM105 - a context manager per packet is more than minimal
                sock.send(os.read(tun, 0x10000 + 10))
            except OSError:
                pass

    threading.Thread(target=tun_to_udp, daemon=True).start()
    while True:
        try:  # noqa: SIM105 - as above
            os.write(tun, sock.recv(0x10000 + 10))
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
