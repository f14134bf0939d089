"""Packets forged independently of weft's codec, for the trust tests.

Script text, run by a plain `python3` inside a namespace (user nobody may not read the
venv): `PACKETS` defines the builders a forger script starts with, `LISTENER` prints every
UDP payload that reaches port 7777 until SECONDS (argv[1]) pass without one.
"""

from __future__ import annotations

import subprocess
import textwrap
from collections.abc import Callable
from typing import Any

PACKETS = textwrap.dedent("""
    import ipaddress, os, socket, struct, sys
    def checksum(b):
        s = sum(struct.unpack("!10H", b))
        while s >> 16: s = (s & 0xFFFF) + (s >> 16)
        return ~s & 0xFFFF
    def inner_ipv4(src, dst, payload):
        \"\"\"An IPv4/UDP packet src:4444 -> dst:7777 carrying payload.\"\"\"
        udp = struct.pack("!HHHH", 4444, 7777, 8 + len(payload), 0) + payload
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                         ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
        return ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:] + udp
    def inner_ipv6(src, dst, payload):
        \"\"\"An IPv6/UDP packet src:4444 -> dst:7777 carrying payload (hop limit 64).\"\"\"
        s, d = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
        length = 8 + len(payload)
        pseudo = s + d + struct.pack("!IxxxB", length, 17)
        udp = struct.pack("!HHHH", 4444, 7777, length, 0) + payload
        data = pseudo + udp + (b"\\0" if len(udp) % 2 else b"")
        total = sum(struct.unpack(f"!{len(data) // 2}H", data))
        while total >> 16: total = (total & 0xFFFF) + (total >> 16)
        csum = (~total & 0xFFFF) or 0xFFFF  # UDP over IPv6 must carry a checksum
        udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
        return struct.pack("!IHBB", 6 << 28, length, 17, 64) + s + d + udp
    def weft_udp(packet):
        \"\"\"packet in weft's udp encapsulation: its header, then a zero virtio-net header.\"\"\"
        return bytes([0x11, 0, 1, 0]) + os.urandom(4) + bytes(10) + packet
""")

LISTENER = textwrap.dedent("""
    import socket, sys
    six = len(sys.argv) > 2 and sys.argv[2] == "6"
    s = socket.socket(socket.AF_INET6 if six else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("::" if six else "0.0.0.0", 7777)); s.settimeout(float(sys.argv[1]))
    print("ready", flush=True)
    try:
        while True:
            print(s.recv(2048).decode(errors="replace"), flush=True)
    except TimeoutError:
        pass
""")


def heard_during(dst: Any, send: Callable[[], object], family: int = 4) -> list[str]:
    """What the container `dst` hears on port 7777 (IPv4, or IPv6 with `family=6`) while
    `send()` runs."""
    listener = subprocess.Popen(["ip", "netns", "exec", dst.netns, "/usr/bin/python3", "-c",
                                 LISTENER, "2", str(family)], stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None
        assert listener.stdout.readline().strip() == "ready"
        send()
        out, _ = listener.communicate(timeout=30)
    finally:
        listener.kill()
        listener.wait()
    return out.split()
