"""auto's plan: which data plane each peer gets, and the kernel state for all of them. Pure.

Every host receives on every plane (VXLAN device, udp forwarder, plain routes), so only
the sending side is chosen, per peer. Per plane there is one routing table holding a
route to every peer through that plane; a probe socket marked for the plane uses it, so
each plane is probed for each peer whatever the main table uses. The main table holds,
per peer, the route of the plane chosen for it.

Choice per peer, in order: host-gw if the peer is on this host's L2 subnet, else vxlan,
else udp, each only while its probes are answered (`step` is the state machine; time is
the caller's: one call per probe round).

In dual stack, per peer and per family: a peer's IPv6 subnet rides the plane chosen for
it where that plane can carry it, else the next candidate that can (host-gw needs the
peer's IPv6 address on this host's segment; vxlan and udp carry both families).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from weft.backends.auto.options import AUTO_TABLES, DATA_KEYS, PLANES, AutoOptions
from weft.backends.routes import direct_ipv6_route, direct_route
from weft.backends.udp import plan as udp_plan
from weft.backends.vxlan import plan as vxlan_plan
from weft.backends.vxlan.options import VxlanOptions
from weft.core.config import IPAddress, IPNetwork
from weft.core.dataplane import FdbEntry, Neighbour, Route
from weft.core.host import UnderlayFacts
from weft.core.lease import Lease

# --- the selection state machine ----------------------------------------------------------


@dataclass(frozen=True)
class PlaneHealth:
    """One plane towards one peer. Usable from the start (a new peer is used at once on
    its best plane); `misses` consecutive unanswered probes make it unusable, `answers`
    consecutive answers make it usable again."""

    usable: bool = True
    misses: int = 0
    answers: int = 0
    sent: int = 0
    answered: int = 0
    small_answered: bool = False  # the last round's small probe (while full ones miss)


def observe(health: PlaneHealth, answered: bool, misses_to_drop: int,
            answers_to_return: int, small: bool = False) -> PlaneHealth:
    """The plane's health after one probe round: its full-size probe answered or not
    (and whether the small one beside it was)."""
    if answered:
        answers = health.answers + 1
        usable = health.usable or answers >= answers_to_return
        return PlaneHealth(usable, 0, answers, health.sent + 1, health.answered + 1, small)
    misses = health.misses + 1
    usable = health.usable and misses < misses_to_drop
    return PlaneHealth(usable, misses, 0, health.sent + 1, health.answered, small)


def why_not(plane: str, health: PlaneHealth) -> str:
    """Why a plane is not used, for status."""
    if health.small_answered:
        return f"{plane} (full-size probes unanswered, small ones answered: path MTU too small)"
    return f"{plane} (probes unanswered)"


@dataclass(frozen=True)
class PeerPath:
    """The data plane of one peer: its candidates in order, their health, the choice."""

    candidates: tuple[str, ...]
    health: Mapping[str, PlaneHealth]
    plane: str | None
    reason: str
    switches: int = 0


def candidates(peer: Lease, underlay: UnderlayFacts) -> tuple[str, ...]:
    """The planes this host may use towards `peer`, fastest first."""
    out = []
    for plane in PLANES:
        if DATA_KEYS[plane] not in peer.backend_data:
            continue
        if plane == "host-gw" and not underlay.on_link(peer.public_ip):
            continue
        out.append(plane)
    return tuple(out)


def _choose(cands: tuple[str, ...], health: Mapping[str, PlaneHealth],
            current: str | None) -> tuple[str | None, str]:
    for i, plane in enumerate(cands):
        if health[plane].usable:
            if i > 0:
                return plane, ("fell back: " + ", ".join(why_not(p, health[p])
                                                          for p in cands[:i]))
            if plane == "host-gw":
                return plane, "same L2 subnet, probes answered"
            return plane, "probes answered"
    if not cands:
        return None, "no data plane in common"
    # No plane answers (the peer's agent is down, or the peer is gone): keep what is in
    # place rather than move the pair for nothing; probes go on.
    keep = current if current in cands else cands[0]
    return keep, ("no plane answers full-size probes; kept " + keep + ": "
                  + ", ".join(why_not(p, health[p]) for p in cands))


def initial(cands: tuple[str, ...]) -> PeerPath:
    health = {plane: PlaneHealth() for plane in cands}
    plane, reason = _choose(cands, health, None)
    return PeerPath(cands, health, plane, reason)


def rebase(path: PeerPath | None, cands: tuple[str, ...]) -> PeerPath:
    """A peer's path after its lease (or this host's underlay) changed: planes it keeps
    keep their health; new ones start usable."""
    if path is None:
        return initial(cands)
    if path.candidates == cands:
        return path
    health = {p: path.health.get(p, PlaneHealth()) for p in cands}
    plane, reason = _choose(cands, health, path.plane)
    return PeerPath(cands, health, plane, reason,
                    path.switches + (plane != path.plane and path.plane is not None))


def step(path: PeerPath, answered: Mapping[str, tuple[bool, bool]], misses_to_drop: int,
         answers_to_return: int) -> PeerPath:
    """One probe round for one peer: per probed plane, (full-size answered, small
    answered). Only this peer's path changes; another pair's state never moves it."""
    health = dict(path.health)
    for probed, (ok, small) in answered.items():
        if probed in health:
            health[probed] = observe(health[probed], ok, misses_to_drop, answers_to_return,
                                     small)
    plane, reason = _choose(path.candidates, health, path.plane)
    switches = path.switches + (plane != path.plane)
    return replace(path, health=health, plane=plane, reason=reason, switches=switches)


# --- the kernel state -------------------------------------------------------------------


def plane_lease(peer: Lease, plane: str) -> Lease:
    """The peer's lease as its `plane` backend alone would publish it."""
    data = peer.backend_data.get(DATA_KEYS[plane], {})
    v6 = peer.backend_v6_data
    v6_data = None if v6 is None else dict(v6.get(DATA_KEYS[plane], data))
    return replace(peer, backend_type=plane, backend_data=dict(data), backend_v6_data=v6_data)


@dataclass(frozen=True)
class AutoFacts:
    vxlan_index: int
    udp_index: int
    underlay: UnderlayFacts


@dataclass(frozen=True)
class AutoPlan:
    main: frozenset[Route]                       # per peer: the chosen plane's route
    tables: Mapping[str, frozenset[Route]]       # per plane: a route to every peer
    fdb: frozenset[FdbEntry]
    neighbours: frozenset[Neighbour]
    udp_peers: udp_plan.PeerTable
    errors: Mapping[str, str] = field(default_factory=dict)
    # Dual stack: the plane each peer's IPv6 subnet rides (by its IPv4 subnet).
    ipv6_planes: Mapping[IPNetwork, str | None] = field(default_factory=dict)


def plan(options: AutoOptions, peers: Sequence[Lease], paths: Mapping[IPNetwork, PeerPath],
         facts: AutoFacts, *, own_ip: IPAddress, version: int, subnet_len: int,
         ipv6_subnet_len: int | None = None) -> AutoPlan:
    errors: dict[str, str] = {}
    by_plane: dict[str, list[Lease]] = {plane: [] for plane in PLANES}
    for peer in peers:
        path = paths.get(peer.subnet)
        if path is None or not path.candidates:
            errors[str(peer.subnet)] = (f"peer {peer.public_ip} shares no data plane with "
                                        "this host")
            continue
        for plane in path.candidates:
            by_plane[plane].append(plane_lease(peer, plane))
    vx_options = VxlanOptions(VNI=options.vni, Port=options.vxlan_port)
    vx = vxlan_plan.plan(vx_options, by_plane["vxlan"],
                         vxlan_plan.VxlanFacts(facts.vxlan_index, facts.underlay))
    errors.update(vx.errors)
    udp = udp_plan.plan(by_plane["udp"], own_ip=own_ip, default_port=options.udp_port,
                        version=version, subnet_len=subnet_len, ipv6_subnet_len=ipv6_subnet_len)
    errors.update(udp.errors)
    tables: dict[str, set[Route]] = {"host-gw": set(), "vxlan": set(vx.routes), "udp": set()}
    for lease in by_plane["host-gw"]:
        found = [direct_route(lease, facts.underlay)]
        if lease.ipv6_subnet is not None:  # only where an IPv6 next hop is on the segment
            found.append(direct_ipv6_route(lease, facts.underlay))
        tables["host-gw"].update(route for route in found if isinstance(route, Route))
    for lease in by_plane["udp"]:
        if str(lease.subnet) not in udp.errors:
            tables["udp"].update(Route(subnet, None, facts.udp_index)
                                 for subnet in lease.subnets)
    main: set[Route] = set()
    ipv6_planes: dict[IPNetwork, str | None] = {}
    for peer in peers:
        path = paths.get(peer.subnet)
        if path is None or path.plane is None:
            continue
        main |= {r for r in tables[path.plane] if r.dst == peer.subnet}
        if peer.ipv6_subnet is not None:
            plane6, route = _ipv6_plane(peer.ipv6_subnet, path, tables)
            ipv6_planes[peer.subnet] = plane6
            if route is not None:
                main.add(route)
    in_tables = {p: frozenset(replace(r, table=AUTO_TABLES[p]) for r in routes)
                 for p, routes in tables.items()}
    return AutoPlan(frozenset(main), in_tables,
                    vx.fdb, vx.neighbours, udp.table, errors, ipv6_planes)


def _ipv6_plane(subnet: IPNetwork, path: PeerPath, tables: Mapping[str, set[Route]]
                ) -> tuple[str | None, Route | None]:
    """The plane a peer's IPv6 subnet rides: the one chosen for the peer if it carries the
    subnet, else the next usable candidate after it that does."""
    assert path.plane is not None
    start = path.candidates.index(path.plane)
    for plane in path.candidates[start:]:
        if plane != path.plane and not path.health[plane].usable:
            continue
        route = next((r for r in tables[plane] if r.dst == subnet), None)
        if route is not None:
            return plane, route
    return None, None
