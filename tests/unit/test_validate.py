"""The lease validator: one bad record is that peer's error, never anyone else's."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weft.backends.registry import backend_data_problem, parse_config
from weft.core.lease import Lease
from weft.core.validate import TrustContext, ViewKeeper, validate_view

CONFIG = parse_config('{"Network": "198.19.0.0/16", "SubnetLen": 24, "SubnetMin": "198.19.1.0",'
                      ' "SubnetMax": "198.19.200.0"}')
HOST = ipaddress.ip_address("198.18.0.1")
OWN = ipaddress.ip_network("198.19.1.0/24")
CTX = TrustContext(CONFIG, HOST, OWN, (ipaddress.ip_network("198.18.0.0/24"),),
                   backend_data_problem)
MAC = "02:00:00:00:00:02"


def lease(subnet: str, ip: str, backend: str = "vxlan",
          data: Mapping[str, Any] | None = None) -> Lease:
    return Lease(ipaddress.ip_network(subnet), ipaddress.ip_address(ip), backend,
                 {"VtepMAC": MAC} if data is None else data)


GOOD = lease("198.19.2.0/24", "198.18.0.2")


@pytest.mark.parametrize(("bad", "reason"), [
    (lease("198.19.3.0/24", "198.18.0.3", data={"VtepMAC": "zz"}), "not a MAC"),
    (lease("198.19.3.0/24", "198.18.0.3", data={"VtepMAC": "01:00:5e:00:00:01"}), "unicast"),
    (lease("198.19.3.0/24", "198.18.0.3", data={}), "not a MAC"),
    (lease("198.19.3.0/24", "198.18.0.3", "udp", {"Port": 0}), "not a UDP port"),
    (lease("198.19.3.0/24", "198.18.0.3", "udp", {"Port": True}), "not a UDP port"),
    (lease("198.19.3.0/24", "198.18.0.3", "wireguard", {"PublicKey": "short"}), "PublicKey"),
    (lease("198.19.3.0/24", "198.18.0.3", "carrier-pigeon", {}), "unknown BackendType"),
    (lease("198.19.3.0/25", "198.18.0.3"), "is not a /24"),
    (lease("10.9.0.0/24", "198.18.0.3"), "is not a /24 of Network"),
    (lease("198.19.250.0/24", "198.18.0.3"), "between"),
    (lease("198.19.3.0/24", "198.18.0.1"), "this host's own address"),
    (lease("198.19.3.0/24", "127.0.0.1"), "not a unicast host address"),
    (lease("198.19.3.0/24", "224.0.0.5"), "not a unicast host address"),
    (lease("198.19.3.0/24", "0.0.0.0"), "not a unicast host address"),
    (lease("198.19.3.0/24", "255.255.255.255"), "not a unicast host address"),
    (lease("198.19.3.0/24", "198.19.9.9"), "inside the overlay Network"),
    (lease("198.19.3.0/24", "2001:db8::3"), "IPv6"),
])
def test_a_bad_lease_is_reported_and_the_good_peer_kept(bad: Lease, reason: str) -> None:
    view = validate_view([GOOD, bad], CTX)
    assert reason in view.errors[str(bad.subnet)]
    assert view.peers == {GOOD.subnet: GOOD}


def test_a_subnet_overlapping_the_underlay_is_refused() -> None:
    config = parse_config('{"Network": "198.18.0.0/15", "SubnetLen": 24}')
    ctx = TrustContext(config, HOST, None, (ipaddress.ip_network("198.18.5.0/24"),),
                       backend_data_problem)
    bad = lease("198.18.5.0/24", "198.18.0.3")
    view = validate_view([bad], ctx)
    assert "overlaps this host's underlay" in view.errors["198.18.5.0/24"]


def test_our_own_subnet_is_never_a_peer() -> None:
    assert validate_view([lease(str(OWN), "198.18.0.9")], CTX).peers == {}


def test_a_second_lease_naming_a_known_peers_address_does_not_move_it() -> None:
    forged = lease("198.19.9.0/24", "198.18.0.2")
    view = validate_view([GOOD, forged], CTX, previous={GOOD.subnet})
    assert view.peers == {GOOD.subnet: GOOD}
    assert "also claimed by 198.19.2.0/24" in view.errors["198.19.9.0/24"]


def test_two_new_leases_naming_one_address_are_both_held_back() -> None:
    twin = lease("198.19.9.0/24", "198.18.0.2")
    view = validate_view([GOOD, twin], CTX)
    assert view.peers == {}
    assert set(view.errors) == {"198.19.2.0/24", "198.19.9.0/24"}


def test_valid_leases_of_every_backend_pass() -> None:
    key = "mOqLGEiNcxAA2HzR7aTYUf7aV1nJhMwxV8wRKr2IbGE="
    leases = [GOOD, lease("198.19.3.0/24", "198.18.0.3", "udp", {"Port": 8285}),
              lease("198.19.4.0/24", "198.18.0.4", "udp", {}),
              lease("198.19.5.0/24", "198.18.0.5", "wireguard", {"PublicKey": key}),
              lease("198.19.6.0/24", "198.18.5.6", "host-gw", {})]
    view = validate_view(leases, CTX)
    assert view.errors == {}
    assert len(view.peers) == 5


def test_huge_backend_data_is_that_peers_error() -> None:
    huge = lease("198.19.3.0/24", "198.18.0.3", data={"VtepMAC": MAC, "Pad": "x" * 5000})
    view = validate_view([GOOD, huge], CTX)
    assert list(view.peers) == [GOOD.subnet]
    assert "bytes of JSON" in view.errors["198.19.3.0/24"]


def test_an_overwrite_of_a_running_lease_is_refused_the_accepted_one_kept() -> None:
    running = GOOD.with_expiration(2000.0)
    forged = lease("198.19.2.0/24", "198.18.0.9")
    ctx = TrustContext(CONFIG, HOST, OWN, CTX.underlay_networks, backend_data_problem, 1000.0)
    view = validate_view([forged], ctx, previous={running.subnet: running})
    assert view.peers == {running.subnet: running}
    assert "overwrote the running lease" in view.errors["198.19.2.0/24"]
    # Once the accepted lease has expired, the new holder is a legitimate successor.
    later = TrustContext(CONFIG, HOST, OWN, CTX.underlay_networks, backend_data_problem, 3000.0)
    assert validate_view([forged], later, previous={running.subnet: running}).peers == {
        forged.subnet: forged}


# --- the per-lease validation memo: memoised passes equal uncached ones -----------------

A = lease("198.19.2.0/24", "198.18.0.2")
B = lease("198.19.3.0/24", "198.18.0.3")
B_SAME_IP_AS_A = lease("198.19.3.0/24", "198.18.0.2")
C_SAME_IP_AS_A = lease("198.19.4.0/24", "198.18.0.2")
BAD_MAC = lease("198.19.5.0/24", "198.18.0.5", data={"VtepMAC": "zz"})
FIXED_MAC = lease("198.19.5.0/24", "198.18.0.5")
RENEWED_A = dataclasses.replace(A, expiration=123.0)

# Each step is the whole lease table the agent holds after one store event.
SEQUENCES = {
    "add, change, remove": [[A], [A, B], [A, dataclasses.replace(B, backend_data={
        "VtepMAC": "02:00:00:00:00:09"})], [A]],
    "a bad record, then fixed": [[A, BAD_MAC], [A, FIXED_MAC], [A, BAD_MAC]],
    "a second claim on A's IP loses, then wins when A goes": [
        [A], [A, B_SAME_IP_AS_A], [B_SAME_IP_AS_A]],
    "two new claims on one IP: neither, then one": [
        [B_SAME_IP_AS_A, C_SAME_IP_AS_A], [C_SAME_IP_AS_A]],
    "a renewal (new expiry) and a subnet moving": [
        [A, B], [RENEWED_A, B], [RENEWED_A, lease("198.19.3.0/24", "198.18.0.7")]],
    "own subnet in the table": [[A, lease("198.19.1.0/24", "198.18.0.9")], [A]],
}


@pytest.mark.parametrize("steps", SEQUENCES.values(), ids=SEQUENCES.keys())
def test_memoised_views_equal_uncached_views(steps: list[list[Lease]]) -> None:
    memo = ViewKeeper()
    cached_prev: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, Lease] = {}
    plain_prev: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, Lease] = {}
    for table in steps:
        cached = memo.full(table, CTX, previous=cached_prev)
        plain = validate_view(table, CTX, previous=plain_prev)
        assert cached == plain
        cached_prev, plain_prev = cached.peers, plain.peers


def test_a_new_trust_context_forgets_the_answers() -> None:
    memo = ViewKeeper()
    assert memo.full([A], CTX).peers == {A.subnet: A}
    # This host's own address is A's now: A's answer must be checked again, not reused.
    moved = dataclasses.replace(CTX, host_ip=A.public_ip)
    view = memo.full([A], moved)
    assert "own address" in view.errors[str(A.subnet)]


def test_an_unchanged_lease_is_not_checked_again() -> None:
    calls: list[str] = []

    def counting(backend: str, data: object) -> str | None:
        calls.append(backend)
        return CTX.data_problem(backend, data)  # type: ignore[arg-type]

    ctx = dataclasses.replace(CTX, data_problem=counting)
    memo = ViewKeeper()
    table = [lease(f"198.19.{i}.0/24", f"198.18.0.{i}") for i in range(2, 52)]
    memo.full(table, ctx)
    assert len(calls) == 50
    table[7] = dataclasses.replace(table[7], backend_data={"VtepMAC": "02:00:00:00:00:07"})
    view = memo.full(table, ctx)
    assert len(calls) == 51  # only the changed lease
    assert view.peers[table[7].subnet] == table[7]


def test_the_clock_moving_keeps_the_answers() -> None:
    calls: list[str] = []

    def counting(backend: str, data: object) -> str | None:
        calls.append(backend)
        return CTX.data_problem(backend, data)  # type: ignore[arg-type]

    memo = ViewKeeper()
    memo.full([A, B], dataclasses.replace(CTX, data_problem=counting, now=1.0))
    memo.full([A, B], dataclasses.replace(CTX, data_problem=counting, now=2.0))
    assert len(calls) == 2  # every pass has a new `now`; no lease was checked twice


# --- the view kept by difference: a store event's update equals a full pass -------------

RUNNING_A = A.with_expiration(2000.0)
FORGED_A = dataclasses.replace(lease("198.19.2.0/24", "198.18.0.9"), expiration=5000.0)
B_MOVES_TO_A_IP = dataclasses.replace(B_SAME_IP_AS_A, expiration=5000.0)

# Each step: the whole lease table after one store event, and the clock at that pass.
TIMED: dict[str, list[tuple[list[Lease], float]]] = {
    **{name: [(table, 0.0) for table in steps] for name, steps in SEQUENCES.items()},
    "an overwrite refused while the accepted lease runs, accepted once it has expired": [
        ([RUNNING_A, B], 1000.0), ([FORGED_A, B], 1000.0), ([FORGED_A, B], 1500.0),
        ([FORGED_A, B], 3000.0)],
    "a peer moves onto a running peer's address: the running one keeps it": [
        ([A, B], 0.0), ([A, B_MOVES_TO_A_IP], 0.0), ([B_MOVES_TO_A_IP], 0.0)],
    "three claims on one address, the held one goes, then another": [
        ([A], 0.0), ([A, B_SAME_IP_AS_A, C_SAME_IP_AS_A], 0.0),
        ([B_SAME_IP_AS_A, C_SAME_IP_AS_A], 0.0), ([C_SAME_IP_AS_A], 0.0)],
    "a duplicate claim turns bad, then good again": [
        ([A, B_SAME_IP_AS_A], 0.0),
        ([A, dataclasses.replace(B_SAME_IP_AS_A, backend_data={"VtepMAC": "zz"})], 0.0),
        ([A, B_SAME_IP_AS_A], 0.0), ([B_SAME_IP_AS_A], 0.0)],
    "renewals of a peer, a bad record and a duplicate": [
        ([A, BAD_MAC, B_SAME_IP_AS_A], 0.0),
        ([RENEWED_A, dataclasses.replace(BAD_MAC, expiration=9.0),
          dataclasses.replace(B_SAME_IP_AS_A, expiration=9.0)], 0.0)],
}


def _named(before: dict[Any, Lease], after: dict[Any, Lease]) -> set[Any]:
    """The subnets a store's events name between two tables (a renewal names its own)."""
    return {s for s in before.keys() | after.keys() if before.get(s) is not after.get(s)}


def _check_updates_equal_full_passes(steps: list[tuple[list[Lease], float]]) -> None:
    keeper = ViewKeeper()
    table: dict[Any, Lease] = {}
    plain = keeper.full([], CTX)
    for leases, now in steps:
        new = {x.subnet: x for x in leases}
        ctx = dataclasses.replace(CTX, now=now)
        kept, touched = keeper.update(new, _named(table, new), ctx)
        expected = validate_view(new.values(), ctx, previous=plain.peers)
        assert kept == expected
        assert touched is not None
        # Outside the touched subnets, nothing differs from the last view.
        assert {s for s in plain.peers.keys() | kept.peers.keys()
                if plain.peers.get(s) != kept.peers.get(s)} <= touched
        table, plain = new, expected


@pytest.mark.parametrize("steps", TIMED.values(), ids=TIMED.keys())
def test_updates_by_difference_equal_full_passes(steps: list[tuple[list[Lease], float]]) -> None:
    _check_updates_equal_full_passes(steps)


def test_an_update_checks_only_the_changed_lease() -> None:
    calls: list[str] = []

    def counting(backend: str, data: object) -> str | None:
        calls.append(backend)
        return CTX.data_problem(backend, data)  # type: ignore[arg-type]

    ctx = dataclasses.replace(CTX, data_problem=counting)
    keeper = ViewKeeper()
    table = {x.subnet: x for x in (lease(f"198.19.{i}.0/24", f"198.18.0.{i}")
                                   for i in range(2, 52))}
    keeper.full(table.values(), ctx)
    changed = dataclasses.replace(table[A.subnet], backend_data={"VtepMAC": "02:00:00:00:00:07"})
    table[A.subnet] = changed
    view, touched = keeper.update(table, {A.subnet}, ctx)
    assert len(calls) == 51
    assert touched == {A.subnet}
    assert view.peers[A.subnet] is changed


def test_a_new_trust_context_makes_the_update_a_full_pass() -> None:
    keeper = ViewKeeper()
    keeper.full([A], CTX)
    view, touched = keeper.update({A.subnet: A}, set(), dataclasses.replace(CTX, host_ip=A.public_ip))
    assert touched is None
    assert "own address" in view.errors[str(A.subnet)]


_SUBNETS = [f"198.19.{i}.0/24" for i in (1, 2, 3, 4, 5)]  # 198.19.1.0/24 is this host's
_IPS = ["198.18.0.2", "198.18.0.3", "198.18.0.4", "198.18.0.1"]  # the last is this host's
_MACS = [MAC, "02:00:00:00:00:09", "zz"]
_record = st.builds(lambda s, ip, mac, exp: dataclasses.replace(
    lease(s, ip, data={"VtepMAC": mac}), expiration=exp), st.sampled_from(_SUBNETS),
    st.sampled_from(_IPS), st.sampled_from(_MACS), st.sampled_from([0.0, 50.0, 500.0]))
_step = st.tuples(st.lists(st.one_of(_record, st.sampled_from(_SUBNETS)), max_size=4),
                  st.sampled_from([0.0, 10.0, 100.0, 1000.0]))


@settings(max_examples=300, deadline=None)
@given(st.lists(_step, min_size=1, max_size=8))
def test_random_event_sequences_updated_by_difference_equal_full_passes(
        events: list[tuple[list[Lease | str], float]]) -> None:
    table: dict[Any, Lease] = {}
    steps: list[tuple[list[Lease], float]] = []
    for batch, now in sorted(events, key=lambda e: e[1]):  # the clock only moves forward
        for event in batch:
            if isinstance(event, str):
                table.pop(ipaddress.ip_network(event), None)  # a delete
            else:
                table[event.subnet] = event
        steps.append((list(table.values()), now))
    _check_updates_equal_full_passes(steps)
