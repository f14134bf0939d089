"""host-gw's plan: one route per peer subnet via the peer's public IP. Pure.

An IPv6 subnet (a dual-stack peer's second, or an IPv6 network's) is routed via the peer's
IPv6 address on the shared segment: its PublicIPv6 when its PublicIP is IPv4."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from weft.backends.base import Delta, delta
from weft.backends.routes import direct_ipv6_route, direct_route
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
        found = [direct_route(peer, underlay)]
        if peer.ipv6_subnet is not None:
            found.append(direct_ipv6_route(peer, underlay))
        # A half that cannot be routed is that peer's error; the other half still works
        # (a mixed underlay: a host without IPv6 keeps its IPv4 peers).
        problems = [route for route in found if isinstance(route, str)]
        if problems:
            errors[str(peer.subnet)] = "; ".join(problems)
        routes.update(route for route in found if isinstance(route, Route))
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
