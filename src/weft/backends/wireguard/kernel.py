"""The kernel edge: configure the in-kernel WireGuard device over generic netlink
(pyroute2's WireGuard socket). Same `DeviceState`/`DeviceChange` as the UAPI edge.

The kernel takes one peer per pyroute2 call; removals are sent before additions so a
subnet moving to a new key is free when the new peer claims it.
"""

from __future__ import annotations

import base64
import ipaddress
from typing import Any

from pyroute2 import WireGuard
from pyroute2.netlink.exceptions import NetlinkError

from weft.backends.wireguard.keys import PrivateKey, PublicKey
from weft.backends.wireguard.plan import DeviceChange, DeviceState, PeerConfig, normalise_psk
from weft.core.config import IPNetwork
from weft.core.errors import KernelError
from weft.host.netlink import translate


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _key_attr(value: Any) -> bytes | None:
    # pyroute2 decodes a key attribute to its base64 form ("value"); older releases
    # handed back the nla with the raw bytes under "key". Accept both.
    if isinstance(value, bytes | str):
        try:
            raw = base64.b64decode(value, validate=True)
        except ValueError:
            return None
        return raw if len(raw) == 32 else None
    if isinstance(value, dict) and value.get("key") is not None:
        return bytes(value["key"])
    return None


class KernelDevice:
    """The kernel's WireGuard device `ifname` in the current network namespace."""

    def __init__(self, ifname: str) -> None:
        self.ifname = ifname

    def read(self) -> DeviceState:
        try:
            with WireGuard() as wg:
                msgs = wg.info(self.ifname)
        except NetlinkError as exc:
            raise translate(exc, f"read WireGuard device {self.ifname}") from None
        private_key: PrivateKey | None = None
        listen_port = 0
        peers: dict[PublicKey, PeerConfig] = {}
        counters = {"rx_bytes": 0, "tx_bytes": 0, "peers_with_handshake": 0}
        handshakes: dict[PublicKey, int] = {}
        # A device with many peers is dumped over several messages.
        for msg in msgs:
            raw = _key_attr(msg.get_attr("WGDEVICE_A_PRIVATE_KEY"))
            if raw is not None and any(raw):
                private_key = PrivateKey(raw)
            listen_port = msg.get_attr("WGDEVICE_A_LISTEN_PORT") or listen_port
            for peer in msg.get_attr("WGDEVICE_A_PEERS") or []:
                counters["rx_bytes"] += peer.get_attr("WGPEER_A_RX_BYTES") or 0
                counters["tx_bytes"] += peer.get_attr("WGPEER_A_TX_BYTES") or 0
                handshake = peer.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")
                parsed = _parse_peer(peer)
                if isinstance(handshake, dict) and handshake.get("tv_sec"):
                    counters["peers_with_handshake"] += 1
                    if parsed is not None:
                        handshakes[parsed.public_key] = int(handshake["tv_sec"])
                if parsed is not None:
                    old = peers.get(parsed.public_key)
                    if old is not None:  # a peer split across messages: merge its IPs
                        parsed = PeerConfig(parsed.public_key, old.endpoint or parsed.endpoint,
                                            old.allowed_ips | parsed.allowed_ips,
                                            old.keepalive, old.psk)
                    peers[parsed.public_key] = parsed
        return DeviceState(private_key, listen_port, peers, counters, handshakes)

    def apply(self, change: DeviceChange) -> None:
        if change.empty:
            return
        try:
            with WireGuard() as wg:
                if change.private_key is not None or change.listen_port is not None:
                    wg.set(
                        self.ifname,
                        private_key=(_b64(change.private_key.raw)
                                     if change.private_key is not None else None),
                        listen_port=change.listen_port,
                    )
                for key in change.remove:
                    wg.set(self.ifname, peer={"public_key": _b64(key.raw), "remove": True})
                for peer in change.upsert:
                    wg.set(self.ifname, peer=_peer_spec(peer))
        except NetlinkError as exc:
            raise translate(exc, f"configure WireGuard device {self.ifname}") from None
        except ValueError as exc:  # pyroute2's own argument checks
            raise KernelError(f"configure WireGuard device {self.ifname}: {exc}") from None


def _peer_spec(peer: PeerConfig) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "public_key": _b64(peer.public_key.raw),
        "persistent_keepalive": peer.keepalive,
        "preshared_key": _b64(peer.psk or bytes(32)),
        "replace_allowed_ips": True,
        "allowed_ips": [str(n) for n in sorted(peer.allowed_ips, key=str)],
    }
    if peer.endpoint is not None:
        spec["endpoint_addr"] = str(peer.endpoint[0])
        spec["endpoint_port"] = peer.endpoint[1]
    return spec


def _parse_peer(peer: Any) -> PeerConfig | None:
    raw = _key_attr(peer.get_attr("WGPEER_A_PUBLIC_KEY"))
    if raw is None:
        return None
    endpoint_attr = peer.get_attr("WGPEER_A_ENDPOINT")
    endpoint = None
    if isinstance(endpoint_attr, dict) and endpoint_attr.get("addr"):
        endpoint = (ipaddress.ip_address(endpoint_attr["addr"]), int(endpoint_attr["port"]))
    allowed: set[IPNetwork] = set()
    for item in peer.get_attr("WGPEER_A_ALLOWEDIPS") or []:
        addr = item.get("addr") if isinstance(item, dict) else None
        if addr:
            allowed.add(ipaddress.ip_network(addr, strict=False))
    return PeerConfig(
        public_key=PublicKey(raw),
        endpoint=endpoint,
        allowed_ips=frozenset(allowed),
        keepalive=peer.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or 0,
        psk=normalise_psk(_key_attr(peer.get_attr("WGPEER_A_PRESHARED_KEY"))),
    )
