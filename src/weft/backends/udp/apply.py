"""udp: weft's userspace data plane — a TUN device and a Python forwarder (IP-in-UDP).

For underlays that block VXLAN or hosts without the module.  Kernel state is small: a
persistent TUN device `weft.udp0` carrying this host's subnet network address (/32) and
one route for the whole cluster Network through it.  Which peer gets a packet is decided
by the forwarder's peer table (weft.backends.udp.plan), swapped atomically on every reconcile.
Speed comes from batching (TUN TSO + UDP GSO/GRO), see weft.backends.udp.forwarder.
`open_forwarder` is the wiring: it opens the device (tun) and the socket (bind) and hands
them to the forwarder, which opens nothing itself.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from weft.backends.base import ReconcileResult, converge
from weft.backends.registry import overlay_mtu
from weft.backends.udp import plan
from weft.backends.udp.bind import open_bind
from weft.backends.udp.forwarder import Forwarder
from weft.backends.udp.options import UdpOptions
from weft.backends.udp.tun import delete_tun, open_device
from weft.core.config import IPAddress, NetworkConfig
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
        self.forwarder: Forwarder | None = None
        self._lease: Lease | None = None

    @property
    def mtu(self) -> int:
        return overlay_mtu(self.options, self.host.underlay_mtu, self.host.public_ip.version)

    def prepare(self) -> Mapping[str, Any]:
        if self.forwarder is None:
            forwarder = open_forwarder(
                UDP_DEVICE,
                self.host.public_ip,
                self.options.port,
                self.host.underlay_mtu,
                self.config.network.version,
                self.config.length,
                offloads=self.options.offloads,
            )
            forwarder.start()
            self.forwarder = forwarder
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

    def reconcile(self, peers: Sequence[Lease]) -> ReconcileResult:
        if self.forwarder is None and self._lease is None:
            raise KernelError("udp backend: reconcile() before prepare()")
        six = self.config.ipv6
        wanted = plan.plan(peers, own_ip=self.host.public_ip, default_port=self.options.port,
                           version=self.config.network.version, subnet_len=self.config.length,
                           ipv6_subnet_len=six.length if six is not None else None)
        errors = dict(wanted.errors)
        with Netlink() as nl:
            if self._lease is not None and (self.forwarder is None or nl.link(UDP_DEVICE) is None):
                # Someone deleted our device (the forwarder's fd points at nothing), or an
                # earlier repair failed half-way. Level-based repair: a new device, a new
                # forwarder, our address and route again.
                log.warning("udp data plane missing; recreating it", extra={"device": UDP_DEVICE})
                self.close()
                self.prepare()
                self.activate(self._lease)
            assert self.forwarder is not None
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
            "implementation": "userspace python (TUN + UDP, batched with offloads)",
            "mtu": self.mtu,
        }
        if self.forwarder is not None:
            facts.update(self.forwarder.status())
        return facts

    def close(self) -> None:
        """Stop the forwarder; the persistent device and its route stay for the next run."""
        if self.forwarder is not None:
            self.forwarder.close()
            self.forwarder = None

    def teardown(self) -> None:
        self.close()
        with Netlink() as nl:
            link = nl.link(UDP_DEVICE)
            if link is not None:
                for network in self.config.networks:
                    for route in nl.routes(network.version):
                        if route.ifindex == link.index:
                            nl.delete_route(route)
        delete_tun(UDP_DEVICE)


def open_forwarder(device: str, bind_ip: IPAddress, port: int, underlay_mtu: int,
                   network_version: int, subnet_len: int, offloads: bool = True) -> Forwarder:
    """Create/attach TUN device `device`, bind the socket, and hand both to a forwarder
    (not started yet); `offloads=False` asks for none on either."""
    tun = open_device(device, offloads)
    try:
        bind = open_bind(bind_ip, port, offloads)
    except BaseException:
        tun.close()
        raise
    try:
        forwarder = Forwarder(tun, bind, underlay_mtu, network_version, subnet_len)
    except BaseException:
        tun.close()
        bind.close()
        raise
    for note in forwarder.in_force.notes:
        log.warning("udp offload fallback", extra={"detail": note})
    return forwarder


def _disable_ipv6(device: str) -> None:
    """An IPv4 overlay has no use for IPv6 on the TUN: without this the kernel sends router
    solicitations into it, which the forwarder can only drop (and count as no_route)."""
    path = Path("/proc/sys/net/ipv6/conf") / device / "disable_ipv6"
    with contextlib.suppress(OSError):  # no IPv6 in this kernel: nothing to disable
        path.write_text("1")
