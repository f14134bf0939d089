"""wireguard: every packet between hosts encrypted by WireGuard (a real VPN protocol).

One WireGuard device per host (`weft.wg0`), carrying this host's subnet address and a
route for the whole cluster Network. Each peer lease becomes one WireGuard peer: its
`BackendData.PublicKey`, endpoint `PublicIP:ListenPort`, allowed IPs = its subnet, so
WireGuard's cryptokey routing sends a packet to the one host that owns its subnet and
accepts from a host only packets sourced from that host's subnet.

The device is the kernel's where the module exists, otherwise wireguard-go; both are
configured from the same pure plan (`weft.backends.wireguard.plan`), the kernel through generic
netlink, wireguard-go through its UAPI socket. The private key lives in
`<state_dir>/wireguard.key` (0600); only the public key leaves the host, in the lease.

Plaintext that claims an overlay source but arrives on the underlay (skipping the tunnel
and its cryptokey check) is dropped by the host's ingress filter (`weft.host.ingress_rules`),
which the agent rebuilds on every reconcile.

Dual stack over an IPv6 underlay address beside an IPv4 PublicIP: a second device,
`weft.wg0v6`, on its own port (`ListenPortV6`, flannel's flannel-wg-v6) with the same key,
carries a peer's IPv6 subnet to its PublicIPv6 where the peer has that device too (its
BackendV6Data Port); it holds the route for the IPv6 Network, and the IPv6 subnet of any
other peer rides the IPv4 device with its IPv4 subnet (a route of its own there).

The second device is optional: one that cannot be made or configured (ListenPortV6 held
by another program, say) is an error in status and health, retried every pass, while the
IPv4 device carries on; each device is revived and given its peers on its own.

Restart: `close()` leaves the device, its peers and the wireguard-go process running;
the next `prepare()` adopts them (nothing is re-set that already matches), so a restarted
agent drops no traffic.
"""

from __future__ import annotations

import base64
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from weft.backends.base import ReconcileResult, converge, why_no_ipv6_underlay
from weft.backends.registry import overlay_mtu
from weft.backends.wireguard.device import KERNEL, USERSPACE, Tunnel
from weft.backends.wireguard.keyfile import key_file_path, load_or_create_private_key
from weft.backends.wireguard.keys import PrivateKey, PublicKey
from weft.backends.wireguard.options import WIREGUARD_DEVICE6, WireguardOptions
from weft.backends.wireguard.plan import (
    DeviceChange,
    DeviceState,
    PeerConfig,
    peer_plan,
    peer_sets,
)
from weft.core.config import IPNetwork, NetworkConfig
from weft.core.constants import WIREGUARD_DEVICE
from weft.core.dataplane import Route
from weft.core.errors import KernelError, WeftError
from weft.core.host import HostContext
from weft.core.lease import Lease
from weft.host.netlink import LinkInfo, Netlink

log = logging.getLogger(__name__)

__all__ = ["KERNEL", "USERSPACE", "WireguardBackend"]

FILES6 = "wireguard-go-v6"  # the IPv6 underlay device's wireguard-go: pid and log files

T = TypeVar("T")


class WireguardBackend:
    def __init__(self, config: NetworkConfig, host: HostContext) -> None:
        assert isinstance(config.backend, WireguardOptions)
        self.config = config
        self.options: WireguardOptions = config.backend
        self.host = host
        self.ifname = WIREGUARD_DEVICE
        wanted = self.options.implementation
        self.tunnel = Tunnel(self.ifname, self.options.listen_port, wanted, host)
        # Dual stack over an IPv4 PublicIP with an IPv6 underlay address: a second device
        # on the IPv6 underlay, its own wireguard-go (pid and log files of its own).
        self.tunnel6 = (Tunnel(WIREGUARD_DEVICE6, self.options.port6, wanted, host,
                               files=FILES6)
                        if why_no_ipv6_underlay(config, host) is None else None)
        self._key: PrivateKey | None = None
        self._lease: Lease | None = None
        self._peer_count = 0
        self._peer_count6 = 0
        # Peers' IPv6 subnets riding the IPv4 device although this host has the IPv6 one,
        # and why: each a route to the IPv4 device (from the last reconcile).
        self._over_ipv4: dict[IPNetwork, str] = {}
        self._psk = base64.b64decode(self.options.psk) if self.options.psk else None
        # Why the IPv6 underlay device does not serve (None: it does), from the last step
        # that failed on it; retried every pass, never in the IPv4 device's way. Cleared
        # by a pass without failure (status, read meanwhile, never sees it blank early).
        self._error6: str | None = None
        self._failures6 = 0

    @property
    def implementation(self) -> str | None:
        return self.tunnel.implementation

    @property
    def _tunnels(self) -> tuple[Tunnel, ...]:
        return (self.tunnel,) if self.tunnel6 is None else (self.tunnel, self.tunnel6)

    # --- the Backend interface ----------------------------------------------------------

    def prepare(self) -> Mapping[str, Any]:
        self._key = load_or_create_private_key(key_file_path(self.host.state_dir))
        if self.tunnel6 is None:
            # A second device an earlier run left (this host had an IPv6 underlay address
            # then): ours by name, wanted no more.
            with Netlink() as nl:
                if nl.link(WIREGUARD_DEVICE6) is not None:
                    self._stale6().teardown(nl)
        key = self._key
        for tunnel in self._tunnels:
            if self._step(tunnel, "make", functools.partial(self._make, tunnel, key)):
                log.info("wireguard device ready", extra={
                    "implementation": tunnel.implementation, "device": tunnel.ifname})
        return {"PublicKey": self._key.public_key().to_base64()}

    @staticmethod
    def _make(tunnel: Tunnel, key: PrivateKey) -> bool:
        with Netlink() as nl:
            tunnel.ensure(nl)
        tunnel.configure_identity(key)
        return True

    def _step(self, tunnel: Tunnel, what: str, step: Callable[[], T]) -> T | None:
        """`step` on `tunnel`: on the IPv4 device (the data plane) an error is raised as
        ever; on the IPv6 underlay one it is kept (status, health) and the pass goes on."""
        if tunnel is not self.tunnel6:
            return step()
        try:
            return step()
        except (WeftError, OSError) as exc:
            self._failures6 += 1
            self._error6 = (f"{tunnel.ifname} (ListenPortV6 {tunnel.port}) not serving: "
                            f"{what}: {exc}; the IPv4 device carries on")
            log.error("wireguard IPv6 underlay device not serving",
                      extra={"device": tunnel.ifname, "error": self._error6})
            return None

    def ipv6_data(self) -> Mapping[str, Any] | None:
        """The lease's BackendV6Data in dual stack: the IPv6 underlay device's key and port
        when there is one (flannel's layout), else None (BackendData's copy, no Port)."""
        if self.tunnel6 is None or self._key is None:
            return None
        return {"PublicKey": self._key.public_key().to_base64(), "Port": self.tunnel6.port}

    def mtu(self) -> int:
        mtu = overlay_mtu(self.options, self.host.underlay_mtu, self.host.public_ip.version)
        if self.tunnel6 is not None:
            # One MTU for the containers: the IPv6 underlay's 20 bytes more header too.
            mtu = min(mtu, overlay_mtu(self.options, self.host.underlay_mtu, 6))
        return mtu

    def activate(self, lease: Lease) -> int:
        self._lease = lease
        mtu = self.mtu()
        with Netlink() as nl:
            link = self.tunnel.link(nl)
            nl.ensure_only_address(link.index, lease.own_address)
            six: LinkInfo | None = link
            if self.tunnel6 is not None:
                six = self._step(self.tunnel6, "address and up",
                                 lambda: self._activate6(nl, link, lease, mtu))
            elif lease.own_ipv6_address is not None:  # dual stack: the IPv6 half's own
                nl.ensure_only_address(link.index, lease.own_ipv6_address)
            nl.ensure_up(link, mtu)
            # One route for the whole Network (one per family in dual stack, the IPv6 one
            # to the IPv6 underlay device if there is one): WireGuard's allowed IPs pick
            # the peer, and the local subnet's more specific route (the CNI bridge) keeps
            # local traffic. A peer's IPv6 subnet riding the IPv4 device: its own route.
            # An IPv6 underlay device that is not there keeps no route (nor takes one).
            networks = [n for n in self.config.networks if n.version == 4 or six is not None]
            routes = {Route(network, None,
                            six.index if six is not None and network.version == 6
                            else link.index)
                      for network in networks}
            if six is not link:
                routes |= {Route(subnet, None, link.index) for subnet in self._over_ipv4}
            actual = {r for network in networks for r in nl.routes(network.version)}
            result = converge(routes, actual, nl.replace_route, nl.delete_route,
                              lambda r: str(r.dst), key=lambda r: r.dst)
            if result.errors:
                raise KernelError(f"routes for {', '.join(map(str, networks))}: "
                                  f"{result.errors}")
        return mtu

    def _activate6(self, nl: Netlink, link: LinkInfo, lease: Lease, mtu: int) -> LinkInfo:
        assert self.tunnel6 is not None
        six = self.tunnel6.link(nl)
        if lease.own_ipv6_address is not None:
            nl.ensure_only_address(six.index, lease.own_ipv6_address)
            if self.config.ipv6 is not None:
                # On the device of the IPv6 Network's route; not on the IPv4 one (where a
                # run without the IPv6 underlay device put it).
                nl.remove_addresses_in(link.index, self.config.ipv6.network)
        nl.ensure_up(six, mtu)  # the kernel's device binds ListenPortV6 here
        return six

    def reconcile(self, peers: Sequence[Lease]) -> ReconcileResult:
        assert self._key is not None, "prepare() first"
        # Level-based: the devices are ours too. One deleted by hand, or a wireguard-go
        # that died (crash, OOM kill): made again with identity, address and routes.
        key = self._key
        failed6, failures6 = self._error6, self._failures6
        # Each device on its own: the IPv4 device failing still leaves the IPv6 one its
        # peers (its error is raised after), and the IPv6 one failing is only reported.
        error4: WeftError | None = None
        for tunnel in self._tunnels:
            try:
                self._step(tunnel, "revive", functools.partial(
                    self._revive, tunnel, key, failed6 if tunnel is self.tunnel6 else None))
            except WeftError as exc:
                error4 = exc
        sets = peer_sets(peers, self._key.public_key(), self.options.listen_port,
                         self.options.persistent_keepalive, self._psk,
                         ipv6_underlay=self.tunnel6 is not None)
        result = ReconcileResult(errors=sets.errors)
        for tunnel, desired in zip(self._tunnels, (sets.peers, sets.peers6), strict=False):
            # Allowed IPs are per device: a subnet moving between the two devices (a peer
            # that gained or lost its IPv6 underlay device) clashes on neither.
            if (error4 is not None and tunnel is self.tunnel) or (
                    tunnel is self.tunnel6 and self._failures6 != failures6):
                continue  # not serving: its peers wait for it to come back
            plan = self._step(tunnel, "peers", functools.partial(self._peers, tunnel, desired))
            if plan is not None:
                result.added += len(plan.upsert)
                result.removed += len(plan.remove)
        self._peer_count, self._peer_count6 = len(sets.peers), len(sets.peers6)
        self._over_ipv4 = sets.over_ipv4
        if error4 is not None:
            raise error4
        if self._lease is not None:
            # Level-based: addresses, MTU and routes are ours too (a revived device has
            # none yet; a route deleted by hand comes back; over_ipv4's routes follow).
            self.activate(self._lease)
        if self._failures6 == failures6:
            self._error6 = None
        else:
            result.errors[WIREGUARD_DEVICE6] = str(self._error6)
        return result

    @staticmethod
    def _revive(tunnel: Tunnel, key: PrivateKey, failed: str | None) -> bool:
        """Made again if gone or not answering; the IPv6 underlay device also if it
        failed (`failed`: why) the last time: its port may be free now."""
        with Netlink() as nl:
            gone = tunnel.needs_revival(nl)
        if gone or failed is not None:
            tunnel.revive(key)
        return True

    @staticmethod
    def _peers(tunnel: Tunnel, desired: Mapping[PublicKey, PeerConfig]) -> DeviceChange:
        plan = peer_plan(desired, tunnel.read().peers)
        tunnel.apply(plan)
        return plan

    def status(self) -> Mapping[str, Any]:
        # Never keys, not even public ones: `weft status` output gets pasted into tickets.
        facts: dict[str, Any] = {
            "implementation": self.implementation,
            "device": self.ifname,
            "listen_port": self.options.listen_port,
            "peer_count": self._peer_count,
            "psk": self._psk is not None,
        }
        if self.implementation == USERSPACE:
            facts["wireguard_go_pid"] = self.tunnel.pid()
        state = self._read(self.tunnel, facts)
        if state is not None:
            facts["counters"] = dict(state.counters)
            # By the peer's public IP (never its key): Unix time of the last handshake.
            facts["handshakes"] = {
                str(peer.endpoint[0]): state.handshakes[key]
                for key, peer in state.peers.items()
                if key in state.handshakes and peer.endpoint is not None}
        if self.config.dual_stack:
            facts["ipv6_underlay"] = self._status6()
        return facts

    def _status6(self) -> dict[str, Any]:
        """Which underlay each peer's IPv6 subnet travels: the IPv6 device's facts, and
        the peers whose IPv6 subnet rides the IPv4 device, with why."""
        if self.tunnel6 is None:
            return {"device": None,
                    "why": why_no_ipv6_underlay(self.config, self.host, self.ifname)}
        six: dict[str, Any] = {"device": self.tunnel6.ifname, "listen_port": self.tunnel6.port,
                               "peer_count": self._peer_count6,
                               "over_ipv4": {str(subnet): why for subnet, why
                                             in sorted(self._over_ipv4.items(), key=str)}}
        if self._error6 is not None:
            six["error"] = self._error6
        if self.tunnel6.implementation == USERSPACE:
            six["wireguard_go_pid"] = self.tunnel6.pid()
        state = self._read(self.tunnel6, six)
        if state is not None:
            six["counters"] = dict(state.counters)
        return six

    @staticmethod
    def _read(tunnel: Tunnel, facts: dict[str, Any]) -> DeviceState | None:
        try:
            return tunnel.read()
        except KernelError as exc:  # status must answer even when the device does not
            facts["device_error"] = str(exc)
            return None

    def close(self) -> None:
        # Leave the devices and wireguard-go serving: the next agent adopts them.
        pass

    def teardown(self) -> None:
        with Netlink() as nl:
            for tunnel in self._tunnels:
                tunnel.teardown(nl)
            if self.tunnel6 is None:
                self._stale6().teardown(nl)

    def _stale6(self) -> Tunnel:
        return Tunnel(WIREGUARD_DEVICE6, self.options.port6, self.options.implementation,
                      self.host, files=FILES6)
