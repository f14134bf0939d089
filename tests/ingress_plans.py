"""The ingress plan for a config, as the agent builds it: with the backend's own facts
(its encapsulation port, members by address or (address, port), peer interfaces)."""

from __future__ import annotations

from collections.abc import Iterable

from weft.backends.registry import backend_facts
from weft.core.config import IPAddress, NetworkConfig
from weft.core.lease import Lease
from weft.host.ingress_rules import IngressPlan, ingress_plan
from weft.host.untrack import Untrack


def ingress_plan_for(config: NetworkConfig, public_ip: IPAddress, own: Lease,
                     peers: Iterable[Lease], underlay: str = "eth0",
                     untrack: Untrack | None = None,
                     public_ipv6: IPAddress | None = None) -> IngressPlan:
    facts = backend_facts(config.backend, underlay, config.dual_stack)
    return ingress_plan(config, public_ip, own, peers, port=facts.encap_port,
                        by_port=facts.members_by_port, peer_iifs=facts.peer_iifs,
                        untrack=untrack, public_ipv6=public_ipv6, port6=facts.encap_port6,
                        marker6=facts.member6_marker)
