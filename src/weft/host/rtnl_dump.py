"""One device's routes, read with the kernel's own filter (a strict rtnetlink dump).

The fast path looks for the devices containers enter by (weft.host.fastpath_hooks) at every
full pass. pyroute2 dumps and decodes the whole routing table to answer that, and at 5,000
peers the table holds 5,000 routes of weft's: 0.4 s of CPU per pass. With
NETLINK_GET_STRICT_CHK the kernel returns only the routes of the device asked for, so a
container's veth costs one small dump whatever the number of peers.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

from weft.core.config import IPNetwork
from weft.core.errors import KernelError
from weft.host.rtnl_batch import RT_TABLE_MAIN, RTA_DST, RTA_OIF, messages

RTM_NEWROUTE, RTM_GETROUTE = 24, 26
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
SOL_NETLINK, NETLINK_GET_STRICT_CHK = 270, 12
_HEADER = struct.Struct("=IHHII")
# rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
_RTMSG = struct.Struct("=BBBBBBBBI")
_ATTR = struct.Struct("=HH")


def dump_request(ifindex: int, family: int) -> bytes:
    """The RTM_GETROUTE dump of the main table's `family` routes out of `ifindex` (pure)."""
    body = _RTMSG.pack(family, 0, 0, 0, RT_TABLE_MAIN, 0, 0, 0, 0) + \
        _ATTR.pack(8, RTA_OIF) + struct.pack("=I", ifindex)
    return _HEADER.pack(_HEADER.size + len(body), RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP,
                        1, 0) + body


def parse_routes(data: bytes) -> tuple[list[IPNetwork], bool]:
    """The destinations of the route messages in one datagram of the dump's answer, and
    whether it was the last (NLMSG_DONE) (pure). A default route has no RTA_DST."""
    found: list[IPNetwork] = []
    for kind, _, offset, length in messages(data):
        if kind == NLMSG_DONE:
            return found, True
        if kind == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", data, offset + _HEADER.size)
            if code:
                raise KernelError(f"route dump refused: {os.strerror(-code)}")
        if kind == RTM_NEWROUTE and length >= _HEADER.size + _RTMSG.size:
            family, dst_len = _RTMSG.unpack_from(data, offset + _HEADER.size)[:2]
            at, end = offset + _HEADER.size + _RTMSG.size, offset + length
            while at + _ATTR.size <= end:
                size, attr = _ATTR.unpack_from(data, at)
                if size < _ATTR.size:
                    break
                if attr == RTA_DST:
                    raw = bytes(data[at + _ATTR.size:at + size])
                    if len(raw) == (4 if family == socket.AF_INET else 16):
                        found.append(ipaddress.ip_network((raw, dst_len)))
                at += (size + 3) & ~3
    return found, False


def device_routes(ifindex: int, family: int) -> list[IPNetwork]:
    """The destinations of the main table's `family` routes out of device `ifindex`."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    try:
        sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
        sock.bind((0, 0))
        sock.send(dump_request(ifindex, family))
        routes: list[IPNetwork] = []
        while True:
            found, done = parse_routes(sock.recv(1 << 16))
            routes += found
            if done:
                return routes
    finally:
        sock.close()
