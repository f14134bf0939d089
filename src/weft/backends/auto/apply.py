"""auto: per peer, the fastest data plane that carries full-size packets (`plan`).

This host always receives on every plane: the VXLAN device is up, the udp forwarder
listens, plain routed packets are forwarded (rp_filter loose on weft's devices), so a pair
whose two ends choose differently for a moment loses nothing. Only the sending side is
chosen: the peer's route in the main table. The devices are the vxlan and udp backends'
own (their `prepare`/`activate`, the udp forwarder), not copies.

Two writers share the kernel state of this backend: the agent's reconcile worker (store
changes) and the prober thread (a plane stopped or started answering). One lock orders
them; each applies the whole plan of the newest view, level-based.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from weft.backends.auto import plan
from weft.backends.auto.options import AUTO_RULE_PRIORITY, AUTO_TABLES, PLANES, AutoOptions
from weft.backends.auto.probe import Outcomes, Prober
from weft.backends.base import ReconcileResult, delta
from weft.backends.bulk import apply_tables
from weft.backends.registry import overlay_mtu
from weft.backends.udp.apply import UdpBackend
from weft.backends.udp.options import UdpOptions
from weft.backends.vxlan.apply import VxlanBackend
from weft.backends.vxlan.options import VxlanOptions
from weft.backends.vxlan.plan import neighbour_key, route_key
from weft.core.config import IPNetwork, NetworkConfig
from weft.core.constants import UDP_DEVICE
from weft.core.dataplane import Route
from weft.core.errors import KernelError
from weft.core.host import HostContext
from weft.core.lease import Lease
from weft.host import tables
from weft.host.netlink import Netlink

log = logging.getLogger("weft.backends.auto")


class AutoBackend:
    def __init__(self, config: NetworkConfig, host: HostContext) -> None:
        if not isinstance(config.backend, AutoOptions):
            raise TypeError("AutoBackend needs a config with Backend.Type auto")
        self.config = config
        self.options: AutoOptions = config.backend
        self.host = host
        self.version = config.network.version
        self.mtu = overlay_mtu(self.options, host.underlay_mtu, host.public_ip.version)
        # The planes' own backends, for their devices only (their routes are ours).
        self._vxlan = VxlanBackend(config.model_copy(update={"backend": VxlanOptions(
            VNI=self.options.vni, Port=self.options.vxlan_port, MTU=self.mtu)}), host)
        self._vxlan.ipv6_underlay = False  # auto chooses per peer; one VXLAN device
        self._udp = UdpBackend(config.model_copy(update={"backend": UdpOptions(
            Port=self.options.udp_port, Offloads=self.options.offloads, MTU=self.mtu)}), host)
        self._udp.ipv6_underlay = False  # likewise: one udp socket, on the PublicIP
        self._lock = threading.Lock()
        self._lease: Lease | None = None
        self._peers: dict[IPNetwork, Lease] = {}
        self._paths: dict[IPNetwork, plan.PeerPath] = {}
        self._facts: plan.AutoFacts | None = None
        self._errors: dict[str, str] = {}
        self._prober: Prober | None = None
        self._closed = False  # set under the lock: the prober must not program after close
        self._rp_filter: dict[str, str] = {}  # device -> the value before we loosened it
        self._ipv6_planes: dict[IPNetwork, str | None] = {}  # dual stack, as last planned

    # --- lifecycle ------------------------------------------------------------------------

    def prepare(self) -> Mapping[str, Any]:
        vx = self._vxlan.prepare()
        udp = self._udp.prepare()
        self._ensure_rules()
        return {"hostgw": {}, "vxlan": {"VtepMAC": vx["VtepMAC"], "Port": self.options.vxlan_port},
                "udp": {"Port": udp["Port"]}}

    def activate(self, lease: Lease) -> int:
        self._lease = lease
        self._vxlan.activate(lease)
        with Netlink() as nl:
            link = nl.link(UDP_DEVICE)
            if link is None:
                raise KernelError(f"TUN device {UDP_DEVICE} vanished; restart the agent")
            nl.ensure_only_address(link.index, lease.own_address)
            if lease.own_ipv6_address is not None:  # dual stack: the IPv6 half's own
                nl.ensure_only_address(link.index, lease.own_ipv6_address)
            nl.ensure_up(link, self.mtu)
        # A packet of a pair whose ends chose different planes arrives on a device the
        # reverse route does not use: strict reverse-path filtering would drop it.
        # The ingress filter still holds this host's own subnet to the containers' side.
        for device in (self._vxlan.device, UDP_DEVICE, self.host.underlay_ifname):
            before = _loose_rp_filter(device)
            if before is not None:
                self._rp_filter.setdefault(device, before)
        if self._prober is not None and self._prober.own != lease.own_address.ip:
            self._prober.close()
            self._prober = None
        if self._prober is None:
            self._prober = Prober(lease.own_address.ip, self.options.probe_port, self.mtu,
                                  self.options.probe_interval, self._on_round)
            self._prober.start()
        return self.mtu

    def _ensure_rules(self) -> None:
        """The fwmark rules that send each plane's probes through that plane's table: without
        them every plane would 'answer' through the main table's choice."""
        with Netlink() as nl:
            for version in self._versions:
                for plane in PLANES:
                    nl.ensure_rule(version, AUTO_TABLES[plane], AUTO_TABLES[plane],
                                   AUTO_RULE_PRIORITY)

    @property
    def _versions(self) -> tuple[int, ...]:
        """The overlay's IP versions (both in dual stack): each has its tables' routes."""
        return tuple(network.version for network in self.config.networks)

    def _weft_routes(self, table: int = 254) -> frozenset[Route]:
        return frozenset(route for version in self._versions
                         for route in tables.weft_routes(version, table))

    def reconcile(self, peers: Sequence[Lease]) -> ReconcileResult:
        self._ensure_rules()
        # The udp plane's forwarder is a process: started again if it died, its device
        # made anew if deleted; then our address goes back on the device.
        if self._udp.ensure_forwarder() and self._lease is not None:
            self.activate(self._lease)
        if self._lease is not None:
            with Netlink() as nl:
                missing = nl.link(self._vxlan.device) is None
            if missing:  # level-based: someone deleted the device; rebuild it
                log.warning("VXLAN device missing; recreating it",
                            extra={"device": self._vxlan.device})
                self._vxlan.prepare()
            self._vxlan.activate(self._lease)
        with Netlink() as nl:
            vx = nl.link(self._vxlan.device)
            tun = nl.link(UDP_DEVICE)
            if vx is None or tun is None:
                raise KernelError("auto: the VXLAN or TUN device vanished")
            facts = plan.AutoFacts(vx.index, tun.index,
                                   nl.underlay_facts(self.host.underlay_ifname))
        with self._lock:
            if self._closed:
                return ReconcileResult()
            self._facts = facts
            self._peers = {p.subnet: p for p in peers}
            self._paths = {p.subnet: plan.rebase(self._paths.get(p.subnet),
                                                 plan.candidates(p, facts.underlay))
                           for p in peers}
            result = self._apply()
            if self._prober is not None:
                self._prober.set_targets({
                    s: (p.subnet.network_address, self._paths[s].candidates)
                    for s, p in self._peers.items()})
        return result

    def _apply(self) -> ReconcileResult:
        """Converge the kernel to the plan of the newest view; the lock is held."""
        assert self._facts is not None
        facts = self._facts
        six = self.config.ipv6
        wanted = plan.plan(self.options, list(self._peers.values()), self._paths, facts,
                           own_ip=self.host.public_ip, version=self.version,
                           subnet_len=self.config.length,
                           ipv6_subnet_len=six.length if six is not None else None)
        self._ipv6_planes = dict(wanted.ipv6_planes)
        routes = delta(wanted.main, self._weft_routes(), route_key)
        for p in PLANES:
            table = AUTO_TABLES[p]
            change = delta(wanted.tables[p], self._weft_routes(table), route_key)
            routes = type(routes)(routes.add | change.add, routes.remove | change.remove)
        neighbours = delta(wanted.neighbours, frozenset(
            tables.permanent_neighbours(self._vxlan.device, facts.vxlan_index)), neighbour_key)
        fdb = delta(wanted.fdb, frozenset(tables.fdb_entries(self._vxlan.device,
                                                             facts.vxlan_index)))
        result = apply_tables(routes, neighbours, fdb)
        if self._udp.forwarder is not None:
            self._udp.forwarder.set_peers(wanted.udp_peers)
        result.errors.update(wanted.errors)
        return result

    def _on_round(self, outcomes: Outcomes) -> None:
        """The prober's round: step each peer's state machine; reprogram if one moved."""
        with self._lock:
            moved = []
            for subnet, answered in outcomes.items():
                path = self._paths.get(subnet)
                if path is None:
                    continue
                new = plan.step(path, answered, self.options.probe_misses,
                                self.options.probe_answers)
                self._paths[subnet] = new
                if new.plane != path.plane:
                    moved.append((subnet, path.plane, new))
            if not moved or self._facts is None or self._closed:
                return
            for subnet, old, new in moved:
                log.info("data plane switched", extra={
                    "peer": str(subnet), "from": old, "to": new.plane, "reason": new.reason})
            try:
                result = self._apply()
            except Exception as exc:  # retried on the next switch or reconcile
                log.warning("applying a switch failed", extra={"error": str(exc)})
                return
            if result.errors:
                log.warning("switch applied with errors", extra={"errors": result.errors})

    def status(self) -> Mapping[str, Any]:
        with self._lock:
            paths = {
                str(subnet): {
                    "peer": str(self._peers[subnet].public_ip) if subnet in self._peers else "",
                    "plane": path.plane, "reason": path.reason, "switches": path.switches,
                    **({"ipv6_plane": self._ipv6_planes.get(subnet)}
                       if self.config.dual_stack else {}),
                    "probes": {p: {"sent": h.sent, "answered": h.answered, "usable": h.usable,
                                   "small_answered": h.small_answered}
                               for p, h in path.health.items()},
                }
                for subnet, path in self._paths.items()
            }
        counters: dict[str, int] = {}
        if self._prober is not None:
            counters.update({f"probe_{k}": v for k, v in vars(self._prober.counters).items()})
        if self._udp.forwarder is not None:
            counters.update({f"udp_{k}": v for k, v in self._udp.forwarder.flat_counters().items()})
        return {"implementation": "auto (host-gw, kernel vxlan, userspace udp; per peer)",
                "mtu": self.mtu, "device": self._vxlan.device, "paths": paths,
                "counters": counters}

    def close(self) -> None:
        with self._lock:
            self._closed = True
            prober, self._prober = self._prober, None
        if prober is not None:
            prober.close()
        self._udp.close()

    def teardown(self) -> None:
        self.close()
        with Netlink() as nl:
            for version in self._versions:
                for p in PLANES:
                    table = AUTO_TABLES[p]
                    nl.delete_rule(version, table, table, AUTO_RULE_PRIORITY)
        for p in PLANES:
            apply_tables(delta(frozenset(), self._weft_routes(AUTO_TABLES[p])))
        self._vxlan.teardown()
        self._udp.teardown()
        for device, value in self._rp_filter.items():  # the underlay's, as we found it
            with contextlib.suppress(OSError):
                (RP_FILTER / device / "rp_filter").write_text(value)


RP_FILTER = Path("/proc/sys/net/ipv4/conf")


def _loose_rp_filter(device: str) -> str | None:
    """Strict (1) becomes loose (2) on `device` (the kernel uses max(all, device));
    the device's value before, when it was changed."""
    with contextlib.suppress(OSError):  # no such device (yet), or no IPv4: nothing to loosen
        before = (RP_FILTER / device / "rp_filter").read_text().strip()
        if "1" in {(RP_FILTER / "all" / "rp_filter").read_text().strip(), before}:
            (RP_FILTER / device / "rp_filter").write_text("2")
            return before
    return None
