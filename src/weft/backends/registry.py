"""Backends by `Type`: a plain dict, explicit wiring, no import side effects.

The udp and wireguard backends pull in threads, crypto and more; each factory imports its
module only when a host actually runs that backend, which keeps the agent small.
"""

from __future__ import annotations

from weft.backends.base import Backend, BackendFactory, HostContext
from weft.backends.hostgw.apply import HostGwBackend
from weft.backends.vxlan.apply import VxlanBackend
from weft.core.config import NetworkConfig


def _udp(config: NetworkConfig, host: HostContext) -> Backend:
    from weft.backends.udp.apply import UdpBackend

    return UdpBackend(config, host)


def _wireguard(config: NetworkConfig, host: HostContext) -> Backend:
    from weft.backends.wireguard.apply import WireguardBackend

    return WireguardBackend(config, host)


BACKENDS: dict[str, BackendFactory] = {
    "vxlan": VxlanBackend,
    "host-gw": HostGwBackend,
    "wireguard": _wireguard,
    "udp": _udp,
}

