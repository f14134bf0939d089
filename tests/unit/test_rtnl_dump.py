"""The strict route dump's request and the parsing of its answer, on bytes built here."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest

from weft.core.errors import KernelError
from weft.host.rtnl_dump import dump_request, parse_routes


def _route(family: int, dst: bytes | None, dst_len: int) -> bytes:
    body = struct.pack("=BBBBBBBBI", family, dst_len, 0, 0, 254, 3, 0, 1, 0)
    if dst is not None:
        body += struct.pack("=HH", 4 + len(dst), 1) + dst  # RTA_DST
    body += struct.pack("=HHI", 8, 4, 7)  # RTA_OIF 7
    return struct.pack("=IHHII", 16 + len(body), 24, 2, 1, 0) + body


def _done() -> bytes:
    return struct.pack("=IHHIIi", 20, 3, 2, 1, 0, 0)


def test_the_request_asks_the_kernel_for_one_device_s_main_table_routes() -> None:
    request = dump_request(7, socket.AF_INET6)
    length, kind, flags, _, _ = struct.unpack_from("=IHHII", request)
    assert (length, kind, flags) == (len(request), 26, 0x301)  # RTM_GETROUTE, dump
    family, _, _, _, table = struct.unpack_from("=BBBBB", request, 16)
    assert (family, table) == (socket.AF_INET6, 254)
    assert struct.unpack_from("=HHI", request, 28) == (8, 4, 7)  # RTA_OIF 7


def test_routes_are_read_up_to_the_end_of_the_dump() -> None:
    data = (_route(socket.AF_INET, ipaddress.IPv4Address("198.19.3.0").packed, 24)
            + _route(socket.AF_INET6, ipaddress.IPv6Address("2001:db8:1:3::").packed, 64)
            + _route(socket.AF_INET, None, 0))  # a default route: no destination
    assert parse_routes(data) == ([ipaddress.ip_network("198.19.3.0/24"),
                                   ipaddress.ip_network("2001:db8:1:3::/64")], False)
    assert parse_routes(_done()) == ([], True)
    # A destination of the wrong length for its family is not a route of ours to read.
    assert parse_routes(_route(socket.AF_INET, b"\x01\x02", 16)) == ([], False)


def test_a_refused_dump_is_an_error() -> None:
    refused = struct.pack("=IHHIIi", 20, 2, 0, 1, 0, -22)
    with pytest.raises(KernelError, match="Invalid argument"):
        parse_routes(refused)
