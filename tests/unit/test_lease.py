"""Leases and lease events: the pure parts of the control plane."""

from __future__ import annotations

import ipaddress

import pytest

from weft.core.events import EventKind, LeaseEvent, apply_events, diff_peers
from weft.core.lease import Lease, LeaseFormatError, parse_lease, parse_subnet_key

NET = ipaddress.ip_network


def lease(subnet: str, ip: str, mac: str = "aa:bb:cc:dd:ee:ff") -> Lease:
    return Lease(NET(subnet), ipaddress.ip_address(ip), "vxlan", {"VtepMAC": mac})


def test_flannel_key_and_json_round_trip() -> None:
    a = lease("198.19.3.0/24", "198.18.0.11")
    assert a.key == "subnets/198.19.3.0-24"
    assert parse_subnet_key("subnets/198.19.3.0-24") == NET("198.19.3.0/24")
    b = parse_lease(a.key, a.to_json(), 42.0)
    assert b == a.with_expiration(42.0)
    v6 = Lease(NET("fd00:198:19:3::/64"), ipaddress.ip_address("fd00::1"), "host-gw")
    assert parse_lease(v6.key, v6.to_json()) == v6


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("subnets/198.19.3.0-24", "not json"),
        ("subnets/198.19.3.0-24", "[]"),
        ("subnets/198.19.3.0-24", '{"BackendType": "vxlan"}'),
        ("subnets/198.19.3.0-24", '{"PublicIP": "nope", "BackendType": "vxlan"}'),
        ("subnets/198.19.3.0-24", '{"PublicIP": "198.18.0.1", "BackendType": 3}'),
        ("subnets/198.19.3.0-24", '{"PublicIP": "198.18.0.1", "BackendType": "x", "BackendData": 1}'),
        ("subnets/198.19.3.5-24", '{"PublicIP": "198.18.0.1", "BackendType": "vxlan"}'),
        ("subnets/garbage", '{"PublicIP": "198.18.0.1", "BackendType": "vxlan"}'),
        ("subnets/198.19.3.0-99", '{"PublicIP": "198.18.0.1", "BackendType": "vxlan"}'),
        # Keys that would alias a live peer's subnet under a second name.
        ("subnets/zz/198.19.3.0-24", '{"PublicIP": "198.18.0.1", "BackendType": "vxlan"}'),
        ("subnets/subnets/198.19.3.0-24", '{"PublicIP": "198.18.0.1", "BackendType": "vxlan"}'),
        ("/weft/network/subnets/198.19.3.0-24", '{"PublicIP": "198.18.0.1", "BackendType": "vxlan"}'),
        ("subnets/198.19.003.0-24", '{"PublicIP": "198.18.0.1", "BackendType": "vxlan"}'),
        ("subnets/198.19.3.0-024", '{"PublicIP": "198.18.0.1", "BackendType": "vxlan"}'),
    ],
)
def test_records_that_do_not_parse_raise_a_format_error(key: str, value: str) -> None:
    with pytest.raises(LeaseFormatError):
        parse_lease(key, value)


def test_events_fold_into_a_view_and_diff_into_peer_changes() -> None:
    a, b = lease("198.19.1.0/24", "198.18.0.11"), lease("198.19.2.0/24", "198.18.0.12")
    view = apply_events({}, [LeaseEvent(EventKind.PUT, a.subnet, 1, a),
                             LeaseEvent(EventKind.PUT, b.subnet, 2, b)])
    assert view == {a.subnet: a, b.subnet: b}
    renewed = a.with_expiration(99.0)
    moved = lease("198.19.2.0/24", "198.18.0.13")
    after = apply_events(view, [LeaseEvent(EventKind.PUT, a.subnet, 3, renewed),
                                LeaseEvent(EventKind.PUT, b.subnet, 4, moved)])
    d = diff_peers(view, after)
    assert d.added == ()
    assert d.removed == ()
    assert d.changed == (moved,)
    gone = apply_events(after, [LeaseEvent(EventKind.DELETE, a.subnet, 5)])
    assert diff_peers(after, gone).removed == (renewed,)
    assert view == {a.subnet: a, b.subnet: b}  # folding never mutates its input
