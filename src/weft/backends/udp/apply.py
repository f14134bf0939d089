"""udp: weft's userspace data plane — a TUN device and a Python forwarder (IP-in-UDP).

For underlays that block VXLAN or hosts without the module.  Kernel state is small: a
persistent TUN device `weft.udp0` carrying this host's subnet network address (/32) and
one route for the whole cluster Network through it.  Which peer gets a packet is decided
by the forwarder's peer table (weft.backends.udp.plan), swapped atomically on every reconcile.
Speed comes from batching (TUN TSO + UDP GSO/GRO), see weft.backends.udp.forwarder.

The forwarder is a process of its own (weft.backends.udp.daemon) that this backend starts,
adopts after an agent restart, has hand its device and socket over to a new one when its
version differs and replaces when its spec differs (weft.backends.udp.supervisor):
`close()` leaves it forwarding with its last peer table, so an agent restart (an upgrade,
a crash, kill -9) drops no packet; `teardown()` stops it.

Dual stack over an IPv4 PublicIP on a host with an IPv6 underlay address too: the
forwarder has a second socket there (the same port, published as BackendV6Data), and each
peer's IPv6 subnet travels over the IPv6 underlay where the peer has one too (flannel's
vxlan does the same with a second device). The overlay MTU then fits the IPv6 underlay's
larger header, for every peer: one MTU for the containers.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from weft.backends.base import ReconcileResult, converge, why_no_ipv6_underlay
from weft.backends.registry import overlay_mtu
from weft.backends.udp import plan
from weft.backends.udp.control import ForwarderSpec
from weft.backends.udp.options import IPV6_SOCKET, UdpOptions
from weft.backends.udp.supervisor import ForwarderProcess
from weft.backends.udp.tun import delete_tun
from weft.core.config import NetworkConfig
from weft.core.constants import UDP_DEVICE
from weft.core.dataplane import Route
from weft.core.errors import KernelError
from weft.core.host import HostContext
from weft.core.lease import Lease
from weft.host.netlink import LinkInfo, Netlink

log = logging.getLogger("weft.backends.udp")


class UdpBackend:
    def __init__(self, config: NetworkConfig, host: HostContext) -> None:
        if not isinstance(config.backend, UdpOptions):
            raise TypeError("UdpBackend needs a config with Backend.Type udp")
        self.config = config
        self.options: UdpOptions = config.backend
        self.host = host
        self.forwarder: ForwarderProcess | None = None
        self._lease: Lease | None = None
        # Dual stack over an IPv4 PublicIP with an IPv6 underlay address: the second socket
        # (auto turns it off before prepare: its planes are chosen per peer).
        self.ipv6_underlay = why_no_ipv6_underlay(config, host) is None
        self._over_ipv4: Mapping[str, str] = {}  # as last planned: IPv6 subnet -> why

    @property
    def mtu(self) -> int:
        mtu = overlay_mtu(self.options, self.host.underlay_mtu, self.host.public_ip.version)
        if self.ipv6_underlay:
            # One MTU for the containers, whichever underlay a peer's packets take: the
            # IPv6 underlay's 20 bytes more header too (a configured MTU is kept as given).
            mtu = min(mtu, overlay_mtu(self.options, self.host.underlay_mtu, 6))
        return mtu

    def _process(self) -> ForwarderProcess:
        six = str(self.host.public_ipv6) if self.ipv6_underlay else None
        spec = ForwarderSpec(UDP_DEVICE, str(self.host.public_ip), self.options.port,
                             self.host.underlay_mtu, self.config.network.version,
                             self.config.length, self.options.offloads, six)
        return ForwarderProcess(spec, self.host.state_dir)

    def ipv6_data(self) -> Mapping[str, Any] | None:
        """The lease's BackendV6Data: the port of the IPv6 underlay socket, which tells
        peers to send this host's IPv6 subnet there, and the marker that says the port is
        that socket's (not a copy of BackendData, as an earlier weft's); None without one."""
        return {"Port": self.options.port, IPV6_SOCKET: True} if self.ipv6_underlay else None

    def prepare(self) -> Mapping[str, Any]:
        if self.forwarder is None:
            self.forwarder = self._process()
        # The one a previous agent left forwarding is adopted: not a packet dropped.
        self.forwarder.ensure()
        return {"Port": self.options.port}

    def activate(self, lease: Lease) -> int:
        self._lease = lease
        mtu = self.mtu
        with Netlink() as nl:
            link = self._link(nl)
            # The subnet's network address: the host's own overlay address (source of
            # host-originated traffic, so peers' spoofing checks accept it).
            nl.ensure_only_address(link.index, lease.own_address)
            if lease.own_ipv6_address is not None:  # dual stack: the IPv6 half's own
                nl.ensure_only_address(link.index, lease.own_ipv6_address)
            elif self.config.network.version == 4:
                _disable_ipv6(UDP_DEVICE)
            nl.ensure_up(link, mtu)
            result = self._converge_route(nl, link.index)
            if result.errors:
                raise KernelError(f"route for {self.config.network}: {result.errors}")
        return mtu

    @staticmethod
    def _link(nl: Netlink) -> LinkInfo:
        link = nl.link(UDP_DEVICE)
        if link is None:
            raise KernelError(f"TUN device {UDP_DEVICE} vanished; restart the agent")
        return link

    def _converge_route(self, nl: Netlink, index: int) -> ReconcileResult:
        """One route, the whole Network through the TUN device (in dual stack one per
        family); any other route with weft's protocol number is a leftover of an earlier
        run and goes."""
        desired = {Route(network, None, index) for network in self.config.networks}
        actual = {route for network in self.config.networks
                  for route in nl.routes(network.version)}
        return converge(desired, actual, nl.replace_route, nl.delete_route, lambda r: str(r.dst))

    def ensure_forwarder(self) -> bool:
        """Level-based repair of the data plane: a forwarder that died (a crash, an OOM
        kill) is started again, a device someone deleted is made anew, then our address
        and route go back on it (once activated). True if something was repaired."""
        if self.forwarder is None:
            raise KernelError("udp backend: reconcile() before prepare()")
        with Netlink() as nl:
            device_gone = nl.link(UDP_DEVICE) is None
        if device_gone:
            # The forwarder's fd points at nothing: it opens a new device (and socket).
            log.warning("udp data plane missing; recreating it", extra={"device": UDP_DEVICE})
            try:
                self.forwarder.reopen()
            except KernelError:
                self.forwarder.stop()
                self.forwarder.start()
        elif not self.forwarder.alive():
            log.warning("udp forwarder is not answering", extra={"device": UDP_DEVICE})
            self.forwarder.ensure()
        else:
            return False
        if self._lease is not None:
            self.activate(self._lease)
        return True

    def reconcile(self, peers: Sequence[Lease]) -> ReconcileResult:
        self.ensure_forwarder()
        assert self.forwarder is not None
        six = self.config.ipv6
        wanted = plan.plan(peers, own_ip=self.host.public_ip, default_port=self.options.port,
                           version=self.config.network.version, subnet_len=self.config.length,
                           ipv6_subnet_len=six.length if six is not None else None,
                           own_ipv6=self.host.public_ipv6 if self.ipv6_underlay else None)
        errors = dict(wanted.errors)
        self._over_ipv4 = wanted.over_ipv4
        with Netlink() as nl:
            # level-based: put back our route if someone removed it
            result = self._converge_route(nl, self._link(nl).index)
        errors.update(result.errors)
        table = wanted.table
        before = self.forwarder.peers.describe()
        self.forwarder.set_peers(table)
        after = table.describe()
        added = sum(1 for k, v in after.items() if before.get(k) != v)
        removed = sum(1 for k, v in before.items() if after.get(k) != v)
        return ReconcileResult(added=added, removed=removed, errors=errors)

    def status(self) -> Mapping[str, Any]:
        facts: dict[str, Any] = {
            "implementation": "userspace python (TUN + UDP, batched with offloads), "
                              "its own process",
            "mtu": self.mtu,
        }
        if self.forwarder is not None:
            facts.update(self.forwarder.status())
            facts["forwarder_pid"] = facts.pop("pid", None)
        if self.config.dual_stack:
            facts["ipv6_underlay"] = self._status6(facts.get("ipv6_underlay"))
        return facts

    def _status6(self, socket6: Any) -> dict[str, Any]:
        """Which underlay each peer's IPv6 subnet travels: the IPv6 socket's facts (from
        the forwarder: address, port, its share of the counters) and the peers whose IPv6
        subnet rides IPv4, with why; on a host without the socket, why not."""
        if not self.ipv6_underlay:  # off for auto's planes too: the host may still have one
            why = why_no_ipv6_underlay(self.config, self.host, "the one socket")
            return {"address": None, "why": why or "auto chooses each peer's plane"}
        six = dict(socket6) if isinstance(socket6, dict) else {}
        six["over_ipv4"] = dict(sorted(self._over_ipv4.items()))
        return six

    def close(self) -> None:
        """Leave the forwarder forwarding (with its last peer table) and the persistent
        device and route in place: the next agent adopts them."""
        if self.forwarder is not None:
            self.forwarder.detach()

    def teardown(self) -> None:
        (self.forwarder or self._process()).stop()
        self.forwarder = None
        with Netlink() as nl:
            link = nl.link(UDP_DEVICE)
            if link is not None:
                for network in self.config.networks:
                    for route in nl.routes(network.version):
                        if route.ifindex == link.index:
                            nl.delete_route(route)
        delete_tun(UDP_DEVICE)


def _disable_ipv6(device: str) -> None:
    """An IPv4 overlay has no use for IPv6 on the TUN: without this the kernel sends router
    solicitations into it, which the forwarder can only drop (and count as no_route)."""
    path = Path("/proc/sys/net/ipv6/conf") / device / "disable_ipv6"
    with contextlib.suppress(OSError):  # no IPv6 in this kernel: nothing to disable
        path.write_text("1")
