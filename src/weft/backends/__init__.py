"""Backends by `Type`: a plain dict, explicit wiring, no import side effects."""

from __future__ import annotations

from weft.backends.base import Backend, BackendFactory, HostContext, ReconcileResult
from weft.backends.hostgw import HostGwBackend
from weft.backends.udp import UdpBackend
from weft.backends.vxlan import VxlanBackend
from weft.backends.wireguard import WireguardBackend

BACKENDS: dict[str, BackendFactory] = {
    "vxlan": VxlanBackend,
    "host-gw": HostGwBackend,
    "wireguard": WireguardBackend,
    "udp": UdpBackend,
}

__all__ = ["BACKENDS", "Backend", "BackendFactory", "HostContext", "ReconcileResult"]
