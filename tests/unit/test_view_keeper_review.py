"""Review of the view kept by difference (issue #14): hostile and random store event
sequences, where a store event's update must give what a fresh full pass gives, a later
full pass must repair nothing, and the ingress plan kept by difference must equal the
plan built from the whole view."""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ingress_plans import ingress_plan_for
from weft.backends.registry import backend_data_problem, parse_config
from weft.core.events import EventKind, LeaseEvent, apply_events, changes_data, diff_peers
from weft.core.lease import Lease, same_peer
from weft.core.validate import (
    TrustContext,
    ValidatedView,
    ViewKeeper,
    validate_view,
)
from weft.host.ingress_rules import ingress_update

CONFIG = parse_config('{"Network": "198.19.0.0/16", "SubnetLen": 24, "SubnetMin": "198.19.1.0",'
                      ' "SubnetMax": "198.19.200.0", "Backend": {"Type": "udp"}}')
HOST = ipaddress.ip_address("198.18.0.1")
OWN_SUBNET = ipaddress.ip_network("198.19.1.0/24")
OWN = Lease(OWN_SUBNET, HOST, "udp", {"Port": 8285})
CTX = TrustContext(CONFIG, HOST, OWN_SUBNET, (ipaddress.ip_network("198.18.0.0/24"),),
                   backend_data_problem)
MAC = "02:00:00:00:00:02"


def udp(subnet: str, ip: str, port: Any = 8285, expiration: float = 0.0) -> Lease:
    return Lease(ipaddress.ip_network(subnet), ipaddress.ip_address(ip), "udp",
                 {"Port": port}, expiration)


def test_a_port_turned_true_is_refused_by_an_update_as_by_a_fresh_pass() -> None:
    """Found in review: `_same_record` compares BackendData with ==, and in Python True == 1 and
    8285.0 == 8285: a record changing {"Port": 1} to {"Port": true} is taken for a renewal
    (the candidate swapped in unchecked), and a full pass reuses the memoised answer, so
    the periodic resync never refuses it either; a fresh pass does."""
    keeper = ViewKeeper()
    good = udp("198.19.2.0/24", "198.18.0.2", 1)
    keeper.full([good], CTX)
    hostile = udp("198.19.2.0/24", "198.18.0.2", True)
    kept, _ = keeper.update({hostile.subnet: hostile}, {hostile.subnet}, CTX)
    fresh = validate_view([hostile], CTX, previous={good.subnet: good})
    assert "not a UDP port" in fresh.errors[str(hostile.subnet)]
    assert kept == fresh
    # The agent's periodic full pass (same keeper, same trust context) must refuse it too.
    assert keeper.full([hostile], CTX) == fresh


def test_a_float_port_is_refused_by_an_update_as_by_a_fresh_pass() -> None:
    """Found in review (same cause): 8285 -> 8285.0 is accepted as an unchanged record."""
    keeper = ViewKeeper()
    good = udp("198.19.2.0/24", "198.18.0.2")
    keeper.full([good], CTX)
    hostile = udp("198.19.2.0/24", "198.18.0.2", 8285.0)
    kept, _ = keeper.update({hostile.subnet: hostile}, {hostile.subnet}, CTX)
    assert kept == validate_view([hostile], CTX, previous={good.subnet: good})


def test_a_port_turned_true_is_a_data_change_for_the_watch_and_the_diff() -> None:
    """Found in review (same cause, weft.core.events._same_peer): the watch sees no data change,
    requests no pass, and diff_peers reports nothing, so the backend is never told."""
    good = udp("198.19.2.0/24", "198.18.0.2", 1)
    hostile = udp("198.19.2.0/24", "198.18.0.2", True)
    event = LeaseEvent(EventKind.PUT, hostile.subnet, 2, hostile)
    assert changes_data({good.subnet: good}, [event])
    assert diff_peers({good.subnet: good}, {hostile.subnet: hostile}).changed == (hostile,)


# --- random hostile sequences ------------------------------------------------------------

_SUBNETS = ["198.19.1.0/24",  # this host's
            "198.19.2.0/24", "198.19.3.0/24", "198.19.4.0/24", "198.19.5.0/24",
            "198.19.250.0/24",  # outside SubnetMin..SubnetMax
            "198.19.6.0/25",    # not a /24
            "10.9.0.0/24",      # outside the Network
            "2001:db8::/64"]    # another IP version
_IPS = ["198.18.0.2", "198.18.0.3", "198.18.0.4",
        "198.18.0.1",   # this host's
        "198.19.9.9",   # inside the overlay
        "224.0.0.5",    # not unicast
        "2001:db8::3"]  # another IP version
_DATA: list[tuple[str, dict[str, Any]]] = [
    ("udp", {"Port": 8285}), ("udp", {"Port": 8286}), ("udp", {"Port": 0}),
    ("udp", {}), ("vxlan", {"VtepMAC": MAC}), ("vxlan", {"VtepMAC": "zz"}),
    ("carrier-pigeon", {}),
]
_record = st.builds(
    lambda s, ip, data, exp: Lease(ipaddress.ip_network(s), ipaddress.ip_address(ip),
                                   data[0], dict(data[1]), exp),
    st.sampled_from(_SUBNETS), st.sampled_from(_IPS), st.sampled_from(_DATA),
    st.sampled_from([0.0, 50.0, 500.0, 5000.0]))
_batch = st.tuples(st.lists(st.one_of(_record, st.sampled_from(_SUBNETS)), max_size=5),
                   st.sampled_from([0.0, 10.0, 100.0, 1000.0, 10000.0]))
# The trust contexts a run may pass through: this host re-leased onto another subnet, or
# its underlay address moved onto a peer's.
_CTXS = [CTX, dataclasses.replace(CTX, own_subnet=ipaddress.ip_network("198.19.2.0/24")),
         dataclasses.replace(CTX, host_ip=ipaddress.ip_address("198.18.0.2"))]


def _tables(events: list[tuple[list[Lease | str], float]]) -> list[tuple[dict[Any, Lease],
                                                                          set[Any], float]]:
    table: dict[Any, Lease] = {}
    steps = []
    for batch, now in sorted(events, key=lambda e: e[1]):
        named: set[Any] = set()
        for event in batch:
            if isinstance(event, str):
                subnet = ipaddress.ip_network(event)
                table.pop(subnet, None)
            else:
                subnet = event.subnet
                table[subnet] = event
            named.add(subnet)
        steps.append((dict(table), named, now))
    return steps


@settings(max_examples=300, deadline=None)
@given(st.lists(_batch, min_size=1, max_size=10),
       st.lists(st.sampled_from(range(len(_CTXS))), min_size=10, max_size=10))
def test_trust_context_changes_mid_sequence_equal_fresh_full_passes(
        events: list[tuple[list[Lease | str], float]], which: list[int]) -> None:
    keeper = ViewKeeper()
    view = keeper.full([], CTX)
    for (table, named, now), i in zip(_tables(events), which, strict=False):
        ctx = dataclasses.replace(_CTXS[i], now=now)
        kept, _ = keeper.update(table, named, ctx)
        assert kept == validate_view(table.values(), ctx, previous=view.peers)
        assert validate_view(table.values(), ctx, previous=kept.peers) == kept
        view = kept


@settings(max_examples=400, deadline=None)
@given(st.lists(_batch, min_size=1, max_size=10))
def test_hostile_sequences_an_update_equals_a_fresh_full_pass_and_a_resync_repairs_nothing(
        events: list[tuple[list[Lease | str], float]]) -> None:
    keeper = ViewKeeper()
    view = keeper.full([], CTX)
    plan = ingress_plan_for(CONFIG, HOST, OWN, [])
    for table, named, now in _tables(events):
        ctx = dataclasses.replace(CTX, now=now)
        before = view
        kept, touched = keeper.update(table, named, ctx)
        assert touched is not None
        # What a fresh validator (no memo) gives from the same history.
        assert kept == validate_view(table.values(), ctx, previous=before.peers)
        # The periodic full pass, from a fresh keeper, changes nothing.
        assert validate_view(table.values(), ctx, previous=kept.peers) == kept
        # The agent's store-event diff (among the touched) is the whole diff.
        assert _sets(diff_peers(before.peers, kept.peers, touched)) == _sets(
            diff_peers(before.peers, kept.peers))
        plan = _ingress_step(plan, before, kept, touched)
        view = kept


def _sets(diff: Any) -> tuple[set[Any], ...]:
    return (set(map(repr, diff.added)), set(map(repr, diff.removed)),
            set(map(repr, diff.changed)))


def _ingress_step(plan: Any, before: ValidatedView, after: ValidatedView,
                  touched: set[Any]) -> Any:
    diff = diff_peers(before.peers, after.peers, touched)
    old = [before.peers[s] for s in diff.subnets() if s in before.peers]
    new = [after.peers[s] for s in diff.subnets() if s in after.peers]
    updated = ingress_update(CONFIG, HOST, plan, old, new)
    assert updated == ingress_plan_for(CONFIG, HOST, OWN, after.peers.values())
    return updated


# --- found by reading; not regressions of #14 (main's validate_view did the same) ------

def test_a_subnet_released_and_retaken_between_two_passes_is_the_new_holders() -> None:
    """Found in review (pre-existing, likelier with coalesced passes): the resulting table
    alone makes a DELETE (release) and the next host's create-if-absent PUT in one pass look
    like an overwrite of the running lease, which kept the released host's old lease a peer
    until its old expiry. The agent passes the subnets its watch saw deleted."""
    running = udp("198.19.2.0/24", "198.18.0.2", expiration=5000.0)
    successor = udp("198.19.2.0/24", "198.18.0.3", expiration=9000.0)
    ctx = dataclasses.replace(CTX, now=1000.0)
    keeper = ViewKeeper()
    keeper.full([running], ctx)
    events = [LeaseEvent(EventKind.DELETE, running.subnet, 2),
              LeaseEvent(EventKind.PUT, successor.subnet, 3, successor)]
    table = apply_events({running.subnet: running}, events)
    view, _ = keeper.update(table, {e.subnet for e in events}, ctx, released={running.subnet})
    assert view.peers == {successor.subnet: successor}
    # A full pass told the same (a resync landing on the pair) agrees.
    again = ViewKeeper()
    again.full([running], ctx)
    assert again.full(table.values(), ctx, released={running.subnet}).peers == view.peers
    # Without the release in between, the same table is an overwrite, refused.
    keeper = ViewKeeper()
    keeper.full([running], ctx)
    refused, _ = keeper.update({successor.subnet: successor}, {successor.subnet}, ctx)
    assert refused.peers == {running.subnet: running}
    assert "overwrote the running lease" in refused.errors[str(running.subnet)]


def test_many_claims_on_one_address_cost_linear_error_text() -> None:
    """Found in review (pre-existing in main, and it breaks "a store event costs what it changed"):
    each of k claims on one PublicIP names all the others, O(k^2) text rebuilt on every
    event touching that address: measured 3,000 forged records = 161 MB of error strings,
    18 s a full pass and 15 s a single store event (a store writer's DoS, then OOM)."""
    config = parse_config('{"Network": "198.19.0.0/16", "SubnetLen": 28,'
                          ' "Backend": {"Type": "udp"}}')
    ctx = TrustContext(config, HOST, None, (), backend_data_problem)
    subnets = list(ipaddress.IPv4Network("198.19.0.0/16").subnets(new_prefix=28))[1:1001]
    forged = [Lease(s, ipaddress.ip_address("198.18.0.2"), "udp", {}) for s in subnets]
    view = ViewKeeper().full(forged, ctx)
    assert len(view.errors) == len(forged)
    assert max(map(len, view.errors.values())) < 300


def test_same_peer_compares_backend_data_type_for_type() -> None:
    def with_data(data: dict[str, Any]) -> Lease:
        return Lease(OWN_SUBNET, HOST, "udp", data, 1.0)

    same = with_data({"Port": 1, "X": [1, {"a": 2.5}]})
    assert same_peer(same, dataclasses.replace(same, expiration=2.0))
    assert same_peer(with_data({"a": 1, "b": 2}), with_data({"b": 2, "a": 1}))
    for other in ({"Port": True, "X": [1, {"a": 2.5}]}, {"Port": 1.0, "X": [1, {"a": 2.5}]},
                  {"Port": 1, "X": [True, {"a": 2.5}]}, {"Port": 1, "X": [1, {"a": 2.5}], "Y": 0}):
        assert not same_peer(same, with_data(other)), other
