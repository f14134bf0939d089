"""auto's pure parts: the per-peer selection state machine (a table of probe outcomes ->
chosen plane), the plan's tables, the probe wire format and the lease data check."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import pytest

from weft.backends.auto import plan, wire
from weft.backends.auto.options import AUTO_TABLES, AutoOptions, auto_data_problem, auto_overhead
from weft.backends.registry import backend_data_problem, overlay_mtu, parse_config
from weft.core.dataplane import Route
from weft.core.host import UnderlayFacts
from weft.core.lease import Lease

UNDERLAY = UnderlayFacts(2, (ipaddress.ip_interface("198.18.0.11/24"),))
MAC = "02:00:00:00:00:0a"
DATA = {"hostgw": {}, "vxlan": {"VtepMAC": MAC, "Port": 8472}, "udp": {"Port": 8285}}
ALL = ("host-gw", "vxlan", "udp")
OK, MISS, SMALL_ONLY = (True, True), (False, False), (False, True)


def peer(ip: str = "198.18.0.12", subnet: str = "198.19.2.0/24",
         data: dict[str, object] | None = None) -> Lease:
    return Lease(ipaddress.ip_network(subnet), ipaddress.ip_address(ip), "auto",
                 DATA if data is None else data)


def run(cands: tuple[str, ...], rounds: Sequence[dict[str, tuple[bool, bool]]],
        misses: int = 3, answers: int = 5) -> list[str | None]:
    path = plan.initial(cands)
    chosen = []
    for outcome in rounds:
        path = plan.step(path, outcome, misses, answers)
        chosen.append(path.plane)
    return chosen


def test_candidates_host_gw_only_on_the_same_l2_subnet() -> None:
    assert plan.candidates(peer(), UNDERLAY) == ALL
    assert plan.candidates(peer("198.18.1.13"), UNDERLAY) == ("vxlan", "udp")
    assert plan.candidates(peer(data={"udp": {}}), UNDERLAY) == ("udp",)
    assert plan.candidates(peer(data={"wireguard": {}}), UNDERLAY) == ()


@pytest.mark.parametrize(("rounds", "expected"), [
    # all answered: the fastest plane throughout
    ([{"vxlan": OK, "udp": OK}] * 3, ["vxlan"] * 3),
    # vxlan stops answering: two misses are tolerated, the third moves the pair
    ([{"vxlan": MISS, "udp": OK}] * 4, ["vxlan", "vxlan", "udp", "udp"]),
    # a miss between answers resets the count: no move
    ([{"vxlan": MISS, "udp": OK}, {"vxlan": MISS, "udp": OK}, {"vxlan": OK, "udp": OK},
      {"vxlan": MISS, "udp": OK}, {"vxlan": MISS, "udp": OK}], ["vxlan"] * 5),
    # back only after 5 consecutive answers
    ([{"vxlan": MISS, "udp": OK}] * 3 + [{"vxlan": OK, "udp": OK}] * 5,
     ["vxlan", "vxlan"] + ["udp"] * 5 + ["vxlan"]),
    # nothing answers (the peer's agent is down): keep the plane in place
    ([{"vxlan": MISS, "udp": MISS}] * 5, ["vxlan"] * 5),
    # a path MTU black hole on vxlan (small probes pass): still a fallback
    ([{"vxlan": SMALL_ONLY, "udp": OK}] * 3, ["vxlan", "vxlan", "udp"]),
])
def test_selection_table(rounds: list[dict[str, tuple[bool, bool]]],
                         expected: list[str]) -> None:
    assert run(("vxlan", "udp"), rounds) == expected


def test_host_gw_falls_to_vxlan_then_udp_and_reasons_say_why() -> None:
    path = plan.initial(ALL)
    assert (path.plane, path.reason) == ("host-gw", "same L2 subnet, probes answered")
    for _ in range(3):
        path = plan.step(path, {"host-gw": MISS, "vxlan": SMALL_ONLY, "udp": OK}, 3, 5)
    assert path.plane == "udp"
    assert path.switches == 1
    assert "host-gw (probes unanswered)" in path.reason
    assert "vxlan (full-size probes unanswered, small ones answered" in path.reason
    assert path.health["udp"].sent == 3


def test_rebase_keeps_health_of_kept_planes() -> None:
    path = plan.initial(("vxlan", "udp"))
    for _ in range(3):
        path = plan.step(path, {"vxlan": MISS, "udp": OK}, 3, 5)
    again = plan.rebase(path, ("vxlan", "udp"))
    assert again is path
    moved = plan.rebase(path, ("host-gw", "vxlan", "udp"))  # now on the same segment
    assert moved.plane == "host-gw"
    assert not moved.health["vxlan"].usable


def test_plan_one_route_per_plane_table_and_the_chosen_one_in_main() -> None:
    near, far = peer(), peer("198.18.1.13", "198.19.3.0/24")
    paths = {p.subnet: plan.initial(plan.candidates(p, UNDERLAY)) for p in (near, far)}
    facts = plan.AutoFacts(vxlan_index=7, udp_index=8, underlay=UNDERLAY)
    got = plan.plan(AutoOptions(), [near, far], paths, facts,
                    own_ip=ipaddress.ip_address("198.18.0.11"), version=4, subnet_len=24)
    assert not got.errors
    hg = Route(near.subnet, near.public_ip, 2)
    vx_far = Route(far.subnet, far.subnet.network_address, 7, onlink=True)
    assert got.main == {hg, vx_far}
    assert {r.dst for r in got.tables["vxlan"]} == {near.subnet, far.subnet}
    assert {r.dst for r in got.tables["udp"]} == {near.subnet, far.subnet}
    assert {r.dst for r in got.tables["host-gw"]} == {near.subnet}
    assert all(r.table == AUTO_TABLES[p] for p, rs in got.tables.items() for r in rs)
    assert len(got.fdb) == 2
    assert set(got.udp_peers.routes.values()) == {("198.18.0.12", 8285), ("198.18.1.13", 8285)}


def test_a_peer_sharing_no_plane_is_that_peers_error() -> None:
    lone = peer(data={"wireguard": {}})
    paths = {lone.subnet: plan.initial(plan.candidates(lone, UNDERLAY))}
    got = plan.plan(AutoOptions(), [lone], paths, plan.AutoFacts(7, 8, UNDERLAY),
                    own_ip=ipaddress.ip_address("198.18.0.11"), version=4, subnet_len=24)
    assert "shares no data plane" in got.errors[str(lone.subnet)]
    assert not got.main


@pytest.mark.parametrize(("data", "problem"), [
    (DATA, None),
    ({"hostgw": {}}, None),
    ({}, "advertises no data plane"),
    ({"vxlan": {"VtepMAC": "nope"}}, "BackendData vxlan: VtepMAC"),
    ({"udp": {"Port": 0}}, "BackendData udp: Port"),
    ({"udp": 5}, "is not an object"),
    ({"hostgw": [], "udp": {}}, "hostgw"),
])
def test_backend_data_checks(data: dict[str, object], problem: str | None) -> None:
    got = auto_data_problem(data)
    assert got == problem if problem is None else problem in (got or "")
    assert backend_data_problem("auto", data) == got


def test_overlay_mtu_leaves_room_for_the_largest_plane() -> None:
    config = parse_config('{"Network": "198.19.0.0/16", "Backend": {"Type": "auto"}}')
    assert auto_overhead(4) == 50
    assert overlay_mtu(config.backend, 1500, 4) == 1450
    assert overlay_mtu(config.backend, 9000, 4) == 8950  # jumbo underlay, jumbo overlay


@pytest.mark.parametrize("plane", ALL)
def test_probe_round_trip_at_every_size(plane: str) -> None:
    for size in (wire.HEADER_SIZE, 548, 1422):
        data = wire.encode(wire.Probe(wire.REQUEST, plane, 7), size)
        assert len(data) == size
        assert wire.decode(data) == wire.Probe(wire.REQUEST, plane, 7)


@pytest.mark.parametrize("data", [b"", b"WFTP", b"XXXX\x01\x00\x00\x00\x00\x01",
                                  b"WFTP\x07\x00\x00\x00\x00\x01", b"WFTP\x01\x09\x00\x00\x00\x01"])
def test_probe_garbage_is_a_format_error(data: bytes) -> None:
    with pytest.raises(wire.ProbeFormatError):
        wire.decode(data)
