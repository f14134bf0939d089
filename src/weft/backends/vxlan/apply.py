"""vxlan: the kernel's VXLAN device, programmed statically from leases (`plan`).

Learning is off: the kernel never floods, every entry comes from a lease.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from weft.backends.base import ReconcileResult
from weft.backends.bulk import apply_tables
from weft.backends.registry import overlay_mtu
from weft.backends.vxlan import plan
from weft.backends.vxlan.options import VxlanOptions
from weft.core.config import NetworkConfig
from weft.core.constants import VXLAN_DEVICE_PREFIX
from weft.core.errors import KernelError
from weft.core.host import HostContext
from weft.core.lease import Lease
from weft.host import tables
from weft.host.netlink import LinkInfo, Netlink

log = logging.getLogger("weft.vxlan")


class VxlanBackend:
    def __init__(self, config: NetworkConfig, host: HostContext) -> None:
        assert isinstance(config.backend, VxlanOptions)
        self.config = config
        self.options: VxlanOptions = config.backend
        self.host = host
        self.device = f"{VXLAN_DEVICE_PREFIX}{self.options.vni}"
        self._mac: str | None = None  # the VTEP MAC peers hold; kept when recreating
        self._lease: Lease | None = None
        self._facts: plan.VxlanFacts | None = None  # from the last full reconcile

    def _matches(self, link: LinkInfo, underlay_index: int) -> bool:
        d = link.data
        return (
            link.kind == "vxlan"
            and d.get("IFLA_VXLAN_ID") == self.options.vni
            and d.get("IFLA_VXLAN_PORT") == self.options.port
            and str(d.get(f"IFLA_VXLAN_{self._local_key.upper()}")) == str(self.host.public_ip)
            and d.get("IFLA_VXLAN_LINK") == underlay_index
        )

    @property
    def _local_key(self) -> str:
        """The netlink attribute of the device's local address: an IPv6 underlay (an
        IPv6-only one carrying both families) has its own."""
        return "local" if self.host.public_ip.version == 4 else "local6"

    def prepare(self) -> Mapping[str, Any]:
        with Netlink() as nl:
            underlay = nl.link(self.host.underlay_ifname)
            if underlay is None:
                raise KernelError(f"underlay interface {self.host.underlay_ifname} not found")
            link = nl.link(self.device)
            # Keep a device that already matches: its MAC is what peers hold in their
            # neighbour tables, so recreating it would break traffic across a restart.
            if link is not None and not self._matches(link, underlay.index):
                nl.delete_link(self.device)
                link = None
            if link is None:
                # A device recreated under a running agent gets its old MAC back, so no
                # peer has to learn a new one.
                mac = {"address": self._mac} if self._mac else {}
                link = nl.create_link(
                    self.device, "vxlan",
                    vxlan_id=self.options.vni,
                    vxlan_port=self.options.port,
                    **{f"vxlan_{self._local_key}": str(self.host.public_ip)},
                    vxlan_link=underlay.index,
                    vxlan_learning=0,
                    **mac,
                )
        self._mac = link.mac
        return {"VNI": self.options.vni, "VtepMAC": link.mac}

    def activate(self, lease: Lease) -> int:
        self._lease = lease
        mtu = overlay_mtu(self.options, self.host.underlay_mtu, self.host.public_ip.version)
        with Netlink() as nl:
            link = nl.link(self.device)
            if link is None:
                raise KernelError(f"VXLAN device {self.device} vanished")
            if self._mac and link.mac != self._mac:
                # Someone set another MAC: peers still hold ours in their neighbour tables.
                log.warning("VXLAN device MAC changed; putting it back",
                            extra={"device": self.device, "mac": link.mac})
                nl.set_link(link.index, address=self._mac)
            nl.ensure_only_address(link.index, lease.own_address)
            if lease.own_ipv6_address is not None:  # dual stack: the IPv6 VTEP address
                nl.ensure_only_address(link.index, lease.own_ipv6_address)
            nl.ensure_up(link, mtu)
        return mtu

    def reconcile(self, peers: Sequence[Lease]) -> ReconcileResult:
        if self._lease is not None:
            # Level-based: the device, its address, MTU and state are ours too. Someone
            # deleted it (or set it down): put it back before programming peers on it.
            with Netlink() as nl:
                link = nl.link(self.device)
            if link is None:
                log.warning("VXLAN device missing; recreating it", extra={"device": self.device})
                self.prepare()
            self.activate(self._lease)
        with Netlink() as nl:
            link = nl.link(self.device)
            if link is None:
                raise KernelError(f"VXLAN device {self.device} vanished")
            facts = plan.VxlanFacts(link.index, nl.underlay_facts(self.host.underlay_ifname))
        self._facts = facts
        wanted = plan.plan(self.options, peers, facts)
        actual = plan.VxlanPlan(
            frozenset(tables.fdb_entries(self.device, link.index)),
            frozenset(tables.permanent_neighbours(self.device, link.index)),
            frozenset(route for version in self._versions
                      for route in tables.weft_routes(version)))
        change = plan.difference(wanted, actual)
        result = apply_tables(change.routes, change.neighbours, change.fdb)
        result.errors.update(wanted.errors)
        return result

    def update(self, removed: Sequence[Lease], added: Sequence[Lease]) -> ReconcileResult | None:
        if self._facts is None:
            return None
        change = plan.incremental(self.options, removed, added, self._facts)
        result = apply_tables(change.routes, change.neighbours, change.fdb, self.device)
        result.errors.update(change.errors)
        return result

    def status(self) -> Mapping[str, Any]:
        return {"implementation": "kernel vxlan", "device": self.device,
                "direct_routing": self.options.direct_routing}

    def close(self) -> None:
        pass

    def teardown(self) -> None:
        with Netlink() as nl:
            for version in self._versions:
                nl.delete_routes(version)
            nl.delete_link(self.device)

    @property
    def _versions(self) -> tuple[int, ...]:
        """The overlay's IP versions: the routes of each are weft's to keep."""
        return tuple(network.version for network in self.config.networks)
