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

Restart: `close()` leaves the device, its peers and the wireguard-go process running;
the next `prepare()` adopts them (nothing is re-set that already matches), so a restarted
agent drops no traffic.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from weft.backends.base import ReconcileResult, converge
from weft.backends.registry import overlay_mtu
from weft.backends.wireguard.kernel import KernelDevice
from weft.backends.wireguard.keyfile import key_file_path, load_or_create_private_key
from weft.backends.wireguard.keys import PrivateKey
from weft.backends.wireguard.options import WireguardOptions
from weft.backends.wireguard.plan import desired_peers, device_change, peer_plan
from weft.backends.wireguard.uapi import UapiDevice
from weft.backends.wireguard.userspace import WireguardGo
from weft.core.config import NetworkConfig
from weft.core.constants import WIREGUARD_DEVICE
from weft.core.dataplane import Route
from weft.core.errors import KernelError, KernelFeatureMissing
from weft.core.host import HostContext
from weft.core.lease import Lease
from weft.host.netlink import LinkInfo, Netlink

log = logging.getLogger(__name__)

KERNEL = "kernel"
USERSPACE = "wireguard-go"


class WireguardBackend:
    def __init__(self, config: NetworkConfig, host: HostContext) -> None:
        assert isinstance(config.backend, WireguardOptions)
        self.config = config
        self.options: WireguardOptions = config.backend
        self.host = host
        self.ifname = WIREGUARD_DEVICE
        self.process = WireguardGo(self.ifname, host.state_dir)
        self.implementation: str | None = None
        self._device: KernelDevice | UapiDevice | None = None
        self._key: PrivateKey | None = None
        self._lease: Lease | None = None
        self._peer_count = 0
        self._psk = base64.b64decode(self.options.psk) if self.options.psk else None

    # --- the device ---------------------------------------------------------------------

    def _use(self, implementation: str) -> None:
        self.implementation = implementation
        self._device = (KernelDevice(self.ifname) if implementation == KERNEL
                        else self.process.device)

    def _start_userspace(self, nl: Netlink) -> None:
        nl.delete_link(self.ifname)  # a TUN left by a wireguard-go that died
        self.process.start()
        self._use(USERSPACE)

    def _ensure_device(self, nl: Netlink) -> None:
        wanted = self.options.implementation
        link = nl.link(self.ifname)
        if link is not None and link.kind == "wireguard" and wanted != USERSPACE:
            self._use(KERNEL)
            return
        if (link is not None and link.kind == "tun" and wanted != KERNEL
                and self.process.device.alive()):
            self._use(USERSPACE)  # adopt the wireguard-go a previous run left serving
            return
        if link is not None:
            # Ours by name, but of the wrong kind or without a live wireguard-go.
            self.process.stop()
            nl.delete_link(self.ifname)
        if wanted != USERSPACE:
            try:
                nl.create_link(self.ifname, "wireguard")
                self._use(KERNEL)
                return
            except KernelFeatureMissing:
                if wanted == KERNEL:
                    raise KernelFeatureMissing(
                        "Backend.Implementation is \"kernel\" but the kernel has no WireGuard "
                        "module; load it (modprobe wireguard) or use \"auto\"/\"wireguard-go\""
                    ) from None
        self._start_userspace(nl)

    def _device_or_fail(self) -> KernelDevice | UapiDevice:
        if self._device is None:
            raise KernelError("the wireguard backend was used before prepare()")
        return self._device

    def _configure_identity(self) -> None:
        assert self._key is not None
        device = self._device_or_fail()
        device.apply(device_change(device.read(), self._key, self.options.listen_port))

    # --- the Backend interface ----------------------------------------------------------

    def prepare(self) -> Mapping[str, Any]:
        self._key = load_or_create_private_key(key_file_path(self.host.state_dir))
        with Netlink() as nl:
            self._ensure_device(nl)
        self._configure_identity()
        log.info("wireguard device ready",
                 extra={"implementation": self.implementation, "device": self.ifname})
        return {"PublicKey": self._key.public_key().to_base64()}

    def mtu(self) -> int:
        return overlay_mtu(self.options, self.host.underlay_mtu, self.host.public_ip.version)

    def activate(self, lease: Lease) -> int:
        self._lease = lease
        mtu = self.mtu()
        with Netlink() as nl:
            link = self._link(nl)
            nl.ensure_only_address(link.index, lease.own_address)
            if lease.own_ipv6_address is not None:  # dual stack: the IPv6 half's own
                nl.ensure_only_address(link.index, lease.own_ipv6_address)
            nl.ensure_up(link, mtu)
            # One route for the whole Network (one per family in dual stack): WireGuard's
            # allowed IPs pick the peer, and the local subnet's more specific route (the
            # CNI bridge) keeps local traffic.
            networks = self.config.networks
            routes = {Route(network, None, link.index) for network in networks}
            actual = {r for network in networks for r in nl.routes(network.version)}
            result = converge(routes, actual, nl.replace_route, nl.delete_route,
                              lambda r: str(r.dst))
            if result.errors:
                raise KernelError(f"routes for {', '.join(map(str, networks))}: "
                                  f"{result.errors}")
        return mtu

    def _link(self, nl: Netlink) -> LinkInfo:
        link = nl.link(self.ifname)
        if link is None:
            raise KernelError(f"WireGuard device {self.ifname} vanished")
        return link

    def _revive(self) -> None:
        """wireguard-go died under us (crash, OOM kill): start it again and restore the
        identity, address and route; reconcile then restores the peers."""
        log.warning("wireguard-go is not answering; restarting it", extra={"device": self.ifname})
        with Netlink() as nl:
            self._start_userspace(nl)
        self._configure_identity()
        if self._lease is not None:
            self.activate(self._lease)

    def reconcile(self, peers: Sequence[Lease]) -> ReconcileResult:
        assert self._key is not None, "prepare() first"
        device = self._device_or_fail()
        if isinstance(device, UapiDevice) and not device.alive():
            self._revive()
        desired, errors = desired_peers(
            peers, self._key.public_key(), self.options.listen_port,
            self.options.persistent_keepalive, self._psk,
        )
        plan = peer_plan(desired, device.read().peers)
        device.apply(plan)
        self._peer_count = len(desired)
        return ReconcileResult(added=len(plan.upsert), removed=len(plan.remove), errors=errors)

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
            facts["wireguard_go_pid"] = self.process.pid()
        if self._device is not None:
            try:
                state = self._device.read()
                facts["counters"] = dict(state.counters)
                # By the peer's public IP (never its key): Unix time of the last handshake.
                facts["handshakes"] = {
                    str(peer.endpoint[0]): state.handshakes[key]
                    for key, peer in state.peers.items()
                    if key in state.handshakes and peer.endpoint is not None}
            except KernelError as exc:  # status must answer even when the device does not
                facts["device_error"] = str(exc)
        return facts

    def close(self) -> None:
        # Leave the device and wireguard-go serving: the next agent adopts them.
        pass

    def teardown(self) -> None:
        # The route and address go with the device; wireguard-go exits with its TUN.
        self.process.stop()
        with Netlink() as nl:
            nl.delete_link(self.ifname)
