"""One host, one lease, both families: the key and value as flannel's etcd registry keeps a
dual-stack lease, the pair chosen together, reclaimed, renewed, released and watched as one
record (a real SQLite store), and a poisoned IPv6 half that peer's error."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import random
from pathlib import Path

import pytest

from bounded import run
from weft.agent.leasing import acquire_lease
from weft.backends.registry import backend_data_problem, parse_config
from weft.core.errors import NetworkFull
from weft.core.events import EventKind
from weft.core.lease import (
    Lease,
    LeaseFormatError,
    choose_pair,
    find_reclaimable,
    parse_lease,
    parse_lease_key,
    same_peer,
    subnet_key,
)
from weft.core.validate import TrustContext, ViewKeeper, validate_view
from weft.integrations.subnet_env import SubnetEnv, parse_subnet_env
from weft.store.sqlite import SqliteLeaseStore

DUAL = parse_config('{"Network": "198.19.0.0/16", "EnableIPv6": true, '
                    '"IPv6Network": "2001:db8:1::/48"}')
V4 = parse_config('{"Network": "198.19.0.0/16"}')
MAC = {"VtepMAC": "02:00:00:00:00:02"}
net = ipaddress.ip_network
ip = ipaddress.ip_address


def dual(n: int, host: str, *, v6: str | None = None, public_ipv6: str | None = None,
         v6_data: dict[str, object] | None = None) -> Lease:
    six = net(v6 or f"2001:db8:1:{n:x}::/64")
    assert isinstance(six, ipaddress.IPv6Network)
    return Lease(net(f"198.19.{n}.0/24"), ip(host), "vxlan", MAC, ipv6_subnet=six,
                 public_ipv6=ipaddress.IPv6Address(public_ipv6) if public_ipv6 else None,
                 backend_v6_data=MAC if v6_data is None else v6_data)


# --- the record ---------------------------------------------------------------------------

def test_key_is_flannels_dual_stack_layout() -> None:
    lease = dual(3, "198.18.0.3")
    assert lease.key == "subnets/198.19.3.0-24&2001:db8:1:3::-64"
    assert parse_lease_key(lease.key) == (lease.subnet, lease.ipv6_subnet)
    assert subnet_key(net("198.19.3.0/24")) == "subnets/198.19.3.0-24"  # single family
    assert parse_lease_key("subnets/2001:db8:1:3::-64") == (net("2001:db8:1:3::/64"), None)


@pytest.mark.parametrize("key", [
    "subnets/198.19.3.0-24&2001:DB8:1:3::-64",        # not canonical
    "subnets/198.19.3.0-24&2001:db8:1:0003::-64",     # not canonical
    "subnets/2001:db8:1:3::-64&198.19.3.0-24",        # families swapped
    "subnets/198.19.3.0-24&198.19.4.0-24",            # two IPv4 halves
    "subnets/198.19.3.0-24&2001:db8:1:3::",           # no length
    "subnets/198.19.3.0-24&2001:db8:1:3::1-64",       # host bits
    "subnets/198.19.3.0-24&",
    "subnets/x/198.19.3.0-24&2001:db8:1:3::-64",
])
def test_a_key_not_canonical_is_no_lease(key: str) -> None:
    with pytest.raises(LeaseFormatError):
        parse_lease_key(key)


def test_value_carries_flannels_ipv6_attributes() -> None:
    lease = dual(3, "198.18.0.3", public_ipv6="2001:db8:ff::3")
    assert json.loads(lease.to_json()) == {
        "PublicIP": "198.18.0.3", "PublicIPv6": "2001:db8:ff::3", "BackendType": "vxlan",
        "BackendData": MAC, "BackendV6Data": MAC}
    assert same_peer(parse_lease(lease.key, lease.to_json()), lease)
    # A single-family lease is written exactly as before.
    single = Lease(net("198.19.3.0/24"), ip("198.18.0.3"), "vxlan", MAC)
    assert single.to_json() == ('{"BackendData": {"VtepMAC": "02:00:00:00:00:02"}, '
                                '"BackendType": "vxlan", "PublicIP": "198.18.0.3"}')


def test_a_record_flannel_wrote_parses() -> None:
    value = ('{"PublicIP":"198.18.0.4","PublicIPv6":null,"BackendType":"vxlan",'
             '"BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:04"},'
             '"BackendV6Data":{"VNI":1,"VtepMAC":"02:00:00:00:00:14"}}')
    lease = parse_lease("subnets/198.19.4.0-24&2001:db8:1:4::-64", value)
    assert (lease.ipv6_subnet, lease.public_ipv6) == (net("2001:db8:1:4::/64"), None)
    assert lease.backend_v6_data == {"VNI": 1, "VtepMAC": "02:00:00:00:00:14"}


@pytest.mark.parametrize("value", [
    '{"PublicIP": "198.18.0.4", "BackendType": "vxlan", "PublicIPv6": "198.18.0.4"}',
    '{"PublicIP": "198.18.0.4", "BackendType": "vxlan", "PublicIPv6": 7}',
    '{"PublicIP": "198.18.0.4", "BackendType": "vxlan", "BackendV6Data": [1]}',
])
def test_a_malformed_ipv6_attribute_is_no_lease(value: str) -> None:
    with pytest.raises(LeaseFormatError):
        parse_lease("subnets/198.19.4.0-24&2001:db8:1:4::-64", value)


def test_a_renewal_is_the_same_peer_but_a_changed_ipv6_half_is_not() -> None:
    lease = dual(3, "198.18.0.3")
    assert same_peer(lease, lease.with_expiration(99.0))
    assert not same_peer(lease, dataclasses.replace(lease, public_ipv6=ipaddress.IPv6Address("2001:db8:ff::3")))
    assert not same_peer(lease, dataclasses.replace(lease, backend_v6_data={"VtepMAC": 1}))
    assert not same_peer(lease, dual(3, "198.18.0.3", v6="2001:db8:1:9::/64"))


# --- choosing and reclaiming -------------------------------------------------------------

def test_the_pair_is_the_nth_of_each_range() -> None:
    rng = random.Random(1)
    for _ in range(20):
        four, six = choose_pair(DUAL, [], rng)
        assert six is not None
        assert DUAL.range.index(four) == DUAL.ipv6.index(six)  # type: ignore[union-attr]


def test_a_pair_with_either_half_held_is_not_free() -> None:
    small = parse_config('{"Network": "198.19.0.0/22", "EnableIPv6": true, '
                         '"IPv6Network": "2001:db8:1::/62"}')
    assert small.capacity == 3
    held = [dual(1, "198.18.0.1", v6="2001:db8:1:2::/64"),  # index 0 by IPv4, 1 by IPv6
            Lease(net("198.19.3.0/24"), ip("198.18.0.3"), "vxlan", MAC)]  # index 2 by IPv4
    with pytest.raises(NetworkFull) as full:
        choose_pair(small, held, random.Random(0))
    assert "no free pair of subnets in 198.19.0.0/22 and 2001:db8:1::/62" in str(full.value)
    assert choose_pair(V4, [], random.Random(0))[1] is None


def test_a_host_reclaims_only_a_lease_of_the_configs_shape() -> None:
    mine = dual(5, "198.18.0.5")
    single = Lease(net("198.19.6.0/24"), ip("198.18.0.5"), "vxlan", MAC)
    assert find_reclaimable(DUAL, [single, mine], ip("198.18.0.5")) == mine
    assert find_reclaimable(DUAL, [single], ip("198.18.0.5")) is None
    assert find_reclaimable(V4, [mine], ip("198.18.0.5")) is None
    assert find_reclaimable(V4, [single, mine], ip("198.18.0.5")) == single


def test_both_subnets_leased_renewed_watched_and_released_together(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = SqliteLeaseStore(str(tmp_path / "store.db"))
        a, reclaimed = await acquire_lease(store, DUAL, ip("198.18.0.1"), "vxlan", MAC, 60,
                                           public_ipv6=ipaddress.IPv6Address("2001:db8:ff::1"),
                                           backend_v6_data=MAC)
        assert not reclaimed
        assert a.ipv6_subnet is not None
        assert DUAL.range.index(a.subnet) == DUAL.ipv6.index(a.ipv6_subnet)  # type: ignore[union-attr]
        b, _ = await acquire_lease(store, DUAL, ip("198.18.0.2"), "vxlan", MAC, 60,
                                   backend_v6_data=MAC)
        assert b.ipv6_subnet not in (None, a.ipv6_subnet)
        assert b.subnet != a.subnet
        _, revision = await store.list_leases()
        # A restart takes the same pair back, with its fresh attributes.
        again, reclaimed = await acquire_lease(store, DUAL, ip("198.18.0.1"), "vxlan", MAC, 60,
                                               backend_v6_data=MAC)
        assert reclaimed
        assert (again.subnet, again.ipv6_subnet, again.public_ipv6) == (
            a.subnet, a.ipv6_subnet, None)
        renewed = await store.renew_lease(again, 120)
        leases, _ = await store.list_leases()
        assert sorted(lease.key for lease in leases) == sorted([a.key, b.key])
        assert {lease.key: lease for lease in leases}[a.key].expiration == renewed.expiration
        await store.delete_lease(a.subnet, a.ipv6_subnet)
        leases, _ = await store.list_leases()
        assert [lease.key for lease in leases] == [b.key]
        async for batch in store.watch(revision):
            kinds = [(e.kind, e.subnet) for e in batch]
            assert kinds[-1] == (EventKind.DELETE, a.subnet)
            put = next(e for e in batch if e.kind is EventKind.PUT)
            assert put.lease is not None
            assert put.lease.ipv6_subnet == a.ipv6_subnet
            break
        await store.close()

    run(scenario())


# --- trust ---------------------------------------------------------------------------------

HOST = ip("198.18.0.1")
CTX = TrustContext(DUAL, HOST, net("198.19.1.0/24"), (net("198.18.0.0/24"),),
                   backend_data_problem, own_ipv6_subnet=net("2001:db8:1:1::/64"),
                   host_ipv6=ip("2001:db8:ff::1"))
GOOD = dual(2, "198.18.0.2", public_ipv6="2001:db8:ff::2")


@pytest.mark.parametrize(("bad", "reason"), [
    (dataclasses.replace(dual(3, "198.18.0.3"), ipv6_subnet=None),
     "no IPv6 subnet: the network is dual stack"),
    (dual(3, "198.18.0.3", v6="2001:db8:2:3::/64"), "is not a /64 of IPv6Network"),
    (dual(3, "198.18.0.3", v6="2001:db8:1:3::/80"), "is not a /64 of IPv6Network"),
    (dual(3, "198.18.0.3", v6="2001:db8:1::/64"), "between 2001:db8:1:1::"),
    (dual(3, "198.18.0.3", v6="2001:db8:1:1::/64"), "IPv6 subnet 2001:db8:1:1::/64 is this "
                                                    "host's own"),
    (dual(3, "198.18.0.3", public_ipv6="ff02::1"), "PublicIPv6 ff02::1 is not a unicast"),
    (dual(3, "198.18.0.3", public_ipv6="::1"), "PublicIPv6 ::1 is not a unicast"),
    (dual(3, "198.18.0.3", public_ipv6="fe80::3"), "PublicIPv6 fe80::3 is not a unicast"),
    (dual(3, "198.18.0.3", public_ipv6="2001:db8:ff::1"), "PublicIPv6 2001:db8:ff::1 is this "
                                                          "host's own address"),
    (dual(3, "198.18.0.3", public_ipv6="2001:db8:1:7::9"), "inside the overlay IPv6Network"),
    (dual(3, "198.18.0.3", v6_data={"VtepMAC": "zz"}), "BackendV6Data: "),
    (dual(3, "198.18.0.3", v6_data={"VtepMAC": "x" * 5000}), "BackendV6Data is 50"),
])
def test_a_poisoned_ipv6_half_is_that_peers_error(bad: Lease, reason: str) -> None:
    view = validate_view([GOOD, bad], CTX)
    assert reason in view.errors[str(bad.subnet)]
    assert list(view.peers) == [GOOD.subnet]


def test_an_ipv6_half_in_a_single_family_network_is_an_error() -> None:
    ctx = dataclasses.replace(CTX, config=V4, own_ipv6_subnet=None)
    view = validate_view([dual(3, "198.18.0.3")], ctx)
    assert "IPv6 subnet 2001:db8:1:3::/64 in a network that is not dual stack" in \
        view.errors["198.19.3.0/24"]


def test_one_ipv6_subnet_or_public_ipv6_claimed_twice_keeps_the_first_holder() -> None:
    keeper = ViewKeeper()
    keeper.full([GOOD], CTX)
    twin = dual(3, "198.18.0.3", v6=str(GOOD.ipv6_subnet))
    view, _ = keeper.update({GOOD.subnet: GOOD, twin.subnet: twin}, [twin.subnet], CTX)
    assert list(view.peers) == [GOOD.subnet]
    assert view.errors == {"198.19.3.0/24": "IPv6 subnet 2001:db8:1:2::/64 is also claimed by "
                                            "198.19.2.0/24"}
    # The twin leaves: its error goes with it.
    view, _ = keeper.update({GOOD.subnet: GOOD}, [twin.subnet], CTX)
    assert (list(view.peers), view.errors) == ([GOOD.subnet], {})
    same_v6_ip = dual(4, "198.18.0.4", public_ipv6="2001:db8:ff::2")
    view = validate_view([GOOD, same_v6_ip], CTX, previous={GOOD.subnet: GOOD})
    assert view.errors == {"198.19.4.0/24": "PublicIPv6 2001:db8:ff::2 is also claimed by "
                                            "198.19.2.0/24"}
    # Between two new claimants, neither is used until one goes away.
    view = validate_view([GOOD, twin], CTX)
    assert view.peers == {}
    assert set(view.errors) == {"198.19.2.0/24", "198.19.3.0/24"}


def test_keeper_by_difference_agrees_with_a_full_pass() -> None:
    leases = [GOOD, dual(3, "198.18.0.3"), dual(4, "198.18.0.4", v6="2001:db8:1:3::/64"),
              dual(5, "198.18.0.5", public_ipv6="ff02::1")]
    keeper = ViewKeeper()
    keeper.full([], CTX)
    held: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, Lease] = {}
    for lease in leases:
        held[lease.subnet] = lease
        keeper.update(dict(held), [lease.subnet], CTX)
    fresh = ViewKeeper().full(leases, CTX, previous=keeper.view.peers)
    assert keeper.view == fresh


# --- subnet.env ----------------------------------------------------------------------------

def test_subnet_env_names_both_families_as_flannel_does() -> None:
    env = SubnetEnv(net("198.19.0.0/16"), net("198.19.3.0/24"), 1450, True,
                    net("2001:db8:1::/48"), net("2001:db8:1:3::/64"))
    assert env.render() == ("FLANNEL_NETWORK=198.19.0.0/16\nFLANNEL_SUBNET=198.19.3.1/24\n"
                            "FLANNEL_IPV6_NETWORK=2001:db8:1::/48\n"
                            "FLANNEL_IPV6_SUBNET=2001:db8:1:3::1/64\n"
                            "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n")
    assert parse_subnet_env(env.render()) == env
    single = SubnetEnv(net("198.19.0.0/16"), net("198.19.3.0/24"), 1450, True)
    assert "IPV6" not in single.render()
    assert parse_subnet_env(single.render()) == single


def test_a_hosts_lease_of_the_other_shape_is_released_when_it_leases_anew(
        tmp_path: Path) -> None:
    """The network went dual stack: a host's single-family lease goes when it leases its
    pair (flannel deletes it too), so peers do not report it for its whole TTL; another
    host's stays."""
    async def scenario() -> bool:
        store = SqliteLeaseStore(str(tmp_path / "store.db"))
        await acquire_lease(store, V4, ip("198.18.0.1"), "vxlan", MAC, 60)
        theirs, _ = await acquire_lease(store, V4, ip("198.18.0.2"), "vxlan", MAC, 60)
        mine, reclaimed = await acquire_lease(store, DUAL, ip("198.18.0.1"), "vxlan", MAC, 60,
                                              backend_v6_data=MAC)
        assert not reclaimed
        leases, _ = await store.list_leases()
        await store.close()
        assert mine.ipv6_subnet is not None
        return sorted(lease.key for lease in leases) == sorted([mine.key, theirs.key])

    assert run(scenario())
