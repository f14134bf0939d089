"""Each backend declares its own facts; the rest of the host is handed them as values."""

from __future__ import annotations

import json
from typing import Any

import pytest

from weft.backends.auto.options import AUTO_TABLES
from weft.backends.registry import BACKENDS, backend_facts, overhead, parse_config


def facts(backend: dict[str, Any], underlay: str = "eth0") -> Any:
    config = parse_config(json.dumps({"Network": "198.19.0.0/16", "Backend": backend}))
    return backend_facts(config.backend, underlay)


@pytest.mark.parametrize("kind", sorted(BACKENDS))
def test_every_backend_declares_its_overhead_as_the_registry_gives_it(kind: str) -> None:
    declared = facts({"Type": kind}).overhead
    assert declared == {4: overhead(kind, 4), 6: overhead(kind, 6)}


def test_ingress_membership_is_by_address_and_port_for_udp_only() -> None:
    assert facts({"Type": "udp", "Port": 9000}).members_by_port
    assert facts({"Type": "udp", "Port": 9000}).encap_port == 9000
    assert not any(facts({"Type": kind}).members_by_port for kind in BACKENDS if kind != "udp")


def test_auto_peers_may_arrive_on_any_plane_and_its_tables_are_its_own() -> None:
    auto = facts({"Type": "auto", "VNI": 3}, "ul0")
    assert auto.peer_iifs == ("weft.vx3", "weft.udp0", "ul0")
    assert auto.tables == frozenset(AUTO_TABLES.values())
    assert auto.arrival is None  # a peer's packets may arrive on any of its planes
    others = [facts({"Type": kind}) for kind in BACKENDS if kind != "auto"]
    assert all(f.peer_iifs == () and f.tables == frozenset() for f in others)


def test_only_wireguard_is_encrypted() -> None:
    assert [kind for kind in sorted(BACKENDS) if facts({"Type": kind}).encrypted] == [
        "wireguard"]
