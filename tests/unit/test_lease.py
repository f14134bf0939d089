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


# --- host identity (issue 25) -------------------------------------------------------------

def test_host_id_is_an_extra_field_and_old_records_stay_valid() -> None:
    import json as _json

    from weft.core.lease import Lease as _Lease
    from weft.core.lease import parse_lease as _parse

    subnet = ipaddress.ip_network("198.19.3.0/24")
    lease = _Lease(subnet, ipaddress.ip_address("198.18.0.3"), "vxlan", {"VNI": 1},
                   host_id="ab" * 16)
    record = _json.loads(lease.to_json())
    # flannel's three fields as they were, one more beside them (Go's decoder skips it)
    assert {k: record[k] for k in ("PublicIP", "BackendType", "BackendData")} == {
        "PublicIP": "198.18.0.3", "BackendType": "vxlan", "BackendData": {"VNI": 1}}
    assert record["HostID"] == "ab" * 16
    assert _parse("subnets/198.19.3.0-24", lease.to_json()) == lease
    old = '{"PublicIP": "198.18.0.3", "BackendType": "vxlan", "BackendData": {}}'
    assert _parse("subnets/198.19.3.0-24", old).host_id == ""
    assert "HostID" not in _json.loads(_parse("subnets/198.19.3.0-24", old).to_json())


def test_host_id_decides_who_holds_a_lease_and_who_may_reclaim_it() -> None:
    from weft.backends.registry import parse_config as _parse_config
    from weft.core.lease import Lease as _Lease
    from weft.core.lease import address_holder, find_reclaimable, held_by

    config = _parse_config('{"Network": "198.19.0.0/16"}')
    ip = ipaddress.ip_address("198.18.0.3")
    mine, theirs = "a" * 32, "b" * 32
    ours = _Lease(ipaddress.ip_network("198.19.3.0/24"), ip, "vxlan", host_id=mine,
                  expiration=200.0)
    other = _Lease(ipaddress.ip_network("198.19.4.0/24"), ip, "vxlan", host_id=theirs,
                   expiration=200.0)
    legacy = _Lease(ipaddress.ip_network("198.19.5.0/24"), ip, "vxlan", expiration=200.0)
    moved = _Lease(ours.subnet, ipaddress.ip_address("198.18.0.42"), "vxlan", host_id=mine)
    assert held_by(ours, moved)  # the same host at a new address
    assert not held_by(other, ours)  # another host at the same address
    assert held_by(legacy, ours)  # a record from before identities: by address
    assert find_reclaimable(config, [other, legacy, ours], ip, mine) == ours
    assert find_reclaimable(config, [other, legacy], ip, mine) == legacy
    assert find_reclaimable(config, [other], ip, mine) is None
    assert address_holder([ours, other, legacy], ip, mine, now=100.0) == other
    assert address_holder([ours, other, legacy], ip, mine, now=300.0) is None  # it ended
