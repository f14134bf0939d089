"""host-gw: plain kernel routes to each peer's subnet via the peer's public IP.

The fastest data plane there is (no encapsulation at all), but every host must be on one
L2 segment: a peer whose public IP is not on a connected subnet of the underlay cannot be
a gateway, and is reported as an error for that peer, not a crash.

With no device of its own, the host's overlay address (its subnet's network address, as
every backend has on its device) goes on `lo`: the peers' health probes are routed to it
like the containers' packets, and the agent's prober answers there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from weft.backends.base import ReconcileResult
from weft.backends.bulk import apply_tables
from weft.backends.hostgw import plan
from weft.backends.registry import overlay_mtu
from weft.core.config import NetworkConfig
from weft.core.host import HostContext, UnderlayFacts
from weft.core.lease import Lease
from weft.host import tables
from weft.host.netlink import Netlink

LOOPBACK = "lo"


class HostGwBackend:
    def __init__(self, config: NetworkConfig, host: HostContext) -> None:
        self.config = config
        self.host = host
        self._underlay: UnderlayFacts | None = None  # from the last full reconcile
        self._lease: Lease | None = None

    def prepare(self) -> Mapping[str, Any]:
        return {}

    def activate(self, lease: Lease) -> int:
        old, self._lease = self._lease, lease
        with Netlink() as nl:
            lo = nl.link(LOOPBACK)
            if lo is not None:
                if old is not None and old.subnet != lease.subnet:
                    nl.remove_addresses_in(lo.index, old.subnet)
                nl.ensure_address(lo.index, lease.own_address)
        return overlay_mtu(self.config.backend, self.host.underlay_mtu,
                           self.host.public_ip.version)

    def reconcile(self, peers: Sequence[Lease]) -> ReconcileResult:
        with Netlink() as nl:
            self._underlay = underlay = nl.underlay_facts(self.host.underlay_ifname)
            lo = nl.link(LOOPBACK)
            if self._lease is not None and lo is not None:  # level-based: put it back
                nl.ensure_address(lo.index, self._lease.own_address)
        wanted = plan.plan(peers, underlay)
        actual = {route for network in self.config.networks
                  for route in tables.weft_routes(network.version)}
        change = plan.difference(wanted, actual)
        result = apply_tables(change.routes)
        result.errors.update(wanted.errors)
        return result

    def update(self, removed: Sequence[Lease], added: Sequence[Lease]) -> ReconcileResult | None:
        if self._underlay is None:
            return None
        change = plan.incremental(removed, added, self._underlay)
        result = apply_tables(change.routes)
        result.errors.update(change.errors)
        return result

    def status(self) -> Mapping[str, Any]:
        return {"implementation": "kernel routes"}

    def close(self) -> None:
        pass

    def teardown(self) -> None:
        with Netlink() as nl:
            for network in self.config.networks:
                nl.delete_routes(network.version)
            lo = nl.link(LOOPBACK)
            if self._lease is not None and lo is not None:
                nl.remove_addresses_in(lo.index, self._lease.subnet)
