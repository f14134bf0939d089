"""vxlan: the kernel's VXLAN device, programmed statically from leases (`plan`).

Learning is off: the kernel never floods, every entry comes from a lease.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from weft.backends.base import ReconcileResult, why_no_ipv6_underlay
from weft.backends.bulk import apply_tables
from weft.backends.registry import overlay_mtu
from weft.backends.vxlan import plan
from weft.backends.vxlan.options import VxlanOptions, ipv6_device_name
from weft.core.config import IPAddress, NetworkConfig
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
        self.device6 = ipv6_device_name(self.options.vni)
        # Dual stack over an IPv4 PublicIP with an IPv6 underlay address: a second device
        # on the IPv6 underlay (auto turns it off: its planes are chosen per peer).
        self.ipv6_underlay = (why_no_ipv6_underlay(config, host) is None
                              and self.device6 is not None)
        self._mac6: str | None = None
        self._mac: str | None = None  # the VTEP MAC peers hold; kept when recreating
        self._lease: Lease | None = None
        self._facts: plan.VxlanFacts | None = None  # from the last full reconcile

    def _matches(self, link: LinkInfo, underlay_index: int, local: IPAddress) -> bool:
        d = link.data
        key = "IFLA_VXLAN_LOCAL" if local.version == 4 else "IFLA_VXLAN_LOCAL6"
        return (
            link.kind == "vxlan"
            and d.get("IFLA_VXLAN_ID") == self.options.vni
            and d.get("IFLA_VXLAN_PORT") == self.options.port
            and str(d.get(key)) == str(local)
            and d.get("IFLA_VXLAN_LINK") == underlay_index
        )

    def prepare(self) -> Mapping[str, Any]:
        with Netlink() as nl:
            underlay = nl.link(self.host.underlay_ifname)
            if underlay is None:
                raise KernelError(f"underlay interface {self.host.underlay_ifname} not found")
            self._mac = self._ensure_device(nl, self.device, self.host.public_ip,
                                            underlay.index, self._mac)
            if self.ipv6_underlay:
                assert self.device6 is not None
                assert self.host.public_ipv6 is not None
                self._mac6 = self._ensure_device(nl, self.device6, self.host.public_ipv6,
                                                 underlay.index, self._mac6)
        return {"VNI": self.options.vni, "VtepMAC": self._mac}

    def ipv6_data(self) -> Mapping[str, Any] | None:
        """The lease's BackendV6Data in dual stack: the IPv6 underlay device's VTEP MAC
        when there is one (flannel's BackendV6Data), else None (BackendData's own)."""
        if self._mac6 is None:
            return None
        return {"VNI": self.options.vni, "VtepMAC": self._mac6}

    def _ensure_device(self, nl: Netlink, name: str, local: IPAddress, underlay_index: int,
                       mac: str | None) -> str:
        """The VXLAN device `name` on the underlay address `local`; its MAC."""
        link = nl.link(name)
        # Keep a device that already matches: its MAC is what peers hold in their
        # neighbour tables, so recreating it would break traffic across a restart.
        if link is not None and not self._matches(link, underlay_index, local):
            nl.delete_link(name)
            link = None
        if link is None:
            # A device recreated under a running agent gets its old MAC back, so no peer
            # has to learn a new one. An IPv6 underlay address is its own attribute.
            address = {"address": mac} if mac else {}
            key = "vxlan_local" if local.version == 4 else "vxlan_local6"
            link = nl.create_link(
                name, "vxlan",
                vxlan_id=self.options.vni,
                vxlan_port=self.options.port,
                **{key: str(local)},
                vxlan_link=underlay_index,
                vxlan_learning=0,
                **address,
            )
        return link.mac

    def activate(self, lease: Lease) -> int:
        self._lease = lease
        mtu = overlay_mtu(self.options, self.host.underlay_mtu, self.host.public_ip.version)
        if self.ipv6_underlay:
            # One MTU for the containers: the IPv6 underlay's 20 bytes more header too.
            mtu = min(mtu, overlay_mtu(self.options, self.host.underlay_mtu, 6))
            self._activate_device6(mtu)
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

    def _activate_device6(self, mtu: int) -> None:
        assert self.device6 is not None
        with Netlink() as nl:
            link = nl.link(self.device6)
            if link is None:
                raise KernelError(f"VXLAN device {self.device6} vanished")
            if self._mac6 and link.mac != self._mac6:
                nl.set_link(link.index, address=self._mac6)
            nl.ensure_up(link, mtu)

    def reconcile(self, peers: Sequence[Lease]) -> ReconcileResult:
        if self._lease is not None:
            # Level-based: the device, its address, MTU and state are ours too. Someone
            # deleted it (or set it down): put it back before programming peers on it.
            with Netlink() as nl:
                missing = [name for name in self._devices if nl.link(name) is None]
            if missing:
                log.warning("VXLAN device missing; recreating it",
                            extra={"device": ", ".join(missing)})
                self.prepare()
            self.activate(self._lease)
        with Netlink() as nl:
            link = nl.link(self.device)
            link6 = nl.link(self.device6) if self.ipv6_underlay and self.device6 else None
            if link is None or (self.ipv6_underlay and link6 is None):
                raise KernelError(f"VXLAN device {self.device} vanished")
            facts = plan.VxlanFacts(link.index, nl.underlay_facts(self.host.underlay_ifname),
                                    link6.index if link6 is not None else None)
        self._facts = facts
        wanted = plan.plan(self.options, peers, facts)
        devices = [(self.device, link.index)]
        if link6 is not None:
            devices.append((link6.name, link6.index))
        actual = plan.VxlanPlan(
            frozenset(e for name, index in devices for e in tables.fdb_entries(name, index)),
            frozenset(n for name, index in devices
                      for n in tables.permanent_neighbours(name, index)),
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
        six = {"ipv6_underlay_device": self.device6} if self.ipv6_underlay else {}
        return {"implementation": "kernel vxlan", "device": self.device,
                "direct_routing": self.options.direct_routing, **six}

    def close(self) -> None:
        pass

    def teardown(self) -> None:
        with Netlink() as nl:
            for version in self._versions:
                nl.delete_routes(version)
            for name in self._devices:
                nl.delete_link(name)

    @property
    def _devices(self) -> tuple[str, ...]:
        """The VXLAN devices this backend keeps: one, or two in dual stack over an IPv6
        underlay address."""
        if self.ipv6_underlay and self.device6 is not None:
            return (self.device, self.device6)
        return (self.device,)

    @property
    def _versions(self) -> tuple[int, ...]:
        """The overlay's IP versions: the routes of each are weft's to keep."""
        return tuple(network.version for network in self.config.networks)
