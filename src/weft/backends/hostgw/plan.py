"""host-gw's plan: one route per peer subnet via the peer's public IP. Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from weft.backends.base import Delta, delta
from weft.backends.routes import direct_route
from weft.core.dataplane import Route
from weft.core.host import UnderlayFacts
from weft.core.lease import Lease


@dataclass(frozen=True)
class RoutePlan:
    routes: frozenset[Route]
    errors: Mapping[str, str] = field(default_factory=dict)  # peer subnet -> why not


def plan(peers: Sequence[Lease], underlay: UnderlayFacts) -> RoutePlan:
    routes: set[Route] = set()
    errors: dict[str, str] = {}
    for peer in peers:
        route = direct_route(peer, underlay)
        if isinstance(route, str):
            errors[str(peer.subnet)] = route
        else:
            routes.add(route)
    return RoutePlan(frozenset(routes), errors)


def route_key(r: Route) -> object:
    return r.dst  # `replace` keeps one weft route per destination


@dataclass(frozen=True)
class RouteDelta:
    routes: Delta[Route]
    errors: Mapping[str, str] = field(default_factory=dict)


def difference(wanted: RoutePlan, actual: frozenset[Route] | set[Route]) -> RouteDelta:
    return RouteDelta(delta(wanted.routes, frozenset(actual), route_key), wanted.errors)


def incremental(removed: Sequence[Lease], added: Sequence[Lease],
                underlay: UnderlayFacts) -> RouteDelta:
    """The change a store event makes, from the changed peers alone (one route each)."""
    return difference(plan(added, underlay), plan(removed, underlay).routes)
