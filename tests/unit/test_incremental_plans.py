"""Incremental application equals a full reconcile: from a table of store event sequences,
the kernel tables after applying each event's incremental plan (from the changed peers
alone) are exactly the full plan of the resulting view, for vxlan (with and without
DirectRouting) and host-gw; and the agent's whole store-event path (validated, diffed and
planned by difference) equals a full pass. Also: a round of renewals changes no data."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import pytest

from ingress_plans import ingress_plan_for
from weft.backends.base import apply_delta
from weft.backends.hostgw import plan as hostgw
from weft.backends.registry import backend_data_problem, parse_config
from weft.backends.vxlan import plan as vxlan
from weft.backends.vxlan.options import VxlanOptions
from weft.core.dataplane import FdbEntry, Neighbour, Route
from weft.core.events import EventKind, LeaseEvent, apply_events, changes_data, diff_peers
from weft.core.host import UnderlayFacts
from weft.core.lease import Lease
from weft.core.validate import TrustContext, ViewKeeper, validate_view
from weft.host.ingress_rules import ingress_update

UNDERLAY = UnderlayFacts(2, (ipaddress.ip_interface("198.18.0.1/24"),))
FACTS = vxlan.VxlanFacts(7, UNDERLAY)


def lease(n: int, ip: str | None = None, mac: int | None = None, expiry: float = 0.0) -> Lease:
    return Lease(ipaddress.ip_network(f"198.19.{n}.0/24"),
                 ipaddress.ip_address(ip or f"198.18.0.{n}"), "vxlan",
                 {"VtepMAC": f"02:00:00:00:00:{mac if mac is not None else n:02x}"}, expiry)


def put(x: Lease) -> LeaseEvent:
    return LeaseEvent(EventKind.PUT, x.subnet, 0, x)


def delete(n: int) -> LeaseEvent:
    return LeaseEvent(EventKind.DELETE, ipaddress.ip_network(f"198.19.{n}.0/24"), 0)


SEQUENCES: dict[str, list[list[LeaseEvent]]] = {
    "joins one by one": [[put(lease(n))] for n in range(2, 7)],
    "a burst of joins in one batch": [[put(lease(n)) for n in range(2, 30)]],
    "join then leave": [[put(lease(2)), put(lease(3))], [delete(2)], [delete(3)]],
    "a restarted host publishes a new VTEP MAC": [[put(lease(2))], [put(lease(2, mac=0x77))]],
    "a host moves to a new public IP (off-link: vxlan encapsulates)": [
        [put(lease(2)), put(lease(3))], [put(lease(2, ip="198.18.5.2"))]],
    "a host moves back on-link": [[put(lease(2, ip="198.18.5.2"))], [put(lease(2))]],
    "delete and re-put the same lease in one batch": [
        [put(lease(2))], [delete(2), put(lease(2))]],
    "delete of an unknown lease": [[put(lease(2))], [delete(9)]],
    "renewals only": [[put(lease(2)), put(lease(3))],
                      [put(lease(2, expiry=5.0)), put(lease(3, expiry=5.0))]],
    "two peers swap VTEP MACs": [[put(lease(2)), put(lease(3))],
                                 [put(lease(2, mac=3)), put(lease(3, mac=2))]],
}

Tables = tuple[set[FdbEntry], set[Neighbour], set[Route]]


def vxlan_full(options: VxlanOptions, view: Sequence[Lease]) -> Tables:
    p = vxlan.plan(options, view, FACTS)
    return set(p.fdb), set(p.neighbours), set(p.routes)


@pytest.mark.parametrize("direct", [False, True], ids=["vxlan", "vxlan-direct-routing"])
@pytest.mark.parametrize("name", list(SEQUENCES))
def test_vxlan_incremental_equals_full(name: str, direct: bool) -> None:
    options = VxlanOptions(DirectRouting=direct)
    leases: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, Lease] = {}
    fdb: set[FdbEntry] = set()
    neighbours: set[Neighbour] = set()
    routes: set[Route] = set()
    for batch in SEQUENCES[name]:
        after = apply_events(leases, batch)
        diff = diff_peers(leases, after)
        removed = [leases[s] for s in diff.subnets() if s in leases]
        added = [after[s] for s in diff.subnets() if s in after]
        change = vxlan.incremental(options, removed, added, FACTS)
        fdb = apply_delta(fdb, change.fdb)
        neighbours = apply_delta(neighbours, change.neighbours, vxlan.neighbour_key)
        routes = apply_delta(routes, change.routes, vxlan.route_key)
        leases = after
        assert (fdb, neighbours, routes) == vxlan_full(options, list(leases.values()))


@pytest.mark.parametrize("name", list(SEQUENCES))
def test_hostgw_incremental_equals_full(name: str) -> None:
    leases: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, Lease] = {}
    routes: set[Route] = set()
    for batch in SEQUENCES[name]:
        after = apply_events(leases, batch)
        diff = diff_peers(leases, after)
        change = hostgw.incremental([leases[s] for s in diff.subnets() if s in leases],
                                    [after[s] for s in diff.subnets() if s in after], UNDERLAY)
        routes = apply_delta(routes, change.routes, hostgw.route_key)
        leases = after
        assert routes == set(hostgw.plan(list(leases.values()), UNDERLAY).routes)


def test_full_difference_against_a_dump_converges() -> None:
    """The full reconcile's plan against what a dump shows (foreign-looking stale
    entries, a neighbour with an old MAC) leaves exactly the wanted tables."""
    options = VxlanOptions()
    wanted = vxlan.plan(options, [lease(2), lease(3)], FACTS)
    actual = vxlan.plan(options, [lease(3, mac=0x99), lease(4)], FACTS)
    change = vxlan.difference(wanted, actual)
    assert apply_delta(set(actual.fdb), change.fdb) == wanted.fdb
    assert apply_delta(set(actual.neighbours), change.neighbours,
                       vxlan.neighbour_key) == wanted.neighbours
    assert apply_delta(set(actual.routes), change.routes, vxlan.route_key) == wanted.routes
    # the neighbour whose MAC changed is replaced, never deleted after its replacement
    assert not {n.ip for n in change.neighbours.remove} & {n.ip for n in change.neighbours.add}


def test_a_round_of_renewals_changes_no_data() -> None:
    view = {x.subnet: x for x in (lease(2), lease(3))}
    assert not changes_data(view, [put(lease(2, expiry=9.0)), put(lease(3, expiry=9.0))])
    assert changes_data(view, [put(lease(2, mac=0x42))])
    assert changes_data(view, [delete(3)])
    assert not changes_data(view, [delete(8)])
    assert changes_data(view, [put(lease(8))])


# --- the whole store-event path: validated, diffed and planned by difference ------------

CONFIG = parse_config('{"Network": "198.19.0.0/16", "SubnetLen": 24}')
ME = ipaddress.ip_address("198.18.0.1")
OWN = Lease(ipaddress.ip_network("198.19.1.0/24"), ME, "vxlan", {"VtepMAC": "02:00:00:00:00:01"})
TRUST = TrustContext(CONFIG, ME, OWN.subnet, (ipaddress.ip_network("198.18.0.0/24"),),
                     backend_data_problem)
PATH_SEQUENCES = {
    **SEQUENCES,
    "a second claim on a peer's address, then the peer leaves": [
        [put(lease(2)), put(lease(3))], [put(lease(4, ip="198.18.0.2"))], [delete(2)]],
    "a bad record, fixed, a renewal of it": [
        [put(lease(2)), put(Lease(lease(3).subnet, lease(3).public_ip, "vxlan",
                                  {"VtepMAC": "zz"}))], [put(lease(3))],
        [put(lease(3, expiry=9.0))]],
    "this host's own lease and a peer naming this host's address": [
        [put(OWN), put(lease(2))], [put(lease(5, ip="198.18.0.1"))]],
}


@pytest.mark.parametrize("name", list(PATH_SEQUENCES))
def test_a_store_event_path_by_difference_equals_a_full_pass(name: str) -> None:
    """What the agent does per store event (`ViewKeeper.update` of the named subnets, the
    diff among the touched ones, `vxlan.incremental`, `ingress_update`) leaves the kernel
    tables and the ingress plan of a full pass over the resulting view."""
    options = VxlanOptions()
    keeper = ViewKeeper()
    leases: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, Lease] = {}
    view = keeper.full([], TRUST)
    tables: Tables = (set(), set(), set())
    ingress = ingress_plan_for(CONFIG, ME, OWN, [])
    for batch in PATH_SEQUENCES[name]:
        leases = apply_events(leases, batch)
        new, touched = keeper.update(leases, {e.subnet for e in batch}, TRUST)
        diff = diff_peers(view.peers, new.peers, touched)
        removed = [view.peers[s] for s in diff.subnets() if s in view.peers]
        added = [new.peers[s] for s in diff.subnets() if s in new.peers]
        change = vxlan.incremental(options, removed, added, FACTS)
        tables = (apply_delta(tables[0], change.fdb),
                  apply_delta(tables[1], change.neighbours, vxlan.neighbour_key),
                  apply_delta(tables[2], change.routes, vxlan.route_key))
        ingress = ingress_update(CONFIG, ME, ingress, removed, added)
        full = validate_view(leases.values(), TRUST, previous=view.peers)
        assert new == full
        assert tables == vxlan_full(options, list(full.peers.values()))
        assert ingress == ingress_plan_for(CONFIG, ME, OWN, full.peers.values())
        view = new
